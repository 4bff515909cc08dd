"""The single file and its .pyz: runs from anywhere with a bare python3; reproducible; installers lint."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
import build_pyz  # noqa: E402


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    """The built archive, copied alone into an empty directory."""
    out = tmp_path_factory.mktemp("build") / "localswarm.pyz"
    build_pyz.build(str(out))
    lonely = tmp_path_factory.mktemp("empty") / "localswarm.pyz"
    shutil.copyfile(out, lonely)
    return str(lonely)


def bare(pyz, *args):
    """A bare python3: -I (isolated) and -S (no site-packages), cwd = the pyz's empty dir."""
    return subprocess.run([sys.executable, "-I", "-S", pyz, *args], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(pyz), env={"PATH": "/usr/bin:/bin"})


def test_help_version_detect_from_a_copied_pyz(pyz):
    assert os.listdir(os.path.dirname(pyz)) == ["localswarm.pyz"]
    r = bare(pyz, "--help")
    assert r.returncode == 0 and "--detect" in r.stdout and "LOCALSWARM_PORT" in r.stdout
    r = bare(pyz, "--version")
    assert r.returncode == 0 and r.stdout.startswith("localswarm ")
    r = bare(pyz, "--detect")
    assert r.returncode == 0, r.stderr
    assert "Recommended:" in r.stdout and "Budget:" in r.stdout
    r = bare(pyz, "--detect", "--json")
    import json
    d = json.loads(r.stdout)
    assert {"hardware", "budget_bytes", "rule", "plan", "alternatives"} <= set(d)
    assert {"os", "arch", "cpu_model", "cpu_cores", "ram_total_bytes", "ram_available_bytes", "is_apple_silicon",
            "is_termux", "gpus"} <= set(d["hardware"])
    assert {"family", "size", "quant", "voters", "ctx", "memory_bytes", "file", "repo"} <= set(d["plan"])


def test_missing_optional_packages_give_one_line(pyz):
    r = bare(pyz, "--yes", "--model", "qwen2.5-coder:0.5b:q4_k_m", "--download-only")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "pip install huggingface-hub" in r.stderr
    assert "Traceback" not in r.stderr


def test_build_is_reproducible(tmp_path):
    a, b = tmp_path / "a.pyz", tmp_path / "b.pyz"
    build_pyz.build(str(a))
    build_pyz.build(str(b))
    assert a.read_bytes() == b.read_bytes()


def test_only_stdlib_at_module_top():
    import ast
    with open(os.path.join(ROOT, "localswarm.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names - set(sys.stdlib_module_names)


def test_runs_as_a_script_under_isolated_mode(tmp_path):
    """python -I (and PYTHONSAFEPATH) leave the script's directory off sys.path: models.json is
    still found beside it."""
    r = subprocess.run([sys.executable, "-I", os.path.join(ROOT, "localswarm.py"), "--detect", "--json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["id"]


def test_shell_scripts_pass_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck is missing: ./install.sh --test installs it"
    scripts = [os.path.join(ROOT, p) for p in ("install.sh", "install-termux.sh", ".ci/run")]
    r = subprocess.run(["shellcheck", "-s", "bash", *scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_every_installer_installs_the_versions_requirements_txt_pins():
    """install.sh/install-termux.sh read the pins with grep, install.bat with findstr: each pattern
    they read must match a line of requirements.txt, and no installer names a version of its own."""
    import re
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = f.read().splitlines()
    for name in ("install.sh", "install-termux.sh", "install.bat"):
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        wanted = re.findall(r'findstr /b /c:"([^"]+)"', text) + re.findall(r"grep -E '\^([^']+)'", text) \
            + re.findall(r'pin ([a-z-]+)', text)
        assert wanted, name
        for w in wanted:
            w = w.replace("\\", "")
            assert any(line.startswith(w) or line.startswith(w + "==") for line in lines), (name, w)
        assert not re.search(r"(llama-cpp-python|psutil|huggingface-hub)==\d", text), name
