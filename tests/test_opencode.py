"""The real opencode client (npm opencode-ai) against a real localswarm server on the starter
model, headless and offline. ./install.sh --test installs opencode into .cache/opencode."""
import json
import os
import subprocess
import tempfile
import urllib.request

import pytest

from capture_opencode_session import offline_home
from conftest import ROOT, free_port, node_log, start_node, wait_http

OPENCODE = os.path.join(ROOT, ".cache", "opencode", "node_modules", ".bin", "opencode")
MODEL_ID = "smollm2-135m-q4_1"


def cached_tokens(port: int) -> int:
    """The server's count of prompt tokens reused from its prompt cache (/metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("localswarm_prompt_tokens_cached_total "):
                return int(float(line.split()[1]))
    raise AssertionError("no localswarm_prompt_tokens_cached_total in /metrics")


def printed_snippet(log: str) -> dict:
    """The opencode.json the server printed at start-up."""
    text = log[log.index("opencode.json:") + len("opencode.json:"):]
    return json.JSONDecoder().raw_decode(text.strip())[0]


@pytest.mark.skipif(not os.path.exists(OPENCODE), reason="opencode is not installed (npm missing); "
                    "./install.sh --test installs it into .cache/opencode")
def test_opencode_run_against_localswarm():
    """A first run as a new user has it, offline: the planned model cannot be fetched, the starter
    model is served, and the opencode.json the server prints is used as it is."""
    port = free_port()
    node = start_node(["--voters", "2", "--parallel", "1", "--port", str(port), "--yes", "-q"],
                      env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})      # nothing listens there
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        config = printed_snippet(node_log(node, tail=20000))
        model = config["model"].split("/", 1)[1]
        assert model == MODEL_ID, config          # the model actually served, not the planned one
        with tempfile.TemporaryDirectory() as work:
            with open(os.path.join(work, "opencode.json"), "w") as f:
                json.dump(config, f)
            # opencode takes its project directory from $PWD, not from the process cwd
            env = dict(os.environ, PWD=work, **offline_home(os.path.join(work, "home")))
            run = subprocess.run([OPENCODE, "run", "--format", "json", "--model", config["model"],
                                  "Say", "hello", "in", "one", "short", "sentence."],
                                 cwd=work, env=env, capture_output=True, text=True, timeout=420)
            events = [json.loads(l) for l in run.stdout.splitlines() if l.startswith("{")]
            logs = ""
            logdir = os.path.join(env["XDG_DATA_HOME"], "opencode", "log")
            for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
                with open(os.path.join(logdir, name), errors="replace") as f:
                    logs += f.read()[-3000:]
            assert run.returncode == 0, run.stderr[-2000:] + logs
            finishes = [e for e in events if e.get("type") == "step_finish"]
            assert finishes, f"no step_finish in {run.stdout[-2000:]}"
            reason = finishes[-1].get("part", {}).get("reason") or finishes[-1].get("reason")
            assert reason == "stop", finishes[-1]
            assert any(e.get("type") == "text" for e in events)
            # The next turn of the same session resends the conversation: its ~7,600-token prefix
            # comes from the prompt cache, not decoded again.
            before = cached_tokens(port)
            again = subprocess.run([OPENCODE, "run", "--continue", "--format", "json", "--model",
                                    config["model"], "Thanks."],
                                   cwd=work, env=env, capture_output=True, text=True, timeout=420)
            assert again.returncode == 0, again.stderr[-2000:]
            assert cached_tokens(port) - before > 5000
    finally:
        node.terminate()
        node.wait(60)
        assert node.returncode == 0, node_log(node)
