"""An ILSVRC-2012-shaped download at any fraction of the real counts: `alexrepro sample OUT --scale 1/64`.

The built-in sample (alexrepro.synth.sample) is for learning: 16 pattern classes at ImageNet image sizes. This one is for
measuring how every stage behaves at ImageNet's *counts* (REFERENCE.md §5):

    1000 classes whose per-class train counts have the real spread (732 … 1300, 1,281,167 in all at scale 1),
    50 val images per class at scale 1 (50,000) with the devkit's ground-truth file,
    an outer train tar of 1000 inner tars, a flat val tar in shuffled order,
    a meta.mat whose ILSVRC2012_IDs are not in sorted WNID order and which holds internal WordNet-style nodes.

At a scale s every class keeps max(1, round(count·s)) train images and max(1, round(50·s)) val images, so the
class structure is the same at every scale; only the images per class shrink. Images are tiny (shorter side
40–80 px) with the real set's mix of aspect ratios, so the full count is a few GB and minutes to write.

Why a second renderer: drawing each picture from scratch (alexrepro.synth.sample.render_image) costs about 1 ms even at
60 px, 20 minutes of CPU for 1.28 M images. Instead each worker draws a small bank of 128×128 pictures per
pattern once (from the seed alone), and every image is a random crop of one of them, mirrored or not, resized to
its own size and saved at its own JPEG quality: about 0.25 ms with its tar entry (326 CPU-seconds for the
full count, docs/benchmarks.md). Class i shows pattern (i mod 16), so only 16 classes
are visually distinct; that is enough for timing and memory, not for accuracy.

Everything is decided from (seed, class) or (seed, val number) alone, so the archives are byte-identical for a
seed whatever the worker count, and no plan of a million entries is ever held in memory.
"""

from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from alexrepro.core.atomic import atomic_open
from alexrepro.core.progress import Progress
from alexrepro.core.workers import map_ordered, worker_count
from alexrepro.synth.archive import SampleOutputError, add_member, as_matlab, make_output_folder, mat_file, write_devkit
from alexrepro.synth.config import ScaleConfig
from alexrepro.synth.ilsvrc import (
    DEVKIT_ARCHIVE,
    ILSVRC_CLASSES,
    ILSVRC_MAX_PER_CLASS,
    ILSVRC_MIN_PER_CLASS,
    ILSVRC_TRAIN_IMAGES,
    SYNSET_FIELDS,
    TRAIN_ARCHIVE,
    VAL_ARCHIVE,
)

# The archive writers and the pattern renderer are the built-in sample's, so both downloads share one format.
from alexrepro.synth.sample import PATTERNS, ImageSpec, SampleClass, SampleResult, _encode, image_size, render_pixels

# In the real set most classes have exactly 1300 train images; about a tenth have fewer.
SHORT_CLASSES = 106

SHORT_SIDE_RANGE = (40, 80)  # pixels; tiny so that decoding does not dominate what is measured
BANK_SIDE = 128
BANK_PER_PATTERN = 8


# --------------------------------------------------------------------------------------------------------------
# The class structure: the same at every scale


@functools.lru_cache(maxsize=1)
def ilsvrc_train_counts() -> tuple[int, ...]:
    """1000 per-class train counts with the real set's shape: 1300 for most, 732 … 1299 for 106, sum 1,281,167.

    Fixed (not seeded), so every scale and seed has the same classes. The short classes' shortfalls are drawn
    skewed (many a little short, few far short, as in the real set), then scaled and nudged to the exact total.
    """
    rng = np.random.default_rng(2012)
    shortfall_total = ILSVRC_CLASSES * ILSVRC_MAX_PER_CLASS - ILSVRC_TRAIN_IMAGES  # 18,833
    widest = ILSVRC_MAX_PER_CLASS - ILSVRC_MIN_PER_CLASS  # 568: the smallest class
    draws = rng.exponential(1.0, SHORT_CLASSES - 1)
    rest = np.clip(np.round(draws / draws.sum() * (shortfall_total - widest)), 1, widest).astype(int)
    i = 0
    while rest.sum() != shortfall_total - widest:  # rounding leaves a few images over or under: nudge one by one
        step = 1 if rest.sum() < shortfall_total - widest else -1
        if 1 <= rest[i % len(rest)] + step <= widest:
            rest[i % len(rest)] += step
        i += 1
    shortfalls = np.zeros(ILSVRC_CLASSES, int)
    short = rng.choice(ILSVRC_CLASSES, SHORT_CLASSES, replace=False)
    shortfalls[short] = np.concatenate([[widest], rest])
    return tuple(int(c) for c in ILSVRC_MAX_PER_CLASS - shortfalls)


