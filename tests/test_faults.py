"""Nothing lost silently: each fault is injected and the real command line must either recover or fail with one line.

Every run is a subprocess of `python -m alexrepro` with a time limit, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from alexrepro.core.locking import LOCK_NAME
from alexrepro.data.shards.manifest import MANIFEST_NAME
from helpers import fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
TINY = ["--size", "32", "--shard-size", "4", "--quiet"]


def cli(*args, env: dict | None = None, timeout: float = 120, preexec_fn=None) -> subprocess.CompletedProcess:
    """`alexrepro ARGS` in a fresh interpreter with this checkout first on the path; fails the test if it hangs."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    environ.pop("ALEXREPRO_TRACEBACK", None)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "alexrepro", *map(str, args)],
        capture_output=True, text=True, env=environ, timeout=timeout, preexec_fn=preexec_fn,
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Assert a non-zero exit with a single error line (no traceback) that contains each of `words`."""
    assert result.returncode != 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    text = " ".join(lines)  # Rich may wrap one message over several terminal lines
    assert text.startswith("error:"), result.stderr
    for word in words:
        assert word in text, (word, result.stderr)
    return text


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


def shard_bytes(out: Path) -> dict[str, bytes]:
    shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    return shards | {"manifest": (out / MANIFEST_NAME).read_bytes()}


@pytest.fixture(scope="module")
def tiny():
    return fx.tiny_set(train_per_class=3, val_images=4)


@pytest.fixture
def archives(tmp_path, tiny):
    return fx.write_archives(tmp_path / "download", tiny)


# ---------------------------------------------------------------------------------------------------------------------
# Damaged archives


def _member_offsets(path: Path) -> list[int]:
    """Byte offset of each member's header in the tar at `path`."""
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def _inner_member_offsets(path: Path, inner_index: int) -> tuple[int, list[int]]:
    with tarfile.open(path) as tar:
        inner = tar.getmembers()[inner_index]
        with tarfile.open(fileobj=tar.extractfile(inner)) as inner_tar:
            return inner.offset_data, [m.offset for m in inner_tar.getmembers()]


def _corrupt_header(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset + 148 : offset + 156] = b"garbage!"  # the header checksum field
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


@pytest.mark.parametrize(
    "archive,damage",
    [
        (TRAIN_TAR, "header"),  # a class tar's header in the outer train tar
        (TRAIN_TAR, "cut"),  # the outer train tar cut at a member boundary: whole classes gone
        (TRAIN_TAR, "inner header"),  # an image header inside a class tar
        (TRAIN_TAR, "inner cut"),  # a class tar ends early at an image boundary (its size shrunk to match)
        (VAL_TAR, "header"),
        (VAL_TAR, "cut"),
    ],
)
def test_damaged_tar_is_one_line_naming_the_archive(tmp_path, archives, archive, damage):
    path = archives / archive
    if damage == "header":
        _corrupt_header(path, _member_offsets(path)[1])
    elif damage == "cut":
        _truncate(path, _member_offsets(path)[1])
    elif damage == "inner header":
        start, offsets = _inner_member_offsets(path, 0)
        _corrupt_header(path, start + offsets[1])
    else:  # rebuild the first class tar without its end marker and later members, as a cut download would leave it
        start, offsets = _inner_member_offsets(path, 0)
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            inner_bytes = {m.name: tar.extractfile(m).read() for m in members}
        first = members[0].name
        inner_bytes[first] = inner_bytes[first][: offsets[1]]
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for m in members:
                info = tarfile.TarInfo(m.name)
                info.size, info.mtime = len(inner_bytes[m.name]), m.mtime
                tar.addfile(info, io.BytesIO(inner_bytes[m.name]))
    result = cli("prepare", archives, tmp_path / "shards", *TINY, "--workers", "1")
    one_line_error(result, archive, "download it again")
    assert not (tmp_path / "shards" / MANIFEST_NAME).exists()


def test_devkit_class_without_training_images_is_an_error(tmp_path, tiny):
    missing = tiny.classes[1][0]
    partial = dataclasses.replace(tiny, train={w: images for w, images in tiny.train.items() if w != missing})
    source = fx.write_archives(tmp_path / "download", partial)
    one_line_error(cli("prepare", source, tmp_path / "shards", *TINY), "no training images", missing)


@pytest.mark.parametrize("extra", [1, -1])
def test_ground_truth_must_have_one_line_per_val_image(tmp_path, tiny, extra):
    source = fx.write_archives(tmp_path / "download", tiny)
    ids = tiny.val_ids + [tiny.val_ids[0]] if extra > 0 else tiny.val_ids[:-1]
    fx.write_devkit_archive(source, tiny.classes, ids)
    one_line_error(cli("prepare", source, tmp_path / "shards", *TINY), VAL_TAR, "ground_truth.txt", "lines")


def test_symlink_member_of_an_archive_is_rejected_not_dropped(tmp_path, tiny):
    source = fx.write_archives(tmp_path / "download", tiny)
    with tarfile.open(source / VAL_TAR, "a") as tar:  # a fifth val image, as a symlink
        link = tarfile.TarInfo("ILSVRC2012_val_00000005.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    fx.write_devkit_archive(source, tiny.classes, tiny.val_ids + [tiny.val_ids[0]])
    result = cli("prepare", source, tmp_path / "shards", *TINY)
    assert result.returncode == 0, result.stderr
    rejected = manifest(tmp_path / "shards")["rejected"]
    assert [(r["split"], r["path"]) for r in rejected] == [("val", f"{VAL_TAR}/ILSVRC2012_val_00000005.JPEG")]
    assert "symbolic link" in rejected[0]["reason"]


# ---------------------------------------------------------------------------------------------------------------------
# Dead workers


KILLER = """
    # Test hook: every pool worker (a process with a parent) dies by SIGKILL on its first image, as under the
    # out-of-memory killer. Loaded as sitecustomize, so it patches the module before any worker imports it.
    import multiprocessing, os, signal
    from alexrepro.data import imaging

    def _dying(real):
        def call(*args, **kwargs):
            if multiprocessing.parent_process() is not None:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    imaging.resize_square_jpeg = _dying(imaging.resize_square_jpeg)
    imaging.decode_rgb_planes = _dying(imaging.decode_rgb_planes)
"""


@pytest.fixture
def killer(tmp_path) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(KILLER))
    return {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])}


