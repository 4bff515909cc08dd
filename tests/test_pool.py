"""Pooling over llama.cpp's RPC backend: the relay handshake and the pool planner (pure), the
relay on loopback, and a head with two workers in network namespaces made by the test itself
(root only), on the starter model. Traffic goes only to 127.0.0.0/8 or the namespaces'
10.77.0.0/24; every wait is bounded."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import localswarm as ls
from conftest import ROOT
from test_federation import NETNS, Hosts

REGISTRY = ls.registry_for(ls.load_registry(), "llama.cpp")
STARTER = next(v for v in REGISTRY if v.id == "smollm2:135m:q4_1")
MiB = ls.MiB


# --- the relay handshake (pure) ---------------------------------------------------

def test_a_head_proves_the_token_for_this_connection_only():
    snonce, cnonce = "ab" * 16, "cd" * 16
    line = f"{cnonce} {ls.rpc_proof('tok', 'head', snonce, cnonce)} pipe"
    assert ls.check_head_line(line, "tok", snonce) == (cnonce, "pipe")
    with pytest.raises(ls.DropPacket, match="bad_token"):
        ls.check_head_line(line, "other", snonce)                 # another token
    with pytest.raises(ls.DropPacket, match="bad_token"):
        ls.check_head_line(line, "tok", "ef" * 16)                # replayed on a new connection
    worker_proof = ls.rpc_proof("tok", "worker", snonce, cnonce)  # a worker's proof is not a head's
    with pytest.raises(ls.DropPacket, match="bad_token"):
        ls.check_head_line(f"{cnonce} {worker_proof} pipe", "tok", snonce)
    for bad in ["", "x y", f"{cnonce} {'0' * 64} pipe extra", f"{cnonce} nothex pipe",
                f"{cnonce} {ls.rpc_proof('tok', 'head', snonce, cnonce)} rm"]:
        with pytest.raises(ls.DropPacket, match="malformed"):
            ls.check_head_line(bad, "tok", snonce)


# --- the planner --------------------------------------------------------------------

def members(head_mib, *worker_mib, rtt=0.001):
    return [ls.PoolMember("head", offer=head_mib * MiB)] + [
        ls.PoolMember(f"w{i}", f"10.0.0.{i + 2}", 50052, m * MiB, "CPU", rtt) for i, m in enumerate(worker_mib)]


def choose_starter(budget, floor):
    return ls.fit_chosen([STARTER], budget, 2, 2048)


def test_layers_are_split_in_proportion_and_whole():
    assert ls.split_layers(31, [1, 1, 1]) == [11, 10, 10]
    assert ls.split_layers(31, [3, 1, 0]) == [23, 8, 0]
    assert sum(ls.split_layers(25, [157, 136, 136])) == 25
    assert ls.split_layers(5, [0, 0]) is None                      # no room at all
    assert ls.split_layers(23, [266, 553, 553], [4, 9, 9]) is None   # the caps hold 22
    assert ls.split_layers(23, [266, 553, 553], [4, 10, 10]) == [4, 10, 9]


def test_a_model_that_fits_only_the_pool_is_pooled_with_every_share_within_its_offer():
    need = ls.estimate_memory(STARTER, 2048, 2)["total"]
    head = ls.Budget(400 * MiB, "capped", [400 * MiB], "cpu")
    assert need > head.bytes                                     # does not fit the head alone
    p = ls.plan_pool(choose_starter, head, members(400, 200, 200), ls.SpeedFloor())
    layers = [m.layers for m in p.pool]
    assert sum(layers) == STARTER.n_layers + 1 and min(layers) > 0, layers
    assert all(m.bytes <= m.offer for m in p.pool)
    assert p.placement == "pool: head {} layers, w0 {} layers, w1 {} layers".format(*layers)
    assert "pooled because this machine alone runs nothing" in p.reason
    lines = ls.pool_lines(p)
    assert lines[1].startswith(f"w0 (10.0.0.2:50052): {layers[1]} of 31 layers")


def test_the_head_keeps_a_layer_and_workers_too_small_drop_out():
    head = ls.Budget(400 * MiB, "capped", [400 * MiB], "cpu")
    p = ls.plan_pool(choose_starter, head, members(400, 200, 200, 60), ls.SpeedFloor())   # 60 MiB: no room for a layer
    assert [m.name for m in p.pool] == ["head", "w0", "w1"]
    def shares(*mib):
        m = members(*mib)
        return ls.pool_shares(ls.fit_chosen([STARTER], ls.pool_budget(m), 2, 2048), m)
    s = shares(232, 150, 400, 400)       # the head's room rounds to no layer: it keeps one (the output layer)
    assert [x.layers for x in s] == [1, 3, 13, 14] and all(x.bytes <= x.offer for x in s)
    assert [x.name for x in shares(232, 70, 400, 400)] == ["head", "w1", "w2"]   # no room for a layer: left out
    assert shares(230, 400, 400) is None  # the head cannot hold even the output layer


def test_a_worker_that_keeps_failing_is_restarted_with_growing_waits():
    pool = ls.Pool.__new__(ls.Pool)
    pool.lost = None
    delays = []
    for _ in range(7):
        pool._once, pool.closing, pool.restart = threading.Lock(), False, lambda m, why: None
        pool._lost(ls.PoolMember("w", "10.0.0.2", 50052), "its connection ended")
        delays.append(pool.restart_delay())
    assert delays == [0, 1, 3, 7, 15, 30, 30]
    pool._once, pool.closing = threading.Lock(), True
    pool.broken = False
    pool._lost(ls.PoolMember("w", "10.0.0.2", 50052), "shutting down")   # a loss while closing is none
    assert not pool.broken


def test_a_replayed_worker_announcement_from_another_host_is_refused():
    ann = {"addrs": ["10.0.0.2"]}
    ls.check_source(ann, "10.0.0.2", "tok")
    with pytest.raises(ls.DropPacket, match="wrong_source"):
        ls.check_source(ann, "10.0.0.66", "tok")


def test_the_head_serves_alone_when_pooling_runs_no_better_model():
    head = ls.Budget(4096 * MiB, "big", [4096 * MiB], "cpu")
    p = ls.plan_pool(choose_starter, head, members(4096, 200), ls.SpeedFloor())
    assert not p.pool and "pooling would not run a better model" in p.reason
    p = ls.plan_pool(choose_starter, head, members(4096), ls.SpeedFloor())
    assert not p.pool and "no RPC worker was found" in p.reason


def test_the_planner_picks_a_bigger_model_that_only_the_pool_holds():
    # A 16 GB laptop's head and two 16 GB laptops lending 8 GB each: plan over the registry.
    def choose(budget, floor):
        return ls.plan(REGISTRY, budget, floor=floor)
    head = ls.Budget(8 * ls.GiB, "CPU only: 50% of RAM", [8 * ls.GiB], "cpu")
    alone = choose(head, ls.SpeedFloor())
    p = ls.plan_pool(choose, head, members(8192, 8192, 8192), ls.SpeedFloor())
    assert p.pool and ls.model_rank(p.variant) > ls.model_rank(alone.variant), (p.variant.id, alone.variant.id)
    assert all(m.bytes <= m.offer for m in p.pool) and all(m.layers for m in p.pool)


def test_nothing_fits_pool_or_head_is_a_clear_error():
    head = ls.Budget(100 * MiB, "tiny", [100 * MiB], "cpu")
    with pytest.raises(ls.LocalswarmError, match="cannot each hold their share"):
        ls.plan_pool(choose_starter, head, members(100, 150), ls.SpeedFloor())
    with pytest.raises(ls.LocalswarmError, match="no RPC worker was found"):
        ls.plan_pool(choose_starter, head, members(100), ls.SpeedFloor())


def test_the_speed_prediction_pays_the_network_per_step():
    speed = ls.Speed(20e9, 50e9, 100e9, 100e9, "test")
    floor = ls.SpeedFloor(speed)
    slow = ls.pool_floor(floor, members(100, 100, 100, rtt=0.010))
    assert slow.speed.step_overhead == pytest.approx(2 * ls.POOL_TRIPS_PER_WORKER * 0.010)
    assert slow.predict(STARTER, 2)["decode_tokens_per_s_per_voter"] < floor.predict(STARTER, 2)["decode_tokens_per_s_per_voter"]
    assert "network round trips" in slow.speed.source


def test_a_budget_cap_lowers_the_budget_and_says_so():
    hw = ls.HardwareProfile.from_json({"os": "Linux", "arch": "x86_64", "cpu_model": "x", "cpu_cores": 2,
                                       "cpu_threads": 2, "cpu_flags": [], "ram_total_bytes": 16 * ls.GiB,
                                       "ram_available_bytes": 16 * ls.GiB})
    b = ls.memory_budget(hw, None, 300 * MiB)
    assert b.bytes == 300 * MiB and "capped at 300.0 MiB (hardware.budget_mib)" in b.rule
    assert ls.memory_budget(hw, None, 64 * ls.GiB).bytes == 8 * ls.GiB          # a cap above changes nothing


def test_a_workers_announcement_is_not_a_voting_peer():
    c = ls.load_config(env={}, read_file=False)
    c.set("network.broadcast_addresses", ["127.255.255.255"])
    f = ls.Federation(c, ls.App(c), 8080)
    a = dict(f.announcement(), node_id="w1", instance="i", role="rpc-worker", rpc_port=50052)
    assert f.receive(ls.encode_announcement(a), "127.0.0.2") is None and not f.peers


# --- the relay on loopback -------------------------------------------------------

class Echo:
    """Stands in for ggml's RPC server behind the relay: echoes bytes back."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c = self.sock.accept()[0]
            except OSError:
                return
            threading.Thread(target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")],
                             daemon=True).start()