@dataclass(frozen=True)
class ScaleClass:
    info: SampleClass  # WNID, ILSVRC2012_ID, words
    pattern: int  # index into PATTERNS
    train_count: int


@functools.lru_cache(maxsize=1)
def _leaf_wnids() -> tuple[str, ...]:
    """1000 distinct WNIDs in ILSVRC2012_ID order, which is not sorted order (ID 1 sorts after ID 2, as for the
    real n02119789 and n02100735). They start with n2, beyond real WordNet offsets (below n16000000)."""
    rng = np.random.default_rng(1000)
    numbers = rng.choice(np.arange(21_000_000, 30_000_000), ILSVRC_CLASSES, replace=False)
    if numbers[0] < numbers[1]:
        numbers[[0, 1]] = numbers[[1, 0]]
    return tuple(f"n{n:08d}" for n in numbers)


def scale_classes(config: ScaleConfig) -> tuple[ScaleClass, ...]:
    """The classes in ILSVRC2012_ID order, each with its pattern and its train count at this scale."""
    counts = ilsvrc_train_counts()
    wnids = _leaf_wnids()
    classes = []
    for index in range(config.classes):
        pattern = index % len(PATTERNS)
        words = f"{PATTERNS[pattern].words.split(',')[0]} {index // len(PATTERNS) + 1}"
        count = max(1, round(counts[index] * config.scale))
        classes.append(ScaleClass(SampleClass(wnids[index], index + 1, words), pattern, count))
    return tuple(classes)


# --------------------------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=2)
def _bank(seed: int) -> tuple[tuple[Image.Image, ...], ...]:
    """BANK_PER_PATTERN pictures per pattern, drawn once per process from the seed alone."""
    rng = np.random.default_rng([seed, 0xBA4C])
    return tuple(
        tuple(Image.fromarray(render_pixels(p, BANK_SIDE, BANK_SIDE, rng)) for _ in range(BANK_PER_PATTERN))
        for p in PATTERNS
    )


def render_small(seed: int, pattern: int, rng: np.random.Generator, name: str, split: str, kind: str) -> bytes:
    """One image: a crop of a bank picture of `pattern` at a tiny ImageNet-like size and aspect ratio."""
    width, height = image_size(rng)
    short = int(rng.integers(SHORT_SIDE_RANGE[0], SHORT_SIDE_RANGE[1] + 1))
    factor = short / min(width, height)
    width, height = max(8, round(width * factor)), max(8, round(height * factor))
    quality = int(rng.integers(75, 93))
    picture = _bank(seed)[pattern][int(rng.integers(BANK_PER_PATTERN))]
    # The crop has the image's aspect ratio and covers 75–100% of the bank picture's side along its long edge.
    span = BANK_SIDE * rng.uniform(0.75, 1.0)
    crop_w, crop_h = (span, span * height / width) if width >= height else (span * width / height, span)
    left, top = rng.uniform(0, BANK_SIDE - crop_w), rng.uniform(0, BANK_SIDE - crop_h)
    image = picture.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _encode(image, ImageSpec(name, split, pattern, width, height, quality, kind, 0))


# The first three classes in sorted WNID order hold the real set's odd files (REFERENCE.md §5), one each.
ODD_KINDS = ("png", "cmyk", "gray")


