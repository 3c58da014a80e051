"""The shard format, and the one reader of it: webdataset tar files of 256×256 JPEGs, their member index, and the
`manifest.json` that describes them. Every stage that reads a shard reads it through this module.

Layout of a prepared folder (DESIGN.md "Files and formats"):

    train-000000.tar …   deterministic shuffle of the whole train set (every shard mixes classes)
    val-000000.tar …     validation images in file-name order
    train-index.npy      where every sample's members lie in the train shards (one row per sample, stored order)
    val-index.npy        the same for val
    manifest.json        format, version, settings, classes, splits (counts; shard names, sizes and sha256; the
                         index's name and sha256), rejected

Each sample in a shard is two tar members with the webdataset naming convention: `<key>.jpg` (RGB JPEG) and
`<key>.cls` (class index as ASCII decimal). Keys are source file stems (`n01440764_10026`,
`ILSVRC2012_val_00000001`) and never contain a dot, because webdataset splits key from extension at the first dot.

Tars are written with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0444) so the same input and settings
give byte-identical shards on any machine and with any worker count. They are USTAR tars: every member has exactly
one 512-byte header, so the writer knows each member's offset as it writes it and the index costs nothing to make.
Readers never parse tar headers: they read the index (one file read, even for ILSVRC-2012's 1.28 M images in 1,282
shards, where scanning every shard's headers took ~55 s) and then read members by offset.

Why the writer is `tarfile` and not `webdataset.TarWriter`: TarWriter wraps the same `tarfile` stream, so it could
give the same bytes, but it hides where each member lands and encodes values itself; the index needs the offsets.
Our own writer is ~20 lines and keeps existing shards byte-identical. webdataset is therefore a test dependency
only: the tests read our shards with `webdataset.WebDataset` to prove the format is standard.

Integrity (DESIGN.md "Errors and bad input"): the manifest carries each shard's size and sha256 and the index's
sha256. Loading an index checks the index's hash and every shard's size (a stat: free); `verify_shards` checks the
shards' sha256, once per shard per output folder (see there); `read_verified_shard` checks it on a whole-shard
read at no extra I/O. Names from the manifest are plain file names, confined to the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from alexrepro.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from alexrepro.errors import FormatError
from alexrepro.progress import NullProgress, Progress
from alexrepro.workers import map_unordered

FORMAT = "alexrepro-shards"
# 2: shard sizes and a persisted member index (`<split>-index.npy`) in the manifest; a failed prepare is marked.
VERSION = 2
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
VERIFIED_NAME = ".verified-shards.json"  # the stamp `verify_shards` keeps in a consumer's output folder
_TAR_BLOCK = 512
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")  # a plain file name: no '/', no '..', no leading dot
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
        if not _SAFE_NAME.fullmatch(name):
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


def check_format(data: Any, expected_format: str, expected_version: int, source: str, remedy: str) -> None:
    """Raise FormatError unless `data` is a mapping carrying the expected `format` and `version`."""
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FormatError(f"{source}: expected format '{expected_format}', found {found!r}; run `{remedy}` to make it")
    if data.get("version") != expected_version:
        raise FormatError(
            f"{source}: {expected_format} version {data.get('version')!r}, this alexrepro reads version "
            f"{expected_version}; rerun `{remedy}`"
        )


def read_manifest(shards_dir: Path, allow_failed: bool = False) -> Manifest:
    """The folder's manifest; one that a failed prepare left (for its rejected list) is refused unless asked for."""
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{path}: no manifest; run `alexrepro prepare SOURCE {shards_dir}` first")
    manifest = Manifest.from_json(path.read_text(), str(path))
    if manifest.failure is not None and not allow_failed:
        raise FormatError(
            f"{path}: prepare did not succeed ({manifest.failure}); fix that and rerun `alexrepro prepare`"
        )
    return manifest


