"""The executed vote: checks found in prompts (pure, many shapes), candidate programs, the
grouping by examples and by behaviour, the sandbox against hostile candidates (a socket, a write
outside its directory, a fork bomb, a sleep, memory, a flood of output), the time budget, and
the vote in Ballot.pick and through a live server."""
import json
import os
import time
import urllib.request

import pytest

import localswarm as ls

HUMANEVAL_STYLE = '''
def add(x: int, y: int):
    """Add two numbers x and y
    >>> add(2, 3)
    5
    >>> add(5, 7)
    12
    """
'''


# --- checks from prompts ------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    (HUMANEVAL_STYLE, [("add(2, 3)", "5"), ("add(5, 7)", "12")]),
    ("Write f.\nassert f([1, 2]) == [2, 4]\nassert f([]) == []", [("f([1, 2])", "[2, 4]"), ("f([])", "[]")]),
    ("assert is_prime(7)\nassert not is_prime(8)", [("is_prime(7)", "True"), ("is_prime(8)", "False")]),
    ("Examples:\n  fizz(3) -> 'Fizz'\n  fizz(4) ➞ '4'\n- fizz(15) == 'FizzBuzz'",
     [("fizz(3)", "'Fizz'"), ("fizz(4)", "'4'"), ("fizz(15)", "'FizzBuzz'")]),
    ("for example: sort_third([5, 6, 3, 4]) → [2, 6, 3, 4].", [("sort_third([5, 6, 3, 4])", "[2, 6, 3, 4]")]),
    (">>> s.upper()\n'A'\n", [("s.upper()", "'A'")]),
    ("triple(3) ==> 9\nis_odd(3)==>True", [("triple(3)", "9"), ("is_odd(3)", "True")]),
    ("double(2) returns 4\ndouble(3) should return 6.", [("double(2)", "4"), ("double(3)", "6")]),
    ("half(4) = 2\nname(1)  # returns 'a'\nname(2) # => 'b'", [("half(4)", "2"), ("name(1)", "'a'"), ("name(2)", "'b'")]),
    (">>> below([1, 2], 5) == True\n", [("below([1, 2], 5)", "True")]),
    ("for sum_of([1, 2]) == 3", [("sum_of([1, 2])", "3")]),
])
def test_checks_are_found_in_the_shapes_prompts_use(text, want):
    assert [(c.call, c.expected) for c in ls.extract_checks(text)] == want


@pytest.mark.parametrize("text", [
    "Make it fast, so that x == y holds.", "a = b -> c", "assert x > 3", "assert f(1) > 0",
    ">>> import os\n", "f(1) -> this is prose, not a value ((", "Write a function that adds two numbers.",
    "assert f(" + "1," * 2000 + ") == 1",
    "fibfib(n) == fibfib(n-1) + fibfib(n-2) + fibfib(n-3).", "f(x) = y", "f(2) -> 2 + 2", "if f(3) = 3 then",
])
def test_prose_and_what_cannot_be_checked_give_no_checks(text):
    assert ls.extract_checks(text) == []


def test_a_doctest_without_output_is_an_input_and_duplicates_count_once():
    checks = ls.extract_checks(">>> show(1)\n\n>>> show(1)\n\nassert show(1) == None\n")
    assert [(c.call, c.expected, c.source) for c in checks] == [("show(1)", "None", "doctest")]
    many = "\n".join(f"assert f({i}) == {i}" for i in range(100))
    assert len(ls.extract_checks(many)) == ls.MAX_CHECKS


def test_candidate_programs_are_the_answers_python():
    assert ls.candidate_program("Here:\n```python\ndef f(x):\n    return x\n```\nDone.") == "def f(x):\n    return x"
    assert ls.candidate_program("    return x + 1\n", "def f(x):\n") == "def f(x):\n    return x + 1\n"
    assert ls.candidate_program("I would use a loop.") is None
    assert ls.candidate_program("```js\nfunction f(x) { return x }\n```") is None     # only Python runs
    assert ls.prompt_code("Fix this:\n```python\ndef f(x):\n    return x\n```") == "def f(x):\n    return x"
    assert ls.prompt_code(HUMANEVAL_STYLE) == HUMANEVAL_STYLE        # its docstring outweighs its code
    assert ls.candidate_program("    return x + y\n", ls.prompt_code(HUMANEVAL_STYLE)).endswith("return x + y\n")


def outcome(passed, results, ran=True, error=""):
    return ls.Outcome(ran=ran, passed=passed, results=results, error=error)


