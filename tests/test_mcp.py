"""MCP over stdio with the official mcp SDK as the client, spawning the built pyz on the starter
model, in both modes (MCP beside the HTTP API, and MCP only)."""
import json
import os
import sys
import time

import pytest

from conftest import ROOT

mcp = pytest.importorskip("mcp")
anyio = pytest.importorskip("anyio")
from mcp import ClientSession, StdioServerParameters, stdio_client  # noqa: E402
from mcp import MCPError  # noqa: E402

import localswarm as ls  # noqa: E402


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    sys.path.insert(0, ROOT)
    import build_pyz
    return build_pyz.build(str(tmp_path_factory.mktemp("mcp") / "localswarm.pyz"))


def params(pyz, *mode):
    # The SDK passes only a few variables to the server; the venv's python finds llama_cpp itself.
    return StdioServerParameters(command=sys.executable, args=[pyz, "--model", "smollm2:135m:q4_1", "--voters", "3",
                                                               "--ctx", "2048", "-q", *mode],
                                 env={"HF_HUB_OFFLINE": "1", "LOCALSWARM_MODELS_DIR": os.path.join(ROOT, ".cache", "none")})


@pytest.mark.parametrize("mode", [["--mcp-only"], ["--mcp", "--port", "0"]], ids=["mcp-only", "mcp+http"])
def test_sdk_client_against_the_pyz(pyz, mode):
    async def main():
        p = params(pyz, *mode)
        async with stdio_client(p) as (r, w):
            async with ClientSession(r, w) as s:
                init = await s.initialize()
                assert init.server_info.name == "localswarm" and init.server_info.version == ls.__version__
                tools = {t.name: t for t in (await s.list_tools()).tools}
                assert set(tools) == {"get_hardware_info", "get_swarm_status", "generate_code",
                                      "list_available_models", "get_worker_details"}
                assert all(t.input_schema["type"] == "object" for t in tools.values())
                await s.send_ping()
                deadline = time.monotonic() + 90
                while True:                       # the model loads in the background
                    st = json.loads((await s.call_tool("get_swarm_status", {})).content[0].text)
                    if st.get("status") == "ok" or time.monotonic() > deadline:
                        break
                    await anyio.sleep(0.5)
                assert st["status"] == "ok" and st["voters"] == 3
                hw = json.loads((await s.call_tool("get_hardware_info", {})).content[0].text)
                assert hw["hardware"]["ram_total_bytes"] > 0 and hw["budget_bytes"] > 0
                models = json.loads((await s.call_tool("list_available_models", {})).content[0].text)
                assert any(m["fits"] for m in models["models"])
                gen = await s.call_tool("generate_code", {"prompt": "Write a Python function add(a, b).",
                                                          "max_tokens": 48, "temperature": 0.7, "language": "python"})
                assert not gen.is_error, gen.content[0].text
                text = gen.content[0].text
                assert "strategy: similarity" in text and "voters: 3" in text and "confidence:" in text
                workers = json.loads((await s.call_tool("get_worker_details", {})).content[0].text)
                assert len(workers["voters"]) == 3 and workers["voters"][0]["requests"] >= 1
                bad = await s.call_tool("generate_code", {"prompt": ""})
                assert bad.is_error and "prompt" in bad.content[0].text
                bad = await s.call_tool("generate_code", {"prompt": "x", "max_tokens": "many"})
                assert bad.is_error and "max_tokens" in bad.content[0].text
                with pytest.raises(MCPError) as e:
                    await s.call_tool("launch_rockets", {})
                assert e.value.error.code == -32602
                t_close = time.monotonic()
        assert time.monotonic() - t_close < 2.5, "the server must exit promptly when stdin closes"
    anyio.run(main)


