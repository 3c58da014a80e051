"""The built-in miniature ILSVRC-2012: `alexrepro sample OUT`.

Writes the three files of the real download, with their real names and layouts (REFERENCE.md §5), so that the
path a user runs on a laptop is the path ImageNet takes:

    ILSVRC2012_img_train.tar       one inner tar `nXXXXXXXX.tar` per class, each holding `nXXXXXXXX_N.JPEG`
    ILSVRC2012_img_val.tar         flat `ILSVRC2012_val_%08d.JPEG`, stored in shuffled (not file-name) order
    ILSVRC2012_devkit_t12.tar.gz   `ILSVRC2012_devkit_t12/data/meta.mat` and
                                   `ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`

The classes are synthetic patterns (stripes, star, checkerboard, …) that are carried by shape and texture only:
every image draws its colours, background, position, scale and rotation at random, independently of its class,
so a classifier that looks only at colour scores at chance. Gradients, blotches, clutter, vignetting, blur, sensor
noise and JPEG compression make the images photo-like, so the network has to learn the shapes, not pixel values.

The real set's traps are reproduced too: ILSVRC2012_IDs in an order unlike sorted WNID order, val members stored
out of name order, ImageNet-like sizes and aspect ratios, a PNG named `.JPEG`, CMYK and grayscale JPEGs.

Generation happens in two steps. `plan_sample` decides everything about every image (name, class, size, quality,
odd kind, and a private random seed) from the sample seed alone; `render_image` turns one plan entry into file
bytes. Rendering runs in worker processes, but each image depends only on its own plan entry, so the archives are
byte-identical for a seed whatever the worker count.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from alexrepro.core.atomic import atomic_open, atomic_write_text, remove_stale_temporaries
from alexrepro.core.errors import OutputExistsError
from alexrepro.core.progress import Progress
from alexrepro.core.workers import map_ordered, worker_count
from alexrepro.synth.archive import SampleOutputError, add_member, as_matlab, make_output_folder, mat_file, write_devkit
from alexrepro.synth.config import SampleConfig
from alexrepro.synth.ilsvrc import DEVKIT_ARCHIVE, PATTERN_WNIDS, SYNSET_FIELDS, TRAIN_ARCHIVE, VAL_ARCHIVE

# --------------------------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(frozen=True)
class SampleClass:
    wnid: str
    ilsvrc_id: int  # the devkit's ILSVRC2012_ID, 1..classes, in pattern order (not sorted WNID order)
    name: str  # the devkit's `words`


@dataclass(frozen=True)
class SampleResult:
    paths: dict[str, Path]  # "train", "val", "devkit" -> archive path
    counts: dict[str, int]  # "train", "val" -> images written; "classes" -> number of classes
    classes: tuple[SampleClass, ...]  # in ILSVRC2012_ID order
    odd_files: dict[str, str]  # archive member name -> "png", "cmyk" or "gray" (inner-tar members as "wnid.tar/name")


# --------------------------------------------------------------------------------------------------------------
# The patterns
#
# Each pattern is a signed-distance field: a function of pattern coordinates (u, v), in pixels, centred on the
# pattern and already rotated, that is positive inside the foreground and negative outside, about one unit per
# pixel. Clipping `d + 0.5` to [0, 1] then gives a mask whose edges are anti-aliased over one pixel.
# `short` is the image's shorter side; sizes are drawn relative to it because `prepare` keeps the centre square.

Field = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Pattern:
    key: str
    wnid: str
    words: str
    gloss: str
    kind: str  # "texture" (fills a large region) or "shape" (one figure)
    field: Field


def _distance_to_multiple(t: np.ndarray, period: float) -> np.ndarray:
    """Distance from t to the nearest multiple of `period` (0 … period/2)."""
    return np.abs(t - period * np.round(t / period))


def _stripes(u, v, short, rng):
    period = short * rng.uniform(1 / 12, 1 / 5.5)
    half_width = period * rng.uniform(0.2, 0.3)
    return half_width - _distance_to_multiple(u, period)


def _checkerboard(u, v, short, rng):
    cell = short * rng.uniform(1 / 11, 1 / 5.5)
    parity = (np.floor(u / cell) + np.floor(v / cell)) % 2
    to_edge = np.minimum(_distance_to_multiple(u, cell), _distance_to_multiple(v, cell))
    return np.where(parity == 0, to_edge, -to_edge)


def _concentric_rings(u, v, short, rng):
    period = short * rng.uniform(1 / 10, 1 / 5.5)
    half_width = period * rng.uniform(0.2, 0.3)
    return half_width - _distance_to_multiple(np.hypot(u, v), period)


def _polka_dots(u, v, short, rng):
    spacing = short * rng.uniform(1 / 9, 1 / 5)
    radius = spacing * rng.uniform(0.2, 0.32)
    row = np.round(v / spacing)
    shifted_u = u + (row % 2) * (spacing / 2)  # every other row shifted half a step: a hexagonal packing
    return radius - np.hypot(_distance_to_multiple(shifted_u, spacing), _distance_to_multiple(v, spacing))


def _grid(u, v, short, rng):
    spacing = short * rng.uniform(1 / 8, 1 / 4.5)
    half_thickness = spacing * rng.uniform(0.07, 0.12)
    return half_thickness - np.minimum(_distance_to_multiple(u, spacing), _distance_to_multiple(v, spacing))


def _zigzag(u, v, short, rng):
    period = short * rng.uniform(1 / 10, 1 / 5.5)
    half_width = period * rng.uniform(0.2, 0.3)
    wavelength = short * rng.uniform(1 / 7, 1 / 3.5)
    slope = rng.uniform(0.8, 1.5)
    bent_u = u + slope * _distance_to_multiple(v, wavelength)
    # Dividing by the slant's length keeps the field close to a distance in pixels (sharp, even edges).
    return (half_width - _distance_to_multiple(bent_u, period)) / math.sqrt(1 + slope**2)


def _waves(u, v, short, rng):
    period = short * rng.uniform(1 / 10, 1 / 5.5)
    half_width = period * rng.uniform(0.2, 0.3)
    wavelength = short * rng.uniform(1 / 5, 1 / 2.5)
    amplitude = wavelength * rng.uniform(0.12, 0.2)
    bent_u = u + amplitude * np.sin(v * (2 * np.pi / wavelength))
    steepest = amplitude * 2 * np.pi / wavelength
    return (half_width - _distance_to_multiple(bent_u, period)) / math.sqrt(1 + steepest**2 / 2)


def _spiral(u, v, short, rng):
    period = short * rng.uniform(1 / 9, 1 / 5.5)
    half_width = period * rng.uniform(0.2, 0.3)
    along = np.hypot(u, v) - period * np.arctan2(v, u) / (2 * np.pi)
    return half_width - _distance_to_multiple(along, period)


def _figure_radius(short, rng) -> float:
    """Outer radius of a single figure: 40–70% of the shorter side across, well inside the centre crop."""
    return short * rng.uniform(0.2, 0.35)


def _disk(u, v, short, rng):
    return _figure_radius(short, rng) - np.hypot(u, v)


def _annulus(u, v, short, rng):
    radius = _figure_radius(short, rng)
    half_width = radius * rng.uniform(0.12, 0.22)
    return half_width - np.abs(np.hypot(u, v) - (radius - half_width))


def _crescent(u, v, short, rng):
    radius = _figure_radius(short, rng)
    bite_radius = radius * rng.uniform(0.8, 0.95)
    bite_offset = radius * rng.uniform(0.4, 0.55)
    return np.minimum(radius - np.hypot(u, v), np.hypot(u - bite_offset, v) - bite_radius)


def _regular_polygon(u, v, radius, sides):
    """Inside distance of a regular polygon with circumradius `radius` (the minimum over its edges' half-planes)."""
    apothem = radius * math.cos(math.pi / sides)
    field = None
    for k in range(sides):
        angle = 2 * math.pi * k / sides
        edge = apothem - (u * math.cos(angle) + v * math.sin(angle))
        field = edge if field is None else np.minimum(field, edge)
    return field


def _triangle(u, v, short, rng):
    return _regular_polygon(u, v, _figure_radius(short, rng) * 1.1, 3)


def _square(u, v, short, rng):
    return _regular_polygon(u, v, _figure_radius(short, rng), 4)


def _star(u, v, short, rng):
    """Five-pointed star: within each tenth of a turn the outline runs straight from a tip to a notch."""
    tip = _figure_radius(short, rng) * 1.1
    notch = tip * rng.uniform(0.38, 0.5)
    half_sector = math.pi / 5
    angle = np.abs((np.arctan2(v, u) + half_sector) % (2 * half_sector) - half_sector)  # 0 at a tip
    # Straight edge from (tip, 0) to the notch at angle half_sector, in the folded frame: n·p = offset.
    notch_x, notch_y = notch * math.cos(half_sector), notch * math.sin(half_sector)
    normal = np.array([notch_y, tip - notch_x])
    normal /= np.linalg.norm(normal)
    offset = normal[0] * tip
    r = np.hypot(u, v)
    return offset - r * (normal[0] * np.cos(angle) + normal[1] * np.sin(angle))


def _box(u, v, half_length, half_width):
    return np.minimum(half_length - np.abs(u), half_width - np.abs(v))


def _cross(u, v, short, rng):
    arm = _figure_radius(short, rng)
    half_width = arm * rng.uniform(0.22, 0.32)
    return np.maximum(_box(u, v, arm, half_width), _box(v, u, arm, half_width))


def _arrow(u, v, short, rng):
    length = _figure_radius(short, rng)
    head_base = length * rng.uniform(0.0, 0.25)
    head_half_width = length * rng.uniform(0.5, 0.7)
    shaft_half_width = head_half_width * rng.uniform(0.3, 0.45)
    slope = head_half_width / (length - head_base)
    head = np.minimum(u - head_base, (slope * (length - u) - np.abs(v)) / math.sqrt(1 + slope**2))
    shaft = np.minimum(shaft_half_width - np.abs(v), np.minimum(u + length, head_base + 1 - u))
    return np.maximum(head, shaft)


# The first classes alternate textures and figures so that any small sample holds both kinds. ILSVRC2012_IDs
# follow this order, and the WNIDs are chosen so that sorted WNID order differs from it for any number of classes
# (the first WNID sorts after the second), as in the real devkit (REFERENCE.md §5). WNIDs start with n2: real
# WordNet offsets stay below n16000000, so these can never be mistaken for real synsets.
PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "stripes",
        PATTERN_WNIDS["stripes"],
        "stripes, banded pattern, parallel bands",
        "a surface covered with straight parallel bands of alternating colour",
        "texture",
        _stripes,
    ),
    Pattern(
        "star",
        PATTERN_WNIDS["star"],
        "star, five-pointed star, pentagram shape",
        "a single figure with five sharp points radiating from its centre",
        "shape",
        _star,
    ),
    Pattern(
        "checkerboard",
        PATTERN_WNIDS["checkerboard"],
        "checkerboard, chequered pattern, checks",
        "a surface tiled with squares of two alternating colours",
        "texture",
        _checkerboard,
    ),
    Pattern(
        "cross",
        PATTERN_WNIDS["cross"],
        "cross, plus sign, Greek cross",
        "a single figure of two bars of equal length crossing at right angles",
        "shape",
        _cross,
    ),
    Pattern(
        "rings",
        PATTERN_WNIDS["rings"],
        "concentric rings, target pattern, bullseye",
        "circles of alternating colour sharing one centre",
        "texture",
        _concentric_rings,
    ),
    Pattern(
        "triangle",
        PATTERN_WNIDS["triangle"],
        "triangle, trigon, equilateral triangle",
        "a single three-sided figure with equal sides",
        "shape",
        _triangle,
    ),
    Pattern(
        "dots",
        PATTERN_WNIDS["dots"],
        "polka dots, spotted pattern, dots",
        "a surface covered with small round spots in regular rows",
        "texture",
        _polka_dots,
    ),
    Pattern(
        "disk", PATTERN_WNIDS["disk"], "disk, filled circle, round spot", "a single solid round figure", "shape", _disk
    ),
    Pattern(
        "grid",
        PATTERN_WNIDS["grid"],
        "grid, lattice of lines, mesh",
        "thin straight lines crossing at right angles at regular intervals",
        "texture",
        _grid,
    ),
    Pattern(
        "zigzag",
        PATTERN_WNIDS["zigzag"],
        "zigzag, chevron pattern, herringbone stripes",
        "parallel bands that turn sharply back and forth",
        "texture",
        _zigzag,
    ),
    Pattern(
        "crescent",
        PATTERN_WNIDS["crescent"],
        "crescent, sickle shape, new moon",
        "a single figure like a disk with a round bite taken from one side",
        "shape",
        _crescent,
    ),
    Pattern(
        "spiral",
        PATTERN_WNIDS["spiral"],
        "spiral, coil, helix pattern",
        "a band winding outwards around a centre",
        "texture",
        _spiral,
    ),
    Pattern(
        "square",
        PATTERN_WNIDS["square"],
        "square, filled square, quadrate",
        "a single solid four-sided figure with equal sides and right angles",
        "shape",
        _square,
    ),
    Pattern(
        "waves",
        PATTERN_WNIDS["waves"],
        "waves, wavy stripes, undulating bands",
        "parallel bands that curve smoothly back and forth",
        "texture",
        _waves,
    ),
    Pattern(
        "annulus",
        PATTERN_WNIDS["annulus"],
        "annulus, ring, hoop",
        "a single round band around an empty centre",
        "shape",
        _annulus,
    ),
    Pattern(
        "arrow",
        PATTERN_WNIDS["arrow"],
        "arrow, arrowhead, pointer",
        "a single figure of a shaft ending in a triangular head",
        "shape",
        _arrow,
    ),
)

