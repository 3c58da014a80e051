"""ILSVRC-2012's label files: the devkit (`meta.mat` and the validation ground truth, archive or extracted folder)
and Kaggle's `LOC_synset_mapping.txt` and `LOC_val_solution.csv`."""

from __future__ import annotations

import csv
import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from alexrepro.core.errors import SourceError
from alexrepro.data.shards.manifest import ClassInfo
from alexrepro.data.sources.base import VAL_NUMBER, WNID, index_classes

DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"


DEVKIT_DIR = "ILSVRC2012_devkit_t12"


META_MAT = "data/meta.mat"


GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


LOC_MAPPING = "LOC_synset_mapping.txt"


LOC_SOLUTION = "LOC_val_solution.csv"


@dataclass(frozen=True)
class Devkit:
    """What the ILSVRC-2012 devkit says: the 1000 leaf classes and the val ground truth (ILSVRC2012_IDs by image)."""

    classes: tuple[ClassInfo, ...]
    val_ids: tuple[int, ...]  # val_ids[i] is the ILSVRC2012_ID of ILSVRC2012_val_{i+1:08d}

    def wnid_of_id(self) -> dict[int, str]:
        return {c.ilsvrc_id: c.wnid for c in self.classes if c.ilsvrc_id is not None}


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
    classes = index_classes((wnid, ilsvrc_id, words) for ilsvrc_id, wnid, words in leaves)
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
        if not WNID.fullmatch(wnid):
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
            if not tokens or not WNID.fullmatch(tokens[0]):
                raise SourceError(f"{path}:{number}: expected '<image id>,<wnid> <box> …', got {','.join(row)!r}")
            labels[row[0]] = tokens[0]
    return labels


def check_ground_truth_count(devkit: Devkit, images: int, where: str) -> None:
    if images != len(devkit.val_ids):
        raise SourceError(
            f"{where}: {images:,} val images, but the devkit's {GROUND_TRUTH} has {len(devkit.val_ids):,} lines (one "
            "per val image); the val set or the devkit is incomplete: download it again"
        )


def devkit_val_labels(devkit: Devkit, names: list[str], classes: tuple[ClassInfo, ...], where: str) -> list[int]:
    """Class index of each val file, matched by the image number in its name (line i of the ground truth = image i)."""
    index = {c.wnid: c.index for c in classes}
    wnid_of = devkit.wnid_of_id()
    labels = []
    for name in names:
        match = VAL_NUMBER.match(name)
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(devkit.val_ids):
            raise SourceError(
                f"{where}: {name!r} is not an ILSVRC2012_val_NNNNNNNN image covered by the devkit's "
                f"{len(devkit.val_ids)} ground-truth lines; remove it or sort val into class folders"
            )
        labels.append(index[wnid_of[devkit.val_ids[number - 1]]])
    return labels
