"""Throughput of the data stages (`prepare`, `stats`) beside their baselines, measured on the same images in one run.

`bench_prepare` times, on the same photo-like JPEGs of ImageNet sizes:
  - plain decode: `Image.open(...).load()` at full size, one process (the floor: DESIGN.md "Performance design");
  - the obvious way: open → RGB → LANCZOS shorter side to 256 → centre crop → save q95, one process;
  - the resize step alone (`imaging.resize_square_jpeg` on bytes in memory), one process;
  - the real `prepare()` end to end (read files, resize, write shards and manifest) with 1 and with N workers;
  - each peer library's writer that imports (alexrepro.bench.peers), fed by a pool of 1 and of N processes.
`bench_stats` times plain decode of the 256² shard JPEGs against the real `compute_stats()`.

Steady state. A whole run of a stage pays fixed costs once (starting the worker pool, importing numpy and Pillow in
each worker, listing the source, writing the manifest or the outputs). Over the 1.28 M images of ILSVRC-2012 they
vanish; over a few hundred they do not. So each stage runs whole on N images and on 2N images (the first N and all
2N, same shard size), and its steady-state rate is N / (t(2N) − t(N)): the fixed costs cancel in the difference,
and what is left is the cost of N more images, shard writing included. The whole-run rates are reported too.

The machine may be shared, so every pipeline runs `rounds` times, interleaved with the others, and the fastest
round of each counts: the ratios then compare each pipeline at its least disturbed, in the same run.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from alexrepro.bench.peers import WRITERS, WriterPeer, installed, missing_note
from alexrepro.bench.report import BenchReport, machine_description
from alexrepro.core.progress import NullProgress, Progress
from alexrepro.data import imaging
from alexrepro.data.config import PrepareConfig, StatsConfig
from alexrepro.data.shards.manifest import ClassInfo, Sample
from alexrepro.data.shards.writer import in_shards, write_prepared_folder

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


def photo_like_jpegs(count: int, seed: int) -> list[bytes]:
    """`count` photo-like JPEGs of the ImageNet size mix."""
    rng = np.random.default_rng(seed)
    return [photo_like_jpeg(rng, width, height) for width, height in imagenet_like_sizes(count, seed)]


def write_image_folder(root: Path, images: list[bytes]) -> None:
    """An ImageFolder tree `root/train/<wnid>/<wnid>_<i>.JPEG` holding `images`."""
    for i, data in enumerate(images):
        wnid = f"n{i % _CLASSES:08d}"
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{wnid}_{i}.JPEG").write_bytes(data)


class _Pipeline(NamedTuple):
    processes: int
    images: int
    run: Callable[[], object]


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
    from alexrepro.data.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="alexrepro-bench-") as tmp_name:
        tmp = Path(tmp_name)
        progress.start("writing photo-like JPEGs", None)
        data = photo_like_jpegs(2 * images, seed)
        for count in (images, 2 * images):
            write_image_folder(tmp / f"source-{count}", data[:count])
        data = data[:images]  # what the one-process baselines time
        progress.finish()

        runs = itertools.count()

        def run_prepare(n: int, count: int) -> Callable[[], object]:
            # The same shard size for N and 2N images, so that per-shard costs count in the steady state.
            # A fresh output folder every time: prepare would otherwise resume and keep the shards already there.
            config = PrepareConfig(size=size, quality=quality, workers=n, shard_size=_shard_size(images, n))
            return lambda: prepare(tmp / f"source-{count}", tmp / f"out-{next(runs)}", config, progress=NullProgress())

        baselines = {
            "plain decode (full size)": _Pipeline(1, images, lambda: _each(data, imaging.decode_only)),
            "obvious way (LANCZOS, q95)": _Pipeline(1, images, lambda: _each(data, imaging.resize_obvious_way)),
            "resize step only (in memory)": _Pipeline(
                1, images, lambda: _each(data, lambda b: imaging.resize_square_jpeg(b, size, quality))
            ),
        }
        whole = _whole_runs("prepare", _worker_counts(workers), images, run_prepare)
        # Each peer writer cuts shards as prepare does: by count (webdataset) or by bytes (MosaicML), the bytes of
        # as many resized images, measured on a few.
        mean_output = np.mean([len(imaging.resize_square_jpeg(d, size, quality)) for d in data[:16]])
        writers = [peer for peer in WRITERS if installed(peer)]

        peers: dict[str, dict[str, _Pipeline]] = {}  # each peer's whole runs, by its name
        for peer in writers:

            def run_peer(n: int, count: int, peer: WriterPeer = peer) -> Callable[[], object]:
                shard_size = _shard_size(images, n)

                def run() -> Measured:  # a fresh output folder every time, as for prepare
                    args = (tmp / f"source-{count}", tmp / f"peer-{next(runs)}", n, shard_size,
                            int(shard_size * mean_output), size, quality)  # fmt: skip
                    return _timed_in_child(peer, args)

                return run

            peers[peer.name] = _whole_runs(peer.name, _worker_counts(workers), images, run_peer)
        timed = {**baselines, **whole}
        for runs_of_peer in peers.values():
            timed |= runs_of_peer
        seconds = _best_of(timed, rounds, progress)

    rows, core = _rates(baselines, seconds)
    steady_rows, steady = _steady_state("prepare", _worker_counts(workers), images, seconds)
    whole_rows, whole_core = _rates(whole, seconds)
    decode, obvious = core["plain decode (full size)"], core["obvious way (LANCZOS, q95)"]
    one, many = _workers_name(1), _workers_name(workers)
    whole_one, whole_many = _whole_name("prepare", 1, images), _whole_name("prepare", workers, images)
    ratios = {
        "prepare (1 worker) / plain decode, per core, steady state": steady[one]["core"] / decode,
        "prepare (1 worker) / obvious way, steady state": steady[one]["core"] / obvious,
        f"prepare {many} / 1 worker (wall clock), steady state": steady[many]["wall"] / steady[one]["wall"],
        "resize step / plain decode, per core": core["resize step only (in memory)"] / decode,
        f"whole run of {images}: prepare (1 worker) / plain decode, per core": whole_core[whole_one] / decode,
        f"whole run of {images}: prepare (1 worker) / obvious way": whole_core[whole_one] / obvious,
        f"whole run of {images}: prepare {many} / 1 worker (wall clock)": seconds[whole_one]["wall"]
        / seconds[whole_many]["wall"],
    }
    for peer in writers:
        peer_rows, peer_steady = _steady_state(peer.name, _worker_counts(workers), images, seconds)
        steady_rows += peer_rows
        whole_rows += _rates(peers[peer.name], seconds)[0]
        for n in _worker_counts(workers):
            name = _workers_name(n)
            ratios[f"prepare / {peer.name}, {name} (wall clock), steady state"] = (
                steady[name]["wall"] / peer_steady[name]["wall"]
            )
            mine, theirs = (seconds[_whole_name(stage, n, images)] for stage in ("prepare", peer.name))
            ratios[f"whole run of {images}: prepare / {peer.name}, {name} (wall clock)"] = theirs["wall"] / mine["wall"]
        # At "1 worker" a peer is two processes (the pool's worker resizes, the main process writes), prepare one:
        # images per CPU-second, all of a peer's processes counted, compare the work each does.
        ratios[f"prepare / {peer.name}, 1 worker, per CPU-second, steady state"] = (
            steady[one]["core"] / peer_steady[one]["core"]
        )
        mine, theirs = (seconds[_whole_name(stage, 1, images)]["cpu"] for stage in ("prepare", peer.name))
        ratios[f"whole run of {images}: prepare / {peer.name}, 1 worker, per CPU-second"] = theirs / mine
    notes = [
        f"machine: {machine_description()}",
        f"Pillow build: {imaging.pillow_build()}",
        (
            f"{images} photo-like JPEGs (q{SOURCE_QUALITY}, mean {np.mean([len(d) for d in data]) / 1e3:.0f} KB), "
            f"sizes {_size_mix()}; output {size}×{size} q{quality}"
        ),
        f"best of {rounds} interleaved rounds; per-core figures from CPU time, the workers ratio from wall time",
        _steady_note(images),
        (
            "peer writers: a forked pool runs the same resize function and the library's writer stores the results "
            "(alexrepro.bench.peers); their CPU time counts the pool's processes too; MosaicML's shards are cut at "
            f"{mean_output * _shard_size(images, 1) / 1e3:.0f} KB at 1 worker, the bytes of as many resized images "
            "as prepare's shards hold"
        ),
        *filter(None, [missing_note(WRITERS)]),
        _load_note(),
    ]
    return BenchReport("bench prepare", rows + steady_rows + whole_rows, ratios, notes)


def bench_stats(
    images: int = 500,
    workers: int = 1,
    size: int = 256,
    quality: int = 90,
    rounds: int = 3,
    seed: int = 0,
    progress: Progress = NullProgress(),
) -> BenchReport:
    """stats vs plain decode of the same size² shard JPEGs (per core), and N workers vs 1, in one run."""
    from alexrepro.data.stats import compute_stats

    workers = max(workers, 1)
    with tempfile.TemporaryDirectory(prefix="alexrepro-bench-") as tmp_name:
        tmp = Path(tmp_name)
        progress.start("writing shards", None)
        jpegs = _shard_images(2 * images, size, quality, seed)
        # One shard folder of 2N images; the N-image run reads its first half (max_images), whole shards either way.
        _write_shards(tmp / "shards", jpegs, _shard_size(images, workers), size, quality)
        jpegs = jpegs[:images]  # what plain decode times
        progress.finish()

        def run_stats(n: int, count: int) -> Callable[[], object]:
            config = StatsConfig(workers=n, max_images=count)
            return lambda: compute_stats(tmp / "shards", tmp / f"stats-{n}-{count}", config, NullProgress())

        decode_name = f"plain decode ({size}² shard JPEGs)"
        baselines = {decode_name: _Pipeline(1, images, lambda: _each(jpegs, imaging.decode_only))}
        whole = _whole_runs("stats", _worker_counts(workers), images, run_stats)
        seconds = _best_of({**baselines, **whole}, rounds, progress)

    rows, core = _rates(baselines, seconds)
    steady_rows, steady = _steady_state("stats", _worker_counts(workers), images, seconds)
    whole_rows, whole_core = _rates(whole, seconds)
    decode = core[decode_name]
    one, whole_one = _workers_name(1), _whole_name("stats", 1, images)
    ratios = {"stats (1 worker) / plain decode, per core, steady state": steady[one]["core"] / decode}
    whole_ratios = {f"whole run of {images}: stats (1 worker) / plain decode, per core": whole_core[whole_one] / decode}
    if workers > 1:
        many, whole_many = _workers_name(workers), _whole_name("stats", workers, images)
        ratios[f"stats {many} / 1 worker (wall clock), steady state"] = steady[many]["wall"] / steady[one]["wall"]
        whole_ratios[f"whole run of {images}: stats {many} / 1 worker (wall clock)"] = (
            seconds[whole_one]["wall"] / seconds[whole_many]["wall"]
        )
    ratios.update(whole_ratios)
    notes = [
        f"machine: {machine_description()}",
        f"Pillow build: {imaging.pillow_build()}",
        f"{images} shard images ({size}×{size} q{quality}, made by resize_square_jpeg from photo-like JPEGs)",
        f"best of {rounds} interleaved rounds; per-core figures from CPU time, the workers ratio from wall time",
        _steady_note(images),
        _load_note(),
    ]
    return BenchReport("bench stats", rows + steady_rows + whole_rows, ratios, notes)


def _each(items: list[bytes], work: Callable[[bytes], object]) -> None:
    for item in items:
        work(item)


class Measured(NamedTuple):
    """Seconds a pipeline timed itself (wall, and CPU of the process that ran it)."""

    wall: float
    cpu: float


def _timed_in_child(peer: WriterPeer, args: tuple) -> Measured:
    """Run `peer.write(*args)` in a fresh interpreter and return its own timing, imports excluded: wall time, and
    the CPU time of the child and of its pool's processes (reaped when the pool closes).

    A peer runs apart because its library imports torch, whose threads would make this process unsafe to fork:
    prepare's pools would then start a fork server, which the `prepare` command does not need (it imports no
    torch). Each side is timed from its work's start, its imports already paid, as in a long-running program."""
    code = (
        "import json, resource, sys, time\n"
        f"from {peer.write.__module__} import {peer.write.__name__} as work\n"
        f"import {peer.module}\n"
        "def cpu():\n"
        "    own, pool = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
        "    return own.ru_utime + own.ru_stime + pool.ru_utime + pool.ru_stime\n"
        "args = json.loads(sys.argv[1])\n"
        "wall, cpu_start = time.perf_counter(), cpu()\n"
        "work(*args)\n"
        "print(json.dumps([time.perf_counter() - wall, cpu() - cpu_start]))\n"
    )
    plain = [str(a) if isinstance(a, Path) else a for a in args]
    done = subprocess.run([sys.executable, "-c", code, json.dumps(plain)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{peer.name} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    wall, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return Measured(wall, cpu)


def _worker_counts(workers: int) -> list[int]:
    return sorted({1, workers})


def _workers_name(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _whole_name(stage: str, n: int, images: int) -> str:
    return f"{stage}, {_workers_name(n)}, whole run of {images}"


def _whole_runs(stage: str, worker_counts: list[int], images: int, make_run) -> dict[str, _Pipeline]:
    """A whole run of the stage on N and on 2N images, for each worker count; `make_run(workers, images)`."""
    return {
        _whole_name(stage, n, count): _Pipeline(n, count, make_run(n, count))
        for n in worker_counts
        for count in (images, 2 * images)
    }


def _steady_state(stage: str, worker_counts: list[int], images: int, seconds: dict[str, dict]):
    """Rows and rates of the images a whole run of 2N does beyond one of N: N / (t(2N) − t(N)), fixed costs cancelled.

    Returns the table rows and, per worker count name, {"wall": img/s, "core": img/s per core}. A difference that is
    not positive (a run of N images too short to time) gives nan.
    """
    rows, rates = [], {}
    for n in worker_counts:
        one, two = seconds[_whole_name(stage, n, images)], seconds[_whole_name(stage, n, 2 * images)]
        wall = _rate(images, two["wall"] - one["wall"])
        core = _rate(images, two["cpu"] - one["cpu"]) if n == 1 else wall / n
        row = {"name": f"{stage}, {_workers_name(n)}, steady state", "processes": n, "img_s": round(wall, 1)}
        if n == 1:
            row["img_s_per_cpu_second"] = round(core, 1)
        rows.append(row)
        rates[_workers_name(n)] = {"wall": wall, "core": core}
    return rows, rates


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else math.nan


def _steady_note(images: int) -> str:
    return (
        f"steady state = {images} / (t(whole run of {2 * images}) − t(whole run of {images})): the fixed costs of a "
        "run (starting workers, listing the input, writing the manifest or outputs) cancel; headline ratios use it. "
        "Whole-run rows include those costs"
    )


def _best_of(pipelines: dict[str, _Pipeline], rounds: int, progress: Progress) -> dict[str, dict]:
    """Run every pipeline once per round, in turn, after one warm-up round; keep each one's fastest run.

    Two clocks: wall time, and this process's CPU time. On a machine shared with other work the CPU clock is the
    better estimate of speed per core for a one-process pipeline (it does not count time spent waiting for a
    core); speed-up with more processes can only be read from the wall clock.
    """
    best = {name: {"wall": math.inf, "cpu": math.inf} for name in pipelines}
    progress.start("timing", (rounds + 1) * len(pipelines))
    for round_index in range(rounds + 1):
        for name, pipeline in pipelines.items():
            wall, cpu = time.perf_counter(), time.process_time()
            measured = pipeline.run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if isinstance(measured, Measured):  # timed where it ran (a child process)
                wall, cpu = measured
            if round_index > 0:  # round 0 warms caches, imports and the page cache
                best[name]["wall"] = min(best[name]["wall"], wall)
                best[name]["cpu"] = min(best[name]["cpu"], cpu)
            progress.advance(1)
    progress.finish()
    return best


def _rates(pipelines: dict[str, _Pipeline], seconds: dict[str, dict]) -> tuple[list[dict], dict[str, float]]:
    """Table rows, and each pipeline's speed per core: CPU clock for one process, wall clock ÷ processes otherwise."""
    rows, per_core = [], {}
    for name, pipeline in pipelines.items():
        wall_rate = pipeline.images / seconds[name]["wall"]
        row = {"name": name, "processes": pipeline.processes, "img_s": round(wall_rate, 1)}
        if pipeline.processes == 1:
            per_core[name] = pipeline.images / seconds[name]["cpu"]
            row["img_s_per_cpu_second"] = round(per_core[name], 1)
        else:
            per_core[name] = wall_rate / pipeline.processes
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


def _shard_images(count: int, size: int, quality: int, seed: int) -> list[bytes]:
    """`count` size² JPEGs as `prepare` writes them, from photo-like sources of the ImageNet size mix."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for width, height in imagenet_like_sizes(count, seed):
        # Drawn at a third of the area, then resized: the 256² output looks the same and generation stays quick.
        source = photo_like_jpeg(rng, max(size, width * 3 // 5), max(size, height * 3 // 5))
        jpegs.append(imaging.resize_square_jpeg(source, size, quality))
    return jpegs


def _write_shards(root: Path, jpegs: list[bytes], per_shard: int, size: int, quality: int) -> None:
    """Train shards of `per_shard` JPEGs each, as `prepare` writes them, plus a manifest."""
    samples = [Sample(f"img_{i:06d}", jpeg, i % _CLASSES) for i, jpeg in enumerate(jpegs)]
    classes = [ClassInfo(k, f"n{k:08d}", None, f"class {k}") for k in range(_CLASSES)]
    write_prepared_folder(root, classes, {"train": in_shards(samples, per_shard)}, {"size": size, "quality": quality})