# Internal nodes of the miniature hierarchy (IDs above the number of classes, as in the real meta.mat).
TEXTURE_NODE = ("n20000101", "texture, repeating pattern", "a surface pattern that repeats across a region")
SHAPE_NODE = ("n20000102", "figure, shape, single shape", "one outlined form seen against a background")
ROOT_NODE = ("n20000100", "synthetic pattern", "a pattern drawn for the built-in miniature ILSVRC-2012")


# --------------------------------------------------------------------------------------------------------------
# The plan: everything about every image, decided from the seed alone


@dataclass(frozen=True)
class ImageSpec:
    name: str  # file name inside its archive (train: inside its class's inner tar)
    split: str  # "train" or "val"
    pattern: int  # index into PATTERNS, = ILSVRC2012_ID - 1
    width: int
    height: int
    quality: int  # JPEG quality
    kind: str  # "jpeg", or one of the real set's odd kinds: "png", "cmyk", "gray"
    seed: int  # private seed for this image's content


@dataclass(frozen=True)
class SamplePlan:
    classes: tuple[SampleClass, ...]  # ILSVRC2012_ID order
    train: dict[str, tuple[ImageSpec, ...]]  # WNID -> images in inner-tar order; keys in sorted WNID order
    val: tuple[ImageSpec, ...]  # in file-name order (val_00000001 first)
    val_storage_order: tuple[int, ...]  # positions into `val`, in the order the tar stores them


