"""Tiny inputs for the evaluation tests: a few 48×48 images in shards and a checkpoint of a very narrow AlexNet.

The checkpoint is built by hand following the layout of alexrepro.model.checkpoint (no training run), with a 67-pixel crop
(the smallest input for which every layer of the network keeps a positive size).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from alexrepro.core.config import config_to_dict
from alexrepro.data.shards.index import iter_split
from alexrepro.data.shards.manifest import ClassInfo, Manifest, Sample
from alexrepro.data.shards.writer import in_shards, write_prepared_folder
from alexrepro.model.config import ModelConfig
from alexrepro.train.config import TrainConfig
from helpers.images import jpeg_bytes

NUM_CLASSES = 6
SIZE = 80  # the prepared image size (the paper's 256)
CROP = 67  # the model's input (the paper's 227)
VAL_IMAGES = 14
TRAIN_IMAGES = 20


def tiny_classes(count: int = NUM_CLASSES, with_ids: bool = True) -> tuple[ClassInfo, ...]:
    # ILSVRC2012_IDs in an order that differs from the index order, as in the real devkit (REFERENCE.md §5).
    return tuple(
        ClassInfo(
            index=i,
            wnid=f"n0{1000000 + i:07d}",
            ilsvrc_id=(count - i) if with_ids else None,
            name=f"thing {i}, object number {i}",
        )
        for i in range(count)
    )


def image_array(label: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A size×size RGB image: class-dependent stripes plus noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = 4 + 2 * label
    mask = ((xx + yy * (label % 2)) // period) % 2
    colours = rng.integers(30, 225, size=(2, 3))
    image = colours[mask] + rng.normal(0, 10, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tiny_shards(out: Path, classes: tuple[ClassInfo, ...] | None = None, seed: int = 0) -> Manifest:
    """Train (shuffled, two shards) and val (file-name order, three shards) splits, and their manifest."""
    classes = classes or tiny_classes()
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count, shard_size in (("train", TRAIN_IMAGES, 12), ("val", VAL_IMAGES, 5)):
        labels = rng.integers(0, len(classes), size=count).tolist()
        if split == "train":
            keys = [f"{classes[c].wnid}_{i}" for i, c in enumerate(labels)]
        else:
            keys = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(count)]
        samples = [Sample(k, jpeg_bytes(image_array(c, rng)), c) for k, c in zip(keys, labels, strict=True)]
        splits[split] = in_shards(samples, shard_size)
    return write_prepared_folder(out, classes, splits, {"size": SIZE, "quality": 90})


def mean_image(shards: Path) -> np.ndarray:
    """The per-pixel mean of the train split, H×W×3 float32 RGB 0–255 (what the stats stage computes)."""
    from alexrepro.data.imaging import decode_rgb

    images = [decode_rgb(s.jpeg).astype(np.float64) for s in iter_split(shards, "train")]
    return np.mean(images, axis=0).astype(np.float32)


def tiny_checkpoint(shards: Path, classes: tuple[ClassInfo, ...] | None = None, towers: int = 2, seed: int = 0) -> dict:
    """A checkpoint dict in alexrepro.model.checkpoint's layout, for an untrained narrow AlexNet (He init, so the
    outputs differ between images)."""
    from alexrepro.model.network import AlexNet

    classes = classes or tiny_classes()
    model_config = ModelConfig(num_classes=len(classes), crop=CROP, width=0.125, towers=towers, init="he")
    torch.manual_seed(seed)
    model = AlexNet(model_config)
    train_config = config_to_dict(TrainConfig())
    train_config.update(epochs=3, crop=CROP, width=0.125, towers=towers, init="he", lr=0.02)
    switches = {
        key: train_config[key]
        for key in ("lrn", "overlap_pool", "towers", "dropout", "pca_lighting", "flip")
        if key in train_config
    }
    history = [
        {
            "epoch": e,
            "train_loss": 1.8 - 0.2 * e,
            "train_top1_error": 0.8 - 0.1 * e,
            "train_top5_error": 0.3 - 0.05 * e,
            "val_top1_error": 0.82 - 0.1 * e,
            "val_top5_error": 0.35 - 0.05 * e,
            "lr": 0.02 if e < 3 else 0.002,
        }
        for e in (1, 2, 3)
    ]
    eigvec = torch.eye(3)
    return {
        "format": "alexrepro-checkpoint",
        "version": 1,
        "epoch": 3,
        "model_config": dataclasses.asdict(model_config),
        "train_config": train_config,
        "classes": [dataclasses.asdict(c) for c in classes],
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": {},
        "scheduler": {},
        "rng": {},
        "history": history,
        "data": {"manifest_sha256": "0" * 64, "stats_sha256": "0" * 64},
        "normalization": {
            "mean_image": torch.from_numpy(mean_image(shards)),
            "input_scale": 1.0 / 64,  # keeps the untrained network's logits small
            "eigval": torch.tensor([3.0, 2.0, 1.0]),
            "eigvec": eigvec,
        },
        "switches": switches,
    }


def save_tiny_checkpoint(path: Path, ckpt: dict) -> Path:
    from alexrepro.model.checkpoint import save_checkpoint

    save_checkpoint(path, ckpt)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_rank(rank: int, world: int, port: int, checkpoint: str, shards: str, out: str, queue) -> None:
    """One `torchrun`-like rank (a spawned process) running evaluate; puts (rank, (metrics, neighbours)) on `queue`.

    Lives here rather than in the test module so that a rank imports only what evaluation needs.
    """
    import os

    from alexrepro.core.progress import NullProgress
    from alexrepro.evaluate import stage as ev

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ev._write_report = lambda *args, **kwargs: None  # figures are tested elsewhere; here only ranks and counts
    config = ev.EvaluateConfig(batch_size=4, devices="cpu", workers=0)
    result = ev.evaluate(Path(checkpoint), Path(shards), Path(out), config, NullProgress())
    queue.put((rank, (result.metrics, result.neighbours)))
