"""The loader: every sample exactly once per epoch across ranks and workers, seeded order, uint8 crops + offsets."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import numpy as np
import pytest
import torch

from alexrepro.data.loader import Augmentation, EpochPlan, decode_torchvision
from alexrepro.data.shards.index import iter_split
from alexrepro.train.config import TrainConfig
from helpers.train import make_shards, train_batches, val_batches

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
        assert all(a[1] == b[0] for a, b in pairwise(shares))
    assert plan[0].steps == 4 and plan[0].global_batch(3) == (24, 27)


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_train_epoch_covers_every_sample_once(shards, world, workers):
    out, manifest = shards
    all_keys = {s.key for s in iter_split(out, "train", manifest)}
    per_rank = [
        keys_by_step(train_batches(out, manifest, AUG, 8, seed=1, epoch=0, workers=workers, rank=r, world_size=world))
        for r in range(world)
    ]
    seen = Counter(k for steps in per_rank for _, keys in steps for k in keys)
    assert set(seen) == all_keys and max(seen.values()) == 1
    for steps in per_rank:
        assert [step for step, _ in steps] == list(range(4))  # ceil(27 / 8) steps, in order, on every rank


@pytest.mark.parametrize("world", [1, 2])
def test_drop_last_leaves_out_only_the_partial_batch(shards, world):
    """drop_last: 3 full batches of 8 of the 27 images, the same images at the same steps as without it; the 3
    left out are the epoch's last, different each epoch. Validation still sees every image."""
    out, manifest = shards
    assert EpochPlan(27, 8, drop_last=True).steps == 3 and EpochPlan(5, 8, drop_last=True).steps == 1
    kept = [
        keys_by_step(train_batches(out, manifest, AUG, 8, seed=1, epoch=0, workers=2, rank=r, world_size=world,
                                   drop_last=True))
        for r in range(world)
    ]  # fmt: skip
    every = keys_by_step(train_batches(out, manifest, AUG, 8, seed=1, epoch=0, workers=0))
    merged = [(step, [k for rank in kept for s, keys in rank if s == step for k in keys]) for step in range(3)]
    assert merged == [(step, list(keys)) for step, keys in every[:3]]
    assert sum(len(keys) for rank in kept for _, keys in rank) == 24
    all_keys = {s.key for s in iter_split(out, "train", manifest)}
    left_out = [
        all_keys - {k for batch in train_batches(out, manifest, AUG, 8, 1, epoch, drop_last=True) for k in batch.keys}
        for epoch in (0, 1)
    ]
    assert left_out[0] == set(every[3][1]) and len(left_out[1]) == 3 and left_out[0] != left_out[1]
    val = list(val_batches(out, manifest, 64, 8, drop_last=True))
    assert sum(len(batch) for batch in val) == 9


def test_split_does_not_change_the_global_batches(shards):
    """The ranks' shares at step k together are the single process's batch k, with the same crops."""
    out, manifest = shards
    single = list(train_batches(out, manifest, AUG, 8, seed=1, epoch=0, workers=0))
    ranks = [
        list(train_batches(out, manifest, AUG, 8, seed=1, epoch=0, workers=2, rank=r, world_size=2)) for r in range(2)
    ]
    for k, batch in enumerate(single):
        assert batch.keys == ranks[0][k].keys + ranks[1][k].keys
        assert torch.equal(batch.images, torch.cat([ranks[0][k].images, ranks[1][k].images]))
        assert torch.equal(batch.alphas, torch.cat([ranks[0][k].alphas, ranks[1][k].alphas]))
        assert batch.global_size == ranks[0][k].global_size == len(batch.keys)


def test_order_is_seeded_per_epoch(shards):
    out, manifest = shards

    def order(seed, epoch):
        return [k for b in train_batches(out, manifest, AUG, 8, seed, epoch, 0) for k in b.keys]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_resume_mid_epoch_sees_the_rest_of_the_epoch(shards):
    out, manifest = shards
    full = list(train_batches(out, manifest, AUG, 8, seed=1, epoch=3, workers=0))
    rest = list(train_batches(out, manifest, AUG, 8, seed=1, epoch=3, workers=2, start_step=2))
    assert [b.step for b in rest] == [2, 3]
    assert all(torch.equal(a.images, b.images) and a.keys == b.keys for a, b in zip(full[2:], rest, strict=True))