def image_size(rng: np.random.Generator, scale: float = 1.0) -> tuple[int, int]:
    """A (width, height) with ImageNet's mix: mostly 500 px landscape, some portrait and square, a few small or big."""
    draw = rng.random()
    if draw < 0.60:
        width, height = 500, int(rng.choice([375, 375, 375, 333, 400, 281, 354]))
    elif draw < 0.78:
        width, height = int(rng.choice([375, 333, 400])), 500
    elif draw < 0.86:
        width = height = int(rng.choice([500, 400]))
    elif draw < 0.96:
        long_side = int(rng.integers(160, 260))
        width, height = long_side, round(long_side * 0.75)
        if rng.random() < 0.3:
            width, height = height, width
    else:
        long_side = int(rng.integers(1024, 1400))
        width, height = long_side, round(long_side * float(rng.choice([0.75, 2 / 3])))
    return max(16, round(width * scale)), max(16, round(height * scale))


def plan_sample(config: SampleConfig) -> SamplePlan:
    """Decide names, classes, sizes, qualities, odd files and per-image seeds. Cheap: renders nothing."""
    rng = np.random.default_rng([config.seed, 0x5A4D])
    patterns = PATTERNS[: config.classes]
    classes = tuple(SampleClass(p.wnid, i + 1, p.words) for i, p in enumerate(patterns))

    def spec(name: str, split: str, pattern: int) -> ImageSpec:
        width, height = image_size(rng, config.image_scale)
        quality = int(rng.integers(75, 93))
        return ImageSpec(name, split, pattern, width, height, quality, "jpeg", int(rng.integers(2**63)))

    train: dict[str, list[ImageSpec]] = {}
    for pattern in sorted(range(config.classes), key=lambda i: patterns[i].wnid):
        wnid = patterns[pattern].wnid
        # Real train file numbers are sparse (n01440764_10026); stored in numeric order, which is not name order.
        numbers = np.sort(rng.choice(np.arange(1, 40 * config.train_per_class), config.train_per_class, replace=False))
        train[wnid] = [spec(f"{wnid}_{n}.JPEG", "train", pattern) for n in numbers]

    # Val classes come in random order by file number, as in the real set.
    val_patterns = rng.permutation(np.repeat(np.arange(config.classes), config.val_per_class))
    val = [spec(f"ILSVRC2012_val_{i + 1:08d}.JPEG", "val", int(p)) for i, p in enumerate(val_patterns)]
    val_storage_order = tuple(int(i) for i in rng.permutation(len(val)))

    _mark_odd_files(rng, train, val)
    return SamplePlan(
        classes=classes,
        train={wnid: tuple(specs) for wnid, specs in train.items()},
        val=tuple(val),
        val_storage_order=val_storage_order,
    )


