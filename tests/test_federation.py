"""Federation: packet framing and signatures (pure), three nodes on loopback, and separate test
hosts in network namespaces made by the test itself (root only). Traffic goes only to 127.0.0.0/8
or to the namespaces' own 10.77.0.0/24; every wait is bounded."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import localswarm as ls
from conftest import ROOT, free_port, node_log, start_node, wait_http

CHAT = {"messages": [{"role": "user", "content": "Write a Python function add(a, b)."}], "max_tokens": 24}


# --- pure framing ---------------------------------------------------------------

def fed(token="", **cfg):
    c = ls.load_config(env={}, read_file=False)
    c.set("network.auth_token", token)
    c.set("network.broadcast_addresses", ["127.255.255.255"])
    for k, v in cfg.items():
        c.set(k, v)
    return ls.Federation(c, ls.App(c), 8080)


def ann(f, **over):
    a = f.announcement()
    a.update(over)
    return a


def test_announcements_roundtrip_and_own_packets_are_ignored():
    a, b = fed(), fed()
    assert b.receive(ls.encode_announcement(a.announcement()), "127.0.0.1").node_id == a.node_id
    assert a.receive(ls.encode_announcement(a.announcement()), "127.0.0.1") is None
    assert len(b.live_peers()) == 1


@pytest.mark.parametrize("data,reason", [
    (b"\xff\xfe garbage", "malformed"), (b"[1, 2]", "malformed"), (b"x" * 5000, "oversized"),
    (json.dumps({"proto": "exo", "v": 1}).encode(), "foreign"),
    (json.dumps({"proto": ls.FED_PROTOCOL, "v": 99}).encode(), "version"),
    (json.dumps({"proto": ls.FED_PROTOCOL, "v": 1, "node_id": "x", "port": "http", "instance": "i"}).encode(), "malformed"),
])
def test_bad_packets_are_dropped_with_a_reason(data, reason):
    with pytest.raises(ls.DropPacket) as e:
        fed().receive(data, "127.0.0.1")
    assert e.value.reason == reason


def test_signed_announcements_stale_replayed_and_unsigned_are_refused():
    a, b = fed("tok"), fed("tok")
    a.addresses = ["10.0.0.5"]
    packet = ls.encode_announcement(a.announcement(), "tok")
    assert b.receive(packet, "10.0.0.5")
    with pytest.raises(ls.DropPacket, match="replay"):
        b.receive(packet, "10.0.0.5")
    with pytest.raises(ls.DropPacket, match="stale"):
        b.receive(ls.encode_announcement(a.announcement(), "tok"), "10.0.0.5", now=time.time() + 60)
    with pytest.raises(ls.DropPacket, match="unsigned"):
        b.receive(ls.encode_announcement(a.announcement()), "10.0.0.5")
    with pytest.raises(ls.DropPacket, match="bad_signature"):
        b.receive(ls.encode_announcement(a.announcement(), "other"), "10.0.0.5")


def test_without_token_only_private_addresses():
    a, b = fed(), fed()
    with pytest.raises(ls.DropPacket, match="not_private"):
        b.receive(ls.encode_announcement(a.announcement()), "8.8.8.8")
    assert b.receive(ls.encode_announcement(a.announcement()), "192.168.1.9")


def test_node_id_clash_is_resolved():
    a, b = fed("tok"), fed("tok")
    b.node_id = a.node_id                     # a cloned VM (signed: only a real peer may rename us)
    smaller, larger = sorted((a, b), key=lambda f: f.instance)
    smaller.addresses = ["127.0.0.1"]
    larger.receive(ls.encode_announcement(smaller.announcement(), "tok"), "127.0.0.1")
    assert larger.node_id != smaller.node_id


def test_peers_expire_and_the_table_is_bounded():
    b = fed(**{"network.max_peers": 2})
    now = time.monotonic()
    for i in range(2):
        b.receive(ls.encode_announcement(ann(fed(), node_id=f"n{i}")), "127.0.0.1", now=now)
    with pytest.raises(ls.DropPacket, match="table_full"):
        b.receive(ls.encode_announcement(ann(fed(), node_id="n9")), "127.0.0.1", now=now)
    assert len(b.live_peers(now + b.interval * 3)) == 2
    assert b.live_peers(now + b.interval * 3.6) == []


# --- issue 15: what a hostile packet, request or peer reply could do ---------------------

def test_a_signed_announcement_sent_from_another_host_is_refused():
    a, b = fed("tok"), fed("tok")
    a.addresses = ["10.0.0.5"]
    with pytest.raises(ls.DropPacket, match="wrong_source"):
        b.receive(ls.encode_announcement(a.announcement(), "tok"), "10.0.0.66")


def test_an_unsigned_clash_does_not_rename_us():
    a, b = fed(), fed()
    b.node_id, before = a.node_id, a.node_id
    for _ in range(5):
        with pytest.raises(ls.DropPacket, match="clash_unsigned"):
            b.receive(ls.encode_announcement(ann(fed(), node_id=before, instance="0")), "127.0.0.1")
    assert b.node_id == before


def test_the_table_counts_every_peer_prunes_the_expired_and_limits_each_host():
    b = fed(**{"network.max_peers": 32})
    now = time.monotonic()
    for wave in range(40):                    # 40 waves of 32 new ids, each after the last expired
        t = now + wave * b.interval * 4
        for i in range(32):
            with contextlib.suppress(ls.DropPacket):
                b.receive(ls.encode_announcement(ann(fed(), node_id=f"w{wave}n{i}")), f"10.0.{i}.1", now=t)
    assert len(b.peers) <= 32
    with pytest.raises(ls.DropPacket, match="host_full"):
        for i in range(ls.MAX_PEERS_PER_HOST + 1):
            b.receive(ls.encode_announcement(ann(fed(), node_id=f"h{i}", port=22 + i)), "10.9.9.9", now=t + 100)


def test_other_models_are_not_stored_when_models_may_not_mix(engine):
    b = fed(**{"network.mix_models": False})
    b.app.swarm = ls.Swarm(engine, model_id="mine")
    for i in range(50):
        with pytest.raises(ls.DropPacket, match="other_model"):
            b.receive(ls.encode_announcement(ann(fed(), node_id=f"f{i}", model="theirs")), "127.0.0.1")
    assert b.peers == {}


def test_a_static_peer_found_again_by_discovery_is_asked_once():
    b = fed(**{"network.peers": ["127.0.0.1:9"]})
    static = b.peers["static:127.0.0.1:9"]
    static.node_id, static.last_seen = "abc", time.monotonic()
    b.receive(ls.encode_announcement(ann(fed(), node_id="abc", port=9)), "127.0.0.1")
    assert [p.node_id for p in b.live_peers()] == ["abc"]


def test_a_node_bound_to_loopback_does_not_announce_to_the_lan():
    assert not fed(**{"server.host": "127.0.0.1", "network.broadcast_addresses": ["10.77.0.255"]}).reachable()
    assert fed(**{"server.host": "127.0.0.1"}).reachable()          # loopback-only federation
    assert fed(**{"server.host": "0.0.0.0", "network.broadcast_addresses": ["10.77.0.255"]}).reachable()


@pytest.mark.parametrize("ts, sig, reason", [("nan", "0" * 64, "bad_timestamp"), ("inf", "0" * 64, "bad_timestamp"),
                                             (None, "é" * 64, "bad_signature"), (None, "zz", "bad_signature")])
def test_malformed_signatures_and_timestamps_are_refused(ts, sig, reason):
    with pytest.raises(ls.DropPacket) as e:
        ls.ReplayGuard().check("tok", ts or f"{time.time():.3f}", "0123456789abcdef", sig, b"{}")
    assert e.value.reason == reason


def test_a_signature_holds_only_for_its_route_and_node():
    ts, nonce, body = f"{time.time():.3f}", "0123456789abcdef", b"{}"
    sig = ls.sign("tok", ts, nonce, body, ("POST", "/v1/federation/vote", "nodeA"))
    for context in [("POST", "/v1/federation/vote", "nodeB"), ("GET", "/v1/federation/info", "nodeA")]:
        with pytest.raises(ls.DropPacket, match="bad_signature"):
            ls.ReplayGuard().check("tok", ts, nonce, sig, body, context=context)
    ls.ReplayGuard().check("tok", ts, nonce, sig, body, context=("POST", "/v1/federation/vote", "nodeA"))


def test_a_vote_request_captured_on_its_way_to_one_node_is_refused_by_another():
    a, b = fed("tok"), fed("tok")
    body, ts, nonce = b'{"prompt": "x"}', f"{time.time():.3f}", "0123456789abcdef"
    sig = ls.sign("tok", ts, nonce, body, ("POST", "/v1/federation/vote", a.node_id))
    headers = {"X-Localswarm-Timestamp": ts, "X-Localswarm-Nonce": nonce, "X-Localswarm-Signature": sig,
               "X-Localswarm-Node": a.node_id}
    a.check_request("POST", "/v1/federation/vote", headers, "10.0.0.7", body)      # for A: fine
    with pytest.raises(ls.ApiError) as e:
        b.check_request("POST", "/v1/federation/vote", headers, "10.0.0.7", body)  # replayed to B
    assert e.value.status == 401 and e.value.code == "wrong_node" and b.dropped["request_wrong_node"] == 1
    with pytest.raises(ls.ApiError):
        a.check_request("POST", "/v1/federation/info", headers, "10.0.0.7", body)


@pytest.mark.parametrize("field, value, expect", [
    ("completion_tokens", "abc", 0), ("latency", "slow", 0.0), ("voters", "many", 1), ("confidence", "high", 0.0),
    ("voters", 1e300, 64), ("latency", float("nan"), 0.0), ("confidence", 7, 1.0), ("finish_reason", 5, "stop")])
def test_every_field_of_a_peer_vote_is_checked_and_clamped(field, value, expect):
    vote = {"text": "x", "voters": 2, "confidence": 0.5, field: value}
    assert ls.clean_vote(vote)[field] == expect


@pytest.mark.parametrize("vote", [{"text": 5}, {"text": "x", "tool_calls": 5}, {"text": "x", "tool_calls": [5]},
                                  {"text": "x" * (ls.MAX_PEER_TEXT + 1)}, "text"])
def test_malformed_peer_votes_are_refused(vote):
    with pytest.raises(ValueError):
        ls.clean_vote(vote)


def test_a_huge_voter_count_cannot_outvote_agreeing_voters():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    local = [{"text": good, "voters": 3, "confidence": 1.0}]
    liar = ls.clean_vote({"text": "x", "voters": 1e308, "confidence": 1.0})
    liar["voters"] = min(liar["voters"], 3)          # what Federation.answer does: no more than announced
    assert ls.cross_vote(local + [liar]).index == 0


def test_a_silent_peer_costs_one_deadline_and_its_socket_is_closed(engine):
    """A peer that accepts and never answers: the request ends at network.peer_timeout, the
    connection to it is closed (so it would stop working) and no thread is left waiting."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    port = silent.getsockname()[1]
    b = fed(**{"network.peer_timeout": 1.5, "network.peers": [f"127.0.0.1:{port}"]})
    b.app.swarm = ls.Swarm(engine, model_id="m")
    peer = b.peers[f"static:127.0.0.1:{port}"]
    peer.node_id, peer.last_seen, peer.voters = "silent", time.monotonic(), 2
    threads = threading.active_count()
    t0 = time.monotonic()
    ans = b.answer(b.app.swarm, ls.ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens_requested=4))
    local = next(n["latency_s"] for n in ans.nodes if not n.get("skipped"))
    assert time.monotonic() - t0 < max(1.5, local) + 3       # the deadline, not the peer, ends the wait
    assert [n["reason"] for n in ans.nodes if n.get("skipped")] == ["no answer within 2s"]
    conn, _ = silent.accept()
    conn.settimeout(5)
    conn.recv(65536)                          # the request
    assert conn.recv(65536) == b"", "the connection to the late peer is closed"
    conn.close()
    silent.close()
    time.sleep(0.2)
    assert threading.active_count() <= threads


