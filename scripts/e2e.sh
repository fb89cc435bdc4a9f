#!/usr/bin/env bash
# End to end: the emulator (gpt-4o throttled) + the function under `cargo lambda watch`, driven by
# curl and by `cargo lambda invoke --data-file events/...`. Starts and stops everything itself.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

EMULATOR_PORT=$(free_port)
PORT=$(free_port)
STREAM_PORT=$(free_port)
LOG=$(mktemp -t fallback-chat-e2e.XXXXXX)
WATCH_PGID="" STREAM_PGID=""
cleanup() {
  [[ -n "$WATCH_PGID" ]] && kill -- "-$WATCH_PGID" 2>/dev/null || true
  [[ -n "$STREAM_PGID" ]] && kill -- "-$STREAM_PGID" 2>/dev/null || true
  [[ -n "${EMULATOR_PID:-}" ]] && kill "$EMULATOR_PID" 2>/dev/null || true
  [[ -n "${CLOSED_PGID:-}" ]] && kill -- "-$CLOSED_PGID" 2>/dev/null || true
  [[ -n "${CUT_PGID:-}" ]] && kill -- "-$CUT_PGID" 2>/dev/null || true
  [[ -n "${CUT_EMULATOR_PID:-}" ]] && kill "$CUT_EMULATOR_PID" 2>/dev/null || true
  rm -f "$ENV_FILE" "$ENV_FILE.stream" "$ENV_FILE.closed" "$ENV_FILE.cut"
}
ENV_FILE=$(mktemp)
trap cleanup EXIT

# A pause between streamed events shows whether a stream reaches the caller as it is produced.
start_emulator "$EMULATOR_PORT" 900 --deployment gpt-4o=throttled:7 --deployment gpt-35-turbo=healthy \
  --chunk-delay-ms 60 >>"$LOG.emulator" 2>&1
# The client key the sample events in events/ carry.
KEY=fc-example-client-key-0000
AUTH=(-H "Authorization: Bearer $KEY")
printf 'AZURE_OPENAI_ENDPOINT=http://127.0.0.1:%s\nAZURE_OPENAI_API_KEY=emulator-key\nAZURE_OPENAI_DEPLOYMENTS=gpt-4o,gpt-35-turbo\nCLIENT_API_KEYS=%s\n' \
  "$EMULATOR_PORT" "$KEY" > "$ENV_FILE"

# Own process group, so cleanup stops cargo-lambda and the function it spawned; `timeout` is the
# backstop should cleanup never run. No --bin: Cargo.toml's [workspace.metadata.lambda.watch]
# makes this function the default one, as a newcomer's plain `cargo lambda watch` finds it.
setsid timeout 900 cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$PORT" \
  --env-file "$ENV_FILE" --ignore-changes >"$LOG" 2>&1 &
WATCH_PGID=$!
# The same binary in streaming mode, as behind the Function URL with RESPONSE_STREAM.
sed 's/^RESPONSE_MODE=.*//' "$ENV_FILE" > "$ENV_FILE.stream"
echo "RESPONSE_MODE=streaming" >> "$ENV_FILE.stream"
setsid timeout 900 cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$STREAM_PORT" \
  --bin fallback-chat --env-file "$ENV_FILE.stream" --ignore-changes >"$LOG.stream" 2>&1 &
STREAM_PGID=$!
BASE="http://127.0.0.1:$PORT"
STREAM_BASE="http://127.0.0.1:$STREAM_PORT"
if ! wait_for "$BASE/" 300; then cat "$LOG"; exit 1; fi
if ! wait_for "$STREAM_BASE/" 300; then cat "$LOG.stream"; exit 1; fi

json() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k] if k else v
print(v)' "$1"; }

# The function is compiled by the first request; allow for it.
check "curl without a client key" 401 "$(curl -s --max-time 300 -o /dev/null -w '%{http_code}' "$BASE/?query=x")"
first=$(curl -s "${AUTH[@]}" -D "$LOG.h" "$BASE/?query=How+do+I+reset+my+password")
check "curl GET /?query= is answered" "gpt-35-turbo" "$(json deployment <<<"$first")"
check "curl answer comes from the fallback after gpt-4o's 429" "x-fallback-attempts: 2" \
  "$(grep -i '^x-fallback-attempts' "$LOG.h" | tr -d '\r')"
second=$(curl -s "${AUTH[@]}" -D "$LOG.h" "$BASE/?query=again")
check "curl: cooling gpt-4o is skipped on the next request" "x-fallback-attempts: 1" \
  "$(grep -i '^x-fallback-attempts' "$LOG.h" | tr -d '\r')"
check "curl GET / without query" 400 "$(curl -s "${AUTH[@]}" -o /dev/null -w '%{http_code}' "$BASE/")"
check "curl POST /" 405 "$(curl -s "${AUTH[@]}" -o /dev/null -w '%{http_code}' -X POST "$BASE/?query=x")"
check "curl POST / sends Allow" "allow: GET" \
  "$(curl -s "${AUTH[@]}" -D - -o /dev/null -X POST "$BASE/" | grep -i '^allow' | tr -d '\r')"
check "curl unknown path" 404 "$(curl -s "${AUTH[@]}" -o /dev/null -w '%{http_code}' "$BASE/admin?query=x")"
long=$(python3 -c 'print("a" * 4001)')
check "curl over-long query" 400 "$(curl -s "${AUTH[@]}" -o /dev/null -w '%{http_code}' "$BASE/?query=$long")"

