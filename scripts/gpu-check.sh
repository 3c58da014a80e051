#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of at most BUDGET seconds (default 460: under 8 minutes, so that a
# second run fits the same lease), ending with one table. Ordered by information per second:
#   1. the model step, eager: bf16 at batch 512 and 128, the paper's fp32 (no TF32) and TF32 at 128;
#   2. the CUDA tests (pytest -m cuda), each test bounded, the torch.compile tests last;
#   3. end to end in steady state (the second of two epochs of `alexrepro train`, the paper's width, 227 crop,
#      batch 128) in bf16 with the JPEGs decoded in the workers and on the GPU, and in the paper's fp32;
#   4. the loader with all cores (workers' img/s, the feed to cuda, decoded in the workers or on the GPU);
#   5. the model step compiled (each compile takes a while).
# Every step gets at most its own limit and what is left of the budget; a failed step prints its cause and the
# table goes on. Every step is an `alexrepro` command or pytest, never a script on stdin: a pool's fresh workers
# re-import the main module, which a script read from stdin does not have. Needs no install and no network: the project runs from this tree (PYTHONPATH), without webdataset
# or dvc, as on the GPU machines this is written for.
#
# Usage: scripts/gpu-check.sh [--rehearse] [OUTDIR]
#   OUTDIR (default gpu-check/) receives table.txt and logs.tar.gz, nothing else.
#   --rehearse: every step on the CPU with small sizes, in an environment where webdataset and dvc cannot be
#   imported, failing if any step fails: CI runs it, so that the GPU run works the first time.
set -uo pipefail
cd "$(dirname "$0")/.."

rehearse=0
if [ "${1:-}" = "--rehearse" ]; then rehearse=1; shift; fi
out=${1:-gpu-check}
mkdir -p "$out"
logs=$(mktemp -d)
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
budget=${BUDGET:-460}
cores=$(nproc)

# The GPU machine has neither webdataset nor dvc: make both unimportable here too, so that nothing on this path
# can depend on them unnoticed. The project itself comes from this tree.
blockers="$logs/blockers"
mkdir -p "$blockers/dvc"
echo 'raise ImportError("webdataset is not installed on the GPU machine")' > "$blockers/webdataset.py"
echo 'raise ImportError("dvc is not installed on the GPU machine")' > "$blockers/dvc/__init__.py"
export PYTHONPATH="$blockers:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if (( rehearse )); then
  # Small sizes, and the compiled model step traced without generating kernels (aot_eager): inductor's C++ code
  # generation takes minutes on two cores, and the CPU compile tests (tests/test_devices.py) run it already.
  device=cpu; budget=${BUDGET:-300}
  model_batches=(16 8); model_steps=2; e2e_images=256; e2e_width=0.125; e2e_crop=67; e2e_size=72
  loader_images=96; loader_batch=16; workers=2; compile_backend=aot_eager
else
  device=cuda
  model_batches=(512 128); model_steps=10; e2e_images=51200; e2e_width=1.0; e2e_crop=227; e2e_size=256
  loader_images=2000; loader_batch=128; workers=$(( cores > 2 ? cores - 2 : 1 )); compile_backend=inductor
fi

failed=0
left() { echo $(( budget - SECONDS )); }
run_step() {  # name, limit (s), command…: within min(limit, what is left − 10 s); a failure keeps its cause
  local name=$1 limit=$2; shift 2
  local allowed=$(( $(left) - 10 < limit ? $(left) - 10 : limit ))
  if (( allowed < 10 )); then echo "skipped: the time budget is spent" > "$logs/$name.txt"; failed=1; return; fi
  timeout "$allowed" "$@" > "$logs/$name.json" 2> "$logs/$name.txt"
  local status=$?
  if (( status == 124 )); then echo "timed out after ${allowed}s" >> "$logs/$name.txt"; failed=1
  elif (( status != 0 )); then echo "failed (exit $status)" >> "$logs/$name.txt"; failed=1; fi
  (( status == 0 )) || rm -f "$logs/$name.json"
}

# The header: what ran where.
"$py" - "$device" > "$logs/header.txt" 2>&1 <<'PY'
import datetime, os, platform, shutil, subprocess, sys
import torch, torchvision
device = sys.argv[1]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"date (UTC)   {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}")
print(f"commit       {commit or 'unknown'}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA GPU; nothing to check")
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    smi = shutil.which("nvidia-smi")
    driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.split("\n")[0] if smi else "unknown"
    print(f"GPU          {names}; driver {driver}")
    print(f"CUDA/cuDNN   {torch.version.cuda} / {torch.backends.cudnn.version()}")
