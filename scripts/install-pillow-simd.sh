#!/usr/bin/env bash
# Replace stock Pillow with Pillow-SIMD (same `PIL` package, SIMD resize and colour conversion) where this machine
# can build it: a C compiler plus the libjpeg and zlib headers. Built with -mavx2 when the CPU has AVX2.
#
#   PYTHON=.venv/bin/python scripts/install-pillow-simd.sh
#
# Run it as the LAST install step: torchvision depends on `pillow`, so any later pip resolve may install stock
# Pillow over Pillow-SIMD's files. Running this script again detects that and rebuilds.
# It never fails its caller: if anything goes wrong it puts stock Pillow back and prints one line saying so.
# Environment: PYTHON (default python3), PILLOW_SIMD_SPEC (default pillow-simd), CC (default cc).
set -uo pipefail

PYTHON=${PYTHON:-python3}
SPEC=${PILLOW_SIMD_SPEC:-pillow-simd}
PIP=("$PYTHON" -m pip --disable-pip-version-check --quiet)

pil_version() { "$PYTHON" -c 'import PIL; print(PIL.__version__)' 2>/dev/null; }
# Pillow-SIMD's versions are upstream's plus ".postN"; stock Pillow never publishes a ".post" release.
is_simd() { case "$(pil_version)" in *.post*) return 0 ;; *) return 1 ;; esac; }
jpeg_works() {
  "$PYTHON" -c 'import io; from PIL import Image
b = io.BytesIO(); Image.new("RGB", (64, 48), (200, 30, 30)).save(b, "JPEG", quality=90)
im = Image.open(io.BytesIO(b.getvalue())); im.draft("RGB", (32, 24)); im.load(); assert im.size == (32, 24)
im.resize((16, 16), Image.Resampling.BILINEAR, reducing_gap=None)' >/dev/null 2>&1
}
headers_present() {
  printf '#include <stdio.h>\n#include <jpeglib.h>\n#include <zlib.h>\nint main(void){return 0;}\n' |
    ${CC:-cc} -x c - -o /dev/null -ljpeg -lz >/dev/null 2>&1
}
fall_back() {
  if ! jpeg_works; then  # PIL was swapped out or half-installed: put stock Pillow back
    "${PIP[@]}" uninstall -y pillow-simd >/dev/null 2>&1
    "${PIP[@]}" install --force-reinstall --no-deps "pillow${STOCK_VERSION:+==$STOCK_VERSION}" >/dev/null 2>&1 ||
      "${PIP[@]}" install --force-reinstall --no-deps pillow >/dev/null 2>&1
  fi
  echo "note: Pillow-SIMD not installed ($1); using stock Pillow $(pil_version) — prepare runs slower"
  exit 0
}

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  echo "note: Pillow-SIMD not installed (no pip for $PYTHON); keeping the Pillow that is there"
  exit 0
fi

# Installed and intact: nothing to do. Pillow-SIMD recorded by pip but stock Pillow's files in PIL/: clobbered.
if "$PYTHON" -m pip show pillow-simd >/dev/null 2>&1; then
  if is_simd && jpeg_works; then
    echo "Pillow-SIMD $(pil_version) already installed"
    exit 0
  fi
  echo "Pillow-SIMD's files were overwritten by stock Pillow $(pil_version) (a later pip resolve); rebuilding"
fi
STOCK_VERSION=""
is_simd || STOCK_VERSION=$(pil_version)

if ! command -v "${CC:-cc}" >/dev/null 2>&1; then
  fall_back "no C compiler"
fi
if ! headers_present && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg-dev zlib1g-dev >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg-dev zlib1g-dev >/dev/null 2>&1; }
fi
headers_present || fall_back "libjpeg or zlib development headers missing (apt-get install libjpeg-dev zlib1g-dev)"

CFLAGS_CC=${CC:-cc}
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  CFLAGS_CC="$CFLAGS_CC -mavx2"
fi

# Build the wheel first, while stock Pillow stays importable; swap only once the wheel exists, so `import PIL`
# is broken for no longer than one uninstall + install of a local wheel (a second or two).
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
CC="$CFLAGS_CC" "${PIP[@]}" wheel --no-deps --no-binary :all: --wheel-dir "$wheels" "$SPEC" >/dev/null 2>&1 ||
  fall_back "building $SPEC with CC=\"$CFLAGS_CC\" failed"
wheel=$(ls "$wheels"/*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || fall_back "no wheel was built"

"${PIP[@]}" uninstall -y pillow pillow-simd >/dev/null 2>&1
"${PIP[@]}" install --no-deps --force-reinstall "$wheel" >/dev/null 2>&1 || fall_back "installing the built wheel failed"
if is_simd && jpeg_works; then
  echo "Pillow-SIMD $(pil_version) installed (CC=\"$CFLAGS_CC\")"
else
  fall_back "the installed build did not pass its JPEG check"
fi
