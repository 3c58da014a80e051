"""What every loader benchmark shares: one timed epoch of any loader, and the per-image work any loader does.

The training loader, the feed and the peer libraries' readers (`bench.peers`) are all timed by `timed_epoch` and
crop with `crop_flip`, so that a ratio between two rows compares the loaders, not two ways of timing them.
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from alexrepro.data.loader import decode_pil


def _cpu_seconds() -> tuple[float, float]:
    """CPU time of this process, and of its children that have exited (the DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def timed_epoch(loader: Iterable, images_in: Callable[[Any], int]) -> dict:
    """One epoch of `loader` (the caller keeps no reference to it): wall img/s from the first batch on (steady
    state), the images in all, and the CPU time of this process and of the loader's workers. `images_in(batch)`
    counts a batch's images, doing whatever the consumer does with it."""
    first = None
    count = total = 0
    main, children = _cpu_seconds()
    for batch in loader:
        images = images_in(batch)
        total += images
        if first is None:
            first = time.perf_counter()  # steady state: from the first batch on
            continue
        count += images
    seconds = time.perf_counter() - first if first is not None else math.nan
    del loader  # the workers have exited once the epoch ends; their CPU time is now counted
    main_after, children_after = _cpu_seconds()
    return {"img_s": count / seconds if count else math.nan, "main_cpu": main_after - main,
            "workers_cpu": children_after - children, "images": total}  # fmt: skip


def crop_flip(crop: int, decode: Callable[[bytes], torch.Tensor] = decode_pil, seed: int = 0):
    """Decode, a random crop and a random reflection, uint8: what any loader does per image."""
    rng = random.Random(seed)

    def work(data: bytes) -> torch.Tensor:
        image = decode(data)
        y, x = rng.randrange(image.shape[1] - crop + 1), rng.randrange(image.shape[2] - crop + 1)
        view = image[:, y : y + crop, x : x + crop]
        return (view.flip(-1) if rng.random() < 0.5 else view).contiguous()

    return work


def stack(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, label) samples into one uint8 batch and its labels, as the peers' loaders collate them."""
    images, labels = zip(*samples, strict=True)
    return torch.stack(images), torch.tensor(labels)
