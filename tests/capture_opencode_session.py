"""Capture the exact HTTP requests the real opencode agent (npm opencode-ai) sends to an
OpenAI-compatible server during a realistic session, into tests/fixtures/opencode_session.json.

A scripted recording stub stands in for the server (loopback only); opencode runs headless with an
offline HOME. Stdlib only, plus the opencode binary in .cache/opencode (./install.sh --test).

  Session 1: "Read hello.py and tell me what it does." (title, main -> read tool call, tool follow-up),
             then `--continue` "Now add a docstring." (the second turn of the same session).
  Session 2: a fresh run with another prompt.

Usage: python tests/capture_opencode_session.py [--out PATH] [--timeout S]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from benchlib import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENCODE = os.path.join(ROOT, ".cache", "opencode", "node_modules", ".bin", "opencode")
OPENCODE_VERSION = "1.18.33"
MODEL_ID = "smollm2-135m-q4_1"
OUT = os.path.join(ROOT, "tests", "fixtures", "opencode_session.json")

HELLO_PY = '''def greet(name):
    return f"Hello, {name}!"


if __name__ == "__main__":
    print(greet("world"))
'''


# --- the same config and offline HOME as tests/test_opencode.py (copied: that module needs pytest) ---

def opencode_config(port: int) -> dict:
    return {"$schema": "https://opencode.ai/config.json",
            "provider": {"localswarm": {"npm": "@ai-sdk/openai-compatible", "name": "localswarm",
                                        "options": {"baseURL": f"http://127.0.0.1:{port}/v1", "apiKey": "none"},
                                        "models": {MODEL_ID: {"name": "localswarm (starter model)",
                                                              "limit": {"context": 16384, "output": 256}}}}},
            "model": f"localswarm/{MODEL_ID}", "small_model": f"localswarm/{MODEL_ID}",
            "autoupdate": False, "share": "disabled"}


def offline_home(base: str) -> dict:
    env = {"HOME": base}
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"), ("XDG_CACHE_HOME", "cache"),
                     ("XDG_STATE_HOME", "state")):
        env[var] = os.path.join(base, sub)
        os.makedirs(env[var], exist_ok=True)
    plug = os.path.join(env["XDG_CONFIG_HOME"], "opencode")
    os.makedirs(os.path.join(plug, "node_modules"), exist_ok=True)
    deps = {"@opencode-ai/plugin": "*"}
    with open(os.path.join(plug, "package.json"), "w") as f:
        json.dump({"dependencies": deps}, f)
    with open(os.path.join(plug, "package-lock.json"), "w") as f:
        json.dump({"name": "opencode", "lockfileVersion": 3, "requires": True,
                   "packages": {"": {"dependencies": deps}}}, f)
    for flag in ("AUTOUPDATE", "MODELS_FETCH", "LSP_DOWNLOAD", "SHARE", "DEFAULT_PLUGINS", "CLAUDE_CODE",
                 "EXTERNAL_SKILLS"):
        env[f"OPENCODE_DISABLE_{flag}"] = "1"
    return env


# --- the recording stub ---

class Recorder:
    def __init__(self, hello_path: str):
        self.hello_path = hello_path
        self.lock = threading.Lock()
        self.requests = []        # every request, in arrival order
        self.run = None           # (session, turn) of the opencode run in progress
        self.calls = 0

    def record(self, entry: dict) -> dict:
        with self.lock:
            entry["session"], entry["turn"] = self.run or (None, None)
            entry["seq"] = len(self.requests)
            self.requests.append(entry)
            return entry

    def next_call_id(self) -> str:
        with self.lock:
            self.calls += 1
            return f"call_{self.calls:02d}"


def read_tool_call(tools: list, hello_path: str):
    """The name and arguments of a call to opencode's read tool, taken from the offered schema."""
    for tool in tools:
        fn = tool.get("function", {})
        if fn.get("name", "").lower() == "read":
            params = fn.get("parameters", {})
            props = params.get("properties", {})
            args = {}
            for name in params.get("required", []) or list(props)[:1]:
                if "path" in name.lower() or "file" in name.lower():
                    args[name] = hello_path
                else:               # any other required parameter: a harmless default by type
                    typ = props.get(name, {}).get("type")
                    args[name] = {"integer": 0, "number": 0, "boolean": False}.get(typ, "")
            return fn["name"], args
    raise RuntimeError("no read tool offered: " + ", ".join(t.get("function", {}).get("name", "?") for t in tools))