def test_batches_are_uint8_crops_with_their_offsets(shards):
    out, manifest = shards
    batch = next(iter(train_batches(out, manifest, AUG, 8, seed=1, epoch=0, workers=0)))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 3, 64, 64)
    assert batch.offsets.shape == (8, 2) and int(batch.offsets.min()) >= 0 and int(batch.offsets.max()) <= 8
    assert batch.flipped.dtype == torch.bool and batch.alphas.shape == (8, 3)
    assert batch.labels.dtype == torch.int64


def test_crops_match_the_full_image(shards):
    out, manifest = shards
    full = {s.key: decode_torchvision(s.jpeg) for s in iter_split(out, "train", manifest)}
    batch = next(iter(train_batches(out, manifest, AUG, 27, seed=5, epoch=0, workers=0)))
    assert 0 < int(batch.flipped.sum()) < 27
    for i, key in enumerate(batch.keys):
        y, x = batch.offsets[i].tolist()
        window = full[key][:, y : y + 64, x : x + 64]
        assert torch.equal(batch.images[i], window)  # the device mirrors the flagged ones


def test_val_is_every_sample_once_in_order(shards):
    out, manifest = shards
    stored = [s.key for s in iter_split(out, "val", manifest)]
    assert [k for b in val_batches(out, manifest, 64, 4, workers=2) for k in b.keys] == stored
    two = [[k for b in val_batches(out, manifest, 64, 4, 0, rank=r, world_size=2) for k in b.keys] for r in range(2)]
    assert sorted(two[0] + two[1]) == sorted(stored) and not set(two[0]) & set(two[1])


def test_shard_that_disagrees_with_the_manifest_is_refused(shards, tmp_path):
    import dataclasses

    from alexrepro.core.errors import FormatError
    from alexrepro.data.loader import split_index

    out, manifest = shards
    train = manifest.split("train")
    wrong = dataclasses.replace(train.shards[0], count=train.shards[0].count + 1)
    bad = dataclasses.replace(
        manifest, splits={**manifest.splits, "train": dataclasses.replace(train, shards=(wrong, *train.shards[1:]))}
    )
    with pytest.raises(FormatError, match="rerun `alexrepro prepare`"):
        split_index(out, bad, "train")


# ------------------------------------------------------------------ decode_on="device" and the device feed (CPU)


