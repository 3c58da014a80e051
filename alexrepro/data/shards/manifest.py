"""The manifest: what a prepared folder holds (classes, splits, shards with their sizes and sha256, the member
indexes, the rejected files), and the names of its files."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alexrepro.core.errors import FormatError
from alexrepro.core.files import check_format, read_utf8, sha256_file

FORMAT = "alexrepro-shards"
# 2: shard sizes and a persisted member index (`<split>-index.npy`) in the manifest; a failed prepare is marked.
VERSION = 2
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")  # a plain file name: no '/', no '..', no leading dot
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(split: str) -> str:
    return f"{split}-index.npy"


@dataclass(frozen=True)
class ClassInfo:
    index: int  # position of the WNID in sorted order (REFERENCE.md §5: the Caffe/torchvision convention)
    wnid: str
    ilsvrc_id: int | None  # the devkit's ILSVRC2012_ID (1–1000), None when the source has no devkit
    name: str  # human-readable words, e.g. "tench, Tinca tinca"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str
    size: int  # bytes
    # (key, jpg offset, jpg size, cls offset, cls size) of each sample, as written; not part of the manifest (it
    # goes into the split's index file), None when the info was read back from a manifest.
    members: tuple | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class IndexInfo:
    name: str
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    count: int
    shards: tuple[ShardInfo, ...]
    index: IndexInfo | None = None  # set by write_manifest


@dataclass(frozen=True)
class RejectedFile:
    split: str
    path: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    settings: dict[str, Any]
    classes: tuple[ClassInfo, ...]
    splits: dict[str, SplitInfo]
    rejected: tuple[RejectedFile, ...] = field(default_factory=tuple)
    failure: str | None = None  # why prepare failed (the manifest is kept for its rejected list); readers refuse it

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise FormatError(
                f"manifest has no '{name}' split (it has {sorted(self.splits)}); prepare a source that has one"
            )
        return self.splits[name]

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "settings": self.settings,
            "classes": [asdict(c) for c in self.classes],
            "splits": {name: _split_json(s) for name, s in self.splits.items()},
            "rejected": [asdict(r) for r in self.rejected],
        }
        if self.failure is not None:
            data["failure"] = self.failure
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise FormatError(f"{source}: not valid JSON; rerun `alexrepro prepare` to rewrite it") from None
        check_format(data, FORMAT, VERSION, source, "alexrepro prepare")
        return _parse_manifest(_Fields(source), data)


def _split_json(split: SplitInfo) -> dict:
    data: dict[str, Any] = {"count": split.count}
    if split.index is not None:
        data["index"] = asdict(split.index)
    data["shards"] = [{"name": s.name, "count": s.count, "size": s.size, "sha256": s.sha256} for s in split.shards]
    return data


class _Fields:
    """Typed access to the manifest's JSON: a missing or wrongly typed field is one line naming it."""

    def __init__(self, source: str):
        self.source = source

    def get(self, data: Any, key: str | int, kind, where: str, optional: bool = False):
        place = f"{where}[{key}]" if isinstance(key, int) else (f"{where}.{key}" if where else key)
        if isinstance(data, dict) and key not in data:
            if optional:
                return None
            raise FormatError(f"{self.source}: '{place}' is missing; rerun `alexrepro prepare`")
        value = data[key]
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(
                f"{self.source}: '{place}' must be {kind.__name__}, found {type(value).__name__} {value!r:.40}; "
                "rerun `alexrepro prepare`"
            )
        return value

    def items(self, data: dict, key: str, where: str) -> list[tuple[str, dict]]:
        """The entries of a list of objects, each with the place it is at."""
        place = f"{where}.{key}" if where else key
        entries = self.get(data, key, list, where)
        return [(f"{place}[{i}]", self.get(entries, i, dict, place)) for i in range(len(entries))]

    def name(self, data: dict, where: str) -> str:
        name = self.get(data, "name", str, where)
        if not SAFE_NAME.fullmatch(name):
            raise FormatError(
                f"{self.source}: '{where}.name' is {name!r}, not a plain file name in the shard folder; "
                "rerun `alexrepro prepare`"
            )
        return name

    def sha256(self, data: dict, where: str) -> str:
        value = self.get(data, "sha256", str, where)
        if not _SHA256.fullmatch(value):
            raise FormatError(f"{self.source}: '{where}.sha256' is not a sha256 hex digest; rerun `alexrepro prepare`")
        return value


