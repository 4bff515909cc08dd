"""Load + abuse run (issue 15): well-behaved clients while slow connections and malformed
requests hit the same server. Not a test: it prints a table for BENCHMARKS.md.

    python tests/bench_abuse.py [--clients 32] [--slow 200] [--seconds 120]

It starts localswarm on the starter model (a private HOME, loopback only) and reports: the
well-behaved requests answered (200) or refused with 503 + Retry-After (anything else is a
failure), the malformed requests' statuses (none may be 5xx), the server's peak threads and
memory, and whether its log holds a traceback."""
import argparse
import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import localswarm as ls  # noqa: E402
from benchlib import free_port

MALFORMED = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: +48\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: attacker.example\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: http://attacker.example\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
    b"GARBAGE\r\n\r\n",
]
BODIES = [
    b"[" * 100000,
    json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}, ensure_ascii=True).encode(),
    json.dumps({"messages": [{"role": "assistant", "tool_calls": [{"function": "ab"}]}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 20000] * 16}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{"function": "x"}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "word " * 6000}], "stream": True}).encode(),
]


def post(url, body: bytes, timeout=300):
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, e.headers
    except OSError as e:
        return type(e).__name__, {}


def raw(port, data: bytes) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=40) as s:
            s.sendall(data)
            head = s.recv(64)
            return head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else "closed"
    except OSError as e:
        return type(e).__name__


def slow_client(port, stop: threading.Event, held: list):
    """A connection that sends a header byte now and then and never finishes (slowloris)."""
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(1)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
            while not stop.is_set():
                s.sendall(b"X")
                time.sleep(1.0)
        except OSError:
            time.sleep(0.5)              # dropped by the server (the deadline, or the cap): come back


def proc_stats(pid: int) -> tuple:
    with open(f"/proc/{pid}/status") as f:
        st = dict(line.split(":", 1) for line in f if ":" in line)
    return int(st["Threads"].strip()), int(st["VmRSS"].split()[0]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=120)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="localswarm-abuse-")
    port = free_port()
    log = open(os.path.join(home, "server.log"), "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "localswarm.py"), "--model-path", ls.starter_model_path(),
                             "--voters", "2", "--ctx", "2048", "--threads", "1", "--port", str(port), "-y"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HOME=home))
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    stop = threading.Event()
    good, bad, held = collections.Counter(), collections.Counter(), []
    latencies, peak = [], {"threads": 0, "rss": 0}
    body = json.dumps({"messages": [{"role": "user", "content": "Write a Python function add(a, b)."}],
                       "max_tokens": 16}).encode()

    def well_behaved():
        while not stop.is_set():
            t0 = time.monotonic()
            status, headers = post(url, body)
            ok = status == 200 or (status == 503 and headers.get("Retry-After"))
            good["answered" if status == 200 else "503 + Retry-After" if ok else f"FAILED {status}"] += 1
            if status == 200:
                latencies.append(time.monotonic() - t0)
            if status == 503:
                time.sleep(float(headers.get("Retry-After") or 1))

    def abuser():
        i = 0
        while not stop.is_set():
            if i % 2:
                bad[raw(port, MALFORMED[i // 2 % len(MALFORMED)])] += 1
            else:
                bad[str(post(url, BODIES[i // 2 % len(BODIES)], timeout=60)[0])] += 1
            i += 1
            time.sleep(0.2)

    def watch():
        while not stop.is_set():
            threads, rss = proc_stats(proc.pid)
            peak["threads"], peak["rss"] = max(peak["threads"], threads), max(peak["rss"], rss)
            time.sleep(0.5)
    _, rss0 = proc_stats(proc.pid)
    workers = [threading.Thread(target=well_behaved, daemon=True) for _ in range(args.clients)]
    workers += [threading.Thread(target=slow_client, args=(port, stop, held), daemon=True) for _ in range(args.slow)]
    workers += [threading.Thread(target=abuser, daemon=True) for _ in range(2)] + [threading.Thread(target=watch, daemon=True)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    time.sleep(args.seconds)
    stop.set()
    time.sleep(3)
    threads_after, rss_after = proc_stats(proc.pid)
    healthy = post(url, body)[0]
    proc.terminate()
    proc.wait(30)
    log.seek(0)
    text = log.read()
    shutil.rmtree(home, ignore_errors=True)
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    print(f"{args.clients} clients, {args.slow} slow connections, 2 abusers, {time.monotonic() - t0:.0f} s, "
          f"starter model, 2 voters, server.max_connections 512")
    print("| what | result |\n|---|---|")
    print(f"| well-behaved requests | {dict(good)} |")
    print(f"| their latency p50 / p95 (s) | {p(0.5):.1f} / {p(0.95):.1f} |")
    print(f"| malformed requests by status | {dict(sorted(bad.items()))} |")
    print(f"| slow connections opened (the server drops them at its deadline or the cap) | {len(held)} |")
    print(f"| server threads peak / after | {peak['threads']} / {threads_after} |")
    print(f"| server RSS start / peak / after (MiB) | {rss0 / 2**20:.0f} / {peak['rss'] / 2**20:.0f} / {rss_after / 2**20:.0f} |")
    print(f"| a request after the run | {healthy} |")
    print(f"| tracebacks in the server log | {text.count('Traceback')} |")
    if "Traceback" in text:
        print(text[text.index("Traceback"):][:3000])


if __name__ == "__main__":
    main()
