#!/usr/bin/env bash
# The benchmarks' peer libraries, MosaicML streaming and litdata, in .venv-peers: a virtual environment that sees
# everything in .venv (the project, torch, Pillow-SIMD, numpy) and adds the two libraries on top.
#
# Why apart, and why without their declared requirements: pip would replace Pillow-SIMD with stock Pillow for both,
# and numpy with an older one for MosaicML, and a comparison of loaders and writers needs the same decoder on every
# side. Both import and run with .venv's Pillow-SIMD and numpy (tests/test_bench_peers.py checks it); what they
# need besides is installed here, into .venv-peers only (pip never removes a package outside its own environment).
#
#   scripts/install-bench-peers.sh
#   .venv-peers/bin/python -m alexrepro bench prepare     # rows for webdataset, MosaicML and litdata too
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || scripts/setup.sh
if [ ! -x .venv-peers/bin/python ]; then
  .venv/bin/python -m venv .venv-peers  # on .venv's base interpreter, so that .venv's packages fit it
fi
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
project_site=$(.venv/bin/python -c "$purelib")
peers_site=$(.venv-peers/bin/python -c "$purelib")
# addsitedir, not a bare path: it also reads .venv's own .pth files (the project's editable install among them).
echo "import site; site.addsitedir('$project_site')" > "$peers_site/alexrepro-venv.pth"

pip=(.venv-peers/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --no-deps "mosaicml-streaming==0.13.0" "litdata==0.2.76"
# What the two import, less Pillow, numpy and torch, which .venv provides.
"${pip[@]}" "transformers>=4.21.3,<5" "brotli>=1.0.9" "python-snappy>=0.6.1,<1" "zstd>=1.5.2.5,<2" "xxhash>=3,<4" \
  "catalogue>=2,<3" lightning-utilities boto3 obstore tifffile

.venv-peers/bin/python - <<'PY'
import PIL, numpy, litdata, streaming
from alexrepro.data.imaging import pillow_build
print(f"peers: MosaicML streaming {streaming.__version__}, litdata {litdata.__version__}; {pillow_build()}, numpy {numpy.__version__}")
PY