else:
    print("GPU          none: rehearsal on the CPU")
print(f"torch        {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
print(f"CPU          {cpu}, {os.cpu_count()} cores")
shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.exists("/dev/shm") else 0
print(f"/dev/shm     {shm:.1f} GiB")
PY
header_status=$?
cat "$logs/header.txt"
if (( header_status != 0 )); then cp "$logs/header.txt" "$out/table.txt"; exit 2; fi

# 1. the model step, eager
for spec in "bf16 ${model_batches[0]}" "bf16 ${model_batches[1]}" "fp32 ${model_batches[1]}" "tf32 ${model_batches[1]}"; do
  set -- $spec
  run_step "model-$2-$1" 90 "$py" -m alexrepro bench train --devices "$device" --batch-size "$2" \
    --steps "$model_steps" --precision "$1" --json
done

# 2. the CUDA tests: each bounded (pytest-timeout where installed, as on the GPU machines), compile tests last
per_test=()
"$py" -c "import pytest_timeout" 2>/dev/null && per_test=(-p timeout --timeout 120)
# (rehearsed: the same tests' CPU cases, tests/test_devices.py, where the device is the only difference)
if (( rehearse )); then on_device="device and not cuda"; else on_device="cuda"; fi
run_step tests 200 "$py" -m pytest -m "$on_device and not compile" -rs -p no:cacheprovider "${per_test[@]}" tests
run_step tests-compile 150 "$py" -m pytest -m "$on_device and compile" -rs -p no:cacheprovider "${per_test[@]}" tests

# 3. end to end, steady state (a sample written once under $logs/sample)
for spec in "bf16 workers" "bf16 device" "fp32 workers"; do
  set -- $spec
  run_step "train-$1-$2" 120 "$py" -m alexrepro bench training --folder "$logs/sample" --images "$e2e_images" \
    --workers "$workers" --decode-on "$2" --devices "$device" --precision "$1" --width "$e2e_width" \
    --crop "$e2e_crop" --size "$e2e_size" --json
done

# 4. the loader with all cores
run_step loader 90 "$py" -m alexrepro bench loader --images "$loader_images" --workers "$workers" --device "$device" \
  --batch-size "$loader_batch" --json

# 5. the model step compiled
run_step "model-${model_batches[1]}-bf16-compiled" 120 "$py" -m alexrepro bench train --devices "$device" \
  --batch-size "${model_batches[1]}" --steps "$model_steps" --precision bf16 --compile \
  --compile-backend "$compile_backend" --json

"$py" - "$logs" > "$out/table.txt" <<'PY'
import json, pathlib, re, sys
logs = pathlib.Path(sys.argv[1])
print((logs / "header.txt").read_text().rstrip())
print()
print(f"{'check':<78} result")
def last_line(name):
    path = logs / f"{name}.txt"
    lines = [l for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    return lines[-1] if lines else "no output"
order = sorted(p.stem for p in logs.glob("model-*.txt") if "compiled" not in p.stem)
order += ["tests", "tests-compile"] + sorted(p.stem for p in logs.glob("train-*.txt")) + ["loader"]
order += sorted(p.stem for p in logs.glob("model-*compiled.txt"))
for name in order:
    path = logs / f"{name}.json"
    if name.startswith("tests"):
        text = (logs / f"{name}.json").read_text() if path.exists() else ""
        summary = [l for l in text.splitlines() if re.search(r"passed|failed|skipped|error|no tests ran", l)]
        verdict = "ok" if path.exists() else "FAILED"
        print(f"{'CUDA tests' + (' (compile)' if 'compile' in name else ''):<78} {verdict}: "
              f"{summary[-1] if summary else last_line(name)}")
        continue
    if not path.exists():
        print(f"{name:<78} FAILED: {last_line(name)}")
        continue
    report = json.loads(path.read_text())
    for row in report["rows"]:
        extra = f", data wait {row['data_wait_fraction']:.0%}" if "data_wait_fraction" in row else ""
        print(f"{(name + ': ' + str(row.get('name', '')))[:78]:<78} {row.get('img_s', 0):>9,.0f} img/s{extra}")
    for ratio, value in report["ratios"].items():
        print(f"{(name + ': ' + ratio)[:78]:<78} {value:>9.2f}x")
PY
cat "$out/table.txt"
rm -rf "$logs/sample" "$blockers"
tar -czf "$out/logs.tar.gz" -C "$logs" . && rm -rf "$logs"
echo "(the table is $out/table.txt; every step's output is in $out/logs.tar.gz)"
exit "$failed"
