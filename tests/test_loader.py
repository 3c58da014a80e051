"""The loader: every sample exactly once per epoch across ranks and workers, seeded order, uint8 crops + offsets."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from train_helpers import make_shards

from alexrepro.loader import Augmentation, EpochPlan, decode_torchvision, train_loader, val_loader
from alexrepro.shards import iter_split

AUG = Augmentation(crop=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = make_shards(out, classes=3, train_per_class=9, val_per_class=3, size=72, shard_size=10)
    return out, manifest


def keys_by_step(loader):
    return [(batch.step, batch.keys) for batch in loader]


def test_epoch_plan_splits_each_global_batch_evenly():
    plan = [EpochPlan(27, 8, rank, 3) for rank in range(3)]
    for step in range(plan[0].steps):
        shares = [p.rank_batch(step) for p in plan]
        assert shares[0][0] == plan[0].global_batch(step)[0] and shares[-1][1] == plan[0].global_batch(step)[1]
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert plan[0].steps == 4 and plan[0].global_batch(3) == (24, 27)


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_train_epoch_covers_every_sample_once(shards, world, workers):
    out, manifest = shards
    all_keys = {s.key for s in iter_split(out, "train", manifest)}
    per_rank = [
        keys_by_step(train_loader(out, manifest, AUG, 8, seed=1, epoch=0, workers=workers, rank=r, world_size=world))
        for r in range(world)
    ]
    seen = Counter(k for steps in per_rank for _, keys in steps for k in keys)
    assert set(seen) == all_keys and max(seen.values()) == 1
    for steps in per_rank:
        assert [step for step, _ in steps] == list(range(4))  # ceil(27 / 8) steps, in order, on every rank


def test_split_does_not_change_the_global_batches(shards):
    """The ranks' shares at step k together are the single process's batch k, with the same crops."""
    out, manifest = shards
    single = list(train_loader(out, manifest, AUG, 8, seed=1, epoch=0, workers=0))
    ranks = [list(train_loader(out, manifest, AUG, 8, seed=1, epoch=0, workers=2, rank=r, world_size=2)) for r in range(2)]
    for k, batch in enumerate(single):
        assert batch.keys == ranks[0][k].keys + ranks[1][k].keys
        assert torch.equal(batch.images, torch.cat([ranks[0][k].images, ranks[1][k].images]))
        assert torch.equal(batch.alphas, torch.cat([ranks[0][k].alphas, ranks[1][k].alphas]))
        assert batch.global_size == ranks[0][k].global_size == len(batch.keys)


def test_order_is_seeded_per_epoch(shards):
    out, manifest = shards
    order = lambda seed, epoch: [k for b in train_loader(out, manifest, AUG, 8, seed, epoch, 0) for k in b.keys]
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_resume_mid_epoch_sees_the_rest_of_the_epoch(shards):
    out, manifest = shards
    full = list(train_loader(out, manifest, AUG, 8, seed=1, epoch=3, workers=0))
    rest = list(train_loader(out, manifest, AUG, 8, seed=1, epoch=3, workers=2, start_step=2))
    assert [b.step for b in rest] == [2, 3]
    assert all(torch.equal(a.images, b.images) and a.keys == b.keys for a, b in zip(full[2:], rest))


def test_batches_are_uint8_crops_with_their_offsets(shards):
    out, manifest = shards
    batch = next(iter(train_loader(out, manifest, AUG, 8, seed=1, epoch=0, workers=0)))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 3, 64, 64)
    assert batch.offsets.shape == (8, 2) and int(batch.offsets.min()) >= 0 and int(batch.offsets.max()) <= 8
    assert batch.flipped.dtype == torch.bool and batch.alphas.shape == (8, 3)
    assert batch.labels.dtype == torch.int64


def test_crops_match_the_full_image(shards):
    out, manifest = shards
    full = {s.key: decode_torchvision(s.jpeg) for s in iter_split(out, "train", manifest)}
    batch = next(iter(train_loader(out, manifest, AUG, 27, seed=5, epoch=0, workers=0)))
    assert 0 < int(batch.flipped.sum()) < 27
    for i, key in enumerate(batch.keys):
        y, x = batch.offsets[i].tolist()
        window = full[key][:, y : y + 64, x : x + 64]
        assert torch.equal(batch.images[i], window)  # the device mirrors the flagged ones


def test_val_is_every_sample_once_in_order(shards):
    out, manifest = shards
    stored = [s.key for s in iter_split(out, "val", manifest)]
    assert [k for b in val_loader(out, manifest, 64, 4, workers=2) for k in b.keys] == stored
    two = [[k for b in val_loader(out, manifest, 64, 4, 0, rank=r, world_size=2) for k in b.keys] for r in range(2)]
    assert sorted(two[0] + two[1]) == sorted(stored) and not set(two[0]) & set(two[1])


def test_shard_that_disagrees_with_the_manifest_is_refused(shards, tmp_path):
    import dataclasses

    from alexrepro.errors import FormatError
    from alexrepro.loader import split_index

    out, manifest = shards
    train = manifest.split("train")
    wrong = dataclasses.replace(train.shards[0], count=train.shards[0].count + 1)
    bad = dataclasses.replace(manifest, splits={**manifest.splits, "train": dataclasses.replace(train, shards=(wrong, *train.shards[1:]))})
    with pytest.raises(FormatError, match="rerun `alexrepro prepare`"):
        split_index(out, bad, "train")
