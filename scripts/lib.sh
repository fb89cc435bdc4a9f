# Shared shell helpers for run.sh and the e2e scripts.

# A TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_for URL SECONDS: poll until the URL answers any HTTP status, or fail.
wait_for() {
  local url=$1 seconds=$2 i
  for ((i = 0; i < seconds * 4; i++)); do
    if curl -s -o /dev/null --max-time 2 "$url"; then return 0; fi
    sleep 0.25
  done
  echo "timed out after ${seconds}s waiting for $url" >&2
  return 1
}

# wait_for_port PORT SECONDS: poll until something listens on 127.0.0.1:PORT, without sending it
# a request (a request to cargo lambda watch is an invocation).
wait_for_port() {
  python3 - "$1" "$2" <<'PY'
import socket, sys, time
port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.25)
sys.exit(f"timed out after {sys.argv[2]}s waiting for 127.0.0.1:{port}")
PY
}

# Build (if needed) and start the Azure OpenAI emulator in the background; sets EMULATOR_PID.
# start_emulator PORT EXIT_AFTER_SECONDS --deployment NAME=BEHAVIOR ...
start_emulator() {
  local port=$1 exit_after=$2
  shift 2
  cargo build -q -p azure-openai-emulator
  "${CARGO_TARGET_DIR:-target}/debug/azure-openai-emulator" --host 127.0.0.1 --port "$port" \
    --api-key emulator-key --exit-after "$exit_after" "$@" &
  EMULATOR_PID=$!
  wait_for "http://127.0.0.1:$port/" 30
}

# with_env_file FILE COMMAND...: runs COMMAND with the KEY=value lines of FILE added to the
# environment, read as cargo-lambda reads --env-file (blank lines and # comments skipped, one
# pair of surrounding quotes removed).
with_env_file() {
  python3 - "$@" <<'PY'
import os, sys
env = dict(os.environ)
for line in open(sys.argv[1]):
    line = line.strip()
    if not line or line.startswith("#") or "=" not in line:
        continue
    key, value = line.split("=", 1)
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    env[key.strip().removeprefix("export ").strip()] = value
os.execvpe(sys.argv[2], sys.argv[2:], env)
PY
}

# check NAME EXPECTED ACTUAL: one "ok"/"FAIL" line per check, counted in `passed` and `failed`.
passed=0 failed=0
check() {
  if [[ "$2" == "$3" ]]; then
    passed=$((passed + 1)); echo "ok   $1"
  else
    failed=$((failed + 1)); echo "FAIL $1: expected $2, got $3"
  fi
}

# start_moto_with_table PORT LOG: moto's server on 127.0.0.1:PORT in the background (sets
# MOTO_PID), with the fleet's table (fallback-chat-health, TTL on expires_at) created in it, and
# the AWS variables the function and boto3 need pointed at it exported.
start_moto_with_table() {
  local port=$1 log=$2
  python scripts/moto_server.py -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
  MOTO_PID=$!
  wait_for "http://127.0.0.1:$port/" 60
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  python3 - "$port" <<'PY'
import sys, boto3
ddb = boto3.client("dynamodb", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}")
ddb.create_table(TableName="fallback-chat-health", BillingMode="PAY_PER_REQUEST",
                 AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                 KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}])
ddb.update_time_to_live(TableName="fallback-chat-health",
                        TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"})
PY
}
