"""Fill in the middle: the prompt layout per family, the stops, the dialects (/infill in
llama-server's shape, suffix on /v1/completions and /api/generate), and on a real model whose
GGUF declares FIM tokens (a copy of the starter model, make_fim_model): the prompt cache
between keystrokes, cancellation by the next keystroke, the prompt time limit, and requests
shaped as llama.vscode and llama.vim send them."""
import http.client
import json
import threading
import time

import pytest

import localswarm as ls

PRE, SUF, MID, PAD, REP, SEP, BOS = 1, 2, 3, 4, 5, 6, 7
QWEN = ls.FimTokens(PRE, SUF, MID, PAD, REP, SEP)            # repo-level: repo name and file separators
DEEPSEEK = ls.FimTokens(PRE, SUF, MID, bos=BOS)                # markers only, and a BOS


def chars(text):
    """A tokenizer for the layout tests: one token per character (ids from 1000 up)."""
    return [1000 + ord(c) for c in text]


def text_of(tokens):
    names = {PRE: "<PRE>", SUF: "<SUF>", MID: "<MID>", PAD: "<PAD>", REP: "<REP>", SEP: "<SEP>", BOS: "<BOS>"}
    return "".join(names.get(t) or chr(t - 1000) for t in tokens)


# --- the layout, pure ----------------------------------------------------------------------------

def test_prefix_suffix_middle_with_repo_and_file_tokens():
    inp = ls.FimInput("def f(x):\n    ", "\nprint(f(2))\n", extra=(("util.py", "A = 1\n"),), filename="main.py")
    tokens, cut = ls.fim_prompt(QWEN, "psm", inp, chars, 4096)
    assert text_of(tokens) == ("<REP>project\n<SEP>util.py\nA = 1\n<SEP>main.py\n"
                               "<PRE>def f(x):\n    <SUF>\nprint(f(2))\n<MID>")
    assert not cut


def test_suffix_prefix_middle_order_and_a_family_without_file_tokens():
    inp = ls.FimInput("a = ", "\nb = 2\n", extra=(("x.py", "X\n"),))
    tokens, _ = ls.fim_prompt(DEEPSEEK, "spm", inp, chars, 4096)
    assert text_of(tokens) == "<BOS>\n\n--- x.py ---\nX\n<SUF>\nb = 2\n<PRE>a = <MID>"
    with pytest.raises(ls.LocalswarmError, match="order"):
        ls.fim_prompt(DEEPSEEK, "middle-first", inp, chars, 4096)


def test_a_long_prefix_loses_its_start_in_steps_so_keystrokes_keep_the_same_start():
    step = ls.FIM_TRIM_STEP
    prefix = "".join(chr(65 + i % 26) for i in range(3 * step + 10))
    room = 2 * step + 3 + 20
    first, cut = ls.fim_prompt(DEEPSEEK, "psm", ls.FimInput(prefix, ""), chars, room)
    typed, _ = ls.fim_prompt(DEEPSEEK, "psm", ls.FimInput(prefix + "z", ""), chars, room)
    assert cut and len(first) <= room
    dropped = (3 * step + 10) - (len(first) - 3 - 1)        # less BOS, PRE, SUF, MID
    assert dropped % step == 0                               # whole steps from the start
    assert typed[:len(first) - 2] == first[:-2]              # one more character: only the end differs


def test_what_does_not_fit_goes_oldest_chunk_first_and_the_suffix_keeps_its_share():
    inp = ls.FimInput("p" * 40, "s" * 400, extra=(("old.py", "o" * 30), ("new.py", "n" * 30)))
    tokens, cut = ls.fim_prompt(QWEN, "psm", inp, chars, 160)
    text = text_of(tokens)
    assert cut and len(tokens) <= 160
    assert "new.py" in text and "old.py" not in text         # the most relevant (last) chunk stays
    room = 160 - len(chars("project\n")) - 1 - len(chars("file\n")) - 1 - 3
    assert text.count("s") == room // ls.FIM_SUFFIX_SHARE    # the suffix's end goes beyond its share
    assert "p" * 40 in text                                  # the prefix is whole


