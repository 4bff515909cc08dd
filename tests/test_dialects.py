"""API dialects, agents: the Anthropic Messages API and the OpenAI Responses API translated onto
the one swarm pipeline — the translation as pure functions, then the official anthropic and openai
SDKs, Claude Code and Codex themselves against a real server on the starter model (votes, tool
calls, the prompt cache, streaming, errors)."""
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request

import pytest

import localswarm as ls
from conftest import ROOT, free_port, leave_while_voting, node_log, start_node, wait_http

CLAUDE = os.path.join(ROOT, ".cache", "claude-code", "node_modules", ".bin", "claude")
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


# --- the translation (pure) ----------------------------------------------------------------
def test_a_claude_code_shaped_request_becomes_one_openai_chat_body():
    body = {"model": "claude-x", "max_tokens": 32000, "stream": True, "temperature": 1, "metadata": {"user_id": "u"},
            "thinking": {"type": "enabled", "budget_tokens": 100}, "context_management": {"edits": []},
            "output_config": {"effort": "high"},
            "system": [{"type": "text", "text": "You are Claude Code."},
                       {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}}],
            "tools": [dict(WEATHER, cache_control={"type": "ephemeral"}, defer_loading=False),
                      {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            "stop_sequences": ["\nUser:"],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                {"role": "system", "content": "<system-reminder>today is Sunday</system-reminder>"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And tomorrow?", "cache_control": {"type": "ephemeral"}}]},
            ]}
    out = ls.anthropic_to_openai(body)
    assert out["messages"] == [
        {"role": "system", "content": "You are Claude Code.\n\nBe careful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "system", "content": "<system-reminder>today is Sunday</system-reminder>"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"}]
    assert [t["function"]["name"] for t in out["tools"]] == ["get_weather"]          # the server tool is skipped
    assert out["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert out["tool_choice"] == "auto" and out["parallel_tool_calls"] is False
    assert out["max_tokens"] == 32000 and out["stop"] == ["\nUser:"] and out["stream"] is True
    assert "thinking" not in out and "metadata" not in out


@pytest.mark.parametrize("choice, expect", [({"type": "any"}, "required"), ({"type": "none"}, "none"),
                                            ({"type": "tool", "name": "get_weather"},
                                             {"type": "function", "function": {"name": "get_weather"}})])
def test_tool_choice_maps_onto_openais(choice, expect):
    out = ls.anthropic_to_openai({"max_tokens": 5, "tools": [WEATHER], "tool_choice": choice,
                                  "messages": [{"role": "user", "content": "hi"}]})
    assert out["tool_choice"] == expect


def test_an_error_result_says_so_and_a_string_result_is_kept():
    body = {"max_tokens": 5, "messages": [
        {"role": "user", "content": "run it"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "Bash", "input": {"command": "x"}},
                                          {"type": "tool_use", "id": "b", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "not found", "is_error": True},
                                     {"type": "tool_result", "tool_use_id": "b"}]}]}
    msgs = ls.anthropic_to_openai(body)["messages"]
    assert msgs[-2:] == [{"role": "tool", "tool_call_id": "a", "content": "Error: not found"},
                         {"role": "tool", "tool_call_id": "b", "content": ""}]


