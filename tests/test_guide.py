"""docs/GUIDE.md cannot rot: every shell block marked runnable is run as a user would run it —
bash, in a fresh directory holding a freshly built localswarm.pyz, with the venv's python first
on PATH, offline (the hub's address refuses connections), on the starter model — and its exit
status and the output lines the guide shows after it are checked. Every JSON block must parse.

Conventions (the guide's readers do not see them): ```sh runnable``` (exit 0) or
```sh runnable exit=N```; an immediately following ```text expected``` block lists lines that
must appear in the output, in that order. The ports 8080 and 8081 in a block (and the default
port, through LOCALSWARM_PORT) are replaced by free ones, so that a test never meets a server
someone else runs."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import pytest

import conftest
from conftest import ROOT, free_port

GUIDE = os.path.join(ROOT, "docs", "GUIDE.md")
BLOCK_TIMEOUT = 180
FENCE = re.compile(r"^```(\S*)[ \t]*(.*?)\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass
class Block:
    lang: str
    info: str
    text: str
    line: int
    expected: Optional[list] = None

    @property
    def exit_code(self) -> int:
        m = re.search(r"\bexit=(\d+)", self.info)
        return int(m.group(1)) if m else 0


def guide_blocks(text: str) -> list:
    """The fenced blocks, each runnable one with the expected lines of the block right after it."""
    blocks = []
    for m in FENCE.finditer(text):
        b = Block(m.group(1), m.group(2), m.group(3), text.count("\n", 0, m.start()) + 1)
        prev = blocks[-1] if blocks else None
        between = text[text.rindex("```", 0, m.start() - 1) + 3:m.start()] if prev else ""
        if b.lang == "text" and "expected" in b.info.split() and prev and "runnable" in prev.info.split() \
                and not between.strip():
            prev.expected = [line.rstrip() for line in b.text.splitlines() if line.strip()]
        blocks.append(b)
    return blocks


def read_guide() -> str:
    with open(GUIDE, encoding="utf-8") as f:
        return f.read()


BLOCKS = guide_blocks(read_guide())
RUNNABLE = [b for b in BLOCKS if b.lang == "sh" and "runnable" in b.info.split()]


def test_the_guide_is_linked_from_the_readme_and_has_what_users_need():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "docs/GUIDE.md" in f.read()
    text = read_guide()
    for heading in ("Install", "Choosing the model", "opencode", "MCP clients", "Federation",
                    "Performance", "Troubleshooting"):
        assert re.search(rf"^## {heading}$", text, re.M), heading
    assert len(RUNNABLE) >= 15
    assert sum(b.exit_code != 0 for b in RUNNABLE) >= 5          # the troubleshooting errors, for real


def test_the_conventions_are_read_as_the_docstring_says():
    blocks = guide_blocks("```sh runnable exit=1\nfalse\n```\n\n```text expected\n  a\n\nb  \n```\n"
                          "```sh\nx\n```\n```text expected\nnot this one's\n```\n")
    assert blocks[0].exit_code == 1 and blocks[0].expected == ["  a", "b"]
    assert blocks[2].expected is None and blocks[2].exit_code == 0


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "json"], ids=lambda b: f"line{b.line}")
def test_every_json_block_parses(block):
    json.loads(block.text)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    sys.path.insert(0, ROOT)
    import build_pyz
    return build_pyz.build(str(tmp_path_factory.mktemp("guide") / "localswarm.pyz"))


def user_env(home: str) -> dict:
    """A user's shell: the venv's python (and its tools) first on PATH, no LOCALSWARM_* settings
    from the test run, a hub that refuses connections (offline, as on this project's machines),
    and announcements kept on loopback should a block federate without --broadcast."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCALSWARM_", "HF_"))}
    env.update(HOME=home, PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", LOCALSWARM_DISCOVERY_PORT=str(free_port()),
               LOCALSWARM_BROADCAST_ADDRESSES="127.255.255.255",    # never this machine's real networks
               PYTHONUNBUFFERED="1")
    return env


def kill_group(pgid: int) -> None:
    """Stop everything the block left running (its servers), politely first."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def check_output(out: str, expected: list) -> None:
    """Each expected line appears in the output, in order."""
    at = 0
    for line in expected:
        found = out.find(line, at)
        assert found >= 0, f"expected {line!r} in the output after position {at}:\n{out[-4000:]}"
        at = found + len(line)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"line{b.line}")
def test_the_guides_commands_work(block, pyz, tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    os.makedirs(home / ".localswarm")
    shutil.copy(pyz, work / "localswarm.pyz")
    if conftest.SPEED_JSON:      # this machine's speed, measured once for the session
        shutil.copy(conftest.SPEED_JSON, home / ".localswarm" / "speed.json")
    ports = {"8080": str(free_port()), "8081": str(free_port())}
    swap = (lambda s: re.sub(r"\b(8080|8081)\b", lambda m: ports[m.group(1)], s))
    log = tmp_path / "output.txt"
    with open(log, "w") as out:
        env = dict(user_env(str(home)), LOCALSWARM_PORT=ports["8080"])     # the default port, moved too
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", swap(block.text)], cwd=work,
                                env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_group(proc.pid)
            proc.wait()
    text = log.read_text(errors="replace")
    assert code is not None, f"the block at GUIDE.md line {block.line} ran over {BLOCK_TIMEOUT}s:\n{text[-4000:]}"
    assert code == block.exit_code, f"GUIDE.md line {block.line}: exit {code}, not {block.exit_code}:\n{text[-4000:]}"
    if block.expected:
        check_output(text, [swap(line) for line in block.expected])
    assert "Traceback" not in text, text[-4000:]
