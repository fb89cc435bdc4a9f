#!/usr/bin/env bash
# Chooses the release opt-level by measurement: builds the function at opt-level 3 and "s"
# (LTO, one codegen unit, stripped, as in Cargo.toml) and measures each against a local
# Runtime API: cold start to first poll, first response, peak RSS, binary size.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
runs=${RUNS:-20}
port=$(free_port)
cargo build -q -p azure-openai-emulator
target/debug/azure-openai-emulator --host 127.0.0.1 --port "$port" --exit-after 900 >/dev/null 2>&1 &
emulator=$!
trap 'kill $emulator 2>/dev/null || true' EXIT
wait_for "http://127.0.0.1:$port/" 30
printf '%-10s %s\n' opt-level "measurements (median of $runs cold starts)"
for level in 3 s; do
  dir=target/opt-$level
  CARGO_PROFILE_RELEASE_OPT_LEVEL=$level cargo build -q --release --bin fallback-chat --target-dir "$dir"
  result=$(python3 bench/coldstart.py "$dir/release/fallback-chat" "$runs" \
    AZURE_OPENAI_ENDPOINT="http://127.0.0.1:$port" AZURE_OPENAI_API_KEY=emulator-key \
    CLIENT_API_KEYS=fc-example-client-key-0000)
  printf '%-10s %s\n' "$level" "$result"
done
