"""Tool calls: every format parsed, arguments checked against the schema, and the grammar that
makes calls well-formed — on the real llama.cpp and the starter model, through the swarm and
the HTTP API (opencode's own request and tools included)."""
import json
import os
import random
import subprocess
import sys
import threading
import urllib.request

import pytest

import localswarm as ls
from conftest import FIXTURES, ROOT, free_port, node_log, start_node, wait_http

pytest.importorskip("llama_cpp")

CASES = json.load(open(os.path.join(FIXTURES, "tool_call_outputs.json"), encoding="utf-8"))["cases"]


def tool(name, properties, required=(), **extra):
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": {
        "type": "object", "properties": properties, "required": list(required), **extra}}}


SCHEMAS = {
    "simple": tool("get_weather", {"city": {"type": "string"}}, ["city"]),
    "nested object": tool("create_user", {"user": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}}, ["user"]),
    "array": tool("sum_numbers", {"numbers": {"type": "array", "items": {"type": "number"}}}, ["numbers"]),
    "enum": tool("set_mode", {"mode": {"type": "string", "enum": ["fast", "safe", "off"]}}, ["mode"]),
    "optional": tool("search", {"query": {"type": "string"}, "limit": {"type": "integer"},
                                "exact": {"type": "boolean"}}, ["query"]),
}
QUESTIONS = {"simple": "What is the weather in Paris?", "nested object": "Add a user called Ann who is 31.",
             "array": "Add up 3, 4.5 and 10.", "enum": "Switch to the safe mode.",
             "optional": "Search for python list comprehension."}


def calls_of(ans):
    return [[(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] for _, calls in ans.parsed]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['format']}-{i}" for i, c in enumerate(CASES)])
def test_every_format_parses(case):
    content, calls = ls.parse_tool_calls(case["text"], {n for n, _ in case["calls"]})
    assert [[c["function"]["name"], json.loads(c["function"]["arguments"])] for c in calls] == case["calls"]
    assert content == case.get("content", "")


def test_calls_that_break_the_schema_or_were_not_offered_are_dropped():
    schemas = {"get_weather": SCHEMAS["simple"]["function"]["parameters"]}
    text = '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>'
    assert ls.parse_tool_calls(text, ["get_weather"], schemas) == (text, [])
    assert ls.parse_tool_calls(text.replace("town", "city"), ["get_weather"], schemas)[1]
    assert ls.parse_tool_calls(text.replace("town", "city"), ["other"], schemas) == (text.replace("town", "city"), [])


def test_schema_errors_cover_the_common_keywords():
    s = SCHEMAS["nested object"]["function"]["parameters"]
    assert ls.schema_errors({"user": {"name": "a", "age": 3}}, s) == []
    assert ls.schema_errors({"user": {"name": "a", "age": "3"}}, s) == ["$.user.age must be integer"]
    assert ls.schema_errors({}, s) == ["$.user is required"]
    assert ls.schema_errors({"mode": "x"}, SCHEMAS["enum"]["function"]["parameters"])
    assert ls.schema_errors({"numbers": [1, "2"]}, SCHEMAS["array"]["function"]["parameters"]) == \
        ["$.numbers[1] must be number"]
    assert ls.schema_errors({"a": 1}, {"type": "object", "additionalProperties": False}) == ["$.a is not allowed"]
    assert ls.schema_errors(True, {"type": "integer"}) == ["$ must be integer"]
    assert ls.schema_errors(5, {"anyOf": [{"type": "string"}, {"type": "integer"}]}) == []
    assert ls.schema_errors("x", {"type": "exotic-type", "x-custom": 1}) == []      # unknown: passes


@pytest.mark.parametrize("fmt", ls.GRAMMAR_FORMATS)
@pytest.mark.parametrize("lazy", [False, True], ids=["required", "lazy"])
def test_llama_cpp_accepts_the_grammar_of_every_format(engine, fmt, lazy):
    g = ls.tool_grammar(list(SCHEMAS.values()), fmt, lazy=lazy)
    smpl = engine.llm.new_grammar(g)
    assert smpl is not None, g.text
    engine.llm.free_sampler(smpl)


