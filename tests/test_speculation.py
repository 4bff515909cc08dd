"""Speculative decoding: the drafter's guesses (n-gram lookup in the prompt and the voter's own
answer), the acceptance rate, the step costs it learns and the plan of how much to guess
(pure), then the real llama.cpp on the starter model: speculation on gives the same answers
as off, greedy and seeded-sampled, with stop strings, limits, grammars, streaming, early
decision and the prompt cache; and the API's field, errors and report."""
import contextlib
import json
import urllib.error
import urllib.request

import pytest

import localswarm as ls
from conftest import wait_idle


# --- the drafter (pure) ------------------------------------------------------

def test_ngram_ends_keeps_the_last_occurrence_with_a_token_after_it():
    ends = ls.ngram_ends([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3])
    assert ends[(1, 2, 3)] == 7, "the latest 1 2 3 that has a next token (7)"
    assert ends[(2, 3, 9)] == 4 and (2, 3, 7) in ends


def drafter(prompt):
    return ls.Drafter(prompt, ls.ngram_ends(prompt))


def test_a_guess_copies_what_followed_the_last_tokens_in_the_prompt():
    prompt = list(range(100, 140))
    d = drafter(prompt)
    for t in (110, 111, 112):
        d.add(t)
    assert d.guess(5) == [113, 114, 115, 116, 117]
    assert d.guess(100) == list(range(113, 140)), "never past the prompt's end"


def test_a_copy_goes_on_from_where_the_last_guess_came_from():
    # 7 8 9 occurs twice: a copy in progress follows its own place, not the latest occurrence
    prompt = [1, 2, 3, 4, 7, 8, 9, 5, 6, 7, 8, 9, 99]
    d = drafter(prompt)
    for t in (1, 2, 3):
        d.add(t)
    assert d.guess(4) == [4, 7, 8, 9]
    for t in (4, 7, 8, 9):
        d.add(t)
    assert d.guess(2) == [5, 6] and d.agree == 7
    fresh = drafter(prompt)
    for t in (0, 7, 8, 9):
        fresh.add(t)
    assert fresh.guess(2) == [99], "without a copy going on, the latest place"


def test_the_voters_own_answer_is_searched_before_the_prompt():
    d = drafter([5, 6, 7, 1, 2])
    for t in (5, 6, 7, 40, 41, 42, 5, 6, 7):
        d.add(t)
    assert d.guess(3) == [40, 41, 42], "its own latest 5 6 7 was followed by 40 41 42"


def test_nothing_is_guessed_for_text_never_seen():
    d = drafter(list(range(50)))
    for t in (900, 901, 902, 903):
        d.add(t)
    assert d.guess(8) == [] and d.source is None
    assert d.guess(0) == []


def test_the_rate_grows_with_agreement_and_falls_with_refused_guesses():
    prompt = list(range(1000, 1100))
    d = drafter(prompt)
    for t in range(1000, 1004):
        d.add(t)
    d.guess(4)
    short = d.rate
    for t in range(1004, 1040):
        d.add(t)
    d.guess(4)
    assert d.agree == ls.SPEC_AGREE_MAX and d.rate > short > 0.5
    long_copy = d.rate
    for _ in range(5):
        d.judged(8, 0)
    assert d.rate < long_copy and d.rate < 0.9
    d.judged(8, 8)
    assert d.hits > 0 and d.tries > d.hits


# --- what a guess costs, and how much to guess (pure) -------------------------

def timed(points):
    cost = ls.StepCost()
    for tokens, seconds in points:
        cost.add(tokens, seconds)
    return cost


def test_step_cost_keeps_the_one_token_step_apart_and_fits_a_line_above_it():
    cost = timed([(1, 0.010)] * 20 + [(2, 0.024), (4, 0.032), (8, 0.056), (16, 0.100)] * 5)
    assert cost.seconds(1) == pytest.approx(0.010)
    base, per_token = cost.line()
    assert per_token == pytest.approx(0.0055, rel=0.05) and base == pytest.approx(0.0125, rel=0.1)
    assert cost.seconds(2) > 2 * cost.seconds(1), "two tokens cost more than twice one here, as on this CPU"


def test_step_cost_assumes_the_prior_slope_until_two_sizes_are_timed():
    assert not ls.StepCost().known and ls.StepCost().line() == (0.0, 0.0)
    cost = timed([(1, 0.010)])
    assert cost.seconds(9) == pytest.approx(0.010 * (1 + 8 * ls.SPEC_PRIOR_SLOPE))
    cost.add(4, 0.020)
    assert cost.line()[1] == pytest.approx(0.010 * ls.SPEC_PRIOR_SLOPE)