def test_the_relay_pipes_only_for_the_token_and_counts_refusals():
    echo = Echo()
    relay = ls.RpcRelay("tok", "127.0.0.1", 0, echo.port, lambda: {"offer_bytes": 123, "device": "CPU"})
    relay.start()
    s, payload, rtt = ls.connect_worker("127.0.0.1", relay.port, "tok", "pipe")
    s.sendall(b"hello")
    assert s.recv(5) == b"hello"
    m = ls.worker_info("127.0.0.1", relay.port, "tok")
    assert m.offer == 123 and m.device == "CPU" and m.rtt_s > 0
    with pytest.raises(ls.LocalswarmError, match="refused us: our federation token is not its token"):
        ls.connect_worker("127.0.0.1", relay.port, "wrong", "pipe")
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=10)   # a plain RPC client
    raw.sendall(b"\x00" * 64 + b"\n")
    got = b"".join(iter(lambda: raw.recv(100), b""))          # until the relay closes it
    assert got.startswith(b"localswarm-rpc/1 ") and got.endswith(b"\nNO malformed\n"), got   # never reached the RPC server
    s.close()
    st = relay.stats()
    assert st["admitted"] == 1 and st["refused"] == {"bad_token": 1, "malformed": 1}, st
    relay.stop()


def test_a_slow_or_crowded_handshake_is_refused(monkeypatch):
    monkeypatch.setattr(ls, "RPC_HANDSHAKE_TIMEOUT", 1.0)
    monkeypatch.setattr(ls, "RPC_PENDING_MAX", 2)
    relay = ls.RpcRelay("tok", "127.0.0.1", 0, Echo().port, lambda: {})
    relay.start()
    crowd = [socket.create_connection(("127.0.0.1", relay.port), timeout=5) for _ in range(3)]
    t0 = time.monotonic()
    for c in crowd:                      # a byte now and then never finishes a line in time
        c.sendall(b"a")
    got = [b"".join(iter(lambda c=c: c.recv(100), b"")) for c in crowd]
    assert time.monotonic() - t0 < 4
    assert sorted(g.split(b"\n")[-2] for g in got) == [b"NO slow_handshake", b"NO slow_handshake",
                                                        b"NO too_many_handshakes"]
    assert relay.stats()["refused"] == {"slow_handshake": 2, "too_many_handshakes": 1}
    relay.stop()


