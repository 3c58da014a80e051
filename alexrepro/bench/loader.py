"""`alexrepro bench loader`: training-loader img/s per worker beside plain decoding of the same 256×256 shard JPEGs.

Baselines, on one core each: Pillow decode only, a plain `torchvision.io.decode_jpeg` of each file, and decode +
crop + flip + to-tensor (what any loader must do per image). Then the real training loader (alexrepro.data.loader: read by
offset, shuffle buffer, per-rank/worker selection, decode, crop, batching into shared memory) with 0 workers
(in-process), 1 worker and `workers` workers; for each, images per CPU-second of the whole (workers + the training
process that receives the batches) and of the worker side alone. Loader figures are steady state: img/s is timed
from the first batch to the last, and each per-CPU-second figure is N / (CPU(epoch of 2N) − CPU(epoch of N)), so that
what a worker pays once per epoch (the fork, its start, reading the index) cancels; that start-up is its own column,
CPU-seconds per worker per epoch (at ILSVRC scale an epoch is 1.28 M images, at which it vanishes). Then the feed to
`device` (alexrepro.data.feed: pinned copies, uint8 crops on the device) with `workers` workers, for each `decode_on`:
"device" times workers that only read plus a batched decode_jpeg on `device` (on the CPU: in the training process,
one thread). Also measured: loading the member index that prepare persisted, paid once per run, and each peer
library's reader that imports (alexrepro.bench.peers) over the same images in its own format, steady state as for
the training loader.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from alexrepro.bench.epochs import crop_flip, timed_epoch
from alexrepro.bench.peers import READERS, ReaderPeer, installed, missing_note
from alexrepro.bench.report import BenchReport, machine_description
from alexrepro.core.progress import units
from alexrepro.data.config import StatsConfig
from alexrepro.data.loader import (
    Augmentation,
    EpochSpec,
    LoaderSettings,
    ShardIndex,
    decode_pil,
    split_index,
    train_loader,
)
from alexrepro.data.shards.manifest import ClassInfo, Manifest, Sample
from alexrepro.data.shards.writer import in_shards, write_prepared_folder
from alexrepro.train.config import TrainConfig


def bench_loader(
    images: int = 1000,
    workers: int = 2,
    crop: int = 227,
    size: int = 256,
    batch_size: int = 128,
    decoder: str = "torchvision",
    seed: int = 0,
    rounds: int = 3,
    device: str = "cpu",
) -> BenchReport:
    """Measure the loader on `images` synthetic photo-like shard JPEGs (loaders also on twice as many)."""
    with tempfile.TemporaryDirectory(prefix="alexrepro-bench-loader-") as tmp:
        folder, doubled = Path(tmp) / "once", Path(tmp) / "twice"
        manifest = write_bench_shards(folder, images, size, seed)
        epochs = _Epochs(folder, manifest, doubled, write_bench_shards(doubled, 2 * images, size, seed), images)
        jpegs = _jpegs(folder, manifest, images)
        readers = [peer for peer in READERS if installed(peer)]
        stored = {peer.name: _Stored.of(peer, epochs, Path(tmp) / "peers") for peer in readers}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        measures = (
            [
                lambda: _per_image("Pillow decode only (1 core)", jpegs, decode_pil),
                lambda: _per_image("torchvision decode only (1 core)", jpegs, _plain_decode_jpeg()),
                lambda: _per_image("decode + crop + flip + to-tensor (1 core)", jpegs, crop_flip(crop)),
                lambda: _index_cost(folder, manifest),
            ]
            + [lambda n=n: _loader_row(epochs, crop, batch_size, n, decoder, seed) for n in sorted({0, 1, workers})]
            + [
                lambda peer=peer, n=n: _peer_row(peer, stored[peer.name], crop, batch_size, n, seed)
                for peer in readers
                for n in sorted({1, workers})
            ]
            + [
                lambda on=on: _feed_row(folder, manifest, crop, batch_size, workers, decoder, seed, on, device)
                for on in ("workers", "device")
            ]
        )
        # Round-robin, so that a spell of load on a shared machine lands on every measure alike, not on one.
        runs = [[measure() for measure in measures] for _ in range(max(rounds, 1))]
        rows = [_best_of([run[i] for run in runs]) for i in range(len(measures))]
        torch.set_num_threads(threads)
    rate = {row["name"]: row["img_s"] for row in rows}
    per_cpu = {row["name"]: row["img_per_cpu_s"] for row in rows}
    loader_one = per_cpu[_loader_name(1)]
    worker_side_one = next(row for row in rows if row["name"] == _loader_name(1))["img_per_worker_cpu_s"]
    side = "worker side (read + decode + crop, uint8 out), 1 worker, steady state / torchvision decode, per CPU-second"
    ratios = {
        side: worker_side_one / per_cpu["torchvision decode only (1 core)"],
        "loader, 1 worker / Pillow decode, per CPU-second": loader_one / per_cpu["Pillow decode only (1 core)"],
        "loader, 1 worker / torchvision decode, per CPU-second": loader_one
        / per_cpu["torchvision decode only (1 core)"],
        "loader, 1 worker / decode + crop + flip, per CPU-second": loader_one
        / per_cpu["decode + crop + flip + to-tensor (1 core)"],
    }
    for peer in readers:  # wall clock (what a run gets) and per CPU-second (robust to other load)
        for n in sorted({1, workers}):
            mine, theirs = _loader_name(n), _peer_name(peer, n)
            ratios[f"training loader / {theirs}, wall clock"] = rate[mine] / rate[theirs]
            ratios[f"training loader / {theirs}, per CPU-second"] = per_cpu[mine] / per_cpu[theirs]
    if workers > 1:
        scaling = rate[_loader_name(workers)] / rate[_loader_name(1)]
        ratios[f"loader, {workers} workers / 1 worker, wall clock"] = scaling
        ratios[f"loader, {workers} workers / ({workers} × 1 worker), wall clock"] = rate[_loader_name(workers)] / (
            workers * rate[_loader_name(1)]
        )
    notes = [
        machine_description(),
        f"{len(jpegs)} images of {size}×{size}, crop {crop}, batch {batch_size}, decoder {decoder}",
        f"torch {torch.__version__}; each worker uses one thread",
        (
            "img_s: wall clock (loaders: from the first batch on, so worker start-up is left out); img_per_cpu_s: "
            "images per CPU-second of this process and its finished workers (robust to other load on the machine); "
            "img_per_worker_cpu_s: per CPU-second of the workers alone (the worker side)"
        ),
        (
            f"training loaders, steady state: per-CPU-second figures are {len(jpegs)} / (CPU(epoch of "
            f"{2 * len(jpegs)}) − CPU(epoch of {len(jpegs)})), the per-epoch start-up cancelled; worker_start_cpu_s: "
            "that start-up, CPU-seconds per worker (the training process's own in-process)"
        ),
        f"feed: uint8 crops on {device} through alexrepro.data.feed, decoded in the workers or on {device}",
        (
            "peers: each library's reader over the same images in its own format (alexrepro.bench.peers), with the "
            "same torchvision decoder, random crop, flip and uint8 batches; steady state as for the training loader"
        ),
        *filter(None, [missing_note(READERS)]),
        "workers share the machine's cores with the training process and anything else running",
        f"each figure is the best of {rounds} rounds (the machine may be shared)",
    ]
    return BenchReport("loader: img/s vs plain decode", rows, ratios, notes)


# Distinct pictures drawn for a benchmark's shards, then cycled: drawing one costs ~10 ms on one thread (4000 took
# over a minute, longer than a GPU check's step), and decoding a repeated JPEG costs what decoding a new one does.
DISTINCT_PICTURES = 256


# Shards per bench epoch: webdataset's pipeline gives each worker whole shards, so it needs a few per worker.
BENCH_SHARDS = 8


def write_bench_shards(folder: Path, images: int, size: int, seed: int) -> Manifest:
    """`images` photo-like size×size JPEGs (q90, as `prepare` writes them; DISTINCT_PICTURES of them cycled) in
    BENCH_SHARDS train shards and a manifest."""
    from alexrepro.bench.data import photo_like_jpeg

    rng = np.random.default_rng(seed)
    bank = [photo_like_jpeg(rng, size, size, quality=90) for _ in range(min(images, DISTINCT_PICTURES))]
    samples = [Sample(f"bench_{i:06d}", bank[i % len(bank)], i % 10) for i in range(images)]
    classes = [ClassInfo(i, f"n{i:08d}", None, f"class {i}") for i in range(10)]
    per_shard = -(-images // BENCH_SHARDS)
    return write_prepared_folder(folder, classes, {"train": in_shards(samples, per_shard), "val": []}, {"size": size})


def _jpegs(folder: Path, manifest: Manifest, limit: int) -> list[bytes]:
    from alexrepro.data.shards.index import iter_split

    out = []
    for sample in iter_split(folder, "train", manifest):
        out.append(sample.jpeg)
        if len(out) >= limit:
            break
    return out


def _best_of(runs: list[dict]) -> dict:
    """The best of several runs of one measure, figure by figure (each is a lower bound of what the machine can do)."""
    best = dict(runs[0])
    for key, best_of in (("img_s", max), ("img_per_cpu_s", max), ("img_s_per_worker", max),
                         ("img_per_worker_cpu_s", max), ("worker_start_cpu_s", min)):  # fmt: skip
        measured = [run[key] for run in runs if key in run and not math.isnan(run[key])]
        if key in best:
            best[key] = best_of(measured) if measured else math.nan
    return best


def _plain_decode_jpeg() -> Callable[[bytes], torch.Tensor]:
    """The baseline: torchvision.io.decode_jpeg as its documentation shows it, bytes → tensor → RGB image."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates the function (for TorchCodec) and warns on every call; filtered once, outside
    # the timed loop, so the baseline times the decoding.
    warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
    return lambda data: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _per_image(name: str, jpegs: list[bytes], work: Callable[[bytes], object]) -> dict:
    work(jpegs[0])  # warm-up: library loading, first allocation
    start, cpu = time.perf_counter(), time.process_time()
    for data in jpegs:
        work(data)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(jpegs)
    return {"name": name, "img_s": n / seconds, "img_per_cpu_s": n / cpu, "workers": 1, "img_s_per_worker": n / seconds}


