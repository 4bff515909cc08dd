"""HTTP API hardening (issue 15): who may call which route, request framing, slow and
abandoned clients, browsers' cross-origin requests, and errors that come before any header.

Protocol checks run against a server whose model has not loaded (every check comes before
the swarm); what needs generation runs on the real starter model."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import localswarm as ls
from conftest import exchange, leave_while_voting


def serve(app):
    server = ls.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def bare(request):
    """A server without a model, config from the test's `cfg` marker (dotted key -> value)."""
    cfg = ls.load_config(env={}, read_file=False)
    cfg.set("network.broadcast_addresses", ["127.255.255.255"])
    marker = request.node.get_closest_marker("cfg")
    for k, v in (marker.args[0] if marker else {}).items():
        cfg.set(k, v)
    app = ls.App(cfg)
    if cfg["network.enabled"]:
        app.federation = ls.Federation(cfg, app, 0)
    server, url = serve(app)
    yield url, app
    server.shutdown()
    server.server_close()


def call(url, path, body=None, headers=None, method=None, raw=None):
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# --- who may call what -------------------------------------------------------------------
@pytest.mark.cfg({"server.api_key": "sekrit", "network.enabled": True})
def test_the_api_key_guards_metrics_and_unsigned_federation(bare):
    url, _ = bare
    for method, path in [("GET", "/metrics"), ("GET", "/v1/federation/info"), ("GET", "/v1/federation/health"),
                         ("POST", "/v1/federation/vote"), ("POST", "/v1/chat/completions")]:
        status, _, body = call(url, path, CHAT if method == "POST" else None, method=method)
        assert status == 401, (path, body)
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    key = {"Authorization": "Bearer sekrit"}
    assert call(url, "/metrics", headers=key)[0] == 200
    assert call(url, "/v1/federation/info", headers=key)[0] == 200
    assert call(url, "/health")[0] == 503          # open, as in llama-server: liveness only


@pytest.mark.cfg({"network.enabled": True, "network.auth_token": "t0ken", "server.api_key": "sekrit"})
def test_signed_federation_needs_the_signature_not_the_key(bare):
    url, _ = bare
    status, _, body = call(url, "/v1/federation/info")
    assert status == 401 and json.loads(body)["error"]["code"] == "unsigned"


def test_federation_with_an_api_key_but_no_token_is_refused():
    cfg = ls.load_config(env={}, read_file=False)
    cfg.set("network.enabled", True)
    cfg.set("server.api_key", "k")
    with pytest.raises(ls.LocalswarmError, match="federation token"):
        ls.check_network(cfg)
    cfg.set("network.auth_token", "t")
    ls.check_network(cfg)
    cfg.set("network.peers", ["10.0.0.2:8080", "nope"])      # refused before the model loads
    with pytest.raises(ls.LocalswarmError, match="peer 'nope': expected HOST:PORT"):
        ls.check_network(cfg)


@pytest.mark.parametrize("spec, expect", [("10.0.0.2:8080", ("10.0.0.2", 8080)), ("[::1]:81", ("::1", 81)),
                                          ("box.lan:9000", ("box.lan", 9000))])
def test_a_static_peer_is_host_and_port(spec, expect):
    assert ls.parse_peer(spec) == expect


@pytest.mark.parametrize("spec", ["nope", ":8080", "host:", "host:0", "host:70000", "host:80a", "a/b:80"])
def test_a_bad_static_peer_is_refused(spec):
    with pytest.raises(ls.LocalswarmError, match="expected HOST:PORT"):
        ls.parse_peer(spec)


