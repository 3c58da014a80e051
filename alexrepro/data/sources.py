"""Find the images of a dataset on disk and label them, whatever layout it came in.

`find_source(path)` recognises, in this order (REFERENCE.md §5):

- the official ILSVRC-2012 download: `ILSVRC2012_img_train.tar` (one inner `nXXXXXXXX.tar` per class),
  `ILSVRC2012_img_val.tar` (flat) and `ILSVRC2012_devkit_t12.tar.gz` (or its extracted folder); all three are
  needed. The archives are read in place: only member
  headers are read here, and each image becomes an (archive, offset, size) triple that a worker later reads with one
  seek and one read. Nothing is unpacked to disk or held in memory whole.
- the Kaggle layout: `ILSVRC/Data/CLS-LOC/{train,val}` with `LOC_synset_mapping.txt` and `LOC_val_solution.csv`
  at the top.
- an extracted tree: `train/<wnid>/…` with `val/<wnid>/…` (the valprep layout) or a flat `val/` labelled by the devkit
  (archive or extracted folder) or by Kaggle's `LOC_val_solution.csv`.
- an ImageFolder tree of one's own classes: `train/<class>/…`, optionally `val/<class>/…`.

Labels follow the Caffe/torchvision convention: the class index is the position of the WNID (or class folder name)
in sorted order. The devkit's ILSVRC2012_ID is kept beside it, because the ID order differs (ID 1 is n02119789,
sorted index 0 is n01440764). Files are recognised by content later, not by extension here: every regular file in a
class folder is an input (names starting with '.', such as `.DS_Store`, are not), so a file that is not an image ends
up in the rejected list instead of vanishing.
"""

from __future__ import annotations

import csv
import errno
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from alexrepro.core.atomic import atomic_write_bytes
from alexrepro.core.errors import SourceError
from alexrepro.data.shards.manifest import ClassInfo, RejectedFile

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_TREE = "ILSVRC/Data/CLS-LOC"
LOC_MAPPING = "LOC_synset_mapping.txt"
LOC_SOLUTION = "LOC_val_solution.csv"

