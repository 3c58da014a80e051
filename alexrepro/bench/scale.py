"""`alexrepro bench scale`: every stage run for real at several fractions of ILSVRC-2012's counts.

At each scale (default 1/64 and 1/8) it writes an ILSVRC-2012-shaped download (alexrepro.synth.scale) and runs
the real commands as subprocesses, one after another:

    sample        the download itself
    prepare       into shards at a small --size (72), so decoding does not hide the per-image bookkeeping
    prepare again over the finished output (what a rerun or `dvc repro` pays)
    stats
    train         start-up plus a bounded number of steps at a tiny width, then SIGTERM (train's own clean stop,
                  which writes checkpoint-last.pt)
    evaluate      that checkpoint over every val image, report included

and prints per stage: wall time, time per image, peak resident memory (the stage's main process, its largest
other process, and the whole process tree), bytes written to its output folder, and the time to its first result.
The ratio of per-image cost between the largest and the smallest scale is the number that shows what does not
scale linearly (the target is 1.25× at most).

How things are measured, with no timing hooks inside the stages:
- memory: a thread reads VmRSS of the stage's process and every descendant from /proc every POLL_S seconds, so a
  peak shorter than that can be missed; "tree" is the largest sum over the tree seen at one poll.
- disk: bytes of the files under the stage's output folder after it ends, minus before (not /proc/*/io, which
  is lost when a worker exits).
- first result: prepare, the first shard file under its final name in the output folder (seen by the poller);
  train and evaluate, the first forward pass of any torch module, recorded by a global module hook that this
  module installs in the child process before it calls the CLI (`python -m alexrepro.bench.scale CLI-ARGS`).
  The same child wrapper counts optimizer steps with a global optimizer hook and sends itself SIGTERM after the
  requested number.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from alexrepro.bench.report import BenchReport, machine_description
from alexrepro.core.errors import AlexReproError
from alexrepro.synth.config import ScaleConfig

POLL_S = 0.1
PREPARE_SIZE = 72  # a small --size: decode and resize stay cheap, bookkeeping shows
CROP = 67  # the smallest crop AlexNet's layers allow (alexrepro.model.network.min_crop)
TRAIN_WIDTH = 0.05
TRAIN_BATCH = 64
MARKS_ENV = "ALEXREPRO_BENCH_MARKS"  # file the child wrapper appends "forward|step TIME" lines to
STOP_AFTER_ENV = "ALEXREPRO_BENCH_STOP_AFTER_STEPS"


class BenchStageError(AlexReproError):
    """A stage run by the benchmark failed; its output is in the --log file."""


@dataclass
class StageMeasure:
    stage: str
    scale: str
    rc: int
    wall_s: float
    images: int
    cpu_s: float = 0.0  # user + system time of the stage's process tree, as last polled
    peak_main_mb: float = 0.0
    peak_other_mb: float = 0.0  # the largest single process other than the main one (workers)
    peak_tree_mb: float = 0.0
    disk_mb: float = 0.0
    first_s: float | None = None  # command start → first shard / first forward pass
    note: str = ""

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.wall_s / max(1, self.images)

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_s / max(1, self.images)

    def row(self) -> dict:
        return {
            "name": f"{self.stage} @ {self.scale}",
            "wall_s": round(self.wall_s, 2),
            "images": self.images,
            "ms_per_img": round(self.ms_per_image, 4),
            "cpu_s": round(self.cpu_s, 2),
            "cpu_ms_per_img": round(self.cpu_ms_per_image, 4),
            "rss_main_MB": round(self.peak_main_mb),
            "rss_worker_MB": round(self.peak_other_mb),
            "rss_tree_MB": round(self.peak_tree_mb),
            "disk_MB": round(self.disk_mb, 1),
            "first_s": "" if self.first_s is None else round(self.first_s, 2),
            "rc": self.rc,
            **({"note": self.note} if self.note else {}),
        }


# --------------------------------------------------------------------------------------------------------------
# Watching a process tree


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class _Watcher:
    pid: int
    started: float
    first_file: tuple[Path, str] | None  # (folder, glob): time when the first match appears
    peak_main: float = 0.0
    peak_other: float = 0.0
    peak_tree: float = 0.0
    first_s: float | None = None
    cpu_ticks: dict = field(default_factory=dict)  # (pid, start time) -> utime + stime last seen
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(POLL_S)

    def sample(self) -> None:
        tree, children = [self.pid], _children_map()
        for pid in tree:
            tree.extend(children.get(pid, []))
        sizes = {pid: _rss_mb(pid) for pid in tree}
        for pid in tree:
            started, ticks = _cpu_ticks(pid)
            if started is not None:
                self.cpu_ticks[(pid, started)] = ticks
        self.peak_main = max(self.peak_main, sizes[self.pid])
        self.peak_other = max([self.peak_other] + [mb for pid, mb in sizes.items() if pid != self.pid])
        self.peak_tree = max(self.peak_tree, sum(sizes.values()))
        if self.first_s is None and self.first_file is not None:
            folder, pattern = self.first_file
            if folder.is_dir() and any(folder.glob(pattern)):
                self.first_s = time.time() - self.started


def _cpu_ticks(pid: int) -> tuple[int | None, int]:
    """(start time, utime + stime) of a process in clock ticks, from /proc/PID/stat; (None, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None, 0
    return int(fields[19]), int(fields[11]) + int(fields[12])


def _kill_tree_when(process: subprocess.Popen, folder: Path, pattern: str, count: int) -> None:
    while process.poll() is None:
        if folder.is_dir() and sum(1 for _ in folder.glob(pattern)) >= count:
            tree, children = [process.pid], _children_map()
            for pid in tree:
                tree.extend(children.get(pid, []))
            for pid in tree:  # the whole tree at once, as a power cut would
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        time.sleep(POLL_S)


def same_output(first: Path, second: Path) -> tuple[bool, str]:
    """Whether two prepare outputs hold the same bytes: manifest, member indexes and every shard (compared whole)."""
    names = sorted(p.name for p in first.iterdir() if p.is_file() and not p.name.startswith("."))
    other = sorted(p.name for p in second.iterdir() if p.is_file() and not p.name.startswith("."))
    if names != other:
        return False, f"different files: {sorted(set(names) ^ set(other))[:5]}"
    for name in names:
        with open(first / name, "rb") as a, open(second / name, "rb") as b:
            while True:
                block_a, block_b = a.read(1 << 20), b.read(1 << 20)
                if block_a != block_b:
                    return False, f"{name} differs"
                if not block_a:
                    break
    return True, f"{len(names)} files byte-identical"


def _folder_bytes(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_stage(
    stage: str,
    scale: str,
    args: list[str],
    out: Path,
    images: int,
    *,
    first_file: str | None = None,
    stop_after_steps: int | None = None,
    log: Path | None = None,
    kill_at_files: tuple[str, int] | None = None,
) -> StageMeasure:
    """Run `alexrepro ARGS` (through this module's wrapper) niced as given, measuring it; see the module doc.
    `kill_at_files=(glob, n)`: SIGKILL the stage's whole process tree once `n` files under `out` match `glob` (what
    a power cut or the OOM killer does to a run; the workers die with it)."""
    marks = out.parent / f".{out.name}.{stage.replace(' ', '-')}.marks"
    marks.unlink(missing_ok=True)
    env = {**os.environ, MARKS_ENV: str(marks)}
    if stop_after_steps is not None:
        env[STOP_AFTER_ENV] = str(stop_after_steps)
    before = _folder_bytes(out)
    started = time.time()
    with open(log or os.devnull, "ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "alexrepro.bench.scale", *args, "--quiet"], env=env, stdout=sink, stderr=sink
        )
        watcher = _Watcher(process.pid, started, (out, first_file) if first_file else None)
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        if kill_at_files is not None:
            _kill_tree_when(process, out, *kill_at_files)
        rc = process.wait()
        wall = time.time() - started
        watcher.stop.set()
        thread.join()
    measure = StageMeasure(
        stage,
        scale,
        rc,
        wall,
        images,
        watcher.cpu_s,
        watcher.peak_main,
        watcher.peak_other,
        watcher.peak_tree,
        (_folder_bytes(out) - before) / 1e6,
        watcher.first_s,
    )
    if first_file is None and marks.exists():
        forwards = [float(line.split()[1]) for line in marks.read_text().splitlines() if line.startswith("forward")]
        if forwards:
            measure.first_s = forwards[0] - started
    return measure


# --------------------------------------------------------------------------------------------------------------
# One scale, all stages


def bench_one_scale(
    scale: Fraction,
    work: Path,
    classes: int,
    steps: int,
    workers: int,
    log: Path | None = None,
    progress_file: Path | None = None,
    download: Path | None = None,
    kill_resume: bool = False,
    only: set[str] | None = None,
) -> list[StageMeasure]:
    """Every stage at one scale. `download`: an existing download of this scale to use instead of writing one
    (the "sample" stage is then left out); `kill_resume`: after the other stages, prepare once more into a second
    folder, kill -9 its process tree when half the train shards exist, rerun it, and compare the two outputs.
    `only`: run just these stages, over what an earlier run of this scale left in the work folder (which is then
    kept), e.g. {"stats", "train", "evaluate"} after a failure past prepare."""
    from alexrepro.core.errors import ConfigError
    from alexrepro.synth.scale import scale_classes

    label = str(scale)
    folder = work / label.replace("/", "_")
    reused_download = download
    download, shards, stats, train, evaluation = (folder / n for n in ("download", "shards", "stats", "train", "eval"))
    if reused_download is not None:
        download = Path(reused_download)
    try:
        config = ScaleConfig(scale=scale, classes=classes)
    except ValueError as exc:
        raise ConfigError(f"bench scale: {exc}") from None
    n_train = sum(c.train_count for c in scale_classes(config))
    n_val = config.val_count_per_class * classes
    w = ["--workers", str(workers)]

    if folder.exists() and only is None:
        shutil.rmtree(folder)  # every stage starts from nothing, so "prepare" is a first run
    results = []

    def stage(name, args, out, images, **kwargs) -> StageMeasure | None:
        if only is not None and name not in only:
            return None
        result = run_stage(name, label, args, out, images, log=log, **kwargs)
        results.append(result)
        if progress_file is not None:  # one JSON line per finished stage: a long run's figures survive an abort
            with open(progress_file, "a") as handle:
                handle.write(json.dumps(result.row()) + "\n")
        # train stopped by SIGTERM exits 1 after writing checkpoint-last.pt: that is the expected end here.
        stopped_train = name == "train" and (train / "checkpoint-last.pt").exists()
        if result.rc != 0 and not stopped_train:
            raise BenchStageError(
                f"{name} at scale {label} exited {result.rc}; rerun with --log FILE and read its last lines"
            )
        return result

    if reused_download is None:  # (the sample stage writes it)
        stage(
            "sample", ["sample", str(download), "--scale", label, "--classes", str(classes)], download, n_train + n_val
        )
    prepare = ["prepare", str(download), str(shards), "--size", str(PREPARE_SIZE), *w]
    stage("prepare", prepare, shards, n_train + n_val, first_file="*-000000.tar")
    stage("prepare again", prepare, shards, n_train + n_val)
    stage("stats", ["stats", str(shards), str(stats), *w], stats, n_train)
    stage(
        "train",
        [
            "train",
            str(shards),
            str(stats),
            str(train),
            "--epochs",
            "1",
            "--batch-size",
            str(TRAIN_BATCH),
            "--crop",
            str(CROP),
            "--width",
            str(TRAIN_WIDTH),
            "--towers",
            "1",
            "--init",
            "he",
            "--devices",
            "cpu",
            *w,
        ],
        train,
        steps * TRAIN_BATCH,
        stop_after_steps=steps,
    )
    stage(
        "evaluate",
        ["evaluate", str(train / "checkpoint-last.pt"), str(shards), str(evaluation), "--devices", "cpu"],
        evaluation,
        n_val,
    )
    if kill_resume and (only is None or "prepare resumed" in only):
        again = folder / "shards-resumed"
        half = max(1, -(-n_train // 1000) // 2)  # prepare's default shard_size is 1000
        resume = ["prepare", str(download), str(again), *prepare[3:]]
        killed = run_stage(
            "prepare killed", label, resume, again, n_train + n_val, log=log, kill_at_files=("train-*.tar", half)
        )
        results.append(killed)
        resumed = stage("prepare resumed", resume, again, n_train + n_val)
        assert resumed is not None  # `only` lets "prepare resumed" run: checked above
        identical, detail = same_output(shards, again)
        resumed.note = f"killed (rc {killed.rc}) at {half} train shards; {detail}"
        if progress_file is not None:
            with open(progress_file, "a") as handle:
                handle.write(
                    json.dumps({"name": f"resume check @ {label}", "identical": identical, "detail": resumed.note})
                    + "\n"
                )
        if not identical:
            raise BenchStageError(f"prepare resumed after kill -9 at scale {label}: {detail}")
        shutil.rmtree(again)
    return results


def bench_scale(
    scales: list[Fraction],
    work: Path,
    classes: int = 1000,
    steps: int = 10,
    workers: int = 2,
    log: Path | None = None,
    progress_file: Path | None = None,
    downloads: dict[Fraction, Path] | None = None,
    kill_resume: bool = False,
    only: set[str] | None = None,
) -> BenchReport:
    """Every stage at every scale; ratios compare each stage's per-image cost at the largest vs smallest.
    `downloads`: existing downloads to reuse, by scale; `kill_resume`: see bench_one_scale."""
    work.mkdir(parents=True, exist_ok=True)
    measures: list[StageMeasure] = []
    for scale in scales:
        measures.extend(
            bench_one_scale(
                scale,
                work,
                classes,
                steps,
                workers,
                log,
                progress_file,
                (downloads or {}).get(scale),
                kill_resume,
                only,
            )
        )
    smallest, largest = str(min(scales)), str(max(scales))
    ratios = {}
    if smallest != largest:
        by = {(m.stage, m.scale): m for m in measures}
        for stage in dict.fromkeys(m.stage for m in measures):
            if stage == "train" or (stage, largest) not in by or (stage, smallest) not in by:
                continue  # a fixed number of steps: its per-image cost is start-up over a constant, not a rate
            big, small = by[(stage, largest)], by[(stage, smallest)]
            ratios[f"{stage}: wall ms/img at {largest} ÷ at {smallest}"] = big.ms_per_image / small.ms_per_image
            ratios[f"{stage}: CPU ms/img at {largest} ÷ at {smallest}"] = big.cpu_ms_per_image / small.cpu_ms_per_image
    notes = [
        machine_description(),
        (
            f"{classes} classes; prepare --size {PREPARE_SIZE}; train {steps} steps of batch {TRAIN_BATCH}, "
            f"crop {CROP}, width {TRAIN_WIDTH}, one tower, CPU; {workers} workers where a stage takes them"
        ),
        f"memory: VmRSS of the process tree polled every {POLL_S}s (main process, largest other process, tree sum)",
        (
            "cpu_s: user + system time of every process of the tree, as last seen by the poller (getrusage of waited "
            "children would miss workers started by a forkserver); on a shared machine wall time stretches with the "
            "load, CPU time much less"
        ),
        (
            "disk: bytes added under the stage's output folder; first_s: first shard file (prepare), first forward "
            "pass (train, evaluate)"
        ),
    ]
    return BenchReport(
        title="Stages at fractions of ILSVRC-2012's counts",
        rows=[m.row() for m in measures],
        ratios=ratios,
        notes=notes,
    )


def markdown_table(report: BenchReport) -> str:
    """The report's rows and ratios as Markdown tables, for docs/benchmarks.md."""
    columns = list(dict.fromkeys(k for row in report.rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in report.rows]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.2f}× |" for name, value in report.ratios.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The child wrapper: `python -m alexrepro.bench.scale CLI-ARGS` runs the CLI with two global torch hooks


def _install_marks(marks: Path, stop_after: int | None) -> None:
    """Append "forward TIME" at the first forward pass and "step N TIME" at each optimizer step; after
    `stop_after` steps send this process SIGTERM, which train answers by finishing the step and checkpointing."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    state = {"forwarded": False, "steps": 0}

    def mark(line: str) -> None:
        with open(marks, "a") as handle:
            handle.write(f"{line}\n")

    def on_forward(module, inputs, output):
        if not state["forwarded"] and os.getpid() == main_pid:
            state["forwarded"] = True
            mark(f"forward {time.time()}")

    def on_step(optimizer, args, kwargs):
        state["steps"] += 1
        mark(f"step {time.time()} {state['steps']}")
        if stop_after is not None and state["steps"] == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    main_pid = os.getpid()
    torch.nn.modules.module.register_module_forward_hook(on_forward)
    register_optimizer_step_post_hook(on_step)


def _child_main() -> None:
    marks = os.environ.get(MARKS_ENV)
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if marks and command in ("train", "evaluate"):
        stop = os.environ.get(STOP_AFTER_ENV)
        _install_marks(Path(marks), int(stop) if stop else None)
    # Run the command line as `python -m alexrepro` would, by name: the CLI sits on top and nothing imports it.
    runpy.run_module("alexrepro", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _child_main()
