#!/usr/bin/env python3
"""End-to-end consensus benchmark: 30 small coding tasks with executable checks, asked through a
running localswarm server (the real HTTP API, the real model), with 1, 4 and 8 voters.

Per task: 8 one-voter samples (the single-sample baseline), a one-voter stream (its time to first
token) and one greedy answer; then, for N = 4 and 8 voters and --seeds seeds, the same request
(same seed) waiting for every voter, with early decision, as a live consensus stream, and at
temperature 0 (voter 0 greedy, the others spread). Reports pass rates with paired bootstrap CIs,
latency p50/p90 and time to first content. Not a test; results go to BENCHMARKS.md.
    python tests/bench_e2e_consensus.py --url http://127.0.0.1:8080 [--tasks 30] [--json out.json]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

TASKS = [
    ("is_palindrome(s)", "returns True when the string s reads the same backwards", "assert is_palindrome('abba') and is_palindrome('a') and not is_palindrome('ab')"),
    ("fizzbuzz(n)", "returns 'Fizz' for multiples of 3, 'Buzz' for multiples of 5, 'FizzBuzz' for both, else str(n)", "assert [fizzbuzz(i) for i in (3,5,15,7)] == ['Fizz','Buzz','FizzBuzz','7']"),
    ("flatten(xs)", "flattens a list of lists one level deep", "assert flatten([[1,2],[3],[]]) == [1,2,3]"),
    ("reverse_string(s)", "returns s reversed", "assert reverse_string('abc') == 'cba'"),
    ("factorial(n)", "returns n factorial", "assert factorial(0) == 1 and factorial(5) == 120"),
    ("fibonacci(n)", "returns the n-th Fibonacci number with fibonacci(0) == 0 and fibonacci(1) == 1", "assert [fibonacci(i) for i in range(8)] == [0,1,1,2,3,5,8,13]"),
    ("is_prime(n)", "returns True when n is a prime number", "assert is_prime(2) and is_prime(13) and not is_prime(1) and not is_prime(9)"),
    ("sum_list(xs)", "returns the sum of the numbers in xs", "assert sum_list([1,2,3]) == 6 and sum_list([]) == 0"),
    ("max_of(xs)", "returns the largest number in the non-empty list xs", "assert max_of([3,9,2]) == 9 and max_of([-5,-2]) == -2"),
    ("count_vowels(s)", "returns how many vowels (a, e, i, o, u) the string s has", "assert count_vowels('hello world') == 3"),
    ("celsius_to_fahrenheit(c)", "converts Celsius to Fahrenheit", "assert celsius_to_fahrenheit(100) == 212 and celsius_to_fahrenheit(0) == 32"),
    ("is_even(n)", "returns True when n is even", "assert is_even(4) and not is_even(7)"),
    ("square_all(xs)", "returns a list with every number in xs squared", "assert square_all([1,2,3]) == [1,4,9]"),
    ("unique(xs)", "returns the elements of xs without duplicates, in first-seen order", "assert unique([3,1,3,2,1]) == [3,1,2]"),
    ("word_count(s)", "returns the number of words in the string s (split on whitespace)", "assert word_count('a b  c') == 3 and word_count('') == 0"),
    ("capitalize_words(s)", "returns s with the first letter of every word upper-cased", "assert capitalize_words('hello big world') == 'Hello Big World'"),
    ("gcd(a, b)", "returns the greatest common divisor of a and b", "assert gcd(12, 18) == 6 and gcd(7, 5) == 1"),
    ("average(xs)", "returns the arithmetic mean of the non-empty list xs", "assert average([1,2,3,4]) == 2.5"),
    ("count_char(s, c)", "returns how many times the character c occurs in s", "assert count_char('banana', 'a') == 3"),
    ("merge_dicts(a, b)", "returns a new dict with the keys of a and b, b winning on conflicts", "assert merge_dicts({'x':1,'y':2},{'y':3}) == {'x':1,'y':3}"),
    ("list_min_max(xs)", "returns a tuple (smallest, largest) of the non-empty list xs", "assert list_min_max([4,1,7]) == (1,7)"),
    ("remove_spaces(s)", "returns s with all space characters removed", "assert remove_spaces(' a b c ') == 'abc'"),
    ("is_anagram(a, b)", "returns True when a and b are anagrams of each other", "assert is_anagram('listen','silent') and not is_anagram('ab','abc')"),
    ("power(base, exp)", "returns base raised to the non-negative integer exp", "assert power(2, 10) == 1024 and power(5, 0) == 1"),
    ("chunk(xs, n)", "splits the list xs into consecutive lists of length n (the last may be shorter)", "assert chunk([1,2,3,4,5], 2) == [[1,2],[3,4],[5]]"),
    ("digits_sum(n)", "returns the sum of the decimal digits of the non-negative integer n", "assert digits_sum(1234) == 10 and digits_sum(0) == 0"),
    ("to_binary(n)", "returns the binary representation of the non-negative integer n as a string without prefix", "assert to_binary(5) == '101' and to_binary(0) == '0'"),
    ("count_words(s)", "returns a dict mapping each word of s to how many times it occurs", "assert count_words('a b a') == {'a': 2, 'b': 1}"),
    ("second_largest(xs)", "returns the second largest distinct number of xs", "assert second_largest([4,1,4,3]) == 3"),
    ("is_sorted(xs)", "returns True when xs is in non-decreasing order", "assert is_sorted([1,2,2,5]) and not is_sorted([2,1])"),
]

FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text):
    m = FENCE.search(text or "")
    return m.group(1) if m else (text or "")


def passes(code, check):
    """Run the answer and its check in a fresh, isolated python with a timeout."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.py")
        with open(path, "w") as f:
            f.write(code + "\n\n" + check + "\n")
        try:
            r = subprocess.run([sys.executable, "-I", path], cwd=d, capture_output=True, timeout=10,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0


def ask(url, sig, desc, voters, seed, max_tokens, temperature=0.8, **extra):
    """(content, seconds, x_localswarm) of one non-streamed request."""
    body = {"model": "localswarm", "voters": voters, "seed": seed, "max_tokens": max_tokens,
            "temperature": temperature, "messages": messages(sig, desc), **extra}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.monotonic()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return out["choices"][0]["message"]["content"], time.monotonic() - t, out["x_localswarm"]


def ask_streamed(url, sig, desc, voters, seed, max_tokens, mode):
    """(content, seconds to the first content, seconds to the end, x_localswarm) of a stream."""
    body = {"model": "localswarm", "voters": voters, "seed": seed, "max_tokens": max_tokens, "temperature": 0.8,
            "messages": messages(sig, desc), "stream": True, "stream_mode": mode}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t, first, text, x = time.monotonic(), None, "", {}
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if delta:
                first = first if first is not None else time.monotonic() - t
                text += delta
            x = chunk.get("x_localswarm", x)
    return text, first if first is not None else time.monotonic() - t, time.monotonic() - t, x


def messages(sig, desc):
    return [{"role": "user", "content": f"Write a Python function `{sig}` that {desc}. "
                                        "Answer with the code in one ```python block."}]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def paired_ci(a, b, reps=2000, seed=1):
    """95 % bootstrap CI of mean(a) - mean(b), pairs resampled together."""
    import random
    rng = random.Random(seed)
    n = len(a)
    diffs = sorted(sum(a[i] - b[i] for i in (rng.randrange(n) for _ in range(n))) / n for _ in range(reps))
    return diffs[int(0.025 * reps)], diffs[int(0.975 * reps)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--tasks", type=int, default=len(TASKS))
    ap.add_argument("--samples", type=int, default=8, help="one-voter samples per task for the baseline")
    ap.add_argument("--seeds", type=int, default=2, help="consensus requests per task, mode and N")
    ap.add_argument("--voters", default="4,8")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--json")
    args = ap.parse_args()
    ns = [int(n) for n in args.voters.split(",")]
    rows = []
    t0 = time.time()
    for k, (sig, desc, check) in enumerate(TASKS[:args.tasks]):
        ok = lambda text: passes(extract_code(text), check)
        row = {"task": sig, "single": [ok(ask(args.url, sig, desc, 1, 100 + s, args.max_tokens)[0])
                                       for s in range(args.samples)]}
        text, first, total, _ = ask_streamed(args.url, sig, desc, 1, 100, args.max_tokens, "live")
        row["single_stream"] = {"ttft": first, "latency": total}
        g1 = ask(args.url, sig, desc, 1, 100, args.max_tokens, temperature=0)
        row["greedy1"] = ok(g1[0])
        for n in ns:
            for s in range(args.seeds):
                seed = 1000 * n + 10 * k + s
                all_ = ask(args.url, sig, desc, n, seed, args.max_tokens, early_stop=False)
                early = ask(args.url, sig, desc, n, seed, args.max_tokens, early_stop=True)
                live = ask_streamed(args.url, sig, desc, n, seed, args.max_tokens, "live")
                greedy = ask(args.url, sig, desc, n, seed, args.max_tokens, temperature=0, early_stop=False)
                row.setdefault(f"n{n}", []).append({
                    "all": {"pass": ok(all_[0]), "latency": all_[1]},
                    "early": {"pass": ok(early[0]), "latency": early[1], "same": early[0] == all_[0],
                              "stopped": len((early[2].get("early_stop") or {}).get("stopped", []))},
                    "live": {"pass": ok(live[0]), "ttft": live[1], "latency": live[2],
                             "live_chars": live[3].get("streamed_live_chars", 0)},
                    "greedy_spread": {"pass": ok(greedy[0])}})
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = summarize(rows, ns)
    summary["seconds"] = round(time.time() - t0)
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


def summarize(rows, ns):
    mean = statistics.mean
    out = {"tasks": len(rows), "single_sample_pass_rate": round(mean(mean(r["single"]) for r in rows), 4),
           "greedy_single_pass_rate": round(mean(r["greedy1"] for r in rows), 4),
           "single_stream_ttft_p50": round(pct([r["single_stream"]["ttft"] for r in rows], 0.5), 3)}
    for n in ns:
        runs = [x for r in rows for x in r[f"n{n}"]]
        get = lambda mode, key: [x[mode][key] for x in runs]
        lat_all, lat_early = get("all", "latency"), get("early", "latency")
        p_all, p_early, p_live = ([float(v) for v in get(m, "pass")] for m in ("all", "early", "live"))
        p_greedy = [float(v) for v in get("greedy_spread", "pass")]
        out[f"n{n}"] = {
            "runs": len(runs),
            "pass_all": round(mean(p_all), 4), "pass_early": round(mean(p_early), 4),
            "pass_live": round(mean(p_live), 4), "pass_greedy_spread": round(mean(p_greedy), 4),
            "early_minus_all_ci": [round(v, 4) for v in paired_ci(p_early, p_all)],
            "live_minus_all_ci": [round(v, 4) for v in paired_ci(p_live, p_all)],
            "same_answer_early": round(mean(float(x["early"]["same"]) for x in runs), 4),
            "stopped_voters_mean": round(mean(x["early"]["stopped"] for x in runs), 2),
            "latency_all_p50": round(pct(lat_all, 0.5), 2), "latency_all_p90": round(pct(lat_all, 0.9), 2),
            "latency_early_p50": round(pct(lat_early, 0.5), 2), "latency_early_p90": round(pct(lat_early, 0.9), 2),
            "early_over_all_p50": round(pct(lat_early, 0.5) / pct(lat_all, 0.5), 3),
            "early_over_all_p90": round(pct(lat_early, 0.9) / pct(lat_all, 0.9), 3),
            "early_over_all_mean": round(mean(e / a for e, a in zip(lat_early, lat_all)), 3),
            "live_ttft_p50": round(pct(get("live", "ttft"), 0.5), 3),
            "live_ttft_p90": round(pct(get("live", "ttft"), 0.9), 3),
            "live_latency_p50": round(pct(get("live", "latency"), 0.5), 2),
            "live_chars_p50": pct(get("live", "live_chars"), 0.5)}
        greedy_pairs = [(float(x["greedy_spread"]["pass"]), float(r["greedy1"])) for r in rows for x in r[f"n{n}"]]
        out[f"n{n}"]["greedy_spread_minus_greedy1_ci"] = [round(v, 4) for v in paired_ci(
            [a for a, _ in greedy_pairs], [b for _, b in greedy_pairs])]
    return out


if __name__ == "__main__":
    main()
