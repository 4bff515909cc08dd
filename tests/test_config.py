"""Config: defaults < file < environment < CLI, errors naming the key and the file."""
import json
import subprocess
import sys

import pytest

import localswarm as ls
from conftest import ROOT


def write(tmp_path, obj):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(p)


def test_precedence_cli_env_file_default(tmp_path):
    path = write(tmp_path, {"server": {"port": 9001, "host": "0.0.0.0"}, "swarm": {"max_instances": 6}})
    cfg = ls.load_config({"server.port": 9003}, env={"LOCALSWARM_PORT": "9002", "LOCALSWARM_HOST": "127.0.0.2"},
                         path=path)
    assert cfg["server.port"] == 9003 and cfg.sources["server.port"] == "command line"
    assert cfg["server.host"] == "127.0.0.2" and cfg.sources["server.host"] == "env LOCALSWARM_HOST"
    assert cfg["swarm.max_instances"] == 6 and cfg.sources["swarm.max_instances"] == path
    assert cfg["swarm.consensus_strategy"] == "similarity" and cfg.sources["swarm.consensus_strategy"] == "default"


@pytest.mark.parametrize("obj,match", [
    ({"server": {"prot": 1}}, r"unknown key server.prot \(did you mean server.port\?\)"),
    ({"swarm": {"consensus_strategy": "loudest"}}, "swarm.consensus_strategy must be one of"),
    ({"server": {"port": "eighty"}}, "server.port must be a int"),
    ({"server": {"port": 70000}}, "server.port must be between"),
    ({"network": {"peers": "a:1"}}, None),
    ("{not json", "not valid JSON"),
    ([1, 2], "top level must be an object"),
])
def test_bad_files_name_the_key_and_the_file(tmp_path, obj, match):
    path = write(tmp_path, obj)
    if match is None:
        assert ls.load_config(env={}, path=path)["network.peers"] == ["a:1"]
        return
    with pytest.raises(ls.LocalswarmError, match=match) as e:
        ls.load_config(env={}, path=path)
    assert path in str(e.value)


def test_bad_environment_is_an_error():
    with pytest.raises(ls.LocalswarmError, match="LOCALSWARM_VOTERS"):
        ls.load_config(env={"LOCALSWARM_VOTERS": "many"}, read_file=False)


@pytest.mark.parametrize("env", [{"LOCALSWARM_TIMEOUT": "nan"}, {"LOCALSWARM_RAM_FRACTION": "nan"},
                                 {"LOCALSWARM_TIMEOUT": "inf"}, {"LOCALSWARM_ADVERTISE_INTERVAL": "-inf"}])
def test_nan_and_infinity_are_refused(env):
    """NaN passes every range check (timeout=nan: the deadline never fires)."""
    with pytest.raises(ls.LocalswarmError, match="must be a float"):
        ls.load_config(env=env, read_file=False)


def test_env_lists_and_bools():
    cfg = ls.load_config(env={"LOCALSWARM_PEERS": "a:1, b:2", "LOCALSWARM_FEDERATE": "yes"}, read_file=False)
    assert cfg["network.peers"] == ["a:1", "b:2"] and cfg["network.enabled"] is True


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, f"{ROOT}/localswarm.py", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_print_config_shows_sources(tmp_path):
    path = write(tmp_path, {"swarm": {"timeout": 30}})
    r = run_cli("--config", path, "--port", "9999", "--print-config", env={"LOCALSWARM_API_KEY": "sekret", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0
    assert "9999" in r.stdout and "command line" in r.stdout and path in r.stdout
    assert "sekret" not in r.stdout and "env LOCALSWARM_API_KEY" in r.stdout


def test_missing_explicit_config_is_one_line_and_exit_1():
    r = run_cli("--config", "/nonexistent/c.json", "--detect")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_strategy_and_instances_flags_reach_the_config():
    args = ls.build_parser().parse_args(["--strategy", "quality", "--instances", "3", "--stream-mode", "fastest"])
    cfg = ls.load_config(ls.cli_overrides(args), env={}, read_file=False)
    assert cfg["swarm.consensus_strategy"] == "quality" and cfg["swarm.voters"] == 3
    assert cfg["swarm.stream_mode"] == "fastest" and cfg.sources["swarm.voters"] == "command line"
    with pytest.raises(SystemExit):
        ls.build_parser().parse_args(["--strategy", "loudest"])


def test_an_integer_too_long_to_read_is_one_line_and_exit_1(tmp_path):
    """Python refuses ints of over 4,300 digits with a ValueError, not a JSONDecodeError."""
    path = tmp_path / "big.json"
    path.write_text('{"server": {"port": ' + "9" * 5000 + "}}")
    with pytest.raises(ls.LocalswarmError, match="not valid JSON"):
        ls.load_config(env={}, path=str(path))
    r = run_cli("--config", str(path), "--print-config")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    r = run_cli("--print-config", env={"LOCALSWARM_VOTERS": "9" * 5000, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and len(r.stderr) < 300, r.stderr
    big = int("9" * 4000)
    with pytest.raises(ls.LocalswarmError, match=r"must be between .*\.\.\.$"):
        ls.coerce_setting(ls.SETTINGS_BY_KEY[("server", "port")], big, "test")
    assert ls.shown(10 ** 5000) == "an integer of about 5001 digits"
