#!/usr/bin/env bash
# `make run`: local Kafka + the Qoder API simulator (when no token is set) + the bridge, with the
# events shown live as they arrive in Kafka. Ctrl-C drains the bridge and stops everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
exec .venv/bin/python -m bridge.demo "$@"
