# The two commands a newcomer needs: `make run` and `make test`. Everything else is plumbing.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA := deploy/local/kafka/kafka.sh
STAMP := $(VENV)/.installed

.PHONY: help run test lint typecheck unit kafka-jars kafka-start kafka-stop bench clean

help:
	@echo "make run    start a local Kafka, the Qoder API simulator and the bridge; Ctrl-C stops all"
	@echo "make test   lint, type-check and run the whole suite against a real Kafka broker"
	@echo "make bench  print throughput, latency and memory figures"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

kafka-jars:
	@$(KAFKA) fetch

kafka-start: kafka-jars
	@$(KAFKA) start

kafka-stop:
	@$(KAFKA) stop

lint: $(STAMP)
	$(BIN)/ruff format --check bridge tests
	$(BIN)/ruff check bridge tests

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) kafka-jars lint typecheck
	$(BIN)/pytest

run: $(STAMP) kafka-jars
	@deploy/local/demo.sh

bench: $(STAMP) kafka-jars
	$(BIN)/python -m tests.bench

clean:
	-@$(KAFKA) stop
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache
