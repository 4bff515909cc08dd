#!/usr/bin/env python3
"""Speculative decoding on an edit workload, localswarm beside llama-server (issue 33). Three
requests on the starter model (a real model, so its answers copy what they copy): "rewrite"
asks for a 300-line file back with one change, "edit" is the opencode session fixture's edit
turn (the file read, then "Now add a docstring"), "prose" a story (nothing to copy). Each at
1, 4 and 8 answers (localswarm "voters", llama-server "n"), greedy at 1 and sampled (0.7) at
more, speculation off and on: localswarm's "speculation" field on one server, llama-server
started plain and with --spec-type ngram-simple. Median wall time of --repeats, the prompt
cached after the first request. Not a test; results go to BENCHMARKS.md.
    python tests/bench_speculation.py --llama-server BIN [--model FILE.gguf] [--repeats 2]
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

ANSWERS = (1, 4, 8)


def rewrite_request() -> dict:
    """300 lines of this project's own code, back with one change."""
    lines = open(os.path.join(ROOT, "localswarm.py")).readlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class CacheEntry"))
    code = "".join(lines[start:start + 300])
    return {"messages": [{"role": "user", "content": "Here is a Python file:\n\n```python\n" + code + "```\n\n"
                          "Rewrite the whole file with one change: rename `entry` to `item`. Output only the code."}],
            "max_tokens": 300}


def edit_request() -> dict:
    """The opencode session's edit turn, as opencode sent it (tools and all)."""
    with open(os.path.join(ROOT, "tests", "fixtures", "opencode_session.json")) as f:
        reqs = json.load(f)["requests"]
    body = next(r["body"] for r in reqs if r["body"].get("messages", [{}])[-1].get("role") == "tool"
                and any(m.get("content") == "Now add a docstring." for m in r["body"]["messages"]))
    return {"messages": body["messages"], "tools": body.get("tools"), "max_tokens": 200}


def prose_request() -> dict:
    return {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds "
                          "a message in a bottle."}], "max_tokens": 200}


WORKLOADS = {"rewrite": rewrite_request, "edit": edit_request, "prose": prose_request}


def body(server, workload, n, spec):
    b = dict(WORKLOADS[workload](), model="m", temperature=0.0 if n == 1 else 0.7, stream=False, ignore_eos=True)
    b = {k: v for k, v in b.items() if v is not None}
    if server == "localswarm":
        return dict(b, voters=n, early_stop=False, execute="off", speculation=spec)
    return dict(b, n=n)


def completion_tokens(server, out, n, max_tokens):
    """(tokens of all answers, guessed tokens taken, tokens guessed). llama-server's usage and
    timings cover one of its n answers; with ignore_eos each of them is max_tokens long."""
    if server == "localswarm":
        voters = out["x_localswarm"]["per_voter"]
        return sum(v["tokens"] for v in voters), sum(v.get("taken_tokens", 0) for v in voters), \
            sum(v.get("guessed_tokens", 0) for v in voters)
    timings = out.get("timings") or {}
    return n * max_tokens, timings.get("draft_n_accepted", 0), timings.get("draft_n", 0)


def measure(server, port, specs, repeats):
    rows = []
    for workload in WORKLOADS:
        post_json(port, "/v1/chat/completions", dict(body(server, workload, 1, specs[0]), max_tokens=1))      # its prompt, cached
        for n in ANSWERS:
            for spec in specs:
                times, last = [], None
                for _ in range(repeats):
                    t, out = post_json(port, "/v1/chat/completions", body(server, workload, n, spec))
                    times.append(t)
                    last = out
                tokens, taken, guessed = completion_tokens(server, last, n, WORKLOADS[workload]()["max_tokens"])
                wall = statistics.median(times)
                rows.append({"workload": workload, "answers": n, "speculation": spec, "wall_s": round(wall, 2),
                             "tokens": tokens, "per_answer_tok_s": round(tokens / n / wall, 1),
                             "guessed": guessed, "taken": taken,
                             "text": (last["choices"][0]["message"].get("content") or "")[:60]})
                print(server, json.dumps(rows[-1]), flush=True)
    return rows


def start(server, model, port, home, threads, spec):
    log = open(os.path.join(home, f"{server}-{spec}.log"), "w")
    if server == "localswarm":
        cmd = [sys.executable, os.path.join(ROOT, "localswarm.py"), "--model-path", model, "--voters", "8",
               "--ctx", "8192", "--threads", str(threads), "--host", "127.0.0.1", "--port", str(port), "--yes", "-q"]
        env = dict(os.environ, HOME=home)
    else:
        cmd = [server, "-m", model, "-c", str(8 * 8192), "-np", "8", "-t", str(threads), "--host", "127.0.0.1",
               "--port", str(port), "--jinja"] + (["--spec-type", "ngram-simple"] if spec == "ngram" else [])
        env = None
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=home, env=env)
    wait_up(f"http://127.0.0.1:{port}/health", proc)
    return proc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", help="default: the starter model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", help="write the rows here as JSON")
    ap.add_argument("--only", choices=("localswarm", "llama-server"), help="run one server only")
    args = ap.parse_args()
    model = args.model or ls.starter_model_path()
    home = tempfile.mkdtemp(prefix="bench-spec-")
    out = {}
    runs = [("localswarm", ("off", "ngram"))] + [(args.llama_server, (s,)) for s in ("off", "ngram")]
    runs = [r for r in runs if not args.only or (r[0] == "localswarm") == (args.only == "localswarm")]
    for server, specs in runs:
        port = free_port()
        proc = start(server, model, port, home, args.threads, specs[0])
        try:
            name = "localswarm" if server == "localswarm" else "llama-server"
            out.setdefault(name, []).extend(measure(name, port, specs, args.repeats))
        finally:
            proc.terminate()
            proc.wait(60)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    if len(out) < 2:
        return
    print("\n| workload | answers | localswarm off | localswarm ngram | speed-up | llama-server off | "
          "llama-server ngram-simple | speed-up |")
    key = lambda r: (r["workload"], r["answers"], r["speculation"])
    ls_rows = {key(r): r for r in out["localswarm"]}
    lc_rows = {key(r): r for r in out["llama-server"]}
    for workload in WORKLOADS:
        for n in ANSWERS:
            a, b = ls_rows[workload, n, "off"], ls_rows[workload, n, "ngram"]
            c, d = lc_rows[workload, n, "off"], lc_rows[workload, n, "ngram"]
            cell = lambda r: f"{r['wall_s']} s, {r['per_answer_tok_s']} tok/s"
            print(f"| {workload} | {n} | {cell(a)} | {cell(b)} ({b['taken']}/{b['guessed']}) | "
                  f"{b['per_answer_tok_s'] / a['per_answer_tok_s']:.2f}x | {cell(c)} | {cell(d)} ({d['taken']}/{d['guessed']}) | "
                  f"{d['per_answer_tok_s'] / c['per_answer_tok_s']:.2f}x |")


if __name__ == "__main__":
    main()
