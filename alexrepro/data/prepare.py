"""`alexrepro prepare SOURCE OUT`: resize every image to 256×256 and pack them into webdataset shards.

The stage runs in three steps:

1. Plan. `sources.registry.find_source` lists the labelled images (archives are indexed in place, never unpacked). The train
   set is shuffled once with a seeded generator, so that every shard mixes classes, and cut into shards of
   `shard_size`; val keeps file-name order. The plan fixes which image lands in which shard before any pixel is
   touched, so the output cannot depend on how many workers run or in what order they finish.
2. Shards. Each shard is one task for a pool of worker processes. A worker opens the source file itself, reads each
   image with one seek and one read, resizes and re-encodes it (`imaging.resize_square_jpeg`), and writes the shard
   atomically (temp file + rename), then a small record of its count, sha256 and rejected files.
3. Index and manifest. Each split's member index (where every sample's bytes lie, recorded by the workers as they
   wrote) goes into `<split>-index.npy`; counts, sizes, hashes, classes and the rejected list into `manifest.json`.
   If more images were rejected than `max_rejected` allows, the stage fails after writing the manifest (so the list
   can be read) marked with the failure, which every downstream reader refuses.

Resuming: `OUT/.prepare/plan.json` records the settings and a hash of the plan. A rerun with the same settings and
inputs keeps every shard whose record still matches it (size and mtime as written; sha256 with `verify_finished`)
and redoes the rest, so an interrupted run (even by `kill -9`) ends byte-identical to an uninterrupted one. The
archive listing is kept there too (`sources.listing.save_listings`), so a rerun does not read every header of the archives
again unless they changed. A rerun with other settings raises OutputExistsError unless
`overwrite` is set. `manifest.json` exists only while every shard it names is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import BinaryIO

from alexrepro.core.atomic import atomic_write_text
from alexrepro.core.errors import OutputExistsError, TooManyRejectedError
from alexrepro.core.files import sha256_file
from alexrepro.core.locking import LOCK_NAME, output_lock, reported_write_errors
from alexrepro.core.progress import NullProgress, Progress
from alexrepro.core.workers import map_unordered, worker_count
from alexrepro.data import imaging
from alexrepro.data.config import PrepareConfig
from alexrepro.data.shards.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    RejectedFile,
    Sample,
    ShardInfo,
    SplitInfo,
    shard_name,
)
from alexrepro.data.shards.writer import scan_members, write_manifest, write_shard
from alexrepro.data.sources.base import ImageRef, Source, fingerprint
from alexrepro.data.sources.listing import save_listings
from alexrepro.data.sources.registry import find_source

STATE_DIR = ".prepare"  # resume bookkeeping inside OUT: plan.json and one record per finished shard
PLAN_FORMAT = "alexrepro-prepare-plan"
PLAN_VERSION = 1


_SHARD_FILE = re.compile(r"(train|val)-(\d{6}\.tar|index\.npy)")  # shards and their member indexes
_LISTING_FILE = re.compile(r"listing-.+\.npz")  # sources.listing.save_listings
_TEMP_FILE = re.compile(r"\..+\.tmp-\d+")  # left behind by atomic_open when a run is killed with SIGKILL


@dataclass(frozen=True)
class PrepareResult:
    manifest: Manifest
    written: dict[str, int]  # split -> images in its shards
    rejected: list[RejectedFile]
    layout: str  # the source layout that was recognised
    pillow: str  # the Pillow build that resized the images
    reused_shards: int  # shards kept from an earlier, interrupted run


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its split, its index within the split and its images in stored order."""

    split: str
    index: int
    refs: tuple[ImageRef, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def prepare(
    source: Path,
    out: Path,
    config: PrepareConfig = PrepareConfig(),
    overwrite: bool = False,
    progress: Progress = NullProgress(),
) -> PrepareResult:
    """Resize every image of `source` to config.size² JPEGs in webdataset shards under `out`, plus manifest.json."""
    out = Path(out)
    with output_lock(out, "prepare"), reported_write_errors(out):
        return _prepare(Path(source), out, config, overwrite, progress)


def _prepare(source: Path, out: Path, config: PrepareConfig, overwrite: bool, progress: Progress) -> PrepareResult:
    progress.start("listing the source's images", None)  # archives: reads every member header, minutes at full scale
    found = find_source(source, follow_symlinks=config.follow_symlinks, listings=out / STATE_DIR)
    progress.finish()
    held_out = "val" not in found.splits and config.val_fraction > 0
    if held_out:
        found = hold_out_val(found, config.val_fraction, config.seed)
    elif "val" not in found.splits:
        progress.log(
            f"note: {source} has no val split, which train needs: add val/<class>/ folders, or hold out part of "
            "train with --val-fraction 0.1"
        )
    tasks = plan_shards(found, config.shard_size, config.seed)
    settings = {
        "size": config.size,
        "quality": config.quality,
        "resize_filter": imaging.RESIZE_FILTER,
        "seed": config.seed,
        "shard_size": config.shard_size,
        "pillow": imaging.pillow_build(),
        "layout": found.layout,
        # recorded only where val was held out, so that every other folder's manifest stays as it was, byte for byte
        **({"val_fraction": config.val_fraction} if held_out else {}),
    }
    _claim_output(out, settings, _plan_hash(tasks), overwrite)
    save_listings(found, out / STATE_DIR)  # the archive listing, so that the next run need not read every header
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # present only when every shard it names is complete

    total = sum(len(t.refs) for t in tasks)
    progress.start("resizing into shards", total=total)
    work = partial(run_shard_task, out=out, size=config.size, quality=config.quality, verify=config.verify_finished)
    records: dict[str, dict] = {}
    reused = 0
    for record, kept in map_unordered(work, tasks, worker_count(config.workers, len(tasks)), preload=__name__):
        records[record["name"]] = record
        reused += kept
        progress.advance(record["count"] + len(record["rejected"]))
    progress.finish()

    manifest = _manifest(found, tasks, records, settings)
    written = {split: info.count for split, info in manifest.splits.items()}
    rejected = list(manifest.rejected)
    for split, refs in found.splits.items():
        unlisted = sum(r.split == split for r in found.rejected)  # e.g. symlink members of an archive
        assert written[split] + sum(r.split == split for r in rejected) == len(refs) + unlisted, f"{split}: lost"
    failed = len(rejected) > config.max_rejected
    if failed:
        manifest = replace(
            manifest, failure=f"{len(rejected)} images rejected, more than max_rejected={config.max_rejected}"
        )
    manifest = write_manifest(out, manifest)
    progress.log(
        f"prepared {', '.join(f'{n:,} {s}' for s, n in written.items())} images; {len(rejected)} rejected; "
        f"{reused} of {len(tasks)} shards kept from an earlier run"
    )
    if failed:
        raise TooManyRejectedError(
            f"{len(rejected)} images could not be read, more than max_rejected={config.max_rejected}; the list is "
            f"under 'rejected' in {out / MANIFEST_NAME}: fix or remove those files, or raise --max-rejected"
        )
    return PrepareResult(manifest, written, rejected, found.layout, str(settings["pillow"]), reused)


def plan_shards(found: Source, shard_size: int, seed: int) -> list[ShardTask]:
    """Every shard of the output with its images in order: train shuffled with `seed`, val in file-name order."""
    tasks = []
    for split in SPLITS:
        if split not in found.splits:
            continue
        refs = list(found.splits[split])
        if split == "train":
            refs = _shuffled(refs, seed)
        for index, start in enumerate(range(0, len(refs), shard_size)):
            tasks.append(ShardTask(split, index, tuple(refs[start : start + shard_size])))
    return tasks


def hold_out_val(found: Source, fraction: float, seed: int) -> Source:
    """`found` with `fraction` of each class's train images (at least one, never all) moved to a val split: those
    whose keys hash lowest under `seed`, so the same images for a seed whatever the listing order."""
    by_class: dict[int, list] = {}
    for ref in found.splits["train"]:
        by_class.setdefault(ref.label, []).append(ref)
    held: set[str] = set()
    for refs in by_class.values():
        count = min(len(refs) - 1, max(1, round(len(refs) * fraction)))
        ranked = sorted(refs, key=lambda r: hashlib.sha256(f"{seed}/{r.path}".encode()).hexdigest())
        held.update(r.path for r in ranked[:count])
    train = tuple(r for r in found.splits["train"] if r.path not in held)
    val = tuple(sorted((r for r in found.splits["train"] if r.path in held), key=lambda r: (r.key, r.path)))
    layout = f"{found.layout}, val held out from train ({fraction:g} per class)"
    return replace(found, layout=layout, splits={**found.splits, "train": train, "val": val})


def _shuffled(items: list, seed: int) -> list:
    """Fisher–Yates driven by `random.Random(seed).random()`, whose stream Python promises to keep across versions
    (unlike `Random.shuffle`), so a seed names the same train order everywhere."""
    items = list(items)
    rng = random.Random(seed)
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]
    return items


