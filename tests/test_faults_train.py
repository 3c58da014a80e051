"""Nothing lost silently, training and evaluation: signals from a scheduler, dead loader workers, a full disk, bad
checkpoints and bad samples, each injected through the real command line.

Every run is a subprocess of `python -m alexrepro` with a time limit, so a hang fails the test instead of blocking it.
Runs that are signalled wait for a line of the run's own output (or a file a test hook writes), never for a guessed
time.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alexrepro.data.shards.manifest import ClassInfo, Manifest, Sample, SplitInfo
from alexrepro.data.shards.writer import write_manifest, write_shard
from alexrepro.model.checkpoint import load_checkpoint
from helpers import fixtures as fx
from helpers.images import jpeg_bytes as jpeg
from helpers.train import make_stats, pattern_image

pytestmark = pytest.mark.slow  # each test runs the command line a few times (seconds each)

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 180  # seconds any one command may take before the test fails as a hang
TINY = ["--batch-size", "8", "--crop", "67", "--width", "0.125", "--init", "he", "--devices", "cpu",
        "--set", "input_scale=0.015625", "--set", "lr=0.02", "--set", "log_every=1"]  # fmt: skip


def environment(hook: Path | None = None, extra: dict | None = None) -> dict:
    paths = ([str(hook)] if hook else []) + [str(ROOT), os.environ.get("PYTHONPATH", "")]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(extra or {})}
    environ.pop("ALEXREPRO_TRACEBACK", None)
    return environ


def cli(*args, hook: Path | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alexrepro", *map(str, args)],
        capture_output=True, text=True, env=environment(hook), timeout=LIMIT, preexec_fn=preexec_fn,
    )  # fmt: skip


def start(*args, hook: Path | None = None, started: Path | None = None) -> subprocess.Popen:
    """A command in its own session (process group), as a scheduler starts a job; `started`: the file SLOW_DECODE
    writes when a loader worker decodes its first image."""
    extra = {"ALEXREPRO_TEST_STARTED": str(started)} if started else None
    return subprocess.Popen(
        [sys.executable, "-m", "alexrepro", *map(str, args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment(hook, extra),
        start_new_session=True,
    )  # fmt: skip


def wait_for_line(process: subprocess.Popen, prefix: str) -> list[str]:
    """Read the process's stderr until a line starts with `prefix`; return the lines read."""
    lines = []
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            pytest.fail(f"exited before printing {prefix!r}:\n" + "".join(lines))
        lines.append(line)
        if line.startswith(prefix):
            return lines
    pytest.fail(f"no line starting with {prefix!r} within {LIMIT} s")


def finish(process: subprocess.Popen, before: list[str] = ()) -> subprocess.CompletedProcess:
    try:
        _, rest = process.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("hung after the fault")
    return subprocess.CompletedProcess(process.args, process.returncode, "", "".join(before) + rest)


def ends_with_one_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """A non-zero exit whose stderr (progress lines allowed before it) ends in one error line with each of `words`,
    and holds no traceback, no second error and no warning."""
    assert result.returncode != 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr
    for bad in ("Traceback", "Exception ignored", "Warning", "leaked", "BrokenPipe"):
        assert bad not in result.stderr, result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
    for word in words:
        assert word in lines[-1], (word, result.stderr)
    return lines[-1]


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


# ---------------------------------------------------------------------------------------------------------------------
# Data


