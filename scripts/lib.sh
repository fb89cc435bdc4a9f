# Shared shell helpers for run.sh and e2e.sh.

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