def _mark_odd_files(rng: np.random.Generator, train: dict[str, list[ImageSpec]], val: list[ImageSpec]) -> None:
    """Turn three distinct train images into a PNG, a CMYK and a grayscale file, and one val image into CMYK."""
    everywhere = [(wnid, i) for wnid, specs in train.items() for i in range(len(specs))]
    for kind, pick in zip(("png", "cmyk", "gray"), rng.choice(len(everywhere), 3, replace=False), strict=True):
        wnid, i = everywhere[int(pick)]
        train[wnid][i] = dataclasses.replace(train[wnid][i], kind=kind)
    pick = int(rng.integers(len(val)))
    val[pick] = dataclasses.replace(val[pick], kind="cmyk")


# --------------------------------------------------------------------------------------------------------------
# Rendering one image


def render_image(spec: ImageSpec) -> bytes:
    """The file bytes of one planned image: a photo-like picture of its class's pattern."""
    rng = np.random.default_rng(spec.seed)
    drawn_size = _drawn_size(spec.width, spec.height, rng)
    picture = Image.fromarray(render_pixels(PATTERNS[spec.pattern], *drawn_size, rng))
    if drawn_size != (spec.width, spec.height):
        picture = picture.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return _encode(picture, spec)


DRAWN_SHORT_SIDE = 256


