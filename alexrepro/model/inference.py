"""A checkpoint's network ready for inference, and the paper's test-time patches (§4.1): what `evaluate` and
`predict` share.

The ten patches are the four corners and the centre at the model's crop size, and their horizontal reflections, in
`torchvision.transforms.TenCrop` order; their softmax outputs are averaged. The centre patch alone (view 4) gives the
1-crop result from the same forward pass. Patches are preprocessed exactly as in training: the per-pixel mean image
cropped at the same offset (and mirrored with the reflection) is subtracted and the result multiplied by the
checkpoint's `input_scale`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from alexrepro.core.errors import EvaluationError, FormatError
from alexrepro.data.augment import center_offset, crop_mean, normalize, ten_crop_offsets
from alexrepro.data.loader import Decoder, decode_pil, decode_torchvision
from alexrepro.model.network import set_tf32


def ten_crop_views(images: torch.Tensor, crop: int) -> torch.Tensor:
    """N×C×S×S images → N×10×C×crop×crop in torchvision's TenCrop order: the five patches of the image, then the five
    patches of its mirror image (so view 5, the mirror's top-left, is the reflection of view 1, the top-right)."""

    def five(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[..., y : y + crop, i : i + crop] for y, i in ten_crop_offsets(x.shape[-1], crop)], dim=1)

    return torch.cat([five(images), five(images.flip(-1))], dim=1)


def ten_crop_windows(size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the ten views come from in the original image: (y, x) of each window (10×2) and whether it is mirrored.

    A window at (y, x) of the mirror image is the mirrored window at (y, size − crop − x) of the original; this is the
    form training uses (crop position, then reflection) to cut the mean image (alexrepro.data.augment.crop_mean).
    """
    offsets = ten_crop_offsets(size, crop)
    mirrored = [(y, size - crop - x) for y, x in offsets]
    return torch.tensor(offsets + mirrored, dtype=torch.long), torch.arange(10) >= 5


CENTRE_VIEW = 4  # index of the unreflected centre patch among the ten


class TenCropPatches:
    """Turns decoded S×S images into the network's preprocessed input, exactly as training preprocesses its crops."""

    def __init__(self, normalization: dict, crop: int, device: torch.device):
        mean_image = torch.as_tensor(normalization["mean_image"], dtype=torch.float32)  # H×W×3 RGB 0–255
        self.size = int(mean_image.shape[0])
        self.crop = crop
        self.input_scale = float(normalization["input_scale"])
        offsets, flipped = ten_crop_windows(self.size, crop)
        mean_chw = mean_image.permute(2, 0, 1).contiguous()
        self.mean_views = crop_mean(mean_chw, offsets, crop, flipped).to(device)  # 10×3×c×c, as the views

    def ten(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 (on the model's device) → (N·10)×3×c×c float, image-major."""
        views = ten_crop_views(images, self.crop)  # N×10×3×c×c
        mean = self.mean_views.expand(views.shape[0], *self.mean_views.shape)
        return normalize(views.flatten(0, 1), mean.flatten(0, 1), self.input_scale)

    def centre(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×3×c×c float: the unreflected centre patch only."""
        y, x = center_offset(self.size, self.crop)
        views = images[..., y : y + self.crop, x : x + self.crop]
        mean = self.mean_views[CENTRE_VIEW].expand(views.shape[0], -1, -1, -1)
        return normalize(views, mean, self.input_scale)


DECODERS = {"torchvision": decode_torchvision, "pil": decode_pil}  # TrainConfig.decoder → function


class InferenceNetwork:
    """A checkpoint's network in eval mode, with the preprocessing, decoder and precision it was trained with."""

    def __init__(self, ckpt: dict, devices: Sequence[torch.device | str], source: str = "checkpoint"):
        from alexrepro.model.checkpoint import model_from_checkpoint

        self.device = torch.device(devices[0])
        self.model = model_from_checkpoint(ckpt, list(devices), source).eval()
        crop, side = int(ckpt["model_config"]["crop"]), int(ckpt["normalization"]["mean_image"].shape[0])
        if crop > side:
            raise FormatError(
                f"{source}: its crop ({crop}) is larger than its {side}×{side} mean image; use a checkpoint written "
                "by `alexrepro train`"
            )
        self.patches = TenCropPatches(ckpt["normalization"], crop, self.device)
        train = ckpt.get("train_config") or {}
        decoder = str(train.get("decoder", "torchvision"))
        if decoder not in DECODERS:
            raise EvaluationError(
                f"checkpoint train_config: unknown decoder {decoder!r} (known: {sorted(DECODERS)}); "
                "evaluate with the alexrepro version that trained it"
            )
        self.decoder: Decoder = "pil" if decoder == "pil" else "torchvision"  # checked just above
        # bf16 autocast and channels_last on CUDA, as training ran (DESIGN.md "Training"); softmax always in fp32.
        cuda = self.device.type == "cuda"
        self.bf16 = cuda and train.get("precision", "auto") != "fp32"
        if cuda:  # fp32 layers (all of them at precision fp32) with TF32 only where training used it
            set_tf32(bool(train.get("tf32", False)))
        self.memory_format = (
            torch.channels_last if cuda and train.get("channels_last", True) else torch.contiguous_format
        )
        self.model = self.model.to(memory_format=self.memory_format)

    @property
    def size(self) -> int:
        return self.patches.size

    def decode(self, jpeg: bytes | memoryview) -> torch.Tensor:
        return DECODERS[self.decoder](jpeg)

    def _run(self, forward, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return forward(x).float()

    def ten_crop_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×10×K softmax outputs, one row per patch (the 10-crop result is their mean)."""
        x = self.patches.ten(images.to(self.device, non_blocking=True))
        return F.softmax(self._run(self.model, x), dim=1).view(images.shape[0], 10, -1)

    def centre_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×K softmax outputs of the centre patch."""
        x = self.patches.centre(images.to(self.device, non_blocking=True))
        return F.softmax(self._run(self.model, x), dim=1)

    def centre_features(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×D fc7 activations (after ReLU) of the centre patch, float32 on the first device."""
        x = self.patches.centre(images.to(self.device, non_blocking=True))
        return self._run(self.model.fc7_features, x)

    def check_size(self, images: torch.Tensor, source: str) -> None:
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise EvaluationError(
                f"{source}: images are {images.shape[-1]}×{images.shape[-2]} but the checkpoint's mean image is "
                f"{self.size}×{self.size}; evaluate on shards prepared with --size {self.size}"
            )
