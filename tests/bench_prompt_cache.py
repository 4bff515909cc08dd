#!/usr/bin/env python3
"""Replay a real opencode session (tests/fixtures/opencode_session.json, captured from opencode
1.18.33 by tests/capture_opencode_session.py) against a server and report, per request, the
prompt tokens, how many were reused from a cache, how many were decoded, and the time to first
token. Not a test; results go to BENCHMARKS.md.

Session 1 (title, main, tool follow-up, next turn, its follow-up) runs in one server process;
session 2 (title, main, follow-up) in a new process with the same cache directory (a restart);
then both sessions interleaved in a third process with a fresh cache (two conversations at once,
each opening with its title request).

    python tests/bench_prompt_cache.py [--localswarm FILE.py ...] [--llama-server BIN]

Each --localswarm is a version of localswarm.py to measure (e.g. the one before the multi-entry
prompt cache, from `git show REV:localswarm.py`); llama-server gets the very prompt text
localswarm renders (through /v1/completions), so both decode the same tokens.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import localswarm as ls  # noqa: E402
from benchlib import free_port, wait_up

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "opencode_session.json")


def post(url: str, body: dict, timeout: float = 1800) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Localswarm:
    def __init__(self, script: str, label: str, model: str, args):
        self.script, self.label, self.model, self.args = script, label, model, args

    def start(self, home: str):
        self.port = free_port()
        env = dict(os.environ, HOME=home)
        self.proc = subprocess.Popen(
            [sys.executable, self.script, "--model-path", self.model, "--voters", str(self.args.voters),
             "--ctx", str(self.args.ctx), "--parallel", "1", "--threads", str(self.args.threads),
             "--port", str(self.port), "--yes", "-q"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=home)
        wait_up(f"http://127.0.0.1:{self.port}/health", self.proc)

    def ask(self, body: dict, text: str) -> dict:
        body = dict(body, stream=False, max_tokens=self.args.max_tokens, model="localswarm")
        body.pop("stream_options", None)
        t0 = time.monotonic()
        out = post(f"http://127.0.0.1:{self.port}/v1/chat/completions", body)
        wall = time.monotonic() - t0
        usage, x = out["usage"], out["x_localswarm"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", x.get("prompt_tokens_cached", 0))
        return {"prompt": usage["prompt_tokens"], "reused": cached, "ttft": min(v["ttft_s"] for v in x["per_voter"]),
                "wall": wall}

    def stop(self) -> float:
        rss = peak_rss_mib(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(60)
        return rss


class LlamaServer:
    def __init__(self, binary: str, model: str, args, formatter):
        self.binary, self.model, self.args, self.fmt = binary, model, args, formatter
        self.label = "llama-server --cache-ram"

    def start(self, home: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [self.binary, "-m", self.model, "-c", str(self.args.ctx), "-t", str(self.args.threads),
             "--host", "127.0.0.1", "--port", str(self.port), "--cache-ram", "2048", "-np", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=home)
        wait_up(f"http://127.0.0.1:{self.port}/health", self.proc)

    def ask(self, body: dict, text: str) -> dict:
        t0 = time.monotonic()
        out = post(f"http://127.0.0.1:{self.port}/completion",
                   {"prompt": text, "n_predict": self.args.max_tokens, "cache_prompt": True})
        wall = time.monotonic() - t0
        t = out["timings"]
        return {"prompt": t["prompt_n"] + t.get("cache_n", 0), "reused": t.get("cache_n", 0),
                "ttft": t["prompt_ms"] / 1000, "wall": wall}

    stop = Localswarm.stop


def phases(reqs: list) -> list:
    """(phase name, fresh cache?, [(label, body)]) in the order they are replayed."""
    s1 = [(f"s1 {r['kind']}", r["body"]) for r in reqs if r["session"] == 1]
    s2 = [(f"s2 {r['kind']}", r["body"]) for r in reqs if r["session"] == 2]
    # two sessions at once, each opening with its title request: A1 A2 B1 B2 A3 B3 A4 A5
    mixed = [s1[0], s1[1], s2[0], s2[1], s1[2], s2[2]] + s1[3:]
    return [("session 1", True, s1), ("session 2 (restart)", False, s2), ("interleaved A/B", True, mixed)]


def run(server, reqs: list, render) -> list:
    rows = []
    home = tempfile.mkdtemp(prefix="bench-cache-")
    try:
        for phase, fresh, items in phases(reqs):
            if fresh:
                shutil.rmtree(os.path.join(home, ".localswarm"), ignore_errors=True)
            server.start(home)
            for label, body in items:
                r = server.ask(body, render(body))
                r.update(system=server.label, phase=phase, request=label)
                rows.append(r)
                print(f"{server.label:28} {phase:20} {label:18} prompt {r['prompt']:5} reused {r['reused']:5} "
                      f"ttft {r['ttft']:7.2f}s wall {r['wall']:7.2f}s", flush=True)
            rss = server.stop()
            rows.append({"system": server.label, "phase": phase, "request": "peak RSS", "rss_mib": rss})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--localswarm", action="append", default=[], metavar="LABEL=FILE.py",
                    help="a localswarm.py to measure (default: this checkout's)")
    ap.add_argument("--llama-server", metavar="BIN")
    ap.add_argument("--model", default=ls.starter_model_path())
    ap.add_argument("--voters", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", metavar="FILE", help="also write the rows here")
    args = ap.parse_args()
    reqs = json.load(open(FIXTURE))["requests"]
    llm = ls.LlamaAdapter(args.model, 512, 1)
    fmt = ls.ChatFormatter(llm.chat_template(), "chatml", llm.special_text("bos"), llm.special_text("eos"))

    def render(body: dict) -> str:
        return fmt.render(body["messages"], body.get("tools") or None)
    servers = [Localswarm(*reversed(spec.split("=", 1)), args.model, args)
               for spec in args.localswarm or [f"localswarm (this checkout)={os.path.join(ROOT, 'localswarm.py')}"]]
    if args.llama_server:
        servers.append(LlamaServer(args.llama_server, args.model, args, fmt))
    rows = []
    for s in servers:
        rows += run(s, reqs, render)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
