#!/usr/bin/env bash
# Lint, type-check and run every test (unit, property and integration against a real local Kafka).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check stream_app
.venv/bin/python -m mypy
.venv/bin/python -m pytest "$@"