def _index_cost(folder: Path, manifest: Manifest) -> dict:
    """Loading the index prepare persisted, once per run (ShardIndex): what the sample-level rank/worker split costs."""
    start, cpu = time.perf_counter(), time.process_time()
    count = len(ShardIndex.load(folder, manifest, "train"))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"name": "shard index: load, once per run (1 core)", "img_s": count / seconds,
            "img_per_cpu_s": count / cpu, "workers": 1, "img_s_per_worker": count / seconds}  # fmt: skip


def _workers(n: int) -> str:
    return f"{n} {units(n, 'worker')}"


def _loader_name(workers: int) -> str:
    return f"training loader, {_workers(workers)}" + (" (in-process)" if workers == 0 else "")


@dataclass(frozen=True)
class _Epochs:
    """The bench shards twice over: `images` images, and twice as many (the same ones first), for the steady state."""

    once: Path
    once_manifest: Manifest
    twice: Path
    twice_manifest: Manifest
    images: int


def _loader_row(epochs: _Epochs, crop: int, batch_size: int, workers: int, decoder: str, seed: int) -> dict:
    """One epoch of N and one of 2N through the training loader; the difference is the steady state."""
    whole_n = _loader_epoch(epochs.once, epochs.once_manifest, crop, batch_size, workers, decoder, seed)
    whole_2n = _loader_epoch(epochs.twice, epochs.twice_manifest, crop, batch_size, workers, decoder, seed)
    n = epochs.images
    side_n, side_2n = (whole["workers_cpu"] if workers else whole["main_cpu"] for whole in (whole_n, whole_2n))
    total_n, total_2n = (whole["main_cpu"] + whole["workers_cpu"] for whole in (whole_n, whole_2n))
    worker_rate = _rate(n, side_2n - side_n)
    rate = whole_2n["img_s"]
    return {"name": _loader_name(workers), "img_s": rate, "img_per_cpu_s": _rate(n, total_2n - total_n),
            "workers": workers, "img_s_per_worker": rate / max(workers, 1), "img_per_worker_cpu_s": worker_rate,
            "worker_start_cpu_s": (side_n - n / worker_rate) / max(workers, 1)}  # fmt: skip


