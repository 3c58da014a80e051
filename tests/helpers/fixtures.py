"""Tiny ILSVRC-2012 look-alikes in every layout `prepare` reads, and broken files of every kind.

A `TinySet` is a few 64-pixel images per class; the `write_*` helpers lay it out as the three official archives,
an extracted tree (val in class folders or flat, labelled by the devkit or Kaggle's CSV), the Kaggle CLS-LOC tree or
an ImageFolder of one's own classes. ILSVRC2012_IDs are given in an order unlike sorted WNID order, so a label that
goes through the wrong mapping shows up.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

# (wnid, ILSVRC2012_ID, words): IDs deliberately not in sorted-WNID order.
CLASSES = (
    ("n01000003", 1, "gamma, third class"),
    ("n01000001", 2, "alpha, first class"),
    ("n01000002", 3, "beta, second class"),
)
INTERNAL_NODE = ("n00000001", 1001, "entity")  # a non-leaf synset, which meta.mat also lists


def image_bytes(seed: int, width: int = 64, height: int = 48, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small deterministic image: smooth colour gradients plus noise, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    pixels = (base + 80 * np.sin(x[..., None] / (3 + seed % 5)) + rng.normal(0, 20, (height, width, 3))) % 256
    image = Image.fromarray(pixels.astype(np.uint8), "RGB").convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def truncated_jpeg() -> bytes:
    return image_bytes(99)[:300]


def not_an_image() -> bytes:
    return b"this is a text file that was saved with a .JPEG name\n"


def decompression_bomb() -> bytes:
    """A PNG whose header claims 30000×30000 pixels (900 M): rejected before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)  # 8-bit grayscale
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


BROKEN = {"truncated": truncated_jpeg, "empty": lambda: b"", "text": not_an_image, "bomb": decompression_bomb}


@dataclass
class TinySet:
    """Images by class: train[wnid] = [(file name, bytes)], val = [(file name, wnid, bytes)] in file-name order."""

    classes: tuple = CLASSES
    train: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    val: list[tuple[str, str, bytes]] = field(default_factory=list)

    @property
    def val_ids(self) -> list[int]:
        """Ground-truth lines: the ILSVRC2012_ID of each val image, in file-name order."""
        ids = {wnid: ilsvrc_id for wnid, ilsvrc_id, _ in self.classes}
        return [ids[wnid] for _, wnid, _ in self.val]

    def label(self, wnid: str) -> int:
        return sorted(w for w, _, _ in self.classes).index(wnid)


def tiny_set(train_per_class: int = 4, val_images: int = 6, broken: dict[str, str] | None = None) -> TinySet:
    """A deterministic TinySet; `broken` maps a file name to a BROKEN kind, added to the first class's train images."""
    tiny = TinySet()
    for c, (wnid, _, _) in enumerate(CLASSES):
        size = (64, 48) if c % 2 == 0 else (40, 64)  # landscape and portrait
        tiny.train[wnid] = [
            (f"{wnid}_{i}.JPEG", image_bytes(100 * c + i, *size)) for i in range(1, train_per_class + 1)
        ]
    for name, kind in (broken or {}).items():
        tiny.train[CLASSES[0][0]].append((name, BROKEN[kind]()))
    for i in range(1, val_images + 1):
        wnid = CLASSES[(i * 2) % len(CLASSES)][0]
        tiny.val.append((f"ILSVRC2012_val_{i:08d}.JPEG", wnid, image_bytes(1000 + i)))
    return tiny


# ---------------------------------------------------------------------------------------------------------------------
# The devkit


