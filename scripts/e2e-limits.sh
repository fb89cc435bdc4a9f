#!/usr/bin/env bash
# End to end, the named clients' limits: the official openai Python SDK against the function
# under `cargo lambda watch --concurrency 4` (four execution environments), one Azure resource
# (healthy) and the fleet's table in moto's server, which counts each client's limits for the
# whole fleet. Starts and stops everything itself, all on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

EMULATOR_PORT=$(free_port)
MOTO_PORT=$(free_port)
PORT=$(free_port)
LOG=$(mktemp -t fallback-chat-e2e-limits.XXXXXX)
ENV_FILE=$(mktemp)
WATCH_PGID="" MOTO_PID="" EMU_PID=""
cleanup() {
  [[ -n "$WATCH_PGID" ]] && kill -- "-$WATCH_PGID" 2>/dev/null || true
  [[ -n "$MOTO_PID" ]] && kill "$MOTO_PID" 2>/dev/null || true
  [[ -n "$EMU_PID" ]] && kill "$EMU_PID" 2>/dev/null || true
  rm -f "$ENV_FILE"
}
trap cleanup EXIT

start_emulator "$EMULATOR_PORT" 600 --deployment gpt-4o=healthy --deployment gpt-35-turbo=healthy \
  >>"$LOG.emulator" 2>&1
EMU_PID=$EMULATOR_PID
start_moto_with_table "$MOTO_PORT" "$LOG.moto"

CHATBOT=fc-e2e-chatbot-0123456789 SMALL=fc-e2e-small-0123456789ab IDLE=fc-e2e-idle-0123456789abcd
TOKENS_PER_MINUTE=4000
CLIENTS="[{\"name\": \"chatbot\", \"key_env\": \"KEY_CHATBOT\", \"tokens_per_minute\": $TOKENS_PER_MINUTE},
 {\"name\": \"small\", \"key_env\": \"KEY_SMALL\", \"requests_per_minute\": 3},
 {\"name\": \"idle\", \"key_env\": \"KEY_IDLE\", \"tokens_per_day\": 10000000}]"
{
  echo "AZURE_OPENAI_ENDPOINT=http://127.0.0.1:$EMULATOR_PORT"
  echo "AZURE_OPENAI_API_KEY=emulator-key"
  echo "FALLBACK_CLIENTS='$(python3 -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1]), separators=(",", ":")))' "$CLIENTS")'"
  echo "KEY_CHATBOT=$CHATBOT"
  echo "KEY_SMALL=$SMALL"
  echo "KEY_IDLE=$IDLE"
  echo "LIMITS_ENVIRONMENTS=4"
  echo "LIMITS_DEFAULT_COMPLETION_TOKENS=60"
  echo "HEALTH_TABLE=fallback-chat-health"
  echo "HEALTH_TIMEOUT_MS=500"
  echo "AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT"
  echo "AWS_ACCESS_KEY_ID=testing"
  echo "AWS_SECRET_ACCESS_KEY=testing"
  echo "AWS_REGION=us-east-1"
} >"$ENV_FILE"
setsid timeout 600 cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$PORT" --concurrency 4 \
  --env-file "$ENV_FILE" --ignore-changes >"$LOG" 2>&1 &
WATCH_PGID=$!
wait_for_port "$PORT" 300

if python tests/e2e/limits_clients.py "http://127.0.0.1:$PORT" "$CHATBOT" "$SMALL" "$TOKENS_PER_MINUTE" \
  "$LOG.emulator"; then
  result=ok
else
  result=failed
fi
check "openai SDK: per-client limits across the fleet" ok "$result"
environments=$(grep -c 'spawning function instance' "$LOG" || true)
check "four execution environments shared the limits" yes \
  "$( ((environments >= 4)) && echo yes || echo "$environments")"

# What `idle` was granted (the fleet's count in the table), summed over its windows.
granted() {
  python3 - "$MOTO_PORT" <<'PY'
import sys, boto3
ddb = boto3.client("dynamodb", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}")
items = ddb.scan(TableName="fallback-chat-health")["Items"]
print(sum(int(i["granted"]["N"]) for i in items if i["pk"]["S"].startswith("limit#idle#")))
PY
}
# A few requests of `idle` leave each environment that served one holding most of a lease; the
# environments shut down (SIGTERM, as Lambda sends it) give back what they did not spend.
curls=()
for n in 1 2 3 4 5 6 7 8; do
  curl -s -o /dev/null -H "Authorization: Bearer $IDLE" "http://127.0.0.1:$PORT/?query=hello$n" &
  curls+=($!)
done
wait "${curls[@]}"
before=$(granted)
kill -TERM -- "-$WATCH_PGID" 2>/dev/null || true
for _ in $(seq 50); do kill -0 -- "-$WATCH_PGID" 2>/dev/null || break; sleep 0.1; done
WATCH_PGID=""
after=$(granted)
check "environments shutting down give their unspent leases back ($before granted, then $after)" yes \
  "$( ((before > 0 && after * 10 < before)) && echo yes || echo "before=$before after=$after")"

if ((failed > 0)); then
  echo "--- cargo lambda watch log ---"; cat "$LOG"
fi
echo "$passed passed, $failed failed"
rm -f "$LOG" "$LOG.emulator" "$LOG.moto"
((failed == 0))
