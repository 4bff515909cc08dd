#!/usr/bin/env python3
"""Tool calling measured on BFCL v4 (Berkeley Function Calling Leaderboard) cases: how often a
call comes back, how often it is valid against the tool's schema, and AST accuracy (the right
function with acceptable argument values), for several voter counts, grammar off/on and
tool_choice auto/required, against a running server. Not a test; results go to BENCHMARKS.md.

The data ships inside the bfcl-eval wheel (only its data is used, not its code or dependencies):
    pip download --no-deps bfcl-eval -d /tmp/bfcl && cd /tmp/bfcl && unzip -o bfcl_eval-*.whl 'bfcl_eval/data/*'
    python tests/bench_tool_calls.py --data /tmp/bfcl/bfcl_eval/data --url http://127.0.0.1:8080 [--cases 15]
    python tests/bench_tool_calls.py ... --llama-server http://127.0.0.1:8081   (a peer row)
    python tests/bench_tool_calls.py --grammar-cost MODEL.gguf   (the grammar's cost per token)

The checker is this file's own, written from BFCL's rules: each ground-truth parameter lists its
acceptable values, "" meaning the parameter may be left out; strings compare case- and
punctuation-insensitively; parallel calls match in any order; irrelevance cases are right when
no call is made. BFCL's "dict"/"float"/"tuple"/"any" types are mapped to JSON Schema, and dots in
function names to underscores (as BFCL does for OpenAI-style APIs).
"""
import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import localswarm as ls  # noqa: E402

CATEGORIES = ("simple_python", "multiple", "parallel", "irrelevance")
TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}


def load(data_dir: str, category: str, n: int) -> list:
    def lines(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    cases = lines(os.path.join(data_dir, f"BFCL_v4_{category}.json"))[:n]
    answers = os.path.join(data_dir, "possible_answer", f"BFCL_v4_{category}.json")
    truth = {a["id"]: a["ground_truth"] for a in lines(answers)} if os.path.exists(answers) else {}
    for c in cases:
        c["truth"] = truth.get(c["id"], [])
    return cases


def json_schema(s):
    """BFCL's parameter types as JSON Schema (walking properties and items, not property names)."""
    if isinstance(s, list):
        return [json_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = dict(s)
    if isinstance(s.get("type"), str):
        t = TYPES.get(s["type"], s["type"])
        if t:
            out["type"] = t
        else:
            del out["type"]
    if isinstance(s.get("properties"), dict):
        out["properties"] = {k: json_schema(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), (dict, list)):
            out[key] = json_schema(s[key])
    return out


def api_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def tools_of(case) -> list:
    return [{"type": "function", "function": {"name": api_name(f["name"]), "description": f.get("description", ""),
                                              "parameters": json_schema(f["parameters"])}} for f in case["function"]]


def norm(v):
    if isinstance(v, str):
        return re.sub(r"[\s,./\-_*^]", "", v.lower())
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, list):
        return [norm(x) for x in v]
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items()}
    return v


def call_matches(call: tuple, expected: dict) -> bool:
    name, args = call
    (fname, params), = expected.items()
    if api_name(fname) != name:
        return False
    if any(k not in params for k in args):
        return False
    for k, ok in params.items():
        if k not in args:
            if "" not in ok:
                return False
        elif norm(args[k]) not in [norm(x) for x in ok if x != "" or isinstance(args[k], str)]:
            return False
    return True


def ast_correct(calls: list, truth: list) -> bool:
    """The calls match the ground truth one to one, in any order."""
    if len(calls) != len(truth):
        return False
    left = list(truth)
    for c in calls:
        hit = next((t for t in left if call_matches(c, t)), None)
        if hit is None:
            return False
        left.remove(hit)
    return True