def test_a_context_too_small_for_any_prompt_is_a_400():
    with pytest.raises(ls.ApiError) as e:
        ls.fim_prompt(QWEN, "psm", ls.FimInput("x"), chars, 8)
    assert e.value.status == 400


def test_fim_tokens_end_a_middle_and_need_all_three_markers():
    assert QWEN.ends() == (PRE, SUF, MID, PAD, REP, SEP) and QWEN.usable
    assert not ls.FimTokens(pre=1, suf=2).usable and not ls.FimTokens().usable


def test_stops_end_the_line_when_asked_and_where_the_model_repeats_the_suffix():
    assert ls.fim_stops(ls.FimInput("x = ", "\n    return total\n", single_line=True)) == ("\n", "\n    return total")
    assert ls.fim_stops(ls.FimInput("x = ", ")\n}\n")) == ()          # too short to mean a repeat
    assert ls.fim_stops(ls.FimInput("x = ", "")) == ()


def test_a_dedented_line_ends_the_text_and_is_held_back_until_its_indent_is_known():
    m = ls.StopMatcher([], min_indent=4)
    assert m.find("a + b\n    c\n", 0) == -1
    text = "a + b\n    c\nprint(1)"
    assert m.find(text, 12) == text.index("\nprint")
    assert m.safe_length("a + b\n  ") == len("a + b")            # could still become a dedent
    assert m.safe_length("a + b\n    c") == len("a + b\n    c")
    assert m.find("x\n\n    y", 0) == -1                           # blank lines are not judged
    assert ls.StopMatcher([]).find("a\nb", 0) == -1                # no rule by default


def test_after_a_line_the_decoding_time_limit_ends_the_answer():
    res = ls.VoterResult(0)
    res.ttft, res.latency = 0.1, 0.5
    assert ls.append_token_text(res, ls.StopMatcher([]), "x", 100, max_predict_s=0.2) is None   # no line yet
    assert ls.append_token_text(res, ls.StopMatcher([]), "\n", 100, max_predict_s=0.2) == "length"
    assert ls.append_token_text(ls.VoterResult(1), ls.StopMatcher([]), "\n", 100, max_predict_s=0.0) is None


# --- the dialects, pure ------------------------------------------------------------------------------

class FakeSwarm:
    voters, max_voters, fim_voters = 4, 16, 1

    def voters_for(self, req):
        return ls.Swarm.voters_for(self, req)


def test_a_completion_with_a_suffix_is_a_fim_request():
    req = ls.parse_request({"prompt": "def f(", "suffix": "):\n", "n_indent": 4, "t_max_predict_ms": 250,
                            "input_extra": [{"filename": "a.py", "text": "A = 1\n", "time": [1, 2]}]},
                           False, FakeSwarm())
    assert req.prompt is None and req.fim == ls.FimInput("def f(", "):\n", (("a.py", "A = 1\n"),), indent=4,
                                                         max_predict_ms=250)
    assert ls.parse_request({"prompt": "x", "suffix": ""}, False, FakeSwarm()).fim is None   # an empty suffix: plain
    for bad in ({"input_extra": [{"text": 3}]}, {"input_extra": "a.py"}, {"n_indent": -1}, {"suffix": 5},
                {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"n": 2}):
        with pytest.raises(ls.ApiError) as e:
            ls.parse_request(dict({"prompt": "x", "suffix": "y"}, **bad), False, FakeSwarm())
        assert e.value.status == 400
    assert ls.parse_request({"prompt": "x", "suffix": "y", "n": 2, "voters": 2}, False, FakeSwarm()).n == 2


