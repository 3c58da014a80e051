#!/usr/bin/env bash
# Lint, format check and type check, as configured in pyproject.toml ([tool.ruff], [tool.mypy]).
# Runs with the project's environment (scripts/setup.sh installs the `lint` extra); PYTHON names another one.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
status=0
"$PYTHON" -m ruff check . || status=1
"$PYTHON" -m ruff format --check . || status=1
"$PYTHON" -m mypy || status=1
exit $status
