"""The CLI: the interactive menu through a pseudo-terminal (all three paths, bad input, Ctrl-C,
EOF), non-interactive start, the startup summary, clean shutdown on SIGINT/SIGTERM."""
import json
import os
import signal
import sys

import pytest

import localswarm as ls
from conftest import ROOT, free_port, wait_http

pexpect = pytest.importorskip("pexpect")

# A small CPU-only machine, so the menu's choices are quick to read; the model is not cached
# and the hub is off, so every path ends on the starter model (the offline fallback).
PROFILE = {"os": "Linux", "arch": "x86_64", "cpu_model": "test cpu", "cpu_cores": 2, "cpu_threads": 2,
           "cpu_flags": [], "ram_total_bytes": 4 * ls.GiB, "ram_available_bytes": 3 * ls.GiB}


@pytest.fixture
def menu(tmp_path):
    prof = tmp_path / "hw.json"
    prof.write_text(json.dumps({"hardware": PROFILE}))
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOCALSWARM_MODELS_DIR=str(tmp_path / "models"),
               LOCALSWARM_CTX="2048", LOCALSWARM_PORT=str(port))
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "localswarm.py"), "--hardware-profile", str(prof)],
                          env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    yield child, port
    if child.isalive():
        child.kill(signal.SIGKILL)


def serve_then_stop(child, port):
    child.expect("opencode.json")
    wait_http(f"http://127.0.0.1:{port}/health", timeout=90)
    child.kill(signal.SIGINT)
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0


def test_menu_recommended(menu):
    child, port = menu
    child.expect("Recommended:")
    child.expect(r"Choice \[1\]: ")
    child.sendline("7")                     # bad input re-asks
    child.expect("choose 1, 2, 3 or q")
    child.sendline("")                      # default: recommended
    serve_then_stop(child, port)


def test_menu_browse(menu):
    child, port = menu
    child.expect(r"Choice \[1\]: ")
    child.sendline("2")
    child.expect("budget")
    child.expect(r"Configuration \[1-(\d+)\]: ")
    child.sendline("999")
    child.expect("enter a number from 1 to")
    child.sendline("1")
    serve_then_stop(child, port)


def test_menu_custom(menu):
    child, port = menu
    child.expect(r"Choice \[1\]: ")
    child.sendline("3")
    child.expect(r"Family \(")
    child.sendline("nosuch")
    child.expect("choose one of")
    child.sendline("qwen2.5-coder")
    child.expect(r"Size \(")
    child.sendline("0.5b")
    child.expect(r"Quantization \(")
    child.sendline("q4_k_m")
    child.expect(r"Voters \(1-(\d+)\)")
    child.sendline("2")
    serve_then_stop(child, port)


@pytest.mark.parametrize("leave", ["sendintr", "sendeof"], ids=["ctrl-c", "eof"])
def test_menu_ctrl_c_and_eof_exit_cleanly(menu, leave):
    child, _ = menu
    child.expect(r"Choice \[1\]: ")
    getattr(child, leave)()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.before


def test_not_a_tty_takes_the_recommended_plan_and_sigterm_exits_0(tmp_path):
    import subprocess
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOCALSWARM_MODELS_DIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "localswarm.py"), "--ctx", "2048", "--voters", "2",
                          "--port", str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        h = wait_http(f"http://127.0.0.1:{port}/health", timeout=90)
        assert h["model"].startswith("smollm2")              # offline: the starter model
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    assert '"@ai-sdk/openai-compatible"' in out and f"http://127.0.0.1:{port}/v1" in out
    assert "serving the starter model" in err and "--download-only --model qwen2.5-coder" in err


def test_unknown_model_flag_is_one_line_with_suggestions():
    import subprocess
    r = subprocess.run([sys.executable, os.path.join(ROOT, "localswarm.py"), "--model", "qwen2.5-coder:7b:q9", "-y"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "qwen2.5-coder:7b comes in q4_k_m" in r.stderr


def test_the_opencode_snippet_never_prints_the_api_key():
    snippet = json.dumps(ls.opencode_snippet("http://127.0.0.1:8080", "m", "sekrit-key"))
    assert "sekrit-key" not in snippet and "{env:LOCALSWARM_API_KEY}" in snippet
    assert '"apiKey": "none"' in json.dumps(ls.opencode_snippet("http://127.0.0.1:8080", "m", ""))


@pytest.mark.parametrize("data", [b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, b"GGUF\x03\x00\x00\x00\x01",
                                  b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x01" + b"\x00" * 7 + b"\xff" * 8],
                         ids=["huge-counts", "truncated", "string-past-the-end"])
def test_a_malformed_gguf_is_one_line_and_nonzero(tmp_path, data):
    import subprocess
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "localswarm.py"), "--model-path", str(bad), "-y",
                        "--port", "0"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a valid GGUF file" in r.stderr, r.stderr


def test_a_model_that_fails_to_load_stops_the_server_with_one_line(tmp_path, starter_path):
    """The port opens at once (/health says loading); a model llama.cpp cannot load then ends
    the server with one line and exit 1, as llama-server does, rather than serving errors."""
    import subprocess
    cut = tmp_path / "cut.gguf"
    with open(starter_path, "rb") as f:
        cut.write_bytes(f.read(40 * 2 ** 20))        # the header reads fine; the tensors are missing
    r = subprocess.run([sys.executable, os.path.join(ROOT, "localswarm.py"), "--model-path", str(cut), "-y", "-q",
                        "--port", "0"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("localswarm: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_the_status_line_says_what_the_swarm_is_doing(live_server):
    url, app = live_server
    assert ls.status_line(ls.App(ls.load_config(env={}, read_file=False))).startswith("[localswarm] requests 0,")
    line = ls.status_line(app)
    assert f"0/{app.swarm.voters} busy" in line and "queue 0" in line and "peers 0" in line
    assert f"voters {app.swarm.voters} healthy" in line and "memory: process" in line
    assert f"requests {app.swarm.requests}," in line