def _rate(images: int, seconds: float) -> float:
    """images / seconds; nan where a difference of two runs is not positive (runs too short to time)."""
    return images / seconds if seconds > 0 else math.nan


def _loader_epoch(folder, manifest, crop, batch_size, workers, decoder, seed) -> dict:
    """One epoch of the training loader: wall img/s from the first batch on, CPU of this process and of the workers."""
    settings = LoaderSettings(batch_size, workers, decoder=decoder)
    index = split_index(folder, manifest, "train")
    return timed_epoch(
        train_loader(index, Augmentation(crop), EpochSpec(seed, 0, shuffle_buffer=2000), settings), _released
    )


def _released(batch) -> int:
    batch.release()  # as the training loop does once the batch is preprocessed: the worker reuses the buffer
    return len(batch)


@dataclass(frozen=True)
class _Stored:
    """A peer's copy of the bench epochs, in its own format: N images, and 2N (the same ones first)."""

    once: Path
    twice: Path
    images: int

    @classmethod
    def of(cls, peer: ReaderPeer, epochs: _Epochs, folder: Path) -> _Stored:
        once = peer.store(epochs.once, epochs.once_manifest, folder / f"{peer.module}-once")
        twice = peer.store(epochs.twice, epochs.twice_manifest, folder / f"{peer.module}-twice")
        return cls(once, twice, epochs.images)