def test_examples_drop_the_failing_answers_and_behaviour_picks_the_largest_group():
    outs = [outcome([True, True], ["5", "12"]), outcome([True, False], ["5", "11"]),
            outcome([True, True], ["5", "12"]), None, outcome([], [], ran=False, error="raised SyntaxError")]
    among, groups, note = ls.executed_groups(outs, "examples")
    assert among == [0, 2] and groups == [] and "2 of 5" in note
    none_pass = [outcome([False], ["1"]), outcome([False], ["2"]), outcome([None], ["2"])]
    among, groups, _ = ls.executed_groups(none_pass, "behaviour")
    assert among == [2] and groups == [[2]]        # [None]: no expected value, so it "passes"
    inputs_only = [outcome([None], ["1"]), outcome([None], ["2"]), outcome([None], ["2"])]
    among, groups, _ = ls.executed_groups(inputs_only, "behaviour")
    assert among == [1, 2] and groups == [[1, 2], [0]]
    all_fail = [outcome([False], ["1"]), outcome([False], ["2"])]
    assert ls.executed_groups(all_fail, "examples")[0] == [0, 1]     # none passes: all stay
    most = [outcome([True, False], ["1", "2"]), outcome([False, False], ["0", "0"]), outcome([True, False], ["1", "3"])]
    among, _, note = ls.executed_groups(most, "examples")            # a wrong example: those that pass the most
    assert among == [0, 2] and "pass 1" in note


# --- the sandbox ---------------------------------------------------------------------------------

ADD = [ls.Check("add(2, 3)", "5", "doctest"), ls.Check("add(0, 0)", "0", "assert")]


def test_a_candidate_runs_and_is_judged_on_each_check():
    got = ls.run_candidate("def add(a, b):\n    return a + b\n", ADD + [ls.Check("add(1, 1)", "3", "example")])
    assert got.ran and got.passed == [True, True, False] and got.results == ["5", "0", "2"] and not got.passes_all
    raised = ls.run_candidate("def add(a, b):\n    return a / 0\n", ADD)
    assert raised.ran and raised.results == ["raised ZeroDivisionError"] * 2 and not raised.passes_all
    assert ls.run_candidate("def add(a, b) return", ADD).error == "raised SyntaxError"


