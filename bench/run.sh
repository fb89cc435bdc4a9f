#!/usr/bin/env bash
# `make bench`: fallback-chat, LiteLLM's proxy and direct calls side by side against the local
# Azure OpenAI emulator; writes BENCHMARKS.md. Builds what it needs in release mode, keeps its
# Python tools in bench/.venv (created here), starts everything on 127.0.0.1 and stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_STARTED=$(date +%s)
export BENCH_STARTED

VENV=bench/.venv
PIP=(--quiet --disable-pip-version-check)
stamp=$VENV/.installed
if [[ ! -f $stamp || bench/requirements.txt -nt $stamp || bench/requirements-litellm.txt -nt $stamp \
      || bench/constraints.txt -nt $stamp ]]; then
  echo "==> bench/.venv: httpx, matplotlib, cargo-lambda (PyPI); LiteLLM installs meanwhile"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install "${PIP[@]}" -c bench/constraints.txt -r bench/requirements.txt
  # LiteLLM in the background while the harness builds (it mostly waits on the network), and
  # apart: if it cannot be installed, BENCHMARKS.md says so in its rows and why. The harness
  # waits for it before measuring anything; the stamp is written only once both are in place.
  (
    if "$VENV/bin/pip" install "${PIP[@]}" -c bench/constraints.txt -r bench/requirements-litellm.txt \
        >"$VENV/litellm-install.log" 2>&1; then
      "$VENV/bin/python" -c 'import json, importlib.metadata as m
print(json.dumps({"version": m.version("litellm"), "error": None}))' >"$VENV/litellm-install.tmp"
    else
      "$VENV/bin/python" -c 'import json, sys
lines = [l for l in open(sys.argv[1]).read().splitlines() if l.strip()]
print(json.dumps({"version": None, "error": "pip install failed: " + (lines[-1] if lines else "?")}))' \
        "$VENV/litellm-install.log" >"$VENV/litellm-install.tmp"
    fi
    mv "$VENV/litellm-install.tmp" "$VENV/litellm-install.json"
    touch "$stamp"
  ) </dev/null &
  export BENCH_LITELLM_INSTALL_PID=$!
fi

# `make soak` (bench/run.sh soak): the soak with faults alone; it needs only this venv.
if [[ ${1:-} == soak ]]; then
  shift
  exec "$VENV/bin/python" bench/soak.py "$@"
fi
exec "$VENV/bin/python" bench/harness.py "$@"