def _peer_name(peer: ReaderPeer, workers: int) -> str:
    return f"{peer.name} pipeline, {_workers(workers)}"


def _peer_row(peer: ReaderPeer, stored: _Stored, crop: int, batch_size: int, workers: int, seed: int) -> dict:
    """A peer's reader over its copy of the bench images, an epoch of N and one of 2N: its steady state, as the
    training loader's row measures it."""
    whole_n = peer.epoch(stored.once, crop, batch_size, workers, seed)
    whole_2n = peer.epoch(stored.twice, crop, batch_size, workers, seed)
    n = stored.images
    if (whole_n["images"], whole_2n["images"]) != (n, 2 * n):
        raise RuntimeError(f"{peer.name} read {whole_n['images']} and {whole_2n['images']} images, not {n} and {2 * n}")
    total_n, total_2n = (whole["main_cpu"] + whole["workers_cpu"] for whole in (whole_n, whole_2n))
    rate = whole_2n["img_s"]
    return {"name": _peer_name(peer, workers), "img_s": rate, "img_per_cpu_s": _rate(n, total_2n - total_n),
            "workers": workers, "img_s_per_worker": rate / max(workers, 1)}  # fmt: skip


def _feed_row(folder, manifest, crop, batch_size, workers, decoder, seed, decode_on, device) -> dict:
    """The loader's uint8 crops brought onto `device` through alexrepro.data.feed (decoded there with decode_on=device)."""
    from alexrepro.data.feed import DeviceFeed, device_crops

    device = torch.device(device)
    cuda = device.type == "cuda"
    settings = LoaderSettings(batch_size, workers, pin_memory=cuda, decoder=decoder, decode_on=decode_on)

    def crops(batch):
        return device_crops(batch, device) if batch.images is None else batch.images.to(device, non_blocking=True)

    def on_device(batch) -> int:
        if cuda:
            torch.cuda.current_stream(device).synchronize()  # the batch is on the device, decoded
        return len(batch)

    # built inline, so that timed_epoch holds the only reference and the workers are gone when it reads their CPU
    epoch = timed_epoch(
        DeviceFeed(
            train_loader(
                split_index(folder, manifest, "train"),
                Augmentation(crop),
                EpochSpec(seed, 0, shuffle_buffer=2000),
                settings,
            ),  # fmt: skip
            crops,
            device,
        ),
        on_device,
    )
    rate = epoch["img_s"]
    return {"name": f"feed to {device}, decode on {decode_on}, {_workers(workers)}", "img_s": rate,
            "img_per_cpu_s": epoch["images"] / (epoch["main_cpu"] + epoch["workers_cpu"]), "workers": workers,
            "img_s_per_worker": rate / max(workers, 1)}  # fmt: skip


