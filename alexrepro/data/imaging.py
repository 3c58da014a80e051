"""Image decoding and the resize-and-re-encode step of `prepare` (the hot path of data preparation).

Decoding the source JPEG is the floor (DESIGN.md "Performance design"), so the rest of the work is kept small:

1. `Image.draft()` asks libjpeg to decode at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) that still leaves the
   shorter side ≥ the target size: a 500×375 image bound for 256 decodes at full size, a 1600×1200 one at 1/4.
   Scaling inside the IDCT costs less than decoding at full size, and the filter then has less to do.
2. One `resize(..., box=...)` call resamples only the centred square that the crop keeps, straight to size×size:
   "shorter side → size, then centre crop" (paper §2) without computing the pixels the crop would throw away.
   The filter is BILINEAR with `reducing_gap=None` (a triangle filter whose support widens with the scale factor,
   so it antialiases; after draft() it shrinks by at most 2×). LANCZOS costs more and, after the reduction
   draft() has already done, gives no visible gain at 256 px (docs/benchmarks.md has the measurements).
3. JPEG encode with 4:2:0 chroma subsampling and no `optimize` pass (it costs a second Huffman pass).

Odd inputs (REFERENCE.md §5) are decoded by content, never by file name, and converted to RGB:
CMYK (Pillow undoes Adobe's inverted CMYK), L / 1 / P / YCbCr via `convert("RGB")`, transparent images (RGBA,
LA, PA, P with a transparency key) are composited onto white — what an image viewer shows, and what keeps
transparent regions from turning into black — and 16-bit / 32-bit integer images are rescaled from 0–65535 to
0–255 (Pillow's own `convert` would clip them at 255, turning most of a 16-bit image white).
EXIF orientation is ignored, as in every standard ImageNet pipeline (torchvision's ImageFolder, Caffe, FFCV).

Files that cannot be decoded — empty, truncated, not an image, or a decompression bomb — raise `UnreadableImage`,
which `prepare` records in the manifest's rejected list. Truncated files are rejected rather than padded with
grey: `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False, and `_decode` checks that it is.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile

from alexrepro.core.errors import exception_text

# Larger than any ILSVRC-2012 image (the biggest train image has about 12 M pixels) and equal to Pillow's own
# warning threshold. A header claiming more is a decompression bomb: decoding it could take gigabytes of memory.
MAX_PIXELS = 89_478_485

RESIZE_FILTER = "bilinear (reducing_gap=None) after JPEG draft() scaling"

# Pillow-SIMD's only visible mark is its version number: upstream Pillow's plus a ".postN" suffix
# (e.g. "9.5.0.post1", "12.1.1.post0"); upstream Pillow has never published a ".post" release.
_SIMD_MARK = ".post"

_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImage(Exception):
    """The bytes are not an image this project can use; `reason` says why in a few words.

    Not an AlexReproError: a single bad file is not a user error, `prepare` records it and goes on.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def pillow_build() -> str:
    """Which Pillow does the work: "Pillow-SIMD 12.1.1.post0" or "Pillow 13.0.0" (recorded in the manifest)."""
    import PIL

    version = PIL.__version__
    return f"Pillow-SIMD {version}" if _SIMD_MARK in version else f"Pillow {version}"