def test_a_relay_without_our_token_is_not_trusted_as_a_worker():
    echo = Echo()
    impostor = ls.RpcRelay("theirs", "127.0.0.1", 0, echo.port, lambda: {"offer_bytes": 1})
    impostor.start()
    with pytest.raises(ls.LocalswarmError, match="refused us|did not prove"):
        ls.connect_worker("127.0.0.1", impostor.port, "ours", "info")
    impostor.stop()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux keeps /proc/self/fd")
def test_a_restart_passes_on_only_the_listening_socket():
    # llama.cpp opens its sockets inheritable; the exec that restarts a head must not carry them on
    script = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import localswarm as ls\n"
        "leak, listen = os.pipe()\n"
        "os.set_inheritable(leak, True)\n"
        "ls.inherit_only(listen)\n"
        "os.execv(sys.executable, [sys.executable, '-c', "
        "'import os, sys; print(*(os.path.exists(f\"/proc/self/fd/{fd}\") for fd in sys.argv[1:]))', "
        "str(leak), str(listen)])\n")
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.split() == ["False", "True"]        # the leak is gone, the listening socket kept


def test_pooling_on_mlx_is_refused_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "localswarm.py"), "--pool", "--backend", "mlx", "--detect"],
                         env=dict(os.environ, HOME=str(tmp_path), LOCALSWARM_FEDERATION_TOKEN="t"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "not MLX" in out.stderr


def test_pooling_without_a_token_is_refused_in_one_line(tmp_path):
    for args in (["--rpc-worker"], ["--pool", "--detect"]):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "localswarm.py"), *args],
                             env=dict(os.environ, HOME=str(tmp_path), LOCALSWARM_FEDERATION_TOKEN=""),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert out.stderr.strip().splitlines() == [out.stderr.strip()]
        assert "needs a federation token" in out.stderr