def _class_task(task: tuple[int, int, ScaleClass]) -> tuple[bytes, str | None]:
    """One class's inner tar, and the name of its odd file if it has one. Runs in a worker."""
    seed, sorted_position, cls = task
    rng = np.random.default_rng([seed, 0x7EA1, cls.info.ilsvrc_id])
    wnid = cls.info.wnid
    # Real train file numbers are sparse (n01440764_10026); stored in numeric order, which is not name order.
    numbers = np.sort(rng.choice(np.arange(1, 40 * cls.train_count + 1), cls.train_count, replace=False))
    odd = ODD_KINDS[sorted_position] if sorted_position < len(ODD_KINDS) else None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as inner:
        for i, number in enumerate(numbers):
            name = f"{wnid}_{number}.JPEG"
            kind = odd if i == 0 and odd else "jpeg"
            add_member(inner, name, render_small(seed, cls.pattern, rng, name, "train", kind))
    return buffer.getvalue(), (f"{wnid}.tar/{wnid}_{numbers[0]}.JPEG" if odd else None)


def _val_task(task: tuple[int, list[tuple[int, int, str]]]) -> list[bytes]:
    """Val images (number, pattern, kind) in the given order. Runs in a worker."""
    seed, items = task
    out = []
    for number, pattern, kind in items:
        rng = np.random.default_rng([seed, 0x7A1, number])
        out.append(render_small(seed, pattern, rng, _val_name(number), "val", kind))
    return out


def _val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def _in_workers(function, tasks: list, workers: int) -> Iterator:
    """`function` over `tasks`, results in task order; in worker processes when there is more than one task."""
    yield from map_ordered(function, tasks, min(workers, len(tasks)), preload=__name__)


# --------------------------------------------------------------------------------------------------------------
# Writing the archives


def write_scaled_sample(out: Path, config: ScaleConfig, progress: Progress) -> SampleResult:
    """Write an ILSVRC-2012-shaped download at `config.scale` of the real counts into the folder `out`.

    Example: `write_scaled_sample(Path("data/imagenet-64th"), ScaleConfig(scale=Fraction(1, 64)), NullProgress())`.
    Each archive appears under its final name only when complete.
    """
    out = Path(out)
    make_output_folder(out)
    classes = scale_classes(config)
    workers = worker_count(config.workers or None)  # 0: all cores
    paths = {"train": out / TRAIN_ARCHIVE, "val": out / VAL_ARCHIVE, "devkit": out / DEVKIT_ARCHIVE}
    odd_files: dict[str, str] = {}
    n_train = sum(c.train_count for c in classes)

    rng = np.random.default_rng([config.seed, 0x5CA1E])
    # Val classes come in random order by file number, and the tar stores the files in another random order.
    val_ids = rng.permutation(np.repeat(np.arange(1, config.classes + 1), config.val_count_per_class))
    storage = rng.permutation(len(val_ids))
    odd_val = int(rng.integers(len(val_ids)))

    try:
        progress.start("sample: train images", n_train)
        with atomic_open(paths["train"]) as handle:
            in_wnid_order = sorted(classes, key=lambda c: c.info.wnid)
            tasks = [(config.seed, i, c) for i, c in enumerate(in_wnid_order)]
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as outer:
                for cls, (inner, odd_name) in zip(in_wnid_order, _in_workers(_class_task, tasks, workers), strict=True):
                    add_member(outer, f"{cls.info.wnid}.tar", inner)
                    if odd_name:
                        odd_files[odd_name] = ODD_KINDS[len(odd_files)]
                    progress.advance(cls.train_count)
        progress.finish()

        progress.start("sample: val images", len(val_ids))
        with atomic_open(paths["val"]) as handle:
            items = [
                (int(i) + 1, classes[int(val_ids[i]) - 1].pattern, "cmyk" if i == odd_val else "jpeg") for i in storage
            ]
            chunks = [(config.seed, items[start : start + 500]) for start in range(0, len(items), 500)]
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
                stored = iter(items)
                for rendered in _in_workers(_val_task, chunks, workers):
                    for data in rendered:
                        number, _, kind = next(stored)
                        add_member(archive, _val_name(number), data)
                        if kind != "jpeg":
                            odd_files[_val_name(number)] = kind
                    progress.advance(len(rendered))
        progress.finish()

        progress.start("sample: devkit", 1, unit="file")
        with atomic_open(paths["devkit"]) as handle:
            _write_devkit(handle, classes, val_ids, config)
        progress.advance(1)
        progress.finish()
    except OSError as exc:
        reason = exc.strerror or exc
        raise SampleOutputError(
            f"{out}: cannot write the sample ({reason}); check free space and permissions"
        ) from None

    progress.log(
        f"sample: {n_train:,} train and {len(val_ids):,} val images of {config.classes} classes "
        f"(scale {config.scale}) in {out}"
    )
    return SampleResult(
        paths=paths,
        counts={"train": n_train, "val": len(val_ids), "classes": config.classes},
        classes=tuple(c.info for c in classes),
        odd_files=odd_files,
    )


