#!/usr/bin/env python3
"""The planner's speed prediction against reality on this machine: calibrate (as the planner
does on first use), then run the real engine on the starter model and on the ~1B random-weight
bench model (a real-size model's speed) with 1, 4 and 8 voters, and time an 8k-token prompt.
Not a test; results go to BENCHMARKS.md.

    python tests/bench_speed_prediction.py [--threads 2] [--json FILE]
"""
import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import localswarm as ls  # noqa: E402


def measured_decode(eng, voters: int) -> float:
    """Median per-voter tokens/s of 48-token answers."""
    toks = eng.tokenize("Write a long story about a robot who learns to paint, with many details. " * 3)
    g = eng.generate(toks, ls.SamplingParams(max_tokens=48, temperature=0.8, seed=3), voters)
    return statistics.median(r.tokens_per_s for r in g.results if r.tokens_per_s)


def measured_prompt(eng, n: int) -> float:
    """Seconds to first token of an n-token prompt (one voter, nothing cached)."""
    toks = (eng.tokenize("def function_number_%d(x):\n    return x * %d\n\n" % (7, 7)) * n)[:n]
    toks = [t + (i % 50) for i, t in enumerate(toks)]           # no repeated prefix to reuse
    return eng.generate(toks, ls.SamplingParams(max_tokens=1, seed=1), 1).results[0].ttft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--voters", default="1,4,8")
    ap.add_argument("--prompt", type=int, default=ls.FIRST_PROMPT_TOKENS)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    speed = ls.calibrate_speed(ls.starter_model_path(), args.threads)
    print("calibration:", json.dumps(speed.to_json()))
    rows = []
    models = [("starter (SmolLM2-135M Q4_1)", ls.starter_model_path()),
              ("bench (~1B random weights, Q8_0)", ls.bench_model_path("~/.localswarm/models"))]
    print("| model | voters | decode tokens/s per voter: predicted | measured | ratio |")
    for label, path in models:
        v = ls.variant_from_gguf(path)
        eng = ls.LlamaCppEngine(path, voters=8, ctx=args.prompt + 256, parallel=1, n_threads=args.threads)
        try:
            for n in (int(x) for x in args.voters.split(",")):
                pred = ls.predict_speed(v, n, speed)["decode_tokens_per_s_per_voter"]
                got = measured_decode(eng, n)
                rows.append({"model": label, "voters": n, "predicted": pred, "measured": round(got, 2)})
                print(f"| {label} | {n} | {pred} | {got:.2f} | {pred / got:.2f} |", flush=True)
            pred = ls.predict_speed(v, 1, speed, args.prompt)["first_prompt_8k_s"]
            got = measured_prompt(eng, args.prompt)
            rows.append({"model": label, "prompt_tokens": args.prompt, "predicted_s": pred, "measured_s": round(got, 2)})
            print(f"| {label} | {args.prompt}-token prompt, s | {pred} | {got:.2f} | {pred / got:.2f} |", flush=True)
        finally:
            eng.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"speed": speed.to_json(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
