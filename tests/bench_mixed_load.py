"""Mixed load (issue 34, "Hardening round 3"): streams, aborts, tool schemas, big bodies and
malformed JSON / framing hit one server together. Not a test: it prints a table for BENCHMARKS.md.

    python tests/bench_mixed_load.py [--seconds 120] [--streams 2] [--threads 2]

It starts localswarm on the starter model (a private HOME, loopback only), warms it up (every
kind of request once), takes the server's threads and RSS from /proc, runs the client loops for
--seconds, waits until the server is idle again and takes them again. Done (exit 0) when: the
server is alive and /health is ok, no request got a 5xx other than 503 + Retry-After (routine
back-pressure), every check on a response held (the statuses the issue names, one status line
per request, a safe X-Localswarm-Warning, a hostile tool schema answered 200 or with a clean 400
that says why: see TOOL_EXPECT), the log holds no traceback, threads after <= before + 4 and the
memory the server holds after / before within 0.9 .. 1.1.

What "the memory the server holds" is, and why not the raw RSS: a first 120 s run measured RSS
446 -> 1028 MiB, but that growth was memory nobody holds any more. Taken apart (mallinfo2,
gc and malloc_trim inside the server, two rounds against one server), it is:
  * glibc keeping freed memory: after the first multi-MiB buffer (a 6-9 MiB request body, its
    decoded text) is freed, glibc raises its mmap threshold to that size, so later big buffers
    are carved out of the per-thread malloc arenas (one per HTTP thread, up to 8 per core) and
    stay resident once freed: 435 MiB free inside the arenas after 2 x 60 s, 394 MiB of it
    given back by one malloc_trim(0).
  * cyclic garbage waiting for Python's next full collection: 50-100 MiB in the runs measured
    (1,751 objects), all of it freed by one gc.collect(); what forms the cycles is not found yet.
  * the prompt cache's host-RAM tier (swarm.prompt_cache_mib, default one context's cells: 135
    MiB here) filling with the KV cells of distinct prompts: by design and bounded by its budget.
So the server now pins glibc's mmap threshold at start (pin_malloc_threshold: every big buffer
is its own mapping, unmapped when freed) and gives memory back once idle for IDLE_RELEASE_S
(release_memory: gc.collect(), malloc_trim(0)). Before and after are taken once that has run,
and compared less the prompt cache's RAM bytes from /health (it fills by design, within its
budget, which is checked). The raw RSS is printed too. What is left to compare is what live objects hold: a leak still shows there."""
import argparse
import collections
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_abuse import BODIES as ABUSE_BODIES, MALFORMED as ABUSE_MALFORMED, ROOT, ls, proc_stats  # noqa: E402
from benchlib import free_port

MiB = 2 ** 20
CHAT = "/v1/chat/completions"
PROMPTS = ["Write a Python function add(a, b).", "Say hello in French.", "What is 2 + 3?",
           "Name a sorting algorithm.", "Write a haiku about rust.", "List three colours."]
TIMEOUT = 120.0           # no client waits longer than this for a whole answer


# --- the load's bookkeeping ------------------------------------------------------------------
class Kind:
    """One kind of load: its requests, the statuses they got, 5xx, 503 + Retry-After, connection
    errors and failed checks (the first few kept, with the request that failed)."""

    def __init__(self, name: str):
        self.name, self.lock = name, threading.Lock()
        self.requests, self.statuses, self.errors = 0, collections.Counter(), collections.Counter()
        self.fivexx, self.busy, self.failures = 0, 0, []
        self.phase = ""             # "warm-up: " while warming up

    def record(self, what: str, status, headers=None, problem: str = "", conn_error_ok: bool = False):
        with self.lock:
            self.requests += 1
            if isinstance(status, int):
                self.statuses[status] += 1
                if status == 503 and (headers or {}).get("retry-after"):
                    self.busy += 1
                elif status >= 500:
                    self.fivexx += 1
                    problem = problem or (f"{status} without Retry-After" if status == 503 else f"got {status}")
            else:
                self.statuses[status] += 1
                if not conn_error_ok:
                    self.errors[status] += 1
            if problem:
                self.failures.append(f"{self.phase}{what}: {problem}")

    def ok(self) -> bool:
        return not (self.fivexx or self.failures or sum(self.errors.values()))