def test_infill_bodies_become_the_completions_body():
    body, chat, ask = ls.infill_to_openai({"input_prefix": "a\n", "prompt": "  b", "input_suffix": "c\n",
                                           "n_predict": 16, "t_max_prompt_ms": 500, "samplers": ["top_k"],
                                           "cache_prompt": True, "top_k": 40})
    assert body == {"prompt": "a\n  b", "suffix": "c\n", "fim": True, "input_extra": None, "max_tokens": 16,
                    "t_max_prompt_ms": 500, "top_k": 40, "samplers": ["top_k"]} and chat is False
    assert not ask.prefill_only and ask.fields is None
    warm = ls.infill_to_openai({"input_prefix": "", "input_suffix": "", "n_predict": 0, "response_fields": [""]})
    assert warm[0]["max_tokens"] == 1 and warm[2].prefill_only and warm[2].fields == [""]
    assert ls.infill_to_openai({"input_prefix": "", "n_predict": -1})[0]["max_tokens"] == ls.DEFAULT_MAX_TOKENS
    for bad, param in (({}, "input_prefix"), ({"input_prefix": 1}, "input_prefix"),
                       ({"input_prefix": "", "n_predict": "8"}, "n_predict"),
                       ({"input_prefix": "", "response_fields": "content"}, "response_fields")):
        with pytest.raises(ls.ApiError) as e:
            ls.infill_to_openai(bad)
        assert e.value.status == 400 and e.value.param == param
    assert ls.infill_error(ls.ApiError(400, "no")) == {"error": {"code": 400, "message": "no",
                                                                 "type": "invalid_request_error"}}


def test_response_fields_are_answered_flat_under_their_paths():
    value = {"content": "x", "timings": {"prompt_n": 3, "predicted_n": 2}, "truncated": False}
    assert ls.pick_fields(value, ["content", "timings/prompt_n", "timings/nothing", "truncated"]) == \
        {"content": "x", "timings/prompt_n": 3, "truncated": False}
    assert ls.pick_fields(value, [""]) == {}


def test_ollama_generate_with_a_suffix_fills_in_the_middle():
    body, chat, _ = ls.ollama_generate_to_openai({"model": "m", "prompt": "def f(", "suffix": "):",
                                                  "options": {"num_predict": 8}})
    assert chat is False and body["prompt"] == "def f(" and body["suffix"] == "):" and body["max_tokens"] == 8
    with pytest.raises(ls.ApiError):
        ls.ollama_generate_to_openai({"prompt": "x", "suffix": 3})


def test_the_registry_records_which_families_have_fim():
    reg = ls.load_registry()
    assert {v.family for v in reg if v.fim} == {"qwen2.5-coder", "deepseek-coder", "codellama"}
    assert all(v.fim in ls.FIM_ORDERS for v in reg if v.fim)
    assert not ls.starter_variant(reg).fim
    assert "qwen2.5-coder" in ls.fim_families(reg) and "smollm2" not in ls.fim_families(reg)


def test_ollama_show_tells_clients_that_suffix_works():
    card = ls.ModelCard("m", "gguf", 1, 0.0, "0" * 64, "llama", 1, "Q4_1", 2048, "{{ messages }}", fim=True)
    shown = ls.ollama_show(card)
    assert ".Suffix" in shown["template"] and "{{ messages }}" in shown["template"]
    assert "insert" in shown["capabilities"]
    plain = ls.ollama_show(ls.dataclasses.replace(card, fim=False))
    assert ".Suffix" not in plain["template"] and "insert" not in plain["capabilities"]


# --- on a real model with FIM tokens -------------------------------------------------------------

@pytest.fixture(scope="module")
def fim_model(starter_path, tmp_path_factory):
    return ls.make_fim_model(str(tmp_path_factory.mktemp("fim") / "starter-fim.gguf"), starter_path)


@pytest.fixture(scope="module")
def fim_server(fim_model):
    """The HTTP API on the FIM copy of the starter model (2 voters; FIM requests get one)."""
    engine = ls.LlamaCppEngine(fim_model, voters=2, ctx=4096, parallel=2)
    app = ls.App(ls.load_config(env={}, read_file=False), ls.Swarm(engine, model_id="starter-fim"))
    server = ls.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], app
    server.shutdown()
    server.server_close()
    engine.close()