def bench_training(
    folder: Path,
    images: int = 51_200,
    workers: int = 8,
    decode_on: Literal["workers", "device"] = "workers",
    device: str = "cuda",
    batch_size: int = 128,
    width: float = 1.0,
    crop: int = 227,
    size: int = 256,
    distinct: int = 512,
    classes: int = 1000,
    precision: Literal["fp32", "bf16"] = "bf16",
    epochs: int = 2,
) -> dict:
    """End to end: `epochs` epochs of `alexrepro train` (the paper's network at `width`, `crop`, in `precision`) on
    a prepared sample of `images` photo-like JPEGs in `folder` (written once, reused: `distinct` images cycled,
    which costs the decoder the same), with its stats. Returns the last epoch's training img/s and the fraction of
    that time the training loop waited for data, as the trainer measures them (validation excluded): the first
    epoch pays the one-time costs (cuDNN's autotuning, torch.compile, the first batches), the last is steady state."""
    from alexrepro.core.progress import NullProgress
    from alexrepro.data.stats import compute_stats
    from alexrepro.train.loop import train

    shards, stats = folder / "shards", folder / "stats"
    if not (shards / "manifest.json").exists():
        write_sample_shards(shards, images, size, distinct, classes)
        compute_stats(shards, stats, StatsConfig(workers=workers or None), NullProgress())
    out = folder / f"train-{decode_on}-{device.replace(':', '')}"
    shutil.rmtree(out, ignore_errors=True)  # a scratch run of this benchmark's own, from an earlier call
    config = TrainConfig(epochs=epochs, batch_size=batch_size, width=width, crop=crop, devices=device,
                         workers=workers, decode_on=decode_on, log_every=50, precision=precision,
                         lr_schedule="step", lr_milestones=())  # fmt: skip
    timing = train(shards, stats, out, config, False, NullProgress()).timings[-1]
    name = f"training {precision}, decode on {decode_on}, {workers} workers, {device}, epoch {epochs} of {epochs}"
    return {"name": name, "img_s": timing["images_per_s"], "data_wait_fraction": timing["data_wait_fraction"],
            "workers": workers}  # fmt: skip


def write_sample_shards(folder: Path, images: int, size: int, distinct: int, classes: int, per_shard: int = 1000):
    """A prepared sample for `bench_training`: train `images` (and val a tenth of it) size×size JPEGs, cycling
    `distinct` photo-like ones, in shards of `per_shard`, with a manifest."""
    from alexrepro.bench.data import photo_like_jpeg

    rng = np.random.default_rng(0)
    pool = [photo_like_jpeg(rng, size, size, quality=90) for _ in range(min(distinct, images))]
    splits = {
        split: [Sample(f"{split}_{i:07d}", pool[i % len(pool)], i % classes) for i in range(count)]
        for split, count in (("train", images), ("val", max(1, images // 10)))
    }
    names = [ClassInfo(i, f"n{i:08d}", None, f"class {i}") for i in range(classes)]
    shards = {split: in_shards(samples, per_shard) for split, samples in splits.items()}
    return write_prepared_folder(folder, names, shards, {"size": size})
