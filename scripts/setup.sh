#!/usr/bin/env bash
# Set up alexrepro on a fresh machine: a virtual environment in .venv with the project, DVC, pytest and the linters,
# then Pillow-SIMD where this machine can build it (stock Pillow otherwise, with a one-line note).
# Safe to run again: it only installs what is missing or out of date.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi

# Re-install only when the project's requirements changed since the last set-up.
stamp=.venv/.alexrepro-setup
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # pip, not uv/poetry: pip finds the torch wheels that some machines keep on local disk.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dvc,test,lint]"
  # Last step, because any later pip resolve that touches torchvision can put stock Pillow back.
  if [ -x scripts/install-pillow-simd.sh ]; then
    PYTHON=.venv/bin/python scripts/install-pillow-simd.sh || echo "note: Pillow-SIMD not installed; using stock Pillow (slower prepare)"
  fi
  echo "$want" > "$stamp"
fi
