"""Print the demo's result and check it against the range the README states; exit 1 outside it.

Run by scripts/demo.sh after `dvc repro`: the README's numbers and the pipeline's stay in agreement.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from alexrepro.evaluate.stage import result_line

root = Path(__file__).resolve().parents[1]
reports = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("reports")
print(result_line(reports))
readme = (root / "README.md").read_text()
stated = re.search(
    r"10-crop top-1 error (\d+(?:\.\d+)?)–(\d+(?:\.\d+)?)%\*\* \(1-crop (\d+(?:\.\d+)?)–(\d+(?:\.\d+)?)%", readme
)
if stated is None:
    sys.exit("README.md states no range for the demo's result ('10-crop top-1 error A–B%** (1-crop C–D%'); add it")
low10, high10, low1, high1 = (float(v) for v in stated.groups())
metrics = json.loads((reports / "metrics.json").read_text())
ten, one = 100 * metrics["10crop"]["top1_error"], 100 * metrics["1crop"]["top1_error"]
if not (low10 <= round(ten, 1) <= high10 and low1 <= round(one, 1) <= high1):
    sys.exit(
        f"the demo's top-1 error (10-crop {ten:.1f}%, 1-crop {one:.1f}%) is outside the README's range "
        f"(10-crop {low10}–{high10}%, 1-crop {low1}–{high1}%): a change moved the result; find out why before "
        "widening the range"
    )
print(f"within the README's range (10-crop {low10}–{high10}%, 1-crop {low1}–{high1}%)")
