#!/usr/bin/env bash
# The whole pipeline on the built-in miniature ILSVRC-2012: set up, `dvc repro`, then print the result.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
source .venv/bin/activate
dvc repro "$@"
python -c 'from alexrepro.evaluate.stage import result_line; print(result_line("reports"))'
echo "report: reports/report.html (and reports/report.md)"