def ask(url: str, case, choice: str, voters: int, grammar: bool, peer: bool) -> list:
    body = {"model": "localswarm", "messages": case["question"][0], "tools": tools_of(case), "tool_choice": choice,
            "max_tokens": 192, "temperature": 0.7, "seed": 1}
    if not peer:
        body.update(voters=voters, tool_grammar=grammar)
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            msg = json.loads(r.read())["choices"][0]["message"]
    except urllib.error.HTTPError as exc:
        print("  error", exc.code, exc.read()[:200], file=sys.stderr)
        return []
    except OSError as exc:          # a server gone: the case counts as no call, the run goes on
        print("  error", exc, file=sys.stderr)
        return []
    out = []
    for c in msg.get("tool_calls") or []:
        try:
            out.append((c["function"]["name"], json.loads(c["function"]["arguments"] or "{}")))
        except ValueError:
            out.append((c["function"]["name"], None))        # unparsable arguments
    return out


def run(url, cases_by_cat, choice, voters, grammar, peer=False) -> dict:
    row = {}
    for cat, cases in cases_by_cat.items():
        if cat == "irrelevance" and choice == "required":
            continue        # a required call cannot be the right answer to an irrelevant question
        n = returned = valid = correct = 0
        t0 = time.monotonic()
        for case in cases:
            calls = ask(url, case, choice, voters, grammar, peer)
            schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools_of(case)}
            ok = [c for c in calls if c[1] is not None and c[0] in schemas and not ls.schema_errors(c[1], schemas[c[0]])]
            n += 1
            returned += bool(calls)
            valid += len(ok) == len(calls) and bool(calls)
            correct += (not calls) if cat == "irrelevance" else ast_correct(calls, case["truth"])
        row[cat] = {"cases": n, "returned": returned, "valid": valid, "correct": correct,
                    "seconds": round(time.monotonic() - t0, 1)}
    return row


def grammar_cost(model: str, voters: int = 4, tokens: int = 128, rounds: int = 3) -> None:
    """Per-voter decode speed with the required-call grammar vs without, on one engine: the
    grammar's cost per token. A schema with a free-text field keeps the call going."""
    eng = ls.LlamaCppEngine(model, voters=voters, ctx=2048, parallel=1)
    tool = {"type": "function", "function": {"name": "write_note", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
    toks = eng.tokenize(eng.formatter.render([{"role": "user", "content": "Write a long note about rivers."}], [tool]))
    grammar = ls.tool_grammar([tool], eng.formatter.tool_format)
    try:
        for label, g in (("no grammar", None), ("required-call grammar", grammar)) * rounds:
            out = eng.generate(toks, ls.SamplingParams(max_tokens=tokens, temperature=0.8, seed=5, grammar=g), voters)
            rates = [r.tokens_per_s for r in out.results if r.tokens_per_s]
            print(f"{os.path.basename(model)} {voters} voters, {label}: {sum(rates) / len(rates):.2f} tokens/s per voter, "
                  f"{sum(r.completion_tokens for r in out.results)} tokens", flush=True)
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grammar-cost", metavar="MODEL.gguf", help="only measure the grammar's cost per token")
    ap.add_argument("--data")
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--llama-server", metavar="URL")
    ap.add_argument("--cases", type=int, default=15)
    ap.add_argument("--configs", default="1:off:auto,1:off:required,4:off:auto,4:off:required,"
                    "1:on:auto,1:on:required,4:on:auto,4:on:required,8:on:auto,8:on:required")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.grammar_cost:
        return grammar_cost(args.grammar_cost)
    cases = {c: load(args.data, c, args.cases) for c in CATEGORIES}
    rows = []
    runs = [(int(v), g == "on", ch, False, args.url) for v, g, ch in (c.split(":") for c in args.configs.split(","))]
    if args.llama_server:
        runs += [(1, False, ch, True, args.llama_server) for ch in ("auto", "required")]
    for voters, grammar, choice, peer, url in runs:
        label = ("llama-server --jinja" if peer else f"localswarm {voters} voter{'s' * (voters > 1)}, grammar "
                 f"{'on' if grammar else 'off'}")
        row = run(url, cases, choice, voters, grammar, peer)
        rows.append({"system": label, "tool_choice": choice, **row})
        cells = "  ".join(f"{c}: {r['returned']}/{r['valid']}/{r['correct']} of {r['cases']} ({r['seconds']}s)"
                          for c, r in row.items())
        print(f"{label:38} {choice:9} {cells}", flush=True)
        if args.json:                # after every row: an interrupted run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