def write_manifest(shards_dir: Path, manifest: Manifest) -> Manifest:
    """Write each split's index file, then manifest.json (naming the index files and their sha256); return it.

    The index rows come from the ShardInfo's `members` (what write_shard recorded); a shard without them (an info
    read back from a manifest, an older prepare's shard) has its tar headers read once, here.
    """
    shards_dir = Path(shards_dir)
    splits = {}
    for split, info in manifest.splits.items():
        members = [s.members if s.members is not None else scan_members(shards_dir / s.name) for s in info.shards]
        data = _index_bytes(members)
        atomic_write_bytes(shards_dir / index_name(split), data)
        splits[split] = replace(info, index=IndexInfo(index_name(split), hashlib.sha256(data).hexdigest()))
    manifest = replace(manifest, splits=splits)
    atomic_write_text(shards_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


def manifest_sha256(shards_dir: Path) -> str:
    """Identity of a prepared dataset: the hash of its manifest (which holds every shard's hash)."""
    return sha256_file(Path(shards_dir) / MANIFEST_NAME)


def shard_paths(shards_dir: Path, manifest: Manifest, split: str) -> list[Path]:
    return [Path(shards_dir) / s.name for s in manifest.split(split).shards]


# ---------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Sample:
    key: str
    jpeg: bytes
    label: int


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _blocks(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def write_shard(path: Path, samples: Iterable[Sample]) -> ShardInfo:
    """Write `samples` as a webdataset tar at `path` (atomically); return its name, count, size, sha256 and members."""
    digest = hashlib.sha256()
    written = 0
    members = []

    class _Hashing(io.RawIOBase):
        def __init__(self, inner):
            self.inner = inner

        def writable(self):
            return True

        def write(self, b):
            nonlocal written
            digest.update(b)
            written += len(b)
            return self.inner.write(b)

    position = 0  # where the next member's header goes: USTAR headers are one block each
    with atomic_open(path) as handle:
        with tarfile.open(fileobj=_Hashing(handle), mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if "." in sample.key or "/" in sample.key or len(sample.key.encode()) > 95:
                    raise ValueError(f"shard key {sample.key!r} must not contain '.' or '/' (nor exceed 95 bytes)")
                label = str(sample.label).encode("ascii")
                tar.addfile(*_member(f"{sample.key}.jpg", sample.jpeg))
                tar.addfile(*_member(f"{sample.key}.cls", label))
                jpg_at = position + _TAR_BLOCK
                cls_at = jpg_at + _blocks(len(sample.jpeg)) + _TAR_BLOCK
                members.append((sample.key, jpg_at, len(sample.jpeg), cls_at, len(label)))
                position = cls_at + _blocks(len(label))
    return ShardInfo(Path(path).name, len(members), digest.hexdigest(), written, tuple(members))


def scan_members(path: Path) -> tuple:
    """The index rows of a shard that has no recorded members, from its tar headers (write_manifest only)."""
    pairs: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:  # seekable mode: headers are read, data skipped
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    pairs.setdefault(key, {})[ext] = member
    except (tarfile.TarError, OSError) as exc:
        raise FormatError(f"{path}: unreadable shard ({exc}); rerun `alexrepro prepare` to rewrite it") from None
    incomplete = [k for k, p in pairs.items() if "jpg" not in p or "cls" not in p]
    if incomplete:
        raise FormatError(f"{path}: samples {incomplete[:3]} lack a .jpg or .cls member; rerun `alexrepro prepare`")
    return tuple(
        (key, p["jpg"].offset_data, p["jpg"].size, p["cls"].offset_data, p["cls"].size) for key, p in pairs.items()
    )


def _index_bytes(shards: Sequence[Sequence[tuple]]) -> bytes:
    """One split's index as .npy bytes: a structured array, one row per sample in stored order (deterministic)."""
    rows = [(number, *member[1:], member[0].encode()) for number, members in enumerate(shards) for member in members]
    width = max((len(row[-1]) for row in rows), default=1)
    table = np.array(rows, dtype=_index_dtype(width)) if rows else np.zeros(0, _index_dtype(width))
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    return buffer.getvalue()


def _index_dtype(key_width: int) -> np.dtype:
    return np.dtype(
        [
            ("shard", "<i4"),
            ("jpg_offset", "<i8"),
            ("jpg_size", "<i8"),
            ("cls_offset", "<i8"),
            ("cls_size", "<i8"),
            ("key", f"S{key_width}"),
        ]
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of a split lies in its shards: sample i is in `paths[shard[i]]` at these byte offsets."""

    paths: tuple[str, ...]
    infos: tuple[ShardInfo, ...]  # the manifest's entry for each path
    shard: np.ndarray  # int32, one per sample, in stored order
    jpg: np.ndarray  # int64 n×2: (offset, size) of the JPEG bytes
    cls: np.ndarray  # int64 n×2: (offset, size) of the class index text
    keys: np.ndarray  # bytes (numpy 'S'), the sample keys
    num_classes: int  # labels must lie in 0…num_classes-1

    def __len__(self) -> int:
        return len(self.shard)

    @classmethod
    def load(cls, shards_dir: Path, manifest: Manifest, split: str) -> ShardIndex:
        """The split's index as prepare persisted it: one file read, its sha256 and every shard's size checked."""
        shards_dir = Path(shards_dir)
        info = manifest.split(split)
        where = shards_dir / MANIFEST_NAME
        if info.index is None:
            raise FormatError(f"{where}: split '{split}' has no member index; rerun `alexrepro prepare`")
        path = shards_dir / info.index.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FormatError(
                f"{path}: cannot read the member index ({exc.strerror or exc}); rerun `alexrepro prepare`"
            ) from None
        if hashlib.sha256(data).hexdigest() != info.index.sha256:
            raise FormatError(f"{path}: sha256 differs from {where}; the index was changed: rerun `alexrepro prepare`")
        try:
            table = np.load(io.BytesIO(data), allow_pickle=False)
            columns = [table[name] for name in ("shard", "jpg_offset", "jpg_size", "cls_offset", "cls_size", "key")]
        except (ValueError, KeyError, IndexError, OSError) as exc:
            raise FormatError(f"{path}: not a member index ({exc}); rerun `alexrepro prepare`") from None
        shard, jpg_offset, jpg_size, cls_offset, cls_size, keys = columns
        counts = [s.count for s in info.shards]
        if (
            len(table) != info.count
            or sum(counts) != info.count
            or (len(table) and (shard.min() < 0 or shard.max() >= len(counts)))
            or np.bincount(shard, minlength=len(counts)).tolist() != counts
        ):
            raise FormatError(
                f"{path}: {len(table)} samples do not match the counts in {where} ({info.count}); rerun `alexrepro prepare`"
            )
        if np.any(np.diff(shard) < 0):
            raise FormatError(f"{path}: samples are not in shard order; rerun `alexrepro prepare`")
        paths = tuple(str(shards_dir / s.name) for s in info.shards)
        starts = np.searchsorted(shard, np.arange(len(counts)))
        ends = np.maximum(jpg_offset + jpg_size, cls_offset + cls_size)
        for number, (p, s) in enumerate(zip(paths, info.shards, strict=True)):
            size = _file_size(Path(p))
            if size != s.size or (s.count and ends[starts[number] : starts[number] + s.count].max() > size):
                raise FormatError(
                    f"{p}: {size:,} bytes but {where} lists {s.size:,}; the shard was changed or replaced: rerun "
                    "`alexrepro prepare`"
                )
        return cls(
            paths,
            info.shards,
            shard.astype(np.int32),
            np.stack([jpg_offset, jpg_size], axis=1).astype(np.int64),
            np.stack([cls_offset, cls_size], axis=1).astype(np.int64),
            keys,
            manifest.num_classes,
        )

    def key(self, sample: int) -> str:
        return self.keys[sample].decode()

    def shard_starts(self) -> np.ndarray:
        """Number of the first sample of each shard."""
        return np.searchsorted(self.shard, np.arange(len(self.paths)))

    def only(self, shard: int) -> ShardIndex:
        """The samples of one shard, as an index of that shard alone (what one worker needs to be sent)."""
        rows = slice(*np.searchsorted(self.shard, [shard, shard + 1]))
        return replace(
            self,
            paths=(self.paths[shard],),
            infos=(self.infos[shard],),
            shard=np.zeros(rows.stop - rows.start, np.int32),
            jpg=self.jpg[rows],
            cls=self.cls[rows],
            keys=self.keys[rows],
        )

    def head(self, n: int | None) -> ShardIndex:
        """The first `n` samples in stored order (all when n is None), and only the shards they lie in."""
        if n is None or n >= len(self):
            return self
        used = int(self.shard[n - 1]) + 1 if n > 0 else 0
        return replace(
            self,
            paths=self.paths[:used],
            infos=self.infos[:used],
            shard=self.shard[:n],
            jpg=self.jpg[:n],
            cls=self.cls[:n],
            keys=self.keys[:n],
        )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the shard ({exc.strerror or exc}); rerun `alexrepro prepare`") from None


class ShardReader:
    """Reads samples of an index by offset (os.pread: no shared file position between threads), or as views of the
    shard mapped into memory (`jpeg_view`, for the loader's decoders). Open files and maps stay open until `close`
    (or the end of a `with` block); a reader belongs to one process."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self.fds: dict[int, int] = {}
        self.maps: dict[int, memoryview] = {}

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        for view in self.maps.values():
            view.release()  # the map itself closes once no tensor still holds a view of it
        self.maps.clear()

    def _read(self, shard: int, offset, size) -> bytes:
        path = self.index.paths[shard]
        try:
            fd = self.fds.get(shard)
            if fd is None:
                fd = self.fds[shard] = os.open(path, os.O_RDONLY)
            data = os.pread(fd, int(size), int(offset))
        except OSError as exc:
            raise FormatError(f"{path}: unreadable shard ({exc.strerror or exc}); rerun `alexrepro prepare`") from None
        if len(data) != int(size):
            raise FormatError(f"{path}: truncated shard; rerun `alexrepro prepare` to rewrite it")
        return data

    def jpeg(self, sample: int) -> bytes:
        return self._read(int(self.index.shard[sample]), *self.index.jpg[sample])

    def jpeg_view(self, sample: int) -> memoryview:
        """The sample's JPEG as a view of its shard mapped into memory, without copying it.

        Why: a decoder reads the bytes in place from the page cache, where `jpeg` copies them out (and torch then
        needs a writable copy of that): ~25 µs of a ~500 µs 256² decode on two cores (docs/benchmarks.md "Loader").
        The map is private (copy-on-write), so torch.frombuffer may wrap it; nothing writes to it.
        """
        shard = int(self.index.shard[sample])
        offset, size = (int(n) for n in self.index.jpg[sample])
        view = self.maps.get(shard)
        if view is None:
            view = self.maps[shard] = self._map(shard)
        data = view[offset : offset + size]
        if len(data) != size:
            raise FormatError(f"{self.index.paths[shard]}: truncated shard; rerun `alexrepro prepare` to rewrite it")
        return data

    def _map(self, shard: int) -> memoryview:
        path = self.index.paths[shard]
        try:
            with open(path, "rb") as file:
                return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY))
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise FormatError(f"{path}: unreadable shard ({exc}); rerun `alexrepro prepare`") from None

    def label(self, sample: int) -> int:
        """The sample's class index, checked to name one of the manifest's classes."""
        shard = int(self.index.shard[sample])
        text = self._read(shard, *self.index.cls[sample])
        return check_label(text, self.index.num_classes, self.index.paths[shard], self.index.key(sample))

    def sample(self, sample: int) -> Sample:
        return Sample(self.index.key(sample), self.jpeg(sample), self.label(sample))


def check_label(text: bytes, num_classes: int, path: str, key: str) -> int:
    try:
        label = int(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        label = None
    if label is None or not 0 <= label < num_classes:
        raise FormatError(
            f"{path}: sample {key}: class {text[:20]!r} is not one of the manifest's {num_classes} class indices; "
            "rerun `alexrepro prepare`"
        )
    return label


def iter_split(shards_dir: Path, split: str, manifest: Manifest | None = None) -> Iterator[Sample]:
    """Every sample of a split, shard after shard, in stored order."""
    manifest = manifest or read_manifest(shards_dir)
    index = ShardIndex.load(shards_dir, manifest, split)
    with ShardReader(index) as reader:
        for sample in range(len(index)):
            yield reader.sample(sample)


def iter_shard(path: Path) -> Iterator[Sample]:
    """The samples of one shard of a prepared folder, in stored order (found through the folder's index)."""
    path = Path(path)
    manifest = read_manifest(path.parent, allow_failed=True)
    for split, info in manifest.splits.items():
        names = [s.name for s in info.shards]
        if path.name in names:
            index = ShardIndex.load(path.parent, manifest, split).only(names.index(path.name))
            with ShardReader(index) as reader:
                yield from (reader.sample(i) for i in range(len(index)))
            return
    raise FormatError(f"{path}: not listed in {path.parent / MANIFEST_NAME}; rerun `alexrepro prepare`")


def read_verified_shard(index: ShardIndex, shard: int) -> memoryview:
    """A whole shard in one read, checked against the manifest's size and sha256 (for readers that read it all)."""
    path, info = Path(index.paths[shard]), index.infos[shard]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{path}: unreadable shard ({exc.strerror or exc}); rerun `alexrepro prepare`") from None
    if len(data) != info.size or hashlib.sha256(data).hexdigest() != info.sha256:
        raise FormatError(_changed(path))
    return memoryview(data)


def _changed(path: Path) -> str:
    return (
        f"{path}: its size or sha256 differs from {path.parent / MANIFEST_NAME}; the shard was changed or "
        "replaced: rerun `alexrepro prepare`"
    )


# ---------------------------------------------------------------------------------------------------------------
# Verifying shards that are read by offset (train, evaluate)
#
# The loader reads samples by offset, never a whole shard in order, so it cannot hash as it reads; hashing every
# shard on every run would be a full extra pass (140 GB for ILSVRC-2012). So a consumer hashes each shard once and
# keeps a stamp in its own output folder (never in the shard folder, which DVC tracks): for each verified shard its
# sha256 and the file's identity (size, inode, mtime and ctime in ns). A later run (a resume, a rerun) rehashes
# only the shards whose identity changed. Any write to a file changes its ctime, which no user can set back, so an
# edited, truncated or replaced shard is hashed again; only bit rot under an unchanged inode goes unseen.


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_task(path: str) -> tuple[str, str]:
    return path, sha256_file(Path(path))


def verify_shards(
    index: ShardIndex,
    stamp_dir: Path,
    workers: int,
    part: tuple[int, int] = (0, 1),
    progress: Progress = NullProgress(),
) -> int:
    """Check the sha256 of the index's shards against the manifest, once per shard per `stamp_dir`; return how
    many were hashed. `part=(rank, world)` checks every world-th shard from rank on (ranks share the work)."""

    rank, world = part
    stamp_path = Path(stamp_dir) / (VERIFIED_NAME if world == 1 else f".verified-shards-{rank}-of-{world}.json")
    try:
        stamp = json.loads(stamp_path.read_text())
        known = stamp["shards"] if stamp.get("format") == "alexrepro-verified" else {}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        known = {}
    expected = {}
    todo = []
    for path, info in list(zip(index.paths, index.infos, strict=True))[rank::world]:
        path = str(Path(path).resolve())
        expected[path] = info.sha256
        entry = known.get(path) if isinstance(known, dict) else None
        if entry != {"sha256": info.sha256, "file": _identity(Path(path))}:
            todo.append(path)
    if todo:
        progress.start("checking shards against the manifest (once per output folder)", len(todo))
    for path, digest in map_unordered(_hash_task, todo, max(1, min(workers, len(todo))), preload=__name__):
        if digest != expected[path]:
            raise FormatError(_changed(Path(path)))
        progress.advance(1)
    if todo:
        progress.finish()
    if todo:
        verified = {path: {"sha256": sha, "file": _identity(Path(path))} for path, sha in expected.items()}
        Path(stamp_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp_path, json.dumps({"format": "alexrepro-verified", "shards": verified}, indent=1) + "\n")
    return len(todo)
