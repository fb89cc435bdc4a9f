#!/usr/bin/env bash
# End to end, fleet memory: up to 16 execution environments under `cargo lambda watch
# --concurrency 16`, sharing health through a DynamoDB table in moto's server. gpt-4o answers 429
# (Retry-After 7 s) throughout: the first environment to meet it tells the table, and the
# environments cargo-lambda starts for a burst of concurrent requests read it before their first
# request and never call gpt-4o. Then 16 clients keep a request always in flight for three
# cooldowns: when each shared cooldown ends, one environment tries gpt-4o for the fleet (at most
# two calls in any 7 s), not every environment at once. Starts and stops everything itself, all
# on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

EMULATOR_PORT=$(free_port)
MOTO_PORT=$(free_port)
PORT=$(free_port)
LOG=$(mktemp -t fallback-chat-e2e-fleet.XXXXXX)
ENV_FILE=$(mktemp)
WATCH_PGID="" MOTO_PID=""
cleanup() {
  [[ -n "$WATCH_PGID" ]] && kill -- "-$WATCH_PGID" 2>/dev/null || true
  [[ -n "$MOTO_PID" ]] && kill "$MOTO_PID" 2>/dev/null || true
  [[ -n "${EMULATOR_PID:-}" ]] && kill "$EMULATOR_PID" 2>/dev/null || true
  rm -f "$ENV_FILE"
}
trap cleanup EXIT

start_emulator "$EMULATOR_PORT" 600 --deployment gpt-4o=throttled:7 --deployment gpt-35-turbo=healthy \
  --latency-ms 200 >>"$LOG.emulator" 2>&1
start_moto_with_table "$MOTO_PORT" "$LOG.moto"

KEY=fc-example-client-key-0000
cat >"$ENV_FILE" <<EOF
AZURE_OPENAI_ENDPOINT=http://127.0.0.1:$EMULATOR_PORT
AZURE_OPENAI_API_KEY=emulator-key
AZURE_OPENAI_DEPLOYMENTS=gpt-4o,gpt-35-turbo
CLIENT_API_KEYS=$KEY
HEALTH_TABLE=fallback-chat-health
HEALTH_TIMEOUT_MS=500
AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT
AWS_ACCESS_KEY_ID=testing
AWS_SECRET_ACCESS_KEY=testing
AWS_REGION=us-east-1
EOF
setsid timeout 600 cargo lambda watch --invoke-address 127.0.0.1 --invoke-port "$PORT" --concurrency 16 \
  --env-file "$ENV_FILE" --ignore-changes >"$LOG" 2>&1 &
WATCH_PGID=$!
wait_for_port "$PORT" 300

gpt4o_calls() { grep -c 'deployment=gpt-4o ' "$LOG.emulator" || true; }

# One environment meets the 429 and writes it to the table before its response returns.
first=$(curl -s --max-time 300 -H "Authorization: Bearer $KEY" "http://127.0.0.1:$PORT/?query=first")
check "the first request is answered by the fallback" gpt-35-turbo \
  "$(python3 -c 'import json,sys; print(json.load(sys.stdin).get("deployment"))' <<<"$first")"
check "gpt-4o was called once" 1 "$(gpt4o_calls)"

# A burst of 16 concurrent requests, a little over a second later (how stale an environment's
# knowledge may be: HEALTH_REFRESH_MS): the environments already running read the table, and
# those cargo-lambda starts for the burst read it before their first request.
sleep 1.2
python3 - "$PORT" "$KEY" >"$LOG.burst" <<'PY'
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
port, key = sys.argv[1], sys.argv[2]
def ask(i):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/?query=burst-{i}",
                                 headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["deployment"]
with ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(ask, range(16)))
print(len([a for a in answers if a == "gpt-35-turbo"]))
PY
check "every request of the burst is answered by the fallback" 16 "$(cat "$LOG.burst")"
environments=$(grep -c 'spawning function instance' "$LOG" || true)
check "several execution environments served the burst" yes "$( ((environments >= 2)) && echo yes || echo "$environments")"
# Counted by the emulator's clock from the first 429: starting the burst's environments (a
# `cargo run` each, queued on cargo's locks) can take past the 7 s cooldown on a slow machine, and
# its end then allows one trial for the whole fleet, never one per environment.
python3 tests/e2e/fleet_load.py windows "$LOG.emulator" gpt-4o 7 >"$LOG.burst-windows"
read -r during after <<<"$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["times"]
print(sum(x < 7 for x in t), sum(x >= 7 for x in t))' "$LOG.burst-windows")"
check "gpt-4o is still called once for the whole fleet during its cooldown" 1 "$during"
check "after the cooldown (the burst outlasted it), at most one trial for the fleet" yes \
  "$( ((after <= 1)) && echo yes || cat "$LOG.burst-windows")"

# Continuous load through three cooldowns: every request answered, gpt-4o tried once per
# cooldown for the whole fleet. The table is moto's (scripts/moto_server.py: conditional writes
# atomic, as DynamoDB's are).
python3 tests/e2e/fleet_load.py load "http://127.0.0.1:$PORT" "$KEY" 16 22 >"$LOG.load"
load_ok=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("yes" if set(r["statuses"]) == {"200"} and r["requests"] > 200 else r)' "$LOG.load")
check "16 clients, 22 s of continuous load: every request answered" yes "$load_ok"
python3 tests/e2e/fleet_load.py windows "$LOG.emulator" gpt-4o 7 >"$LOG.windows"
most=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["most_in_a_window"])' "$LOG.windows")
check "at each shared cooldown's end one trial, not a stampede: at most 2 calls to gpt-4o in any 7 s" yes \
  "$( ((most <= 2)) && echo yes || cat "$LOG.windows")"
environments=$(grep -c 'spawning function instance' "$LOG" || true)
check "the load kept many execution environments busy" yes "$( ((environments >= 8)) && echo yes || echo "$environments")"

if ((failed > 0)); then
  echo "--- cargo lambda watch log ---"; cat "$LOG"
  echo "--- emulator log ---"; cat "$LOG.emulator"
fi
rm -f "$LOG" "$LOG.emulator" "$LOG.moto" "$LOG.burst" "$LOG.burst-windows" "$LOG.load" "$LOG.windows"
echo "$passed passed, $failed failed"
((failed == 0))