def write_shards(out: Path, val_fault: tuple[str, object] | None = None) -> Path:
    """Pattern-image shards (3 classes, 36 train, 12 val images of 72 pixels), as helpers.train.make_shards; with
    `val_fault` ("jpeg", bytes) or ("label", text), the third val sample carries that JPEG or class text. The manifest
    records the damaged shard's real hash: the damage is in what prepare stored, not in the transfer."""
    generator = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, per_class in (("train", 12), ("val", 4)):
        labels = [c for _ in range(per_class) for c in range(3)]
        if split == "train":
            generator.shuffle(labels)
        samples = [Sample(f"{split}_{i:05d}", jpeg(pattern_image(c, 72, generator)), c) for i, c in enumerate(labels)]
        if split == "val" and val_fault:
            kind, value = val_fault
            bad = samples[2]
            samples[2] = Sample(bad.key, value, bad.label) if kind == "jpeg" else Sample(bad.key, bad.jpeg, value)
        infos = [
            write_shard(out / f"{split}-{n:06d}.tar", samples[s : s + 10])
            for n, s in enumerate(range(0, len(samples), 10))
        ]
        splits[split] = SplitInfo(count=len(samples), shards=tuple(infos))
    classes = tuple(ClassInfo(i, f"n{i:08d}", None, f"pattern {i}") for i in range(3))
    write_manifest(out, Manifest(settings={"size": 72, "quality": 90, "seed": 0}, classes=classes, splits=splits))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shards = write_shards(root / "shards")
    return shards, make_stats(shards, root / "stats")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 1-epoch run and an uninterrupted 2-epoch run, both through the command line."""
    runs = {}
    for epochs in (1, 2):
        out = tmp_path_factory.mktemp(f"run{epochs}")
        result = cli("train", *data, out, "--epochs", epochs, "--workers", "2", "--quiet", *TINY)
        assert result.returncode == 0, result.stderr
        runs[epochs] = out
    return runs


def hook(folder: Path, code: str) -> Path:
    """A sitecustomize that every Python process of the run (the loader's workers too) imports at start."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    return folder


# Test hook: each decode in a loader worker takes 50 ms, so that a run lasts long enough to be signalled; the worker
# writes its PID to the file named by ALEXREPRO_TEST_STARTED (written whole, then renamed).
SLOW_DECODE = """
    import multiprocessing, os, time
    from pathlib import Path
    from alexrepro.data import loader

    def _slow(real):
        def decode(data):
            if multiprocessing.parent_process() is not None:
                started = Path(os.environ["ALEXREPRO_TEST_STARTED"])
                if not started.exists():
                    tmp = started.with_name(f"{started.name}.{os.getpid()}")
                    tmp.write_text(str(os.getpid()))
                    os.replace(tmp, started)
                time.sleep(0.05)
            return real(data)
        return decode

    loader.register_decoder("torchvision", _slow(loader.DECODERS["torchvision"]))
"""


# ---------------------------------------------------------------------------------------------------------------------
# Signals from a job scheduler


def test_sigterm_to_the_process_group_writes_a_checkpoint_that_resumes_exactly(data, trained, tmp_path):
    sig = signal.SIGTERM  # what SLURM and Kubernetes send (Ctrl-C's SIGINT takes the same path)
    out = tmp_path / "run"
    process = start("train", *data, out, "--epochs", "40", "--workers", "2", *TINY)
    before = wait_for_line(process, "epoch 1/40 [1/")  # the first step is done
    os.killpg(process.pid, sig)
    result = finish(process, before)
    assert result.returncode == 128 + sig, result.stderr
    ends_with_one_error(result, f"stopped by {sig.name}", "--resume")
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    assert (ckpt["epoch"], ckpt["position"] is not None) == (0, True) or ckpt["epoch"] >= 1
    assert leftovers(out) == []

    # A temporary left by a run killed while saving (its PID gone) is removed when the run is resumed.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".checkpoint-last.pt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    resumed = cli("train", *data, out, "--epochs", "2", "--workers", "2", "--quiet", "--resume", *TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert not stale.exists() and leftovers(out) == []
    a, b = weights(trained[2] / "checkpoint-last.pt"), weights(out / "checkpoint-last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never interrupted


def test_sigterm_to_evaluate_is_one_line_and_writes_no_metrics(data, trained, tmp_path):
    started = tmp_path / "started"
    slow = hook(tmp_path / "hook", SLOW_DECODE)
    out = tmp_path / "report"
    process = start("evaluate", trained[1] / "checkpoint-last.pt", data[0], out, "--workers", "2", hook=slow,
                    started=started)  # fmt: skip
    deadline = time.monotonic() + LIMIT
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    result = finish(process)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    ends_with_one_error(result, "stopped by SIGTERM", "metrics.json")
    assert not (out / "metrics.json").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# A loader worker killed (what the out-of-memory killer does)


def _kill_a_worker(process: subprocess.Popen, started: Path) -> None:
    """SIGKILL the DataLoader worker that SLOW_DECODE reports in `started`, once it decodes."""
    deadline = time.monotonic() + LIMIT
    while not started.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail("no loader worker decoded an image")
        time.sleep(0.02)
    os.kill(int(started.read_text()), signal.SIGKILL)


def test_killed_train_worker_is_one_line_and_keeps_the_checkpoint(data, trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        (out / name).write_bytes((trained[1] / name).read_bytes())
    slow = hook(tmp_path / "hook", SLOW_DECODE)
    process = start("train", *data, out, "--epochs", "40", "--workers", "2", "--resume", "--quiet", *TINY, hook=slow,
                    started=tmp_path / "started")  # fmt: skip
    _kill_a_worker(process, tmp_path / "started")
    result = finish(process)
    assert result.returncode == 1, result.stderr
    ends_with_one_error(result, "loader worker", "checkpoint-last.pt", "--resume")
    assert load_checkpoint(out / "checkpoint-last.pt")["epoch"] >= 1  # intact, whichever epoch it reached
    assert leftovers(out) == []


def test_a_frozen_train_worker_stops_the_run_with_one_line(data, trained, tmp_path):
    """A loader worker that stops making progress (SIGSTOP, a hung disk) must not stall training forever: after
    loader_timeout seconds without a batch the run stops with one line and keeps its checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        (out / name).write_bytes((trained[1] / name).read_bytes())
    slow = hook(tmp_path / "hook", SLOW_DECODE)
    process = start("train", *data, out, "--epochs", "40", "--workers", "2", "--resume", "--quiet", *TINY,
                    "--set", "loader_timeout=5", hook=slow, started=tmp_path / "started")  # fmt: skip
    deadline = time.monotonic() + LIMIT
    while not (tmp_path / "started").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail("no loader worker decoded an image")
        time.sleep(0.02)
    frozen = int((tmp_path / "started").read_text())
    os.kill(frozen, signal.SIGSTOP)
    try:
        result = finish(process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)
    ends_with_one_error(result, "made no progress for 5", "checkpoint-last.pt", "loader_timeout")
    assert load_checkpoint(out / "checkpoint-last.pt")["epoch"] >= 1


def test_killed_evaluate_worker_is_one_line(data, trained, tmp_path):
    slow = hook(tmp_path / "hook", SLOW_DECODE)
    out = tmp_path / "report"
    process = start("evaluate", trained[1] / "checkpoint-last.pt", data[0], out, "--workers", "2", "--quiet",
                    hook=slow, started=tmp_path / "started")  # fmt: skip
    _kill_a_worker(process, tmp_path / "started")
    result = finish(process)
    ends_with_one_error(result, "loader worker", "metrics.json")
    assert not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# A full disk (simulated by a file-size limit, which fails a write the same way)


def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_train_refuses_an_output_that_cannot_take_a_checkpoint_before_the_first_step(data, trained, tmp_path):
    size = (trained[1] / "checkpoint-last.pt").stat().st_size
    out = tmp_path / "run"
    result = cli("train", *data, out, "--epochs", "1", "--workers", "0", *TINY, preexec_fn=_file_size_limit(size // 3))
    ends_with_one_error(result, str(out), "cannot write", "EFBIG")
    assert "epoch 1/1 [" not in result.stderr  # not one step was taken
    assert not (out / "checkpoint-last.pt").exists() and leftovers(tmp_path) == []


# Test hook: the start-up check sees room (as when another process fills the disk later, during training).
NO_START_CHECK = """
    import alexrepro.train.loop
    alexrepro.train.loop.check_room = lambda *args, **kwargs: None
"""


def test_disk_full_while_saving_is_one_line_and_keeps_the_last_good_checkpoint(data, trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        (out / name).write_bytes((trained[1] / name).read_bytes())
    good = (out / "checkpoint-last.pt").read_bytes()
    size = len(good)
    unchecked = hook(tmp_path / "hook", NO_START_CHECK)
    result = cli("train", *data, out, "--epochs", "2", "--workers", "0", "--quiet", "--resume", *TINY, hook=unchecked,
                 preexec_fn=_file_size_limit(size // 3))  # fmt: skip
    line = ends_with_one_error(
        result, "checkpoint-last.pt", "cannot write", "EFBIG", "last good checkpoint", "--resume"
    )
    assert "unexpected pos" not in line
    assert (out / "checkpoint-last.pt").read_bytes() == good
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------------------------
# Bad checkpoints


def _damaged_checkpoint(source: Path, target: Path, damage: str) -> Path:
    ckpt = torch.load(source, weights_only=True)
    if damage == "weights":  # weights of another network than its model_config describes
        ckpt["model"]["fc8.weight"] = torch.zeros(5, *ckpt["model"]["fc8.weight"].shape[1:])
    elif damage == "config":
        ckpt["model_config"]["width"] = 0.25
    else:
        del ckpt["normalization"]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, target)
    return target


@pytest.mark.parametrize(
    "damage,command",
    # train rebuilds the network from its own settings, so there the weights are what must fit
    [("weights", "train --resume"), ("config", "evaluate"), ("no normalization", "predict")],
)
def test_checkpoint_that_does_not_fit_is_one_line(data, trained, tmp_path, damage, command):
    out = tmp_path / "run"
    path = _damaged_checkpoint(trained[1] / "checkpoint-last.pt", out / "checkpoint-last.pt", damage)
    if command == "evaluate":
        result = cli("evaluate", path, data[0], tmp_path / "report", "--workers", "0", "--quiet")
    elif command == "predict":
        image = tmp_path / "cat.jpg"
        image.write_bytes(fx.image_bytes(1))
        result = cli("predict", path, image, "--devices", "cpu")
    else:
        result = cli("train", *data, out, "--epochs", "2", "--workers", "0", "--quiet", "--resume", *TINY)
    words = {"weights": ["do not fit", "fc8.weight"], "config": ["do not fit"], "no normalization": ["'normalization'"]}
    ends_with_one_error(result, str(path), *words[damage])


# ---------------------------------------------------------------------------------------------------------------------
# Bad samples inside a shard (stored so by a faulty prepare or tool; the shard's hash matches its manifest)


@pytest.mark.parametrize(
    "fault,command", [(("jpeg", b"\xff\xd8 not a JPEG after all"), "train"), (("label", "seven"), "evaluate")]
)
def test_bad_sample_in_a_shard_names_the_shard_and_the_key(data, trained, tmp_path, fault, command):
    shards = write_shards(tmp_path / "shards", val_fault=fault)
    if command == "train":  # met in the validation after the first epoch
        stats = make_stats(shards, tmp_path / "stats")  # of the train split, which is sound
        result = cli("train", shards, stats, tmp_path / "run", "--epochs", "1", "--workers", "2", "--quiet", *TINY)
    else:
        result = cli("evaluate", trained[1] / "checkpoint-last.pt", shards, tmp_path / "report", "--workers", "2",
                     "--quiet")  # fmt: skip
    ends_with_one_error(result, str(shards / "val-000000.tar"), "val_00002", "rerun `alexrepro prepare`")


# Test hook: a loader worker runs out of memory on its first image.
NO_MEMORY = """
    import multiprocessing
    from alexrepro.data import loader

    def _no_memory(real):
        def decode(data):
            if multiprocessing.parent_process() is not None:
                raise MemoryError()
            return real(data)
        return decode

    loader.register_decoder("torchvision", _no_memory(loader.DECODERS["torchvision"]))
"""


def test_memory_error_is_one_line_suggesting_fewer_workers(data, tmp_path):
    short = hook(tmp_path / "hook", NO_MEMORY)
    result = cli("train", *data, tmp_path / "run", "--epochs", "1", "--workers", "2", "--quiet", *TINY, hook=short)
    ends_with_one_error(result, "out of memory", "--workers", "--batch-size")


# ---------------------------------------------------------------------------------------------------------------------
# The official layout is three archives


@pytest.mark.parametrize("missing", ["ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"])
def test_official_layout_without_val_or_devkit_is_one_line(tmp_path, missing):
    source = fx.write_archives(tmp_path / "download", fx.tiny_set(train_per_class=2, val_images=2))
    (source / missing).unlink()
    result = cli("prepare", source, tmp_path / "shards", "--size", "32", "--quiet")
    ends_with_one_error(result, missing, "missing")
    assert not (tmp_path / "shards").exists()


def test_sigterm_to_prepare_with_workers_is_one_line_and_the_rerun_finishes(tmp_path):
    source = fx.write_archives(tmp_path / "download", fx.tiny_set(train_per_class=60, val_images=12))
    out = tmp_path / "shards"
    args = ["prepare", source, out, "--size", "32", "--shard-size", "2", "--workers", "2"]
    process = start(*args)
    before = wait_for_line(process, "resizing into shards [")  # the pool is at work
    os.killpg(process.pid, signal.SIGTERM)
    result = finish(process, before)  # also waits for the pool's processes: none may linger
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    ends_with_one_error(result, "stopped by SIGTERM")  # and no "leaked semaphore" warning, no BrokenPipe
    rerun = cli(*args, "--quiet")
    assert rerun.returncode == 0, rerun.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The run folder's files agree after any crash

KILL_AT_BEST = """
    import os, signal
    from pathlib import Path
    from alexrepro.model import checkpoint

    def _killing(real):
        def opened(path, *args, **kwargs):
            if Path(path).name == "checkpoint-best.pt":  # a power cut as the best checkpoint is being written
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, *args, **kwargs)
        return opened

    checkpoint.atomic_open = _killing(checkpoint.atomic_open)
"""


def test_a_kill_while_the_best_checkpoint_is_written_is_completed_by_resume(data, tmp_path):
    """kill -9 as checkpoint-best.pt of the last epoch is written: checkpoint-last.pt says the epoch is done, the best
    checkpoint, history and metrics do not. --resume must complete them, not report "1 of 1 epochs done"."""
    out = tmp_path / "run"
    killed = cli("train", *data, out, "--epochs", "1", "--workers", "0", "--quiet", *TINY,
                 hook=hook(tmp_path / "hook", KILL_AT_BEST))  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "checkpoint-last.pt").is_file() and not (out / "checkpoint-best.pt").exists()
    resumed = cli("train", *data, out, "--epochs", "1", "--workers", "0", "--resume", *TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert "completed the end of epoch 1" in resumed.stderr, resumed.stderr
    assert (out / "checkpoint-best.pt").read_bytes() == (out / "checkpoint-last.pt").read_bytes()
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    assert json.loads((out / "last_epoch.json").read_text())["val_top1_error"] == history[0]["val_top1_error"]


def test_a_fresh_run_refuses_a_folder_holding_a_best_checkpoint(data, tmp_path):
    """A folder with checkpoint-best.pt but no checkpoint-last.pt (a user kept the best only) is not overwritten."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-best.pt").write_bytes(b"a best checkpoint kept from an earlier run")
    result = cli("train", *data, out, "--epochs", "1", "--workers", "0", "--quiet", *TINY)
    ends_with_one_error(result, str(out), "checkpoint-best.pt", "another folder")
    assert (out / "checkpoint-best.pt").read_bytes() == b"a best checkpoint kept from an earlier run"


def test_statistics_with_nan_are_refused_before_training(data, tmp_path):
    shards, stats = data
    broken = tmp_path / "stats"
    shutil.copytree(stats, broken)
    with np.load(broken / "stats.npz") as npz:
        arrays = dict(npz)
    arrays["eigval"] = arrays["eigval"].copy()
    arrays["eigval"][0] = np.nan
    np.savez(broken / "stats.npz", **arrays)
    result = cli("train", shards, broken, tmp_path / "run", "--epochs", "1", "--workers", "0", "--quiet", *TINY)
    ends_with_one_error(result, "stats.npz", "eigval", "NaN", "alexrepro stats")
    assert not (tmp_path / "run" / "checkpoint-last.pt").exists()


UNREADABLE_CHECKPOINT = """
    import errno
    from alexrepro.model import checkpoint

    def _unreadable(real):
        def load(path, *args, **kwargs):
            if str(path).endswith("checkpoint-last.pt"):  # what a chmod 000 file gives a user who is not root
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return load

    checkpoint.torch.load = _unreadable(checkpoint.torch.load)
"""


def test_resume_from_an_unreadable_checkpoint_says_it_cannot_be_read(trained, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[1], out)
    result = cli("train", *data, out, "--epochs", "2", "--workers", "0", "--resume", "--quiet", *TINY,
                 hook=hook(tmp_path / "hook", UNREADABLE_CHECKPOINT))  # fmt: skip
    line = ends_with_one_error(result, "checkpoint-last.pt", "cannot read", "EACCES", "permissions")
    assert "cannot write" not in line


def test_a_run_folder_hashes_each_shard_once(trained, data):
    """The record of checked shards keeps both splits, so a resume (or a later evaluate into the same folder) hashes
    nothing again: "once per run folder", as the README says."""
    shards, _ = data
    record = json.loads((trained[1] / ".verified-shards.json").read_text())["shards"]
    names = {Path(path).name for path in record}
    assert {p.name for p in shards.glob("train-*.tar")} <= names and {p.name for p in shards.glob("val-*.tar")} <= names


def test_a_refused_fresh_run_hashes_nothing(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.json").write_text("[]\n")
    result = cli("train", *data, out, "--epochs", "1", "--workers", "0", "--quiet", *TINY)
    ends_with_one_error(result, "history.json", "another folder")
    assert not (out / ".verified-shards.json").exists()  # refused before the shards were hashed
