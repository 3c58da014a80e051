"""`alexrepro predict`: the top-5 classes of a few image files, by the same path as evaluation.

Each file (any size or format Pillow reads) goes through exactly what `prepare` does to a training image: decoded by
content, shorter side scaled to the checkpoint's image size (that of its mean image, 256 for the paper), centre
square, re-encoded as JPEG at prepare's quality. Then the paper's test-time patches (§4.1): the average softmax of
the ten patches, or the centre patch alone with `crops=1`. A file that is missing or unreadable becomes a
`PredictionError` naming it; the other files are still answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alexrepro.core.errors import ConfigError
from alexrepro.data.config import PrepareConfig
from alexrepro.data.imaging import UnreadableImage, resize_square_jpeg
from alexrepro.model.distributed import resolve_devices
from alexrepro.model.inference import InferenceNetwork


@dataclass(frozen=True)
class Prediction:
    path: Path
    crops: int  # 10 = the paper's averaged patches, 1 = the centre patch
    classes: list[int]  # class indices, most probable first
    wnids: list[str]
    names: list[str]
    probabilities: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "crops": self.crops,
            "top": [
                {"class": c, "wnid": w, "name": n, "probability": p}
                for c, w, n, p in zip(self.classes, self.wnids, self.names, self.probabilities, strict=True)
            ],
        }


@dataclass(frozen=True)
class PredictionError:
    path: Path
    reason: str  # a few words: "no such file", "not a readable image (…)"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "error": self.reason}


def predict(
    checkpoint: Path, images: Sequence[Path], crops: int = 10, device: str = "auto", top_k: int = 5
) -> list[Prediction | PredictionError]:
    """The `top_k` classes and probabilities of each image, in the order given."""
    from alexrepro.model.checkpoint import load_checkpoint

    if crops not in (1, 10):
        raise ConfigError(f"--crops must be 1 (centre patch) or 10 (the paper's ten patches), got {crops}")
    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    ckpt = load_checkpoint(Path(checkpoint))
    devices = resolve_devices(device, int(ckpt["model_config"].get("towers", 2)))
    network = InferenceNetwork(ckpt, devices, str(checkpoint))
    quality = PrepareConfig().quality  # the network learnt from shards re-encoded at prepare's quality
    classes = ckpt["classes"]
    k = min(top_k, len(classes))

    results: list[Prediction | PredictionError] = []
    for path in map(Path, images):
        try:
            image = load_image(path, network, quality)
        except _Unusable as exc:
            results.append(PredictionError(path, str(exc)))
            continue
        if crops == 10:
            probs = network.ten_crop_probabilities(image[None]).mean(dim=1)[0]
        else:
            probs = network.centre_probabilities(image[None])[0]
        values, indices = probs.topk(k)
        top = indices.tolist()
        results.append(
            Prediction(
                path=path,
                crops=crops,
                classes=top,
                wnids=[classes[c]["wnid"] for c in top],
                names=[classes[c]["name"] for c in top],
                probabilities=[float(v) for v in values.tolist()],
            )
        )
    return results


class _Unusable(Exception):
    """A file that cannot be predicted; the message is the reason shown to the user."""


def load_image(path: Path, network: InferenceNetwork, quality: int) -> torch.Tensor:
    """`path` as prepare would store it and training would decode it: 3×S×S uint8 RGB. Raises _Unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Unusable("no such file") from None
    except IsADirectoryError:
        raise _Unusable("is a folder, not an image file") from None
    except OSError as exc:
        raise _Unusable(f"cannot read ({exc.strerror or exc})") from None
    try:
        return network.decode(resize_square_jpeg(data, network.size, quality))
    except UnreadableImage as exc:
        raise _Unusable(exc.reason) from None  # without Pillow's object addresses (errors.exception_text)
