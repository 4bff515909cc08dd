#!/usr/bin/env python3
"""API overhead benchmark: HTTP + JSON + SSE cost over the engine's own time, one-voter streaming
speed against raw llama_cpp, and time to first byte of a streamed request. Not a test; results go
to BENCHMARKS.md.   python tests/bench_api.py [--model FILE.gguf] [--requests 40]
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import localswarm as ls  # noqa: E402


def start(model, voters=1):
    cfg = ls.load_config(env={}, read_file=False)
    cfg.set("swarm.stream_mode", "fastest")
    eng = ls.LlamaCppEngine(model, voters, 2048, parallel=1)
    app = ls.App(cfg, ls.Swarm(eng))
    srv = ls.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, eng, f"http://127.0.0.1:{srv.server_address[1]}"


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def overhead(url, n):
    """Client wall time minus the swarm's own latency, for tiny requests."""
    out = []
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": 1}
    post(url + "/v1/chat/completions", body).read()
    for _ in range(n):
        t = time.perf_counter()
        with post(url + "/v1/chat/completions", body) as r:
            d = json.loads(r.read())
        out.append(time.perf_counter() - t - d["x_localswarm"]["latency_s"])
    return statistics.median(out) * 1000, statistics.quantiles(out, n=10)[-1] * 1000


def streaming(url, tokens):
    """Tokens/s of a one-voter streamed answer (fastest mode streams tokens live) and time to first byte."""
    body = {"messages": [{"role": "user", "content": ls.BENCH_PROMPT}], "max_tokens": tokens, "stream": True,
            "seed": 3}
    t = time.perf_counter()
    first_byte = first_token = None
    pieces = 0
    with post(url + "/v1/chat/completions", body) as r:
        for line in r:
            now = time.perf_counter()
            if first_byte is None:
                first_byte = now - t
            if line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                pieces += 1
                first_token = first_token or now
            last = now
    return first_byte * 1000, pieces, (pieces - 1) / (last - first_token)


def raw_speed(model, tokens):
    L = ls.require("llama_cpp")
    llm = L.Llama(model_path=model, n_ctx=2048, n_threads=os.cpu_count(), n_batch=ls.N_BATCH, verbose=False)
    text = ls.ChatFormatter(None).render([{"role": "user", "content": ls.BENCH_PROMPT}])
    first = last = None
    n = 0
    for _ in llm.create_completion(text, max_tokens=tokens, stream=True, seed=3):
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
    return (n - 1) / (last - first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the cached ~1B benchmark model")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model = args.model or ls.bench_model_path("~/.localswarm/models")
    srv, eng, url = start(model)
    try:
        p50, p90 = overhead(url, args.requests)
        ttfb, pieces, tps = streaming(url, args.tokens)
    finally:
        srv.shutdown()
        eng.close()
    raw = raw_speed(model, args.tokens)
    print(json.dumps({"model": model, "overhead_ms_p50": round(p50, 2), "overhead_ms_p90": round(p90, 2),
                      "ttfb_ms": round(ttfb, 1), "stream_pieces": pieces, "stream_tokens_per_s": round(tps, 2),
                      "raw_tokens_per_s": round(raw, 2), "stream_vs_raw": round(tps / raw, 3)}))


if __name__ == "__main__":
    main()