def test_a_client_that_closes_its_input_still_gets_the_answers_it_asked_for(pyz):
    """`printf ... | localswarm --mcp-only` (the guide does this): input ends while the model still
    loads and the tool call waits for it; the call's answer is written before the server exits."""
    import subprocess
    lines = [{"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "generate_code", "arguments": {"prompt": "def add(a, b):", "max_tokens": 16}}}]
    p = params(pyz, "--mcp-only")
    out = subprocess.run([p.command, *p.args], input="".join(json.dumps(m) + "\n" for m in lines),
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, **p.env))
    replies = {r["id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert out.returncode == 0 and set(replies) == {1, 2}, out.stderr[-2000:]
    assert not replies[2]["result"]["isError"] and "voters: 3" in replies[2]["result"]["content"][0]["text"]


def rpc(server, obj):
    line = obj if isinstance(obj, str) else json.dumps(obj)
    return server.handle(line)


def test_dispatch_errors_and_version_negotiation():
    app = ls.App(ls.load_config(env={}, read_file=False))
    server = ls.McpServer(app, ls.load_registry(), ls.Budget(8 * ls.GiB, "test", [8 * ls.GiB], "cpu"))
    r = rpc(server, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2024-11-05"}})
    assert r["result"]["protocolVersion"] == "2024-11-05"
    r = rpc(server, {"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {"protocolVersion": "1999-01-01"}})
    assert r["result"]["protocolVersion"] == ls.MCP_VERSIONS[0]
    assert rpc(server, {"jsonrpc": "2.0", "method": "notifications/initialized"}) is None
    assert rpc(server, "{not json")["error"]["code"] == -32700
    assert rpc(server, {"id": 3, "method": "ping"})["error"]["code"] == -32600
    assert rpc(server, {"jsonrpc": "2.0", "id": 4, "method": "server/discover"})["error"]["code"] == -32601
    assert rpc(server, {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": []})["error"]["code"] == -32602
    app.load_error = "no such file"          # a model that failed to load: said at once, no waiting
    r = rpc(server, {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "generate_code",
                                                                                     "arguments": {"prompt": "x"}}})
    assert r["result"]["isError"] and "failed to load: no such file" in r["result"]["content"][0]["text"]
    assert rpc(server, {"jsonrpc": "2.0", "id": 7, "method": "ping"})["result"] == {}


# --- issue 15: the transport survives bad input and never blocks on a tool call ----------------

class Pipe:
    """The server's stdin and stdout as pipes, the server in a thread; replies read by id."""

    def __init__(self, server):
        import io
        import threading
        r, self.w = os.pipe()
        self.out_r, w = os.pipe()
        self.inp = io.open(r, "r", encoding="utf-8", errors="strict")     # strict, as sys.stdin can be
        self.out = io.open(w, "w", encoding="utf-8")
        self.thread = threading.Thread(target=server.serve, args=(self.inp, self.out), daemon=True)
        self.thread.start()
        self.reader = io.open(self.out_r, "r", encoding="utf-8")
        self.seen = []

    def send(self, data):
        os.write(self.w, (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n")

    def next(self, timeout=60):
        import select
        ready, _, _ = select.select([self.reader], [], [], timeout)
        assert ready, "no reply in time"
        msg = json.loads(self.reader.readline())
        self.seen.append(msg)
        return msg

    def close(self):
        os.close(self.w)
        self.thread.join(5)


def mcp_server(app, **cfg):
    for k, v in cfg.items():
        app.cfg.set(k, v)
    return ls.McpServer(app, ls.load_registry(), ls.Budget(8 * ls.GiB, "test", [8 * ls.GiB], "cpu"))


def test_invalid_utf8_and_overlong_lines_do_not_kill_the_reader():
    server = mcp_server(ls.App(ls.load_config(env={}, read_file=False)), **{"server.max_body_bytes": 1024})
    p = Pipe(server)
    try:
        p.send(b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "x": "\xff\xfe"}')
        assert p.next()["id"] == 1                    # replaced bytes: still a ping
        p.send(b"\xc3\x28 not json")
        assert p.next()["error"]["code"] == -32700
        p.send(b'{"jsonrpc": "2.0", "id": 2, "method": "ping", "pad": "' + b"a" * 5000 + b'"}')
        assert p.next()["error"]["code"] == -32700
        p.send({"jsonrpc": "2.0", "id": 3, "method": "ping"})
        assert p.next() == {"jsonrpc": "2.0", "id": 3, "result": {}}
    finally:
        p.close()


def test_a_tool_call_waits_for_the_model_with_progress_and_pings_are_answered_meanwhile(engine):
    app = ls.App(ls.load_config(env={}, read_file=False))
    p = Pipe(mcp_server(app))
    try:
        p.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "generate_code", "arguments": {"prompt": "Write add(a, b) in Python.", "max_tokens": None},
            "_meta": {"progressToken": "t1"}}})
        p.send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
        first = p.next()
        assert first.get("id") == 2 or first.get("method") == "notifications/progress"
        time.sleep(2.5)                                # the model "finishes loading"
        app.swarm = ls.Swarm(engine, model_id="m")
        while (msg := p.next()).get("id") != 1:
            pass
        assert not msg["result"]["isError"], msg
        assert any(m.get("method") == "notifications/progress" and m["params"]["progressToken"] == "t1"
                   for m in p.seen)
        assert any(m.get("id") == 2 for m in p.seen)
    finally:
        p.close()


def test_a_running_tool_call_can_be_cancelled_and_does_not_block_pings(engine):
    app = ls.App(ls.load_config(env={}, read_file=False), ls.Swarm(engine, model_id="m"))
    p = Pipe(mcp_server(app))
    try:
        p.send({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": "generate_code", "arguments": {"prompt": "Write a very long story.", "max_tokens": 1500}}})
        deadline = time.monotonic() + 30
        while app.swarm.status()["busy_voters"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
        assert p.next(10)["id"] == 8                 # answered while the swarm works
        t0 = time.monotonic()
        p.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7}})
        reply = p.next(30)
        assert reply["id"] == 7 and time.monotonic() - t0 < 10
    finally:
        p.close()


@pytest.mark.parametrize("rid", [[1, 2], {"a": 1}, None, 1.5])
def test_a_cancel_for_an_id_that_cannot_be_a_request_is_ignored(rid):
    server = mcp_server(ls.App(ls.load_config(env={}, read_file=False)))
    p = Pipe(server)
    try:
        p.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": rid}})
        p.send({"jsonrpc": "2.0", "id": 9, "method": "ping"})
        assert p.next(10) == {"jsonrpc": "2.0", "id": 9, "result": {}}     # no reply to the notification
    finally:
        p.close()
