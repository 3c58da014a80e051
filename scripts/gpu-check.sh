#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run, ending with a short table:
#   1. the CUDA tests (two-placement equivalence with one tower on cuda and one on cpu, bf16 autocast with LRN in
#      fp32, a bf16 + channels_last training run, evaluation on cuda vs cpu);
#   2. `alexrepro bench train` on cuda: bf16, channels_last, batch 128 and 512, eager and torch.compile'd;
#   3. `alexrepro bench loader` beside it, to see whether the input pipeline keeps up.
# Usage: scripts/gpu-check.sh [OUTDIR]   (JSON reports go to OUTDIR, default gpu-check/)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python

"$py" - <<'PY' | tee "$out/device.txt"
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
PY

"$py" -m pytest -m cuda -rs -q tests 2>&1 | tee "$out/cuda-tests.txt"
tests_status=${PIPESTATUS[0]}

bench() {  # name, then bench arguments
  local name=$1; shift
  timeout 300 "$py" -m alexrepro bench "$@" --json > "$out/$name.json" 2> "$out/$name.txt" || echo "failed" >> "$out/$name.txt"
}
bench train-128 train --devices cuda --batch-size 128 --steps 20 --precision bf16
bench train-512 train --devices cuda --batch-size 512 --steps 20 --precision bf16 --compile
bench loader loader --images 4000 --workers "$(( $(nproc) < 8 ? $(nproc) : 8 ))"

"$py" - "$out" "$tests_status" <<'PY'
import json, pathlib, sys
out, status = pathlib.Path(sys.argv[1]), int(sys.argv[2])
print()
print(f"{'check':<34} result")
print(f"{'CUDA tests':<34} {'passed' if status == 0 else f'FAILED (pytest exit {status})'}")
for name in ("train-128", "train-512", "loader"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name:<34} failed: see {out / (name + '.txt')}")
        continue
    report = json.loads(path.read_text())
    for row in report["rows"]:
        print(f"{name + ': ' + str(row.get('name', '')):<34} {row.get('img_s', 0):,.0f} img/s")
    for ratio, value in report["ratios"].items():
        print(f"{name + ': ' + ratio:<34} {value:.2f}x")
PY
exit "$tests_status"