def test_schemas_the_converter_cannot_express_fall_back_to_any_object(engine):
    weird = tool("odd", {"x": {"$ref": "https://example.com/remote.json"}}, ["x"])
    g = ls.tool_grammar([weird], "hermes")
    smpl = engine.llm.new_grammar(g)
    assert smpl is not None
    engine.llm.free_sampler(smpl)


@pytest.fixture(scope="module")
def swarm(engine):
    return ls.Swarm(engine, model_id="smollm2-135m-q4_1")


def ask(swarm, question, tools, choice, voters=3, **kw):
    req = ls.ChatRequest(messages=[{"role": "user", "content": question}], tools=tools, tool_choice=choice,
                         voters=voters, max_tokens_requested=kw.pop("max_tokens", 96),
                         params=ls.SamplingParams(**kw))
    return swarm.answer(req)


@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_required_always_yields_a_schema_valid_call(swarm, kind):
    t = SCHEMAS[kind]
    ans = ask(swarm, QUESTIONS[kind], [t], "required", temperature=0.8, max_tokens=200, seed=11)
    schema = t["function"]["parameters"]
    for voter, calls in enumerate(calls_of(ans)):
        if ans.results[voter].finish_reason == "length":
            continue            # cut off by max_tokens inside a long string: the vote gates it out
        assert calls, f"voter {voter} answered without a call: {ans.results[voter].text!r}"
        for name, args in calls:
            assert name == t["function"]["name"] and ls.schema_errors(args, schema) == []
    # a grammar bounds the form, not the length: a voter may ramble inside an array until
    # max_tokens; the vote then takes a finished one
    assert any(r.finish_reason == "stop" for r in ans.results)
    assert ans.finish_reason == "tool_calls" and ans.tool_calls


def test_a_named_function_is_the_one_called(swarm):
    tools = [SCHEMAS["simple"], SCHEMAS["enum"]]
    ans = ask(swarm, "What is the weather in Rome?", tools, {"type": "function", "function": {"name": "set_mode"}})
    assert all(calls and {n for n, _ in calls} == {"set_mode"} for calls in calls_of(ans))


def test_one_call_only_when_parallel_calls_are_off(swarm):
    req = ls.ChatRequest(messages=[{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}],
                         tools=[SCHEMAS["simple"]], tool_choice="required", voters=3, parallel_tool_calls=False,
                         max_tokens_requested=120)
    ans = swarm.answer(req)
    assert all(len(calls) == 1 for calls in calls_of(ans))


def test_none_renders_no_tools_and_answers_in_text(swarm):
    req = ls.ChatRequest(messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                         tools=[SCHEMAS["simple"]], tool_choice="none", voters=2, max_tokens_requested=24)
    assert "get_weather" not in swarm.prompt_text(req) and swarm.call_grammar(req) is None
    ans = swarm.answer(req)
    assert ans.tool_calls == [] and ans.finish_reason in ("stop", "length")


def test_the_lazy_grammar_leaves_plain_answers_alone(swarm):
    """Under auto, a voter that answers in prose samples exactly as without the grammar (seeded: both
    runs start from an empty KV cache, so the arithmetic is the same)."""
    texts = {}
    for on in (True, False):
        req = ls.ChatRequest(messages=[{"role": "user", "content": "Say hello to Ann in one sentence."}],
                             tools=[SCHEMAS["simple"]], tool_choice="auto", voters=1, tool_grammar=on,
                             max_tokens_requested=24, params=ls.SamplingParams(temperature=0, seed=7))
        ans = swarm.answer(req)
        texts[on] = ans.results[0].text
    assert texts[True] == texts[False] and "<tool_call>" not in texts[True]


