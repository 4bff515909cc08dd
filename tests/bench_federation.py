#!/usr/bin/env python3
"""Federation at scale: 8 test hosts in network namespaces (root), one node each on the starter
model. Measures discovery time (first node to see all 7 peers) and the latency a federated request
adds over the same node answering alone. Not a test; results go to BENCHMARKS.md.

  sudo python tests/bench_federation.py [--hosts 8] [--requests 5]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_federation import CHAT, Hosts, ns_node_args  # noqa: E402


def wait_health(hosts, i, timeout=180):
    t0 = time.monotonic()
    while True:
        try:
            return hosts.exec_json(i, f"http://{hosts.addr(i)}:8080/health", timeout=5)
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.5)


def latencies(hosts, n):
    out = []
    for k in range(n):
        t = time.monotonic()
        r = hosts.exec_json(0, f"http://{hosts.addr(0)}:8080/v1/chat/completions", dict(CHAT, max_tokens=16, seed=k))
        out.append((time.monotonic() - t, sum(1 for n in r["x_localswarm"].get("nodes", [{}]) if not n.get("skipped"))))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--requests", type=int, default=5)
    args = ap.parse_args()
    with Hosts(args.hosts, "bench") as hosts:
        procs = [hosts.run(0, ns_node_args(interval="2"))]
        wait_health(hosts, 0)
        solo = latencies(hosts, args.requests)
        t0 = time.monotonic()
        procs += [hosts.run(i, ns_node_args(interval="2")) for i in range(1, args.hosts)]
        while hosts.exec_json(0, f"http://{hosts.addr(0)}:8080/health")["peers"] < args.hosts - 1:
            if time.monotonic() - t0 > 120:
                break
            time.sleep(0.1)
        discovery = time.monotonic() - t0       # from launch: includes each node loading its model
        for i in range(1, args.hosts):
            wait_health(hosts, i)
        fed = latencies(hosts, args.requests)
        for p in procs:
            p.kill()
    s, f = statistics.median(x for x, _ in solo), statistics.median(x for x, _ in fed)
    print(json.dumps({"hosts": args.hosts, "discovery_s_from_launch": round(discovery, 2),
                      "solo_p50_s": round(s, 3), "federated_p50_s": round(f, 3), "added_s": round(f - s, 3),
                      "nodes_voting": [n for _, n in fed]}))


if __name__ == "__main__":
    main()