def make_handler(rec: Recorder):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"   # the connection closes after each response: ends the SSE stream

        def log_message(self, *a):
            pass

        def _headers(self):
            return {k: self.headers[k] for k in ("x-session-id", "content-type") if self.headers.get(k) is not None}

        def _json(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            rec.record({"method": "GET", "path": self.path, "headers": self._headers(), "body": None})
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model",
                                                             "created": 0, "owned_by": "localswarm"}]})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            entry = rec.record({"method": "POST", "path": self.path, "headers": self._headers(),
                                "body": body, "raw_bytes": len(raw)})
            if self.path.rstrip("/") != "/v1/chat/completions" or not isinstance(body, dict):
                self._json(404, {"error": {"message": "not found"}})
                return
            msgs = body.get("messages") or []
            last = msgs[-1].get("role") if msgs else None
            cid = f"chatcmpl-{entry['seq']}"
            if not body.get("tools"):
                entry["reply"] = "text"
                chunks = self._text(cid, "Reading a file")
            elif last == "tool":
                entry["reply"] = "text"
                chunks = self._text(cid, "The file defines a function.")
            else:
                name, args = read_tool_call(body["tools"], rec.hello_path)
                entry["reply"] = "tool_call"
                chunks = self._tool_call(cid, rec.next_call_id(), name, json.dumps(args))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for c in chunks:
                self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        @staticmethod
        def _chunk(cid, delta, finish=None, usage=None):
            c = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL_ID,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                c["usage"] = usage
            return c

        def _text(self, cid, text):
            words = text.split(" ")
            out = [self._chunk(cid, {"role": "assistant", "content": ""})]
            out += [self._chunk(cid, {"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
            out.append(self._chunk(cid, {}, "stop", {"prompt_tokens": 0, "completion_tokens": len(words),
                                                     "total_tokens": len(words)}))
            return out

        def _tool_call(self, cid, call_id, name, args):
            half = len(args) // 2
            out = [self._chunk(cid, {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]})]
            for piece in (args[:half], args[half:]):
                out.append(self._chunk(cid, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
            out.append(self._chunk(cid, {}, "tool_calls", {"prompt_tokens": 0, "completion_tokens": 1,
                                                           "total_tokens": 1}))
            return out

    return Handler


# --- labelling and summary ---

def label(requests: list) -> None:
    """kind: title (no tools), main (first agent request of a session's first run), next_turn (first
    agent request of a --continue run), tool_followup (the last message is a tool result)."""
    seen_agent = set()
    for r in requests:
        body = r.get("body")
        if r["method"] != "POST" or not isinstance(body, dict):
            r["kind"] = "other"
            continue
        msgs = body.get("messages") or []
        if not body.get("tools"):
            r["kind"] = "title"
        elif msgs and msgs[-1].get("role") == "tool":
            r["kind"] = "tool_followup"
        else:
            key = (r["session"], r["turn"])
            if key in seen_agent:
                r["kind"] = "agent"       # a further agent request in the same run (not expected)
            else:
                r["kind"] = "main" if r["turn"] == 1 else "next_turn"
        if r["kind"] != "title":
            seen_agent.add((r["session"], r["turn"]))


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summary(requests: list) -> str:
    posts = [r for r in requests if isinstance(r.get("body"), dict)]
    first_main = next((r for r in posts if r["kind"] == "main"), None)
    sys0 = first_main["body"]["messages"][0] if first_main else None
    prev_agent = {}
    rows = [("#", "sess", "turn", "kind", "msgs", "roles", "tools", "bytes", "same_sys", "prefix_prev")]
    for r in posts:
        body = r["body"]
        msgs = body.get("messages") or []
        tools = body.get("tools") or []
        same = "-"
        pref = "-"
        if r["kind"] != "title":
            same = "yes" if msgs and msgs[0] == sys0 else "NO"
            prev = prev_agent.get(r["session"])
            if prev is not None:
                pref = f"{common_prefix(prev, msgs)}/{len(prev)}"
            prev_agent[r["session"]] = msgs
        roles = "".join({"system": "S", "user": "U", "assistant": "A", "tool": "T"}.get(m.get("role"), "?")
                        for m in msgs)
        size = len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())
        rows.append((str(r["seq"]), str(r["session"]), str(r["turn"]), r["kind"], str(len(msgs)), roles,
                     str(len(tools)), f"{r.get('raw_bytes', size)}", same, pref))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


# --- the run ---

def run_opencode(rec, session, turn, words, work, env, timeout, cont=False):
    rec.run = (session, turn)
    cmd = [OPENCODE, "run"] + (["--continue"] if cont else []) + [
        "--format", "json", "--model", f"localswarm/{MODEL_ID}"] + words
    t0 = time.time()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    events = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    types = [e.get("type") for e in events]
    print(f"session {session} turn {turn}: rc={p.returncode} {time.time() - t0:.1f}s events={types}",
          file=sys.stderr)
    if p.returncode != 0:
        logs = ""
        logdir = os.path.join(env["XDG_DATA_HOME"], "opencode", "log")
        for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
            with open(os.path.join(logdir, name), errors="replace") as f:
                logs += f.read()[-3000:]
        raise RuntimeError(f"opencode failed: {p.stderr[-2000:]}\n{logs}")
    # the session id opencode reports, to check --continue really continued
    sids = {e.get("sessionID") or (e.get("part") or {}).get("sessionID") for e in events} - {None}
    return sids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--timeout", type=float, default=180)
    a = ap.parse_args()
    if not os.path.exists(OPENCODE):
        sys.exit(f"opencode is missing: {OPENCODE} (./install.sh --test installs it)")

    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "project")
        os.makedirs(work)
        hello = os.path.join(work, "hello.py")
        with open(hello, "w") as f:
            f.write(HELLO_PY)
        rec = Recorder(hello)
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(rec))
        server.daemon_threads = True
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with open(os.path.join(work, "opencode.json"), "w") as f:
                json.dump(opencode_config(port), f)
            env = dict(os.environ, PWD=work, **offline_home(os.path.join(tmp, "home")))
            s1 = run_opencode(rec, 1, 1, ["Read", "hello.py", "and", "tell", "me", "what", "it", "does."],
                              work, env, a.timeout)
            s1b = run_opencode(rec, 1, 2, ["Now", "add", "a", "docstring."], work, env, a.timeout, cont=True)
            s2 = run_opencode(rec, 2, 1, ["List", "the", "functions", "in", "hello.py."], work, env, a.timeout)
        finally:
            server.shutdown()
            server.server_close()

    print(f"opencode session ids: run1={sorted(s1)} run2(--continue)={sorted(s1b)} run3={sorted(s2)}",
          file=sys.stderr)
    reqs = rec.requests
    label(reqs)
    fixture = {
        "opencode": OPENCODE_VERSION,
        "captured": datetime.date.today().isoformat(),
        "model": MODEL_ID,
        "note": "Requests the real opencode sent to a scripted stub, in arrival order. session 1 turn 1: "
                "'Read hello.py and tell me what it does.' (answered with one read tool call, then text); "
                "session 1 turn 2 (opencode run --continue): 'Now add a docstring.' (same script); session 2: "
                "'List the functions in hello.py.'. The working dir was a temp dir (its path appears in the "
                "bodies). Bodies are exactly as sent.",
        "requests": [{k: r[k] for k in ("session", "turn", "kind", "method", "path", "headers", "body")
                      if k in r} for r in reqs],
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(summary(reqs))
    print(f"\nwrote {a.out} ({os.path.getsize(a.out)} bytes, {len(reqs)} requests)")

    # sanity: session 1's follow-up carries the assistant tool_calls message and the tool result
    fu = next((r for r in reqs if r.get("kind") == "tool_followup" and r["session"] == 1), None)
    assert fu, "no tool follow-up in session 1"
    roles = [m.get("role") for m in fu["body"]["messages"]]
    assert any(m.get("role") == "assistant" and m.get("tool_calls") for m in fu["body"]["messages"]), roles
    assert roles[-1] == "tool", roles


if __name__ == "__main__":
    main()