declare -A expected=([get-query]=200 [get-no-query]=400 [post-root]=405 [unknown-path]=404
  [openai-chat]=200 [openai-chat-stream]=200 [azure-chat]=200 [openai-invalid-json]=400
  [openai-responses]=200 [openai-responses-stream]=200 [openai-response-get]=404 [openai-embeddings]=400)
for source in rest-api http-api function-url alb; do
  for file in events/"$source"/*.json; do
    case=$(basename "$file" .json)
    out=$(cargo lambda invoke --invoke-address 127.0.0.1 --invoke-port "$PORT" \
      --data-file "$file" 2>&1) || true
    check "invoke $file" "${expected[$case]}" "$(json statusCode <<<"$out" 2>/dev/null || echo "$out")"
  done
done
rm -f "$LOG.h"

# The official openai SDK, OpenAI and AzureOpenAI clients, streaming and not, in both modes.
for base in "$STREAM_BASE" "$BASE"; do
  mode=$([[ "$base" == "$STREAM_BASE" ]] && echo streaming || echo buffered)
  echo "--- openai SDK against the $mode function"
  if python tests/e2e/openai_clients.py "$base" "$mode" "$KEY"; then result=ok; else result=failed; fi
  check "openai SDK clients, $mode mode" ok "$result"
done

# A function that cannot start (closed by default, no client keys): the waiting invocation gets
# the init error it reported to the Runtime API, at once, naming the variable to set.
CLOSED_PORT=$(free_port)
grep -v '^CLIENT_API_KEYS=' "$ENV_FILE" > "$ENV_FILE.closed"
setsid timeout 300 cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$CLOSED_PORT" \
  --env-file "$ENV_FILE.closed" --ignore-changes >"$LOG.closed" 2>&1 &
CLOSED_PGID=$!
if wait_for_port "$CLOSED_PORT" 120; then
  out=$(timeout 120 cargo lambda invoke --invoke-address 127.0.0.1 --invoke-port "$CLOSED_PORT" \
    --data-file events/http-api/get-query.json 2>&1) || true
  check "a function that cannot start reports why (errorType)" ConfigError.Closed \
    "$(json errorType <<<"$out" 2>/dev/null || echo "$out")"
  check "... naming the variable to set" yes "$(grep -q CLIENT_API_KEYS <<<"$out" && echo yes || echo "$out")"
else
  check "cargo lambda watch starts for the closed configuration" up down
fi
kill -- "-$CLOSED_PGID" 2>/dev/null || true

# A primary that cuts its stream mid-answer, streaming mode, the official openai SDK: the answer
# arrives whole, the rest of it written by the fallback.
CUT_EMULATOR_PORT=$(free_port)
CUT_PORT=$(free_port)
"${CARGO_TARGET_DIR:-target}/debug/azure-openai-emulator" --host 127.0.0.1 --port "$CUT_EMULATOR_PORT" \
  --api-key emulator-key --exit-after 300 --deployment gpt-4o=stream-cut:3 \
  --deployment gpt-35-turbo=healthy >>"$LOG.emulator" 2>&1 &
CUT_EMULATOR_PID=$!
sed "s|^AZURE_OPENAI_ENDPOINT=.*|AZURE_OPENAI_ENDPOINT=http://127.0.0.1:$CUT_EMULATOR_PORT|" \
  "$ENV_FILE.stream" > "$ENV_FILE.cut"
setsid timeout 300 cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$CUT_PORT" \
  --env-file "$ENV_FILE.cut" --ignore-changes >"$LOG.cut" 2>&1 &
CUT_PGID=$!
if wait_for_port "$CUT_PORT" 120 && wait_for "http://127.0.0.1:$CUT_EMULATOR_PORT/" 30; then
  answer=$(python - "http://127.0.0.1:$CUT_PORT" "$KEY" <<'PY' 2>&1
import sys
from openai import OpenAI
client = OpenAI(base_url=f"{sys.argv[1]}/v1", api_key=sys.argv[2], max_retries=0, timeout=120)
question = "How do I reset my password?"
stream = client.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": question}], stream=True)
text, models = [], set()
for chunk in stream:
    models.add(chunk.model)
    for choice in chunk.choices:
        text.append(choice.delta.content or "")
whole = "".join(text)
print("whole" if whole == f"[gpt-4o] You said: {question}" and len(models) == 2 else f"{whole!r} {models}")
PY
)
  check "openai SDK, streaming: a primary cut mid-answer, the answer arrives whole" whole "$answer"
else
  check "cargo lambda watch starts for the cut-stream check" up down
fi
kill -- "-$CUT_PGID" 2>/dev/null || true
kill "$CUT_EMULATOR_PID" 2>/dev/null || true

if ((failed > 0)); then
  echo "--- cargo lambda watch log ---"; cat "$LOG"
  echo "--- cargo lambda watch (streaming) log ---"; cat "$LOG.stream"
  echo "--- emulator log ---"; cat "$LOG.emulator"
fi
rm -f "$LOG" "$LOG.emulator" "$LOG.stream" "$LOG.closed" "$LOG.cut"
echo "$passed passed, $failed failed"
((failed == 0))