def test_a_started_call_is_held_to_the_schema_under_auto(engine):
    """The lazy grammar lets anything through until a call opens; from the opening tag on, only
    what continues a valid call is allowed."""
    llm, t = engine.llm, SCHEMAS["array"]
    g = llm.new_grammar(ls.tool_grammar([t], "hermes", lazy=True))
    try:
        first = llm.tokenize("Hello", add_special=False)[0]
        assert llm._allowed(g, first)                       # awaiting the trigger: free text
        # the token that completes the tag may carry a newline: the grammar must take it (llama.cpp
        # feeds it unchecked and would abort the process if refused)
        for tok in llm.tokenize("Sure.\n<tool_call>\n", add_special=False):
            llm.L.llama_sampler_accept(g, tok)
        brace = llm.tokenize("{", add_special=False)[0]
        assert llm._allowed(g, brace) and not llm._allowed(g, first)
        assert not llm._allowed(g, llm.L.llama_vocab_eos(llm.vocab))    # no ending mid-call
    finally:
        llm.free_sampler(g)


@pytest.mark.parametrize("text, whole_vocab", [("Paris", False), ("zqxjv-unlikely", True)],
                         ids=["likely", "unlikely"])
def test_a_refused_token_is_resampled_among_the_allowed(starter_path, text, whole_vocab, monkeypatch):
    """A sampled token the grammar refuses is replaced by an allowed one, whether an allowed
    token is among the likeliest few (the cheap look) or only elsewhere in the vocabulary."""
    llm = ls.LlamaAdapter(starter_path, n_ctx=256, n_seq_max=1)
    looks = []
    monkeypatch.setattr(llm, "_candidates", lambda idx, f=llm._candidates: looks.append(idx) or f(idx))
    prompt = llm.tokenize("<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n")
    g = llm.new_grammar(ls.Grammar(f'root ::= "{text}"'))
    sampler = llm.new_sampler(ls.SamplingParams(temperature=0.8), seed=3)
    llm.seq_rm(0)
    try:
        out = []
        for i in range(len(prompt)):
            assert llm.decode([(prompt[i], i, 0, i == len(prompt) - 1)]) == 0
        pos = len(prompt)
        text_of = lambda toks: b"".join(llm.piece(t) for t in toks).decode()
        while len(text_of(out)) < len(text):
            out.append(llm.sample(sampler, 0, g))
            assert llm.decode([(out[-1], pos, 0, True)]) == 0
            pos += 1
        assert text_of(out) == text
        assert bool(looks) == whole_vocab
    finally:
        llm.free_sampler(g)
        llm.free_sampler(sampler)
        llm.close()


def post(url, body, stream=False):
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        if not stream:
            return json.loads(r.read())
        return [json.loads(line[6:]) for line in r.read().decode().splitlines()
                if line.startswith("data: {")]


def streamed_calls(chunks):
    """Reassemble delta.tool_calls the way OpenAI clients do."""
    calls = {}
    for c in chunks:
        for ch in c.get("choices", []):
            for d in ch["delta"].get("tool_calls") or []:
                cur = calls.setdefault(d["index"], {"name": "", "arguments": ""})
                fn = d.get("function") or {}
                cur["name"] += fn.get("name") or ""
                cur["arguments"] += fn.get("arguments") or ""
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_streamed_and_non_streamed_calls_agree(live_server):
    url, _ = live_server
    body = {"model": "localswarm", "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [SCHEMAS["simple"]], "tool_choice": "required", "temperature": 0, "voters": 2,
            "max_tokens": 60}
    plain = post(url, body)
    msg = plain["choices"][0]["message"]
    expected = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]]
    chunks = post(url, dict(body, stream=True), stream=True)
    assert streamed_calls(chunks) == expected and expected
    assert plain["choices"][0]["finish_reason"] == "tool_calls"
    assert [ch["finish_reason"] for c in chunks for ch in c.get("choices", []) if ch["finish_reason"]] == ["tool_calls"]


