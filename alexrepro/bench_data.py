"""Throughput of the data stages (`prepare`, `stats`) beside their baselines, measured on the same images in one run.

`bench_prepare` times, on the same photo-like JPEGs of ImageNet sizes:
  - plain decode: `Image.open(...).load()` at full size, one process (the floor: DESIGN.md "Performance design");
  - the obvious way: open → RGB → LANCZOS shorter side to 256 → centre crop → save q95, one process;
  - the resize step alone (`imaging.resize_square_jpeg` on bytes in memory), one process;
  - the real `prepare()` end to end (read files, resize, write shards and manifest) with 1 and with N workers.
`bench_stats` times plain decode of the 256² shard JPEGs against the real `compute_stats()`.

The machine may be shared, so every pipeline runs `rounds` times, interleaved with the others, and the fastest
round of each counts: the ratios then compare each pipeline at its least disturbed, in the same run.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from alexrepro import imaging
from alexrepro.bench_report import BenchReport, machine_description
from alexrepro.progress import NullProgress, Progress
from alexrepro.shards import ClassInfo, Manifest, Sample, SplitInfo, write_manifest, write_shard

# (width, height, share): ILSVRC-2012 images are mostly Flickr's 500-pixel "medium" size (500×375, 500×333 and
# their portrait forms), with some smaller and some well above 1000 px.
IMAGENET_SIZES = (
    (500, 375, 0.45),
    (500, 333, 0.15),
    (375, 500, 0.12),
    (333, 500, 0.08),
    (400, 300, 0.10),
    (800, 600, 0.05),
    (1280, 960, 0.05),
)
SOURCE_QUALITY = 90
_CLASSES = 4


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = SOURCE_QUALITY) -> bytes:
    """A JPEG with a photo's ingredients: smooth colour gradients, filled shapes with soft edges, stripes and noise.

    Flat synthetic images decode and compress far faster than photos; this mix gives files of about the size of
    real ILSVRC JPEGs (~100 KB at 500×375, q90) and so about their decode cost.
    """
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(20, width // 2)), int(rng.integers(20, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            corners = [(x0, y0), (x0 + w, y0 + int(rng.integers(0, h))), (x0 + int(rng.integers(0, w)), y0 + h)]
            draw.polygon(corners, fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    frequency = rng.uniform(0.02, 0.2)
    stripes = 12 * np.sin(frequency * (xx + 0.7 * yy) + rng.uniform(0, 2 * np.pi))
    noise = rng.normal(0, 22, size=pixels.shape)
    pixels = np.clip(pixels + stripes[..., None] + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def imagenet_like_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    shares = np.array([s for _, _, s in IMAGENET_SIZES])
    picks = rng.choice(len(IMAGENET_SIZES), size=count, p=shares / shares.sum())
    return [IMAGENET_SIZES[i][:2] for i in picks]


def write_image_folder(root: Path, count: int, seed: int) -> list[bytes]:
    """An ImageFolder tree `root/train/<wnid>/<wnid>_<i>.JPEG` of `count` photo-like JPEGs; returns their bytes."""
    rng = np.random.default_rng(seed)
    images = []
    for i, (width, height) in enumerate(imagenet_like_sizes(count, seed)):
        wnid = f"n{i % _CLASSES:08d}"
        data = photo_like_jpeg(rng, width, height)
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{wnid}_{i}.JPEG").write_bytes(data)
        images.append(data)
    return images


def bench_prepare(
    images: int = 200,
    workers: int = 2,
    size: int = 256,
    quality: int = 90,
    rounds: int = 3,
    seed: int = 0,
    progress: Progress = NullProgress(),
) -> BenchReport:
    """prepare vs plain decode (per core), vs the obvious way, and N workers vs 1, on the same images in one run."""
    from alexrepro.prepare import PrepareConfig, prepare

    with tempfile.TemporaryDirectory(prefix="alexrepro-bench-") as tmp:
        tmp = Path(tmp)
        progress.start("writing photo-like JPEGs", None)
        data = write_image_folder(tmp / "source", images, seed)
        progress.finish()

        runs = itertools.count()

        def run_prepare(n: int) -> Callable[[], None]:
            # A fresh output folder every time: prepare would otherwise resume and keep the shards already there.
            config = PrepareConfig(size=size, quality=quality, workers=n, shard_size=_shard_size(images, n))
            return lambda: prepare(tmp / "source", tmp / f"out-{next(runs)}", config, progress=NullProgress())

        pipelines = {
            "plain decode (full size)": (1, lambda: _each(data, imaging.decode_only)),
            "obvious way (LANCZOS, q95)": (1, lambda: _each(data, imaging.resize_obvious_way)),
            "resize step only (in memory)": (1, lambda: _each(data, lambda b: imaging.resize_square_jpeg(b, size, quality))),
            "prepare, 1 worker": (1, run_prepare(1)),
            f"prepare, {workers} workers": (workers, run_prepare(workers)),
        }
        seconds = _best_of(pipelines, rounds, progress)

    rows, core = _rates(pipelines, seconds, images)
    wall = {row["name"]: row["img_s"] for row in rows}
    decode = core["plain decode (full size)"]
    ratios = {
        "prepare (1 worker) / plain decode, per core": core["prepare, 1 worker"] / decode,
        "prepare (1 worker) / obvious way": core["prepare, 1 worker"] / core["obvious way (LANCZOS, q95)"],
        f"prepare {workers} workers / 1 worker (wall clock)": wall[f"prepare, {workers} workers"]
        / wall["prepare, 1 worker"],
        "resize step / plain decode, per core": core["resize step only (in memory)"] / decode,
    }
    notes = [
        f"machine: {machine_description()}",
        f"Pillow build: {imaging.pillow_build()}",
        f"{images} photo-like JPEGs (q{SOURCE_QUALITY}, mean {np.mean([len(d) for d in data]) / 1e3:.0f} KB), "
        f"sizes {_size_mix()}; output {size}×{size} q{quality}",
        f"best of {rounds} interleaved rounds; per-core figures from CPU time, the workers ratio from wall time; "
        "prepare rows include reading files, writing shards and, with more than one worker, starting the pool",
        _load_note(),
    ]
    return BenchReport("bench prepare", rows, ratios, notes)



def bench_stats(
    images: int = 500,
    workers: int = 1,
    size: int = 256,
    quality: int = 90,
    rounds: int = 3,
    seed: int = 0,
    progress: Progress = NullProgress(),
) -> BenchReport:
    """stats vs plain decode of the same size² shard JPEGs (per core), in one run."""
    from alexrepro.stats import StatsConfig, compute_stats

    with tempfile.TemporaryDirectory(prefix="alexrepro-bench-") as tmp:
        tmp = Path(tmp)
        progress.start("writing shards", None)
        jpegs = _write_shards(tmp / "shards", images, workers, size, quality, seed)
        progress.finish()

        def run_stats(n: int) -> Callable[[], None]:
            return lambda: compute_stats(tmp / "shards", tmp / f"stats-{n}", StatsConfig(workers=n), NullProgress())

        pipelines = {
            f"plain decode ({size}² shard JPEGs)": (1, lambda: _each(jpegs, imaging.decode_only)),
            "stats, 1 worker": (1, run_stats(1)),
        }
        if workers > 1:
            pipelines[f"stats, {workers} workers"] = (workers, run_stats(workers))
        seconds = _best_of(pipelines, rounds, progress)

    rows, core = _rates(pipelines, seconds, images)
    wall = {row["name"]: row["img_s"] for row in rows}
    decode = core[f"plain decode ({size}² shard JPEGs)"]
    ratios = {"stats (1 worker) / plain decode, per core": core["stats, 1 worker"] / decode}
    if workers > 1:
        ratios[f"stats {workers} workers / 1 worker (wall clock)"] = (
            wall[f"stats, {workers} workers"] / wall["stats, 1 worker"]
        )
    notes = [
        f"machine: {machine_description()}",
        f"Pillow build: {imaging.pillow_build()}",
        f"{images} shard images ({size}×{size} q{quality}, made by resize_square_jpeg from photo-like JPEGs)",
        f"best of {rounds} interleaved rounds; per-core figures from CPU time, the workers ratio from wall time; "
        "stats rows include reading the tar shards and writing the outputs",
        _load_note(),
    ]
    return BenchReport("bench stats", rows, ratios, notes)


def _each(items: list[bytes], work: Callable[[bytes], object]) -> None:
    for item in items:
        work(item)


def _best_of(pipelines: dict[str, tuple[int, Callable[[], None]]], rounds: int, progress: Progress) -> dict[str, dict]:
    """Run every pipeline once per round, in turn, after one warm-up round; keep each one's fastest run.

    Two clocks: wall time, and this process's CPU time. On a machine shared with other work the CPU clock is the
    better estimate of speed per core for a one-process pipeline (it does not count time spent waiting for a
    core); speed-up with more processes can only be read from the wall clock.
    """
    best = {name: {"wall": math.inf, "cpu": math.inf} for name in pipelines}
    progress.start("timing", (rounds + 1) * len(pipelines))
    for round_index in range(rounds + 1):
        for name, (_, run) in pipelines.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if round_index > 0:  # round 0 warms caches, imports and the page cache
                best[name]["wall"] = min(best[name]["wall"], wall)
                best[name]["cpu"] = min(best[name]["cpu"], cpu)
            progress.advance(1)
    progress.finish()
    return best


def _rates(pipelines, seconds: dict[str, dict], images: int) -> tuple[list[dict], dict[str, float]]:
    """Table rows, and each pipeline's speed per core: CPU clock for one process, wall clock ÷ processes otherwise."""
    rows, per_core = [], {}
    for name, (processes, _) in pipelines.items():
        wall_rate = images / seconds[name]["wall"]
        row = {"name": name, "processes": processes, "img_s": round(wall_rate, 1)}
        if processes == 1:
            per_core[name] = images / seconds[name]["cpu"]
            row["img_s_per_cpu_second"] = round(per_core[name], 1)
        else:
            per_core[name] = wall_rate / processes
        rows.append(row)
    return rows, per_core


