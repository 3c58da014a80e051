#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of at most BUDGET seconds (default 470: under 8 minutes), ending
# with one table:
#   1. the CUDA tests (pytest -m cuda: towers on cuda:0,cuda:0 and on two GPUs, NCCL under torchrun, the device
#      feed in bf16 + channels_last with both decoders, torch.compile, resume, evaluation against the CPU);
#   2. the loader with all cores: workers' img/s and the feed to cuda, decoded in the workers or on the GPU (nvJPEG);
#   3. end to end: one epoch of `alexrepro train` on a prepared sample (the paper's width, 227 crop, batch 128), per
#      decoder, with the fraction of the time the training loop waited for data;
#   4. `alexrepro bench train`: model step img/s at batch 128 and 512, eager and compiled, bf16 and fp32.
# Each step gets what is left of the budget (a step cut short says "timed out"); the least informative runs come
# last. Needs only the project's venv (.venv, else PYTHON, else python3) and a GPU; nothing is downloaded.
# Usage: scripts/gpu-check.sh [OUTDIR]   (JSON reports and logs go to OUTDIR, default gpu-check/)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=${BUDGET:-470}
cores=$(nproc)

left() { echo $(( budget - SECONDS )); }
run_step() {  # name, step timeout (s), command…: run if the budget allows, within min(timeout, what is left − 10 s)
  local name=$1 limit=$2; shift 2
  local allowed=$(( $(left) - 10 < limit ? $(left) - 10 : limit ))
  if (( allowed < 15 )); then echo "skipped: time budget spent" > "$out/$name.txt"; return; fi
  timeout "$allowed" "$@" > "$out/$name.json" 2> "$out/$name.txt"
  local status=$?
  if (( status == 124 )); then echo "timed out after ${allowed}s" >> "$out/$name.txt"; rm -f "$out/$name.json"
  elif (( status != 0 )); then echo "failed (exit $status)" >> "$out/$name.txt"; rm -f "$out/$name.json"; fi
}

"$py" - <<'PY' | tee "$out/device.txt" || { echo "gpu-check: torch sees no CUDA GPU; nothing to check" >&2; exit 2; }
import sys, torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
sys.exit(0 if torch.cuda.is_available() else 1)
PY

# 1. correctness first
timeout 200 "$py" -m pytest -m cuda -rs -p no:cacheprovider tests > "$out/cuda-tests.txt" 2>&1
tests_status=$?
tail -n 15 "$out/cuda-tests.txt"

# 2. the loader, all cores; 3. end to end on a prepared sample (written once into $out/sample)
run_step loader 90 "$py" -m alexrepro bench loader --images 4000 --workers "$cores" --device cuda --json
for on in workers device; do
  run_step "train-$on" 100 "$py" - "$out/sample" "$on" "$cores" <<'PY'
import json, sys
from pathlib import Path
from alexrepro.bench.loader import bench_training
row = bench_training(Path(sys.argv[1]), images=25_600, workers=int(sys.argv[3]), decode_on=sys.argv[2], device="cuda")
print(json.dumps({"title": "end to end", "rows": [row], "ratios": {}, "notes": []}))
PY
done

# 4. the model step: eager first (quick), then compiled (each compile takes a while)
for compile in "" "--compile"; do
  for precision in bf16 fp32; do
    for batch in 512 128; do
      run_step "model-$batch-$precision${compile:+-compiled}" 100 "$py" -m alexrepro bench train --devices cuda \
        --batch-size "$batch" --steps 10 --precision "$precision" $compile --json
    done
  done
done

"$py" - "$out" "$tests_status" <<'PY'
import json, pathlib, sys
out, status = pathlib.Path(sys.argv[1]), int(sys.argv[2])
lines = (out / "cuda-tests.txt").read_text().strip().splitlines()
print()
print(f"{'check':<72} result")
summary = lines[-1] if lines else "no output"
print(f"{'CUDA tests':<72} {'ok' if status == 0 else f'FAILED (pytest exit {status})'}: {summary}")
names = ["loader", "train-workers", "train-device"] + sorted(p.stem for p in out.glob("model-*.txt"))
for name in names:
    path = out / f"{name}.json"
    if not path.exists():
        log = (out / f"{name}.txt").read_text().strip().splitlines() if (out / f"{name}.txt").exists() else []
        print(f"{name:<72} {log[-1] if log else 'no output'}")
        continue
    report = json.loads(path.read_text())
    for row in report["rows"]:
        extra = f", data wait {row['data_wait_fraction']:.0%}" if "data_wait_fraction" in row else ""
        print(f"{(name + ': ' + str(row.get('name', '')))[:72]:<72} {row.get('img_s', 0):>9,.0f} img/s{extra}")
    for ratio, value in report["ratios"].items():
        print(f"{(name + ': ' + ratio)[:72]:<72} {value:>9.2f}x")
print(f"(reports and logs in {out}/)")
PY
exit "$tests_status"
