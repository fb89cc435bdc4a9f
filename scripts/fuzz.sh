#!/usr/bin/env bash
# `make fuzz`: every fuzz target (src/fuzz.rs) under libFuzzer through cargo-fuzz, FUZZ_SECONDS
# each (default 120), starting from the committed corpus. What adds coverage is merged back into
# fuzz/corpus/<target> (commit it: `make test` replays it); a crash, a hang (FUZZ_TIMEOUT, 10 s)
# or an allocation beyond 2 GiB stops the run with the input in fuzz/artifacts/<target>/.
# Writes bench/fuzz.md (included in BENCHMARKS.md). Needs a nightly toolchain (libFuzzer's
# sanitizer flags); without one it uses the stable compiler with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-120}
TIMEOUT=${FUZZ_TIMEOUT:-10}
TARGETS=(${FUZZ_TARGETS:-event request body response stream config})
CARGO_FUZZ_VERSION=0.13.2
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH"

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "==> cargo-fuzz $CARGO_FUZZ_VERSION into .venv/bin (crates.io)"
  cargo install --quiet --locked --root "$ROOT/.venv" "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
  toolchain="nightly ($(rustc +nightly --version))"
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
  toolchain="stable with RUSTC_BOOTSTRAP=1 ($(rustc --version))"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "==> building the fuzz targets ($toolchain)"
"${fuzz[@]}" build -O >/dev/null

rows=()
failed=0
for t in "${TARGETS[@]}"; do
  mkdir -p "$work/$t" "fuzz/artifacts/$t"
  before=$(find "fuzz/corpus/$t" -type f | wc -l)
  echo "==> $t: ${SECONDS_EACH} s"
  status=0
  # New inputs go to the first directory; the committed corpus is read.
  "${fuzz[@]}" run -O "$t" "$work/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -timeout="$TIMEOUT" -rss_limit_mb=2048 \
      -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 -close_fd_mask=3 \
      >"$work/$t.log" 2>&1 || status=$?
  # Keep only what adds coverage to the committed corpus.
  "${fuzz[@]}" run -O "$t" "fuzz/corpus/$t" "$work/$t" -- -merge=1 -close_fd_mask=3 \
      >"$work/$t.merge.log" 2>&1 || true
  after=$(find "fuzz/corpus/$t" -type f | wc -l)
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' | tail -1)
  rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -1 | grep -o '[0-9]*')
  crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
  if [[ $status -ne 0 || $crashes -gt 0 ]]; then
    failed=1
    echo "!! $t found a failure (exit $status); the input is in fuzz/artifacts/$t/:" >&2
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "$work/$t.log" | head -5 >&2
  fi
  runs=${runs:-0}
  rows+=("| \`$t\` | $SECONDS_EACH s | $(printf "%'d" "$runs") | $(( runs / SECONDS_EACH )) | ${cov:-?} | $before → $after | ${rss:-?} MB | $crashes |")
done

{
  echo "## Fuzzing (\`make fuzz\`)"
  echo
  echo "Each target of src/fuzz.rs under libFuzzer (cargo-fuzz $CARGO_FUZZ_VERSION, $toolchain, -O), from the committed corpus, on this machine (2 cores), $(date -u +%Y-%m-%d). A failure is a panic, a broken invariant (a 500, JSON that is not JSON, a secret in a response, a Retry-After past its cap), a hang over ${TIMEOUT} s or more than 2 GiB. \`make test\` replays the corpus and $(grep -c '^    ("' tests/fuzz.rs) targets' mutation runs (tests/fuzz.rs)."
  echo
  echo "| target | time | executions | per second | coverage (edges) | corpus | peak RSS | failures |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "What fuzzing has found, and the fix and regression test of each: docs/testing.md, \"Fuzzing\"."
} > bench/fuzz.md
cat bench/fuzz.md
exit $failed
