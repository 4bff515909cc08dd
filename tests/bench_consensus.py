#!/usr/bin/env python3
"""Benchmark localswarm.vote as a best-of-N selector on labelled HumanEval samples.

Runs ../shared/reference/consensus/consensus_reference.py (the reference harness: fixed random
subsets, paired bootstrap CI) with localswarm.vote as the selector, and times vote() on 8
answers of ~2,000 tokens. Not a test; results go into BENCHMARKS.md.

  python tests/bench_consensus.py [--half odd|even] [--reference DIR]
"""
import argparse, json, os, random, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import localswarm  # noqa: E402


def select(prompt, completions):
    """The selector the reference harness calls: (prompt, completions) -> index."""
    return localswarm.vote(completions, prompt=prompt).index


def select_early(prompt, completions, rule="adaptive"):
    """The vote with early decision, as the swarm runs it: voters decode in lockstep, so they
    finish in order of length; after each one, settled() may end the vote, which is then the
    vote of the finished answers. With EARLY_LOG set, appends "rule n decided_at_len max_len"
    per call (the share of decoding that waiting for every voter would have cost)."""
    order = sorted(range(len(completions)), key=lambda i: (len(completions[i]), i))
    pick, at = None, len(completions)
    for k in range(1, len(completions)):
        done = [completions[i] for i in order[:k]]
        if localswarm.settled(done, len(completions) - k, prompt=prompt, rule=rule):
            pick, at = order[localswarm.vote(done, prompt=prompt).index], k
            break
    if pick is None:
        pick = localswarm.vote(completions, prompt=prompt).index
    if os.environ.get("EARLY_LOG"):
        with open(os.environ["EARLY_LOG"], "a") as f:
            f.write(f"{rule} {len(completions)} {len(completions[order[at - 1]])} {len(completions[order[-1]])}\n")
    return pick


def select_early_strict(prompt, completions):
    return select_early(prompt, completions, "strict")


def cost_benchmark(repeats=5):
    """Median seconds of vote() over 8 different ~2,000-token Python answers."""
    rng = random.Random(1)
    names = ["total", "items", "value", "result", "index", "count", "acc", "row"]
    answers = []
    for k in range(8):
        lines = []
        for f in range(56):
            a, b = rng.sample(names, 2)
            lines += [f"def helper_{f}({a}, {b}):", f"    {a} = {a} + {b} * {rng.randint(1, 9)}",
                      f"    for {b} in range({rng.randint(2, 20)}):", f"        {a} += {b} if {b} % 2 else -{b}",
                      f"    return {a}", ""]
        answers.append("```python\n" + "\n".join(lines) + "\n```")
    ntok = statistics.mean(len(localswarm.code_tokens(a.strip("`python\n"))) for a in answers)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        localswarm.vote(answers, prompt="Write Python helpers")
        times.append(time.perf_counter() - t)
    return ntok, statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--half", default="odd")
    ap.add_argument("--reference", default=os.path.join(HERE, "..", "..", "shared", "reference", "consensus"))
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--early", action="store_true", help="also the vote with early decision (select_early)")
    ap.add_argument("--json", help="the harness's per-problem results and summary")
    ap.add_argument("--subsets", type=int, help="random subsets per problem and N (the harness's default: 200)")
    args = ap.parse_args()
    ntok, secs = cost_benchmark()
    print(f"vote() over 8 answers of ~{ntok:.0f} tokens: {secs * 1000:.1f} ms (median of 5)")
    if not args.skip_eval:
        script = os.path.join(args.reference, "consensus_reference.py")
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
        here = os.path.abspath(__file__)
        selectors = ["--selector", f"{here}:select"] + ([
            "--selector", f"{here}:select_early_strict", "--selector", f"{here}:select_early"] if args.early else [])
        subprocess.run([sys.executable, script, *selectors, "--half", args.half, "--jobs", "2"]
                       + (["--json", args.json] if args.json else [])
                       + (["--subsets", str(args.subsets)] if args.subsets else []), check=True, env=env)
        if args.early and args.json:
            paired_differences(args.json)


def paired_differences(path, reps=5000):
    """Early decision minus the plain vote, per N: mean over problems and a paired bootstrap CI."""
    with open(path) as f:
        problems = json.load(f)["per_problem"].values()
    for n in ("4", "8"):
        for sel in ("select_early_strict", "select_early"):
            plain, early = (next(k for k in next(iter(problems))[n] if k.endswith(":" + s)) for s in ("select", sel))
            diffs = [p[n][early] - p[n][plain] for p in problems]
            rng = random.Random(1)
            boots = sorted(statistics.mean(rng.choices(diffs, k=len(diffs))) for _ in range(reps))
            print(f"N={n} {sel} - select: {100 * statistics.mean(diffs):+.2f} pp "
                  f"[{100 * boots[int(0.025 * reps)]:+.2f}, {100 * boots[int(0.975 * reps)]:+.2f}]")


if __name__ == "__main__":
    main()
