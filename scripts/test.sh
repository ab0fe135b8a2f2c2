#!/usr/bin/env bash
# One command from a fresh machine to a passing test suite: set up, lint
# (ruff; import-linter holds the layers of the code), then run every test
# (the Qt tests on a virtual display from pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest "$@"
