"""The official ILSVRC-2012 download read in place: `ILSVRC2012_img_train.tar` (one inner tar per class),
`ILSVRC2012_img_val.tar` and the devkit. Only member headers are read; each image is an (archive, offset, size)."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from alexrepro.core.errors import SourceError
from alexrepro.data.shards.manifest import RejectedFile
from alexrepro.data.sources.base import (
    WNID,
    ImageRef,
    ReadOptions,
    Source,
    check_every_class_has_images,
    checked,
    class_index,
    make_key,
)
from alexrepro.data.sources.labels import (
    DEVKIT_DIR,
    DEVKIT_TAR,
    check_ground_truth_count,
    devkit_val_labels,
    read_devkit,
)
from alexrepro.data.sources.listing import Listing, Member, decoded, listing

TRAIN_TAR = "ILSVRC2012_img_train.tar"


VAL_TAR = "ILSVRC2012_img_val.tar"


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


def _tar_members(tar_path: Path, handle, start: int = 0, size: int | None = None) -> tuple[list[Member], list[Member]]:
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
    files = [Member(m.name, m.offset_data, m.size, "file") for m in members if m.isfile()]
    others = [
        Member(
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


def from_archives(source: Path, listings: Path | None = None) -> Source:
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
    train_listing = listing(listings, train_tar, lambda: _list_train_tar(train_tar), saved)
    rejected: list[RejectedFile] = []
    inner_names = train_listing.groups
    for number, links in train_listing.others().items():
        rejected += _rejected_members("train", f"{TRAIN_TAR}/{inner_names[number]}", links)
    wnids = [PurePosixPath(inner).name.removesuffix(".tar") for inner in inner_names]
    files = train_listing.files()
    folder_wnids = sorted({wnids[g] for g in np.unique(files["group"]).tolist()})
    classes = devkit.classes
    index = class_index(classes, folder_wnids, f"{train_tar}", "devkit meta.mat")
    labels = [index.get(w, -1) for w in wnids]  # -1: a class tar with no images (then no ImageRef uses it)
    train = [
        ImageRef(
            make_key(name), labels[group], f"{TRAIN_TAR}/{inner_names[group]}/{name}", str(train_tar), offset, size
        )
        for group, name, offset, size in zip(
            files["group"].tolist(),
            decoded(files["name"]),
            files["offset"].tolist(),
            files["size"].tolist(),
            strict=True,
        )
    ]
    check_every_class_has_images(classes, train, str(train_tar))
    splits = {"train": checked(train)}
    val_tar = source / VAL_TAR
    if val_tar.is_file():
        val_listing = listing(listings, val_tar, lambda: _list_flat_tar(val_tar), saved)
        files, links = val_listing.files(), val_listing.others().get(0, [])
        check_ground_truth_count(devkit, len(files["name"]) + len(links), str(val_tar))
        rejected += _rejected_members("val", VAL_TAR, links)
        paths = decoded(files["name"])
        names = [PurePosixPath(m).name for m in paths]
        labels = devkit_val_labels(devkit, names, classes, str(val_tar))
        splits["val"] = checked(
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


def _list_train_tar(train_tar: Path) -> Listing:
    """Every header of the outer train tar and of each class tar inside it (offsets from the outer tar's start)."""
    groups = []
    with open(train_tar, "rb") as handle:
        inners, odd = _tar_members(train_tar, handle)
        for inner in inners + odd:
            wnid = PurePosixPath(inner.name).name.removesuffix(".tar")
            if inner.kind != "file" or not inner.name.endswith(".tar") or not WNID.fullmatch(wnid):
                raise SourceError(
                    f"{train_tar}: unexpected member {inner.name!r}; expected one nXXXXXXXX.tar per class"
                )
            members, links = _tar_members(Path(f"{train_tar}/{inner.name}"), handle, inner.offset, inner.size)
            groups.append((inner.name, [replace(m, offset=inner.offset + m.offset) for m in members], links))
    return Listing.of(groups)


def _list_flat_tar(tar_path: Path) -> Listing:
    with open(tar_path, "rb") as handle:
        return Listing.of([("", *_tar_members(tar_path, handle))])


def _rejected_members(split: str, where: str, members: list[Member]) -> list[RejectedFile]:
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


class ArchiveReader:
    """The official download: the train and val tars and the devkit, read in place."""

    looked_for = f"{TRAIN_TAR} (the official archives)"

    def recognises(self, path: Path) -> bool:
        return (path / TRAIN_TAR).is_file()

    def read(self, path: Path, options: ReadOptions) -> Source:
        return from_archives(path, options.listings)
