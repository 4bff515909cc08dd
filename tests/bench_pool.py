#!/usr/bin/env python3
"""Pooling over llama.cpp's RPC backend: 1, 2 and 3 test hosts in network namespaces (root),
joined by veth links, serving the ~1B random-weight bench model (or --model-path) with its
layers split across them. Measures time to first token, decode tokens/s, and per decode step
the RPC round trips and bytes each worker link carries; checks that greedy output is the same
on every pool size. Not a test; results go to BENCHMARKS.md ("Pooling").

  sudo python tests/bench_pool.py [--model-path FILE.gguf] [--tokens 64] [--runs 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import localswarm as ls  # noqa: E402
from test_federation import Hosts  # noqa: E402
from test_pool import health, wait_for  # noqa: E402

PROMPT = ("You are reviewing a pull request. Explain, step by step, what the following Python "
          "function does and how to make it faster:\n\ndef f(xs):\n    out = []\n    for x in xs:\n"
          "        if x not in out:\n            out.append(x)\n    return out\n")
TOKEN = {"LOCALSWARM_FEDERATION_TOKEN": "bench-secret"}
COMMON = ["--threads", "2", "--broadcast", "10.77.0.255", "--discovery-port", "8765",
          "--advertise-interval", "0.5", "-q"]

STREAM = """
import json, sys, time, urllib.request as u
body = json.loads(sys.argv[2])
r = u.Request(sys.argv[1], data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
t0 = time.perf_counter(); first = None; text = ""; usage = None
with u.urlopen(r, timeout=600) as resp:
    for line in resp:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        d = json.loads(line[6:])
        for c in d.get("choices", []):
            piece = (c.get("delta") or {}).get("content")
            if piece:
                first = first or time.perf_counter()
                text += piece
        usage = d.get("usage") or usage
print(json.dumps({"ttft": first - t0, "total": time.perf_counter() - t0, "text": text, "usage": usage}))
"""


def ask(hosts, url, tokens, n=0):
    # a different first line for each n: the prompt is read anew (no prompt-cache hit) for TTFT
    body = {"messages": [{"role": "user", "content": f"Review #{n}.\n{PROMPT}"}], "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "voters": 1}
    out = subprocess.run(["ip", "netns", "exec", hosts.names[0], sys.executable, "-c", STREAM,
                          url + "/v1/chat/completions", json.dumps(body)], capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout)


def ping(hosts, i):
    """The veth link's own round trip from the head to host i (ms, average of 5)."""
    out = subprocess.run(["ip", "netns", "exec", hosts.names[0], "ping", "-c", "5", "-i", "0.2", "-q",
                          hosts.addr(i)], capture_output=True, text=True, timeout=30).stdout
    return float(out.rsplit("=", 1)[1].split("/")[1]) if "=" in out else None


def run_size(n, model, need_mib, args):
    """n hosts: the head alone (n=1) or with n-1 workers; budgets so that each holds a share."""
    with Hosts(n, f"b{n}") as hosts:
        head = f"http://{hosts.addr(0)}:8080"
        serve = ["--model-path", model, "--voters", "1", "--ctx", "2048", "--host", "0.0.0.0", "--yes",
                 "--port", "8080", *COMMON]
        env = dict(TOKEN)
        if n > 1:
            share = need_mib // n + 128     # a compute buffer and slack for whole layers
            for i in range(1, n):
                hosts.run(i, ["--rpc-worker", *COMMON], dict(TOKEN, LOCALSWARM_RPC_OFFER_MIB=str(share)))
            wait_for("the workers start", lambda: all(
                health(hosts, i, "http://127.0.0.1:8080").get("status") == "lending" for i in range(1, n)), 300)
            # the head's budget: its fixed costs and about one share of the layers, so that the
            # plan cannot fit it alone
            env.update(LOCALSWARM_BUDGET_MIB=str(need_mib - (n - 1) * (need_mib // n)), LOCALSWARM_POOL_WAIT="2")
            serve = ["--pool", *serve]
        t0 = time.monotonic()
        hosts.run(0, serve, env)
        h = wait_for("the head starts", lambda: (lambda h: h if h.get("status") == "ok" else None)(
            health(hosts, 0, head)), 300)
        load_s = time.monotonic() - t0
        pool = h.get("pool", {}).get("members", [])
        ask(hosts, head, 8, -1)                                 # warm up
        rows = []
        for run in range(args.runs):
            r = ask(hosts, head, args.tokens, run)              # a new prompt: TTFT, decode speed
            before = health(hosts, 0, head).get("pool", {}).get("members", [])
            again = ask(hosts, head, args.tokens, run)          # the same prompt, cached: the traffic of decoding
            after = health(hosts, 0, head).get("pool", {}).get("members", [])
            steps = again["usage"]["completion_tokens"]
            links = [{"round_trips": (a["round_trips"] - b["round_trips"]) / steps,
                      "bytes_up": (a["bytes_up"] - b["bytes_up"]) / steps,
                      "bytes_down": (a["bytes_down"] - b["bytes_down"]) / steps}
                     for a, b in zip(after[1:], before[1:])]
            rows.append({"ttft": r["ttft"], "decode_tps": (steps - 1) / (r["total"] - r["ttft"]),
                         "steps": steps, "text": r["text"], "links": links})
        return {"hosts": n, "load_s": load_s, "layers": [m["layers"] for m in pool] or None,
                "ping_ms": [ping(hosts, i) for i in range(1, n)],
                "prompt_tokens": r["usage"]["prompt_tokens"],
                "rtt_ms": [round(1000 * m["rtt_s"], 3) for m in pool[1:]],
                "ttft_s": statistics.median(x["ttft"] for x in rows),
                "decode_tps": statistics.median(x["decode_tps"] for x in rows),
                "per_step": [{k: statistics.median(x["links"][j][k] for x in rows) for k in rows[0]["links"][j]}
                             for j in range(len(rows[0]["links"]))],
                "text": rows[0]["text"], "same_text_each_run": len({x["text"] for x in rows}) == 1}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hosts", default="1,2,3")
    args = ap.parse_args()
    model = args.model_path or ls.bench_model_path("~/.localswarm/models")
    v = ls.variant_from_gguf(model)
    need_mib = ls.estimate_memory(v, 2048, 1)["total"] // ls.MiB + 1
    results = [run_size(int(n), model, need_mib, args) for n in args.hosts.split(",")]
    base = results[0]
    for r in results:
        r["same_as_one_host"] = r["text"] == base["text"]
        r["decode_vs_one_host"] = round(r["decode_tps"] / base["decode_tps"], 3)
        r["ttft_vs_one_host"] = round(r["ttft_s"] / base["ttft_s"], 3)
    print(json.dumps({"model": os.path.basename(model), "n_layers": v.n_layers, "need_mib": need_mib,
                      "machine": ls.describe_machine() if hasattr(ls, "describe_machine") else os.uname().nodename,
                      "results": [{k: x for k, x in r.items() if k != "text"} for r in results]}, indent=2))


if __name__ == "__main__":
    main()