CPU = [(1, 0.011)] * 10 + [(2, 0.024), (8, 0.057), (16, 0.101)] * 4      # this VM, the starter model
GPU = [(1, 0.011)] * 10 + [(2, 0.0112), (8, 0.0118), (16, 0.0125)] * 4   # a GPU: extra tokens nearly free


def test_a_gpu_guesses_on_modest_odds_and_a_cpu_only_on_a_long_copy():
    gpu, cpu = timed(GPU), timed(CPU)
    assert ls.plan_guesses([0.6], [16], 1, gpu)[0] > 0
    assert ls.plan_guesses([0.6], [16], 1, cpu) == [0], "on a CPU a shaky guess costs more than it brings"
    assert ls.plan_guesses([0.98], [16], 1, cpu)[0] >= 8, "a long copy pays even here"
    assert ls.plan_guesses([0.98], [0], 1, cpu) == [0] and ls.plan_guesses([], [], 0, cpu) == []
    assert ls.plan_guesses([0.99], [16], 1, ls.StepCost()) == [0], "no step timed yet: no guess"


def test_the_likelier_voter_gets_the_guesses_first():
    counts = ls.plan_guesses([0.99, 0.5, 0.95], [16, 16, 3], 3, timed(CPU))
    assert counts[0] >= counts[2] > 0 and counts[1] == 0 and counts[2] <= 3


def test_trust_falls_when_guesses_bring_less_than_expected_and_returns_at_rest():
    record = ls.GuessRecord()
    assert record.trust == 1.0
    for _ in range(20):
        record.add(10.0, 4)
    assert record.trust == pytest.approx(0.4, abs=0.05)
    cpu = timed(CPU)
    assert ls.plan_guesses([0.98], [16], 1, cpu, record.trust) == [0], "what the guesses earned counts"
    for _ in range(2000):
        record.rest()
    assert record.trust > 0.95
    for _ in range(20):
        record.add(5.0, 9)
    assert record.trust == 1.0, "never more than the rates promise"


# --- the engine: same answers, fewer steps ------------------------------------

class CheapGuesses(ls.StepCost):
    """The engine told that guesses cost little (a GPU's figures), so that it guesses whatever
    this machine's steps cost: these tests are about what guessing does to answers."""

    def __init__(self):
        super().__init__()
        for tokens, seconds in GPU:
            super().add(tokens, seconds)

    def add(self, tokens, seconds):
        pass


@contextlib.contextmanager
def cheap_guesses(engine):
    saved, engine._step_cost = engine._step_cost, CheapGuesses()
    try:
        yield
    finally:
        engine._step_cost = saved


CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"


def copy_prompt(engine, text=CODE):
    return engine.tokenize(engine.formatter.render(
        [{"role": "user", "content": "Repeat this code exactly, with no other text:\n\n" + text}]))


def answer(engine, mode, prompt=None, voters=1, **kw):
    """Seeded (an idle engine starts from an empty KV cache, so both modes sum alike: the prompt
    and answer stay under 256 cells, where llama.cpp's CPU sums do not depend on the batch)."""
    kw.setdefault("max_tokens", 120)
    kw.setdefault("seed", 3)
    with cheap_guesses(engine):
        return engine.generate(prompt or copy_prompt(engine), ls.SamplingParams(speculation=mode, **kw), voters)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculation_gives_the_same_answer_token_for_token(engine, temperature):
    off = answer(engine, "off", temperature=temperature)
    on = answer(engine, "ngram", temperature=temperature)
    a, b = off.results[0], on.results[0]
    assert b.guessed_tokens > 0 and b.taken_tokens > 0, "the copy was guessed, and guesses were taken"
    assert a.guessed_tokens == 0
    assert (b.text, b.completion_tokens, b.finish_reason) == (a.text, a.completion_tokens, a.finish_reason)


def test_no_stale_cells_after_guesses(engine):
    on = answer(engine, "ngram", temperature=0.0)
    assert on.results[0].taken_tokens < on.results[0].guessed_tokens or on.results[0].guessed_tokens
    llm = engine.llm
    busy = [s for s in range(ls.PROMPT_CACHE_SLOTS, llm.n_seq_max)
            if llm.L.llama_memory_seq_pos_max(llm.mem, s) >= 0]
    assert busy == [], "every voter's sequence (guesses included) was freed"


