"""Settings of the data stages (prepare, stats) and of the training augmentation, importable without torch: the
CLI, the help text and the report read them without loading the stages."""

from __future__ import annotations

from dataclasses import dataclass

# The output side's bound: 4096² RGB is 50 MB per image, and a worker holds the decoded source, the resized copy and
# its encoding. A larger --size is a typo (100000 would ask for 30 GB per image and take the machine down).
MAX_SIZE = 4096


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of the prepare stage; the defaults are the paper's where it has one."""

    size: int = 256  # §2: shorter side rescaled to 256, then the central 256×256 patch
    # The paper does not say. The ILSVRC source JPEGs are mostly saved at quality 75–95 already; at 256 px q90
    # keeps re-encoding error well below what the crop, flip and lighting augmentations change (§4.1), makes
    # files ~40% smaller and faster to decode than q95 (decoding is the training loader's floor), and is the
    # quality of the fast path measured in docs/benchmarks.md.
    quality: int = 90
    shard_size: int = 1000  # images per shard: ~25 MB at 256 px q90, 1282 train shards for ILSVRC-2012
    workers: int | None = None  # worker processes; None = one per usable core, 0 = in this process (every stage)
    max_rejected: int = 100  # the real set has no unreadable file, so more than a few means a damaged download
    seed: int = 0  # of the train shuffle
    # Symlinks in an ImageFolder source that point outside it are refused unless this is set: following them
    # silently would read files the user did not mean to hand over (and whose changes DVC does not track).
    follow_symlinks: bool = False
    # A rerun keeps a finished shard whose size and mtime are still those its record noted when this prepare wrote
    # it (the record also holds its sha256 and member index); re-hashing every shard would read the whole output
    # again (33 GB for ILSVRC-2012 at 256 px). true: check each kept shard's sha256 as well (`stats` and the
    # loaders check the manifest's sha256 on first use anyway).
    verify_finished: bool = False
    # A source without a val split (an ImageFolder of train/ only): hold out this fraction of each class's train
    # images as val (the same images for a seed, recorded in the manifest). 0: keep every image for training (not
    # in the paper, which has ILSVRC-2012's own val set; timm and torchvision users split their own data so).
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"key 'size' must be at least 8 pixels, got {self.size}")
        if self.size > MAX_SIZE:
            raise ValueError(
                f"key 'size' must be at most {MAX_SIZE} pixels ({MAX_SIZE}² = {MAX_SIZE * MAX_SIZE:,} pixels per "
                f"image, each worker holding a few), got {self.size}"
            )
        if not 1 <= self.quality <= 100:
            raise ValueError(f"key 'quality' must be between 1 and 100, got {self.quality}")
        if self.shard_size < 1:
            raise ValueError(f"key 'shard_size' must be at least 1, got {self.shard_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(
                f"key 'workers' must be 0 (in this process) or more, or null (one per core), got {self.workers}"
            )
        if self.max_rejected < 0:
            raise ValueError(f"key 'max_rejected' must be 0 or more, got {self.max_rejected}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"key 'val_fraction' must be in [0, 1) (0: no held-out val), got {self.val_fraction}")


@dataclass(frozen=True)
class StatsConfig:
    workers: int | None = None  # processes; None = one per usable core, 0 = in this process (every stage)
    max_images: int | None = None  # None = the whole train split; N = the first N images in shard order

    def __post_init__(self):
        if self.workers is not None and self.workers < 0:
            raise ValueError(
                f"key 'workers' must be ≥ 0 (0 = in this process) or null (one per core), got {self.workers}"
            )
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"key 'max_images' must be ≥ 1 or null (all images), got {self.max_images}")


@dataclass(frozen=True)
class Augmentation:
    """What the workers do to each training image (paper §4.1); each step is a switch."""

    crop: int  # side of the square crop, e.g. 227
    random_crop: bool = True  # False: always the centre crop
    flip: bool = True  # horizontal reflection with probability 1/2
    lighting_std: float = 0.1  # std of α for PCA lighting; 0 disables it (α all zero)
    # Strengths of the augmentations added beyond the paper's (alexrepro.data.augmentations.Added), by name.
    added: tuple[tuple[str, float], ...] = ()
