#!/usr/bin/env python3
"""N answers to one prompt, localswarm beside llama-server (issue 33's baseline): the ~1B bench
model (or --model), 48 tokens at temperature 0.8, one answer (localswarm "voters": 1, llama-server
"n": 1) and four (voters 4 / n 4), over HTTP, each server alone on the machine in turn, the
prompt cached after the first request. Median of --repeats wall times. Not a test; results go
to BENCHMARKS.md.
    python tests/bench_vs_llama_server.py --llama-server BIN [--model FILE.gguf] [--repeats 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import localswarm as ls  # noqa: E402
from benchlib import free_port, post_json, wait_up  # noqa: E402


def body(server, n, seed):
    b = {"model": "m", "max_tokens": 48, "temperature": 0.8, "ignore_eos": True,
         "messages": [{"role": "user", "content": ls.BENCH_PROMPT}]}
    return dict(b, voters=n, early_stop=False) if server == "localswarm" else dict(b, n=n)


def tokens(server, out):
    if server == "localswarm":
        return [v["tokens"] for v in out["x_localswarm"]["per_voter"]]
    return [out["usage"]["completion_tokens"]]


def measure(server, port, repeats):
    post_json(port, "/v1/chat/completions", body(server, 1, 1))            # the prompt, cached
    rows = {}
    for n in (1, 4):
        times, toks = [], []
        for r in range(repeats):
            t, out = post_json(port, "/v1/chat/completions", body(server, n, 10 + r))
            times.append(t)
            toks.append(tokens(server, out))
        rows[n] = {"median_s": round(statistics.median(times), 3), "tokens": toks[-1]}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = args.model or ls.bench_model_path("~/.localswarm/models")
    home = tempfile.mkdtemp(prefix="bench-vs-")
    out = {}
    for server in ("localswarm", "llama-server"):
        port = free_port()
        log = open(os.path.join(home, server + ".log"), "w")
        if server == "localswarm":
            cmd = [sys.executable, os.path.join(ROOT, "localswarm.py"), "--model-path", model, "--voters", "4",
                   "--ctx", "2048", "--threads", str(args.threads), "--host", "127.0.0.1", "--port", str(port),
                   "--yes", "-q"]
        else:
            cmd = [args.llama_server, "-m", model, "-c", "8192", "-np", "4", "-t", str(args.threads),
                   "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=home,
                                env=dict(os.environ, HOME=home) if server == "localswarm" else None)
        try:
            wait_up(f"http://127.0.0.1:{port}/health", proc)
            out[server] = measure(server, port, args.repeats)
        finally:
            proc.terminate()
            proc.wait(60)
        print(server, json.dumps(out[server]), flush=True)
    for n in (1, 4):
        print(f"n={n}: localswarm {out['localswarm'][n]['median_s']} s, llama-server {out['llama-server'][n]['median_s']} s,"
              f" ratio {out['localswarm'][n]['median_s'] / out['llama-server'][n]['median_s']:.3f}")


if __name__ == "__main__":
    main()
