"""Writing a shard: USTAR members with fixed metadata (byte-identical for the same input), each member's offset
noted as it is written, and the member index built from those offsets."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from alexrepro.core.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from alexrepro.core.errors import FormatError
from alexrepro.data.shards.manifest import (
    MANIFEST_NAME,
    ClassInfo,
    IndexInfo,
    Manifest,
    Sample,
    ShardInfo,
    SplitInfo,
    index_name,
    shard_name,
)

TAR_BLOCK = 512


def ustar_header(name: bytes, size: int) -> bytes:
    """The USTAR header block of a regular file `name` of `size` bytes with the shard's fixed metadata (mode 0444,
    uid/gid 0, no user or group names, mtime 0): byte for byte what `tarfile` writes for the same TarInfo.

    Written by hand because tarfile's per-member header code (TarInfo copies, field formatting, a stream wrapper)
    took about 8% of a one-worker prepare, run in the same process as the resizing; a test holds the bytes to
    tarfile's over names and sizes of every length."""
    if len(name) > 100:
        raise ValueError(f"tar member name {name!r} exceeds USTAR's 100 bytes")
    head = name.ljust(100, b"\0") + _MODE_UID_GID + b"%011o\0" % size + _MTIME
    checksum = 8 * ord(" ") + sum(head) + _TAIL_SUM  # the checksum field counts as eight spaces
    return head + b"%06o\0 " % checksum + _TAIL


_MODE_UID_GID = b"0000444\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
# type '0' (regular file), no link name, the POSIX magic and version, empty user/group names, device numbers and
# prefix; then the header block's padding
_TAIL = (b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155)).ljust(TAR_BLOCK - 156, b"\0")
_TAIL_SUM = sum(_TAIL)
RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to a whole record (as `tar -b20` does)


def _member_bytes(name: bytes, data: bytes) -> bytes:
    """Header, data and padding to the next block: one member as it lies in the tar."""
    return ustar_header(name, len(data)) + data + b"\0" * (_blocks(len(data)) - len(data))


def _blocks(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def write_shard(path: Path, samples: Iterable[Sample]) -> ShardInfo:
    """Write `samples` as a webdataset tar at `path` (atomically); return its name, count, size, sha256 and members.

    The tar is what `tarfile.open(mode="w|", format=USTAR_FORMAT)` writes for the same members (see `ustar_header`)."""
    digest = hashlib.sha256()
    members = []
    position = 0  # where the next member's header goes: USTAR headers are one block each
    with atomic_open(path) as handle:

        def write(chunk: bytes) -> None:
            nonlocal position
            digest.update(chunk)
            handle.write(chunk)
            position += len(chunk)

        for sample in samples:
            key = sample.key.encode()
            if "." in sample.key or "/" in sample.key or len(key) > 95:
                raise ValueError(f"shard key {sample.key!r} must not contain '.' or '/' (nor exceed 95 bytes)")
            label = str(sample.label).encode("ascii")
            jpg_at = position + TAR_BLOCK
            cls_at = jpg_at + _blocks(len(sample.jpeg)) + TAR_BLOCK
            members.append((sample.key, jpg_at, len(sample.jpeg), cls_at, len(label)))
            write(_member_bytes(key + b".jpg", sample.jpeg) + _member_bytes(key + b".cls", label))
        end = position + 2 * TAR_BLOCK  # two zero blocks end the archive; then zeros to the end of the record
        write(b"\0" * (-(-end // RECORD) * RECORD - position))
    return ShardInfo(Path(path).name, len(members), digest.hexdigest(), position, tuple(members))


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


def index_bytes(shards: Sequence[Sequence[tuple]]) -> bytes:
    """One split's index as .npy bytes: a structured array, one row per sample in stored order (deterministic)."""
    rows = [(number, *member[1:], member[0].encode()) for number, members in enumerate(shards) for member in members]
    width = max((len(row[-1]) for row in rows), default=1)
    table = np.array(rows, dtype=index_dtype(width)) if rows else np.zeros(0, index_dtype(width))
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    return buffer.getvalue()


def index_dtype(key_width: int) -> np.dtype:
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


def write_manifest(shards_dir: Path, manifest: Manifest) -> Manifest:
    """Write each split's index file, then manifest.json (naming the index files and their sha256); return it.

    The index rows come from the ShardInfo's `members` (what write_shard recorded); a shard without them (an info
    read back from a manifest, an older prepare's shard) has its tar headers read once, here.
    """
    shards_dir = Path(shards_dir)
    splits = {}
    for split, info in manifest.splits.items():
        members = [s.members if s.members is not None else scan_members(shards_dir / s.name) for s in info.shards]
        data = index_bytes(members)
        atomic_write_bytes(shards_dir / index_name(split), data)
        splits[split] = replace(info, index=IndexInfo(index_name(split), hashlib.sha256(data).hexdigest()))
    manifest = replace(manifest, splits=splits)
    atomic_write_text(shards_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


def write_prepared_folder(
    out: Path,
    classes: Sequence[ClassInfo],
    shards: Mapping[str, Sequence[Sequence[Sample]]],
    settings: Mapping[str, Any],
) -> Manifest:
    """A folder as `alexrepro prepare` leaves it, from samples already encoded: each split's shards
    (`<split>-000000.tar`, … one per list of samples, in order), their member indexes and manifest.json. The one
    writer of prepared folders besides prepare itself: tests and benchmarks build theirs with it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = {
        split: tuple(write_shard(out / shard_name(split, n), list(samples)) for n, samples in enumerate(lists))
        for split, lists in shards.items()
    }
    manifest = Manifest(
        settings=dict(settings),
        classes=tuple(classes),
        splits={split: SplitInfo(sum(i.count for i in written), written) for split, written in infos.items()},
    )
    return write_manifest(out, manifest)


def in_shards(samples: Sequence[Sample], shard_size: int) -> list[Sequence[Sample]]:
    """`samples` cut into shards of `shard_size`, in order (the last one shorter)."""
    return [samples[start : start + shard_size] for start in range(0, len(samples), shard_size)]
