"""What every source reader produces: a `Source` (its layout, classes and labelled `ImageRef`s per split), and the
checks and helpers all readers share."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from alexrepro.core.errors import SourceError
from alexrepro.data.shards.manifest import ClassInfo, RejectedFile

WNID = re.compile(r"n\d{8}")
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")


@dataclass(frozen=True)
class ReadOptions:
    """How a reader lists a source: whether symbolic links out of a folder tree are followed (refused otherwise),
    and the folder where archive listings saved by an earlier run are looked for (prepare's state folder)."""

    follow_symlinks: bool = False
    listings: Path | None = None


class SourceReader(Protocol):
    """One download layout. `registry.READERS` asks each, in order, whether it recognises a folder."""

    looked_for: str  # what it looks for, as the error for an unknown layout lists it

    def recognises(self, path: Path) -> bool:
        """Whether `path` holds this layout (a cheap look at a few names, nothing read)."""
        ...

    def read(self, path: Path, options: ReadOptions) -> Source:
        """The layout's classes and labelled images per split; SourceError saying what is wrong otherwise."""
        ...


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


# A shard member is `<key>.jpg` or `<key>.cls` in a USTAR header's 100-byte name field: a key of more bytes than this
# would be found only when a worker writes its shard, after others have written theirs.
MAX_KEY_BYTES = 95


def make_key(name: str) -> str:
    """Shard key for a file name: its stem, with any '.' replaced by '_' (webdataset splits at the first '.'). A stem
    too long for the shard format keeps its first bytes and gets a digest of the whole stem, so that it stays
    unique and the same on every run."""
    key = PurePosixPath(name).stem.replace(".", "_")
    data = key.encode("utf-8", "surrogateescape")
    if len(data) <= MAX_KEY_BYTES:
        return key
    digest = hashlib.sha256(data).hexdigest()[:16]
    head = data[: MAX_KEY_BYTES - len(digest) - 1].decode("utf-8", "ignore")  # never half a character
    return f"{head}_{digest}"


def printable(path: str) -> str:
    """A path as a person can read it, whatever bytes its name holds (undecodable ones as \\xNN)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------------------------------
# The devkit and Kaggle's label files


def index_classes(entries: Iterable[tuple[str, int | None, str]]) -> tuple[ClassInfo, ...]:
    """ClassInfo for (wnid, ilsvrc_id, name) entries, indexed by sorted WNID (REFERENCE.md §5)."""
    entries = sorted(entries)
    wnids = [wnid for wnid, _, _ in entries]
    if len(set(wnids)) != len(wnids):
        duplicate = next(w for w in wnids if wnids.count(w) > 1)
        raise SourceError(f"class {duplicate} is listed twice; check the devkit or label files")
    return tuple(ClassInfo(index=i, wnid=w, ilsvrc_id=d, name=n) for i, (w, d, n) in enumerate(entries))


# ---------------------------------------------------------------------------------------------------------------------
# The official archives, read in place


def check_every_class_has_images(
    classes: tuple[ClassInfo, ...], refs: list[ImageRef], where: str, split: str = "train", own_data: bool = False
) -> None:
    """A class with no image in a split: for the ILSVRC download, a class tar or folder went missing (or a label
    file lists too many); for one's own ImageFolder, an empty class folder. Said in the words of the layout."""
    present = {ref.label for ref in refs}
    empty = [c for c in classes if c.index not in present]
    if not empty:
        return
    names = ", ".join(c.wnid for c in empty[:5]) + (" …" if len(empty) > 5 else "")
    count = f"{len(empty)} of {len(classes)} classes {'has' if len(empty) == 1 else 'have'}"
    images = "training images" if split == "train" else f"{split} images"
    if own_data:
        raise SourceError(
            f"{where}: {count} no {images} ({names}); put images in each class folder, or remove the empty folder "
            "(the class with it)"
        )
    raise SourceError(
        f"{where}: {count} no {images} ({names}); the download is incomplete or damaged, or the label file lists "
        "classes the data lacks"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Extracted trees: ILSVRC or Kaggle, and ImageFolder trees of one's own classes


def checked(refs: list[ImageRef]) -> tuple[ImageRef, ...]:
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


def class_index(classes: tuple[ClassInfo, ...], folders: Iterable[str], where: str, listed_in: str) -> dict[str, int]:
    index = {c.wnid: c.index for c in classes}
    for folder in folders:
        if folder not in index:
            raise SourceError(f"{where}: class {folder!r} is not listed in {listed_in}; remove it or fix the labels")
    return index
