#!/usr/bin/env bash
# The whole pipeline on the built-in miniature ILSVRC-2012: set up, `dvc repro`, then print the result.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
source .venv/bin/activate
dvc repro "$@"
python scripts/demo_result.py reports   # the result, checked against the range README.md states
echo "report: reports/report.html (and reports/report.md)"
