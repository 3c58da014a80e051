"""The listing of an archive's members, persisted in prepare's state folder, so that a rerun need not read every
header of a 138 GB tar again."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alexrepro.core.atomic import atomic_write_bytes
from alexrepro.data.sources.base import Source

# The archive listing, persisted. Reading every header of the 138 GB train tar costs ~42 µs of CPU per member
# (54 s for ILSVRC-2012's 1.33 M, plus a seek per class tar) and ~600 bytes of memory per member as TarInfo objects;
# prepare keeps the listing in its state folder as numpy columns and reads it back in about a second, as long as the
# archive is unchanged. "Unchanged" is judged by size, mtime_ns, inode and device (what a rewrite or a copy
# changes) plus sha256 of the first and last MiB (what a same-size in-place rewrite with a restored mtime would not
# keep), so a changed archive is listed afresh.
LISTING_FORMAT = "alexrepro-archive-listing"


LISTING_VERSION = 1


_KINDS = ("file", "symlink", "hardlink", "other")


_EDGE = 1 << 20


@dataclass(frozen=True)
class Listing:
    """An archive's members in stored order: `group` numbers the inner tar (0 for a flat tar), `kind` indexes _KINDS."""

    groups: tuple[str, ...]  # inner tar names ("" for a flat tar)
    columns: dict[str, np.ndarray]  # group, name (utf-8 bytes), offset, size, kind, linkname (utf-8 bytes)

    @classmethod
    def of(cls, groups: list[tuple[str, list[Member], list[Member]]]) -> Listing:
        rows = [(number, m) for number, (_, files, others) in enumerate(groups) for m in files + others]

        def text(values: list[str]) -> np.ndarray:  # numpy 'S': a fixed width, no Python object per member
            return np.array([v.encode("utf-8", "surrogateescape") for v in values] or [b""])[: len(rows)]

        columns = {
            "group": np.array([g for g, _ in rows], np.int32),
            "name": text([m.name for _, m in rows]),
            "offset": np.array([m.offset for _, m in rows], np.int64),
            "size": np.array([m.size for _, m in rows], np.int64),
            "kind": np.array([_KINDS.index(m.kind) for _, m in rows], np.uint8),
            "linkname": text([m.linkname for _, m in rows]),
        }
        return cls(tuple(name for name, _, _ in groups), columns)

    def files(self) -> dict[str, np.ndarray]:
        keep = self.columns["kind"] == 0
        return {name: column[keep] for name, column in self.columns.items()}

    def others(self) -> dict[int, list[Member]]:
        """The members that are not regular files (links, devices), by group."""
        c = self.columns
        found: dict[int, list[Member]] = {}
        for i in np.flatnonzero(c["kind"] != 0).tolist():
            name, linkname = decoded(c["name"][i : i + 1])[0], decoded(c["linkname"][i : i + 1])[0]
            member = Member(name, int(c["offset"][i]), int(c["size"][i]), _KINDS[c["kind"][i]], linkname)
            found.setdefault(int(c["group"][i]), []).append(member)
        return found


def decoded(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8", "surrogateescape") for v in values.tolist()]


def _listing_name(archive: Path) -> str:
    return f"listing-{archive.name}.npz"


def _archive_key(archive: Path) -> str:
    """What identifies the archive's bytes without reading them all (see above), as JSON text."""
    stat = archive.stat()
    with open(archive, "rb") as handle:
        head = hashlib.sha256(handle.read(_EDGE)).hexdigest()
        handle.seek(max(0, stat.st_size - _EDGE))
        tail = hashlib.sha256(handle.read(_EDGE)).hexdigest()
    key = {
        "format": LISTING_FORMAT,
        "version": LISTING_VERSION,
        "name": archive.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "device": stat.st_dev,
        "head_sha256": head,
        "tail_sha256": tail,
    }
    return json.dumps(key, sort_keys=True)


def listing(folder: Path | None, archive: Path, make: Callable[[], Listing], saved: list) -> Listing:
    """The archive's listing: read back from `folder` when it was made from these very bytes, else made now (and,
    when there is a `folder`, appended to `saved` as (file name, .npz bytes) for `save_listings`)."""
    if folder is None:
        return make()
    key = _archive_key(archive)  # before listing: an archive changed meanwhile is listed again next time
    cached = _cached_listing(folder, archive, key)
    if cached is not None:
        return cached
    listing = make()
    buffer = io.BytesIO()
    # One mapping typed Any: numpy's stub reads keyword arrays as its own `allow_pickle` flag.
    arrays: dict[str, Any] = {"key": np.array(key), "groups": np.array(listing.groups or ("",))[: len(listing.groups)]}
    arrays.update(listing.columns)
    np.savez(buffer, **arrays)
    saved.append((_listing_name(archive), buffer.getvalue()))
    return listing


def _cached_listing(folder: Path, archive: Path, key: str) -> Listing | None:
    try:
        with np.load(folder / _listing_name(archive), allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                return None
            groups = tuple(str(g) for g in saved["groups"].tolist())
            columns = {name: saved[name] for name in ("group", "name", "offset", "size", "kind", "linkname")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing, unreadable or from another version: list the archive again
    return Listing(groups, columns)


def save_listings(source: Source, folder: Path) -> None:
    """Persist the archive listings `find_source` made (none when it read them from `folder`), keyed to the archives
    as they were listed. Each file is written atomically; a listing is only a cache of what the archive holds."""
    for name, data in source.listings:
        atomic_write_bytes(Path(folder) / name, data)


@dataclass(frozen=True, slots=True)
class Member:
    """What the listing keeps of one tar header (a `tarfile.TarInfo` holds some 20 fields; at 1.3 M members that
    is most of the listing's memory)."""

    name: str
    offset: int  # of the member's data, from the start of the tar it is in
    size: int
    kind: str  # "file", "symlink", "hardlink" or "other" (devices, FIFOs); folders are left out
    linkname: str = ""