# --- a head and two workers in network namespaces --------------------------------

GREEDY = {"messages": [{"role": "user", "content": "Write a Python function that reverses a string."}],
          "max_tokens": 60, "temperature": 0}


def post(hosts, i, url, body, timeout=120):
    """(status, body) of a POST from inside host i, errors included."""
    code = ("import json,sys,urllib.request as u,urllib.error as e\n"
            "r=u.Request(sys.argv[1],data=sys.argv[2].encode(),headers={'Content-Type':'application/json'})\n"
            "try:\n  x=u.urlopen(r,timeout=%d); print(x.status); print(x.read().decode())\n"
            "except e.HTTPError as h:\n  print(h.code); print(h.read().decode())\n" % timeout)
    out = subprocess.run(["ip", "netns", "exec", hosts.names[i], sys.executable, "-c", code, url, json.dumps(body)],
                         capture_output=True, text=True, timeout=timeout + 10)
    status, _, text = out.stdout.partition("\n")
    assert status.strip().isdigit(), out.stderr[-800:]
    return int(status), json.loads(text)


def health(hosts, i, url):
    try:
        return hosts.exec_json(i, url + "/health", timeout=5)
    except (OSError, ValueError):
        return {}


def wait_for(what, check, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{what} within {timeout} s")


COMMON = ["--threads", "1", "--broadcast", "10.77.0.255", "--discovery-port", "8765", "--advertise-interval", "0.5",
          "-q"]
SERVE = ["--model", "smollm2:135m:q4_1", "--voters", "2", "--ctx", "2048", "--host", "0.0.0.0", "--yes"]


@pytest.mark.skipif(not NETNS, reason="network namespaces need root and iproute2")
def test_a_head_and_two_workers_answer_as_one_machine_and_survive_a_lost_worker():
    with Hosts(3, f"p{os.getpid() % 1000}") as hosts:
        token = {"LOCALSWARM_FEDERATION_TOKEN": "pool-secret"}
        head = f"http://{hosts.addr(0)}:8080"
        # the answer of one machine alone
        single = hosts.run(0, [*SERVE, "--port", "8081", "--threads", "1", "-q"])
        wait_for("the single server starts", lambda: health(hosts, 0, f"http://{hosts.addr(0)}:8081").get("status") == "ok", 90)
        status, alone = post(hosts, 0, f"http://{hosts.addr(0)}:8081/v1/chat/completions", GREEDY)
        assert status == 200
        single.kill()

        # two workers lending 200 MiB each; a head capped at 400 MiB, which cannot hold the plan alone
        workers = [hosts.run(i, ["--rpc-worker", *COMMON], dict(token, LOCALSWARM_RPC_OFFER_MIB="200"))
                   for i in (1, 2)]
        wait_for("the workers start", lambda: all(health(hosts, i, "http://127.0.0.1:8080").get("status") == "lending"
                                                  for i in (1, 2)), 60)
        hosts.run(0, ["--pool", *SERVE, *COMMON, "--port", "8080"],
                  dict(token, LOCALSWARM_BUDGET_MIB="400", LOCALSWARM_POOL_WAIT="2"))
        h = wait_for("the pooled head starts", lambda: (lambda h: h if h.get("status") == "ok" else None)(
            health(hosts, 0, head)), 90)
        layers = [m["layers"] for m in h["pool"]["members"]]                # split across all three
        assert len(layers) == 3 and sum(layers) == STARTER.n_layers + 1 and min(layers) > 0, h["pool"]
        status, pooled = post(hosts, 0, head + "/v1/chat/completions", GREEDY)
        assert status == 200
        assert pooled["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
        # the pooled model's voters are sequences, as on one machine: two sampled answers voted on
        status, voted = post(hosts, 0, head + "/v1/chat/completions", dict(GREEDY, temperature=0.8, max_tokens=24))
        assert status == 200 and voted["x_localswarm"]["voters"] == 2, voted["x_localswarm"]
        assert all(v["tokens"] > 0 for v in voted["x_localswarm"]["per_voter"])
        h = health(hosts, 0, head)
        assert all(m["bytes_up"] > 0 and m["round_trips"] > 0 for m in h["pool"]["members"][1:]), h["pool"]
        for i in (1, 2):
            w = health(hosts, i, "http://127.0.0.1:8080")["rpc_worker"]
            assert w["admitted"] >= 1 and w["heads"] == [hosts.addr(0)], w

        # a head with the wrong token is refused by the worker's relay, and counted
        out = subprocess.run(["ip", "netns", "exec", hosts.names[2], sys.executable, os.path.join(ROOT, "localswarm.py"),
                              "--pool", "--detect", "--pool-worker", f"{hosts.addr(1)}:50052", "--model",
                              "smollm2:135m:q4_1", "--voters", "2", "--ctx", "2048"],
                             env=dict(os.environ, LOCALSWARM_FEDERATION_TOKEN="wrong", LOCALSWARM_POOL_WAIT="0",
                                      LOCALSWARM_BUDGET_MIB="100", HF_HUB_OFFLINE="1"),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "refused us: our federation token is not its token" in out.stderr, out.stderr
        assert health(hosts, 1, "http://127.0.0.1:8080")["rpc_worker"]["refused"] == {"bad_token": 1}
        assert 'localswarm_rpc_refused_total{reason="bad_token"} 1' in hosts.exec_text(1, "http://127.0.0.1:8080/metrics")
        assert "localswarm_pool_bytes_total{worker=" in hosts.exec_text(0, head + "/metrics")

        # a worker killed mid-request: a clear error, then the head restarts on what is left
        box = {}
        long = {"messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
                "max_tokens": 1500, "temperature": 0}
        t = threading.Thread(target=lambda: box.update(r=post(hosts, 0, head + "/v1/chat/completions", long)))
        t.start()
        wait_for("the request starts", lambda: health(hosts, 0, head).get("busy_voters"), 60)
        workers[1].kill()
        t.join(60)
        status, err = box["r"]
        assert status == 503 and err["error"]["code"] == "pool_worker_lost", err
        assert "RPC worker" in err["error"]["message"] and hosts.addr(2) in err["error"]["message"]
        h = wait_for("the head serves again", lambda: (lambda h: h if h.get("status") == "ok" else None)(
            health(hosts, 0, head)), 90)
        assert h["pool"]["lost"]["worker"].endswith(f"({hosts.addr(2)}:50052)"), h["pool"]
        layers = [m["layers"] for m in h["pool"]["members"]]     # the head and the worker left
        assert len(layers) == 2 and sum(layers) == STARTER.n_layers + 1 and min(layers) > 0, h["pool"]
        status, again = post(hosts, 0, head + "/v1/chat/completions", GREEDY)
        assert status == 200 and again["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]


def test_every_installer_builds_llama_cpp_with_the_rpc_backend():
    for name in ("install.sh", "install-termux.sh", "install.bat"):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        assert "-DGGML_RPC=on" in text, name
        assert "llama_supports_rpc" in text or "+rpc" in text, name      # an older build without it is rebuilt


def test_one_host_holding_idle_handshakes_cannot_lock_the_heads_out(monkeypatch):
    """16 idle connections from one address (renewed under the deadline, as an attacker would)
    take that address's few slots; a real head from another address is still served."""
    monkeypatch.setattr(ls, "RPC_HANDSHAKE_TIMEOUT", 3.0)
    relay = ls.RpcRelay("tok", "127.0.0.1", 0, Echo().port, lambda: {"offer_bytes": 7})
    relay.start()
    hogs = [socket.create_connection(("127.0.0.1", relay.port), timeout=5, source_address=("127.0.0.2", 0))
            for _ in range(ls.RPC_PENDING_MAX)]
    time.sleep(0.3)
    try:
        assert ls.worker_info("127.0.0.1", relay.port, "tok").offer == 7
        refused = relay.stats()["refused"]
        assert refused.get("too_many_handshakes") == ls.RPC_PENDING_MAX - ls.RPC_PENDING_PER_HOST, refused
    finally:
        for h in hogs:
            h.close()
        relay.stop()


def test_handshake_slots_count_an_ipv6_host_by_its_64():
    """One IPv6 host may hold a whole /64: its addresses share the per-source slots."""
    src = ls.RpcRelay._source
    assert src("2001:db8::1") == src("2001:db8::ffff:1") == "2001:db8::/64" != src("2001:db8:0:1::1")
    assert src("10.0.0.5") == "10.0.0.5" != src("10.0.0.6") and src("::ffff:10.0.0.5") == "10.0.0.5"
    assert src("fe80::1%eth0") == "fe80::/64" and src("not-an-ip") == "not-an-ip"
