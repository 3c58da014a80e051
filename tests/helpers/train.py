"""Tiny prepared datasets for the training tests: a few dozen small JPEGs in shards, with a manifest."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from alexrepro.data.config import StatsConfig
from alexrepro.data.loader import Augmentation, EpochSpec, LoaderSettings, ordered_loader, split_index, train_loader
from alexrepro.data.shards.manifest import ClassInfo, Manifest, Sample
from alexrepro.data.shards.writer import in_shards, write_prepared_folder
from helpers.images import jpeg_bytes


def pattern_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size×size RGB image whose class shows in its shape: 0 horizontal stripes, 1 vertical, 2 checks, 3 a disc."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.integers(6, 10)
    phase = rng.integers(0, period)
    if label % 4 == 0:
        mask = ((yy + phase) // (period // 2)) % 2
    elif label % 4 == 1:
        mask = ((xx + phase) // (period // 2)) % 2
    elif label % 4 == 2:
        mask = (((yy + phase) // period) + ((xx + phase) // period)) % 2
    else:
        cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2).astype(int)
    colours = rng.integers(40, 215, size=(2, 3))
    image = colours[mask].astype(np.float64) + rng.normal(0, 12, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_shards(
    out: Path,
    classes: int = 3,
    train_per_class: int = 12,
    val_per_class: int = 4,
    size: int = 72,
    shard_size: int = 10,
    seed: int = 0,
) -> Manifest:
    """Write train/val shards of pattern images and manifest.json into `out`; train interleaves the classes."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        labels = [c for _ in range(per_class) for c in range(classes)]
        if split == "train":
            rng.shuffle(labels)
        samples = [Sample(f"{split}_{i:05d}", jpeg_bytes(pattern_image(c, size, rng)), c) for i, c in enumerate(labels)]
        splits[split] = in_shards(samples, shard_size)
    infos = [ClassInfo(i, f"n{i:08d}", None, f"pattern {i}") for i in range(classes)]
    return write_prepared_folder(out, infos, splits, {"size": size, "quality": 90, "seed": seed})


def normalization_of(shards: Path, manifest: Manifest, input_scale: float) -> dict:
    """The normalisation entry computed directly from the train shards (mean image, RGB covariance eigenpairs)."""
    import torch

    from alexrepro.data.shards.index import iter_split

    images = np.stack(
        [np.asarray(Image.open(io.BytesIO(s.jpeg)).convert("RGB")) for s in iter_split(shards, "train", manifest)]
    )
    pixels = images.reshape(-1, 3).astype(np.float64)
    eigval, eigvec = np.linalg.eigh(np.cov(pixels, rowvar=False))
    order = np.argsort(eigval)[::-1]
    return {
        "mean_image": torch.tensor(images.mean(0), dtype=torch.float32),
        "input_scale": float(input_scale),
        "eigval": torch.tensor(eigval[order], dtype=torch.float32),
        "eigvec": torch.tensor(eigvec[:, order], dtype=torch.float32),
    }


def make_stats(shards: Path, out: Path) -> Path:
    """A stats folder for `shards`, written by the stats stage."""
    from alexrepro.core.progress import NullProgress
    from alexrepro.data.stats import compute_stats

    compute_stats(shards, out, StatsConfig(workers=1), NullProgress())
    return out


def make_training_data(root: Path, **shards) -> tuple[Path, Path]:
    """`root/shards` (make_shards with `shards`' settings) and `root/stats`: the two folders train reads."""
    make_shards(root / "shards", **shards)
    return root / "shards", make_stats(root / "shards", root / "stats")


def train_batches(shards: Path, manifest: Manifest, augmentation: Augmentation, batch_size: int, seed: int,
                  epoch: int, workers: int = 0, start_step: int = 0, **settings):  # fmt: skip
    """alexrepro.data.loader.train_loader over the train split of prepared `shards`; `settings`: LoaderSettings' rest."""
    order = EpochSpec(seed, epoch, start_step)
    return train_loader(split_index(shards, manifest, "train"), augmentation, order,
                        LoaderSettings(batch_size, workers, **settings))  # fmt: skip


def val_batches(shards: Path, manifest: Manifest, crop: int | None, batch_size: int, workers: int = 0, **settings):
    """alexrepro.data.loader.ordered_loader over the val split of prepared `shards`, as training validates."""
    return ordered_loader(split_index(shards, manifest, "val"), crop, LoaderSettings(batch_size, workers, **settings))