def call(port, path, body, headers=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


CODE = "".join(f"def handler_{i}(request):\n    value = request.get('field_{i}')\n    return value * {i}\n\n"
               for i in range(60))          # about 1,500 tokens of code before the cursor


def test_the_vocabulary_declares_the_tokens_and_user_text_cannot_spell_them(fim_server):
    _, app = fim_server
    engine = app.swarm.engine
    fim = engine.fim_tokens()
    assert fim.usable and (fim.pre, fim.suf, fim.mid) == tuple(ls.BENCH_FIM_TOKENS[k][0] for k in ("pre", "suf", "mid"))
    req = ls.ChatRequest(fim=ls.FimInput("x = '<fim_middle>'\n", "\ny = 1\n"))
    tokens = app.swarm.prompt_tokens(req)
    assert tokens.count(fim.mid) == 1 and tokens[-1] == fim.mid       # the user's spelling stayed text
    text = b"".join(engine.llm.piece(t, special=True) for t in tokens).decode()
    assert text == "<repo_name>project\n<file_sep>file\n<fim_prefix>x = '<fim_middle>'\n<fim_suffix>\ny = 1\n<fim_middle>"


def test_a_fim_token_ends_the_middle(fim_server):
    _, app = fim_server
    engine = app.swarm.engine
    prompt = app.swarm.prompt_tokens(ls.ChatRequest(fim=ls.FimInput("for i in range(10):\n    ", "\n")))
    params = ls.SamplingParams(temperature=0, max_tokens=6, seed=1)
    free = engine.generate(prompt, params, 1, keep_answers=True)
    engine.remember(free, 0)
    tokens = engine.tokenize_text(free.results[0].text)
    assert len(tokens) >= 3, free.results[0].text
    stopped = engine.generate(prompt, ls.dataclasses.replace(params, stop_tokens=(tokens[2],)), 1)
    r = stopped.results[0]
    assert r.finish_reason == "stop" and r.completion_tokens == 2
    assert r.text == b"".join(engine.llm.piece(t) for t in tokens[:2]).decode()


def test_the_next_keystroke_reads_only_the_end_of_the_prompt(fim_server):
    port, app = fim_server
    body = {"input_prefix": CODE, "prompt": "def handler_x(request):\n    val", "input_suffix": "\n\n",
            "n_predict": 8, "temperature": 0}
    status, first = call(port, "/infill", body)
    assert status == 200, first
    status, second = call(port, "/infill", dict(body, prompt=body["prompt"] + "u"))
    assert status == 200, second
    first, second = json.loads(first), json.loads(second)
    assert first["tokens_evaluated"] > 1400
    cached = second["x_localswarm"]["prompt_tokens_cached"]
    assert cached >= 0.95 * second["tokens_evaluated"], (cached, second["tokens_evaluated"])
    assert second["timings"]["prompt_n"] == second["tokens_evaluated"] - cached


def test_keystrokes_replace_their_prompts_in_the_cache_and_none_goes_to_disk(fim_server):
    """Each keystroke's prompt differs from the last only at the cursor and after: its entry
    replaces the last one's, so typing neither fills the KV slots nor pushes prompts to RAM."""
    _, app = fim_server
    engine = app.swarm.engine
    line = "def handler_y(request):\n    "
    app.swarm.answer(ls.ChatRequest(fim=ls.FimInput(CODE + line, "\n\nx = 1\n"), max_tokens_requested=2))
    before, to_ram = engine.cache_stats()["entries_kv"], engine.counters["prompt_cache_to_ram"]
    for c in "abcdefghij":
        line += c
        ans = app.swarm.answer(ls.ChatRequest(fim=ls.FimInput(CODE + line, "\n\nx = 1\n"), max_tokens_requested=2))
        assert ans.cached_tokens >= ans.prompt_tokens - 12
    assert engine.cache_stats()["entries_kv"] <= before
    assert engine.counters["prompt_cache_to_ram"] == to_ram
    params = app.swarm.fim_params(ls.FimInput("x"), ls.SamplingParams())
    assert params.replaces_source and not params.to_disk and params.stop_tokens == engine.fim_tokens().ends()


def test_a_clients_next_fim_request_cancels_its_last_and_reuses_what_it_read(fim_server):
    _, app = fim_server
    swarm = app.swarm
    with app.swarm.engine._cv:
        app.swarm.engine._cache.entries.clear()          # nothing of CODE cached: the first must read it all
        app.swarm.engine._cache.free_slots = list(range(ls.PROMPT_CACHE_SLOTS))
    app.swarm.engine.llm.clear()
    prefix = CODE.replace("value", "result") * 2          # ~3,000 new tokens: several seconds to read
    first_req = ls.ChatRequest(fim=ls.FimInput(prefix, "\n"), client="editor", max_tokens_requested=8)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("a", app.answer(first_req)))
    t.start()
    deadline = time.monotonic() + 60
    while not swarm.engine.prefill_progress() or swarm.engine.prefill_progress()[0][0] < 600:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    before = app.metrics.fim_superseded
    kept = swarm.engine.counters["prompt_parts_kept"]
    second = app.answer(ls.ChatRequest(fim=ls.FimInput(prefix + "x", "\n"), client="editor", max_tokens_requested=8))
    t.join(60)
    assert all(r.finish_reason == "cancelled" for r in out["a"].results)
    assert app.metrics.fim_superseded == before + 1
    assert swarm.engine.counters["prompt_parts_kept"] == kept + 1
    assert second.cached_tokens >= 512                    # what the first had read
    assert "localswarm_fim_superseded_total" in app.metrics.render(app)
    other = threading.Thread(target=lambda: app.answer(ls.ChatRequest(fim=ls.FimInput("a", "b"), client="other",
                                                                      max_tokens_requested=2)))
    other.start()
    other.join(60)
    assert app.metrics.fim_superseded == before + 1       # another client's request cancels nothing


