"""Per-batch float work on the training device: mean-image subtraction at each crop's offset, PCA lighting.

Loader workers hand over uint8 crops together with where each crop came from (y, x, flipped) and the lighting
coefficients α drawn for it (alexrepro.data.loader); everything that needs floats, and the reflection, happens here, on
the device, one batch at a time (DESIGN.md "Training").

Units: pixels are RGB 0–255 until `input_scale` is applied last; the stats stage gives the covariance of 0–255
values (alexrepro.data.stats).
"""

from __future__ import annotations

from typing import Literal

import torch

LightingScale = Literal["eigval", "sqrt_eigval"]


def center_offset(size: int, crop: int) -> tuple[int, int]:
    """(y, x) of the centre `crop`×`crop` window of a `size`×`size` image (the paper's single-crop test view)."""
    _check_crop(size, crop)
    return (size - crop) // 2, (size - crop) // 2


def ten_crop_offsets(size: int, crop: int) -> list[tuple[int, int]]:
    """The paper's five test positions (§4.1): top-left, top-right, bottom-left, bottom-right, centre.

    torchvision's TenCrop order; the ten views are these five, then the same five mirrored. Five (y, x)
    pairs are returned because a reflection does not move the window.
    """
    _check_crop(size, crop)
    far = size - crop
    return [(0, 0), (0, far), (far, 0), (far, far), center_offset(size, crop)]


def crop_mean(
    mean_image: torch.Tensor, offsets: torch.Tensor, crop: int, flipped: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean image cut at each crop's window: 3×S×S and N×2 (y, x) → N×3×crop×crop.

    `flipped` (N bools) mirrors the window for the images that were reflected, so that each image has exactly
    its own pixels' means subtracted (paper §2: the per-pixel mean over the training set).
    """
    device = mean_image.device
    offsets = offsets.to(device=device, dtype=torch.long)
    span = torch.arange(crop, device=device)
    rows = offsets[:, 0:1] + span  # N×c
    cols = offsets[:, 1:2] + span  # N×c
    if flipped is not None:
        cols = torch.where(flipped.to(device=device, dtype=torch.bool)[:, None], cols.flip(1), cols)
    crops = mean_image[:, rows[:, :, None], cols[:, None, :]]  # 3×N×c×c
    return crops.permute(1, 0, 2, 3)  # N×3×c×c


def flip_where(batch: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images (N×C×H×W) whose `flipped` flag is set: the paper's reflections (§4.1)."""
    flipped = flipped.to(device=batch.device, dtype=torch.bool)[:, None, None, None]
    return torch.where(flipped, batch.flip(-1), batch)


def normalize(batch_uint8: torch.Tensor, mean_crops: torch.Tensor, input_scale: float) -> torch.Tensor:
    """(x − mean) · input_scale in float32. The paper feeds raw mean-subtracted 0–255 values (input_scale 1)."""
    return (batch_uint8.to(torch.float32) - mean_crops) * input_scale


def lighting_shift(
    alphas: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor, scale: LightingScale = "eigval"
) -> torch.Tensor:
    """RGB offset per image, in 0–255 units: [p1 p2 p3]·[α1λ1, α2λ2, α3λ3]ᵀ (paper §4.1). N×3 α → N×3.

    `eigval` are eigenvalues of the covariance of 0–255 pixel values, i.e. variances.
    - "eigval" (default, the paper's text): λ is a variance, taken in the units of pixel values in [0, 1]
      (λ/255²) and the shift converted back to 0–255. This is the only reading of "variance" whose magnitude is
      plausible: in 0–255 units the same formula would add hundreds of grey levels. On ImageNet the top λ is ~0.2
      in [0, 1] units, so α·λ with α ~ N(0, 0.1) moves pixels by a few grey levels.
    - "sqrt_eigval": λ replaced by its square root (a standard deviation), as Krizhevsky's cuda-convnet2 code does;
      unit-free, and about 2.2× larger noise on ImageNet (REFERENCE.md §2).
    """
    if scale == "eigval":
        magnitude = eigval / 255.0  # 255 · (λ / 255²): the variance in [0, 1] units, shifted back to 0–255
    elif scale == "sqrt_eigval":
        magnitude = eigval.clamp(min=0).sqrt()
    else:
        raise ValueError(f"lighting scale must be 'eigval' or 'sqrt_eigval', got {scale!r}")
    return (alphas * magnitude) @ eigvec.T  # N×3: Σ_k p_k · α_k λ_k, with p_k the k-th column of eigvec


def pca_lighting(
    batch_float: torch.Tensor,
    eigval: torch.Tensor,
    eigvec: torch.Tensor,
    std: float = 0.1,
    generator: torch.Generator | None = None,
    alphas: torch.Tensor | None = None,
    scale: LightingScale = "eigval",
) -> torch.Tensor:
    """Add the paper's PCA colour shift to every pixel of each image (N×3×H×W, 0–255 units, mean already removed).

    α ~ N(0, std) per image, drawn from `generator` unless the loader already drew them (`alphas`, N×3), which is
    how training does it: each image's α then depends only on the seed, the epoch and the image's position in the
    epoch, whatever the number of ranks and workers.
    """
    n = batch_float.shape[0]
    device = batch_float.device
    if alphas is None:
        alphas = torch.randn(n, 3, generator=generator, device=generator.device if generator else "cpu") * std
    shift = lighting_shift(
        alphas.to(device=device, dtype=torch.float32),
        eigval.to(device=device, dtype=torch.float32),
        eigvec.to(device=device, dtype=torch.float32),
        scale,
    )
    return batch_float + shift[:, :, None, None].to(batch_float.dtype)


def _check_crop(size: int, crop: int) -> None:
    if not 0 < crop <= size:
        raise ValueError(f"crop {crop} must be between 1 and the image size {size}")
