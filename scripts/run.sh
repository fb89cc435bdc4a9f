#!/usr/bin/env bash
# `make run`: the function under `cargo lambda watch` on 127.0.0.1:9000. Talks to real Azure when
# AZURE_OPENAI_ENDPOINT is set (environment or .env), otherwise to the local emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

PORT=${PORT:-9000}
EMULATOR_PORT=${EMULATOR_PORT:-8080}
args=(--invoke-address 127.0.0.1 --invoke-port "$PORT" --bin fallback-chat)
[[ -f .env ]] && args+=(--env-file .env)

if [[ -z "${AZURE_OPENAI_ENDPOINT:-}" ]] && ! grep -qE '^\s*AZURE_OPENAI_ENDPOINT=.+' .env 2>/dev/null; then
  echo "==> AZURE_OPENAI_ENDPOINT is not set: using the local Azure OpenAI emulator on http://127.0.0.1:$EMULATOR_PORT"
  echo "    gpt-4o is throttled there (429, Retry-After: 7 s), gpt-35-turbo is healthy,"
  echo "    so you will see fallback-chat skip gpt-4o and answer from gpt-35-turbo."
  echo "    Set AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_KEY (or write them to .env) to use real Azure."
  start_emulator "$EMULATOR_PORT" 86400 --deployment gpt-4o=throttled:7 --deployment gpt-35-turbo=healthy
  env_file=$(mktemp)
  trap 'kill "$EMULATOR_PID" 2>/dev/null || true; rm -f "$env_file"' EXIT
  # --env-var splits on commas, so the settings go through a file (after .env's, which they override).
  { [[ -f .env ]] && grep -vE '^\s*AZURE_OPENAI_(ENDPOINT|API_KEY|DEPLOYMENTS)=' .env || true
    echo "AZURE_OPENAI_ENDPOINT=http://127.0.0.1:$EMULATOR_PORT"
    echo "AZURE_OPENAI_API_KEY=emulator-key"
    echo "AZURE_OPENAI_DEPLOYMENTS=gpt-4o,gpt-35-turbo"; } > "$env_file"
  args=(--invoke-address 127.0.0.1 --invoke-port "$PORT" --bin fallback-chat --env-file "$env_file")
else
  echo "==> Using Azure OpenAI at ${AZURE_OPENAI_ENDPOINT:-the endpoint in .env}"
fi
echo "==> Starting the function; once it is built, try:"
echo "    curl 'http://127.0.0.1:$PORT/?query=hello'"
cargo lambda watch "${args[@]}"
