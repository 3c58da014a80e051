"""The one reader of shards: the member index (one file read for the whole split), reads by offset, labels."""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.lib.recfunctions

from alexrepro.core.errors import FormatError
from alexrepro.core.files import sha256_file
from alexrepro.data.shards.manifest import MANIFEST_NAME, Manifest, Sample, ShardInfo, read_manifest


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
        # The index is memory-mapped, never read whole: at ILSVRC-2012's 1.28 M samples a copy costs ~170 MB in the
        # training process and in every loader worker forked from it, and the loader touches only the rows of the
        # samples it reads. Its sha256 is checked streaming (the page cache, not this process, holds the bytes).
        try:
            digest = sha256_file(path)
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except OSError as exc:
            raise FormatError(
                f"{path}: cannot read the member index ({exc.strerror or exc}); rerun `alexrepro prepare`"
            ) from None
        except ValueError as exc:
            raise FormatError(f"{path}: not a member index ({exc}); rerun `alexrepro prepare`") from None
        # Rows are read one at a time, in random order (the shuffled epoch): the kernel's read-ahead around each
        # would pull the whole file into this process's resident set.
        mapped = getattr(table, "_mmap", None)
        if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        if digest != info.index.sha256:
            raise FormatError(f"{path}: sha256 differs from {where}; the index was changed: rerun `alexrepro prepare`")
        names = table.dtype.names or ()
        if table.ndim != 1 or any(
            n not in names for n in ("shard", "jpg_offset", "jpg_size", "cls_offset", "cls_size", "key")
        ):
            raise FormatError(f"{path}: not a member index (columns {list(names)}); rerun `alexrepro prepare`")
        counts = [s.count for s in info.shards]
        if len(table) != info.count or sum(counts) != info.count:
            raise FormatError(
                f"{path}: {len(table)} samples do not match the counts in {where} ({info.count}); rerun `alexrepro prepare`"
            )
        # Nothing else of the table is read here: its sha256 is the one prepare recorded, so its rows are prepare's
        # (in shard order, within each shard's bytes). Touching a row per shard would fault in, read-ahead and
        # fault-around included, the whole file. Each shard's size is checked against the manifest (a stat).
        paths = tuple(str(shards_dir / s.name) for s in info.shards)
        for p, s in zip(paths, info.shards, strict=True):
            size = _file_size(Path(p))
            if size != s.size:
                raise FormatError(
                    f"{p}: {size:,} bytes but {where} lists {s.size:,}; the shard was changed or replaced: rerun "
                    "`alexrepro prepare`"
                )
        pairs = np.lib.recfunctions.structured_to_unstructured  # views of the mapped file (the fields are adjacent)
        return cls(
            paths,
            info.shards,
            table["shard"],
            pairs(table[["jpg_offset", "jpg_size"]], copy=False),
            pairs(table[["cls_offset", "cls_size"]], copy=False),
            table["key"],
            manifest.num_classes,
        )

    def key(self, sample: int) -> str:
        return self.keys[sample].decode()

    def shard_starts(self) -> np.ndarray:
        """Number of the first sample of each shard (from the manifest's counts: no row of the index is read)."""
        counts = np.array([info.count for info in self.infos], np.int64)
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    def only(self, shard: int) -> ShardIndex:
        """The samples of one shard, as an index of that shard alone (what one worker needs to be sent)."""
        start = int(self.shard_starts()[shard])
        rows = slice(start, min(start + self.infos[shard].count, len(self)))  # a head() may end inside the shard
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
            raise FormatError(
                f"{path}: cannot read the shard ({exc.strerror or exc}); check its permissions, or rerun `alexrepro prepare` "
                "if it is damaged"
            ) from None
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
            raise FormatError(
                f"{path}: cannot read the shard ({exc}); check its permissions, or rerun `alexrepro prepare` if it is "
                "damaged"
            ) from None

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
        raise FormatError(
            f"{path}: cannot read the shard ({exc.strerror or exc}); check its permissions, or rerun `alexrepro prepare` "
            "if it is damaged"
        ) from None
    if len(data) != info.size or hashlib.sha256(data).hexdigest() != info.sha256:
        raise FormatError(changed_since_verified(path))
    return memoryview(data)


def changed_since_verified(path: Path) -> str:
    """The shard is not what prepare wrote. A plain rerun of prepare trusts a finished shard's recorded size and mtime
    (bit rot keeps both), so the fix names the setting that makes it re-hash every shard and rewrite a damaged one."""
    return (
        f"{path}: its size or sha256 differs from {path.parent / MANIFEST_NAME}; the shard was changed or damaged: "
        f"rerun `alexrepro prepare SOURCE {path.parent} --set verify_finished=true` (re-hashes every shard and "
        "rewrites the damaged ones)"
    )
