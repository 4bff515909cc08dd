#!/usr/bin/env python3
"""The executed vote end to end (issue 32): the 30 tasks of bench_e2e_consensus.py, each prompt
now carrying one example of its own (EXAMPLES: inputs other than the hidden check's), asked
through a running server with N = 4 and 8 voters, the same seed with "execute": "off" and
"behaviour" (a seeded request on an idle server gets the same voters' answers, so only the pick
differs), and 8 one-voter samples for the single-sample rate. The hidden check decides a pass.
Not a test; results go to BENCHMARKS.md.
    python tests/bench_e2e_execute.py --url http://127.0.0.1:8080 [--tasks 30] [--seeds 1]
"""
import argparse
import json
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e_consensus import TASKS, extract_code, paired_ci, passes, pct  # noqa: E402

EXAMPLES = {   # one example per task, never the hidden check's inputs
    "is_palindrome(s)": "is_palindrome('racecar') -> True", "fizzbuzz(n)": "fizzbuzz(9) -> 'Fizz'",
    "flatten(xs)": "flatten([[5], [6, 7]]) -> [5, 6, 7]", "reverse_string(s)": "reverse_string('hello') -> 'olleh'",
    "factorial(n)": "factorial(3) -> 6", "fibonacci(n)": "fibonacci(10) -> 55", "is_prime(n)": "is_prime(7) -> True",
    "sum_list(xs)": "sum_list([10, 20]) -> 30", "max_of(xs)": "max_of([1, 8, 4]) -> 8",
    "count_vowels(s)": "count_vowels('banana') -> 3", "celsius_to_fahrenheit(c)": "celsius_to_fahrenheit(10) -> 50",
    "is_even(n)": "is_even(10) -> True", "square_all(xs)": "square_all([4, 5]) -> [16, 25]",
    "unique(xs)": "unique([1, 1, 2]) -> [1, 2]", "word_count(s)": "word_count('one two') -> 2",
    "capitalize_words(s)": "capitalize_words('a cat') -> 'A Cat'", "gcd(a, b)": "gcd(8, 12) -> 4",
    "average(xs)": "average([2, 4]) -> 3", "count_char(s, c)": "count_char('hello', 'l') -> 2",
    "merge_dicts(a, b)": "merge_dicts({'a': 1}, {'b': 2}) -> {'a': 1, 'b': 2}",
    "list_min_max(xs)": "list_min_max([3, 9, 2]) -> (2, 9)", "remove_spaces(s)": "remove_spaces('x y') -> 'xy'",
    "is_anagram(a, b)": "is_anagram('abc', 'cab') -> True", "power(base, exp)": "power(3, 2) -> 9",
    "chunk(xs, n)": "chunk([1, 2, 3], 2) -> [[1, 2], [3]]", "digits_sum(n)": "digits_sum(99) -> 18",
    "to_binary(n)": "to_binary(2) -> '10'", "count_words(s)": "count_words('x x') -> {'x': 2}",
    "second_largest(xs)": "second_largest([1, 5, 3]) -> 3", "is_sorted(xs)": "is_sorted([1, 3, 2]) -> False",
}


def ask(url, sig, desc, voters, seed, max_tokens, execute):
    prompt = (f"Write a Python function `{sig}` that {desc}.\nExample:\n{EXAMPLES[sig]}\n"
              "Answer with the code in one ```python block.")
    body = {"model": "localswarm", "voters": voters, "seed": seed, "max_tokens": max_tokens, "temperature": 0.8,
            "messages": [{"role": "user", "content": prompt}], "execute": execute, "early_stop": False}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.monotonic()
    with urllib.request.urlopen(req, timeout=900) as r:
        out = json.loads(r.read())
    return out["choices"][0]["message"]["content"], time.monotonic() - t, out["x_localswarm"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--tasks", type=int, default=len(TASKS))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--voters", default="4,8")
    ap.add_argument("--max-tokens", type=int, default=160)
    args = ap.parse_args()
    ns = [int(n) for n in args.voters.split(",")]
    rows, t0 = [], time.time()
    for k, (sig, desc, check) in enumerate(TASKS[:args.tasks]):
        ok = lambda text: passes(extract_code(text), check)
        row = {"task": sig, "single": [ok(ask(args.url, sig, desc, 1, 100 + s, args.max_tokens, "off")[0])
                                       for s in range(args.samples)]}
        for n in ns:
            for s in range(args.seeds):
                seed = 1000 * n + 10 * k + s
                off = ask(args.url, sig, desc, n, seed, args.max_tokens, "off")
                on = ask(args.url, sig, desc, n, seed, args.max_tokens, "behaviour")
                ex = on[2].get("execution") or {}
                row.setdefault(f"n{n}", []).append({
                    "off": {"pass": ok(off[0]), "latency": off[1]}, "on": {"pass": ok(on[0]), "latency": on[1]},
                    "exec_s": ex.get("seconds", 0.0), "checks": ex.get("checks", 0),
                    "passing_voters": sum(1 for p in ex.get("passed") or [] if p)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = statistics.mean
    out = {"tasks": len(rows), "single_sample_pass_rate": round(mean(mean(r["single"]) for r in rows), 4),
           "seconds": round(time.time() - t0)}
    for n in ns:
        runs = [x for r in rows for x in r[f"n{n}"]]
        p_off, p_on = [float(x["off"]["pass"]) for x in runs], [float(x["on"]["pass"]) for x in runs]
        lat_off, lat_on = [x["off"]["latency"] for x in runs], [x["on"]["latency"] for x in runs]
        out[f"n{n}"] = {"runs": len(runs), "pass_text_vote": round(mean(p_off), 4), "pass_executed": round(mean(p_on), 4),
                        "executed_minus_text_ci": [round(v, 4) for v in paired_ci(p_on, p_off)],
                        "latency_p50_text": round(pct(lat_off, 0.5), 2), "latency_p50_executed": round(pct(lat_on, 0.5), 2),
                        "exec_s_p50": round(pct([x["exec_s"] for x in runs], 0.5), 3),
                        "exec_s_p95": round(pct([x["exec_s"] for x in runs], 0.95), 3),
                        "with_checks": sum(1 for x in runs if x["checks"])}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
