#!/usr/bin/env python3
"""What each API dialect costs over chat completions (issue 29): the same prompt through
/v1/chat/completions, /v1/messages, /v1/responses and /api/chat, plain and streamed, on one
in-process server (one voter, one token, the prompt cached after the first), interleaved so that
the machine's noise falls on all alike. Prints p50 wall time per API and its difference from chat
completions (the translator's overhead), and the pure translation (parser + writer) per request.
Not a test; results go to BENCHMARKS.md.

    python tests/bench_dialects.py [--model FILE.gguf] [--requests 40]
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time
import timeit
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import localswarm as ls  # noqa: E402

SYSTEM = "You are a careful coding assistant. " * 40          # a few hundred tokens, cached after the first
QUESTION = "Write a Python function add(a, b)."
BODIES = {    # one prompt, one token, in each API's own shape
    "chat": ("/v1/chat/completions", {"max_tokens": 1, "temperature": 0, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]}),
    "anthropic": ("/v1/messages", {"max_tokens": 1, "temperature": 0, "system": SYSTEM,
                                   "messages": [{"role": "user", "content": QUESTION}]}),
    "responses": ("/v1/responses", {"max_output_tokens": 1, "temperature": 0, "instructions": SYSTEM,
                                    "input": QUESTION}),
    "ollama": ("/api/chat", {"options": {"num_predict": 1, "temperature": 0}, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]}),
}


def start(model):
    cfg = ls.load_config(env={}, read_file=False)
    app = ls.App(cfg, ls.Swarm(ls.LlamaCppEngine(model, 1, 2048, parallel=1), model_id="m"))
    srv = ls.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, app, f"http://127.0.0.1:{srv.server_address[1]}"


def once(url, path, body) -> float:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return time.perf_counter() - t0


def wall_times(url, n, stream):
    times = {k: [] for k in BODIES}
    for k, (path, body) in BODIES.items():          # warm: every prompt cached once
        once(url, path, dict(body, stream=stream))
    for _ in range(n):
        for k, (path, body) in BODIES.items():
            times[k].append(once(url, path, dict(body, stream=stream)))
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def translation_ms(app):
    """The parser and the writer alone, per request, on a real answer of the swarm."""
    swarm = app.swarm
    ans = swarm.answer(ls.parse_request(BODIES["chat"][1], True, swarm))
    req = ls.parse_request(BODIES["chat"][1], True, swarm)
    out = {"chat": lambda: (ls.parse_request(BODIES["chat"][1], True, swarm),
                            json.dumps(ls.completion_json(ans, req, True, "id")))}
    for name, dialect in (("anthropic", ls.ANTHROPIC), ("responses", ls.RESPONSES), ("ollama", ls.OLLAMA_CHAT)):
        def run(d=dialect, body=BODIES[name][1]):
            openai_body, chat, ctx = d.to_openai(body)
            r = ls.parse_request(openai_body, chat, swarm)
            return json.dumps(d.write(ans, r, ctx, "m"))
        out[name] = run
    return {k: min(timeit.repeat(f, number=200, repeat=5)) / 200 * 1000 for k, f in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=ls.starter_model_path())
    ap.add_argument("--requests", type=int, default=40)
    args = ap.parse_args()
    srv, app, url = start(args.model)
    try:
        plain, streamed = wall_times(url, args.requests, False), wall_times(url, args.requests, True)
        pure = translation_ms(app)
    finally:
        srv.shutdown()
    print(f"model {os.path.basename(args.model)}, 1 voter, 1 token, {args.requests} requests per API and mode, "
          f"prompt cached; p50 ms")
    print("| API | plain p50 | over chat | streamed p50 | over chat | parser + writer |")
    print("|---|---|---|---|---|---|")
    for k in BODIES:
        print(f"| {k} | {plain[k]:.1f} | {plain[k] - plain['chat']:+.1f} | {streamed[k]:.1f} | "
              f"{streamed[k] - streamed['chat']:+.1f} | {pure[k]:.3f} |")


if __name__ == "__main__":
    main()