def test_stop_strings_and_the_token_limit_hold_while_guessing(engine):
    ends = []
    for kw in ({"stop": ["return a, -b"], "max_tokens": 80}, {"max_tokens": 17}):
        off, on = answer(engine, "off", temperature=0.0, **kw), answer(engine, "ngram", temperature=0.0, **kw)
        a, b = off.results[0], on.results[0]
        assert b.guessed_tokens > 0
        assert (b.text, b.completion_tokens, b.finish_reason, b.stop_sequence) == \
            (a.text, a.completion_tokens, a.finish_reason, a.stop_sequence)
        ends.append((b.finish_reason, b.completion_tokens))
    assert ends[0][0] == "stop" and ends[1] == ("length", 17)


def test_a_grammar_constrains_guessed_tokens_too(engine):
    g = ls.Grammar('root ::= ("def " [a-z]+ "(a, b):\\n    return a " [-+*] " b\\n\\n\\n")+')
    off = answer(engine, "off", temperature=0.0, grammar=g, max_tokens=60)
    on = answer(engine, "ngram", temperature=0.0, grammar=g, max_tokens=60)
    assert on.results[0].guessed_tokens > 0
    assert on.results[0].text == off.results[0].text and on.results[0].text.startswith("def ")


def test_the_stream_is_the_answer_while_guessing(engine):
    seen = []
    with cheap_guesses(engine):
        req = engine.generate(copy_prompt(engine), ls.SamplingParams(temperature=0, max_tokens=80, seed=3,
                                                                     speculation="ngram"), 1,
                              on_token=lambda i, d: seen.append(d))
    assert seen[-1] is None and "".join(d for d in seen if d) == req.results[0].text
    assert req.results[0].taken_tokens > 0


def test_voters_guess_together_and_early_decision_stops_them(engine):
    req = answer(engine, "ngram", voters=4, temperature=0.8, max_tokens=100)
    assert all(r.finished for r in req.results) and sum(r.guessed_tokens > 0 for r in req.results) >= 2
    decided = []

    def decide(finished, outstanding):
        decided.append((len(finished), outstanding))
        return "settled"
    with cheap_guesses(engine):
        req = engine.generate(copy_prompt(engine), ls.SamplingParams(temperature=0.8, max_tokens=200, seed=5,
                                                                     speculation="ngram"), 4, decide=decide)
    reasons = [r.finish_reason for r in req.results]
    assert decided and "early_stop" in reasons, (decided, reasons)
    assert all(r.finished for r in req.results)


def test_a_remembered_answer_made_with_guesses_is_reused_whole(engine):
    prompt = copy_prompt(engine, CODE.replace("mul", "div").replace("*", "/"))
    with cheap_guesses(engine):
        req = engine.generate(prompt, ls.SamplingParams(temperature=0, max_tokens=40, speculation="ngram"), 1,
                              keep_answers=True)
        assert req.results[0].guessed_tokens > 0
        engine.remember(req, 0)
        answer_tokens = engine.tokenize_text(req.results[0].text)
        follow = prompt + answer_tokens
        nxt = engine.generate(follow, ls.SamplingParams(temperature=0, max_tokens=2), 1)
    assert nxt.cached_tokens >= len(prompt) + len(answer_tokens) - 2, \
        "the prompt and the answer's cells (and no guessed cell beyond them) were kept"


# --- the API ------------------------------------------------------------------

def post(url, body):
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_api_takes_speculation_per_request_and_reports_guesses(live_server):
    url, app = live_server
    wait_idle(app)
    body = {"model": "m", "messages": [{"role": "user", "content": "Repeat this code exactly, with no other "
                                        "text:\n\n" + CODE}], "max_tokens": 60, "temperature": 0, "voters": 1,
            "speculation": "ngram"}
    with cheap_guesses(app.swarm.engine):
        status, payload = post(url, body)
    assert status == 200
    voter = json.loads(payload)["x_localswarm"]["per_voter"][0]
    assert voter["guessed_tokens"] >= voter["taken_tokens"] > 0
    status, payload = post(url, dict(body, speculation="eagle"))
    err = json.loads(payload)["error"]
    assert status == 400 and err["param"] == "speculation" and "off, ngram" in err["message"]


def test_the_setting_is_checked(tmp_path):
    assert ls.load_config(env={}, read_file=False)["swarm.speculation"] in ls.SPECULATION_MODES
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"swarm": {"speculation": "medusa"}}))
    with pytest.raises(ls.LocalswarmError, match="swarm.speculation"):
        ls.load_config(env={}, path=str(path))
