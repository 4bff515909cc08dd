"""Swarm: early decision while voters decode, live consensus streaming, greedy requests.
The engine is the real llama.cpp one on the starter model (conftest's session engine)."""
import openai
import pytest

import localswarm as ls
from conftest import leave_while_voting, wait_idle

CODE_TASK = [{"role": "user", "content": "Write a Python function `is_even(n)` that returns True when n "
                                         "is even. Answer with the code in one ```python block."}]


def prompt_tokens(engine, messages=CODE_TASK):
    return engine.tokenize(engine.formatter.render(messages))


# --- the stream's bookkeeping (pure) ---------------------------------------------------------------

def test_the_stream_sends_what_a_majority_of_running_voters_agree_on():
    s = ls.ConsensusStream()
    s.begin(4)
    for voter, text in [(0, "def f"), (1, "def g"), (2, "def f(x)"), (3, "class")]:
        s.add(voter, text)
    assert s.advance() == "def "             # 3 of 4 voters start so
    s.add(0, "(x): return 1")
    assert s.advance() == ""                 # only two say "def f(x)"
    s.drop([1, 3])                           # gated out: a majority of the two left is both
    assert s.advance() == "f(x)"
    assert s.close_if(lambda sent: sent == "def f(x)") and s.close() == "def f(x)"
    s.add(2, ": return 1")
    assert s.advance() == ""                 # nothing goes out once the pick is made


def test_the_pick_starts_with_what_was_streamed():
    """Two voters agree and win the plain vote; but what was streamed is the third's start, so the
    pick is made among the answers that start with it."""
    req = ls.ChatRequest(messages=[{"role": "user", "content": "Write a Python function add(a, b)"}])
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    other = "Sure:\n```python\ndef add(x, y):\n    return x + y\n```"
    results = [ls.VoterResult(i, text=t, finished=True, latency=1.0) for i, t in enumerate([good, good, other])]
    ballot = ls.Ballot(req, "similarity", "adaptive")
    assert ballot.pick(results).index in (0, 1)
    v = ballot.pick(results, sent="Sure:")
    assert v.index == 2 and "streamed" in v.note
    assert ballot.pick(results, sent="nobody wrote this").index == -1
    results[0].finish_reason = "early_stop"          # not voted on: the lists still run per voter
    v = ballot.pick(results)
    assert v.index == 1 and len(v.reasons) == len(v.quality) == len(v.scores) == 3
    assert v.reasons[0].startswith("stopped early") and v.quality[0] == 0.0 and 0 not in sum(v.groups, [])


# --- on the real model ----------------------------------------------------------------------------

def test_early_stop_ends_the_outstanding_voters_and_frees_their_sequences(engine):
    seen = []

    def decide(finished, outstanding):
        seen.append([r.index for r in finished])
        return "test: decided after the first answer"

    colour = [{"role": "user", "content": "Name a colour."}]      # seed 5: answers of 4 to 400 tokens
    g = engine.generate(prompt_tokens(engine, colour), ls.SamplingParams(max_tokens=400, seed=5, temperature=1.0),
                        4, decide=decide, timeout=120)
    first = seen[0]
    assert len(seen) == 1 and g.early_stop == "test: decided after the first answer"
    stopped = [r for r in g.results if r.finish_reason == "early_stop"]
    assert stopped, "the other voters were still writing"
    for r in g.results:
        assert r.finished
        if r.index in first:
            assert r.finish_reason in ("stop", "length") and r.text     # the answers in stand
    assert all(r.completion_tokens < 400 for r in stopped)
    held = sum(len(r.kept) for r in engine._kept)       # answers of earlier requests awaiting remember
    assert len(engine._free) + held == engine.max_voters, "the stopped voters' sequences are free again"
    g = engine.generate(prompt_tokens(engine), ls.SamplingParams(max_tokens=3, seed=2), 4)
    assert all(r.completion_tokens == 3 for r in g.results)