@pytest.mark.parametrize("body, match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens: Field required"),
    ({"max_tokens": 5, "messages": []}, "messages: must be a non-empty array"),
    ({"max_tokens": 5, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
     "messages.0.content.0: expected a text block"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "image blocks need a model that reads them"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]},
     "no tool_use in the previous assistant message"),
    ({"max_tokens": 5, "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "hi"}]},
     "tools.0: needs a name and an input_schema"),
    ({"max_tokens": 5, "tool_choice": {"type": "sometimes"}, "messages": [{"role": "user", "content": "hi"}]},
     "tool_choice"),
    ({"max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]}, "temperature"),
    ([1], "must be a JSON object"),
])
def test_bad_anthropic_requests_name_the_field(body, match):
    with pytest.raises(ls.ApiError, match=match) as e:
        ls.anthropic_to_openai(body)
    assert e.value.status == 400
    assert ls.anthropic_error(e.value)["error"]["type"] == "invalid_request_error"


def test_a_tool_result_with_an_unhashable_id_is_a_400():
    body = {"max_tokens": 4, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": ["t1"], "content": "x"}]}]}
    with pytest.raises(ls.ApiError, match="tool_use_id") as e:
        ls.anthropic_to_openai(body)
    assert e.value.status == 400


def test_errors_take_anthropics_types():
    assert ls.anthropic_error(ls.ApiError(401, "no"))["error"]["type"] == "authentication_error"
    assert ls.anthropic_error(ls.BusyError())["error"]["type"] == "overloaded_error"
    assert ls.anthropic_error(ls.ApiError(500, "x"))["error"]["type"] == "api_error"
    assert ls.anthropic_error(ls.ApiError(413, "x")) == {"type": "error", "error": {"type": "request_too_large",
                                                                                    "message": "x"}}


# --- the anthropic SDK against a real server -------------------------------------------------
@pytest.fixture(scope="module")
def client(live_server):
    anthropic = pytest.importorskip("anthropic")
    url, app = live_server
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0), app


def test_messages_create_answers_with_a_vote_and_real_usage(client):
    c, app = client
    m = c.messages.create(model="claude-sonnet-4", max_tokens=16, extra_body={"temperature": 0.7},
                          system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                          messages=[{"role": "user", "content": "Say hi"}])
    assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.output_tokens > 0
    extra = m.model_extra["x_localswarm"]
    assert extra["voters"] == 4 and len(extra["per_voter"]) == 4
    count = c.messages.count_tokens(model="x", system=[{"type": "text", "text": "Be brief."}],
                                    messages=[{"role": "user", "content": "Say hi"}])
    assert count.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_a_stop_sequence_is_reported_as_one(client):
    c, _ = client
    m = c.messages.create(model="x", max_tokens=40, extra_body={"temperature": 0}, stop_sequences=["e"],
                          messages=[{"role": "user", "content": "Write the word hello three times."}])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "e", m
    assert "e" not in m.content[0].text


def test_the_stream_has_anthropics_events_in_order(client):
    c, _ = client
    with c.messages.stream(model="x", max_tokens=12, messages=[{"role": "user", "content": "Say hi"}]) as s:
        kinds = [ev.type for ev in s if ev.type != "text"]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1:-2] == ["content_block_start"] + ["content_block_delta"] * (len(kinds) - 5) + ["content_block_stop"]
    assert final.content[0].text and final.usage.output_tokens > 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_tool_round_trip_reuses_the_cached_prompt(client, stream):
    """tool_choice any: a schema-valid tool_use; its tool_result follow-up decodes only the new turn."""
    c, _ = client
    ask = dict(model="x", max_tokens=48, tools=[WEATHER], messages=[{"role": "user", "content": "Weather in Paris?"}])
    if stream:
        with c.messages.stream(tool_choice={"type": "any"}, **ask) as s:
            kinds = [ev.type for ev in s]
            first = s.get_final_message()
        assert "input_json" in kinds or "content_block_delta" in kinds
    else:
        first = c.messages.create(tool_choice={"type": "any"}, **ask)
    use = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and use and use[0].name == "get_weather"
    assert isinstance(use[0].input.get("city"), str)
    follow = c.messages.create(model="x", max_tokens=12, tools=[WEATHER], messages=ask["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "sunny, 21 C"}]}])
    total = follow.usage.input_tokens + follow.usage.cache_read_input_tokens
    assert follow.usage.cache_read_input_tokens >= first.usage.input_tokens + first.usage.cache_read_input_tokens - 2
    assert follow.usage.input_tokens < total / 2


def test_routing_ignores_the_query_and_errors_have_anthropics_shape(live_server):
    url, _ = live_server
    req = urllib.request.Request(url + "/v1/messages?beta=true", json.dumps(
        {"model": "x", "messages": [{"role": "user", "content": "hi"}]}).encode(), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read()) == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
    req = urllib.request.Request(url + "/v1/messages", b"{not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    body = json.loads(e.value.read())
    assert e.value.code == 400 and body["type"] == "error" and "invalid JSON" in body["error"]["message"]


def test_the_api_key_may_come_as_x_api_key(live_server):
    anthropic = pytest.importorskip("anthropic")
    url, app = live_server
    app.cfg.set("server.api_key", "sekrit")
    try:
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
                model="x", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["error"]["type"] == "authentication_error"
        m = anthropic.Anthropic(base_url=url, api_key="sekrit", max_retries=0).messages.create(
            model="x", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert m.content
    finally:
        app.cfg.set("server.api_key", "")


def test_a_client_that_leaves_a_messages_stream_cancels_its_voters(live_server):
    url, app = live_server
    took = leave_while_voting(url, app, {"model": "x", "max_tokens": 1500, "stream": True,
                                         "messages": [{"role": "user", "content": "Write a very long story."}]},
                              until=b"message_start", path="/v1/messages")
    assert took < 10


def test_metrics_count_requests_per_api(live_server):
    url, _ = live_server
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'endpoint="messages"' in text and 'endpoint="count_tokens"' in text


# --- Claude Code itself ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def claude_server(starter_path):
    port = free_port()
    node = start_node(["--model-path", starter_path, "--voters", "4", "--ctx", "8192", "--port", str(port),
                       "--yes", "-q"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=120)
        yield url, node
    finally:
        node.terminate()
        node.wait(30)


def claude(url, *args, timeout=420):
    home = tempfile.mkdtemp(prefix="claude-home-")
    env = dict(os.environ, ANTHROPIC_BASE_URL=url, ANTHROPIC_AUTH_TOKEN="unused", HOME=home,
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", CLAUDE_CODE_MAX_OUTPUT_TOKENS="400")
    run = subprocess.run([CLAUDE, "-p", *args, "--model", "smollm2-135m-q4_1", "--output-format", "json"],
                         cwd=home, env=env, capture_output=True, text=True, timeout=timeout)
    return run


@pytest.mark.skipif(not os.path.exists(CLAUDE), reason="Claude Code is not installed; ./install.sh --test "
                    "installs it into .cache/claude-code")
def test_claude_code_answers_headless(claude_server):
    url, node = claude_server
    run = claude(url, "Reply with one word: hello", "--tools", "", "--system-prompt", "You answer in one word.")
    assert run.returncode == 0, run.stderr[-2000:] + node_log(node)
    out = json.loads(run.stdout)
    assert out["is_error"] is False and out["result"].strip(), out
    assert out["usage"]["output_tokens"] > 0


CODEX = os.path.join(ROOT, ".cache", "codex", "node_modules", ".bin", "codex")


@pytest.mark.skipif(not os.path.exists(CODEX), reason="Codex is not installed; ./install.sh --test installs it "
                    "into .cache/codex")
def test_codex_exec_answers_over_the_responses_api(claude_server):
    """Codex as a user runs it against a provider of its config: its ~41 KB request (instructions
    as developer messages, 9 tools of which web_search and the namespaces are skipped), streamed."""
    url, node = claude_server
    home = tempfile.mkdtemp(prefix="codex-home-")
    provider = f'model_providers.ls={{name="ls",base_url="{url}/v1",env_key="LS_KEY",wire_api="responses"}}'
    run = subprocess.run([CODEX, "exec", "--skip-git-repo-check", "-m", "smollm2-135m-q4_1", "-c", "model_provider=ls",
                          "-c", provider, "-c", "model_context_window=8192", "Reply with one word: hello"],
                         cwd=home, env=dict(os.environ, HOME=home, LS_KEY="unused"), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:] + node_log(node)
    assert "tokens used" in run.stderr and "ERROR" not in run.stderr, run.stderr[-3000:]
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'endpoint="responses",status="200"' in metrics.replace(" ", ""), metrics[-2000:]


# --- OpenAI Responses ------------------------------------------------------------------------
SHELL = {"type": "function", "name": "exec_command", "description": "Run a shell command.",
         "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}


def test_a_codex_shaped_request_becomes_one_openai_chat_body():
    body = {"model": "gpt-5-codex", "instructions": "You are Codex.", "store": False, "stream": True,
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "client_metadata": {"a": 1},
            "reasoning": {"effort": "low"}, "tool_choice": "auto", "parallel_tool_calls": False,
            "tools": [SHELL, {"type": "web_search"}, {"type": "namespace", "name": "mcp__x", "tools": []}],
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: on."}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List files."}]},
                {"type": "reasoning", "summary": [], "encrypted_content": "x"},
                {"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": '{"cmd": "ls"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "a.py\nb.py"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Two files."}]}]}
    out, skipped = ls.responses_to_openai(body)
    assert skipped == ["web_search", "mcp__x"]
    assert out["messages"] == [
        {"role": "system", "content": "You are Codex."}, {"role": "system", "content": "Sandbox: on."},
        {"role": "user", "content": "List files."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "exec_command", "arguments": '{"cmd": "ls"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.py\nb.py"},
        {"role": "assistant", "content": "Two files."}]
    assert [t["function"]["name"] for t in out["tools"]] == ["exec_command"] and out["parallel_tool_calls"] is False


@pytest.mark.parametrize("body, match", [
    ({"input": []}, "'input' must be a string or a non-empty array"),
    ({"input": [{"type": "function_call_output", "call_id": "x", "output": "y"}]}, "no function_call with call_id"),
    ({"input": [{"type": "mystery"}]}, "unknown item type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "reads text only"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "not stored here"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"},
                {"type": "function_call_output", "call_id": {"a": 1}, "output": "y"}]}, "no function_call"),
])
def test_bad_responses_requests_name_the_field(body, match):
    with pytest.raises(ls.ApiError, match=match) as e:
        ls.responses_to_openai(body)
    assert e.value.status == 400


def test_call_arguments_sent_as_an_object_stay_json():
    out, _ = ls.responses_to_openai({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                                                "arguments": {"path": "a.py"}}]})
    assert json.loads(out["messages"][0]["tool_calls"][0]["function"]["arguments"]) == {"path": "a.py"}


def test_fastest_streams_in_other_dialects_show_the_answer_they_end_with(oai):
    """fastest would show one voter and end with the vote's pick; these dialects stream live."""
    with oai.responses.stream(model="x", input="Tell me a joke", max_output_tokens=24,
                              extra_body={"stream_mode": "fastest", "temperature": 1.0}) as s:
        deltas = "".join(ev.delta for ev in s if ev.type == "response.output_text.delta")
        final = s.get_final_response()
    assert deltas == final.output_text and final.model_extra["x_localswarm"]["voters"] == 4


@pytest.fixture(scope="module")
def oai(live_server):
    openai = pytest.importorskip("openai")
    url, _ = live_server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_responses_create_and_stream_answer_with_the_vote(oai):
    r = oai.responses.create(model="x", input="Say hi", max_output_tokens=16)
    assert r.status in ("completed", "incomplete") and r.output_text and r.usage.output_tokens > 0
    assert r.model_extra["x_localswarm"]["voters"] == 4
    with oai.responses.stream(model="x", input="Say hi", max_output_tokens=12) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",)

    assert "response.output_text.delta" in kinds and final.output_text
    assert oai.post("/responses/input_tokens", body={"model": "x", "input": "Say hi"},
                    cast_to=object)["input_tokens"] == r.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_function_call_round_trip_through_responses(oai, stream):
    ask = dict(model="x", input=[{"role": "user", "content": "List the files here."}], max_output_tokens=48,
               tools=[SHELL, {"type": "web_search"}], tool_choice="required")
    if stream:
        with oai.responses.stream(**ask) as s:
            kinds = [ev.type for ev in s]
            first = s.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
    else:
        first = oai.responses.create(**ask)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and calls[0].name == "exec_command" and isinstance(json.loads(calls[0].arguments)["cmd"], str)
    assert first.model_extra["x_localswarm"]["skipped_tools"] == ["web_search"]
    follow = oai.responses.create(model="x", max_output_tokens=12, tools=[SHELL], input=ask["input"] + [
        {"type": "function_call", "call_id": calls[0].call_id, "name": "exec_command", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "a.py"}])
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 2


def test_responses_errors_are_openais_shape(live_server):
    url, _ = live_server
    req = urllib.request.Request(url + "/v1/responses", json.dumps({"input": [{"type": "mystery"}]}).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    body = json.loads(e.value.read())
    assert e.value.code == 400 and body["error"]["type"] == "invalid_request_error" and "mystery" in body["error"]["message"]
