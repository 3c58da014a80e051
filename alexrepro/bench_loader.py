"""`alexrepro bench loader`: training-loader img/s per worker beside plain decoding of the same 256×256 shard JPEGs.

Baselines, on one core each: Pillow decode only, torchvision decode only, and decode + crop + flip + to-tensor
(what any loader must do per image). Then the real training loader (alexrepro.loader: tar streaming, shuffle buffer,
per-rank/worker selection, decode, crop, flip, batching) with 0 workers (in-process), 1 worker and `workers`
workers. Loader rates are steady-state: timed from the first batch to the last, so worker start-up is left out.
Also measured: loading the member index that prepare persisted, paid once per run.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from alexrepro.bench_report import BenchReport, machine_description
from alexrepro.loader import Augmentation, ShardIndex, decode_pil, decode_torchvision, train_loader
from alexrepro.shards import ClassInfo, Manifest, Sample, SplitInfo, write_manifest, write_shard


def bench_loader(
    images: int = 1000,
    workers: int = 2,
    crop: int = 227,
    size: int = 256,
    batch_size: int = 128,
    decoder: str = "torchvision",
    shards: Path | None = None,
    seed: int = 0,
    rounds: int = 2,
) -> BenchReport:
    """Measure the loader on `images` synthetic photo-like shard JPEGs (or on the train split of `shards`)."""
    with tempfile.TemporaryDirectory(prefix="alexrepro-bench-loader-") as tmp:
        folder = Path(shards) if shards else Path(tmp)
        manifest = write_bench_shards(folder, images, size, seed) if shards is None else _read(folder)
        jpegs = _jpegs(folder, manifest, images)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        measures = [
            lambda: _per_image("Pillow decode only (1 core)", jpegs, decode_pil),
            lambda: _per_image("torchvision decode only (1 core)", jpegs, decode_torchvision),
            lambda: _per_image("decode + crop + flip + to-tensor (1 core)", jpegs, _crop_flip(crop)),
            lambda: _index_cost(folder, manifest),
        ] + [
            lambda n=n: _loader_row(folder, manifest, crop, batch_size, n, decoder, seed)
            for n in sorted({0, 1, workers})
        ]
        rows = [_best_of(measure, rounds) for measure in measures]
        torch.set_num_threads(threads)
    rate = {row["name"]: row["img_s"] for row in rows}
    per_cpu = {row["name"]: row["img_per_cpu_s"] for row in rows}
    loader_one = per_cpu[_loader_name(1)]
    ratios = {
        "loader, 1 worker / Pillow decode, per CPU-second": loader_one / per_cpu["Pillow decode only (1 core)"],
        "loader, 1 worker / torchvision decode, per CPU-second": loader_one
        / per_cpu["torchvision decode only (1 core)"],
        "loader, 1 worker / decode + crop + flip, per CPU-second": loader_one
        / per_cpu["decode + crop + flip + to-tensor (1 core)"],
    }
    if workers > 1:
        ratios[f"loader, {workers} workers / ({workers} × 1 worker), wall clock"] = rate[_loader_name(workers)] / (
            workers * rate[_loader_name(1)]
        )
    notes = [
        machine_description(),
        f"{len(jpegs)} images of {size}×{size}, crop {crop}, batch {batch_size}, decoder {decoder}",
        f"torch {torch.__version__}; each worker uses one thread",
        (
            "img_s: wall clock (loaders: from the first batch on, so worker start-up is left out); img_per_cpu_s: images "
            "per CPU-second of this process and its finished workers (robust to other load on the machine)"
        ),
        "workers share the machine's cores with the training process and anything else running",
        f"each figure is the best of {rounds} rounds (the machine may be shared)",
    ]
    return BenchReport("loader: img/s vs plain decode", rows, ratios, notes)


def write_bench_shards(folder: Path, images: int, size: int, seed: int) -> Manifest:
    """`images` photo-like size×size JPEGs (q90, as `prepare` writes them) in one train shard and a manifest."""
    from alexrepro.bench_data import photo_like_jpeg

    rng = np.random.default_rng(seed)
    samples = [Sample(f"bench_{i:06d}", photo_like_jpeg(rng, size, size, quality=90), i % 10) for i in range(images)]
    info = write_shard(folder / "train-000000.tar", samples)
    manifest = Manifest(
        settings={"size": size},
        classes=tuple(ClassInfo(i, f"n{i:08d}", None, f"class {i}") for i in range(10)),
        splits={"train": SplitInfo(images, (info,)), "val": SplitInfo(0, ())},
    )
    return write_manifest(folder, manifest)


def _read(folder: Path) -> Manifest:
    from alexrepro.shards import read_manifest

    return read_manifest(folder)


def _jpegs(folder: Path, manifest: Manifest, limit: int) -> list[bytes]:
    from alexrepro.shards import iter_split

    out = []
    for sample in iter_split(folder, "train", manifest):
        out.append(sample.jpeg)
        if len(out) >= limit:
            break
    return out


def _best_of(measure: Callable[[], dict], rounds: int) -> dict:
    """The best of `rounds` runs, figure by figure (each is a lower bound of what the machine can do)."""
    runs = [measure() for _ in range(max(rounds, 1))]
    best = dict(runs[0])
    for key in ("img_s", "img_per_cpu_s", "img_s_per_worker"):
        best[key] = max(run[key] for run in runs)
    return best


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (the DataLoader workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _per_image(name: str, jpegs: list[bytes], work: Callable[[bytes], object]) -> dict:
    work(jpegs[0])  # warm-up: library loading, first allocation
    start, cpu = time.perf_counter(), time.process_time()
    for data in jpegs:
        work(data)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(jpegs)
    return {"name": name, "img_s": n / seconds, "img_per_cpu_s": n / cpu, "workers": 1, "img_s_per_worker": n / seconds}


def _crop_flip(crop: int) -> Callable[[bytes], torch.Tensor]:
    rng = random.Random(0)

    def work(data: bytes) -> torch.Tensor:
        image = decode_pil(data)
        y, x = rng.randrange(image.shape[1] - crop + 1), rng.randrange(image.shape[2] - crop + 1)
        view = image[:, y : y + crop, x : x + crop]
        return (view.flip(-1) if rng.random() < 0.5 else view).contiguous()

    return work


def _index_cost(folder: Path, manifest: Manifest) -> dict:
    """Loading the index prepare persisted, once per run (ShardIndex): what the sample-level rank/worker split costs."""
    start, cpu = time.perf_counter(), time.process_time()
    count = len(ShardIndex.load(folder, manifest, "train"))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"name": "shard index: load, once per run (1 core)", "img_s": count / seconds,
            "img_per_cpu_s": count / cpu, "workers": 1, "img_s_per_worker": count / seconds}  # fmt: skip


def _loader_name(workers: int) -> str:
    return f"training loader, {workers} worker{'s' if workers != 1 else ''}" + (" (in-process)" if workers == 0 else "")


def _loader_row(folder, manifest, crop, batch_size, workers, decoder, seed) -> dict:
    loader = train_loader(
        folder, manifest, Augmentation(crop), batch_size, seed, 0, workers, shuffle_buffer=2000, decoder=decoder
    )
    first = None
    count = total = 0
    cpu = _cpu_seconds()
    for batch in loader:
        total += batch.images.shape[0]
        if first is None:
            first = time.perf_counter()  # steady state: from the first batch on
            continue
        count += batch.images.shape[0]
    seconds = time.perf_counter() - first if first is not None else float("nan")
    del loader  # the workers have exited once the epoch ends; their CPU time is now counted
    cpu = _cpu_seconds() - cpu
    rate = count / seconds if count else float("nan")
    return {"name": _loader_name(workers), "img_s": rate, "img_per_cpu_s": total / cpu, "workers": workers,
            "img_s_per_worker": rate / max(workers, 1)}  # fmt: skip
