"""Folder trees: an extracted ILSVRC-2012 (`train/<wnid>/`, `val/<wnid>/` or a flat `val/` labelled by the devkit or
Kaggle's solution file), Kaggle's `ILSVRC/Data/CLS-LOC`, and an ImageFolder of one's own classes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from alexrepro.core.errors import SourceError
from alexrepro.data.sources.base import (
    WNID,
    ImageRef,
    ReadOptions,
    Source,
    check_every_class_has_images,
    checked,
    class_index,
    index_classes,
    make_key,
    printable,
)
from alexrepro.data.sources.labels import (
    DEVKIT_DIR,
    DEVKIT_TAR,
    LOC_MAPPING,
    LOC_SOLUTION,
    Devkit,
    check_ground_truth_count,
    devkit_val_labels,
    read_devkit,
    read_loc_mapping,
    read_loc_solution,
)

KAGGLE_TREE = "ILSVRC/Data/CLS-LOC"


def from_tree(source: Path, root: Path, tree: str, links: Links) -> Source:
    train_dir, val_dir = root / "train", root / "val"
    train_classes = _class_folders(train_dir, links)
    if not train_classes:
        raise SourceError(f"{train_dir}: no class folders; expected train/<class>/<image files>")
    ilsvrc = all(WNID.fullmatch(c) for c in train_classes)
    devkit = read_devkit(source) if ilsvrc else None
    mapping = source / LOC_MAPPING
    names = read_loc_mapping(mapping) if ilsvrc and mapping.is_file() else {}
    if devkit:
        classes = devkit.classes
    elif names:
        classes = index_classes((w, None, words) for w, words in names.items())
    else:
        classes = index_classes((c, None, c) for c in train_classes)
    layout = tree if ilsvrc else "imagefolder"

    index = class_index(classes, train_classes, str(train_dir), _label_file_name(devkit, names))
    train = _folder_images(source, train_dir, train_classes, index, links)
    check_every_class_has_images(classes, train, str(train_dir), own_data=not ilsvrc)
    splits = {"train": checked(train)}
    if val_dir.is_dir():
        val_classes = _class_folders(val_dir, links)
        loose = _files_in(val_dir, links, recursive=False)
        if val_classes and loose:
            raise SourceError(
                f"{val_dir}: holds both class folders and loose files ({loose[0].name}); use one or the other"
            )
        if val_classes:
            index = class_index(classes, val_classes, str(val_dir), "train/")
            val = _folder_images(source, val_dir, val_classes, index, links)
            # A val class folder with no image is as much a mistake as a train one (one that is absent is allowed:
            # a val split may cover fewer classes).
            empty = [c for c in val_classes if not any(ref.label == index[c] for ref in val)]
            if empty:
                present = tuple(c for c in classes if c.wnid in empty)
                check_every_class_has_images(present, val, str(val_dir), "val", own_data=not ilsvrc)
            splits["val"] = checked(val)
            layout += ", val in class folders"
        elif loose:
            splits["val"], how = _flat_val(source, loose, classes, devkit)
            layout += f", flat val labelled by {how}"
    return Source(layout=layout, classes=classes, splits=splits)


def _flat_val(source: Path, files: list[Path], classes, devkit: Devkit | None) -> tuple[tuple[ImageRef, ...], str]:
    solution = source / LOC_SOLUTION
    names = [f.name for f in files]
    if devkit is not None:
        check_ground_truth_count(devkit, len(files), str(files[0].parent))
        labels = devkit_val_labels(devkit, names, classes, str(files[0].parent))
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
    return checked(refs), how


def _label_file_name(devkit: Devkit | None, names: dict[str, str]) -> str:
    return "devkit meta.mat" if devkit else LOC_MAPPING if names else "train/"


class Links:
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


def _class_folders(folder: Path, links: Links) -> list[str]:
    names = []
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            links.check(Path(entry.path))
        if entry.is_dir():
            names.append(entry.name)
    return sorted(names)


def _files_in(folder: Path, links: Links, recursive: bool = True) -> list[Path]:
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
    source: Path, split_dir: Path, folders: list[str], index: dict[str, int], links: Links
) -> list[ImageRef]:
    return [_file_ref(source, f, index[c]) for c in folders for f in _files_in(split_dir / c, links)]


def _file_ref(source: Path, file: Path, label: int) -> ImageRef:
    try:
        file.name.encode("utf-8")
    except UnicodeEncodeError:  # the name's bytes are not UTF-8 (Python keeps them as surrogates)
        raise SourceError(
            f"{printable(str(file))}: the file name is not valid UTF-8 (keys, the manifest and the report need text); "
            "rename it, e.g. with `convmv -f latin1 -t utf8 -r --notest FOLDER`"
        ) from None
    return ImageRef(
        key=make_key(file.name),
        label=label,
        path=file.relative_to(source).as_posix(),
        file=str(file.resolve()),
        offset=0,
        size=file.stat().st_size,
    )


class KaggleReader:
    """Kaggle's ILSVRC/Data/CLS-LOC tree with its two label files."""

    looked_for = f"{KAGGLE_TREE}/train (Kaggle)"

    def recognises(self, path: Path) -> bool:
        return (path / KAGGLE_TREE / "train").is_dir()

    def read(self, path: Path, options: ReadOptions) -> Source:
        return from_tree(path, path / KAGGLE_TREE, "kaggle-cls-loc", Links(path, options.follow_symlinks))


class TreeReader:
    """An extracted ILSVRC-2012 or an ImageFolder of one's own classes: train/<class>/, and val/ if there is one."""

    looked_for = "train/<class>/ (an extracted tree or ImageFolder)"

    def recognises(self, path: Path) -> bool:
        return (path / "train").is_dir()

    def read(self, path: Path, options: ReadOptions) -> Source:
        return from_tree(path, path, "extracted", Links(path, options.follow_symlinks))