def test_an_unsigned_reply_is_not_a_vote():
    """With a token, a peer's reply must be signed for the request it answers."""
    import http.server

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"text": "trust me", "voters": 3}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        b = fed("tok")
        with pytest.raises(ValueError, match="not signed"):
            b.request(ls.Peer("127.0.0.1", srv.server_address[1], node_id="x"), "POST", "/v1/federation/vote", {}, 5)
    finally:
        srv.shutdown()
        srv.server_close()


def test_parse_ip_addr():
    out = "2: eth0    inet 10.77.0.2/24 brd 10.77.0.255 scope global eth0\\       valid_lft forever\n1: lo    inet 127.0.0.1/8 scope host lo"
    assert ls.parse_ip_addr(out) == ["10.77.0.255"]


# --- three nodes on loopback -------------------------------------------------

# Several nodes share this machine's 2 cores: one llama.cpp thread each, or their spinning
# thread pools starve each other (requests then take 10-30 s instead of one).
def node_args(port, disc, *extra):
    return ["--model", "smollm2:135m:q4_1", "--voters", "2", "--ctx", "2048", "--port", str(port), "--yes", "-q",
            "--threads", "1",
            "--federate", "--broadcast", "127.255.255.255", "--discovery-port", str(disc),
            "--advertise-interval", "1", *extra]