def test_a_prompt_not_read_in_time_gets_no_answer_but_the_next_request_goes_on_from_it(fim_server):
    port, app = fim_server
    prefix = CODE.replace("request", "req") * 2           # new text: nothing of it is cached
    body = {"input_prefix": prefix, "input_suffix": "\n", "n_predict": 8, "t_max_prompt_ms": 1}
    status, raw = call(port, "/infill", body)
    assert status == 200, raw
    cut = json.loads(raw)
    assert cut["content"] == "" and cut["stop_type"] == "limit" and cut["tokens_predicted"] == 0
    status, raw = call(port, "/infill", dict(body, t_max_prompt_ms=0))
    assert json.loads(raw)["x_localswarm"]["prompt_tokens_cached"] >= 256


def test_the_infill_sampler_ends_a_middle_once_ending_is_likelier(fim_server):
    """llama.vscode and llama.vim ask for llama.cpp's infill sampler (samplers: [..., "infill"])."""
    port, _ = fim_server
    body = {"input_prefix": CODE, "prompt": "def handler_x(request):\n    valu", "input_suffix": "\n\n",
            "n_predict": 32, "temperature": 0, "samplers": ["top_k", "top_p"]}
    plain = json.loads(call(port, "/infill", body)[1])
    ended = json.loads(call(port, "/infill", dict(body, samplers=["top_k", "top_p", "infill"]))[1])
    assert ls.parse_request({"prompt": "x", "samplers": ["infill"]}, False, FakeSwarm()).params.infill
    assert ended["tokens_predicted"] < plain["tokens_predicted"], (ended["content"], plain["content"])