def resize_square_jpeg(data: bytes, size: int, quality: int) -> bytes:
    """Decode `data` (any format Pillow reads), scale the shorter side to `size`, centre-crop size×size, encode JPEG.

    The result is always an RGB baseline JPEG of exactly size×size pixels at `quality`, 4:2:0 chroma subsampling.
    Images smaller than `size` are scaled up. Raises UnreadableImage for anything that is not a decodable image.
    """
    if size < 1:
        raise ValueError(f"size must be ≥ 1, got {size}")
    image = _open(data)
    width, height = image.size
    draft = None
    if image.format == "JPEG":
        # draft() picks the smallest DCT scale whose result is at least this large in both directions.
        scale = size / min(width, height)
        draft = (math.ceil(width * scale), math.ceil(height * scale))
        image.draft("RGB", draft)
    image = _to_rgb(_load(image, data, draft))
    square = _centre_square(*image.size)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=square, reducing_gap=None)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, subsampling="4:2:0")
    return out.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode an image (in practice a shard's RGB JPEG) to an H×W×3 uint8 array."""
    image = _to_rgb(_load(_open(data), data))
    return np.asarray(image)


def decode_rgb_planes(data: bytes | memoryview) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode an image to its R, G and B planes, each H×W uint8 (Pillow splits bands in C, cheaper than a
    numpy transpose of the interleaved array; `stats` wants planes)."""
    image = _to_rgb(_load(_open(data), data))
    red, green, blue = (np.asarray(band) for band in image.split())
    return red, green, blue


def decode_only(data: bytes) -> None:
    """Decode at full size and throw the pixels away: the 'plain decode' baseline of the benchmarks."""
    Image.open(io.BytesIO(data)).load()


def resize_obvious_way(data: bytes, size: int = 256, quality: int = 95) -> bytes:
    """The baseline that most preparation scripts use: full decode, LANCZOS on the whole image, crop, save at q95."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.LANCZOS)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _open(data: bytes | memoryview) -> Image.Image:
    """Identify the image from its content and check its claimed size before any pixel is decoded."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with warnings.catch_warnings():
            # Our own MAX_PIXELS check below replaces Pillow's bomb warning (and its error at twice the limit).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UnreadableImage("decompression bomb: claimed size exceeds the pixel limit") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # UnidentifiedImageError (an OSError) for non-images; the others for headers that lie.
        raise UnreadableImage(_reason("not a readable image", exc)) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise UnreadableImage(f"zero-sized image ({width}×{height})")
    if width * height > MAX_PIXELS:
        raise UnreadableImage(f"decompression bomb: {width}×{height} exceeds {MAX_PIXELS:,} pixels")
    return image


def _load(image: Image.Image, data: bytes | memoryview, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode the pixels; truncated or corrupt data raises UnreadableImage instead of being padded."""
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "LOAD_TRUNCATED_IMAGES would let truncated files through as grey"
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        # Pillow's "image file is truncated (45 bytes not processed)" counts bytes of its last read, not what is
        # missing: the reason a person needs is that the file is cut short.
        if "image file is truncated" in str(exc):
            raise UnreadableImage(
                "the file is cut short (truncated): its image data ends before the image does"
            ) from None
        raise UnreadableImage(_reason("corrupt or truncated image data", exc)) from None
    if image.format == "JPEG" and _jpeg_ran_out(image, data, draft):
        raise UnreadableImage("corrupt or truncated image data: JPEG data ends before the last row (premature end)")
    return image


# The value every channel of a block takes when libjpeg has no data left for it: all DCT coefficients zero,
# i.e. the level-shift value 128 (RGB, grey, YCbCr and CMYK alike; 127 for Adobe's inverted CMYK).
_NO_DATA = (127, 128)
# Bytes that stand in for missing entropy-coded data in `_jpeg_ran_out`; no 0xFF, so no marker can appear in them.
_FILLER = b"\x5a\xa5" * 2048


def _jpeg_ran_out(image: Image.Image, data: bytes | memoryview, draft: tuple[int, int] | None) -> bool:
    """Whether libjpeg met the end of the data (an early EOI marker) before the last block of the image.

    libjpeg treats that as a warning ("Premature end of JPEG file", "Corrupt JPEG data: premature end of data
    segment") and fills the rest of the image with zero coefficients, flat grey; Pillow (and Pillow-SIMD) discard
    libjpeg's warnings, so a file cut short and closed with an EOI marker, or one whose header claims more rows
    than it holds, decodes without an error. Baseline JPEGs store blocks in raster order, so when data is missing
    the last pixel is that flat grey. Only then (rarely, in a real image) the file is decoded once more with filler
    bytes before its EOI marker: a whole file never reads them (the pixels come out the same), a cut-short one
    decodes them in place of the grey (the pixels change).
    """
    last = image.getpixel((image.width - 1, image.height - 1))
    if any(channel not in _NO_DATA for channel in (last if isinstance(last, tuple) else (last,))):
        return False
    data = bytes(data)  # a slice of a shard read whole (stats) is a memoryview, which has no rfind
    end = data.rfind(b"\xff\xd9")
    if end < 0:
        return False  # no EOI at all: Pillow itself raised "image file is truncated" above
    again = Image.open(io.BytesIO(data[:end] + _FILLER + data[end:]))
    if draft is not None:
        again.draft("RGB", draft)
    try:
        again.load()
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError):
        return True
    return again.tobytes() != image.tobytes()


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit PNG/TIFF samples span 0–65535; 65535 / 257 = 255 exactly.
        wide = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    try:
        return image.convert("RGB")  # CMYK, L, 1, P, YCbCr, LAB, HSV, RGBX, …
    except (ValueError, OSError) as exc:
        raise UnreadableImage(_reason(f"cannot convert mode {mode} to RGB", exc)) from None


def _centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square of side min(width, height), in source pixel coordinates (the region the crop keeps)."""
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return (left, top, left + side, top + side)


def _reason(prefix: str, exc: BaseException) -> str:
    return f"{prefix}: {exception_text(exc)}"
