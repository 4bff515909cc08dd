#!/usr/bin/env python3
"""End-to-end consensus benchmark: 30 small coding tasks with executable checks, asked through a
running localswarm server (the real HTTP API, the real model), with 1, 4 and 8 voters.

Reports the pass rate of the consensus answer at N = 4 and 8 against the mean pass rate of single
samples (8 one-voter requests per task with different seeds). Not a test; results go to
BENCHMARKS.md.   python tests/bench_e2e_consensus.py --url http://127.0.0.1:8080 [--tasks 30]
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


def ask(url, sig, desc, voters, seed, max_tokens):
    body = {"model": "localswarm", "voters": voters, "seed": seed, "max_tokens": max_tokens, "temperature": 0.8,
            "messages": [{"role": "user", "content": f"Write a Python function `{sig}` that {desc}. "
                                                     "Answer with the code in one ```python block."}]}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--tasks", type=int, default=len(TASKS))
    ap.add_argument("--samples", type=int, default=8, help="one-voter samples per task for the baseline")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    t0 = time.time()
    for k, (sig, desc, check) in enumerate(TASKS[:args.tasks]):
        single = [passes(extract_code(ask(args.url, sig, desc, 1, 100 + s, args.max_tokens)), check)
                  for s in range(args.samples)]
        c4 = passes(extract_code(ask(args.url, sig, desc, 4, 1000 + k, args.max_tokens)), check)
        c8 = passes(extract_code(ask(args.url, sig, desc, 8, 2000 + k, args.max_tokens)), check)
        rows.append({"task": sig, "single_pass_rate": sum(single) / len(single), "consensus4": c4, "consensus8": c8})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"tasks": len(rows), "seconds": round(time.time() - t0),
               "single_sample_pass_rate": round(statistics.mean(r["single_pass_rate"] for r in rows), 4),
               "consensus4_pass_rate": round(statistics.mean(r["consensus4"] for r in rows), 4),
               "consensus8_pass_rate": round(statistics.mean(r["consensus8"] for r in rows), 4)}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
