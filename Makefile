# Two commands matter: `make run` (the function locally) and `make test` (everything CI runs).
SHELL := /bin/bash
VENV ?= .venv
VENV_BIN := $(abspath $(VENV))/bin
# cargo finds the `cargo lambda` subcommand, sam finds cargo-lambda, through PATH.
export PATH := $(VENV_BIN):$(PATH)
export SAM_CLI_TELEMETRY := 0

.PHONY: run test unit lint e2e template emulator bench clean

## Start the function under `cargo lambda watch` on 127.0.0.1:9000 (emulated Azure unless configured).
run: $(VENV)/.installed
	@scripts/run.sh

## Everything CI runs: formatting, clippy, unit and scenario tests, end-to-end, template checks.
test: lint unit e2e template

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The secrets tests start moto's server from .venv.
unit: $(VENV)/.installed
	cargo test --workspace

e2e: $(VENV)/.installed
	scripts/e2e.sh
	scripts/e2e-fleet.sh

template: $(VENV)/.installed
	scripts/check-template.sh
	sam build --parallel

## Side-by-side benchmarks (direct, in-process, cargo lambda watch, LiteLLM): writes BENCHMARKS.md.
bench:
	bench/run.sh

## The local Azure OpenAI emulator alone, for demos: make emulator ARGS='--deployment gpt-4o=throttled:7'
emulator:
	cargo run -q -p azure-openai-emulator -- $(ARGS)

$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV_BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

clean:
	cargo clean
	rm -rf $(VENV) .aws-sam