def _parse_manifest(f: _Fields, data: dict) -> Manifest:
    classes = tuple(
        ClassInfo(
            f.get(c, "index", int, w),
            f.get(c, "wnid", str, w),
            f.get(c, "ilsvrc_id", int, w, optional=True),
            f.get(c, "name", str, w),
        )
        for w, c in f.items(data, "classes", "")
    )
    if [c.index for c in classes] != list(range(len(classes))):
        raise FormatError(
            f"{f.source}: 'classes' are not indexed 0…{len(classes) - 1} in order; rerun `alexrepro prepare`"
        )
    splits = {}
    for split in f.get(data, "splits", dict, ""):
        where = f"splits.{split}"
        s = f.get(data["splits"], split, dict, "splits")
        shards = tuple(
            ShardInfo(f.name(sh, w), f.get(sh, "count", int, w), f.sha256(sh, w), f.get(sh, "size", int, w))
            for w, sh in f.items(s, "shards", where)
        )
        index = f.get(s, "index", dict, where, optional=True)
        splits[split] = SplitInfo(
            count=f.get(s, "count", int, where),
            shards=shards,
            index=None
            if index is None
            else IndexInfo(f.name(index, f"{where}.index"), f.sha256(index, f"{where}.index")),
        )
    rejected = tuple(
        RejectedFile(f.get(r, "split", str, w), f.get(r, "path", str, w), f.get(r, "reason", str, w))
        for w, r in (f.items(data, "rejected", "") if "rejected" in data else [])
    )
    return Manifest(
        settings=dict(f.get(data, "settings", dict, "")),
        classes=classes,
        splits=splits,
        rejected=rejected,
        failure=f.get(data, "failure", str, "", optional=True),
    )


def read_manifest(shards_dir: Path, allow_failed: bool = False) -> Manifest:
    """The folder's manifest; one that a failed prepare left (for its rejected list) is refused unless asked for."""
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{path}: no manifest; run `alexrepro prepare SOURCE {shards_dir}` first")
    text = read_utf8(
        path, FormatError, "manifest", f"the manifest was damaged: rerun `alexrepro prepare SOURCE {shards_dir}`"
    )
    manifest = Manifest.from_json(text, str(path))
    if manifest.failure is not None and not allow_failed:
        raise FormatError(
            f"{path}: prepare did not succeed ({manifest.failure}); fix that and rerun `alexrepro prepare`"
        )
    return manifest


def manifest_sha256(shards_dir: Path) -> str:
    """Identity of a prepared dataset: the hash of its manifest (which holds every shard's hash)."""
    return sha256_file(Path(shards_dir) / MANIFEST_NAME)


def shard_paths(shards_dir: Path, manifest: Manifest, split: str) -> list[Path]:
    return [Path(shards_dir) / s.name for s in manifest.split(split).shards]


# ---------------------------------------------------------------------------------------------------------------
# Writing


# ---------------------------------------------------------------------------------------------------------------
# Reading


# ---------------------------------------------------------------------------------------------------------------
# Verifying shards that are read by offset (train, evaluate)
#
# The loader reads samples by offset, never a whole shard in order, so it cannot hash as it reads; hashing every
# shard on every run would be a full extra pass (140 GB for ILSVRC-2012). So a consumer hashes each shard once and
# keeps a stamp in its own output folder (never in the shard folder, which DVC tracks): for each verified shard its
# sha256 and the file's identity (size, inode, mtime and ctime in ns). A later run (a resume, a rerun) rehashes
# only the shards whose identity changed. Any write to a file changes its ctime, which no user can set back, so an
# edited, truncated or replaced shard is hashed again; only bit rot under an unchanged inode goes unseen.


@dataclass(frozen=True)
class Sample:
    key: str
    jpeg: bytes
    label: int