# --- HTTP: urllib for ordinary requests, raw sockets where the bytes matter ------------------
def post(url: str, body: bytes, timeout=TIMEOUT, stream=False):
    """POST a body; (status, lowercase headers, body bytes or the stream's lines). OSError -> its name."""
    req = urllib.request.Request(url + CHAT, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            headers = {k.lower(): v for k, v in r.headers.items()}
            if not stream:
                return r.status, headers, r.read()
            lines = []
            while line := r.readline():
                lines.append(line)
                if line.strip() == b"data: [DONE]":
                    break
            return r.status, headers, lines
    except urllib.error.HTTPError as e:
        try:
            data = e.read()
        except OSError:
            data = b""
        return e.code, {k.lower(): v for k, v in e.headers.items()}, data
    except (OSError, ValueError) as e:    # ValueError: http.client's own complaints (a bad chunk)
        return type(e).__name__, {}, b""


def request_bytes(method: str, path: str, body: bytes = b"", headers: tuple = (), close=True, length=None) -> bytes:
    """A request's bytes; length: the Content-Length to claim (default: the body's)."""
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    length = len(body) if length is None else length
    head += [f"Content-Length: {length}"] if length or method == "POST" else []
    head += list(headers) + (["Connection: close"] if close else [])
    return "\r\n".join(head).encode("latin-1", "backslashreplace") + b"\r\n\r\n" + body


class Response:
    """One HTTP response read off a socket: status, headers (lowercase, every value), body."""

    def __init__(self, status: int, headers: list, body: bytes):
        self.status, self.header_list, self.body = status, headers, body
        self.headers = {k: v for k, v in headers}

    def all(self, name: str) -> list:
        return [v for k, v in self.header_list if k == name]


def read_response(sock: socket.socket, buf: bytes = b"") -> tuple:
    """(Response, bytes read past it): by Content-Length, chunked, or to EOF."""
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError(f"closed before a whole head ({len(buf)} bytes)")
        buf += got
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    m = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) ?.*", lines[0])
    if not m:
        raise ConnectionError(f"bad status line {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.decode("latin-1").strip().lower(), v.decode("latin-1").strip()))
    resp = Response(int(m.group(1)), headers, b"")
    te, n = resp.headers.get("transfer-encoding", ""), resp.headers.get("content-length")

    def fill(k):
        nonlocal buf
        while len(buf) < k:
            got = sock.recv(65536)
            if not got:
                raise ConnectionError("closed inside a body")
            buf += got
    if "chunked" in te:
        body = b""
        while True:
            while b"\r\n" not in buf:
                fill(len(buf) + 1)
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            fill(size + 2)
            body, buf = body + buf[:size], buf[size + 2:]
            if size == 0:
                break
    elif n is not None:
        fill(int(n))
        body, buf = buf[:int(n)], buf[int(n):]
    else:
        while got := sock.recv(65536):
            buf += got
        body, buf = buf, b""
    resp.body = body
    return resp, buf


def exchange(port: int, data: bytes, timeout: float = TIMEOUT, shut_write=False, after: float = 0.5):
    """Send raw bytes, read one response, then whatever else comes within `after` seconds (a
    second status line there is a failure: one request, one answer). Returns (Response, extra
    bytes, whether the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass                          # the server answered early and hung up: read its answer
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        resp, extra = read_response(s)
        s.settimeout(after)
        closed = False
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    closed = True
                    break
                extra += got
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = True
        return resp, extra, closed


def status_lines(resp: Response, extra: bytes) -> int:
    return 1 + len(re.findall(rb"(?:^|\r\n)HTTP/1\.[01] \d{3}", extra))


def linger_reset(s: socket.socket) -> None:
    """Close with a RST instead of a FIN (a client that crashed or was killed)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def sse_problem(lines: list) -> str:
    """What is wrong with a stream's lines: no [DONE], an error event, a data line not JSON."""
    done = False
    for line in lines:
        line = line.strip()
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: "):
            try:
                obj = json.loads(line[6:])
            except ValueError:
                return f"data line not JSON: {line[:80]!r}"
            if isinstance(obj, dict) and obj.get("error"):
                return f"error in the stream: {json.dumps(obj)[:200]}"
    return "" if done else f"no [DONE] ({len(lines)} lines)"


# --- the requests ----------------------------------------------------------------------------
def chat_body(stream=False, max_tokens=None, **extra) -> bytes:
    body = {"messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": max_tokens or random.randint(8, 16), "stream": stream}
    body.update(extra)
    return json.dumps(body).encode()


def nested_object(depth: int) -> dict:
    schema = {"type": "string"}
    for i in range(depth):
        schema = {"type": "object", "properties": {f"l{i}": schema}, "required": [f"l{i}"]}
    return schema


def tool(name: str, params: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"tool {name}",
                                             "parameters": {"type": "object", "properties": params,
                                                            "required": list(params)}}}


