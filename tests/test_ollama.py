"""API dialects, Ollama: /api/chat, /api/generate and the model listings translated onto the one
swarm pipeline — the translation as pure functions, then the official ollama client and requests in
the shapes Copilot's and Zed's Ollama providers send, against a real server on the starter model."""
import json
import urllib.error
import urllib.request

import pytest

import localswarm as ls
from conftest import leave_while_voting


def test_a_zed_shaped_chat_becomes_one_openai_chat_body():
    """Zed sends every field, nulls included, tools as [] and tool results by tool_name."""
    body = {"model": "qwen", "stream": True, "keep_alive": -1, "think": None, "tools": [],
            "options": {"num_ctx": 32768, "num_predict": None, "stop": None, "temperature": 1.0, "top_p": None},
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "", "thinking": None, "tool_calls": [
                             {"id": "get_weather-0", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                             {"function": {"name": "get_time", "arguments": {}}}]},
                         {"role": "tool", "tool_name": "get_time", "content": "noon"},
                         {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]}
    out, chat, model = ls.ollama_chat_to_openai(body)
    assert chat and model == "qwen" and out["stream"] is True and out["temperature"] == 1.0
    assert "max_tokens" not in out and "stop" not in out and "tools" not in out and "num_ctx" not in out
    calls = out["messages"][2]["tool_calls"]
    assert calls[0] == {"id": "get_weather-0", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert calls[1]["id"] and calls[1]["id"] != calls[0]["id"] and out["messages"][2]["content"] is None
    # each result goes to the call of its name, not to the order it came in
    assert out["messages"][3] == {"role": "tool", "content": "noon", "tool_call_id": calls[1]["id"]}
    assert out["messages"][4] == {"role": "tool", "content": "sunny", "tool_call_id": "get_weather-0"}


def test_ollama_streams_unless_told_not_to_and_options_map_onto_openais():
    out, _, _ = ls.ollama_chat_to_openai({"messages": [{"role": "user", "content": "hi"}], "options": {
        "num_predict": 7, "top_k": 5, "seed": 3, "stop": ["\n"], "repeat_penalty": 1.1, "num_thread": 8}})
    assert out["stream"] is True and out["max_tokens"] == 7 and out["top_k"] == 5 and out["seed"] == 3
    assert out["stop"] == ["\n"] and out["repeat_penalty"] == 1.1 and "num_thread" not in out
    out, _, _ = ls.ollama_chat_to_openai({"stream": False, "options": {"num_predict": -1},
                                          "messages": [{"role": "user", "content": "hi"}]})
    assert out["stream"] is False and "max_tokens" not in out


def test_generate_is_a_chat_of_system_and_prompt_or_the_raw_prompt():
    out, chat, _ = ls.ollama_generate_to_openai({"prompt": "2+2?", "system": "Be terse.", "template": "{{ .Prompt }}"})
    assert chat and out["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]
    out, chat, _ = ls.ollama_generate_to_openai({"prompt": "<|im_start|>user\nhi", "raw": True, "stream": False})
    assert not chat and out["prompt"] == "<|im_start|>user\nhi" and "messages" not in out
    assert ls.ollama_is_load({"model": "m"}, chat=False) and ls.ollama_is_load({"messages": []}, chat=True)
    assert not ls.ollama_is_load({"prompt": "x"}, chat=False)


@pytest.mark.parametrize("body, match", [
    ({"messages": [{"role": "user", "content": "hi"}], "format": "json"}, "format"),
    ({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 0}}, "num_predict"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": [1]}, "options must be an object"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}]}, "function.name"),
    ({"messages": "hi"}, "messages"),
])
def test_bad_ollama_chats_say_what_is_wrong(body, match):
    with pytest.raises(ls.ApiError) as e:
        ls.ollama_chat_to_openai(body)
    assert e.value.status == 400 and match in e.value.message
    assert ls.ollama_error(e.value) == {"error": e.value.message}


def test_generate_with_a_suffix_is_fill_in_the_middle_and_a_bad_suffix_is_a_400():
    body, chat, _ = ls.ollama_generate_to_openai({"prompt": "def f(", "suffix": "    return x", "raw": True})
    assert (body["prompt"], body["suffix"], chat) == ("def f(", "    return x", False)   # see tests/test_fim.py
    with pytest.raises(ls.ApiError, match="suffix"):
        ls.ollama_generate_to_openai({"prompt": "def f(", "suffix": ["x"]})


def test_show_tells_the_served_context_and_tools(starter_path):
    card = ls.read_model_card(starter_path, 4096)
    show = ls.ollama_show(card)
    arch = show["model_info"]["general.architecture"]
    assert arch == "llama" and show["model_info"]["llama.context_length"] == 4096     # served, not trained (8192)
    assert "tools" in show["capabilities"] and show["details"]["quantization_level"] == "Q4_1"
    assert show["details"]["parameter_size"].endswith("M") and show["template"].startswith("{")
    assert ls.parameter_size(1_540_000_000) == "1.5B" and ls.parameter_size(135_000_000) == "135M"
    assert len(card.digest) == 64


def post(url, path, body, ctype="application/json", method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": ctype} if ctype else {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def olla(live_server):
    ollama = pytest.importorskip("ollama")
    url, _ = live_server
    return ollama.Client(host=url)


def test_the_ollama_client_lists_shows_and_sees_the_model_loaded(olla, live_server):
    url, app = live_server
    listed = olla.list()
    assert [m.model for m in listed.models] == [app.swarm.model_id]
    assert listed.models[0].details.format == "gguf" and listed.models[0].size > 50 * 2 ** 20
    shown = olla.show(app.swarm.model_id)
    assert "tools" in shown.capabilities and shown.modelinfo["llama.context_length"] == app.swarm.engine.ctx_limit
    ps = olla.ps()
    assert ps.models[0].model == app.swarm.model_id and ps.models[0].context_length == app.swarm.engine.ctx_limit


def test_the_ollama_client_chats_and_generates_streamed_and_not(olla):
    r = olla.chat(model="smollm2", messages=[{"role": "user", "content": "Say hi"}], options={"num_predict": 12})
    assert r.done and r.message.role == "assistant" and r.message.content and r.eval_count > 0
    assert r.prompt_eval_count > 0 and r.total_duration > 0 and r.done_reason in ("stop", "length")
    parts = list(olla.chat(model="smollm2", messages=[{"role": "user", "content": "Say hi"}], stream=True,
                           options={"num_predict": 12}))
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and "".join(p.message.content for p in parts)
    g = olla.generate(model="smollm2", prompt="Say hi", options={"num_predict": 8})
    assert g.done and g.response
    parts = list(olla.generate(model="smollm2", prompt="Say hi", stream=True, options={"num_predict": 8}))
    assert parts[-1].done and "".join(p.response for p in parts)
    assert olla.generate(model="smollm2").done_reason == "load"      # a warm-up asks for nothing


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_FN = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                               "parameters": CITY}}


def test_a_tool_call_round_trip_through_api_chat(olla, live_server):
    """A call (tool_choice, our extension, forces one from the starter model) has arguments as an
    object and an id; the ollama client sends it back with the tool's result by tool_name, and the
    follow-up decodes only the new turn."""
    url, _ = live_server
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    status, _, raw = post(url, "/api/chat", {"model": "m", "messages": ask, "tools": [WEATHER_FN], "stream": False,
                                             "tool_choice": "required", "options": {"num_predict": 48}})
    first = json.loads(raw)
    assert status == 200 and first["done"], first
    call = first["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and isinstance(call["function"]["arguments"]["city"], str)
    assert call["id"]
    history = ask + [{"role": "assistant", "content": "", "tool_calls": [{"function": call["function"]}]},
                     {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"}]
    status, _, raw = post(url, "/api/chat", {"model": "m", "messages": history, "tools": [WEATHER_FN],
                                             "stream": False, "options": {"num_predict": 12}})
    follow = json.loads(raw)
    assert status == 200 and follow["x_localswarm"]["prompt_tokens_cached"] >= first["prompt_eval_count"] - 2
    parts = list(olla.chat(model="m", tools=[WEATHER_FN], messages=history, stream=True, options={"num_predict": 12}))
    assert parts[-1].done and parts[-1].prompt_eval_count == follow["prompt_eval_count"]


def test_a_copilot_shaped_discovery(live_server):
    """Copilot's Ollama provider: /api/version (>= 0.6.4, compared part by part), /api/tags'
    models[].model, /api/show {model} for capabilities and <arch>.context_length, then chat over
    /v1/chat/completions."""
    url, app = live_server
    with urllib.request.urlopen(url + "/api/version", timeout=10) as r:
        version = json.loads(r.read())["version"]
    assert [int(p) for p in version.split(".")] >= [0, 6, 4]
    with urllib.request.urlopen(url + "/api/tags", timeout=10) as r:
        model = json.loads(r.read())["models"][0]["model"]
    status, _, raw = post(url, "/api/show", {"model": model})
    info = json.loads(raw)
    assert status == 200 and "tools" in info["capabilities"] and "vision" not in info["capabilities"]
    assert info["model_info"][info["model_info"]["general.architecture"] + ".context_length"] == app.swarm.engine.ctx_limit
    assert info["model_info"]["general.basename"] == model
    status, _, raw = post(url, "/v1/chat/completions", {"model": model, "max_tokens": 8,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"]


def test_a_zed_shaped_stream_is_json_lines_ending_done(live_server):
    url, _ = live_server
    status, headers, raw = post(url, "/api/chat", {
        "model": "m", "stream": True, "keep_alive": -1, "think": None, "tools": [],
        "options": {"num_ctx": 4096, "num_predict": 10, "stop": None, "temperature": 1.0, "top_p": None},
        "messages": [{"role": "user", "content": "Say hi"}]}, ctype=None)     # curl -d: no Content-Type
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert all(set(ln) >= {"model", "created_at", "message", "done"} for ln in lines)
    assert [ln["done"] for ln in lines] == [False] * (len(lines) - 1) + [True]
    last = lines[-1]
    assert last["done_reason"] in ("stop", "length") and last["eval_count"] > 0 and last["prompt_eval_count"] > 0
    assert last["message"] == {"role": "assistant", "content": ""}


def test_ollama_errors_have_ollamas_shape(live_server):
    url, _ = live_server
    two = b'{"model": "m", "stream": false, "messages": [{"role": "user", "content": "a"}]}\n{"model": "m"}\n'
    status, _, raw = post(url, "/api/chat", two)          # JSON lines are not a request body
    assert status == 400 and "invalid JSON" in json.loads(raw)["error"]
    status, _, raw = post(url, "/api/pull", {"model": "qwen2.5-coder:7b"})
    assert status == 400 and "--download-only" in json.loads(raw)["error"]
    status, _, raw = post(url, "/api/delete", {"model": "m"}, method="DELETE")
    assert status == 400 and "delete" in json.loads(raw)["error"]
    status, _, raw = post(url, "/api/embed", {"model": "m", "input": "x"})
    assert status == 400 and "embeddings" in json.loads(raw)["error"]
    status, _, raw = post(url, "/api/show", {})
    assert status == 400 and json.loads(raw) == {"error": "model is required"}
    status, _, raw = post(url, "/api/nothing-here", {})
    assert status == 404 and "no route" in json.loads(raw)["error"]
    status, _, raw = post(url, "/api/tags", {})
    assert status == 405 and "not allowed" in json.loads(raw)["error"]
    status, _, raw = post(url, "/api/generate", {"model": "m", "prompt": "x", "format": "json", "stream": False})
    assert status == 400 and "format" in json.loads(raw)["error"]


def test_a_client_that_leaves_an_ollama_stream_cancels_its_voters(live_server):
    url, app = live_server
    took = leave_while_voting(url, app, {"model": "x", "options": {"num_predict": 1500},
                                         "messages": [{"role": "user", "content": "Write a very long story."}]},
                              path="/api/chat")
    assert took < 10


def test_ollama_routes_keep_the_api_key_and_the_origin_check(live_server):
    url, app = live_server
    app.cfg.set("server.api_key", "sekrit")
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/api/tags", timeout=10)
        assert e.value.code == 401 and "API key" in json.loads(e.value.read())["error"]
        ollama = pytest.importorskip("ollama")
        assert ollama.Client(host=url, headers={"Authorization": "Bearer sekrit"}).list().models
    finally:
        app.cfg.set("server.api_key", "")
    req = urllib.request.Request(url + "/api/chat", b'{"messages": [{"role": "user", "content": "hi"}]}',
                                 {"Origin": "http://evil.example", "Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403 and "cross-origin" in json.loads(e.value.read())["error"]