def _load_note() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    return f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} logical cores (includes other work)"


def _shard_size(images: int, workers: int) -> int:
    """Enough shards (4 per worker) that every worker has work to the end."""
    return max(1, math.ceil(images / (4 * workers)))


def _size_mix() -> str:
    return ", ".join(f"{w}×{h} {share:.0%}" for w, h, share in IMAGENET_SIZES)


def _write_shards(root: Path, images: int, workers: int, size: int, quality: int, seed: int) -> list[bytes]:
    """Train shards of size² JPEGs as `prepare` writes them, plus a manifest; returns the JPEG bytes."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for width, height in imagenet_like_sizes(images, seed):
        # Drawn at a third of the area, then resized: the 256² output looks the same and generation stays quick.
        source = photo_like_jpeg(rng, max(size, width * 3 // 5), max(size, height * 3 // 5))
        jpegs.append(imaging.resize_square_jpeg(source, size, quality))
    per_shard = _shard_size(images, max(workers, 1))
    infos = []
    for index, start in enumerate(range(0, images, per_shard)):
        samples = [Sample(f"img_{i:06d}", jpegs[i], i % _CLASSES) for i in range(start, min(start + per_shard, images))]
        infos.append(write_shard(root / f"train-{index:06d}.tar", samples))
    classes = tuple(ClassInfo(k, f"n{k:08d}", None, f"class {k}") for k in range(_CLASSES))
    manifest = Manifest({"size": size, "quality": quality}, classes, {"train": SplitInfo(images, tuple(infos))})
    write_manifest(root, manifest)
    return jpegs
