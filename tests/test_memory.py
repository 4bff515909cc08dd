"""Memory: readings (/proc, cgroups, macOS), the pressure rule, the watch that cuts voters and
then refuses requests, and the report in /health, MCP and the status line."""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

import localswarm as ls
from conftest import ROOT, fixture_text

GiB, MiB = ls.GiB, ls.MiB


def test_psi_swap_and_swapusage_parse():
    psi = ls.parse_psi("some avg10=12.50 avg60=3.10 avg300=0.80 total=48172\n"
                       "full avg10=0.40 avg60=0.00 avg300=0.00 total=915\n")
    assert psi == {"some": 12.5, "full": 0.4}
    assert ls.parse_psi("") == {}
    assert ls.parse_psi(fixture_text("psi_memory_under_pressure.txt")) == {"some": 70.24, "full": 57.59}
    assert ls.parse_swap_meminfo("SwapTotal:  2097148 kB\nSwapFree:   1048572 kB\n") == 1048576 * 1024
    assert ls.parse_swap_meminfo(fixture_text("meminfo_24g.txt")) == 0
    assert ls.parse_vm_swapusage("total = 2048.00M  used = 1085.75M  free = 962.25M  (encrypted)") == int(1085.75 * MiB)
    assert ls.parse_vm_swapusage("vm.swapusage: total = 0.00M  used = 0.00M  free = 0.00M") == 0


def fake_proc(root, avail_kb, total_kb=24 * 1024 * 1024, swap_used_kb=0, some=0.0, full=0.0, cgroup="0::/\n"):
    """A /proc with the files read_memory reads, in the kernel's formats."""
    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "pressure").mkdir(exist_ok=True)
    (root / "meminfo").write_text(f"MemTotal:       {total_kb} kB\nMemFree:        {avail_kb // 2} kB\n"
                                  f"MemAvailable:   {avail_kb} kB\nSwapTotal:       4194300 kB\n"
                                  f"SwapFree:       {4194300 - swap_used_kb} kB\n")
    (root / "pressure" / "memory").write_text(f"some avg10={some:.2f} avg60=0.00 avg300=0.00 total=1\n"
                                              f"full avg10={full:.2f} avg60=0.00 avg300=0.00 total=1\n")
    (root / "self" / "cgroup").write_text(cgroup)


