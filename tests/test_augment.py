"""Augmentation on the device: crop offsets, mean subtraction at the crop's window, PCA lighting statistics."""

from __future__ import annotations

import pytest
import torch

from alexrepro.data.augment import (
    center_offset,
    crop_mean,
    flip_where,
    lighting_shift,
    normalize,
    pca_lighting,
    ten_crop_offsets,
)
from alexrepro.data.loader import Augmentation
from helpers.train import make_shards, train_batches


def test_ten_crop_offsets_are_the_corners_then_the_centre():
    assert ten_crop_offsets(256, 227) == [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]
    assert center_offset(256, 224) == (16, 16)
    with pytest.raises(ValueError):
        center_offset(64, 65)


def test_random_crops_cover_the_full_range_and_flip_half(tmp_path):
    manifest = make_shards(tmp_path, classes=3, train_per_class=20, val_per_class=1, size=40, shard_size=60)
    aug = Augmentation(crop=36)  # 5 positions per axis
    offsets, flips = [], []
    for epoch in range(4):
        for batch in train_batches(tmp_path, manifest, aug, 60, seed=0, epoch=epoch, workers=0):
            offsets.append(batch.offsets)
            flips.append(batch.flipped)
    offsets = torch.cat(offsets)
    assert set(offsets[:, 0].tolist()) == set(range(5)) and set(offsets[:, 1].tolist()) == set(range(5))
    assert 0.4 < torch.cat(flips).float().mean().item() < 0.6
    fixed = Augmentation(crop=36, random_crop=False, flip=False, lighting_std=0.0)
    batch = next(iter(train_batches(tmp_path, manifest, fixed, 60, seed=0, epoch=0, workers=0)))
    assert (batch.offsets == 2).all() and not batch.flipped.any() and not batch.alphas.any()


def test_mean_is_cut_at_each_crops_window_and_mirrored_with_it():
    mean = torch.rand(3, 10, 10) * 255
    offsets = torch.tensor([[0, 0], [2, 3], [4, 4]])
    flipped = torch.tensor([False, True, False])
    crops = crop_mean(mean, offsets, 6, flipped)
    assert crops.shape == (3, 3, 6, 6)
    assert torch.equal(crops[0], mean[:, 0:6, 0:6])
    assert torch.equal(crops[1], mean[:, 2:8, 3:9].flip(-1))
    assert torch.equal(crops[2], mean[:, 4:10, 4:10])
    flipped_back = flip_where(crops, flipped)
    assert torch.equal(flipped_back[1], mean[:, 2:8, 3:9]) and torch.equal(flipped_back[0], crops[0])
    images = (crops + 1).round().clamp(0, 255).to(torch.uint8)
    out = normalize(images, crops, 0.5)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (images.float() - crops) * 0.5)


def test_lighting_moves_pixels_along_the_eigenvectors_with_alpha_std():
    torch.manual_seed(0)
    eigvec, _ = torch.linalg.qr(torch.randn(3, 3))
    eigval = torch.tensor([4000.0, 300.0, 50.0])  # variances of 0–255 values, ImageNet-like
    batch = torch.zeros(20000, 3, 2, 2)
    generator = torch.Generator().manual_seed(1)
    shifted = pca_lighting(batch, eigval, eigvec, std=0.1, generator=generator)
    shift = shifted[:, :, 0, 0]
    assert torch.equal(shifted[:, :, 1, 1], shift)  # the same offset on every pixel of an image
    coefficients = shift @ eigvec / (eigval / 255.0)  # back to α: project on each eigenvector, divide by λ
    assert torch.allclose(coefficients.std(0), torch.full((3,), 0.1), rtol=0.05)
    assert coefficients.mean(0).abs().max() < 0.005
    assert torch.corrcoef(coefficients.T).fill_diagonal_(0).abs().max() < 0.05


def test_lighting_scale_switch_and_given_alphas():
    eigvec = torch.eye(3)
    eigval = torch.tensor([255.0 * 4, 255.0, 0.0])
    alphas = torch.tensor([[1.0, 1.0, 1.0]])
    assert torch.allclose(lighting_shift(alphas, eigval, eigvec, "eigval"), torch.tensor([[4.0, 1.0, 0.0]]))
    sqrt = lighting_shift(alphas, eigval, eigvec, "sqrt_eigval")
    assert torch.allclose(sqrt, torch.tensor([[1020.0**0.5, 255.0**0.5, 0.0]]))
    batch = torch.zeros(1, 3, 2, 2)
    assert torch.allclose(pca_lighting(batch, eigval, eigvec, alphas=alphas)[0, :, 0, 0], torch.tensor([4.0, 1.0, 0.0]))


def test_a_new_augmentation_is_one_class_and_one_config_key(tmp_path):
    """An augmentation added beyond the paper's: one class registered in alexrepro.data.augmentations and one key in
    the training config. The workers draw it per sample, the batch carries it and the device applies it, with no
    change to the loader, the batch or the preprocessing."""
    import dataclasses
    import random

    from alexrepro.data import augmentations
    from alexrepro.train.config import TrainConfig
    from alexrepro.train.loop import make_preprocess, normalization_from_stats
    from helpers.train import make_stats

    class Brightness(augmentations.Added):
        name = "brightness"
        size = 1

        def draw(self, rng: random.Random, strength: float) -> tuple[float, ...]:
            return (rng.uniform(-strength, strength),)

        def apply(self, x, draws, stats):
            return x + draws[:, :, None, None]

    @dataclasses.dataclass(frozen=True)
    class WithBrightness(TrainConfig):
        brightness: float = 20.0  # the one config key

    brightness = Brightness()
    augmentations.register(brightness)
    try:
        shards = tmp_path / "shards"
        manifest = make_shards(shards, classes=2, train_per_class=4, val_per_class=2, size=72, shard_size=4)
        config = WithBrightness(crop=67, input_scale=1.0, pca_lighting=False)
        batch = next(iter(train_batches(shards, manifest, config.augmentation(), batch_size=8, seed=0, epoch=0)))
        drawn = batch.draws["brightness"]
        assert drawn.shape == (8, 1) and drawn.abs().max() <= 20.0 and drawn.std() > 0  # drawn per sample
        assert "brightness" in config.switches()  # recorded with the other switches
        normalization = normalization_from_stats(make_stats(shards, tmp_path / "stats"), 1.0)
        preprocess = make_preprocess(normalization, config, torch.device("cpu"), channels_last=False)
        without = dict(batch.draws, brightness=torch.zeros_like(drawn))
        plain = preprocess(dataclasses.replace(batch, draws=without), train=True)
        brighter = preprocess(batch, train=True)
        torch.testing.assert_close(brighter - plain, drawn[:, :, None, None].expand_as(plain), rtol=0, atol=1e-4)
    finally:
        augmentations.PER_SAMPLE.remove(brightness)