def _plan_hash(tasks: list[ShardTask]) -> str:
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(f"{task.name}\t{fingerprint(task.refs)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# One shard, in a worker process


def run_shard_task(task: ShardTask, out: Path, size: int, quality: int, verify: bool = False) -> tuple[dict, bool]:
    """Write one shard and its record, unless an earlier run did; return the record (name, count, size, sha256,
    rejected files, and the members for the index) and whether it was kept from an earlier run."""
    record = _finished_record(Path(out), task, verify)
    if record is not None:
        shard = Path(out) / task.name
        members = record.get("members")
        members = tuple(map(tuple, members)) if members is not None else scan_members(shard)  # an older record
        return {**record, "size": shard.stat().st_size, "members": members}, True
    rejected: list[dict] = []
    reader = _Reader()

    def samples() -> Iterator[Sample]:
        for ref in task.refs:
            try:
                jpeg = imaging.resize_square_jpeg(reader.read(ref), size, quality)
            except imaging.UnreadableImage as exc:
                rejected.append({"split": task.split, "path": ref.path, "reason": exc.reason})
                continue
            yield Sample(ref.key, jpeg, ref.label)

    try:
        info = write_shard(Path(out) / task.name, samples())
    finally:
        reader.close()
    stat = (Path(out) / task.name).stat()
    record = {
        "name": info.name,
        "count": info.count,
        "sha256": info.sha256,
        "rejected": rejected,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "members": [list(m) for m in info.members or ()],
    }
    _write_record(_record_path(Path(out), task), record)
    return {**record, "members": info.members}, False


def _write_record(path: Path, record: dict) -> None:
    """Temp file + rename, without the fsync of `atomic_write_text`: a record that a power cut leaves empty, or
    one whose shard did not reach the disk, fails the sha256 check on resume and the shard is redone. This saves
    one of the two fsyncs per shard (about 10 ms each here)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


class _Reader:
    """Reads an image's bytes with one seek and one read. The file stays open while consecutive images come from
    it (an archive: a whole shard's worth), and only one file is open at a time (a tree: one file per image)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.handle: BinaryIO | None = None

    def read(self, ref: ImageRef) -> bytes:
        try:
            if ref.file != self.name:
                self.close()
                self.handle, self.name = open(ref.file, "rb", buffering=0), ref.file
            assert self.handle is not None  # opened just above, or by the previous read of this file
            self.handle.seek(ref.offset)
            data = self.handle.read(ref.size)
        except OSError as exc:
            raise imaging.UnreadableImage(f"cannot read the file: {exc.strerror or exc}") from None
        if len(data) != ref.size:
            raise imaging.UnreadableImage(f"file shorter than indexed: {len(data)} of {ref.size} bytes")
        return data

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle = self.name = None


# ---------------------------------------------------------------------------------------------------------------------
# The output folder: claiming it, resuming in it, the manifest


def _claim_output(out: Path, settings: dict, plan_hash: str, overwrite: bool) -> None:
    """Make `out` ready for this plan: resume if it holds the same plan, else refuse (or clear it with overwrite)."""
    plan = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "settings": settings, "plan_sha256": plan_hash}
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: is a file, not a folder; choose a folder for the shards")
    plan_path = out / STATE_DIR / "plan.json"
    previous = _read_json(plan_path)
    if previous != plan and not overwrite:
        if previous is not None:
            raise OutputExistsError(
                f"{out}: holds shards prepared with other {_difference(previous, plan)}; rerun with --overwrite "
                "to replace them, or choose another output folder"
            )
        if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
            raise OutputExistsError(
                f"{out}: not empty and not written by `alexrepro prepare`; choose an empty folder or pass --overwrite"
            )
    if previous != plan:
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / STATE_DIR):
        if folder.is_dir():
            for stale in folder.iterdir():
                if _TEMP_FILE.fullmatch(stale.name):
                    stale.unlink()
    atomic_write_text(plan_path, json.dumps(plan, indent=1) + "\n")


def _difference(previous: dict, plan: dict) -> str:
    old, new = previous.get("settings") or {}, plan["settings"]
    changed = [f"{k} {old.get(k)!r} → {new[k]!r}" for k in new if old.get(k) != new[k]]
    return "settings (" + ", ".join(changed) + ")" if changed else "input images (the source has changed)"


def _clear(out: Path) -> None:
    """Delete what prepare writes (shards, manifest, its state folder), and nothing else."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if _SHARD_FILE.fullmatch(path.name) or _TEMP_FILE.fullmatch(path.name) or path.name == MANIFEST_NAME:
            path.unlink()
    state = out / STATE_DIR
    if state.is_dir():  # the archive listings stay: they describe the source, whatever the settings
        for path in state.iterdir():
            if not _LISTING_FILE.fullmatch(path.name):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _record_path(out: Path, task: ShardTask) -> Path:
    return out / STATE_DIR / f"{task.name}.json"


def _finished_record(out: Path, task: ShardTask, verify: bool = False) -> dict | None:
    """The record of a shard an earlier run completed, if the shard is still there as recorded: the same size and
    mtime as when it was written (or, when `verify` is set or the record predates those fields, the same sha256)."""
    record = _read_json(_record_path(out, task))
    shard = out / task.name
    if record is None or record.get("name") != task.name or not shard.is_file():
        return None
    stat = shard.stat()
    unchanged = (record.get("size"), record.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
    if unchanged and not verify and isinstance(record.get("members"), list):
        return record
    return record if sha256_file(shard) == record.get("sha256") else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest(found: Source, tasks: list[ShardTask], records: dict[str, dict], settings: dict) -> Manifest:
    splits, rejected = {}, []
    for split in found.splits:
        shards = [records[t.name] for t in tasks if t.split == split]
        infos = tuple(ShardInfo(r["name"], r["count"], r["sha256"], r["size"], r["members"]) for r in shards)
        splits[split] = SplitInfo(count=sum(i.count for i in infos), shards=infos)
        rejected += [RejectedFile(**item) for r in shards for item in r["rejected"]]
    rejected += [RejectedFile(r.split, r.path, r.reason) for r in found.rejected]
    rejected.sort(key=lambda r: (SPLITS.index(r.split), r.path))
    return Manifest(settings=settings, classes=found.classes, splits=splits, rejected=tuple(rejected))