def _drawn_size(width: int, height: int, rng: np.random.Generator) -> tuple[int, int]:
    """The size to draw at before enlarging to (width, height).

    The shorter side is drawn at most DRAWN_SHORT_SIDE: `prepare` scales it to 256 anyway, so finer detail would
    never reach the network, and pixels drawn are most of the cost. Half the pictures are drawn smaller still and
    so come out soft, as photos often are (focus, an earlier downscale in the photo's life).
    """
    scale = min(1.0, DRAWN_SHORT_SIDE / min(width, height))
    if rng.random() < 0.5:
        scale *= rng.uniform(0.55, 0.85)
    return max(16, round(width * scale)), max(16, round(height * scale))


def render_pixels(pattern: Pattern, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An H×W×3 uint8 RGB picture of `pattern` with random colours, placement, clutter and camera noise."""
    short = min(width, height)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    colours = _contrasting_colours(rng)

    image = _background(rng, xs, ys, short, colours["background"])
    for _ in range(int(rng.integers(1, 5))):
        _paint_clutter(rng, image, short)

    u, v = _pattern_frame(rng, xs, ys, short)
    mask = _mask(pattern.field(u, v, short, rng))
    light = _uneven_light(rng, xs, ys, short)[..., None]
    if pattern.kind == "texture":
        # A texture alternates two colours inside a region: the whole picture, or a large patch around the centre.
        second = colours["second"]
        layer = (second + (colours["foreground"] - second) * mask[..., None]) * light
        _blend_in_place(image, layer, _texture_region(rng, xs, ys, short))
    else:
        _blend_in_place(image, colours["foreground"] * light, mask)

    if rng.random() < 0.3:  # something small in front of the subject, as in real photos
        _paint_clutter(rng, image, short, max_opacity=0.5)
    # Lens fall-off and sensor noise, both the same in every channel (luminance), to stay cheap.
    grain = rng.standard_normal(mask.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7))
    image *= _vignette(rng, xs, ys)[..., None]
    image += grain[..., None]
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _contrasting_colours(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Background, foreground and a texture's second colour, drawn the same way for every class.

    The foreground differs from the background (and the second colour from the foreground) in luminance, so the
    pattern survives conversion to grayscale; hue, saturation and brightness are otherwise free, so colour
    tells nothing about the class.
    """

    def colour() -> np.ndarray:
        vivid = rng.uniform(0, 255, 3)
        grey = vivid.mean()
        return (grey + (vivid - grey) * rng.uniform(0.2, 1.0)).astype(np.float32)  # photos are rarely saturated

    def far_from(other: np.ndarray) -> np.ndarray:
        while True:
            candidate = colour()
            if abs(_luminance(candidate) - _luminance(other)) >= 50:
                return candidate

    background = colour()
    foreground = far_from(background)
    return {"background": background, "foreground": foreground, "second": far_from(foreground)}


def _ramp(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, short: int) -> np.ndarray:
    """A linear ramp through the picture's centre in a random direction: 0 there, ±1 at half the shorter side."""
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = xs.shape[1] / 2, ys.shape[0] / 2
    scale = 2 / short
    return (xs - np.float32(cx)) * np.float32(math.cos(angle) * scale) + (ys - np.float32(cy)) * np.float32(
        math.sin(angle) * scale
    )


def _background(rng, xs, ys, short, base: np.ndarray) -> np.ndarray:
    """A lit scene behind the subject (float32 H×W×3): a gradient between two nearby colours, light and shade."""
    height, width = ys.shape[0], xs.shape[1]
    other = np.clip(base + rng.normal(0, 45, 3), 0, 255).astype(np.float32)
    t = np.clip(_ramp(rng, xs, ys, short), -1, 1) * np.float32(0.5) + np.float32(0.5)
    # Light and shade: a coarse random grid smoothly enlarged, added to every channel alike.
    coarse = rng.normal(0, rng.uniform(8, 25), (int(rng.integers(3, 7)), int(rng.integers(3, 7)))).astype(np.float32)
    shade = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    image = t[..., None] * (other - base)
    image += base
    image += shade[..., None]
    return image


def _paint_clutter(rng, image: np.ndarray, short: int, max_opacity: float = 0.8) -> None:
    """A soft blob or a stick of random colour, drawn in place: a distractor that belongs to no class."""
    height, width = image.shape[:2]
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    size = short * rng.uniform(0.04, 0.15)
    angle = rng.uniform(0, np.pi)
    is_blob = rng.random() < 0.7
    aspect, length = rng.uniform(0.4, 1.0), size * rng.uniform(1.0, 2.5)
    opacity = np.float32(rng.uniform(0.25, max_opacity))
    colour = rng.uniform(0, 255, 3).astype(np.float32)

    # Only the box around the item is touched: clutter is small, the picture is not.
    reach = 2.5 * size
    top, bottom = max(0, int(cy - reach)), min(height, int(cy + reach) + 1)
    left, right = max(0, int(cx - reach)), min(width, int(cx + reach) + 1)
    if top >= bottom or left >= right:
        return
    dy = np.arange(top, bottom, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(left, right, dtype=np.float32)[None, :] - np.float32(cx)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    du, dv = dx * c + dy * s, dy * c - dx * s
    if is_blob:
        alpha = np.exp(-((du / np.float32(size)) ** 2 + (dv / np.float32(size * aspect)) ** 2))
    else:
        alpha = _mask(_box(du, dv, length, max(1.0, size * 0.08)))
    _blend_in_place(image[top:bottom, left:right], colour, alpha * opacity)


def _pattern_frame(rng, xs, ys, short) -> tuple[np.ndarray, np.ndarray]:
    """Rotated pattern coordinates (u, v) in pixels around a centre near the middle of the picture.

    The centre stays within 12% of the shorter side of the middle, so `prepare`'s centre crop keeps the figure.
    """
    cx = xs.shape[1] / 2 + short * np.clip(rng.normal(0, 0.07), -0.12, 0.12)
    cy = ys.shape[0] / 2 + short * np.clip(rng.normal(0, 0.07), -0.12, 0.12)
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    return dx * c + dy * s, dy * c - dx * s


def _texture_region(rng, xs, ys, short) -> np.ndarray:
    """Where a texture shows: the whole picture, or a rotated rectangle or ellipse covering most of the centre."""
    shape = rng.random()
    if shape < 0.4:
        return np.ones((ys.shape[0], xs.shape[1]), np.float32)
    u, v = _pattern_frame(rng, xs, ys, short)
    half_a, half_b = short * rng.uniform(0.36, 0.6), short * rng.uniform(0.33, 0.5)
    if shape < 0.7:
        return _mask(_box(u, v, half_a, half_b))
    # Scaling an ellipse's implicit function by its smaller half-axis gives roughly a distance in pixels.
    return _mask((1 - np.hypot(u / np.float32(half_a), v / np.float32(half_b))) * np.float32(min(half_a, half_b)))


def _uneven_light(rng, xs, ys, short) -> np.ndarray:
    """Brightness factor across a surface (brighter on one side), as a painted surface looks in a photo."""
    strength = np.float32(rng.uniform(0.05, 0.25))
    return np.float32(1) + strength * np.clip(_ramp(rng, xs, ys, short), -1.5, 1.5)


def _vignette(rng, xs, ys) -> np.ndarray:
    """Lens fall-off: corners darker by a random amount (up to 35%)."""
    half_w, half_h = np.float32(xs.shape[1] / 2), np.float32(ys.shape[0] / 2)
    strength = np.float32(rng.uniform(0, 0.35) / 2)
    return np.float32(1) - strength * (((xs - half_w) / half_w) ** 2 + ((ys - half_h) / half_h) ** 2)


def _mask(field: np.ndarray) -> np.ndarray:
    return np.clip(field + np.float32(0.5), 0, 1).astype(np.float32, copy=False)


def _blend_in_place(under: np.ndarray, over: np.ndarray, alpha: np.ndarray) -> None:
    """under ← under + (over − under)·alpha, with alpha H×W and over H×W×3 or one colour."""
    under += (over - under) * alpha[..., None]


def _encode(picture: Image.Image, spec: ImageSpec) -> bytes:
    """The file bytes in the planned format (odd kinds as found in the real set, REFERENCE.md §5)."""
    out = io.BytesIO()
    if spec.kind == "png":  # like n02105855_2933.JPEG: a PNG under a .JPEG name
        picture.save(out, "PNG")
    elif spec.kind == "cmyk":
        picture.convert("CMYK").save(out, "JPEG", quality=spec.quality)
    elif spec.kind == "gray":
        picture.convert("L").save(out, "JPEG", quality=spec.quality)
    else:
        picture.save(out, "JPEG", quality=spec.quality, subsampling="4:2:0")
    return out.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Writing the archives


def write_sample(out: Path, config: SampleConfig, progress: Progress, overwrite: bool = False) -> SampleResult:
    """Write the miniature ILSVRC-2012 download (three archives) into the folder `out`.

    Example: `write_sample(Path("data/sample"), SampleConfig(), NullProgress())`. Existing archives of the same
    names are replaced; each archive appears under its final name only when complete.
    """
    out = Path(out)
    _refuse_to_replace(out, overwrite)
    make_output_folder(out)
    for stale in remove_stale_temporaries(out):  # a run killed while writing an archive leaves its temporary
        progress.log(f"removed {stale}, left by a run that was stopped while writing it")
    # Written first: archives under the official names beside it are this command's own (complete or left by a
    # stopped run) and may be replaced without --overwrite; without it they may be the real download.
    atomic_write_text(out / SAMPLE_MARKER, json.dumps(dataclasses.asdict(config), sort_keys=True) + "\n")
    plan = plan_sample(config)
    workers = worker_count(config.workers)
    paths = {"train": out / TRAIN_ARCHIVE, "val": out / VAL_ARCHIVE, "devkit": out / DEVKIT_ARCHIVE}
    odd_files: dict[str, str] = {}

    try:
        n_train = sum(len(specs) for specs in plan.train.values())
        progress.start("sample: train images", n_train)
        with atomic_open(paths["train"]) as handle:
            _write_train_archive(handle, plan, workers, progress, odd_files)
        progress.finish()

        progress.start("sample: val images", len(plan.val))
        with atomic_open(paths["val"]) as handle:
            _write_val_archive(handle, plan, workers, progress, odd_files)
        progress.finish()

        progress.start("sample: devkit", 1, unit="file")
        with atomic_open(paths["devkit"]) as handle:
            _write_devkit_archive(handle, plan, config)
        progress.advance(1)
        progress.finish()
    except OSError as exc:
        for path in [*paths.values(), out / SAMPLE_MARKER]:  # nothing partial: three archives of one sample, or none
            path.unlink(missing_ok=True)
        reason = exc.strerror or exc
        raise SampleOutputError(
            f"{out}: cannot write the sample ({reason}); check free space and permissions"
        ) from None

    progress.log(f"sample: {n_train} train and {len(plan.val)} val images of {config.classes} classes in {out}")
    return SampleResult(
        paths=paths,
        counts={"train": n_train, "val": len(plan.val), "classes": config.classes},
        classes=plan.classes,
        odd_files=odd_files,
    )


def _write_train_archive(handle, plan: SamplePlan, workers: int, progress: Progress, odd_files: dict) -> None:
    """The outer train tar: one inner tar per class, in sorted WNID order, as in the real download."""
    specs = [spec for class_specs in plan.train.values() for spec in class_specs]
    rendered = _render_in_order(specs, workers)
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as outer:
        for wnid, class_specs in plan.train.items():
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for spec in class_specs:
                    add_member(inner, spec.name, next(rendered))
                    if spec.kind != "jpeg":
                        odd_files[f"{wnid}.tar/{spec.name}"] = spec.kind
                    progress.advance(1)
            add_member(outer, f"{wnid}.tar", inner_bytes.getvalue())


def _write_val_archive(handle, plan: SamplePlan, workers: int, progress: Progress, odd_files: dict) -> None:
    """The flat val tar, members stored in shuffled order (readers must sort by name, REFERENCE.md §5)."""
    stored = [plan.val[i] for i in plan.val_storage_order]
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for spec, data in zip(stored, _render_in_order(stored, workers), strict=True):
            add_member(archive, spec.name, data)
            if spec.kind != "jpeg":
                odd_files[spec.name] = spec.kind
            progress.advance(1)


def _write_devkit_archive(handle, plan: SamplePlan, config: SampleConfig) -> None:
    """devkit tar.gz: meta.mat, the validation ground truth, a readme; gzip header without name or time."""
    ground_truth = "".join(f"{spec.pattern + 1}\n" for spec in plan.val)  # ILSVRC2012_ID = pattern index + 1
    meta = mat_file({"synsets": _synsets(plan, config)})
    readme = (
        "Built-in miniature ILSVRC-2012 written by `alexrepro sample` (synthetic images, not ImageNet).\n"
        f"{config.classes} classes, {config.train_per_class} train and {config.val_per_class} val images per class, "
        f"seed {config.seed}.\nSame layout as the real development kit: data/meta.mat and "
        "data/ILSVRC2012_validation_ground_truth.txt.\n"
    )
    write_devkit(handle, readme, meta, ground_truth)


def _synsets(plan: SamplePlan, config: SampleConfig) -> np.ndarray:
    """The `synsets` struct array of meta.mat: leaves with IDs 1..C, then internal nodes, as in the real file.

    Numbers are stored as integer arrays and leaves' `children` as an empty uint8 array, so that
    `scipy.io.loadmat(squeeze_me=True)` returns the same Python types as it does for the real meta.mat.
    """
    rows = []
    for cls in plan.classes:
        pattern = PATTERNS[cls.ilsvrc_id - 1]
        rows.append(
            [cls.ilsvrc_id, cls.wnid, cls.name, pattern.gloss, 0, np.zeros((1, 0), np.uint8), 0, config.train_per_class]
        )

    groups = []
    for node, kind in ((TEXTURE_NODE, "texture"), (SHAPE_NODE, "shape")):
        members = [c.ilsvrc_id for c in plan.classes if PATTERNS[c.ilsvrc_id - 1].kind == kind]
        if members:
            groups.append((node, members))
    next_id = len(plan.classes) + 1
    group_ids = []
    for (wnid, words, gloss), members in groups:
        group_ids.append(next_id)
        rows.append(
            [
                next_id,
                wnid,
                words,
                gloss,
                len(members),
                np.array([members], np.uint16),
                1,
                config.train_per_class * len(members),
            ]
        )
        next_id += 1
    wnid, words, gloss = ROOT_NODE
    rows.append(
        [
            next_id,
            wnid,
            words,
            gloss,
            len(group_ids),
            np.array([group_ids], np.uint16),
            2,
            config.train_per_class * config.classes,
        ]
    )

    synsets = np.empty((len(rows), 1), dtype=[(name, object) for name in SYNSET_FIELDS])
    for i, row in enumerate(rows):
        synsets[i, 0] = tuple(as_matlab(value) for value in row)
    return synsets


def _render_in_order(specs: list[ImageSpec], workers: int) -> Iterator[bytes]:
    """Render `specs`, yielding bytes in the same order; in worker processes when there is enough work."""
    # A pool costs more than it saves on a handful of images. The workers are fresh interpreters, never forks of
    # this process, which may have imported torch (alexrepro.core.workers).
    yield from map_ordered(render_image, specs, min(workers, max(1, len(specs) // 32)), preload=__name__)


SAMPLE_MARKER = ".alexrepro-sample.json"  # the settings of the sample this folder holds (or was being written)


def _refuse_to_replace(out: Path, overwrite: bool) -> None:
    """The sample's archives carry the official names, so OUT may well hold the real 150 GB download; archives
    beside this command's marker are its own (even half-written by a stopped run) and are replaced."""
    existing = [name for name in (TRAIN_ARCHIVE, VAL_ARCHIVE, DEVKIT_ARCHIVE) if (out / name).exists()]
    if existing and not overwrite and not (out / SAMPLE_MARKER).is_file():
        raise OutputExistsError(
            f"{out}: already holds {', '.join(existing)} (perhaps the real ILSVRC-2012 download); pass --overwrite "
            "to replace them with the sample, or choose another folder"
        )
