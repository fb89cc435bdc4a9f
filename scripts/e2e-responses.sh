#!/usr/bin/env bash
# End to end, the Responses API and embeddings: the official openai Python SDK against the
# function under `cargo lambda watch --concurrency 2` (streaming mode), two Azure resources
# (east: gpt-4o and text-embedding-3-small throttled, Retry-After 3 s; west: healthy) and the
# fleet's table in moto's server, which carries where each stored response lives from one
# execution environment to the other. Starts and stops everything itself, all on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

EAST_PORT=$(free_port)
WEST_PORT=$(free_port)
MOTO_PORT=$(free_port)
PORT=$(free_port)
LOG=$(mktemp -t fallback-chat-e2e-responses.XXXXXX)
ENV_FILE=$(mktemp)
WATCH_PGID="" MOTO_PID="" EAST_PID="" WEST_PID=""
cleanup() {
  [[ -n "$WATCH_PGID" ]] && kill -- "-$WATCH_PGID" 2>/dev/null || true
  [[ -n "$MOTO_PID" ]] && kill "$MOTO_PID" 2>/dev/null || true
  [[ -n "$EAST_PID" ]] && kill "$EAST_PID" 2>/dev/null || true
  [[ -n "$WEST_PID" ]] && kill "$WEST_PID" 2>/dev/null || true
  rm -f "$ENV_FILE"
}
trap cleanup EXIT

start_emulator "$EAST_PORT" 600 --deployment gpt-4o=throttled:3 \
  --deployment te3-small=throttled:3 --model te3-small=text-embedding-3-small >>"$LOG.east" 2>&1
EAST_PID=$EMULATOR_PID
start_emulator "$WEST_PORT" 600 --deployment gpt-4o=healthy \
  --deployment te3-small=healthy --model te3-small=text-embedding-3-small >>"$LOG.west" 2>&1
WEST_PID=$EMULATOR_PID
start_moto_with_table "$MOTO_PORT" "$LOG.moto"

KEY=fc-example-client-key-0000
EAST=http://127.0.0.1:$EAST_PORT WEST=http://127.0.0.1:$WEST_PORT
SMALL='{"model": "text-embedding-3-small", "dimensions": 1536}'
POOL="{\"deployments\": [
  {\"id\": \"east\", \"endpoint\": \"$EAST\", \"deployment\": \"gpt-4o\", \"priority\": 0},
  {\"id\": \"west\", \"endpoint\": \"$WEST\", \"deployment\": \"gpt-4o\", \"priority\": 1, \"api\": \"v1\"},
  {\"id\": \"east-embed\", \"endpoint\": \"$EAST\", \"deployment\": \"te3-small\", \"embeddings\": $SMALL, \"priority\": 0},
  {\"id\": \"west-embed\", \"endpoint\": \"$WEST\", \"deployment\": \"te3-small\", \"embeddings\": $SMALL, \"priority\": 1}],
 \"routes\": {\"gpt-4o\": [\"east\", \"west\"], \"text-embedding-3-small\": [\"east-embed\", \"west-embed\"]},
 \"default_route\": \"gpt-4o\"}"
{
  # Single quotes: the JSON passes literally, as a dotenv file reads it.
  echo "FALLBACK_POOL='$(python3 -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1]), separators=(",", ":")))' "$POOL")'"
  echo "AZURE_OPENAI_API_KEY=emulator-key"
  echo "CLIENT_API_KEYS=$KEY"
  echo "RESPONSE_MODE=streaming"
  echo "HEALTH_TABLE=fallback-chat-health"
  echo "HEALTH_TIMEOUT_MS=500"
  echo "AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT"
  echo "AWS_ACCESS_KEY_ID=testing"
  echo "AWS_SECRET_ACCESS_KEY=testing"
  echo "AWS_REGION=us-east-1"
} >"$ENV_FILE"
setsid timeout 600 cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$PORT" --concurrency 2 \
  --env-file "$ENV_FILE" --ignore-changes >"$LOG" 2>&1 &
WATCH_PGID=$!
wait_for_port "$PORT" 300


if python tests/e2e/responses_clients.py "http://127.0.0.1:$PORT" "$KEY" "$EAST" "$WEST" "$LOG.east"; then
  result=ok
else
  result=failed
fi
check "openai SDK: the Responses API and embeddings" ok "$result"
environments=$(grep -c 'spawning function instance' "$LOG" || true)
check "two execution environments served the conversation" yes \
  "$( ((environments >= 2)) && echo yes || echo "$environments")"

if ((failed > 0)); then
  echo "--- cargo lambda watch log ---"; cat "$LOG"
  echo "--- east ---"; cat "$LOG.east"; echo "--- west ---"; cat "$LOG.west"
fi
echo "$passed passed, $failed failed"
rm -f "$LOG" "$LOG.east" "$LOG.west" "$LOG.moto"
((failed == 0))