@pytest.mark.parametrize("name, program", [
    ("socket", "import socket\nsocket.create_connection(('127.0.0.1', 1))"),
    ("raw socket", "__import__('_socket').socket()"),
    ("subprocess", "import subprocess\nsubprocess.run(['true'])"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()"),
    ("ctypes", "import ctypes\nctypes.CDLL(None)"),
    ("os.system", "import os\nos.system('touch /tmp/localswarm-escaped')"),
])
def test_the_sandbox_refuses_what_a_candidate_must_not_do(name, program):
    t0 = time.monotonic()
    got = ls.run_candidate(program, ADD, 2.0)
    assert not got.ran and ("PermissionError" in got.error or "ImportError" in got.error), (name, got)
    assert time.monotonic() - t0 < 2.0
    assert not os.path.exists("/tmp/localswarm-escaped")


def test_writes_outside_its_directory_are_refused_and_inside_allowed(tmp_path):
    target = tmp_path / "outside.txt"
    got = ls.run_candidate(f"open({str(target)!r}, 'w').write('x')", ADD)
    assert not got.ran and "PermissionError" in got.error and not target.exists()
    for program in (f"import os\nos.remove({str(tmp_path)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        assert "PermissionError" in ls.run_candidate(program, ADD).error
    assert tmp_path.exists()
    inside = ls.run_candidate("open('scratch.txt', 'w').write('ok')\ndef add(a, b):\n    return a + b\n", ADD)
    assert inside.passes_all


@pytest.mark.parametrize("name, program", [
    ("sleep", "import time\ntime.sleep(3600)"),
    ("busy loop", "while True:\n    pass"),
    ("memory", "x = bytearray(8 * 1024 ** 3)"),
    ("memory, slowly", "x = []\nwhile True:\n    x.append(' ' * 10 ** 7)"),
    ("print 1 GB", "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2 ** 20)"),
    ("write 1 GB to its stdout", "import os\nfor _ in range(1024):\n    os.write(1, b'x' * 2 ** 20)"),
    ("a file of 1 GB", "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'x' * 2 ** 20)"),
    ("a check that hangs", "def add(a, b):\n    while True:\n        pass"),
])
def test_the_sandbox_stops_what_would_not_end(name, program):
    t0 = time.monotonic()
    got = ls.run_candidate(program, ADD, 1.0)
    assert not got.passes_all, name
    assert time.monotonic() - t0 < 4.0, name


def test_on_linux_the_candidate_has_no_network():
    got = ls.run_candidate("x = 1", [])
    assert got.ran
    if os.geteuid() == 0 and os.uname().sysname == "Linux":     # CI: root, so a network namespace
        assert got.network == "namespace"
        assert ls.execute_mode("auto") == "behaviour"
    assert got.network in ("namespace", "audit hooks")
    assert ls.execute_mode("off") == "off" and ls.execute_mode("examples") == "examples"


def test_the_time_budget_holds_for_many_slow_candidates():
    t0 = time.monotonic()
    outs = ls.execute_candidates(["import time\ntime.sleep(60)"] * 8 + [None], ADD, budget_s=1.5, workers=2)
    assert time.monotonic() - t0 < 4.0
    assert outs[-1] is None and all(o is not None and not o.passes_all for o in outs[:-1])


# --- the vote --------------------------------------------------------------------------------------

WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
WRONG2 = "```python\ndef add(a, b):\n    # subtract\n    return a - b\n```"
RIGHT = "```python\ndef add(x, y):\n    total = x + y\n    return total\n```"


def results(*texts):
    return [ls.VoterResult(i, text=t, finish_reason="stop", completion_tokens=20, finished=True)
            for i, t in enumerate(texts)]


def chat(text):
    return ls.ChatRequest(messages=[{"role": "user", "content": text}])


def test_the_executed_vote_picks_the_answer_that_passes_the_prompts_examples():
    prompt = "Write the Python function add.\n" + HUMANEVAL_STYLE
    text_only = ls.Ballot(chat(prompt), "similarity").pick(results(WRONG, WRONG2, RIGHT))
    assert text_only.index in (0, 1)                           # the text vote follows the majority
    ballot = ls.Ballot(chat(prompt), "similarity", execute="examples")
    v = ballot.pick(results(WRONG, WRONG2, RIGHT))
    assert v.index == 2 and v.note.startswith("1 of 3") and v.confidence == pytest.approx(1 / 3, abs=1e-3)
    ex = ballot.execution
    assert ex["checks"] == 2 and ex["passed"] == [0, 0, 2] and ex["ran"] == [0, 1, 2] and ex["seconds"] < 10
    behaviour = ls.Ballot(chat(prompt), "similarity", execute="behaviour")
    assert behaviour.pick(results(WRONG, RIGHT, RIGHT.replace("total", "s"))).index in (1, 2)
    assert behaviour.execution["groups"] == [[1, 2]]


def test_without_checks_code_or_with_tools_nothing_runs():
    for req in (chat("Write add(a, b) in Python."), chat("What is 2 + 2? add(2, 2) == 4"),
                ls.ChatRequest(messages=[{"role": "user", "content": "Write add.\n" + HUMANEVAL_STYLE}],
                               tools=[{"type": "function", "function": {"name": "run", "parameters": {}}}])):
        ballot = ls.Ballot(req, "similarity", "adaptive", execute="behaviour")
        if ballot.checks:            # "What is 2 + 2" asks for no code: no checks either
            pytest.fail(f"checks for {req}")
        assert ballot.execute == "off"
    with_checks = ls.Ballot(chat("Write add.\n" + HUMANEVAL_STYLE), "similarity", "adaptive", execute="examples")
    assert with_checks.checks and with_checks.early


def test_an_early_decision_by_behaviour_stops_the_voters_still_decoding():
    prompt = "Write the Python function add.\n" + HUMANEVAL_STYLE
    same = [outcome([True, True], ["5", "12"])] * 2
    assert "behave alike" in ls.behaviour_settled(same, 1, "strict")
    assert ls.behaviour_settled(same, 2, "strict") is None                   # two outstanding could tie
    assert ls.behaviour_settled([outcome([True, True], ["5", "12"]), outcome([False, True], ["4", "12"])],
                                1, "adaptive") is None                          # one sound answer is no group
    ballot = ls.Ballot(chat(prompt), "similarity", "strict", execute="behaviour")
    done = results(RIGHT, RIGHT.replace("total", "s"))
    assert "behave alike" in ballot.decide(done, 1)
    wrong = ls.Ballot(chat(prompt), "similarity", "strict", execute="behaviour")
    assert wrong.decide(results(WRONG, WRONG2), 1) is None                   # they agree, but fail the examples
    assert ballot.pick(done).index in (0, 1) and set(ballot._outcomes) == {0, 1}   # run once, not again


def test_the_checks_come_from_the_system_text_too_and_never_from_answers():
    req = ls.ChatRequest(messages=[{"role": "system", "content": "Tests: assert add(1, 1) == 2"},
                                   {"role": "user", "content": "Write a Python function add(a, b)."},
                                   {"role": "assistant", "content": "assert add(1, 1) == 3"},
                                   {"role": "user", "content": "Again, please: write the function."}])
    checks = ls.Ballot(req, "similarity", execute="examples").checks
    assert [(c.call, c.expected) for c in checks] == [("add(1, 1)", "2")]


def test_a_request_may_ask_for_it_and_a_bad_mode_is_a_400():
    class S:
        voters, max_voters = 4, 8

        def voters_for(self, req):
            return 4
    assert ls.parse_request({"messages": [{"role": "user", "content": "x"}], "execute": "examples"}, True, S()).execute \
        == "examples"
    with pytest.raises(ls.ApiError) as e:
        ls.parse_request({"messages": [{"role": "user", "content": "x"}], "execute": "yes"}, True, S())
    assert e.value.status == 400 and e.value.param == "execute"


def test_through_the_server_the_answer_says_what_ran(live_server):
    url, app = live_server
    body = {"messages": [{"role": "user", "content": "Write the Python function add.\n" + HUMANEVAL_STYLE}],
            "max_tokens": 120, "temperature": 0.8, "seed": 5, "voters": 4, "execute": "behaviour"}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        got = json.loads(r.read())
    ex = got["x_localswarm"]["execution"]
    assert ex["mode"] == "behaviour" and ex["checks"] == 2 and len(ex["passed"]) == 4
    assert ex["network"] in ("namespace", "audit hooks")
    assert app.swarm.status()["healthy_voters"] == 4