def test_the_swarm_reports_which_voters_it_stopped_and_why(engine):
    swarm = ls.Swarm(engine, model_id="m", early_stop="adaptive")
    for seed in range(1, 6):
        ans = swarm.answer(ls.ChatRequest(messages=CODE_TASK, params=ls.SamplingParams(seed=seed),
                                          max_tokens_requested=200, voters=4))
        x = ans.x_localswarm()
        if "early_stop" in x:
            break
    else:
        pytest.fail("four voters asked for is_even never agreed early in five tries")
    stopped = x["early_stop"]["stopped"]
    assert "agree" in x["early_stop"]["reason"] and stopped
    assert all(x["per_voter"][i]["finish_reason"] == "early_stop" for i in stopped)
    assert x["winner"] not in stopped and "is_even" in ans.text
    off = swarm.answer(ls.ChatRequest(messages=CODE_TASK, params=ls.SamplingParams(seed=seed),
                                      max_tokens_requested=200, voters=4, early_stop=False))
    assert "early_stop" not in off.x_localswarm()
    assert all(r.finish_reason in ("stop", "length") for r in off.results)


def test_a_greedy_request_runs_one_voter_or_spreads_the_others(engine):
    swarm = ls.Swarm(engine, model_id="m", greedy_spread=0.7)
    req = lambda voters=4: ls.ChatRequest(messages=[{"role": "user", "content": "Name a colour."}], voters=voters,
                                          params=ls.SamplingParams(temperature=0, seed=3), max_tokens_requested=12,
                                          early_stop=False)
    ans = swarm.answer(req())
    greedy = swarm.answer(req(voters=1))
    assert ans.results[0].text == greedy.results[0].text         # voter 0 is the greedy answer
    assert "voter 0 greedy" in ans.x_localswarm()["greedy"]
    assert len({r.text for r in ans.results}) > 1, "the others sample, so they can differ"
    single = ls.Swarm(engine, model_id="m").answer(req())        # the default: one greedy voter
    assert len(single.results) == 1 and "one greedy voter" in single.x_localswarm()["greedy"]
    assert "one voter" in single.verdict.note


def read_sse(url, body, timeout=120):
    """(content deltas, the final chunk's x_localswarm) of a streamed chat completion."""
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)
    chunks = list(c.chat.completions.create(model="localswarm", stream=True, **body))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
    return pieces, last.model_extra["x_localswarm"]


@pytest.mark.parametrize("mode", ["consensus", "live"])
def test_a_stream_reassembles_to_the_answer_for_the_same_seed(live_server, mode):
    """consensus: exactly the unstreamed answer. live: the same, unless the unstreamed pick does not
    start with what went out live; then the pick was made among the voters that do."""
    url, app = live_server
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    for seed in (1, 2, 3):
        body = dict(messages=CODE_TASK, max_tokens=160, seed=seed, extra_body={"voters": 4, "early_stop": False})
        wait_idle(app)
        pieces, x = read_sse(url, dict(body, extra_body=dict(body["extra_body"], stream_mode=mode)))
        wait_idle(app)
        plain = c.chat.completions.create(model="localswarm", **body).choices[0].message.content
        streamed, live = "".join(pieces), "".join(pieces)[:x["streamed_live_chars"]]
        assert x["stream_mode"] == mode and (live == "") == (mode == "consensus")
        assert streamed == plain if plain.startswith(live) else streamed.startswith(live)
        assert mode == "consensus" or len(pieces) > 1, "some text went out before the vote"


def test_a_client_that_leaves_a_live_stream_cancels_its_voters(live_server):
    url, app = live_server
    took = leave_while_voting(url, app, {"messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                                         "max_tokens": 1500, "temperature": 1.0, "voters": 4, "stream": True},
                              until=b'"content": "')       # the first streamed text (the role chunk has "")
    assert app.swarm.status()["busy_voters"] == 0
    assert took < 5, "voters stop within a few seconds of the client leaving"
