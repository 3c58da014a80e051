#!/usr/bin/env bash
# Set up, then run the test suite (CPU only; CUDA tests are skipped where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
.venv/bin/python -m pytest "$@"
