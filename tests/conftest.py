"""What the whole suite shares: its thread setting, the tiny prepared-folder builder, the pool recorder."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexrepro.core import workers
from alexrepro.data.shards.manifest import ClassInfo, Manifest, Sample, SplitInfo
from alexrepro.data.shards.writer import write_manifest, write_shard

# The test machine's cores are shared and the suite's tensors are tiny: more threads only contend. Processes the
# tests start set their own (the loader's worker init; the scripts run by subprocess).
torch.set_num_threads(1)


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    """H×W×3 uint8 RGB as a JPEG file, as prepare stores images."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def in_shards(samples: Sequence[Sample], shard_size: int) -> list[Sequence[Sample]]:
    """`samples` cut into shards of `shard_size`, in order (the last one shorter)."""
    return [samples[start : start + shard_size] for start in range(0, len(samples), shard_size)]


def write_prepared(
    out: Path, splits: dict[str, Sequence[Sequence[Sample]]], classes: Sequence[ClassInfo], settings: dict
) -> Manifest:
    """A folder as `alexrepro prepare` leaves it: each split's shards (`split-000000.tar`, … one per list of
    samples), their member indexes and manifest.json."""
    out.mkdir(parents=True, exist_ok=True)
    infos = {
        split: tuple(write_shard(out / f"{split}-{n:06d}.tar", list(samples)) for n, samples in enumerate(shards))
        for split, shards in splits.items()
    }
    manifest = Manifest(
        settings=settings,
        classes=tuple(classes),
        splits={split: SplitInfo(count=sum(i.count for i in shards), shards=shards) for split, shards in infos.items()},
    )
    return write_manifest(out, manifest)


@pytest.fixture
def pool_start_methods(monkeypatch) -> list[str]:
    """The start method of every worker pool alexrepro.core.workers opens during the test (to check none forks)."""
    methods: list[str] = []

    class Recording(workers.ProcessPoolExecutor):
        def __init__(self, max_workers, mp_context, **options):
            methods.append(mp_context.get_start_method())
            super().__init__(max_workers, mp_context=mp_context, **options)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", Recording)
    return methods


@pytest.fixture
def no_tf32():
    """fp32 matmuls and cuDNN convolutions without TF32 for one test (the CUDA comparisons with CPU results)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