def post_json(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def peers_of(url):
    with urllib.request.urlopen(url + "/v1/federation/info", timeout=5) as r:
        return json.loads(r.read())["peers"]


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_three_loopback_nodes_discover_vote_and_survive_a_kill():
    disc = free_port()
    ports = [free_port() for _ in range(3)]
    procs = [start_node(node_args(p, disc), env={"HF_HUB_OFFLINE": "1"}) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for u in urls:
            wait_http(u + "/health", timeout=90)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and not all(peers_of(u) == 2 for u in urls):
            time.sleep(0.2)
        assert all(peers_of(u) == 2 for u in urls), "discovery within 10 s"
        r = post_json(urls[0] + "/v1/chat/completions", CHAT)
        assert "nodes" in r["x_localswarm"], node_log(procs[0])
        nodes = [n for n in r["x_localswarm"]["nodes"] if not n.get("skipped")]
        assert len(nodes) == 3 and sum(n["winner"] for n in nodes) == 1, (r["x_localswarm"]["nodes"], node_log(procs[0]))
        assert r["choices"][0]["message"]["content"]

        box = {}
        t = threading.Thread(target=lambda: box.update(r=post_json(urls[0] + "/v1/chat/completions",
                                                                  dict(CHAT, max_tokens=200))))
        t.start()
        t0 = time.monotonic()
        while not json.loads(urllib.request.urlopen(urls[0] + "/health", timeout=5).read())["busy_voters"]:
            assert time.monotonic() - t0 < 60, "the request never started"
            time.sleep(0.05)
        procs[2].kill()                       # a peer dies mid-request (it has been asked)
        t.join(120)
        assert box.get("r"), "the request must still be answered\n" + node_log(procs[0]) + node_log(procs[1])
        nodes = box["r"]["x_localswarm"]["nodes"]
        assert len([n for n in nodes if not n.get("skipped")]) == 2 and len([n for n in nodes if n.get("skipped")]) == 1
    finally:
        stop(procs)
    for p in procs[:2]:
        assert p.returncode == 0


# --- separate hosts in network namespaces ---------------------------------------

NETNS = shutil.which("ip") is not None and os.geteuid() == 0


class Hosts:
    """Test hosts h1..hN in network namespaces joined by a bridge namespace (10.77.0.0/24)."""

    def __init__(self, n, tag):
        self.tag, self.n = tag, n
        self.names = [f"ls{tag}h{i}" for i in range(1, n + 1)]
        self.bridge = f"ls{tag}br"

    def ip(self, *args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def __enter__(self):
        self.ip("netns", "add", self.bridge)
        self.ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, h in enumerate(self.names, 1):
            self.ip("netns", "add", h)
            self.ip("-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.bridge)
            self.ip("-n", self.bridge, "link", "set", f"p{i}", "master", "br0")
            self.ip("-n", self.bridge, "link", "set", f"p{i}", "up")
            self.ip("-n", h, "link", "set", "lo", "up")
            self.ip("-n", h, "addr", "add", f"10.77.0.{i}/24", "brd", "+", "dev", "eth0")
            self.ip("-n", h, "link", "set", "eth0", "up")
        return self

    def addr(self, i):
        return f"10.77.0.{i + 1}"

    def run(self, i, args, env=None):
        cmd = ["ip", "netns", "exec", self.names[i], sys.executable, os.path.join(ROOT, "localswarm.py"), *args]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))

    def exec_json(self, i, url, body=None, timeout=120):
        """HTTP from inside host i (the test process itself is outside every namespace)."""
        return json.loads(self.exec_text(i, url, body, timeout))

    def exec_text(self, i, url, body=None, timeout=120):
        code = ("import json,sys,urllib.request as u\n"
                "d=sys.argv[2].encode() if sys.argv[2] else None\n"
                "r=u.Request(sys.argv[1],data=d,headers={'Content-Type':'application/json'})\n"
                f"print(u.urlopen(r,timeout={timeout}).read().decode())")
        out = subprocess.run(["ip", "netns", "exec", self.names[i], sys.executable, "-c", code, url,
                              json.dumps(body) if body is not None else ""], capture_output=True, text=True,
                             timeout=timeout + 10)
        if out.returncode:
            raise OSError(out.stderr[-500:])
        return out.stdout

    def link(self, i, up):
        self.ip("-n", self.names[i], "link", "set", "eth0", "up" if up else "down")

    def __exit__(self, *exc):
        for ns in self.names + [self.bridge]:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except OSError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def ns_node_args(disc_port=8765, interval="0.5", extra=()):
    return ["--model", "smollm2:135m:q4_1", "--voters", "2", "--ctx", "2048", "--host", "0.0.0.0", "--port", "8080",
            "--threads", "1",
            "--yes", "-q", "--federate", "--broadcast", "10.77.0.255", "--discovery-port", str(disc_port),
            "--advertise-interval", interval, *extra]


def wait_peers(hosts, i, want, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if hosts.exec_json(i, f"http://{hosts.addr(i)}:8080/health", timeout=5)["peers"] == want:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"host {i} did not see {want} peers within {timeout}s")


@pytest.mark.skipif(not NETNS, reason="network namespaces need root and iproute2")
def test_namespace_hosts_discover_vote_survive_and_expire():
    with Hosts(3, str(os.getpid() % 10000)) as hosts:
        token = {"LOCALSWARM_FEDERATION_TOKEN": "shared-secret"}
        procs = [hosts.run(i, ns_node_args(), token) for i in range(3)]
        for i in range(3):
            t0 = time.monotonic()
            while True:
                try:
                    hosts.exec_json(i, f"http://{hosts.addr(i)}:8080/health", timeout=5)
                    break
                except OSError:
                    assert time.monotonic() - t0 < 90, "node did not start"
                    time.sleep(0.5)
        for i in range(3):
            wait_peers(hosts, i, 2, 10)          # raises when a host has not seen both within 10 s

        r = hosts.exec_json(0, f"http://{hosts.addr(0)}:8080/v1/chat/completions", CHAT)
        assert len([n for n in r["x_localswarm"]["nodes"] if not n.get("skipped")]) == 3, r["x_localswarm"]["nodes"]

        # a node with the wrong token is ignored by the others
        intruder = hosts.run(2, ns_node_args(extra=["--port", "8081"]), {"LOCALSWARM_FEDERATION_TOKEN": "wrong"})
        drops = lambda: sum(float(line.split()[-1]) for line in hosts.exec_text(
            0, f"http://{hosts.addr(0)}:8080/metrics").splitlines() if line.startswith("localswarm_federation_dropped_total"))
        before, t0 = drops(), time.monotonic()
        while drops() == before:                 # until node 0 has heard (and refused) the intruder
            assert time.monotonic() - t0 < 60, "the intruder never announced itself"
            time.sleep(0.25)
        assert hosts.exec_json(0, f"http://{hosts.addr(0)}:8080/health")["peers"] == 2
        intruder.kill()

        # link cut: the peer expires within 3 intervals (+ slack); restored: back within 10 s
        hosts.link(2, False)
        wait_peers(hosts, 0, 1, ls.EXPIRE_INTERVALS * 0.5 + 2)
        hosts.link(2, True)
        wait_peers(hosts, 0, 2, 10)

        # a peer killed mid-request: the answer still comes within the peer timeout
        box = {}
        t = threading.Thread(target=lambda: box.update(r=hosts.exec_json(
            0, f"http://{hosts.addr(0)}:8080/v1/chat/completions", dict(CHAT, max_tokens=200))))
        t.start()
        t0 = time.monotonic()
        while not hosts.exec_json(0, f"http://{hosts.addr(0)}:8080/health")["busy_voters"]:
            assert time.monotonic() - t0 < 60, "the request never started"
            time.sleep(0.1)
        procs[1].kill()                           # the request is running: its peers have been asked
        t.join(150)
        assert box.get("r") and box["r"]["choices"][0]["message"]["content"] is not None
        for p in procs:
            p.kill()


def test_static_peer_without_broadcast_and_signed_requests(tmp_path):
    """Node B knows A only as --peer; both share a token; an unsigned vote request is refused."""
    ports = [free_port(), free_port()]
    env = {"HF_HUB_OFFLINE": "1", "LOCALSWARM_FEDERATION_TOKEN": "tok"}
    a = start_node(node_args(ports[0], free_port()), env=env)
    b = start_node(node_args(ports[1], free_port(), "--peer", f"127.0.0.1:{ports[0]}"), env=env)
    try:
        for p in ports:
            wait_http(f"http://127.0.0.1:{p}/health", timeout=90)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/health", timeout=5) as r:
                if json.loads(r.read())["peers"] == 1:
                    break
            time.sleep(0.2)
        r = post_json(f"http://127.0.0.1:{ports[1]}/v1/chat/completions", CHAT)
        assert len([n for n in r["x_localswarm"]["nodes"] if not n.get("skipped")]) == 2, r["x_localswarm"]["nodes"]
        with pytest.raises(urllib.error.HTTPError) as e:
            post_json(f"http://127.0.0.1:{ports[0]}/v1/federation/vote", CHAT)
        assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "unsigned"
    finally:
        stop([a, b])


def local_answer(text, calls=()):
    verdict = ls.Verdict(0, 0.5, "similarity", [[0, 1]], [1.0, 1.0], [1.0, 1.0], ["", ""])
    results = [ls.VoterResult(i, text, "stop", 10, 5, 0.1, 1.0, finished=True) for i in range(2)]
    return ls.SwarmAnswer(text, list(calls), "tool_calls" if calls else "stop", verdict, results,
                          [(text, list(calls))] * 2, 10, 0, 1.0, "mine", 100)


CODE = "```python\ndef add(a, b):\n    return a + b\n```"
OTHER = "```python\ndef add(a, b):\n    return sum([a, b, 0]) * 1\n```"


def test_a_peers_answer_can_win_and_the_local_vote_keeps_its_shape():
    local = local_answer(OTHER)
    remote = [{"node_id": f"p{i}", "name": f"peer{i}", "text": CODE, "confidence": 0.9, "voters": 4, "model": "m",
               "latency": 2.0, "completion_tokens": 7, "finish_reason": "stop"} for i in range(2)]
    ans = ls.merge_federated(local, remote, "me", "mine")
    assert ans.text == CODE and ans.cross.index != 0
    assert ans.results == local.results and ans.verdict is local.verdict      # per_voter stays this node's
    x = ans.x_localswarm()
    assert x["strategy"] == "cross-swarm" and x["local_vote"]["strategy"] == "similarity"
    assert x["voters"] == 2 and len(x["per_voter"]) == 2
    assert [n["winner"] for n in x["nodes"]] == [False, True, False]
    assert ans.distinct_choices(2)[0][0] == CODE and ans.distinct_choices(2)[1][0] == OTHER

    class Remembers:          # what the engine is told to keep: nothing of ours, a peer won
        told = None

        def remember(self, gen, index):
            self.told = index
    engine = Remembers()
    swarm = ls.Swarm.__new__(ls.Swarm)
    swarm.engine = engine
    swarm.remember(ans)
    assert engine.told == -1
    swarm.remember(ls.merge_federated(local, [], "me", "mine"))
    assert engine.told == 0


def test_a_federated_tool_call_wins_by_its_canonical_call():
    call = {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": '{"path": "a.py"}'}}
    local = local_answer("I would read a.py first.")
    remote = [{"node_id": f"p{i}", "text": "", "tool_calls": [call], "confidence": 0.8, "voters": 3,
               "finish_reason": "tool_calls"} for i in range(2)]
    ans = ls.merge_federated(local, remote, "me", "mine")
    assert ans.tool_calls == [call] and ans.finish_reason == "tool_calls" and ans.text == ""


# --- the protocol's details: request ids, forwarded settings, min_peers, health ---------------

@pytest.fixture
def two_nodes(engine):
    """Node B serves votes over HTTP in this process (same session engine); node A knows it as a
    static peer. Neither announces: A checks B by hand (check_peers)."""
    c = ls.load_config(env={}, read_file=False)
    b_app = ls.App(c, ls.Swarm(engine, model_id="smollm2-135m-q4_1"))
    server = ls.make_server(b_app, "127.0.0.1", 0)
    b_app.federation = ls.Federation(c, b_app, server.server_address[1])
    b_app.federation.node_id, b_app.federation.name = "node-b", "b"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    a = fed(**{"network.peers": [f"127.0.0.1:{server.server_address[1]}"]})
    a.app.swarm = ls.Swarm(engine, model_id="smollm2-135m-q4_1")
    a.app.federation = a
    a.check_peers()
    yield a, b_app
    server.shutdown()
    server.server_close()


def ask(a, **kw):
    req = ls.ChatRequest(messages=[{"role": "user", "content": "Say hi."}], max_tokens_requested=6,
                         params=ls.SamplingParams(temperature=0.8, max_tokens=6, seed=1), **kw)
    return req, a.app.answer(req)


def test_request_id_voters_and_strategy_reach_the_peer_and_its_logs(two_nodes, caplog):
    a, _ = two_nodes
    with caplog.at_level("INFO", logger="localswarm"):
        req, ans = ask(a, voters=3, strategy="quality")
    b = next(n for n in ans.nodes if n["node_id"] == "node-b")
    assert b["voters"] == 3 and b["strategy"] == "quality" and not b.get("skipped")
    logs = [r.getMessage() for r in caplog.records]
    assert f"request {req.request_id}: asking 1 peer" in logs                       # the requester
    assert f"request {req.request_id}: voting for 127.0.0.1" in logs                 # the peer
    assert sum(line.startswith(f"request {req.request_id} answered") for line in logs) == 2   # both
    # more voters than the peer can run: it runs what it can (and still votes)
    got = a.vote_request(a.app, {"messages": [{"role": "user", "content": "hi"}], "voters": 60, "request_id": "r-1"})
    assert got.voters == a.app.swarm.max_voters and got.request_id == "r-1"
    assert a.vote_request(a.app, {"prompt": "x", "request_id": "bad id!"}).request_id != "bad id!"


def test_min_peers_keeps_the_answer_local_until_enough_peers_are_live(two_nodes):
    a, _ = two_nodes
    a.cfg.set("network.min_peers", 2)
    assert a.voting_peers() == []
    _, ans = ask(a)
    assert ans.nodes == [] and ans.cross is None
    a.cfg.set("network.min_peers", 1)
    _, ans = ask(a)
    assert len(ans.nodes) == 2


def test_an_unhealthy_peer_is_skipped_before_it_is_sent_work(two_nodes, monkeypatch):
    a, b_app = two_nodes
    votes = []
    monkeypatch.setattr(b_app.federation, "vote_request",
                        lambda app, data, real=b_app.federation.vote_request: votes.append(1) or real(app, data))
    swarm, b_app.swarm = b_app.swarm, None            # B is loading
    a.check_peers()
    (peer,) = a.live_peers()
    assert peer.health == "loading" and a.voting_peers() == []
    _, ans = ask(a)
    assert votes == [] and ans.nodes == []            # answered locally, nothing sent to B
    b_app.swarm = swarm
    monkeypatch.setattr(b_app.memory, "level", "critical")     # B's memory is short
    a.check_peers()
    assert peer.health == "memory_pressure" and a.voting_peers() == []
    monkeypatch.setattr(b_app.memory, "level", "ok")
    a.check_peers()
    assert peer.health == "ok"
    _, ans = ask(a)
    assert votes == [1] and len(ans.nodes) == 2


def test_a_reply_for_another_request_is_not_a_vote(two_nodes, monkeypatch):
    a, _ = two_nodes
    real = a.request
    monkeypatch.setattr(a, "request", lambda *args, **kw: dict(real(*args, **kw), request_id="someone-else"))
    _, ans = ask(a)
    (skipped,) = [n for n in ans.nodes if n.get("skipped")]
    assert "another request" in skipped["reason"]


def test_a_trickling_peer_is_cut_off_at_the_deadline_and_leaks_nothing(engine):
    """A peer that answers "Connection: close" and then sends its body a byte at a time, each
    byte within the socket timeout: http.client has let go of the socket by then, so only
    shutting the socket itself ends it. Six requests leave no thread and no socket behind."""
    trickler = socket.socket()
    trickler.bind(("127.0.0.1", 0))
    trickler.listen(16)
    port = trickler.getsockname()[1]
    stop_evt = threading.Event()
    cut_off = []

    def serve(conn):
        with conn:
            conn.settimeout(30)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n")
            try:
                while not stop_evt.is_set():
                    conn.sendall(b" ")
                    time.sleep(0.3)
            except OSError:
                cut_off.append(time.monotonic())

    def accept():
        while not stop_evt.is_set():
            try:
                conn, _ = trickler.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    b = fed(**{"network.peer_timeout": 1.5, "network.peers": [f"127.0.0.1:{port}"]})
    b.app.swarm = ls.Swarm(engine, model_id="m")
    peer = b.peers[f"static:127.0.0.1:{port}"]
    peer.node_id, peer.voters = "trickler", 2
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for _ in range(6):
        peer.last_seen = time.monotonic()
        t0 = time.monotonic()
        ans = b.answer(b.app.swarm, ls.ChatRequest(messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens_requested=4))
        assert [n.get("skipped") for n in ans.nodes].count(True) == 1 and time.monotonic() - t0 < 15
    deadline = time.monotonic() + 10
    while (len(cut_off) < 6 or threading.active_count() > threads + 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop_evt.set()
    trickler.close()
    assert len(cut_off) == 6, "the trickling replies were not cut off"
    time.sleep(0.5)
    assert threading.active_count() <= threads + 1          # + the accept loop, now ending
    assert len(os.listdir("/proc/self/fd")) <= fds


def test_a_peer_socket_that_connects_after_the_deadline_is_shut_at_once():
    """The deadline shuts every peer's socket; a peer thread late to connect finds it passed."""
    group = ls.PeerSockets()
    early_a, early_b = socket.socketpair()
    group.add(early_a)
    group.shut()
    late_a, late_b = socket.socketpair()
    group.add(late_a)
    try:
        for sock, peer in ((early_a, early_b), (late_a, late_b)):
            assert sock.recv(1) == b"" and peer.recv(1) == b""      # shut both ways
    finally:
        for s in (early_a, early_b, late_a, late_b):
            s.close()
