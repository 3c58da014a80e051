"""The synthetic downloads' settings: `alexrepro sample` and `alexrepro sample --scale`. Standard library only."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from alexrepro.synth.ilsvrc import (
    ILSVRC_CLASSES,
    ILSVRC_VAL_PER_CLASS,
    MAX_TRAIN_PER_CLASS,
    MAX_VAL_PER_CLASS,
    PATTERN_COUNT,
)


@dataclass(frozen=True)
class SampleConfig:
    """Size and seed of the miniature ILSVRC-2012.

    The defaults are the demo's: small enough to generate in well under a minute on two cores, large enough that
    a narrowed AlexNet learns the classes on a CPU in minutes. (They are not the paper's sizes: the real set has
    1000 classes, 732–1300 train and 50 val images per class.)
    """

    classes: int = 10  # number of synthetic classes, at most PATTERN_COUNT
    train_per_class: int = 300
    val_per_class: int = 50  # as in the real validation set (50 per class)
    seed: int = 0
    image_scale: float = 1.0  # multiplies every image's width and height; tests use small values for speed
    workers: int | None = (
        None  # processes that render images; None = one per core, 0 = in this process. Never changes the output bytes.
    )

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= PATTERN_COUNT:
            raise ValueError(f"key 'classes' must be between 2 and {PATTERN_COUNT} (one per built-in pattern)")
        # The train set holds three odd files (PNG, CMYK, grayscale); two classes of two images leave room for them.
        if not 2 <= self.train_per_class <= MAX_TRAIN_PER_CLASS:
            raise ValueError(f"key 'train_per_class' must be between 2 and {MAX_TRAIN_PER_CLASS}")
        if not 1 <= self.val_per_class <= MAX_VAL_PER_CLASS:
            raise ValueError(f"key 'val_per_class' must be between 1 and {MAX_VAL_PER_CLASS}")
        if self.seed < 0:
            raise ValueError("key 'seed' must be a non-negative integer")
        if not 0.05 <= self.image_scale <= 4.0:
            raise ValueError("key 'image_scale' must be between 0.05 and 4.0")
        if self.workers is not None and self.workers < 0:
            raise ValueError(
                "key 'workers' must be 0 (in this process), a positive number of processes or null (all cores)"
            )

    @classmethod
    def tiny(cls, seed: int = 0) -> SampleConfig:
        """A sample small enough for tests (3 classes, 24 images a quarter of ImageNet size): about a second."""
        return cls(classes=3, train_per_class=6, val_per_class=2, seed=seed, image_scale=0.25, workers=1)


@dataclass(frozen=True)
class ScaleConfig:
    """Which fraction of ILSVRC-2012's counts to write, and how.

    `classes` takes the first N of the 1000 classes (in ILSVRC2012_ID order, each with its own count), for tests
    that want the real class structure at a small size.
    """

    scale: Fraction = Fraction(1, 64)
    classes: int = ILSVRC_CLASSES
    val_per_class: int | None = None  # None = max(1, round(50·scale))
    seed: int = 0
    workers: int = 0  # processes that render images; 0 = all cores. Never changes the output bytes.

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"key 'scale' must be a fraction in (0, 1], e.g. 1/64, got {self.scale}")
        # Three classes carry the PNG, CMYK and grayscale files (one each), as in alexrepro.synth.sample.
        if not 3 <= self.classes <= ILSVRC_CLASSES:
            raise ValueError(f"key 'classes' must be between 3 and {ILSVRC_CLASSES}")
        if self.val_per_class is not None and not 1 <= self.val_per_class <= 1000:
            raise ValueError("key 'val_per_class' must be between 1 and 1000")
        if self.seed < 0:
            raise ValueError("key 'seed' must be a non-negative integer")
        if self.workers < 0:
            raise ValueError("key 'workers' must be 0 (all cores) or a positive number of processes")

    @property
    def val_count_per_class(self) -> int:
        if self.val_per_class is not None:
            return self.val_per_class
        return max(1, round(ILSVRC_VAL_PER_CLASS * self.scale))


def parse_scale(text: str) -> Fraction:
    """'1/64', '0.125' or '1' as a Fraction; a clear error otherwise."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--scale {text!r}: expected a fraction such as 1/64, 1/8 or 1") from None
    if not 0 < value <= 1:
        raise ValueError(f"--scale {text!r}: must be above 0 and at most 1 (1 = ILSVRC-2012's full counts)")
    return value