# --- framing -----------------------------------------------------------------------------
@pytest.mark.cfg({"server.api_key": "sekrit"})
def test_an_error_before_the_body_is_read_closes_the_connection(bare):
    """A refused POST whose body is itself a request must not get that request answered too."""
    url, _ = bare
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer sekrit\r\n\r\n"
    out = exchange(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 401")
    assert b"Connection: close" in out and b"localswarm_requests_total" not in out


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: +48\r\n", 400), (b"Content-Length: 4_8\r\n", 400), (b"Content-Length: 0x30\r\n", 400),
    (b"Content-Length: 48\r\nContent-Length: 48\r\n", 400), (b"Content-Length: 48\r\nContent-Length: 5\r\n", 400),
    (b"Transfer-Encoding: gzip, chunked\r\nContent-Length: 48\r\n", 411), (b"Transfer-Encoding: chunked\r\n", 411),
], ids=["plus", "underscore", "hex", "twice", "conflicting", "te-and-cl", "chunked"])
def test_ambiguous_framing_is_refused_and_the_connection_closed(bare, headers, status):
    url, _ = bare
    body = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" + b" " * 7
    out = exchange(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n" + body)
    assert out.startswith(b"HTTP/1.1 %d" % status) and out.count(b"HTTP/1.1 ") == 1, out[:300]
    assert b"Traceback" not in out


# --- slow clients and floods -------------------------------------------------------------
def test_a_byte_a_second_does_not_hold_a_thread_past_the_deadline(bare, monkeypatch):
    url, app = bare
    monkeypatch.setattr(ls.Handler, "timeout", 1.5)
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 40
    t0, closed = time.monotonic(), False
    try:
        for b in head:                      # one byte every 0.2 s: each read is quick, the whole is not
            s.sendall(bytes([b]))
            time.sleep(0.2)
    except OSError:
        closed = True
    if not closed:
        s.settimeout(5)
        try:
            closed = s.recv(100) == b""
        except OSError:
            closed = True
    s.close()
    assert closed and time.monotonic() - t0 < 6, "the server drops a request that trickles in past its deadline"


@pytest.mark.cfg({"server.max_connections": 4})
def test_connections_beyond_the_cap_get_503_and_threads_stay_bounded(bare):
    url, _ = bare
    host, port = url.split("//")[1].split(":")
    threads_before = threading.active_count()
    idle = [socket.create_connection((host, int(port))) for _ in range(12)]   # never send a byte
    try:      # accepted in order: when this one is refused, the 12 before it were handled
        out = exchange(url, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503") and b"Retry-After" in out
        assert threading.active_count() - threads_before <= 4
    finally:
        for s in idle:
            s.close()
    def served():                     # /health answers "loading" again, not "too many connections"
        return b'"status"' in call(url, "/health")[2]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not served():
        time.sleep(0.2)
    status, _, body = call(url, "/health")
    assert status == 503 and json.loads(body)["status"] == "loading"


# --- browsers ----------------------------------------------------------------------------
def test_dns_rebinding_and_cross_origin_posts_are_refused(bare):
    url, _ = bare
    port = url.rsplit(":", 1)[1]
    status, _, body = call(url, "/v1/chat/completions", CHAT, {"Host": "attacker.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
    status, _, body = call(url, "/v1/chat/completions", CHAT, {"Origin": "http://attacker.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "origin_not_allowed"
    status, _, body = call(url, "/v1/chat/completions", CHAT, {"Content-Type": "text/plain"})
    assert status == 415
    # what is not a browser attack still works: IP and localhost Host names, same-origin pages
    for headers in ({"Host": f"localhost:{port}"}, {"Host": f"127.0.0.1:{port}"},
                    {"Origin": f"http://127.0.0.1:{port}"}, {"Content-Type": "application/json; charset=utf-8"}):
        assert call(url, "/v1/chat/completions", CHAT, headers)[0] == 503, headers     # model loading


@pytest.mark.cfg({"server.cors_origins": ["http://localhost:3000"], "server.allowed_hosts": ["my-box.lan"]})
def test_configured_origins_and_hosts_are_allowed_with_cors_headers(bare):
    url, _ = bare
    status, headers, _ = call(url, "/v1/chat/completions", CHAT, {"Origin": "http://localhost:3000"})
    assert status == 503 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    status, headers, _ = call(url, "/v1/chat/completions", None, {"Origin": "http://localhost:3000",
                              "Access-Control-Request-Method": "POST"}, method="OPTIONS")
    assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert call(url, "/v1/chat/completions", CHAT, {"Host": "my-box.lan"})[0] == 503
    assert call(url, "/v1/chat/completions", CHAT, {"Origin": "http://localhost:3001"})[0] == 403


def test_metrics_count_the_status_the_client_got(bare, monkeypatch):
    url, app = bare
    monkeypatch.setattr(ls.Handler, "timeout", 1.0)
    exchange(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200\r\n\r\n{\"m", 5)
    deadline = time.monotonic() + 10       # the handler counts it as it closes the connection
    while app.metrics.requests[("chat", 408)] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert app.metrics.requests[("chat", 408)] == 1 and app.metrics.requests[("chat", 200)] == 0


# --- on the real model -------------------------------------------------------------------
def test_a_client_that_leaves_cancels_its_voters(live_server):
    url, app = live_server
    took = leave_while_voting(url, app, {"messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                                         "max_tokens": 1500, "temperature": 1.0, "voters": 4})
    assert app.swarm.status()["busy_voters"] == 0
    assert took < 5, "voters stop within a few seconds of the client leaving"


def test_refusals_of_a_stream_come_as_plain_errors_before_any_header(live_server):
    url, _ = live_server
    long = {"messages": [{"role": "user", "content": "word " * 5000}], "stream": True}
    status, headers, body = call(url, "/v1/chat/completions", long)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "context_length_exceeded"


def test_live_tokens_are_written_by_the_handler_not_the_engine_thread(live_server, monkeypatch):
    url, app = live_server
    writers = set()
    real = ls.Handler._chunk
    monkeypatch.setattr(ls.Handler, "_chunk", lambda self, data: (writers.add(threading.current_thread().name),
                                                                 real(self, data)))
    monkeypatch.setitem(app.cfg.values["swarm"], "stream_mode", "fastest")
    status, _, body = call(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to ten."}],
                                                         "max_tokens": 24, "stream": True})
    assert status == 200 and body.count(b"data: ") > 3
    assert "localswarm-engine" not in writers


def test_a_timeout_is_an_error_or_a_cut_answer_never_an_empty_stop(engine):
    fresh = " ".join(f"w{i}x{time.time_ns() % 9973}" for i in range(200))    # no cached prefix: a long prefill
    asked = ls.ChatRequest(messages=[{"role": "user", "content": fresh}], max_tokens_requested=2000)
    with pytest.raises(ls.ApiError) as exc:
        ls.Swarm(engine, timeout=0.05).answer(asked)
    assert exc.value.status == 504 and exc.value.code == "timeout"
    asked = ls.ChatRequest(messages=[{"role": "user", "content": "Write a long story."}], max_tokens_requested=2000)
    ans = ls.Swarm(engine, timeout=5).answer(asked)           # 2,000 tokens take far longer than 5 s
    assert ans.text and ans.finish_reason == "length"


@pytest.mark.parametrize("stop", [["x" * (ls.MAX_STOP_CHARS + 1)], ["s"] * (ls.MAX_STOP_STRINGS + 1)],
                         ids=["too-long", "too-many"])
def test_stop_strings_are_bounded(live_server, stop):
    status, _, body = call(live_server[0], "/v1/chat/completions", dict(CHAT, stop=stop))
    assert status == 400 and json.loads(body)["error"]["param"] == "stop"


@pytest.mark.cfg({"server.api_key": "k3y"})
def test_the_key_may_come_as_x_api_key_and_a_bug_is_a_500_in_openais_shape(bare, monkeypatch):
    url, _ = bare
    assert call(url, "/v1/models", headers={"X-Api-Key": "k3y"})[0] == 200       # Anthropic-style clients
    assert call(url, "/v1/models", headers={"X-Api-Key": "wrong"})[0] == 401
    monkeypatch.setattr(ls.Handler, "route_models", lambda self: {}["boom"])
    status, headers, body = call(url, "/v1/models", headers={"Authorization": "Bearer k3y"})
    err = json.loads(body)["error"]
    assert status == 500 and headers["Content-Type"] == "application/json"
    assert err["type"] == "server_error" and err["message"] == "internal error: KeyError"   # no traceback, no detail


# --- round 3 (issue 34) ------------------------------------------------------------------
@pytest.mark.parametrize("method, path", [("GET", "/health"), ("GET", "/v1/models"),
                                          ("OPTIONS", "/v1/chat/completions")])
def test_a_body_nobody_reads_ends_the_connection(bare, method, path):
    """A GET or OPTIONS with a body: the body must never be read as the next request (CL.0)."""
    url, _ = bare
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
    t0 = time.monotonic()
    out = exchange(url, b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
                   % (method.encode(), path.encode(), len(smuggled)) + smuggled)
    assert out.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in out, out[:400]
    assert b"localswarm_requests_total" not in out and time.monotonic() - t0 < 5


def test_two_host_headers_are_refused(bare):
    url, _ = bare
    out = exchange(url, b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"more than one Host header" in out, out[:300]
    out = exchange(url, b"GET /health HTTP/1.1\r\nHost: evil.example\r\nHost: localhost\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out[:300]
    assert b"Connection: close" in out           # bad framing ends the connection, and says so


@pytest.mark.cfg({"server.api_key": "sekrit"})
def test_open_health_tells_only_the_status_when_a_key_is_set(bare):
    url, app = bare
    app.cfg.set("network.pool", True)
    status, _, body = call(url, "/health")
    assert status == 503 and json.loads(body) == {"status": "loading"}
    status, _, body = call(url, "/health", headers={"Authorization": "Bearer sekrit"})
    full = json.loads(body)
    assert status == 503 and full["status"] == "loading" and "error" in full and "pool" in full


def raw_chat(url, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return exchange(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data,
                    timeout=120)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("model", ["x\r\nSet-Cookie: evil=1\r\nX-Injected: 1", "模型", "a\nb\x00\x85"],
                         ids=["crlf", "not-latin-1", "controls"])
def test_a_model_name_never_breaks_the_response_head(live_server, model, stream):
    """The warning header carries the name made safe: no injected header, one status line."""
    url, _ = live_server
    out = raw_chat(url, dict(CHAT, model=model, stream=stream))
    head, _, rest = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and out.count(b"HTTP/1.1 ") == 1, out[:600]
    names = [l.split(b":", 1)[0].lower() for l in lines[1:]]
    assert b"set-cookie" not in names and b"x-injected" not in names, head
    warning = [l for l in lines if l.lower().startswith(b"x-localswarm-warning:")]
    assert len(warning) == 1 and b"is not served here" in warning[0], head
    if model == "模型":
        assert b"\\u6a21\\u578b" in warning[0]
    assert (b"[DONE]" in rest) if stream else b'"choices"' in rest


def test_a_flood_of_tiny_json_values_is_refused_before_it_is_parsed(bare):
    url, _ = bare
    flood = b'{"messages": [{"role": "user", "content": "hi", "x": [' + b"{}," * 2_000_000 + b'{}]}]}'
    t0 = time.monotonic()
    out = exchange(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(flood) + flood, timeout=60)
    assert out.startswith(b"HTTP/1.1 413") and b"JSON values" in out, out[:300]
    assert time.monotonic() - t0 < 10
    assert ls.json_value_count(b'{"a": "x,y:{[", "b": [1, 2]}') == 7      # strings do not count
    text = json.dumps({"messages": [{"role": "user", "content": "def f(a, b):\n    return {a: [b, 1]}\n" * 20000}]})
    assert ls.json_value_count(text.encode()) < 20          # long code in a message is one value


def test_an_unclosed_string_of_escaped_quotes_is_counted_in_linear_time(bare):
    """A pattern that can fail retries from every escaped quote (quadratic, holding the GIL:
    40 KB froze every thread for 9 s); the count must stay linear even at the body limit."""
    evil = b'"' + b'\\"' * 4_000_000
    t0 = time.monotonic()
    assert ls.json_value_count(evil) == 1
    assert time.monotonic() - t0 < 10           # quadratic: hours
    assert ls.json_value_count(b'["a\\"b", "c\\\\", {"d": 1}]') == 6 and ls.json_value_count(b'"\\') == 1
    url, _ = bare
    out = exchange(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(evil[:400_001]) + evil[:400_001], timeout=60)
    assert out.startswith(b"HTTP/1.1 400") and b"invalid JSON" in out, out[:300]


def test_a_utf16_body_cannot_hide_values_from_the_count(bare):
    """In UTF-16 the byte 0x22 of a character like U+0122 passed for a quote, so the rest of the
    body went uncounted (1.4 M values in 8 MiB), and json.loads(bytes) parsed it as UTF-16 anyway.
    Bodies are read as UTF-8 (RFC 8259), so such a body is a 400."""
    url, _ = bare
    text = '{"x": "\u0122", "messages": [{"role": "user", "content": "hi"}], "pad": [' + ",".join(["[]"] * 300000) + ']}'
    for raw in (text.encode("utf-16-le"), text.encode("utf-16")):
        status, _, body = call(url, "/v1/chat/completions", raw=raw)
        assert status == 400 and b"invalid_json" in body, body[:200]        # never parsed as UTF-16
    status, _, body = call(url, "/v1/chat/completions", raw=text.encode())
    assert status == 413 and b"JSON values" in body


@pytest.mark.cfg({"server.max_pending_bytes": 4 * 2 ** 20})
def test_bodies_announced_but_not_sent_hold_nothing(bare):
    """Bytes count once they arrive: connections that announce 8 MiB and send one byte do not
    lock out the requests that do send their bodies."""
    url, app = bare
    host, port = url.split("//")[1].split(":")
    idle = []
    for _ in range(8):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 8388608\r\n\r\n{")
        idle.append(s)
    try:
        deadline = time.monotonic() + 10
        while app._held_bytes < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app._held_bytes == 8
        status, _, body = call(url, "/v1/chat/completions", CHAT)
        assert status == 503 and b"loading" in body.lower()      # served as far as a bare server goes
    finally:
        for s in idle:
            s.close()


@pytest.mark.cfg({"server.max_pending_bytes": 4096})
def test_request_bodies_held_at_once_are_bounded(bare):
    """While bodies of max_pending_bytes are being served, another waits its turn (503)."""
    url, app = bare
    held = app.hold_body(4000)
    try:
        status, headers, body = call(url, "/v1/chat/completions", dict(CHAT, content="x" * 200))
        assert status == 503 and headers.get("Retry-After") and b"max_pending_bytes" in body
    finally:
        app.release_body(held)
    status, _, body = call(url, "/v1/chat/completions", CHAT)
    assert status == 503 and b"loading" in body.lower()          # past the budget: only "no model yet"
    deadline = time.monotonic() + 5          # released in the handler's finally, just after the reply is out
    while app._held_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app._held_bytes == 0


def test_messages_keep_only_what_a_template_reads(live_server):
    swarm = live_server[1].swarm
    req = ls.parse_request({"messages": [{"role": "developer", "content": "be brief", "junk": [{}] * 1000},
                                         {"role": "user", "content": "hi", "name": "me"}]}, True, swarm)
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "me"}]
