"""The paper's per-sample augmentations (§4.1), each in one class: what the loader's workers draw for a sample, and
what the device does with it.

Every augmentation here is drawn per sample in the workers, from the sample's own random stream keyed by (seed,
epoch, position) — so a resumed run and any worker count draw the same — and applied on the device to the whole
batch, where it costs least (alexrepro.train.loop.Preprocess). The crop is not among them: it decides which pixels
the workers decode and keep, so the loader draws it first itself (`Augmentation.random_crop`).

A new augmentation is one class here, added to PER_SAMPLE, and one key in TrainConfig (its strength, 0 = off):
`name` is that key, `draw` takes `size` numbers from the sample's stream, `apply` uses them on the device. The
loader, the batch (`Batch.draws`), the preprocessing and the switch list need no change. The order of PER_SAMPLE is
the order of the draws: appending keeps every earlier draw, and so every earlier result, as it was.

Importable without torch (the configs read the names); `apply` imports the device operations when it runs.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from alexrepro.data.config import Augmentation


class DeviceStats(Protocol):
    """What an augmentation may read on the device: the training set's RGB statistics (alexrepro.data.stats)."""

    eigval: Tensor
    eigvec: Tensor
    lighting_scale: Literal["eigval", "sqrt_eigval"]


class PerSampleAugmentation(Protocol):
    name: str  # its TrainConfig key (and its entry in Batch.draws)
    size: int  # numbers drawn per sample

    def strength(self, settings: Augmentation) -> float:
        """How strong it is in `settings` (0: off, and nothing is drawn)."""
        ...

    def from_config(self, config: Any) -> float:
        """Its strength from a TrainConfig (its key, and any switch that turns it off)."""
        ...

    def draw(self, rng: random.Random, strength: float) -> tuple[float, ...]:
        """`size` numbers for one sample (called only when strength > 0; zeros otherwise)."""
        ...

    def apply(self, x: Tensor, draws: Tensor, stats: DeviceStats) -> Tensor:
        """The N×3×c×c mean-subtracted batch with the augmentation applied, given the N×size draws."""
        ...


class Flip:
    """Horizontal reflection with probability 1/2 (§4.1), applied to the crop and its mean together."""

    name = "flip"
    size = 1

    def strength(self, settings: Augmentation) -> float:
        return 1.0 if settings.flip else 0.0

    def from_config(self, config: Any) -> float:
        return 1.0 if config.flip else 0.0

    def draw(self, rng: random.Random, strength: float) -> tuple[float, ...]:
        return (1.0 if rng.random() < 0.5 else 0.0,)

    def apply(self, x: Tensor, draws: Tensor, stats: DeviceStats) -> Tensor:
        from alexrepro.data.augment import flip_where

        return flip_where(x, draws[:, 0] > 0)


class PcaLighting:
    """§4.1's lighting: add Σ αᵢλᵢpᵢ to every pixel, α ~ N(0, lighting_std) per image and component."""

    name = "pca_lighting"
    size = 3

    def strength(self, settings: Augmentation) -> float:
        return settings.lighting_std

    def from_config(self, config: Any) -> float:
        return config.lighting_std if config.pca_lighting else 0.0

    def draw(self, rng: random.Random, strength: float) -> tuple[float, ...]:
        return tuple(rng.gauss(0.0, strength) for _ in range(3))

    def apply(self, x: Tensor, draws: Tensor, stats: DeviceStats) -> Tensor:
        from alexrepro.data.augment import pca_lighting

        return pca_lighting(x, stats.eigval, stats.eigvec, alphas=draws, scale=stats.lighting_scale)


class Added:
    """The base of an augmentation added beyond the paper's: its strength is its TrainConfig key (`name`), carried
    to the workers in `Augmentation.added`. A subclass gives `size`, `draw` and `apply`."""

    name: ClassVar[str]
    size: ClassVar[int]

    def strength(self, settings: Augmentation) -> float:
        return dict(settings.added).get(self.name, 0.0)

    def from_config(self, config: Any) -> float:
        return float(getattr(config, self.name))


# In draw order (see the module doc): the paper's reflection, then its lighting; added ones after them.
PER_SAMPLE: list[PerSampleAugmentation] = [Flip(), PcaLighting()]


def register(augmentation: PerSampleAugmentation) -> None:
    """Add `augmentation` after the others (its draws come last, so every earlier one stays as it was)."""
    PER_SAMPLE.append(augmentation)


def draws_of(settings: Augmentation | None, rng: random.Random | None) -> dict[str, tuple[float, ...]]:
    """One sample's draws of every augmentation, in PER_SAMPLE order; zeros where it is off (or for evaluation,
    `settings` None)."""
    out = {}
    for augmentation in PER_SAMPLE:
        strength = augmentation.strength(settings) if settings is not None else 0.0
        if strength > 0 and rng is not None:
            out[augmentation.name] = augmentation.draw(rng, strength)
        else:
            out[augmentation.name] = (0.0,) * augmentation.size
    return out