def test_prepare_fails_when_a_worker_dies_and_the_rerun_resumes(tmp_path, archives, killer):
    reference = tmp_path / "reference"
    assert cli("prepare", archives, reference, *TINY, "--workers", "1").returncode == 0
    out = tmp_path / "shards"
    one_line_error(cli("prepare", archives, out, *TINY, "--workers", "2", env=killer, timeout=180), "worker", "rerun")
    assert not (out / MANIFEST_NAME).exists()
    resumed = cli("prepare", archives, out, *TINY, "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert shard_bytes(out) == shard_bytes(reference)
    assert not (out / LOCK_NAME).exists()


def test_stats_fails_when_a_worker_dies(tmp_path, archives, killer):
    shards = tmp_path / "shards"
    assert cli("prepare", archives, shards, *TINY, "--workers", "1").returncode == 0
    out = tmp_path / "stats"
    one_line_error(cli("stats", shards, out, "--workers", "2", "--quiet", env=killer, timeout=180), "worker")
    assert not out.exists()
    assert cli("stats", shards, out, "--workers", "2", "--quiet").returncode == 0


# ---------------------------------------------------------------------------------------------------------------------
# One run per output folder


HOLDER = """
import sys
from alexrepro.core.locking import output_lock
with output_lock(sys.argv[1], "test"):
    print("held", flush=True)
    sys.stdin.read()
"""


class _Holder:
    """Another process holding the output lock until closed (a concurrent run of any stage)."""

    def __init__(self, folder: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert self.process.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.process.communicate(timeout=60)
        assert self.process.returncode == 0


def test_second_prepare_into_a_busy_folder_is_refused(tmp_path, archives):
    out = tmp_path / "shards"
    holder = _Holder(out)
    try:
        one_line_error(cli("prepare", archives, out, *TINY, "--overwrite"), str(out), "another run")
        assert not (out / MANIFEST_NAME).exists()
    finally:
        holder.release()
    assert not (out / LOCK_NAME).exists()
    assert cli("prepare", archives, out, *TINY).returncode == 0
    assert not (out / LOCK_NAME).exists()  # DVC and the byte-identical listings never see it


@pytest.mark.parametrize("stage", ["sample", "stats", "train", "evaluate"])
def test_every_stage_refuses_a_busy_output_folder(tmp_path, stage):
    out = tmp_path / "out"
    args = {
        "sample": ["sample", out, "--classes", "2"],
        "stats": ["stats", tmp_path / "shards", out],
        "train": ["train", tmp_path / "shards", tmp_path / "stats", out],
        "evaluate": ["evaluate", tmp_path / "ckpt.pt", tmp_path / "shards", out],
    }[stage]
    for name in ("shards", "stats"):  # the inputs exist (a missing one is refused before any lock, exit 2)
        (tmp_path / name).mkdir()
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    holder = _Holder(out)
    try:
        one_line_error(cli(*args, "--quiet"), str(out), "another run")
    finally:
        holder.release()


def test_lock_left_by_a_killed_run_is_stale(tmp_path, archives):
    out = tmp_path / "shards"
    out.mkdir()
    (out / LOCK_NAME).write_text("prepare pid 999999\n")  # what kill -9 leaves: the file, but no flock on it
    result = cli("prepare", archives, out, *TINY)
    assert result.returncode == 0, result.stderr
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt JPEGs


def _jpeg(seed: int, width: int = 64, height: int = 48) -> bytes:
    return fx.image_bytes(seed, width, height)


def _cut_with_eoi(data: bytes) -> bytes:
    """Cut in the middle of the scan and closed with an end-of-image marker: libjpeg's 'premature end'."""
    return data[: len(data) // 2] + b"\xff\xd9"


def _taller_header(data: bytes, extra_rows: int = 64) -> bytes:
    """The frame header claims more rows than the scan holds (well beyond the last MCU row)."""
    sof = data.find(b"\xff\xc0")
    height = struct.unpack(">H", data[sof + 5 : sof + 7])[0]
    return data[: sof + 5] + struct.pack(">H", height + extra_rows) + data[sof + 7 :]


def test_corrupt_jpegs_are_rejected_not_stored_grey(tmp_path):
    source = fx.write_own_classes(tmp_path / "src")
    (source / "train" / "apple" / "cut.jpg").write_bytes(_cut_with_eoi(_jpeg(7)))
    (source / "train" / "zebra" / "tall.jpg").write_bytes(_taller_header(_jpeg(8)))
    grey = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(grey, format="JPEG")  # flat grey, but whole: kept
    (source / "train" / "Mango" / "grey.jpg").write_bytes(grey.getvalue())
    result = cli("prepare", source, tmp_path / "shards", *TINY)
    assert result.returncode == 0, result.stderr
    data = manifest(tmp_path / "shards")
    rejected = {r["path"]: r["reason"] for r in data["rejected"]}
    assert set(rejected) == {"train/apple/cut.jpg", "train/zebra/tall.jpg"}
    assert all("premature end" in reason or "truncated" in reason for reason in rejected.values())
    assert data["splits"]["train"]["count"] == 10  # 3 per class + the grey one


# ---------------------------------------------------------------------------------------------------------------------
# Resource limits


def test_size_beyond_the_pixel_limit_is_a_config_error(tmp_path, archives):
    one_line_error(cli("prepare", archives, tmp_path / "shards", "--size", "100000", "--quiet"), "--size", "4096")
    assert not (tmp_path / "shards").exists()


def _file_size_limit(limit: int):
    """A preexec_fn: files may not grow past `limit` bytes (EFBIG, as a full disk gives ENOSPC)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or p.name == LOCK_NAME)


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_manifest(tmp_path, archives):
    out = tmp_path / "shards"
    result = cli("prepare", archives, out, *TINY, "--workers", "2", preexec_fn=_file_size_limit(3000))
    one_line_error(result, "cannot write", "EFBIG")
    assert not (out / MANIFEST_NAME).exists()
    assert _leftovers(out) == []


def test_stats_on_a_full_disk_is_one_line_and_leaves_nothing_partial(tmp_path, archives):
    shards = tmp_path / "shards"
    assert cli("prepare", archives, shards, *TINY).returncode == 0
    out = tmp_path / "stats"
    one_line_error(cli("stats", shards, out, "--quiet", preexec_fn=_file_size_limit(8000)), "cannot write", "EFBIG")
    assert not out.exists()


def test_sample_on_a_full_disk_is_one_line_and_leaves_no_archive(tmp_path):
    out = tmp_path / "sample"
    args = ["sample", out, "--classes", "2", "--train-per-class", "2", "--val-per-class", "1", "--quiet"]
    result = cli(*args, "--set", "image_scale=0.25", "--set", "workers=1", preexec_fn=_file_size_limit(20_000))
    one_line_error(result, str(out))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Symlinks in folder sources


def test_dangling_and_looping_symlinks_are_one_line(tmp_path):
    source = fx.write_own_classes(tmp_path / "src")
    (source / "train" / "apple" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    one_line_error(cli("prepare", source, tmp_path / "a", *TINY), "gone.jpg", "dangling")
    (source / "train" / "apple" / "gone.jpg").unlink()
    (source / "train" / "apple" / "again").symlink_to(source / "train")
    one_line_error(cli("prepare", source, tmp_path / "b", *TINY), "again", "loop")


def test_symlinks_out_of_the_source_need_the_flag(tmp_path):
    source = fx.write_own_classes(tmp_path / "src")
    (tmp_path / "elsewhere.jpg").write_bytes(_jpeg(9))
    (source / "train" / "apple" / "linked.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    one_line_error(cli("prepare", source, tmp_path / "a", *TINY), "linked.jpg", "follow_symlinks")
    result = cli("prepare", source, tmp_path / "b", *TINY, "--set", "follow_symlinks=true")
    assert result.returncode == 0, result.stderr
    assert manifest(tmp_path / "b")["splits"]["train"]["count"] == 10


# ---------------------------------------------------------------------------------------------------------------------
# The sample does not replace the real download


def test_sample_refuses_to_replace_official_archives(tmp_path):
    out = tmp_path / "download"
    out.mkdir()
    (out / TRAIN_TAR).write_bytes(b"138 GB of the real thing")
    args = ["sample", out, "--classes", "2", "--train-per-class", "2", "--val-per-class", "1", "--quiet"]
    args += ["--set", "image_scale=0.25", "--set", "workers=1"]
    one_line_error(cli(*args), TRAIN_TAR, "--overwrite")
    assert (out / TRAIN_TAR).read_bytes() == b"138 GB of the real thing"
    result = cli(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert tarfile.is_tarfile(out / TRAIN_TAR)


def test_evaluate_on_a_full_disk_is_one_line_and_writes_no_metrics(tmp_path):
    from helpers.evaluate import save_tiny_checkpoint, tiny_checkpoint, write_tiny_shards

    write_tiny_shards(tmp_path / "shards")
    checkpoint = save_tiny_checkpoint(tmp_path / "c.pt", tiny_checkpoint(tmp_path / "shards"))
    out = tmp_path / "reports"
    # in-process reading (--workers 0): the limit would also stop loader workers from making shared memory
    args = ("evaluate", checkpoint, tmp_path / "shards", out, "--workers", "0", "--quiet")
    one_line_error(cli(*args, preexec_fn=_file_size_limit(4000)), str(out), "cannot write", "EFBIG", "rerun")
    assert not (out / "metrics.json").exists()
    assert not out.exists() or _leftovers(out) == []


def test_a_worker_without_shared_memory_is_one_line_saying_what_to_change(tmp_path):
    # A file-size limit below one batch stops a loader worker from making its shared memory, as a full or small
    # /dev/shm (a container's 64 MB default) does.
    from helpers.evaluate import save_tiny_checkpoint, tiny_checkpoint, write_tiny_shards

    write_tiny_shards(tmp_path / "shards")
    checkpoint = save_tiny_checkpoint(tmp_path / "c.pt", tiny_checkpoint(tmp_path / "shards"))
    out = tmp_path / "reports"
    args = ("evaluate", checkpoint, tmp_path / "shards", out, "--workers", "1", "--quiet")
    result = cli(*args, preexec_fn=_file_size_limit(4000))
    one_line_error(result, "loader worker could not get", "shared memory", "--shm-size", "--workers 0")
    assert not (out / "metrics.json").exists()


def test_rejected_files_are_named_on_the_console_with_where_the_list_is(tmp_path):
    """`1 rejected` alone sends the user looking: the console names the file, says it is cut short (not Pillow's
    "45 bytes not processed") and points at the manifest's full list."""
    source = fx.write_own_classes(tmp_path / "src")
    whole = _jpeg(3)
    (source / "train" / "apple" / "half.jpg").write_bytes(whole[: len(whole) // 2])  # no EOI: cut mid-scan
    result = cli("prepare", source, tmp_path / "shards", *TINY)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "rejected" in line]
    named = next(line for line in lines if "train/apple/half.jpg" in line)
    assert "cut short" in named and "bytes not processed" not in named, named
    assert any(str(tmp_path / "shards" / "manifest.json") in line for line in lines), lines


def test_a_failed_evaluate_leaves_the_earlier_evaluation_whole(tmp_path):
    """A second evaluation into a used folder that fails part-way (a full disk) must not mix two runs' outputs: the
    earlier set stays as it was, every file of it, and no staging folder is left."""
    from helpers.evaluate import save_tiny_checkpoint, tiny_checkpoint, write_tiny_shards

    write_tiny_shards(tmp_path / "shards")
    first = save_tiny_checkpoint(tmp_path / "first.pt", tiny_checkpoint(tmp_path / "shards", seed=1))
    second = save_tiny_checkpoint(tmp_path / "second.pt", tiny_checkpoint(tmp_path / "shards", seed=2))
    out = tmp_path / "reports"
    args = (tmp_path / "shards", out, "--workers", "0", "--quiet")
    assert cli("evaluate", first, *args).returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_line_error(cli("evaluate", second, *args, preexec_fn=_file_size_limit(4000)), "cannot write", "EFBIG")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the first evaluation's outputs, all of them, unchanged
    assert json.loads((out / "evaluation.json").read_text())["checkpoint"]["path"].endswith("first.pt")
    assert _leftovers(out) == [] and not list(out.glob(".evaluate-staging-*"))


def test_sample_replaces_its_own_interrupted_output_and_removes_stale_temporaries(tmp_path):
    """A sample killed after its train archive (kill -9) left that archive, its marker and a temporary: the same
    command reruns without --overwrite; a folder of archives without the marker (a real download) is still refused."""
    args = ["--classes", "2", "--train-per-class", "2", "--val-per-class", "1", "--set", "image_scale=0.25",
            "--workers", "1", "--quiet"]  # fmt: skip
    out = tmp_path / "sample"
    assert cli("sample", out, *args).returncode == 0
    (out / "ILSVRC2012_img_val.tar").unlink()
    (out / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    stale = out / ".ILSVRC2012_img_val.tar.tmp-999999"  # what atomic_open leaves when its process is killed
    stale.write_bytes(b"half an archive")
    result = cli("sample", out, *args)
    assert result.returncode == 0, result.stderr
    assert (out / "ILSVRC2012_img_val.tar").is_file() and not stale.exists()
    download = tmp_path / "download"
    download.mkdir()
    (download / "ILSVRC2012_img_train.tar").write_bytes(b"138 GB, they said")
    one_line_error(cli("sample", download, *args), "already holds", "--overwrite")
    assert (download / "ILSVRC2012_img_train.tar").read_bytes() == b"138 GB, they said"


# ---------------------------------------------------------------------------------------------------------------------
# Names and text that are not what they claim


def test_a_file_name_that_is_not_utf8_is_one_line_and_nothing_is_written(tmp_path):
    source = fx.write_own_classes(tmp_path / "src")
    os.rename(source / "train" / "apple" / "apple-0.jpg", os.fsencode(source / "train" / "apple") + b"/pomme-\xe9.jpg")
    out = tmp_path / "shards"
    line = one_line_error(cli("prepare", source, out, *TINY), "not valid UTF-8", "rename")
    assert "pomme-\\xe9.jpg" in line, line
    assert not out.exists() or not list(out.glob("*.tar"))


def test_a_file_stem_too_long_for_a_tar_header_gets_a_key_that_fits(tmp_path):
    """USTAR's name field holds 100 bytes: a 150-byte stem is given a key of 95 bytes at listing (its head and a
    digest), not found when a worker writes its shard."""
    source = fx.write_own_classes(tmp_path / "src")
    long_stem = "a-photograph-with-a-very-long-name-" * 4 + "x" * 10
    os.rename(source / "train" / "apple" / "apple-0.jpg", source / "train" / "apple" / f"{long_stem}.jpg")
    out = tmp_path / "shards"
    result = cli("prepare", source, out, *TINY)
    assert result.returncode == 0, result.stderr
    with tarfile.open(next(out.glob("train-*.tar"))) as tar:
        names = [member.name for member in tar]
    for other in out.glob("train-*.tar"):
        with tarfile.open(other) as tar:
            names += [member.name for member in tar]
    long_keys = [name for name in names if name.startswith("a-photograph")]
    assert len(long_keys) == 2 and all(len(name.encode()) <= 99 for name in long_keys), long_keys


def test_a_config_file_with_a_latin1_byte_is_one_line(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_bytes(b"epochs: 2  # caf\xe9\n")
    result = cli("train", tmp_path, tmp_path, tmp_path / "out", "--config", config)
    assert result.returncode == 2, result.stderr
    one_line_error(result, str(config), "not UTF-8", "0xe9", "save the file as UTF-8")


def test_a_manifest_with_a_byte_that_is_not_utf8_is_one_line(tmp_path):
    from helpers.evaluate import write_tiny_shards

    write_tiny_shards(tmp_path / "shards")
    manifest = tmp_path / "shards" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"format"', b'"form\xffat"', 1))
    one_line_error(cli("stats", tmp_path / "shards", tmp_path / "stats", "--quiet"), str(manifest), "not UTF-8",
                   "alexrepro prepare")  # fmt: skip


def test_bit_rot_in_a_finished_shard_gives_the_command_that_repairs_it(tmp_path, archives):
    """A byte flipped in a shard with its size and mtime kept: the consumer's message names the prepare command that
    re-hashes and rewrites it (a plain rerun trusts size and mtime, and the user would go round in a loop)."""
    shards = tmp_path / "shards"
    assert cli("prepare", archives, shards, *TINY).returncode == 0
    shard = sorted(shards.glob("train-*.tar"))[0]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first JPEG
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    line = one_line_error(cli("stats", shards, tmp_path / "stats", "--quiet"), shard.name, "verify_finished=true")
    command = line[line.index("`") + 1 : line.rindex("`")].split()
    assert command[:2] == ["alexrepro", "prepare"] and command[2] == "SOURCE"
    repaired = cli("prepare", archives, *command[3:], *TINY)
    assert repaired.returncode == 0, repaired.stderr
    assert cli("stats", shards, tmp_path / "stats", "--quiet").returncode == 0


# ---------------------------------------------------------------------------------------------------------------------
# Files the user may not read (EACCES). The tests run as root, who reads everything, so a start-up hook makes the
# named paths refuse as a file of mode 000 does for anyone else.

UNREADABLE = """
    import builtins, errno, io, os

    _refused = os.environ["ALEXREPRO_TEST_UNREADABLE"]
    _open, _scandir, _os_open = builtins.open, os.scandir, os.open

    def _check(path):
        if str(path).endswith(_refused):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    def open(file, *args, **kwargs):
        _check(file)
        return _open(file, *args, **kwargs)

    def scandir(path=".", *args, **kwargs):
        _check(path)
        return _scandir(path, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        _check(path)
        return _os_open(path, *args, **kwargs)

    builtins.open = io.open = open  # pathlib reads through io.open
    os.scandir, os.open = scandir, os_open
"""


def _unreadable(tmp_path: Path, ending: str) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(UNREADABLE))
    return {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "ALEXREPRO_TEST_UNREADABLE": ending}


@pytest.mark.parametrize("archive", ["ILSVRC2012_img_val.tar", "ILSVRC2012_img_train.tar"])
def test_an_unreadable_archive_is_one_line(tmp_path, archives, archive):
    out = tmp_path / "shards"
    result = cli("prepare", archives, out, *TINY, env=_unreadable(tmp_path, archive))
    one_line_error(result, archive, "cannot read", "EACCES", "permissions")
    assert not (out / MANIFEST_NAME).exists()


def test_an_unreadable_class_folder_is_one_line(tmp_path):
    source = fx.write_own_classes(tmp_path / "src")
    result = cli("prepare", source, tmp_path / "shards", *TINY, env=_unreadable(tmp_path, "train/apple"))
    one_line_error(result, "train/apple", "cannot read", "EACCES", "permissions")


def test_an_unreadable_shard_is_one_line(tmp_path, archives):
    shards = tmp_path / "shards"
    assert cli("prepare", archives, shards, *TINY).returncode == 0
    result = cli("stats", shards, tmp_path / "stats", "--quiet", env=_unreadable(tmp_path, "train-000000.tar"))
    one_line_error(result, "train-000000.tar", "permissions")