def test_a_request_shaped_as_llama_vscode_sends_it(fim_server):
    """llama.vscode's body (src/llama-server.ts): no response_fields, the whole nested answer."""
    port, _ = fim_server
    chunk = {"text": "def helper():\n    return 42\n", "time": 1733500000000, "filename": "/src/util.py"}
    warm = {"input_prefix": "", "input_suffix": "", "input_extra": [chunk], "prompt": "", "n_predict": 0,
            "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
    status, raw = call(port, "/infill", warm, {"Authorization": "Bearer x"})
    assert status == 200 and json.loads(raw)["content"] == ""
    body = {"input_prefix": "import os\n\n", "input_suffix": "\n\nprint(main())\n", "input_extra": [chunk],
            "prompt": "def main():\n    ", "n_predict": 128, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 500}
    status, raw = call(port, "/infill", body, {"Authorization": "Bearer x"})
    assert status == 200, raw
    got = json.loads(raw)
    assert isinstance(got["content"], str) and got["stop"] is True and got["truncated"] is False
    assert got["stop_type"] in ("eos", "limit", "word")
    assert set(got["timings"]) >= {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
                                   "predicted_per_second"}
    assert got["tokens_cached"] == got["tokens_evaluated"] + got["tokens_predicted"]
    assert got["x_localswarm"]["voters"] == 1                   # FIM: one voter by default
    assert got["x_localswarm"]["prompt_tokens_cached"] >= 10    # the warm-up cached the chunk


def test_a_request_shaped_as_llama_vim_sends_it_gets_flat_fields(fim_server):
    port, _ = fim_server
    fields = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/predicted_n", "timings/predicted_ms",
              "truncated", "tokens_cached"]
    body = {"id_slot": 0, "input_prefix": "x = 1\n", "input_suffix": "\n", "input_extra": [],
            "prompt": "y = ", "n_predict": 16, "stop": [], "n_indent": 0, "top_k": 40, "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 250, "response_fields": fields}
    status, raw = call(port, "/infill", body)
    assert status == 200, raw
    assert set(json.loads(raw)) == set(fields)


def test_a_streamed_infill_sends_text_events_then_the_answer_with_stop(fim_server):
    port, _ = fim_server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/infill", json.dumps({"input_prefix": "def f():\n    ", "input_suffix": "\n",
                                                 "n_predict": 12, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: ")]
    conn.close()
    assert events[-1]["stop"] is True and events[-1]["content"] == "" and "timings" in events[-1]
    assert all(e["stop"] is False for e in events[:-1])
    assert "".join(e["content"] for e in events[:-1]) or events[-1]["tokens_predicted"] <= 1


def test_suffix_on_completions_and_generate_answers_in_their_own_shapes(fim_server):
    port, _ = fim_server
    status, raw = call(port, "/v1/completions", {"prompt": "def f(a, b):\n    return ", "suffix": "\n",
                                                 "max_tokens": 8})
    assert status == 200 and json.loads(raw)["object"] == "text_completion"
    status, raw = call(port, "/api/generate", {"model": "m", "prompt": "def f(a, b):\n    return ", "suffix": "\n",
                                               "stream": False, "options": {"num_predict": 8}})
    got = json.loads(raw)
    assert status == 200 and got["done"] is True and isinstance(got["response"], str)


def test_a_model_without_fim_tokens_gets_a_400_naming_the_models_that_have_them(live_server):
    url, _ = live_server
    port = int(url.rsplit(":", 1)[1])
    status, raw = call(port, "/infill", {"input_prefix": "def f(", "input_suffix": "):\n"})
    err = json.loads(raw)["error"]
    assert status == 400 and err["code"] == 400 and "qwen2.5-coder" in err["message"]
    assert "fill-in-the-middle" in err["message"]
    status, raw = call(port, "/v1/completions", {"prompt": "def f(", "suffix": "):\n"})
    assert status == 400 and json.loads(raw)["error"]["code"] == "fim_not_supported"
    status, raw = call(port, "/api/generate", {"model": "m", "prompt": "def f(", "suffix": "):\n"})
    assert status == 400 and "qwen2.5-coder" in json.loads(raw)["error"]