def _write_devkit(handle, classes: tuple[ScaleClass, ...], val_ids: np.ndarray, config: ScaleConfig) -> None:
    ground_truth = "".join(f"{i}\n" for i in val_ids.tolist())
    meta = mat_file({"synsets": synsets(classes)})
    readme = (
        "ILSVRC-2012-shaped download written by `alexrepro sample --scale` (synthetic images, not ImageNet).\n"
        f"{config.classes} classes at scale {config.scale} of the real per-class counts, "
        f"{config.val_count_per_class} val images per class, seed {config.seed}.\n"
    )
    write_devkit(handle, readme, meta, ground_truth)


def synsets(classes: tuple[ScaleClass, ...]) -> np.ndarray:
    """meta.mat's `synsets`: the leaves (IDs 1..C), then internal nodes as in the real file (IDs above C):
    one node per pattern over its leaves (height 1), one per kind over those (height 2), and the root (height 3)."""
    rows = [
        [
            c.info.ilsvrc_id,
            c.info.wnid,
            c.info.name,
            PATTERNS[c.pattern].gloss,
            0,
            np.zeros((1, 0), np.uint8),
            0,
            c.train_count,
        ]
        for c in classes
    ]
    next_id = len(classes) + 1
    pattern_nodes: dict[str, list[int]] = {}
    for p, pattern in enumerate(PATTERNS):
        members = [c for c in classes if c.pattern == p]
        if not members:
            continue
        children = np.array([[c.info.ilsvrc_id for c in members]], np.uint16)
        rows.append(
            [
                next_id,
                f"n2000{p + 200:04d}",
                f"{pattern.key} (all variants)",
                pattern.gloss,
                len(members),
                children,
                1,
                sum(c.train_count for c in members),
            ]
        )
        pattern_nodes.setdefault(pattern.kind, []).append(next_id)
        next_id += 1
    kind_nodes = []
    for kind, wnid in (("texture", "n20000101"), ("shape", "n20000102")):
        if kind in pattern_nodes:
            kind_children = pattern_nodes[kind]
            images = sum(c.train_count for c in classes if PATTERNS[c.pattern].kind == kind)
            rows.append(
                [
                    next_id,
                    wnid,
                    kind,
                    f"every {kind} pattern",
                    len(kind_children),
                    np.array([kind_children], np.uint16),
                    2,
                    images,
                ]
            )
            kind_nodes.append(next_id)
            next_id += 1
    rows.append(
        [
            next_id,
            "n20000100",
            "synthetic pattern",
            "the root of the synthetic hierarchy",
            len(kind_nodes),
            np.array([kind_nodes], np.uint16),
            3,
            sum(c.train_count for c in classes),
        ]
    )

    table = np.empty((len(rows), 1), dtype=[(name, object) for name in SYNSET_FIELDS])
    for i, row in enumerate(rows):
        table[i, 0] = tuple(_as_matlab_value(value) for value in row)
    return table


def _as_matlab_value(value):
    """As alexrepro.synth.sample stores numbers (uint16), widened where a count outgrows it (1,281,167 at the root)."""
    if isinstance(value, int) and value > np.iinfo(np.uint16).max:
        return np.array([[value]], np.uint32)
    return as_matlab(value)