def meta_mat_bytes(leaves, internal=(INTERNAL_NODE,)) -> bytes:
    """meta.mat as the devkit has it: a struct array `synsets` with the real field names, leaves and internal nodes."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height"]
    fields.append("num_train_images")
    rows = [(float(i), w, words, f"gloss of {w}", 0.0, np.zeros((1, 0)), 0.0, 4.0) for w, i, words in leaves]
    rows += [
        (float(i), w, words, "an internal node", float(len(leaves)), np.arange(1.0, len(leaves) + 1), 1.0, 0.0)
        for w, i, words in internal
    ]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for r, row in enumerate(rows):
        for f, value in zip(fields, row, strict=True):
            synsets[r, 0][f] = value
    out = io.BytesIO()
    scipy.io.savemat(out, {"synsets": synsets})
    return out.getvalue()


def ground_truth_bytes(ids) -> bytes:
    return "".join(f"{i}\n" for i in ids).encode()


def write_devkit_archive(folder: Path, leaves, val_ids) -> Path:
    files = {
        "ILSVRC2012_devkit_t12/data/meta.mat": meta_mat_bytes(leaves),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": ground_truth_bytes(val_ids),
        "ILSVRC2012_devkit_t12/COPYING": b"devkit licence\n",
    }
    path = Path(folder) / "ILSVRC2012_devkit_t12.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            _add(tar, name, data)
    return path


def write_devkit_folder(folder: Path, leaves, val_ids) -> None:
    data = Path(folder) / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "meta.mat").write_bytes(meta_mat_bytes(leaves))
    (data / "ILSVRC2012_validation_ground_truth.txt").write_bytes(ground_truth_bytes(val_ids))


# ---------------------------------------------------------------------------------------------------------------------
# Layouts


def write_archives(folder: Path, tiny: TinySet) -> Path:
    """The official download: train tar of inner per-class tars, flat val tar (not in name order), devkit."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in sorted(tiny.train, reverse=True):  # member order need not be sorted either
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for name, data in tiny.train[wnid]:
                    _add(tar, name, data)
            _add(outer, f"{wnid}.tar", inner.getvalue())
    order = sorted(range(len(tiny.val)), key=lambda i: (i * 7) % len(tiny.val) if tiny.val else 0)
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for i in order:
            _add(tar, tiny.val[i][0], tiny.val[i][2])
    write_devkit_archive(folder, tiny.classes, tiny.val_ids)
    return folder


def write_tree(root: Path, tiny: TinySet, val: str = "folders") -> Path:
    """`root/train/<wnid>/…` and `root/val/<wnid>/…` (val="folders") or a flat `root/val/` (val="flat")."""
    root = Path(root)
    for wnid, images in tiny.train.items():
        for name, data in images:
            _write(root / "train" / wnid / name, data)
    for name, wnid, data in tiny.val:
        _write(root / "val" / (wnid if val == "folders" else "") / name, data)
    return root


def write_loc_files(folder: Path, tiny: TinySet) -> None:
    folder = Path(folder)
    lines = [f"{wnid} {words}\n" for wnid, _, words in sorted(tiny.classes)]
    (folder / "LOC_synset_mapping.txt").write_text("".join(lines))
    rows = [f"{Path(name).stem},{wnid} 1 2 30 40 {wnid} 5 6 20 30\n" for name, wnid, _ in tiny.val]
    (folder / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))


def write_kaggle(folder: Path, tiny: TinySet) -> Path:
    folder = Path(folder)
    write_tree(folder / "ILSVRC" / "Data" / "CLS-LOC", tiny, val="flat")
    write_loc_files(folder, tiny)
    return folder


def write_own_classes(root: Path, per_class: int = 3, val_per_class: int = 1) -> Path:
    """An ImageFolder of classes that are not WNIDs, with nested folders and a dotted file name."""
    root = Path(root)
    for c, name in enumerate(["zebra", "apple", "Mango"]):
        for i in range(per_class):
            _write(root / "train" / name / f"{name}-{i}.jpg", image_bytes(500 + 10 * c + i))
        for i in range(val_per_class):
            _write(root / "val" / name / "sub" / f"{name}.val.{i}.png", image_bytes(600 + 10 * c + i, fmt="PNG"))
    return root


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_340_000_000
    tar.addfile(info, io.BytesIO(data))
