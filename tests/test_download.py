"""Downloads through huggingface_hub against a local mirror on 127.0.0.1 that answers like the
Hugging Face file endpoints (HEAD with size/etag headers, GET with Range), serving the starter GGUF:
full download, a connection cut mid-file then resumed, a corrupted file rejected, offline fallback."""
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import localswarm as ls
from conftest import ROOT

pytest.importorskip("huggingface_hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Mirror(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, payload: bytes, mode: str):
        self.payload, self.mode, self.gets = payload, mode, []
        self.sha = hashlib.sha256(payload).hexdigest()
        super().__init__(("127.0.0.1", 0), MirrorHandler)


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _headers(self, status, length, extra=None):
        srv = self.server
        self.send_response(status)
        for k, v in {"Content-Length": str(length), "X-Repo-Commit": COMMIT, "ETag": f'"{srv.sha}"',
                     "X-Linked-Etag": f'"{srv.sha}"', "X-Linked-Size": str(len(srv.payload)),
                     "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()

    def do_POST(self):
        """The hub's paths-info API: the file's LFS object id is its sha256."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv = self.server
        body = json.dumps([{"type": "file", "path": "starter.gguf", "size": len(srv.payload), "oid": "0" * 40,
                            "lfs": {"oid": srv.sha, "size": len(srv.payload), "pointerSize": 134}}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        if "/resolve/" not in self.path:
            self.send_error(404)
            return
        self._headers(200, len(self.server.payload))

    def do_GET(self):
        srv = self.server
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
        srv.gets.append(start)
        body = srv.payload[start:]
        if srv.mode == "corrupt":
            body = bytearray(body)
            body[len(body) // 2] ^= 0xFF
            body = bytes(body)
        if rng:
            self._headers(206, len(body), {"Content-Range": f"bytes {start}-{len(srv.payload) - 1}/{len(srv.payload)}"})
        else:
            self._headers(200, len(body))
        if srv.mode == "cut" and len(srv.gets) == 1:
            self.wfile.write(body[:len(body) // 3])      # then drop the connection mid-file
            self.wfile.flush()
            self.connection.shutdown(2)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def mirror(request, starter_path):
    with open(starter_path, "rb") as f:
        payload = f.read()
    srv = Mirror(payload, request.param)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


SCRIPT = """
import json, sys, localswarm as ls
v = ls.Variant("test", "Test", "135m", "Q4_1", "test-org/starter-GGUF", "starter.gguf", {size}, {sha!r},
               30, 3, 64, 8192, 49152, "chatml", "apache-2.0")
try:
    print(json.dumps({{"path": ls.download_model(v, sys.argv[1], quiet=True)}}))
except ls.LocalswarmError as exc:
    print(json.dumps({{"error": str(exc)}}))
"""


def download(mirror, tmp_path, sha=None, endpoint=None):
    """Run the download in a child (huggingface_hub reads HF_ENDPOINT when it is imported);
    sha "" = a variant with no pinned sha256."""
    code = SCRIPT.format(size=len(mirror.payload), sha=mirror.sha if sha is None else sha)
    endpoint = endpoint or f"http://127.0.0.1:{mirror.server_address[1]}"
    env = dict(os.environ, HF_ENDPOINT=endpoint, PYTHONPATH=ROOT,
               HF_HUB_DOWNLOAD_TIMEOUT="3", HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "models")], capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.stdout.strip(), r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mirror", ["ok"], indirect=True)
def test_full_download_is_verified_and_found_in_the_cache(mirror, tmp_path):
    out = download(mirror, tmp_path)
    assert "path" in out, out
    with open(out["path"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == mirror.sha
    v = ls.Variant("test", "Test", "135m", "Q4_1", "test-org/starter-GGUF", "starter.gguf", len(mirror.payload),
                   mirror.sha, 30, 3, 64, 8192, 49152, "chatml", "apache-2.0")
    assert ls.find_cached_model(v, str(tmp_path / "models")) == out["path"]
    assert mirror.gets == [0]
    with socket.create_server(("127.0.0.1", 0)) as gone:
        closed = f"http://127.0.0.1:{gone.getsockname()[1]}"
    assert download(mirror, tmp_path, endpoint=closed) == out     # offline: the cached file


@pytest.mark.parametrize("mirror", ["cut"], indirect=True)
def test_cut_connection_resumes(mirror, tmp_path):
    out = download(mirror, tmp_path)
    assert "path" in out, out
    assert len(mirror.gets) >= 2 and mirror.gets[-1] > 0, f"no ranged resume: {mirror.gets}"
    with open(out["path"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == mirror.sha


@pytest.mark.parametrize("mirror", ["corrupt"], indirect=True)
def test_corrupted_file_is_rejected_and_deleted(mirror, tmp_path):
    out = download(mirror, tmp_path)
    assert "error" in out and "sha256" in out["error"] and "deleted" in out["error"]
    left = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "models") for f in fs if f.endswith(".gguf")]
    assert all(not os.path.exists(p) for p in left), "a bad file must not stay where it would be used"


@pytest.mark.parametrize("mirror", ["corrupt"], indirect=True)
def test_a_variant_without_a_pinned_sha256_is_checked_against_the_hubs(mirror, tmp_path):
    out = download(mirror, tmp_path, sha="")
    assert "sha256" in out.get("error", ""), out


def test_bad_magic_is_rejected(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ls.LocalswarmError, match="bad magic"):
        ls.verify_model_file(str(p))


def test_offline_falls_back_to_the_starter_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reg = ls.load_registry()
    budget = ls.Budget(16 * ls.GiB, "test", [16 * ls.GiB], "cpu")
    p = ls.plan(reg, budget)
    path, used = ls.resolve_model_file(p, str(tmp_path), reg, budget)
    assert used.variant.pip and path == ls.starter_model_path()
    assert any("--download-only --model " + p.variant.id in r.getMessage() for r in caplog.records)


def test_download_only_offline_is_one_line_and_nonzero(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOCALSWARM_MODELS_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, f"{ROOT}/localswarm.py", "--download-only", "--model",
                        "qwen2.5-coder:0.5b:q4_k_m"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("localswarm: error: download of")


def test_download_only_of_the_starter_succeeds(tmp_path):
    r = subprocess.run([sys.executable, f"{ROOT}/localswarm.py", "--download-only", "--json", "--model",
                        "smollm2:135m:q4_1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == ls.starter_model_path()


def test_ctrl_c_during_a_download_exits_130_and_leaves_no_model_file(tmp_path):
    """A hub that accepts and never answers; Ctrl-C under --yes must still mean 'interrupted'."""
    silent = socket.create_server(("127.0.0.1", 0))
    silent.listen(8)
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}",
               LOCALSWARM_MODELS_DIR=str(tmp_path))
    try:
        # a suite started in the background (nohup ... &) has SIGINT ignored, and children inherit
        # that; Ctrl-C at a terminal is what this test is about, so the child gets the default
        child = subprocess.Popen([sys.executable, f"{ROOT}/localswarm.py", "--yes", "--download-only",
                                  "--model", "qwen2.5-coder:0.5b:q4_k_m"], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        silent.settimeout(30)
        conn, _ = silent.accept()              # it is talking to the hub now: interrupt it
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
        conn.close()
    finally:
        silent.close()
    assert child.returncode == 130 and "Traceback" not in err, err
    assert not [f for f in tmp_path.rglob("*.gguf")]


def test_an_unreachable_hub_is_known_at_once():
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                                   # nothing listens there now
    t = time.monotonic()
    why = ls.hub_unreachable(f"http://127.0.0.1:{port}", env={})
    assert why and f"127.0.0.1:{port}" in why and time.monotonic() - t < 2
    assert ls.hub_unreachable(f"http://127.0.0.1:{port}", env={"HTTPS_PROXY": "http://proxy:3128"}) is None
    with socket.create_server(("127.0.0.1", 0)) as up:
        assert ls.hub_unreachable(f"http://127.0.0.1:{up.getsockname()[1]}", env={}) is None
