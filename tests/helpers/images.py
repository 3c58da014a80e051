"""JPEG bytes of test pictures."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    """H×W×3 uint8 RGB as a JPEG file, as prepare stores images."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
