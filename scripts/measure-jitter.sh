#!/usr/bin/env bash
# Measures what AWS_LC_SYS_NO_JITTER_ENTROPY=1 (.cargo/config.toml) saves: the time a fresh
# process takes for its first random bytes from AWS-LC, built with and without jitter entropy.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-30}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
cargo build -q --release --example first_random
AWS_LC_SYS_NO_JITTER_ENTROPY=0 cargo build -q --release --example first_random --target-dir target/jitter-entropy
without=$(for _ in $(seq "$runs"); do target/release/examples/first_random; done | median)
with=$(for _ in $(seq "$runs"); do target/jitter-entropy/release/examples/first_random; done | median)
echo "first random bytes from AWS-LC, median of $runs fresh processes:"
echo "  with CPU jitter entropy:    ${with} µs"
echo "  without (this project):     ${without} µs"