_WNID = re.compile(r"n\d{8}")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One input image: where its bytes are, what to call it, and its class index.

    The bytes are `size` bytes at `offset` in `file` (a plain image file has offset 0 and its whole size), so the
    same reader serves images inside an archive and images on disk.
    """

    key: str  # shard key: the file stem with '.' replaced, so webdataset can split key from extension
    label: int  # class index (position in sorted WNID order)
    path: str  # where the image is, relative to the source folder, for people (the manifest's rejected list)
    file: str  # absolute path of the file that holds the bytes
    offset: int
    size: int


@dataclass(frozen=True)
class Source:
    """A recognised dataset: its layout, its classes and its images per split (train shuffled later, val sorted)."""

    layout: str
    classes: tuple[ClassInfo, ...]
    splits: dict[str, tuple[ImageRef, ...]]
    rejected: tuple[RejectedFile, ...] = ()  # inputs refused before any byte is read (symlink archive members)
    # Archive listings made by this call, as (file name, .npz bytes), for `save_listings` (archives only, and only
    # when find_source was given a listings folder that did not already hold them).
    listings: tuple[tuple[str, bytes], ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Devkit:
    """What the ILSVRC-2012 devkit says: the 1000 leaf classes and the val ground truth (ILSVRC2012_IDs by image)."""

    classes: tuple[ClassInfo, ...]
    val_ids: tuple[int, ...]  # val_ids[i] is the ILSVRC2012_ID of ILSVRC2012_val_{i+1:08d}

    def wnid_of_id(self) -> dict[int, str]:
        return {c.ilsvrc_id: c.wnid for c in self.classes if c.ilsvrc_id is not None}


def find_source(path: Path, follow_symlinks: bool = False, listings: Path | None = None) -> Source:
    """Recognise the layout of `path` and list its labelled images; raise SourceError saying what was looked for.

    In a folder tree, a symbolic link that points outside `path` is refused unless `follow_symlinks` is set; a
    dangling link or a link loop is always an error (the file it stood for would otherwise be lost silently).
    `listings`: a folder where archive listings saved by `save_listings` are looked for (prepare's state folder).
    """
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: source folder not found; pass the folder that holds the ILSVRC-2012 download")
    if (path / TRAIN_TAR).is_file():
        return _from_archives(path, listings)
    links = _Links(path, follow_symlinks)
    if (path / KAGGLE_TREE / "train").is_dir():
        return _from_tree(path, path / KAGGLE_TREE, "kaggle-cls-loc", links)
    if (path / "train").is_dir():
        return _from_tree(path, path, "extracted", links)
    raise SourceError(
        f"{path}: no known dataset layout; looked for {TRAIN_TAR} (the official archives), {KAGGLE_TREE}/train "
        "(Kaggle) and train/<class>/ (an extracted tree or ImageFolder); point SOURCE at the folder holding one of them"
    )


def make_key(name: str) -> str:
    """Shard key for a file name: its stem, with any '.' replaced by '_' (webdataset splits at the first '.')."""
    stem = PurePosixPath(name).stem
    return stem.replace(".", "_")


# ---------------------------------------------------------------------------------------------------------------------
# The devkit and Kaggle's label files


def read_devkit(source: Path) -> Devkit | None:
    """The devkit beside the data, as the original archive or extracted; None if neither is there."""
    archive = source / DEVKIT_TAR
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {PurePosixPath(m.name).parts[1:]: m for m in tar.getmembers() if m.isfile()}
                meta = _devkit_member(tar, members, META_MAT, archive)
                truth = _devkit_member(tar, members, GROUND_TRUTH, archive)
        except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
            raise SourceError(f"{archive}: unreadable devkit archive ({exc}); download it again") from None
        return _parse_devkit(meta, truth, str(archive))
    folder = source / DEVKIT_DIR
    if (folder / META_MAT).is_file():
        if not (folder / GROUND_TRUTH).is_file():
            raise SourceError(f"{folder / GROUND_TRUTH}: missing from the extracted devkit; extract the whole devkit")
        return _parse_devkit((folder / META_MAT).read_bytes(), (folder / GROUND_TRUTH).read_bytes(), str(folder))
    return None


def _devkit_member(tar: tarfile.TarFile, members: dict, name: str, archive: Path) -> bytes:
    member = members.get(PurePosixPath(name).parts)
    if member is None:
        raise SourceError(f"{archive}: no {DEVKIT_DIR}/{name} inside; download the ILSVRC-2012 devkit (t12) again")
    handle = tar.extractfile(member)
    if handle is None:  # a directory or a link, not the file the devkit holds
        raise SourceError(
            f"{archive}: {DEVKIT_DIR}/{name} is not a regular file; download the ILSVRC-2012 devkit again"
        )
    return handle.read()


def _parse_devkit(meta_mat: bytes, truth: bytes, where: str) -> Devkit:
    import scipy.io

    try:
        synsets = np.atleast_1d(scipy.io.loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"])
        leaves = [
            (int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]))
            for s in synsets
            if int(s["num_children"]) == 0  # leaf synsets are the 1000 classes; the rest are internal nodes
        ]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise SourceError(
            f"{where}: {META_MAT} is not an ILSVRC-2012 meta.mat ({exc}); download the devkit again"
        ) from None
    classes = _index_classes((wnid, ilsvrc_id, words) for ilsvrc_id, wnid, words in leaves)
    try:
        val_ids = tuple(int(line) for line in truth.decode("ascii").split())
    except (UnicodeDecodeError, ValueError):
        raise SourceError(
            f"{where}: {GROUND_TRUTH} must hold one ILSVRC2012_ID per line; download the devkit again"
        ) from None
    known = {c.ilsvrc_id for c in classes}
    unknown = sorted(set(val_ids) - known)
    if unknown:
        raise SourceError(f"{where}: ground truth uses ILSVRC2012_ID {unknown[0]}, not a leaf synset in meta.mat")
    return Devkit(classes=classes, val_ids=val_ids)


def read_loc_mapping(path: Path) -> dict[str, str]:
    """Kaggle's `LOC_synset_mapping.txt`: one `n01440764 tench, Tinca tinca` a line → {wnid: words}."""
    names = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, words = line.strip().partition(" ")
        if not _WNID.fullmatch(wnid):
            raise SourceError(f"{path}:{number}: expected '<wnid> <words>', got {line!r}")
        names[wnid] = words.strip()
    return names


def read_loc_solution(path: Path) -> dict[str, str]:
    """Kaggle's `LOC_val_solution.csv` → {image id: wnid}; the class is the first token of PredictionString."""
    with open(path, newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header != ["ImageId", "PredictionString"]:
            raise SourceError(f"{path}: expected the header 'ImageId,PredictionString', got {header}")
        labels = {}
        for number, row in enumerate(rows, 2):
            tokens = row[1].split() if len(row) == 2 else []
            if not tokens or not _WNID.fullmatch(tokens[0]):
                raise SourceError(f"{path}:{number}: expected '<image id>,<wnid> <box> …', got {','.join(row)!r}")
            labels[row[0]] = tokens[0]
    return labels


def _index_classes(entries: Iterable[tuple[str, int | None, str]]) -> tuple[ClassInfo, ...]:
    """ClassInfo for (wnid, ilsvrc_id, name) entries, indexed by sorted WNID (REFERENCE.md §5)."""
    entries = sorted(entries)
    wnids = [wnid for wnid, _, _ in entries]
    if len(set(wnids)) != len(wnids):
        duplicate = next(w for w in wnids if wnids.count(w) > 1)
        raise SourceError(f"class {duplicate} is listed twice; check the devkit or label files")
    return tuple(ClassInfo(index=i, wnid=w, ilsvrc_id=d, name=n) for i, (w, d, n) in enumerate(entries))


# ---------------------------------------------------------------------------------------------------------------------
# The official archives, read in place


class _Window(io.RawIOBase):
    """A read-only view of bytes [start, start + size) of an open file, so tarfile can walk an inner tar in place."""

    def __init__(self, handle: io.BufferedReader, start: int, size: int):
        self.handle, self.start, self.size, self.pos = handle, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        self.handle.seek(self.start + self.pos)
        data = self.handle.read(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


@dataclass(frozen=True, slots=True)
class _Member:
    """What the listing keeps of one tar header (a `tarfile.TarInfo` holds some 20 fields; at 1.3 M members that
    is most of the listing's memory)."""

    name: str
    offset: int  # of the member's data, from the start of the tar it is in
    size: int
    kind: str  # "file", "symlink", "hardlink" or "other" (devices, FIFOs); folders are left out
    linkname: str = ""


def _tar_members(
    tar_path: Path, handle, start: int = 0, size: int | None = None
) -> tuple[list[_Member], list[_Member]]:
    """Headers in the tar at [start, start + size) of `handle` (offsets relative to `start`): the regular files,
    and the members that are neither files nor folders (links, devices), which the caller rejects by name."""
    size = size if size is not None else os.fstat(handle.fileno()).st_size
    window = _Window(handle, start, size)
    try:
        with tarfile.open(fileobj=window, mode="r:") as tar:
            members = tar.getmembers()
            end = tar.offset
    except (tarfile.TarError, EOFError) as exc:
        raise SourceError(f"{tar_path}: not a readable tar archive ({exc}); download it again") from None
    _check_tar_end(tar_path, window, end, size, len(members))
    files = [_Member(m.name, m.offset_data, m.size, "file") for m in members if m.isfile()]
    others = [
        _Member(
            m.name, m.offset_data, m.size, "symlink" if m.issym() else "hardlink" if m.islnk() else "other", m.linkname
        )
        for m in members
        if not m.isfile() and not m.isdir()
    ]
    return files, others


def _check_tar_end(tar_path: Path, window: _Window, end: int, size: int, count: int) -> None:
    """tarfile stops walking, without a word, at the first header it cannot read after the first member, and at
    the end of the data. A whole archive ends with a zero block (the end-of-archive marker, POSIX ustar); if the
    walk stopped anywhere else, the archive is damaged or truncated and the members after that point would be lost.
    """
    window.seek(end)
    block = window.read(tarfile.BLOCKSIZE)
    if block == tarfile.NUL * tarfile.BLOCKSIZE:
        return
    if end >= size:
        problem = f"ends after {count} members without the end-of-archive marker (truncated at byte {size:,})"
    else:
        problem = f"has an unreadable member header at byte {end:,} of {size:,}, after {count} members"
    raise SourceError(f"{tar_path}: {problem}; the download is damaged, download it again")


def _from_archives(source: Path, listings: Path | None = None) -> Source:
    # The official download is three archives; without the val tar or the devkit, prepare would write shards
    # that train refuses later (no val split) or classes without their ILSVRC2012_IDs.
    if not (source / VAL_TAR).is_file():
        raise SourceError(
            f"{source}: {VAL_TAR} is missing beside {TRAIN_TAR}; download it (the official layout needs all three "
            f"archives), or lay the data out as train/ and val/ folders"
        )
    devkit = read_devkit(source)
    if devkit is None:
        raise SourceError(
            f"{source}: {DEVKIT_TAR} (or the extracted {DEVKIT_DIR}/) is missing beside {TRAIN_TAR}; download the "
            "ILSVRC-2012 devkit (t12): it holds the classes and the val labels"
        )
    train_tar = source / TRAIN_TAR
    saved: list[tuple[str, bytes]] = []
    train_listing = _listing(listings, train_tar, lambda: _list_train_tar(train_tar), saved)
    rejected: list[RejectedFile] = []
    inner_names = train_listing.groups
    for number, links in train_listing.others().items():
        rejected += _rejected_members("train", f"{TRAIN_TAR}/{inner_names[number]}", links)
    wnids = [PurePosixPath(inner).name.removesuffix(".tar") for inner in inner_names]
    files = train_listing.files()
    folder_wnids = sorted({wnids[g] for g in np.unique(files["group"]).tolist()})
    classes = devkit.classes
    index = _class_index(classes, folder_wnids, f"{train_tar}", "devkit meta.mat")
    labels = [index.get(w, -1) for w in wnids]  # -1: a class tar with no images (then no ImageRef uses it)
    train = [
        ImageRef(
            make_key(name), labels[group], f"{TRAIN_TAR}/{inner_names[group]}/{name}", str(train_tar), offset, size
        )
        for group, name, offset, size in zip(
            files["group"].tolist(),
            _decoded(files["name"]),
            files["offset"].tolist(),
            files["size"].tolist(),
            strict=True,
        )
    ]
    _check_every_class_has_images(classes, train, str(train_tar))
    splits = {"train": _checked(train)}
    val_tar = source / VAL_TAR
    if val_tar.is_file():
        val_listing = _listing(listings, val_tar, lambda: _list_flat_tar(val_tar), saved)
        files, links = val_listing.files(), val_listing.others().get(0, [])
        _check_ground_truth_count(devkit, len(files["name"]) + len(links), str(val_tar))
        rejected += _rejected_members("val", VAL_TAR, links)
        paths = _decoded(files["name"])
        names = [PurePosixPath(m).name for m in paths]
        labels = _devkit_val_labels(devkit, names, classes, str(val_tar))
        splits["val"] = _checked(
            [
                ImageRef(make_key(name), label, f"{VAL_TAR}/{path}", str(val_tar), offset, size)
                for path, name, label, offset, size in zip(
                    paths, names, labels, files["offset"].tolist(), files["size"].tolist(), strict=True
                )
            ]
        )
    return Source(
        layout="ilsvrc2012-archives", classes=classes, splits=splits, rejected=tuple(rejected), listings=tuple(saved)
    )


def _list_train_tar(train_tar: Path) -> _Listing:
    """Every header of the outer train tar and of each class tar inside it (offsets from the outer tar's start)."""
    groups = []
    with open(train_tar, "rb") as handle:
        inners, odd = _tar_members(train_tar, handle)
        for inner in inners + odd:
            wnid = PurePosixPath(inner.name).name.removesuffix(".tar")
            if inner.kind != "file" or not inner.name.endswith(".tar") or not _WNID.fullmatch(wnid):
                raise SourceError(
                    f"{train_tar}: unexpected member {inner.name!r}; expected one nXXXXXXXX.tar per class"
                )
            members, links = _tar_members(Path(f"{train_tar}/{inner.name}"), handle, inner.offset, inner.size)
            groups.append((inner.name, [replace(m, offset=inner.offset + m.offset) for m in members], links))
    return _Listing.of(groups)


def _list_flat_tar(tar_path: Path) -> _Listing:
    with open(tar_path, "rb") as handle:
        return _Listing.of([("", *_tar_members(tar_path, handle))])


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
class _Listing:
    """An archive's members in stored order: `group` numbers the inner tar (0 for a flat tar), `kind` indexes _KINDS."""

    groups: tuple[str, ...]  # inner tar names ("" for a flat tar)
    columns: dict[str, np.ndarray]  # group, name (utf-8 bytes), offset, size, kind, linkname (utf-8 bytes)

    @classmethod
    def of(cls, groups: list[tuple[str, list[_Member], list[_Member]]]) -> _Listing:
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

    def others(self) -> dict[int, list[_Member]]:
        """The members that are not regular files (links, devices), by group."""
        c = self.columns
        found: dict[int, list[_Member]] = {}
        for i in np.flatnonzero(c["kind"] != 0).tolist():
            name, linkname = _decoded(c["name"][i : i + 1])[0], _decoded(c["linkname"][i : i + 1])[0]
            member = _Member(name, int(c["offset"][i]), int(c["size"][i]), _KINDS[c["kind"][i]], linkname)
            found.setdefault(int(c["group"][i]), []).append(member)
        return found


def _decoded(values: np.ndarray) -> list[str]:
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


def _listing(folder: Path | None, archive: Path, make: Callable[[], _Listing], saved: list) -> _Listing:
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


def _cached_listing(folder: Path, archive: Path, key: str) -> _Listing | None:
    try:
        with np.load(folder / _listing_name(archive), allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                return None
            groups = tuple(str(g) for g in saved["groups"].tolist())
            columns = {name: saved[name] for name in ("group", "name", "offset", "size", "kind", "linkname")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing, unreadable or from another version: list the archive again
    return _Listing(groups, columns)


def save_listings(source: Source, folder: Path) -> None:
    """Persist the archive listings `find_source` made (none when it read them from `folder`), keyed to the archives
    as they were listed. Each file is written atomically; a listing is only a cache of what the archive holds."""
    for name, data in source.listings:
        atomic_write_bytes(Path(folder) / name, data)


def _rejected_members(split: str, where: str, members: list[_Member]) -> list[RejectedFile]:
    """Links and other non-files in an archive: listed as rejected rather than followed or dropped."""
    return [
        RejectedFile(
            split,
            f"{where}/{m.name}",
            f"symbolic link to {m.linkname!r}, not an image"
            if m.kind == "symlink"
            else f"hard link to {m.linkname!r}, not an image"
            if m.kind == "hardlink"
            else "not a regular file",
        )
        for m in members
    ]


def _check_every_class_has_images(classes: tuple[ClassInfo, ...], train: list[ImageRef], where: str) -> None:
    """A class with no training image means a class tar or folder went missing (or a label file lists too many)."""
    present = {ref.label for ref in train}
    empty = [c for c in classes if c.index not in present]
    if empty:
        names = ", ".join(c.wnid for c in empty[:5]) + (" …" if len(empty) > 5 else "")
        raise SourceError(
            f"{where}: {len(empty)} of {len(classes)} classes have no training images ({names}); the download is "
            "incomplete or damaged, or the label file lists classes the data lacks"
        )


def _check_ground_truth_count(devkit: Devkit, images: int, where: str) -> None:
    if images != len(devkit.val_ids):
        raise SourceError(
            f"{where}: {images:,} val images, but the devkit's {GROUND_TRUTH} has {len(devkit.val_ids):,} lines (one "
            "per val image); the val set or the devkit is incomplete: download it again"
        )


def _devkit_val_labels(devkit: Devkit, names: list[str], classes: tuple[ClassInfo, ...], where: str) -> list[int]:
    """Class index of each val file, matched by the image number in its name (line i of the ground truth = image i)."""
    index = {c.wnid: c.index for c in classes}
    wnid_of = devkit.wnid_of_id()
    labels = []
    for name in names:
        match = _VAL_NUMBER.match(name)
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(devkit.val_ids):
            raise SourceError(
                f"{where}: {name!r} is not an ILSVRC2012_val_NNNNNNNN image covered by the devkit's "
                f"{len(devkit.val_ids)} ground-truth lines; remove it or sort val into class folders"
            )
        labels.append(index[wnid_of[devkit.val_ids[number - 1]]])
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# Extracted trees: ILSVRC or Kaggle, and ImageFolder trees of one's own classes


def _from_tree(source: Path, root: Path, tree: str, links: _Links) -> Source:
    train_dir, val_dir = root / "train", root / "val"
    train_classes = _class_folders(train_dir, links)
    if not train_classes:
        raise SourceError(f"{train_dir}: no class folders; expected train/<class>/<image files>")
    ilsvrc = all(_WNID.fullmatch(c) for c in train_classes)
    devkit = read_devkit(source) if ilsvrc else None
    mapping = source / LOC_MAPPING
    names = read_loc_mapping(mapping) if ilsvrc and mapping.is_file() else {}
    if devkit:
        classes = devkit.classes
    elif names:
        classes = _index_classes((w, None, words) for w, words in names.items())
    else:
        classes = _index_classes((c, None, c) for c in train_classes)
    layout = tree if ilsvrc else "imagefolder"

    index = _class_index(classes, train_classes, str(train_dir), _label_file_name(devkit, names))
    train = _folder_images(source, train_dir, train_classes, index, links)
    _check_every_class_has_images(classes, train, str(train_dir))
    splits = {"train": _checked(train)}
    if val_dir.is_dir():
        val_classes = _class_folders(val_dir, links)
        loose = _files_in(val_dir, links, recursive=False)
        if val_classes and loose:
            raise SourceError(
                f"{val_dir}: holds both class folders and loose files ({loose[0].name}); use one or the other"
            )
        if val_classes:
            index = _class_index(classes, val_classes, str(val_dir), "train/")
            splits["val"] = _checked(_folder_images(source, val_dir, val_classes, index, links))
            layout += ", val in class folders"
        elif loose:
            splits["val"], how = _flat_val(source, loose, classes, devkit)
            layout += f", flat val labelled by {how}"
    return Source(layout=layout, classes=classes, splits=splits)


def _flat_val(source: Path, files: list[Path], classes, devkit: Devkit | None) -> tuple[tuple[ImageRef, ...], str]:
    solution = source / LOC_SOLUTION
    names = [f.name for f in files]
    if devkit is not None:
        _check_ground_truth_count(devkit, len(files), str(files[0].parent))
        labels = _devkit_val_labels(devkit, names, classes, str(files[0].parent))
        how = "devkit"
    elif solution.is_file():
        wnids = read_loc_solution(solution)
        index = {c.wnid: c.index for c in classes}
        labels = []
        for f in files:
            wnid = wnids.get(f.stem)
            if wnid is None:
                raise SourceError(f"{f}: no row for {f.stem!r} in {solution}; remove the file or add its label")
            if wnid not in index:
                raise SourceError(f"{solution}: {f.stem} is labelled {wnid}, which is not one of the train classes")
            labels.append(index[wnid])
        how = LOC_SOLUTION
    else:
        raise SourceError(
            f"{files[0].parent}: flat val/ needs labels: put {DEVKIT_TAR} (or the extracted {DEVKIT_DIR}/) or "
            f"Kaggle's {LOC_SOLUTION} in {source}, or sort val into class folders"
        )
    refs = [_file_ref(source, f, label) for f, label in zip(files, labels, strict=True)]
    return _checked(refs), how


def _class_index(classes: tuple[ClassInfo, ...], folders: Iterable[str], where: str, listed_in: str) -> dict[str, int]:
    index = {c.wnid: c.index for c in classes}
    for folder in folders:
        if folder not in index:
            raise SourceError(f"{where}: class {folder!r} is not listed in {listed_in}; remove it or fix the labels")
    return index


def _label_file_name(devkit: Devkit | None, names: dict[str, str]) -> str:
    return "devkit meta.mat" if devkit else LOC_MAPPING if names else "train/"


class _Links:
    """The symlink policy of a folder source: links inside it are followed; links that point outside it only when
    the user asked (`follow_symlinks`); dangling links and link loops are errors, never skipped."""

    def __init__(self, source: Path, follow: bool):
        self.source, self.real, self.follow = source, os.path.realpath(source), follow

    def check(self, path: Path) -> None:
        """Raise SourceError unless the symlink `path` leads to an existing file or folder we may read."""
        try:
            os.stat(path)
        except FileNotFoundError:
            raise SourceError(
                f"{path}: dangling symbolic link (to {os.readlink(path)!r}); fix its target or remove it"
            ) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise SourceError(f"{path}: symbolic link loop; fix or remove the link") from None
        target = os.path.realpath(path)
        if not self.follow and os.path.commonpath([target, self.real]) != self.real:
            raise SourceError(
                f"{path}: symbolic link to {target}, outside the source {self.source}; pass --set follow_symlinks=true "
                "to read files through such links, or copy them in"
            )


def _class_folders(folder: Path, links: _Links) -> list[str]:
    names = []
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            links.check(Path(entry.path))
        if entry.is_dir():
            names.append(entry.name)
    return sorted(names)


def _files_in(folder: Path, links: _Links, recursive: bool = True) -> list[Path]:
    """Regular files under `folder` (names starting with '.' left out), sorted by path.

    Written out rather than os.walk(followlinks=True), which loops forever on a link to an ancestor folder and
    silently skips dangling links."""
    found: list[Path] = []

    def visit(directory: Path, ancestors: frozenset[str]) -> None:
        for entry in os.scandir(directory):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                links.check(path)
            if entry.is_file():
                found.append(path)
            elif entry.is_dir() and recursive:
                real = os.path.realpath(path)
                if real in ancestors:
                    raise SourceError(f"{path}: symbolic link loop (leads back to {real}); fix or remove the link")
                visit(path, ancestors | {real})

    visit(folder, frozenset({os.path.realpath(folder)}))
    return sorted(found)


def _folder_images(
    source: Path, split_dir: Path, folders: list[str], index: dict[str, int], links: _Links
) -> list[ImageRef]:
    return [_file_ref(source, f, index[c]) for c in folders for f in _files_in(split_dir / c, links)]


def _file_ref(source: Path, file: Path, label: int) -> ImageRef:
    return ImageRef(
        key=make_key(file.name),
        label=label,
        path=file.relative_to(source).as_posix(),
        file=str(file.resolve()),
        offset=0,
        size=file.stat().st_size,
    )


def _checked(refs: list[ImageRef]) -> tuple[ImageRef, ...]:
    """`refs` in file-name order, after checking that no two files share a shard key."""
    refs = sorted(refs, key=lambda r: (PurePosixPath(r.path).name, r.path))
    seen: dict[str, ImageRef] = {}
    for ref in refs:
        other = seen.setdefault(ref.key, ref)
        if other is not ref:
            raise SourceError(
                f"{other.path} and {ref.path} both become shard key {ref.key!r}; rename one of them "
                "(keys are file names without extension, '.' replaced by '_')"
            )
    return tuple(refs)


def fingerprint(refs: Iterable[ImageRef]) -> str:
    """sha256 over what identifies the inputs (key, label, relative path, offset, size), not where the source sits."""
    digest = hashlib.sha256()
    for r in refs:
        digest.update(f"{r.key}\t{r.label}\t{r.path}\t{r.offset}\t{r.size}\n".encode())
    return digest.hexdigest()
