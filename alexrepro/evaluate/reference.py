"""torchvision's pretrained AlexNet as a known result to check the evaluation path against, as timm's validate.py
does: `alexrepro evaluate torchvision:alexnet SHARDS OUT` on the ILSVRC-2012 val set should give torchvision's
published 1-crop errors (43.45% top-1, 20.91% top-5, from its documented 56.522% / 79.066% accuracy) before a new
checkpoint's numbers are trusted.

This is torchvision's own network (the single-tower "one weird trick" variant, 224 input, no LRN) with its own
preprocessing: the 256-pixel image (prepare's shards are the shorter side resized to 256 and the centre square, as
torchvision's Resize(256) + CenterCrop keep), cut to 224 (the centre, or the ten patches), scaled to [0, 1] and
normalised by ImageNet's channel mean and standard deviation. Its weights come from torchvision's own loader on
the user's machine (downloaded once into torch's cache). `torchvision:alexnet-random` is the same architecture with
random weights, sized to the shards' classes: the tests use it, and it checks the path without a download.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from alexrepro.core.errors import EvaluationError
from alexrepro.data.augment import center_offset
from alexrepro.data.loader import Decoder, decode_torchvision
from alexrepro.data.shards.manifest import Manifest
from alexrepro.model.inference import ten_crop_views

PREFIX = "torchvision:"
PRETRAINED, RANDOM = "torchvision:alexnet", "torchvision:alexnet-random"
CROP = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet normalisation (RGB, 0–1)


def is_reference(name: object) -> bool:
    return str(name).startswith(PREFIX)


def reference_checkpoint(name: str, manifest: Manifest) -> dict[str, Any]:
    """What the evaluation reads of a checkpoint, for torchvision's AlexNet: its weights, one tower, the classes."""
    import torchvision

    if name == PRETRAINED:
        if manifest.num_classes != 1000:
            raise EvaluationError(
                f"{name} knows ILSVRC-2012's 1000 classes, the shards have {manifest.num_classes}: evaluate it on "
                f"the ILSVRC-2012 val set, or use {RANDOM} to check the path"
            )
        try:
            model = torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.IMAGENET1K_V1)
        except Exception as exc:  # no network, no cache: torchvision's loader says why
            raise EvaluationError(f"{name}: torchvision could not load its weights ({exc}); check the network or "
                                  "torch's cache folder") from None  # fmt: skip
    elif name == RANDOM:
        torch.manual_seed(0)
        model = torchvision.models.alexnet(weights=None, num_classes=manifest.num_classes)
    else:
        raise EvaluationError(f"{name}: unknown reference network; use {PRETRAINED} or {RANDOM}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].cpu().numpy().tobytes())
    return {
        "reference": name,
        "sha256": digest.hexdigest(),
        "epoch": 0,
        "classes": [
            {"index": c.index, "wnid": c.wnid, "ilsvrc_id": c.ilsvrc_id, "name": c.name} for c in manifest.classes
        ],  # fmt: skip
        "model_config": {"towers": 1, "crop": CROP, "num_classes": manifest.num_classes},
        "train_config": {},
        "switches": {},
        "history": [],
        "state": state,
        "model": {"conv1.weight": state["features.0.weight"]},  # the report's kernel figure
    }


class ReferenceNetwork:
    """torchvision's AlexNet with the interface evaluate uses of alexrepro.model.inference.InferenceNetwork."""

    decoder: Decoder = "torchvision"

    def __init__(self, ckpt: dict[str, Any], devices: Sequence[torch.device | str], size: int):
        import torchvision

        if size < CROP:
            raise EvaluationError(f"torchvision's AlexNet takes {CROP}-pixel crops of 256-pixel images; the shards "
                                  f"are {size} pixels: prepare with --size 256")  # fmt: skip
        self.device = torch.device(devices[0])
        self.size = size
        self.model = torchvision.models.alexnet(weights=None, num_classes=len(ckpt["classes"]))
        self.model.load_state_dict(ckpt["state"])
        self.model = self.model.to(self.device).eval()
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)

    def decode(self, jpeg: bytes | memoryview) -> torch.Tensor:
        return decode_torchvision(jpeg)

    def _normalised(self, views: torch.Tensor) -> torch.Tensor:
        return (views.float() / 255.0 - self.mean) / self.std

    def ten_crop_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×10×K softmax outputs, torchvision's TenCrop patches (view 4: the centre crop)."""
        views = ten_crop_views(images.to(self.device), CROP).flatten(0, 1)  # (N·10)×3×224×224
        with torch.inference_mode():
            logits = self.model(self._normalised(views)).float()
        return F.softmax(logits, dim=1).view(images.shape[0], 10, -1)

    def centre_features(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×4096: the second fully connected layer's output after its ReLU (the paper's fc7)."""
        y, x = center_offset(self.size, CROP)
        views = self._normalised(images.to(self.device)[..., y : y + CROP, x : x + CROP])
        with torch.inference_mode():
            pooled = torch.flatten(self.model.avgpool(self.model.features(views)), 1)
            return self.model.classifier[:6](pooled).float()

    def check_size(self, images: torch.Tensor, source: str) -> None:
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise EvaluationError(f"{source}: images are {images.shape[-1]}×{images.shape[-2]}, expected "
                                  f"{self.size}×{self.size}; rerun `alexrepro prepare`")  # fmt: skip
