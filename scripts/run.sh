#!/usr/bin/env bash
# `make run`: the function under `cargo lambda watch` on 127.0.0.1:9000. Talks to real Azure when
# AZURE_OPENAI_ENDPOINT is set (environment or .env), otherwise to the local emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

PORT=${PORT:-9000}
EMULATOR_PORT=${EMULATOR_PORT:-8080}
env_file=$(mktemp)
trap 'kill "${EMULATOR_PID:-}" 2>/dev/null || true; rm -f "$env_file"' EXIT
# --env-var splits on commas, so every setting goes through one file: .env first, ours after.
[[ -f .env ]] && cat .env >> "$env_file"
setting() { [[ -n "${!1:-}" ]] || grep -qE "^\s*$1=.+" .env 2>/dev/null; }

if ! setting AZURE_OPENAI_ENDPOINT; then
  echo "==> AZURE_OPENAI_ENDPOINT is not set: using the local Azure OpenAI emulator on http://127.0.0.1:$EMULATOR_PORT"
  echo "    gpt-4o is throttled there (429, Retry-After: 7 s), gpt-35-turbo is healthy,"
  echo "    so you will see fallback-chat skip gpt-4o and answer from gpt-35-turbo."
  echo "    Set AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_KEY (or write them to .env) to use real Azure."
  start_emulator "$EMULATOR_PORT" 86400 --deployment gpt-4o=throttled:7 --deployment gpt-35-turbo=healthy
  printf 'AZURE_OPENAI_ENDPOINT=http://127.0.0.1:%s\nAZURE_OPENAI_API_KEY=emulator-key\nAZURE_OPENAI_DEPLOYMENTS=gpt-4o,gpt-35-turbo\n' \
    "$EMULATOR_PORT" >> "$env_file"
else
  echo "==> Using Azure OpenAI at ${AZURE_OPENAI_ENDPOINT:-the endpoint in .env}"
fi

# Closed by default, locally too: a development client key unless one is configured.
key=${CLIENT_API_KEYS:-}
if [[ -z "$key" ]] && ! setting CLIENT_API_KEYS && ! setting AUTH_PROVIDED_BY; then
  key="fc-dev-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
  echo "CLIENT_API_KEYS=$key" >> "$env_file"
fi
key=${key:-$(grep -E '^\s*CLIENT_API_KEYS=' .env 2>/dev/null | tail -n1 | cut -d= -f2- | cut -d, -f1)}

# cargo lambda watch reports a function that cannot start only to the first request (a bare
# 500) and its console, then waits for a code change: say what is wrong here, before starting it.
echo "==> Building the function and checking its configuration"
cargo build -q --bin fallback-chat
if ! with_env_file "$env_file" "${CARGO_TARGET_DIR:-target}/debug/fallback-chat" --check; then
  echo "==> Fix the setting above (in your environment or .env), then run make run again." >&2
  exit 1
fi

echo "==> Starting the function on http://127.0.0.1:$PORT; try:"
echo "    curl -H 'Authorization: Bearer $key' 'http://127.0.0.1:$PORT/?query=hello'"
echo "    or point an OpenAI client at base_url=http://127.0.0.1:$PORT/v1 with api_key=$key"
cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$PORT" --bin fallback-chat --env-file "$env_file"
