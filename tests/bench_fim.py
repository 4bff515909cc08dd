#!/usr/bin/env python3
"""Fill in the middle beside llama-server's /infill (issue 31), on one GGUF with FIM tokens, each
server alone on the machine in turn:
  1. cold: a ~1,500-token prefix (llama.vscode's shape: the lines above in input_prefix, the
     cursor's line in prompt), 32 tokens asked, streamed: TTFT and total, client-side;
  2. one more typed character: the same, and how much of the prompt came from the cache;
  3. bursts of keystrokes (one character every --intervals s), each request closing the last
     one's connection as the editor plugins do: how many were answered, per second, and how long
     the last keystroke waited for its answer.
Greedy (temperature 0) so that both write the same kind of text. Not a test; results go to
BENCHMARKS.md.

    python tests/bench_fim.py --llama-server BIN [--model FIM.gguf | --bench-model] [--threads 2]
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import localswarm as ls  # noqa: E402
from benchlib import free_port, wait_up  # noqa: E402

CODE = "".join(f"def handler_{i}(request):\n    value = request.get('field_{i}')\n    return value * {i}\n\n"
               for i in range(58))


def body(line: str, n_predict: int = 32) -> dict:
    """llama.vscode's /infill body (src/llama-server.ts), greedy."""
    return {"input_prefix": CODE, "input_suffix": "\n\nprint(handler_0({}))\n", "input_extra": [],
            "prompt": line, "n_predict": n_predict, "top_k": 40, "top_p": 0.99, "temperature": 0,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "stream": True,
            "t_max_predict_ms": 0}


class Stream:
    """One streamed /infill request: connect, send; read() to the end (TTFT and total, from send)."""

    def __init__(self, port: int, b: dict):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.t0 = time.perf_counter()
        self.conn.request("POST", "/infill", json.dumps(b), {"Content-Type": "application/json"})

    def read(self) -> dict:
        r = self.conn.getresponse()
        ttft, last = None, {}
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev.get("content") and ttft is None:
                ttft = time.perf_counter() - self.t0
            last = ev
        total = time.perf_counter() - self.t0
        self.conn.close()
        return {"ttft": ttft if ttft is not None else total, "total": total, "final": last}

    def hang_up(self) -> None:
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


def cached_share(final: dict) -> tuple:
    """(prompt tokens, of which cached) from the final event: ours in x_localswarm, llama-server's
    as tokens_evaluated less timings.prompt_n (the tokens it decoded)."""
    n = final.get("tokens_evaluated", 0)
    if "x_localswarm" in final:
        return n, final["x_localswarm"]["prompt_tokens_cached"]
    return n, n - final.get("timings", {}).get("prompt_n", n)


def burst(port: int, keystrokes: int, interval: float) -> dict:
    """Type `keystrokes` characters, one per interval; each request hangs up the one before if it
    is still running (llama.vim's jobstop; the server should stop its work)."""
    line, live, answered = "def handler_new(request):\n    ", None, 0
    t0 = time.perf_counter()
    for i in range(keystrokes):
        line += "abcdefghijklmnopqrstuvwxyz"[i % 26]
        if live is not None:
            live.conn.sock.settimeout(0.001)
            try:
                live.read()         # finished already: counted
                answered += 1
            except (socket.timeout, OSError, http.client.HTTPException, ValueError):
                live.hang_up()
        live = Stream(port, body(line, 16))
        time.sleep(interval)
    live.conn.sock.settimeout(600)
    last_key = time.perf_counter() - interval
    res = live.read()
    answered += 1
    span = time.perf_counter() - t0
    return {"interval_s": interval, "keystrokes": keystrokes, "answered": answered, "span_s": round(span, 2),
            "answered_per_s": round(answered / span, 2), "last_wait_s": round(time.perf_counter() - last_key, 3),
            "last_tokens": res["final"].get("tokens_predicted")}


def scenario(name: str, port: int, args) -> dict:
    line = "def handler_x(request):\n    val"
    cold = Stream(port, body(line)).read()
    typed = Stream(port, body(line + "u")).read()
    n, cached = cached_share(typed["final"])
    warm = [Stream(port, body(line + "u" + c)).read() for c in "e_s"]    # three more, for a steadier figure
    out = {"server": name, "cold_ttft_s": round(cold["ttft"], 3), "cold_total_s": round(cold["total"], 3),
           "cold_tokens": cold["final"].get("tokens_predicted"), "prompt_tokens": n,
           "typed_ttft_s": round(typed["ttft"], 3), "typed_total_s": round(typed["total"], 3),
           "typed_cached": cached, "typed_cached_share": round(cached / n, 4) if n else None,
           "next_ttft_median_s": round(statistics.median(w["ttft"] for w in warm), 3),
           "next_total_median_s": round(statistics.median(w["total"] for w in warm), 3)}
    out["bursts"] = [burst(port, args.keystrokes, float(i)) for i in args.intervals.split(",")]
    return out


def start_localswarm(args, home):
    port = free_port()
    log = open(os.path.join(home, "localswarm.log"), "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "localswarm.py"), "--model-path", args.model,
                             "--ctx", "8192", "--threads", str(args.threads), "--host", "127.0.0.1",
                             "--port", str(port), "--yes", "-q"],
                            env=dict(os.environ, HOME=home), stdout=log, stderr=subprocess.STDOUT, cwd=home)
    wait_up(f"http://127.0.0.1:{port}/health", proc)
    return proc, port


def start_llama_server(args, home):
    port = free_port()
    log = open(os.path.join(home, "llama-server.log"), "w")
    proc = subprocess.Popen([args.llama_server, "-m", args.model, "-c", "8192", "-t", str(args.threads),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=home)
    wait_up(f"http://127.0.0.1:{port}/health", proc)
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", help="a GGUF with FIM tokens (default: the starter model with FIM tokens added)")
    ap.add_argument("--bench-model", action="store_true", help="the ~1B random-weight model with FIM tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keystrokes", type=int, default=20)
    ap.add_argument("--intervals", default="0.15,0.05", help="seconds between keystrokes, one burst each")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="bench-fim-")
    if not args.model:
        args.model = os.path.join(home, "fim.gguf")
        if args.bench_model:
            ls.make_bench_model(args.model, ls.starter_model_path(), fim=True)
        else:
            ls.make_fim_model(args.model, ls.starter_model_path())
    rows = []
    for name, start in (("localswarm", start_localswarm), ("llama-server", start_llama_server)):
        proc, port = start(args, os.path.join(home, name) if os.makedirs(os.path.join(home, name)) is None else "")
        try:
            rows.append(scenario(name, port, args))
        finally:
            proc.terminate()
            proc.wait(60)
        print(json.dumps(rows[-1]), flush=True)
    ours, theirs = rows
    print(json.dumps({"typed_ttft_ratio": round(ours["typed_ttft_s"] / theirs["typed_ttft_s"], 2),
                      "cold_ttft_ratio": round(ours["cold_ttft_s"] / theirs["cold_ttft_s"], 2),
                      "next_ttft_ratio": round(ours["next_ttft_median_s"] / theirs["next_ttft_median_s"], 2)}))


if __name__ == "__main__":
    main()