def test_jpeg_size_reads_the_frame_header(shards):
    from alexrepro.core.errors import FormatError
    from alexrepro.data.loader import jpeg_size

    out, manifest = shards
    for sample in list(iter_split(out, "train", manifest))[:3]:
        assert jpeg_size(sample.jpeg) == tuple(decode_torchvision(sample.jpeg).shape[1:])
    with pytest.raises(FormatError, match="rerun `alexrepro prepare`"):
        jpeg_size(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 20)


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decoding_gives_the_workers_crops(shards, workers):
    """Workers that only read, then one batched decode_jpeg (here on the CPU): the same crops, bit for bit, and the
    same draws, labels and keys as workers that decode — on CPU both are the same libjpeg-turbo."""
    from alexrepro.data.feed import device_crops

    out, manifest = shards
    cpu = torch.device("cpu")
    decoded = list(train_batches(out, manifest, AUG, 8, seed=1, epoch=2, workers=0))
    read = list(train_batches(out, manifest, AUG, 8, seed=1, epoch=2, workers=workers, decode_on="device"))
    assert [b.step for b in read] == [b.step for b in decoded] == list(range(4))
    for a, b in zip(decoded, read, strict=True):
        assert b.images is None and b.jpegs.dtype == torch.uint8 and int(b.jpeg_sizes.sum()) == b.jpegs.numel()
        assert a.keys == b.keys and a.global_size == b.global_size
        for name in ("labels", "offsets", "flipped", "alphas"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(device_crops(b, cpu), a.images)


def test_device_decoding_of_uncropped_and_centre_cropped_val(shards):
    from alexrepro.data.feed import device_crops

    out, manifest = shards
    for crop in (None, 64):
        decoded = list(val_batches(out, manifest, crop, 5, workers=0))
        read = list(val_batches(out, manifest, crop, 5, workers=0, decode_on="device"))
        assert [b.keys for b in read] == [b.keys for b in decoded]
        assert all(
            torch.equal(device_crops(b, torch.device("cpu")), a.images) for a, b in zip(decoded, read, strict=True)
        )


def test_feed_prepares_each_batch_once_and_in_order(shards):
    """DeviceFeed on the CPU: the loader's batches in order, each with `prepare`'s output and its labels attached,
    batch k prepared before it is handed over and batch k+1 at most (it is prepared on the feed's own thread while
    the model works on batch k)."""
    from alexrepro.data.feed import DeviceFeed

    out, manifest = shards
    prepared: list[int] = []

    def prepare(batch):
        prepared.append(batch.step)
        return batch.images.float() + batch.step

    expected = [b.images.float() + b.step for b in train_batches(out, manifest, AUG, 8, seed=1, epoch=0, workers=0)]
    fed = []
    for batch in DeviceFeed(train_batches(out, manifest, AUG, 8, seed=1, epoch=0, workers=2), prepare, "cpu"):
        fed.append(batch.step)
        assert prepared[-1] in (batch.step, min(batch.step + 1, 3))  # this batch is prepared, at most one more
        assert torch.equal(batch.inputs, expected[batch.step]) and torch.equal(batch.targets, batch.labels)
        assert batch.images is None and batch.slot is None  # released: the worker refills that buffer
    assert fed == prepared == [0, 1, 2, 3]


def test_released_buffers_are_reused_and_unreleased_ones_are_not_overwritten(shards):
    """A worker refills a shared buffer only once the training process released it: batches kept without release
    keep their pixels (the test compares them after the epoch); released ones are recycled."""
    out, manifest = shards
    reference = [b.images.clone() for b in train_batches(out, manifest, AUG, 4, seed=1, epoch=0, workers=0)]
    kept = list(train_batches(out, manifest, AUG, 4, seed=1, epoch=0, workers=1))  # 7 batches > the pool's 7 - 1
    assert all(torch.equal(b.images, r) for b, r in zip(kept, reference, strict=True)) and len(kept) == len(reference)
    storages = set()
    for batch in train_batches(out, manifest, AUG, 4, seed=1, epoch=0, workers=1):
        assert torch.equal(batch.images, reference[batch.step])
        storages.add(batch.images.untyped_storage().data_ptr())
        batch.release()
    assert len(storages) < len(reference)  # buffers came back round


def test_training_with_device_decoding_matches_worker_decoding(tmp_path):
    """On the CPU, decode_on: device trains to the very same weights as decode_on: workers: it is a setting of
    speed, not of what is computed."""
    from alexrepro.core.progress import NullProgress
    from alexrepro.model.checkpoint import load_checkpoint
    from alexrepro.train.loop import train
    from helpers.train import make_stats

    make_shards(tmp_path / "shards", classes=3, train_per_class=6, val_per_class=2, size=72, shard_size=10)
    make_stats(tmp_path / "shards", tmp_path / "stats")
    tiny = dict(epochs=1, batch_size=8, crop=67, width=0.125, init="he", input_scale=1 / 64, devices="cpu", log_every=2)
    runs = {}
    for decode_on in ("workers", "device"):
        config = TrainConfig(workers=2 if decode_on == "device" else 0, decode_on=decode_on, **tiny)
        result = train(tmp_path / "shards", tmp_path / "stats", tmp_path / decode_on, config, False, NullProgress())
        runs[decode_on] = load_checkpoint(result.checkpoint_last)["model"], result.history[-1]
    (a, row_a), (b, row_b) = runs["workers"], runs["device"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert row_a["val_loss"] == row_b["val_loss"] and row_a["train_loss"] == row_b["train_loss"]


@pytest.mark.peers
def test_bench_loader_reports_the_worker_side_and_the_feed():
    from alexrepro.bench.loader import bench_loader

    report = bench_loader(images=24, workers=2, crop=56, size=64, batch_size=8, rounds=1)
    rows = {row["name"]: row for row in report.rows}
    assert list(rows)[-2:] == ["feed to cpu, decode on workers, 2 workers", "feed to cpu, decode on device, 2 workers"]
    loaders = [rows[f"training loader, {n}"] for n in ("0 workers (in-process)", "1 worker", "2 workers")]
    assert all(row["img_s"] > 0 for row in report.rows)
    # steady state: a difference of two epochs, which 24 images may be too few to time (nan), never negative
    assert all(not row[key] <= 0 for row in loaders for key in ("img_per_cpu_s", "img_per_worker_cpu_s"))
    assert all("worker_start_cpu_s" in row for row in loaders)
    side = "worker side (read + decode + crop, uint8 out), 1 worker, steady state / torchvision decode, per CPU-second"
    assert side in report.ratios and "loader, 2 workers / 1 worker, wall clock" in report.ratios
    # each installed peer's reader over the same images (each checks it read every image of both epochs)
    from alexrepro.bench.peers import READERS, installed

    for peer in filter(installed, READERS):
        assert all(rows[f"{peer.name} pipeline, {n}"]["img_s"] > 0 for n in ("1 worker", "2 workers"))
        assert report.ratios[f"training loader / {peer.name} pipeline, 2 workers, wall clock"] > 0
    assert all(peer.name in " ".join(report.notes) for peer in READERS if not installed(peer))


@pytest.mark.parametrize("decode_on", ["workers", "device"])
def test_bench_training_reports_img_s_and_data_wait(tmp_path, decode_on):
    from alexrepro.bench.loader import bench_training

    row = bench_training(tmp_path, images=24, workers=2, decode_on=decode_on, device="cpu", batch_size=8, width=0.125,
                         crop=67, size=72, distinct=6, classes=4)  # fmt: skip
    assert row["img_s"] > 0 and 0 <= row["data_wait_fraction"] <= 1
    again = bench_training(tmp_path, images=24, workers=0, decode_on=decode_on, device="cpu", batch_size=8,
                           width=0.125, crop=67, size=72, distinct=6, classes=4)  # fmt: skip
    assert again["img_s"] > 0  # the sample is reused and the scratch run replaced


def _step_by_step_sequence(index, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """The shuffle buffer one sample at a time, as it is defined (the reference for the vectorised version)."""
    import random

    from alexrepro.data.loader import epoch_seed

    rng = random.Random(epoch_seed(seed, epoch))
    starts = [*index.shard_starts().tolist(), len(index)]
    order = list(range(len(index.paths)))
    rng.shuffle(order)
    out: list[int] = []
    buffer: list[int] = []
    for shard in order:
        for sample in range(starts[shard], starts[shard + 1]):
            if len(buffer) < shuffle_buffer:
                buffer.append(sample)
                continue
            slot = rng.randrange(shuffle_buffer)
            out.append(buffer[slot])
            buffer[slot] = sample
    rng.shuffle(buffer)
    return np.asarray(out + buffer, dtype=np.int64)


@pytest.mark.parametrize(
    "counts, buffer",
    [([5, 7, 3], 4), ([100] * 30, 64), ([10], 50), ([960] * 40, 2000), ([3, 0, 4], 2), ([1000] * 20, 1000),
     ([7] * 9, 1), ([40] * 50, 33)],
)  # fmt: skip
def test_the_epoch_order_is_the_shuffle_buffer_step_by_step(counts, buffer):
    """global_sequence computes the buffer's replacements in bulk; it must equal the one-sample-at-a-time
    definition draw for draw (resume and every recorded run depend on the order)."""
    from types import SimpleNamespace

    from alexrepro.data.loader import global_sequence

    class Index:
        def __init__(self):
            self.infos = [SimpleNamespace(count=c) for c in counts]
            self.paths = [str(i) for i in range(len(counts))]

        def __len__(self):
            return sum(counts)

        def shard_starts(self):
            return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    for seed, epoch in ((0, 0), (1, 3), (7, 89)):
        expected = _step_by_step_sequence(Index(), seed, epoch, buffer)
        assert np.array_equal(global_sequence(Index(), seed, epoch, buffer), expected), (seed, epoch)
        assert sorted(expected.tolist()) == list(range(sum(counts)))
