"""The shard format: webdataset tar files of 256×256 JPEGs, and the `manifest.json` that describes them.

Layout of a prepared folder (DESIGN.md "Files and formats"):

    train-000000.tar …   deterministic shuffle of the whole train set (every shard mixes classes)
    val-000000.tar …     validation images in file-name order
    manifest.json        format, version, settings, classes, splits (counts, shard names, sha256), rejected

Each sample in a shard is two tar members with the webdataset naming convention: `<key>.jpg` (RGB JPEG) and
`<key>.cls` (class index as ASCII decimal). Keys are source file stems (`n01440764_10026`,
`ILSVRC2012_val_00000001`) and never contain a dot, because webdataset splits key from extension at the first dot.

Tars are written with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0444) so the same input and settings
give byte-identical shards on any machine and with any worker count.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from alexrepro.atomic import atomic_open, atomic_write_text
from alexrepro.errors import FormatError

FORMAT = "alexrepro-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


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


@dataclass(frozen=True)
class SplitInfo:
    count: int
    shards: tuple[ShardInfo, ...]


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise FormatError(f"manifest has no '{name}' split (it has {sorted(self.splits)}); prepare a source that has one")
        return self.splits[name]

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "settings": self.settings,
            "classes": [asdict(c) for c in self.classes],
            "splits": {
                name: {"count": s.count, "shards": [asdict(sh) for sh in s.shards]} for name, s in self.splits.items()
            },
            "rejected": [asdict(r) for r in self.rejected],
        }
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise FormatError(f"{source}: not valid JSON; rerun `alexrepro prepare` to rewrite it") from None
        check_format(data, FORMAT, VERSION, source, "alexrepro prepare")
        try:
            return cls(
                settings=dict(data["settings"]),
                classes=tuple(ClassInfo(**c) for c in data["classes"]),
                splits={
                    name: SplitInfo(count=int(s["count"]), shards=tuple(ShardInfo(**sh) for sh in s["shards"]))
                    for name, s in data["splits"].items()
                },
                rejected=tuple(RejectedFile(**r) for r in data.get("rejected", [])),
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"{source}: malformed manifest ({exc}); rerun `alexrepro prepare`") from None


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


def read_manifest(shards_dir: Path) -> Manifest:
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{path}: no manifest; run `alexrepro prepare SOURCE {shards_dir}` first")
    return Manifest.from_json(path.read_text(), str(path))


def write_manifest(shards_dir: Path, manifest: Manifest) -> None:
    atomic_write_text(Path(shards_dir) / MANIFEST_NAME, manifest.to_json())


def manifest_sha256(shards_dir: Path) -> str:
    """Identity of a prepared dataset: the hash of its manifest (which holds every shard's hash)."""
    return hashlib.sha256((Path(shards_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def shard_paths(shards_dir: Path, manifest: Manifest, split: str) -> list[Path]:
    return [Path(shards_dir) / s.name for s in manifest.split(split).shards]


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


def write_shard(path: Path, samples: Iterable[Sample]) -> ShardInfo:
    """Write `samples` as a webdataset tar at `path` (atomically) and return its name, count and sha256."""
    count = 0
    digest = hashlib.sha256()

    class _Hashing(io.RawIOBase):
        def __init__(self, inner):
            self.inner = inner

        def writable(self):
            return True

        def write(self, b):
            digest.update(b)
            return self.inner.write(b)

    with atomic_open(path) as handle:
        with tarfile.open(fileobj=_Hashing(handle), mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if "." in sample.key or "/" in sample.key:
                    raise ValueError(f"shard key {sample.key!r} must not contain '.' or '/'")
                tar.addfile(*_member(f"{sample.key}.jpg", sample.jpeg))
                tar.addfile(*_member(f"{sample.key}.cls", str(sample.label).encode("ascii")))
                count += 1
    return ShardInfo(name=Path(path).name, count=count, sha256=digest.hexdigest())


def iter_shard(path: Path) -> Iterator[Sample]:
    """Yield the samples of one shard in stored order (a plain tar reader; no webdataset needed)."""
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                parts = pending.setdefault(key, {})
                parts[ext] = data
                if "jpg" in parts and "cls" in parts:
                    del pending[key]
                    yield Sample(key=key, jpeg=parts["jpg"], label=int(parts["cls"]))
    except (tarfile.TarError, OSError) as exc:
        raise FormatError(f"{path}: unreadable shard ({exc}); rerun `alexrepro prepare` to rewrite it") from None
    if pending:
        raise FormatError(f"{path}: samples {sorted(pending)[:3]} lack a .jpg or .cls member; rerun `alexrepro prepare`")


def iter_split(shards_dir: Path, split: str, manifest: Manifest | None = None) -> Iterator[Sample]:
    """Every sample of a split, shard after shard, in stored order."""
    manifest = manifest or read_manifest(shards_dir)
    for path in shard_paths(shards_dir, manifest, split):
        yield from iter_shard(path)