@pytest.fixture
def proc(tmp_path, monkeypatch):
    root = tmp_path / "proc"
    monkeypatch.setattr(ls, "PROC_ROOT", str(root))
    monkeypatch.setattr(ls, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    fake_proc(root, avail_kb=20 * 1024 * 1024)
    return root


def test_read_memory_takes_every_linux_figure(proc):
    fake_proc(proc, avail_kb=3 * 1024 * 1024, swap_used_kb=512 * 1024, some=4.2, full=1.5)
    r = ls.read_memory()
    assert (r.total_bytes, r.available_bytes, r.swap_used_bytes) == (24 * GiB, 3 * GiB, 512 * MiB)
    assert (r.psi_some_avg10, r.psi_full_avg10, r.limited_by) == (4.2, 1.5, "")


@pytest.mark.parametrize("version", [1, 2])
def test_a_cgroup_limit_tighter_than_the_machine_is_the_one_read(proc, tmp_path, version):
    cg = tmp_path / "cgroup"
    if version == 2:
        (cg / "box").mkdir(parents=True)
        (cg / "cgroup.controllers").write_text("cpu memory\n")
        (cg / "box" / "memory.max").write_text(f"{2 * GiB}\n")
        (cg / "box" / "memory.current").write_text(f"{GiB + 256 * MiB}\n")
        line = "0::/box\n"
    else:
        (cg / "memory" / "box").mkdir(parents=True)
        (cg / "memory" / "box" / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
        (cg / "memory" / "box" / "memory.usage_in_bytes").write_text(f"{GiB + 256 * MiB}\n")
        line = "5:memory:/box\n0::/\n"
    (proc / "self" / "cgroup").write_text(line)
    r = ls.read_memory()
    assert (r.total_bytes, r.available_bytes, r.limited_by) == (2 * GiB, 768 * MiB, "cgroup")
    # no limit: "max" (v2) or the page-rounded 2**63 (v1); the machine's figures stand
    limit = cg / "box" / "memory.max" if version == 2 else cg / "memory" / "box" / "memory.limit_in_bytes"
    limit.write_text("max\n" if version == 2 else "9223372036854771712\n")
    r = ls.read_memory()
    assert (r.total_bytes, r.limited_by) == (24 * GiB, "")


def test_a_container_that_sees_its_cgroup_at_the_mount_root(tmp_path):
    """/proc/self/cgroup names the host's path, which the container's mount does not have."""
    (tmp_path / "memory").mkdir()
    assert ls.cgroup_dir("4:memory:/process_api/da5c4e\n0::/\n", str(tmp_path)) == (str(tmp_path / "memory"), 1)
    assert ls.cgroup_dir("", str(tmp_path)) == ("", 0)


@pytest.mark.parametrize("reading,level", [
    (dict(available_bytes=8 * GiB), "ok"),
    (dict(available_bytes=1536 * MiB), "high"),                     # under twice the 1 GiB reserve
    (dict(available_bytes=900 * MiB), "critical"),
    (dict(available_bytes=8 * GiB, swap_used_bytes=300 * MiB), "high"),    # swap grew from 0
    (dict(available_bytes=8 * GiB, psi_some_avg10=25.0), "high"),
    (dict(available_bytes=8 * GiB, psi_full_avg10=30.0), "critical"),
    (dict(available_bytes=8 * GiB, mac_pressure_level=2), "high"),
    (dict(available_bytes=8 * GiB, mac_pressure_level=4), "critical"),
    (dict(total_bytes=0, available_bytes=0), "ok"),                 # nothing known: no verdict
])
def test_pressure_levels(reading, level):
    r = ls.MemoryReading(**dict(dict(total_bytes=16 * GiB), **reading))
    got, why = ls.memory_pressure(r, reserve=GiB, swap_floor=0, swap_growth=256 * MiB)
    assert got == level and bool(why) == (level != "ok")


class Readings:
    """A probe that returns what the test last set."""
    def __init__(self, avail):
        self.now = ls.MemoryReading(16 * GiB, avail)

    def __call__(self):
        return self.now

    def set(self, avail, **kw):
        self.now = ls.MemoryReading(16 * GiB, avail, **kw)


def test_the_watch_cuts_voters_then_refuses_and_recovers_without_flapping(caplog):
    probe = Readings(8 * GiB)
    watch = ls.MemoryWatch(reserve_bytes=GiB, probe=probe)
    assert watch.reserve == GiB and watch.voters(8) == 8
    probe.set(1536 * MiB)
    with caplog.at_level("WARNING", logger="localswarm"):
        assert watch.check(probe()) == "high"
        assert watch.voters(8) == 4 and watch.voters(1) == 1
        probe.set(512 * MiB)
        assert watch.check(probe()) == "critical"
        with pytest.raises(ls.ApiError) as exc:
            watch.voters(8)
        assert exc.value.status == 503 and exc.value.headers["Retry-After"] == "10"
        assert "memory is low" in exc.value.message and watch.refused == 1
        # one calm reading is not enough: the level falls after CALM_READINGS in a row
        probe.set(8 * GiB)
        assert [watch.check(probe()) for _ in range(ls.MemoryWatch.CALM_READINGS)] == ["critical", "critical", "ok"]
        assert watch.voters(8) == 8
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "fewer voters" in lines[0] and "refused" in lines[1] and "over" in lines[2]


def test_the_watch_asks_for_memory_back_each_time_pressure_rises_and_only_then():
    probe = Readings(8 * GiB)
    watch = ls.MemoryWatch(reserve_bytes=GiB, probe=probe)
    rises = []
    watch.on_pressure = rises.append
    for avail in (1536 * MiB, 1536 * MiB, 512 * MiB, 1536 * MiB, 512 * MiB, *[8 * GiB] * 4, 1536 * MiB):
        probe.set(avail)
        watch.check(probe())
    assert rises == ["high", "critical", "high"]       # never on a steady or falling level


def test_swap_growth_counts_from_its_lowest():
    probe = Readings(8 * GiB)
    probe.now.swap_used_bytes = 2 * GiB          # swap already in use at start is not our doing
    watch = ls.MemoryWatch(reserve_bytes=GiB, swap_growth_bytes=256 * MiB, probe=probe)
    assert watch.level == "ok"
    probe.set(8 * GiB, swap_used_bytes=GiB)      # it shrank: the floor follows it down
    watch.check(probe())
    probe.set(8 * GiB, swap_used_bytes=GiB + 300 * MiB)
    assert watch.check(probe()) == "high" and "swap grew by 300" in watch.why


def test_default_reserve_is_the_larger_of_512_mib_and_5_percent():
    assert ls.default_reserve(4 * GiB) == 512 * MiB and ls.default_reserve(64 * GiB) == int(3.2 * GiB)


def post(url, body, timeout=120):
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_a_server_under_pressure_cuts_voters_refuses_then_recovers(live_server, proc, monkeypatch):
    """The watch thread reads a simulated /proc through read_memory, as it reads the real one."""
    url, app = live_server
    watch = ls.MemoryWatch(reserve_bytes=GiB, interval=0.05)
    monkeypatch.setattr(app, "memory", watch.start())
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "voters": 4}

    def settle(avail_kb, level):
        fake_proc(proc, avail_kb=avail_kb)
        deadline = time.monotonic() + 10
        while watch.level != level and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watch.level == level

    try:
        settle(1536 * 1024, "high")
        status, _, out = post(url, body)
        assert status == 200 and out["x_localswarm"]["voters"] == 2
        assert out["x_localswarm"]["memory_pressure"].startswith("4 voters cut to 2")
        settle(512 * 1024, "critical")
        status, headers, out = post(url, body)
        assert status == 503 and headers["Retry-After"] == "10"
        assert out["error"]["code"] == "memory_pressure" and out["error"]["type"] == "unavailable_error"
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())
        assert health["memory"]["pressure"] == "critical" and health["memory"]["refused_requests"] == 1
        streamed = urllib.request.Request(url + "/v1/chat/completions", json.dumps(dict(body, stream=True)).encode(),
                                          {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(streamed, timeout=30)
        assert exc.value.code == 503          # refused before any stream header went out
        settle(20 * 1024 * 1024, "ok")
        status, _, out = post(url, body)
        assert status == 200 and out["x_localswarm"]["voters"] == 4 and "memory_pressure" not in out["x_localswarm"]
    finally:
        watch.stop()


def test_health_mcp_and_status_line_report_memory(live_server):
    url, app = live_server
    post(url, {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "voters": 2})
    mem = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())["memory"]
    eng = app.swarm.engine
    assert mem["weights_bytes"] > 50 * MiB and mem["process_rss_bytes"] > mem["weights_bytes"] // 2
    assert mem["kv_allocated_bytes"] == eng.llm.n_ctx * eng.llm.kv_bytes_per_token()
    assert 0 <= mem["kv_used_bytes"] <= mem["kv_allocated_bytes"] and len(mem["kv_voter_bytes"]) >= 4
    assert mem["available_bytes"] > 0 and mem["total_bytes"] >= mem["available_bytes"]
    assert mem["swap_used_bytes"] >= 0 and mem["pressure"] in ("ok", "high", "critical")
    mcp = ls.McpServer(app, registry=[], budget=ls.memory_budget(ls.detect_hardware()))
    status = json.loads(mcp.tool_get_swarm_status({}, None))
    assert status["memory"]["weights_bytes"] == mem["weights_bytes"] and status["status"] == "ok"
    workers = json.loads(mcp.tool_get_worker_details({}, None))["voters"]
    assert {"avg_latency", "avg_tokens_per_s", "kv_bytes", "healthy"} <= set(workers[0])
    assert workers[0]["avg_latency"] > 0
    line = ls.status_line(app)
    assert "memory: process" in line and "avg latency" in line and "available" in line


def test_kv_cells_are_counted_while_voters_decode(engine):
    """During a long answer the voters' own cells and the prompt's show in engine.memory()."""
    seen = []
    params = ls.SamplingParams(temperature=0.8, max_tokens=64, seed=3)
    prompt = engine.tokenize("Write a long story about a fox.")
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(engine.memory())
            time.sleep(0.01)
    t = threading.Thread(target=watch)
    t.start()
    try:
        engine.generate(prompt, params, voters=3)
    finally:
        done.set()
        t.join()
    busy = [m for m in seen if sum(m["kv_voter_bytes"][:3]) > 0]
    assert busy, "no reading caught the voters decoding"
    per_cell = engine.llm.kv_bytes_per_token()
    assert all(m["kv_prompt_bytes"] in (0, len(prompt) * per_cell) or m["kv_prompt_bytes"] % per_cell == 0 for m in busy)
    assert max(m["kv_voter_bytes"][0] for m in busy) <= 64 * per_cell


CGROUP_V1 = "/sys/fs/cgroup/memory"
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import localswarm as ls
watch = ls.MemoryWatch(reserve_bytes=256 * ls.MiB, probe=ls.read_memory)
out = [(watch.reading.total_bytes, watch.reading.limited_by, watch.level)]
hog = bytearray(800 * ls.MiB)          # touched pages: resident in the cgroup
for i in range(0, len(hog), 4096):
    hog[i] = 1
out.append((watch.reading.total_bytes, watch.reading.limited_by, watch.check(ls.read_memory())))
del hog
out.append([watch.check(ls.read_memory()) for _ in range(ls.MemoryWatch.CALM_READINGS)])
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux's")
def test_a_real_cgroup_limit_drives_the_watch(tmp_path):
    """A child process in a 1 GiB memory cgroup (made here, as root) fills 800 MiB: the watch,
    reading the real /proc and /sys/fs/cgroup, goes critical, then back to ok when it frees it."""
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    base = "/sys/fs/cgroup" if v2 else CGROUP_V1
    assert os.access(base, os.W_OK), f"{base} is not writable: run the tests as root"
    box = os.path.join(base, f"localswarm-test-{os.getpid()}")
    os.mkdir(box)
    try:
        with open(os.path.join(box, "memory.max" if v2 else "memory.limit_in_bytes"), "w") as f:
            f.write(str(GiB))
        script = f"echo $$ > {box}/cgroup.procs && exec {sys.executable} -c '{CHILD}' {ROOT}"
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        start, filled, calm = json.loads(out.stdout)
        assert start == [GiB, "cgroup", "ok"]
        assert filled == [GiB, "cgroup", "critical"]
        assert calm[-1] == "ok"
    finally:
        time.sleep(0.2)
        os.rmdir(box)


def test_the_server_has_the_engine_shed_memory_when_pressure_rises(live_server, monkeypatch):
    url, app = live_server
    called = []
    monkeypatch.setattr(app.swarm.engine, "shed_memory", lambda: called.append(True))
    assert app.memory is not None
    app.memory.on_pressure("high")
    assert called == [True]


def test_memory_a_burst_freed_goes_back_to_the_os():
    """glibc would raise its mmap threshold after the first big block freed and keep later big
    request bodies in its arenas once freed; pinned, and trimmed when idle, they go back. Run in
    a child so that pytest's own heap does not blur the numbers."""
    child = textwrap.dedent("""
        import sys; sys.path.insert(0, sys.argv[1])
        import localswarm as ls
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 // 2 ** 20
        pinned = ls.pin_malloc_threshold()
        base = rss()
        for _ in range(3):                     # bodies of a few MiB, parsed, then dropped
            bodies = [bytearray(6 * 2 ** 20) for _ in range(12)]
            del bodies
        cycles = []
        for _ in range(2000):                  # garbage that only a full collection frees
            a = {"pad": bytearray(16384)}
            a["self"] = a
            cycles.append(a)
        del cycles, a
        ls.release_memory()
        print(pinned, base, rss())
    """)
    out = subprocess.run([sys.executable, "-c", child, ROOT], capture_output=True, text=True, timeout=120)
    pinned, base, after = out.stdout.split()
    assert pinned == "True", out.stderr             # Linux with glibc, as CI runs
    assert int(after) < int(base) + 20, out.stdout