TOOLS = {
    "plain": [tool("get_weather", {"city": {"type": "string"}})],
    "24-level nesting": [tool("deep", {"root": nested_object(24)})],
    "maxLength 100000": [tool("write", {"text": {"type": "string", "maxLength": 100000}})],
    "maxItems 50000": [tool("many", {"xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 50000}})],
    "minItems 50000": [tool("more", {"xs": {"type": "array", "items": {"type": "string"}, "minItems": 50000}})],
    "pattern ^a{0,50000}$": [tool("match", {"s": {"type": "string", "pattern": "^a{0,50000}$"}})],
    "40-level nesting": [tool("deep", {"root": nested_object(40)})],
    "2000 enum values": [tool("pick", {"v": {"enum": [f"value-{i}" for i in range(2000)]}})],
    "all at once": [tool("write", {"text": {"type": "string", "maxLength": 100000}}),
                    tool("many", {"xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 50000}}),
                    tool("match", {"s": {"type": "string", "pattern": "^a{0,50000}$"}}),
                    tool("deep", {"root": nested_object(40)}),
                    tool("pick", {"v": {"enum": [f"value-{i}" for i in range(2000)]}})],
}
# What the server is meant to answer each schema: never a 5xx, a crash or a hang. A schema too big
# for a grammar still gets a 200 (a looser grammar, or none and the call checked afterwards); one
# the request cannot hold gets a clean 400 naming why: 40 levels of nesting put the schema's leaf
# past MAX_JSON_DEPTH (64) once wrapped in the request ("nested too deeply"), and 2000 enum values
# spelled out in the tool prompt outgrow --ctx 4096 (context_length_exceeded; a 200 with a bigger
# context). 24 levels (depth 56) are within the limit and must be served. {status: what the 400's
# error message or code must say}; a status not listed is a failed check.
TOOL_EXPECT = {name: {200: None} for name in TOOLS}
TOOL_EXPECT["40-level nesting"] = {400: "nested too deeply"}
TOOL_EXPECT["2000 enum values"] = {200: None, 400: "context_length_exceeded"}
TOOL_EXPECT["all at once"] = {400: "nested too deeply"}


def error_problem(out: bytes, says) -> str:
    """What is wrong with a 4xx's body: not an OpenAI error object, or not saying `says`."""
    try:
        err = json.loads(out).get("error")
    except (ValueError, AttributeError):
        err = None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return f"not an OpenAI error body: {out[:200]!r}"
    if says and says not in err["message"] and says != err.get("code"):
        return f"the error does not say {says!r}: {out[:200]!r}"
    return ""


def big_bodies() -> dict:
    """A ~6 MiB message (200, or 400 for the context), ~8 MiB of tiny JSON values (413), and a
    body over server.max_body_bytes (413)."""
    long_text = json.dumps({"messages": [{"role": "user", "content": "word " * (6 * MiB // 5)}],
                            "max_tokens": 8}).encode()
    head = b'{"messages":[{"role":"user","content":"hi","x":['
    n = (8 * MiB - 4096 - len(head)) // 3
    flood = head + b"{}," * n + b"{}]}]}"
    assert len(flood) < 8 * MiB
    return {"6 MiB message": long_text, "8 MiB of {} values": flood}


def malformed_cases() -> list:
    """(name, request bytes, the statuses expected, extra check, shut_write). Each is sent on its
    own connection; none may get a 5xx or more than one status line."""
    hi = [{"role": "user", "content": "hi"}]
    four = set(range(400, 500))
    smuggled = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"

    def warned(resp: Response, extra: bytes) -> str:
        w = resp.all("x-localswarm-warning")
        if len(w) != 1:
            return f"{len(w)} X-Localswarm-Warning headers"
        if any(k.startswith("x-injected") for k, _ in resp.header_list) or b"X-Injected" in extra:
            return "an injected header came through"
        if re.search(r"[\x00-\x1f\x7f]", w[0]):
            return f"a control character in the warning {w[0]!r}"
        return ""

    def closes(resp: Response, extra: bytes) -> str:
        return "" if resp.headers.get("connection", "").lower() == "close" else "no Connection: close"

    def body(obj) -> bytes:
        return json.dumps(obj).encode()
    cases = [
        ("truncated JSON", request_bytes("POST", CHAT, b'{"messages":[{"role":"user","content":"hi"'), {400}),
        ("body shorter than Content-Length",
         request_bytes("POST", CHAT, b'{"messages":', length=400), {400},
         None, True),
        ("invalid UTF-8", request_bytes("POST", CHAT, b'{"messages":[{"role":"user","content":"\xff\xfe\xc3"}]}'), {400}),
        ("100k nested [", request_bytes("POST", CHAT, b"[" * 100000), {400, 413}),
        ("300k nested [", request_bytes("POST", CHAT, b"[" * 300000), {413}),
        ("nested {\"a\": 50k deep", request_bytes("POST", CHAT, b'{"a":' * 50000 + b"1" + b"}" * 50000), {400, 413}),
        ("messages a string", request_bytes("POST", CHAT, body({"messages": "hi"})), {400}),
        ("max_tokens a string", request_bytes("POST", CHAT, body({"messages": hi, "max_tokens": "x"})), {400}),
        ("temperature a list", request_bytes("POST", CHAT, body({"messages": hi, "temperature": []})), {400}),
        ("role a number", request_bytes("POST", CHAT, body({"messages": [{"role": 5, "content": "hi"}]})), {400}),
        ("content an object", request_bytes("POST", CHAT, body({"messages": [{"role": "user", "content": {"a": 1}}]})), {400}),
        ("n negative", request_bytes("POST", CHAT, body({"messages": hi, "n": -1})), {400}),
        ("max_tokens 10**400", request_bytes("POST", CHAT, b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1'
                                                           + b"0" * 400 + b"}"), {400}),
        ("top-level array", request_bytes("POST", CHAT, b"[1,2,3]"), {400}),
        ("tools a string", request_bytes("POST", CHAT, body({"messages": hi, "tools": "x"})), {400}),
        ("tool_choice names no tool", request_bytes("POST", CHAT, body({"messages": hi, "tools": TOOLS["plain"],
                                                                         "tool_choice": {"type": "function", "function": {"name": "nope"}}})), {400}),
        ("GET with a body (a request smuggled in it)",
         request_bytes("GET", "/v1/models", smuggled, close=False), {200}, closes),
        ("GET /health with a body", request_bytes("GET", "/health", b"x" * 100, close=False), {200}, closes),
        ("two Host headers", request_bytes("POST", CHAT, body({"messages": hi}), ("Host: evil.example",)), {400}),
        ("model with CR/LF", request_bytes("POST", CHAT, body({"messages": hi, "max_tokens": 4,
                                                                "model": "evil\r\nX-Injected: 1\r\n\r\nHTTP/1.1 200 OK"})), {200}, warned),
        ("model non-Latin-1", request_bytes("POST", CHAT, body({"messages": hi, "max_tokens": 4,
                                                                 "model": "модель-☃-\U0001f600"}), ), {200}, warned),
        ("model with NUL and DEL", request_bytes("POST", CHAT, body({"messages": hi, "max_tokens": 4,
                                                                      "model": "a\x00b\x7fc\x85d"})), {200}, warned),
        ("model 100k chars", request_bytes("POST", CHAT, body({"messages": hi, "max_tokens": 4, "model": "m" * 100000})),
         {200}, warned),
    ]
    for i, raw in enumerate(ABUSE_MALFORMED):       # issue 15's framing cases
        cases.append((f"issue-15 framing #{i + 1}", raw, four))
    for i, raw in enumerate(ABUSE_BODIES):          # and its bodies
        cases.append((f"issue-15 body #{i + 1}", request_bytes("POST", CHAT, raw), four))
    return [c + (None,) * (5 - len(c)) for c in cases]


# --- the client loops: step(i) sends the i-th request of its kind ----------------------------
class Load:
    def __init__(self, port: int):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.kinds = {k: Kind(k) for k in ("streams", "aborts", "tool schemas", "big bodies", "malformed")}
        self.bodies = big_bodies()
        self.malformed = malformed_cases()
        self.tool_names = list(TOOLS)

    def stream(self, i: int) -> None:
        status, headers, lines = post(self.url, chat_body(stream=True), stream=True)
        problem = sse_problem(lines) if status == 200 else ""
        self.kinds["streams"].record("stream", status, headers, problem)

    def abort(self, i: int) -> None:
        k, how = self.kinds["aborts"], i % 5
        names = ["stream, closed after the first data", "stream, RST after the head",
                 "plain, closed after 0.2-1 s", "plain, RST after 0.2-1 s", "body half sent, closed"]
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        except OSError as e:
            return k.record(names[how], type(e).__name__)
        status = "aborted before an answer"
        try:
            if how in (0, 1):
                s.sendall(request_bytes("POST", CHAT, chat_body(stream=True, max_tokens=64)))
                got = s.recv(4096)
                while how == 0 and got and b"data:" not in got and len(got) < 65536:
                    got += s.recv(4096)
                if got.startswith(b"HTTP/"):
                    status = int(got.split(b" ")[1])
                if how == 1:
                    linger_reset(s)
            elif how in (2, 3):
                s.sendall(request_bytes("POST", CHAT, chat_body(max_tokens=64)))
                s.settimeout(random.uniform(0.2, 1.0))
                try:
                    got = s.recv(64)
                    if got.startswith(b"HTTP/"):
                        status = int(got.split(b" ")[1])
                except socket.timeout:
                    pass
                if how == 3:
                    linger_reset(s)
            else:
                data = request_bytes("POST", CHAT, chat_body())
                s.sendall(data[:len(data) - 10])
                time.sleep(random.uniform(0.1, 0.5))
        except OSError as e:
            status = type(e).__name__
        finally:
            s.close()
        k.record(names[how], status, {"retry-after": "?"} if status == 503 else None, conn_error_ok=True)

    def tool_call(self, i: int) -> None:
        name = self.tool_names[i % len(self.tool_names)]
        choice = ["required", "auto"][i // len(self.tool_names) % 2]
        stream = i // (2 * len(self.tool_names)) % 2 == 1
        body = {"messages": [{"role": "user", "content": "Call the tool with some arguments."}],
                "tools": TOOLS[name], "tool_choice": choice, "max_tokens": 24, "stream": stream}
        status, headers, out = post(self.url, json.dumps(body).encode(), stream=stream)
        problem, expect = "", TOOL_EXPECT[name]
        if isinstance(status, int) and status not in expect and status != 503:
            problem = f"status {status} (expected {sorted(expect)}): {out[:200]!r}"
        elif status == 200:
            problem = sse_problem(out) if stream else ("" if b'"choices"' in out else "no choices")
        elif isinstance(status, int) and 400 <= status < 500:
            problem = error_problem(out, expect[status])
        self.kinds["tool schemas"].record(f"{name}, {choice}{', stream' if stream else ''}", status, headers, problem)

    def big(self, i: int) -> None:
        k, which = self.kinds["big bodies"], i % 3
        if which == 0:
            status, headers, out = post(self.url, self.bodies["6 MiB message"])
            ok = status == 200 or status == 400 and b"context_length_exceeded" in out or status == 503
            return k.record("6 MiB message", status, headers, "" if ok else f"status {status}: {out[:200]!r}")
        if which == 1:
            status, headers, out = post(self.url, self.bodies["8 MiB of {} values"])
            return k.record("8 MiB of {} values", status, headers,
                            "" if status in (413, 503) else f"status {status}: {out[:200]!r}")
        # over the limit: the head and the first 64 KiB of a 9 MiB body, then the answer
        n = 9 * MiB
        try:
            resp, extra, _ = exchange(self.port, request_bytes("POST", CHAT, b"x" * 65536, length=n), timeout=30, after=0.2)
            k.record("9 MiB body", resp.status, resp.headers,
                     "" if resp.status == 413 else f"status {resp.status}: {resp.body[:200]!r}")
        except OSError as e:
            k.record("9 MiB body", type(e).__name__)

    def malformed_step(self, i: int) -> None:
        name, data, expect, check, shut = self.malformed[i % len(self.malformed)]
        k = self.kinds["malformed"]
        try:
            resp, extra, _ = exchange(self.port, data, timeout=60, shut_write=bool(shut))
        except OSError as e:
            return k.record(name, type(e).__name__)
        problem = ""
        if status_lines(resp, extra) != 1:
            problem = f"{status_lines(resp, extra)} status lines: {extra[:200]!r}"
        elif resp.status not in expect and resp.status != 503:
            problem = f"status {resp.status} (expected {sorted(expect)[:3]}...): {resp.body[:200]!r}"
        elif check and resp.status != 503:
            problem = check(resp, extra)
        k.record(name, resp.status, resp.headers, problem)

    def warm_up(self) -> None:
        """Every kind's every request once, so that first-use allocations (grammars, the
        tokenizer on big inputs, KV cells) are in the 'before' numbers."""
        for k in self.kinds.values():
            k.phase = "warm-up: "
        for i in range(3):
            self.stream(i)
        for i in range(5):
            self.abort(i)
        for i in range(len(self.tool_names) * 2):
            self.tool_call(i)
        for i in range(3):
            self.big(i)
        for i in range(len(self.malformed)):
            self.malformed_step(i)
        for k in self.kinds.values():      # the warm-up's problems count, its numbers do not
            k.requests, k.statuses, k.busy, k.phase = 0, collections.Counter(), 0, ""


def health(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return {"status": f"HTTP {e.code}"}
    except (OSError, ValueError) as e:
        return {"status": type(e).__name__}


def settled_rss(proc) -> tuple:
    """(threads, RSS) once the idle server has given memory back itself (release_memory runs
    IDLE_RELEASE_S after the last request: gc.collect() and malloc_trim(0))."""
    time.sleep(ls.IDLE_RELEASE_S + 3)
    return proc_stats(proc.pid)


def cache_ram(h: dict) -> tuple:
    """(bytes, budget) of the prompt cache's host-RAM tier, from /health."""
    pc = h.get("prompt_cache") or {}
    return pc.get("ram_bytes", 0), pc.get("ram_budget_bytes", 0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--streams", type=int, default=2, help="stream loops (one loop of each other kind)")
    ap.add_argument("--threads", type=int, default=2, help="the server's llama.cpp threads")
    ap.add_argument("--voters", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="localswarm-mixed-")
    port = free_port()
    log_path = os.path.join(home, "server.log")
    log = open(log_path, "w+")
    env = dict(os.environ, HOME=home)
    cmd = [sys.executable, os.path.join(ROOT, "localswarm.py"), "--model-path", ls.starter_model_path(),
           "--voters", str(args.voters), "--ctx", str(args.ctx), "--threads", str(args.threads),
           "--host", "127.0.0.1", "--port", str(port), "-y", "-q"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env)
    load = Load(port)
    try:
        deadline = time.monotonic() + 300
        while health(load.url).get("status") != "ok":
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                print("the server did not come up:\n" + log.read()[-3000:])
                return 2
            time.sleep(0.5)
        t_warm = time.monotonic()
        load.warm_up()
        time.sleep(3)
        threads0, rss0 = proc_stats(proc.pid)
        _, held0 = settled_rss(proc)
        cache0, budget = cache_ram(health(load.url))
        print(f"warm-up {time.monotonic() - t_warm:.0f} s; before: {threads0} threads, RSS {rss0 / MiB:.0f} MiB, "
              f"{held0 / MiB:.0f} MiB once idle, prompt cache {cache0 / MiB:.1f} MiB in RAM", flush=True)

        stop = threading.Event()
        peak = {"threads": threads0, "rss": rss0, "died": None}

        def loop(step):
            i = 0
            while not stop.is_set():
                step(i)
                i += 1

        def watch():
            while not stop.is_set():
                if proc.poll() is not None:
                    peak["died"] = proc.returncode
                    return
                try:
                    t, r = proc_stats(proc.pid)
                except (OSError, KeyError):
                    continue
                peak["threads"], peak["rss"] = max(peak["threads"], t), max(peak["rss"], r)
                time.sleep(1.0)
        steps = [load.stream] * args.streams + [load.abort, load.tool_call, load.big, load.malformed_step]
        workers = [threading.Thread(target=loop, args=(s,), daemon=True) for s in steps]
        watcher = threading.Thread(target=watch, daemon=True)
        t0 = time.monotonic()
        for w in workers + [watcher]:
            w.start()
        while time.monotonic() - t0 < args.seconds and peak["died"] is None:
            time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join(TIMEOUT + 30)
        ran = time.monotonic() - t0

        # idle again: no voter busy, nothing queued, the thread count steady for 3 s
        settle0, last, steady = time.monotonic(), None, 0
        while proc.poll() is None and time.monotonic() - settle0 < 90:
            h = health(load.url)
            t, _ = proc_stats(proc.pid)
            idle = h.get("busy_voters") == 0 and not h.get("queue_depth")
            steady = steady + 1 if idle and t == last else 0
            last = t
            if steady >= 3 and t <= threads0 + 4:
                break
            time.sleep(1.0)
        settled = time.monotonic() - settle0
        alive = proc.poll() is None
        samples = []
        for _ in range(3 if alive else 0):
            samples.append(proc_stats(proc.pid))
            time.sleep(1.0)
        threads1 = max(t for t, _ in samples) if samples else 0
        rss1 = sorted(r for _, r in samples)[1] if samples else 0
        held1 = settled_rss(proc)[1] if alive else 0
        h = health(load.url) if alive else {"status": "dead"}
        cache1 = cache_ram(h)[0]
        after_req = post(load.url, chat_body(max_tokens=8))[0] if alive else "dead"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.seek(0)
        text = log.read()
        log.close()

    ratio = rss1 / rss0 if rss0 else float("nan")
    held_ratio = (held1 - cache1) / (held0 - cache0) if held0 > cache0 else float("nan")
    tracebacks = text.count("Traceback")
    error_lines = [line for line in text.splitlines() if " ERROR " in line]
    checks = {
        "server alive, /health ok, a request after the run 200": alive and h.get("status") == "ok" and after_req == 200,
        "no 5xx but 503 + Retry-After": not any(k.fivexx for k in load.kinds.values()),
        "every response check held, no connection errors": all(k.ok() for k in load.kinds.values()),
        "no traceback in the server log": tracebacks == 0,
        f"threads after <= before + 4 ({threads1} <= {threads0 + 4})": alive and threads1 <= threads0 + 4,
        f"held (RSS after gc + malloc_trim, less the prompt cache's RAM) after / before within 0.9 .. 1.1 "
        f"({held_ratio:.3f})": 0.9 <= held_ratio <= 1.1,
        f"prompt cache's RAM within its budget ({cache1 / MiB:.1f} <= {budget / MiB:.1f} MiB)": cache1 <= budget,
    }

    print(f"\n{' '.join(['localswarm.py'] + cmd[4:])}  (model path: the starter model)")
    print(f"{args.streams} stream loops, 1 loop each of aborts, tool schemas, big bodies, malformed; "
          f"{ran:.0f} s of load, idle again {settled:.0f} s after; {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    print("| kind | requests | statuses | 5xx (not 503) | 503 + Retry-After | connection errors | failed checks |")
    print("|---|---|---|---|---|---|---|")
    for k in load.kinds.values():
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(k.statuses.items(), key=lambda x: str(x[0])))
        errors = ", ".join(f"{e}: {n}" for e, n in k.errors.items()) or "0"
        print(f"| {k.name} | {k.requests} | {statuses} | {k.fivexx} | {k.busy} | {errors} | {len(k.failures)} |")
    print("\n| server | result |\n|---|---|")
    print(f"| alive after the run / exit code | {'yes' if alive else 'no, exit ' + str(proc.returncode)} |")
    print(f"| /health after the run / a request after it | {h.get('status')} / {after_req} |")
    print(f"| tracebacks / ERROR lines in the log | {tracebacks} / {len(error_lines)} |")
    print(f"| threads before / peak / after | {threads0} / {peak['threads']} / {threads1} |")
    print(f"| RSS before / peak / after (MiB) | {rss0 / MiB:.0f} / {peak['rss'] / MiB:.0f} / {rss1 / MiB:.0f} |")
    print(f"| RSS after / before (raw: what glibc and the GC had not given back yet counts) | {ratio:.3f} |")
    print(f"| RSS once idle ({ls.IDLE_RELEASE_S:.0f} s: the server's own gc.collect() + malloc_trim(0)), "
          f"before / after (MiB) | {held0 / MiB:.0f} / {held1 / MiB:.0f} |")
    print(f"| prompt cache in RAM, before / after / budget (MiB) | {cache0 / MiB:.1f} / {cache1 / MiB:.1f} / {budget / MiB:.0f} |")
    print(f"| held = that RSS less the prompt cache, before / after (MiB) | "
          f"{(held0 - cache0) / MiB:.0f} / {(held1 - cache1) / MiB:.0f} |")
    print(f"| held after / before | {held_ratio:.3f} |")
    print("\n| criterion | |\n|---|---|")
    for name, ok in checks.items():
        print(f"| {name} | {'met' if ok else '**FAILED**'} |")
    for k in load.kinds.values():
        for f in k.failures[:10]:
            print(f"  {k.name}: {f}")
    if error_lines:
        print("\nERROR lines (first 10):\n" + "\n".join(error_lines[:10]))
    if tracebacks:
        print(text[text.index("Traceback"):][:4000])
    if all(checks.values()):
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"\nserver log kept: {log_path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
