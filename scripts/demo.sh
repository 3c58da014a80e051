#!/usr/bin/env bash
# The whole pipeline on the built-in miniature ILSVRC-2012: set up, `dvc repro`, then print the result.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
source .venv/bin/activate
dvc repro "$@"
python - <<'PY'
import json
m = json.load(open("reports/metrics.json"))
print(f"10-crop top-1 error {100 * m['10crop']['top1_error']:.1f}%, top-5 {100 * m['10crop']['top5_error']:.1f}% "
      f"(1-crop top-1 {100 * m['1crop']['top1_error']:.1f}%) on {m['images']} validation images of {m.get('dataset', 'the sample')}")
print("report: reports/report.html (and reports/report.md)")
PY