@pytest.fixture(scope="module")
def opencode_server(starter_path):
    """A server with room for opencode's ~7,600-token prompt (its own engine)."""
    eng = ls.LlamaCppEngine(starter_path, voters=2, ctx=9216, parallel=1)
    app = ls.App(ls.load_config(env={}, read_file=False), ls.Swarm(eng, model_id="smollm2-135m-q4_1"))
    server = ls.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    eng.close()


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_opencode_request_gets_schema_valid_streamed_calls(opencode_server, choice):
    """opencode's captured agent request (its 10 tools, JSON Schemas with $schema, enums,
    optional fields): every call the swarm returns is valid against its tool's schema and
    arrives as delta.tool_calls. Under required the starter model must call; under auto it may not."""
    fixture = json.load(open(os.path.join(FIXTURES, "opencode_session.json")))["requests"]
    body = next(r["body"] for r in fixture if r["kind"] == "main")
    body = dict(body, model="localswarm", tool_choice=choice, max_tokens=96)
    chunks = post(opencode_server, body, stream=True)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in body["tools"]}
    calls = streamed_calls(chunks)
    for name, args in calls:
        assert ls.schema_errors(args, schemas[name]) == [], (name, args)
    finish = [ch["finish_reason"] for c in chunks for ch in c.get("choices", []) if ch["finish_reason"]]
    assert finish == (["tool_calls"] if calls else ["stop"]) or finish == ["length"] and not calls
    if choice == "required":
        assert calls and finish == ["tool_calls"]


# --- hostile schemas (hardening round 3, finding 1) ------------------------------------------
def hostile_schemas() -> list:
    """Schemas a client could send to make the grammar huge or deep; each must still give
    llama.cpp a grammar it parses (the arguments are then checked after the fact)."""
    deep_obj, deep_arr = {"type": "string"}, {"type": "string"}
    for _ in range(500):
        deep_obj = {"type": "object", "properties": {"a": deep_obj}, "required": ["a"]}
        deep_arr = {"type": "array", "items": deep_arr, "minItems": 1}
    node = {"$defs": {"n": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/n"}}}},
            "$ref": "#/$defs/n"}
    big = 20000
    out = [{"type": "string", "maxLength": big}, {"type": "string", "minLength": big},
           {"type": "string", "minLength": 3, "maxLength": 10 ** 18}, {"type": "string", "maxLength": 5000},
           {"type": "array", "items": {"type": "string"}, "maxItems": big},
           {"type": "array", "items": {"type": "integer"}, "minItems": big},
           {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 60, "maxItems": 64},
           {"type": "string", "pattern": "^a{%d}$" % big}, {"type": "string", "pattern": "^a{0,%d}$" % big},
           {"type": "string", "pattern": "^(a{50}){50}$"}, {"type": "string", "pattern": "^((ab{60}){60}){60}$"},
           {"type": "string", "pattern": "x" * 100000}, {"type": "string", "pattern": "[" * 3000},
           {"type": "string", "pattern": "(" * 3000 + "a" + ")" * 3000},
           {"type": "string", "pattern": "a{2,1}"}, {"type": "string", "pattern": "\\"},
           {"type": "string", "pattern": "(?P<x>a)(?=b)"}, {"type": "string", "pattern": "a**{3}"},
           deep_obj, deep_arr, node, {"$ref": "#"}, {"$ref": "#/$defs/missing"},
           {"type": "string", "enum": [f"value-{i}" for i in range(5000)]},
           {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}},
           {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(200)},
            "required": [f"p{i}" for i in range(200)]},
           {"anyOf": [{"const": i} for i in range(5000)]}, {"const": "x" * 300000},
           {"type": ["string", "integer", "null"], "maxLength": big},
           {"type": "object", "properties": [1, 2]}, {"type": "array", "items": 5, "maxItems": "many"},
           {"type": "object", "required": "x", "additionalProperties": {"type": "string", "maxLength": big}},
           {"oneOf": [{"type": "string", "maxLength": big}] * 3}, {"allOf": [deep_obj, deep_arr]}]
    rng = random.Random(34)
    for _ in range(150):                   # random mixtures of the same ingredients
        s = rng.choice(out)
        for _ in range(rng.randint(1, 4)):
            s = rng.choice([{"type": "object", "properties": {"x": s, "y": rng.choice(out)}},
                            {"type": "array", "items": s, "maxItems": rng.choice([3, 100, big])},
                            {"anyOf": [s, rng.choice(out)]}])
        out.append(s)
    return out


