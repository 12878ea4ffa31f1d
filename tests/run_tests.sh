#!/usr/bin/env bash
# The README's test command: lint, then the whole suite (pass -m "not slow" for the fast tier).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m pytest -q -rs "$@"