FUZZ_CHILD = r"""
import ctypes, json, sys, threading
import llama_cpp as L
import localswarm as ls
from test_tools import hostile_schemas
mp = L.llama_model_default_params(); mp.vocab_only = True
model = L.llama_model_load_from_file(ls.starter_model_path().encode(), mp)
vocab = L.llama_model_get_vocab(model)
report = {"schemas": 0, "grammars": 0, "parsed": 0, "largest": 0, "deepest": 0}
def run():
    for i, schema in enumerate(hostile_schemas()):
        report["schemas"] += 1
        tools = [{"type": "function", "function": {"name": f"t{i}", "parameters": {"type": "object",
                  "properties": {"x": schema}, "required": ["x"]}}},
                 {"type": "function", "function": {"name": "whole", "parameters": schema}}]
        for fmt in ls.GRAMMAR_FORMATS:
            for lazy in (False, True):
                g = ls.tool_grammar(tools, fmt, lazy=lazy)
                report["grammars"] += 1
                report["largest"] = max(report["largest"], len(g.text))
                report["deepest"] = max(report["deepest"], ls.grammar_depth(g.text))
                if g.triggers:
                    pats = (ctypes.c_char_p * len(g.triggers))(*[t.encode() for t in g.triggers])
                    smpl = L.llama_sampler_init_grammar_lazy_patterns(vocab, g.text.encode(), b"root", pats,
                                                                      len(g.triggers), None, 0)
                else:
                    smpl = L.llama_sampler_init_grammar(vocab, g.text.encode(), b"root")
                if smpl:
                    report["parsed"] += 1
                    L.llama_sampler_free(smpl)
                else:
                    print("refused by llama.cpp:", i, fmt, lazy, file=sys.stderr)
t = threading.Thread(target=run)      # the engine builds samplers on a thread of its own, too
t.start(); t.join()
print(json.dumps(report))
"""


def test_hostile_tool_schemas_never_crash_llama_cpps_grammar_parser():
    """Run in a child: a stack overflow in llama.cpp must fail this test, not kill pytest."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.run([sys.executable, "-c", FUZZ_CHILD], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["schemas"] >= 180 and report["parsed"] == report["grammars"], proc.stderr[-2000:]
    assert report["largest"] <= ls.GRAMMAR_MAX_BYTES + 1000 and report["deepest"] <= ls.GRAMMAR_MAX_DEPTH


def test_bounded_schema_drops_only_the_bounds_the_grammar_cannot_hold():
    s = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 20000, "minLength": 2,
                                                "pattern": "^a{0,9000}$"},
                                          "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 8}},
         "required": ["a"]}
    assert ls.bounded_schema(s) == {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "string", "minLength": 2}, "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 8}}}
    assert ls.bounded_schema({"pattern": "^[0-9a-f]{8}-[0-9a-f]{4}$"}) == {"pattern": "^[0-9a-f]{8}-[0-9a-f]{4}$"}
    assert ls.bounded_schema({"type": "object", "properties": {f"p{i}": {} for i in range(300)}}) == {"type": "object"}
    assert ls.grammar_depth('a ::= ("(" ([a-z(] b)?)? "\\"("') == 2


def test_the_request_that_crashed_the_server_is_answered_by_a_real_server(starter_path):
    """A real server process: the request that killed it (SIGSEGV in the engine thread, no
    log line) is answered, and the server still serves after it."""
    port = free_port()
    node = start_node(["--model-path", starter_path, "--voters", "2", "--ctx", "2048", "--port", str(port),
                       "--yes", "-q"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout=120)
        for key in ("maxLength", "pattern"):
            text = {"type": "string", "maxLength": 100000} if key == "maxLength" else \
                {"type": "string", "pattern": "^a{0,50000}$"}
            tools = [{"type": "function", "function": {"name": "write", "parameters": {
                "type": "object", "properties": {"text": text}, "required": ["text"]}}}]
            body = {"messages": [{"role": "user", "content": "write hi"}], "tools": tools,
                    "tool_choice": "required", "max_tokens": 24, "temperature": 0}
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.status == 200
        assert wait_http(url + "/health", timeout=10)["status"] == "ok"
        assert node.poll() is None, node_log(node)
    finally:
        node.terminate()
        node.wait(30)
