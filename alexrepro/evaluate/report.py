"""The evaluation report: `report.md`, a self-contained `report.html`, and the figures as PNG files.

Contents (DESIGN.md "Evaluation and report"):
- the results table: this run's 1-crop and 10-crop errors beside the paper's and other systems' (REFERENCE.md §4), with
  the dataset named on every row so that a run on the built-in sample is never read as an ImageNet result;
- the run's recipe: the data stage's settings (from the val manifest) and every hyper-parameter and switch, each one
  that differs from the paper's default marked; the defaults come from the `PrepareConfig`, `TrainConfig` and
  `ModelConfig` dataclasses, whose defaults are the paper's values;
- training curves (loss; train and val top-1/top-5 error; learning rate on a log scale);
- the conv1 kernels as RGB tiles, one block per tower (the paper's Figure 3);
- validation images with their 10-crop top-5 as bars, the true label marked (Figure 4, left);
- the training images nearest to five validation images in fc7 space (Figure 4, right);
- per-class error (best and worst classes) and the most confused pairs.

The report is built once as a list of blocks and rendered twice: Markdown that links `figures/*.png`, and HTML that
embeds the same PNGs as base64 data URIs, so the HTML file opens offline with no other file beside it.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display (must precede pyplot)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from alexrepro.core.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from alexrepro.data.config import PrepareConfig
from alexrepro.model.config import ModelConfig
from alexrepro.train.config import RESUMABLE_CHANGES, TrainConfig

DPI = 100
# Figure name → size in inches; at DPI the PNGs are exactly 100× these in pixels (tests rely on it).
FIGURE_INCHES = {
    "curves": (15.0, 4.5),
    "conv1": (12.0, 6.0),
    "examples": (16.0, 9.0),
    "neighbours": (14.0, 10.0),
    "per_class": (12.0, 4.0),
}
ILSVRC_2012_VAL = "ILSVRC-2012 val"
MAX_NAMED_CLASSES = 40  # up to this many classes, the per-class figure names each one
# Points for class names in the figures: the report shows a 1600-pixel figure in about 1150 pixels, so 12 pt reads as
# about 9 pt on screen (8 pt read as under 6).
LABEL_FONT = 12

# REFERENCE.md §4: published error rates (%), lower is better. (system, data, protocol, top-1, top-5)
REFERENCE_RESULTS: tuple[tuple[str, str, str, float | None, float | None], ...] = (
    ("paper, 1 CNN", ILSVRC_2012_VAL, "10-crop", 40.7, 18.2),
    ("paper, 5 CNNs", ILSVRC_2012_VAL, "10-crop, 5 CNNs averaged", 38.1, 16.4),
    ("paper", "ILSVRC-2010 test", "10-crop", 37.5, 17.0),
    ("paper, 7 CNNs (2 pre-trained on 2011 Fall)", "ILSVRC-2012 test", "10-crop, 7 CNNs averaged", None, 15.3),
    ("cuda-convnet2 1-GPU config, 90 epochs", ILSVRC_2012_VAL, "1-crop (centre)", 42.5, 19.8),
    ("cuda-convnet2 1-GPU config, 90 epochs", ILSVRC_2012_VAL, "multiview", 40.4, 18.2),
    ("Caffe bvlc_alexnet", ILSVRC_2012_VAL, "1-crop (centre)", 42.9, 19.8),
    ("torchvision alexnet (one-weird-trick variant)", ILSVRC_2012_VAL, "1-crop (centre)", 43.48, 20.93),
    ("tensorpack alexnet, 100 epochs", ILSVRC_2012_VAL, "1-crop (centre)", 42.0, None),
)


@dataclass
class Example:
    """One image shown in a figure: a validation image with its top-k, or a training neighbour with its distance."""

    key: str
    image: np.ndarray  # H×W×3 uint8 RGB
    label: int
    top: list[int] = field(default_factory=list)  # class indices, most confident first
    probs: list[float] = field(default_factory=list)
    distance: float | None = None  # fc7 Euclidean distance to the query


@dataclass
class NeighbourRow:
    query: Example
    neighbours: list[Example]


@dataclass
class ReportInputs:
    metrics: dict[str, Any]  # as in metrics.json
    classes: list[dict[str, Any]]  # {index, wnid, ilsvrc_id, name}
    labels: np.ndarray  # N true classes, file-name order
    top10: np.ndarray  # N×k 10-crop guesses
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    switches: dict[str, Any]
    history: list[dict[str, Any]]
    conv1: np.ndarray  # out×3×h×w, towers' kernels in order
    towers: int
    examples: list[Example]
    neighbours: list[NeighbourRow]
    submission_labels: str  # "ILSVRC2012_ID" or "class index"
    neighbours_scanned: str = "all"  # how many training images the neighbour search looked at ("all 1,281,167")
    checkpoint_manifest_sha256: str | None = None
    prepare_settings: dict[str, Any] = field(default_factory=dict)  # the val manifest's settings (size, quality…)
    measured_claims: dict[str, str] = field(default_factory=dict)  # switch → effect measured in docs/claims.md


# --------------------------------------------------------------------------------------------------------------
# Blocks, rendered to Markdown and HTML


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # figures/<name>.png
    caption: str
    png: bytes


Block = Heading | Paragraph | Table | Figure


def render_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            cells = [block.header, ["---"] * len(block.header), *block.rows]
            parts.append("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells))
        elif isinstance(block, Figure):
            parts.append(f"![{block.caption}](figures/{block.name}.png)\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{HTML_STYLE}</style>",
        "</head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(c)}</th>" for c in block.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(
                f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The report


def write_report(out: Path, inputs: ReportInputs) -> tuple[Path, Path]:
    """Write report.md, report.html and figures/*.png under `out`; return the two report paths."""
    out = Path(out)
    blocks: list[Block] = []
    metrics = inputs.metrics
    dataset = metrics["dataset"]
    blocks.append(Heading(f"AlexNet evaluation: {dataset}", 1))
    checkpoint = metrics["checkpoint"]
    blocks.append(
        Paragraph(
            f"Checkpoint {checkpoint['path']} (epoch {checkpoint['epoch']}, sha256 {checkpoint['sha256'][:12]}…), "
            f"evaluated on {metrics['images']:,} validation images of {dataset} "
            f"(manifest sha256 {metrics['data']['manifest_sha256'][:12]}…)."
        )
    )
    for section in SECTIONS:
        blocks += section(inputs)

    for block in blocks:
        if isinstance(block, Figure):
            atomic_write_bytes(out / "figures" / f"{block.name}.png", block.png)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, render_markdown(blocks))
    atomic_write_text(html_path, render_html(blocks, f"AlexNet evaluation: {dataset}"))
    return md_path, html_path


def _pct(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def results_section(inputs: ReportInputs) -> list[Block]:
    metrics = inputs.metrics
    dataset = metrics["dataset"]
    epoch = metrics["checkpoint"]["epoch"]
    rows = [
        [f"this run ({epoch} epochs)", dataset, protocol, _pct(100 * m["top1_error"]), _pct(100 * m["top5_error"])]
        for protocol, m in (("1-crop (centre)", metrics["1crop"]), ("10-crop", metrics["10crop"]))
    ]
    rows += [[system, data, protocol, _pct(t1), _pct(t5)] for system, data, protocol, t1, t5 in REFERENCE_RESULTS]
    blocks: list[Block] = [
        Heading("Results"),
        Table(["system", "data", "protocol", "top-1 error %", "top-5 error %"], rows),
    ]
    if dataset != ILSVRC_2012_VAL:
        blocks.append(
            Paragraph(
                f"This run was evaluated on {dataset}, not on ILSVRC-2012: its errors are not comparable with the "
                "published rows, which are all on ILSVRC data with 1000 classes."
            )
        )
    blocks.append(
        Paragraph(
            "The submission file (submission.txt) lists five guesses per image, one line per validation image in "
            "file-name order, most confident first, "
            + (
                "as ILSVRC2012_IDs (the ILSVRC task-1 format)."
                if inputs.submission_labels == "ILSVRC2012_ID"
                else "as class indices (positions of the WNIDs in sorted order), because the data has no "
                "ILSVRC2012_IDs: prepare from the official devkit to get a file the ILSVRC server accepts."
            )
        )
    )
    if len(inputs.classes) <= 5:
        blocks.append(
            Paragraph(
                f"With {len(inputs.classes)} classes every class is among the five guesses: top-5 error is 0 by "
                "construction here."
            )
        )
    trained_on = inputs.checkpoint_manifest_sha256
    if trained_on and trained_on != metrics["data"]["manifest_sha256"]:
        blocks.append(
            Paragraph(
                f"Note: the checkpoint was trained with shards whose manifest sha256 is {trained_on[:12]}…, "
                "not the shards evaluated here (same classes)."
            )
        )
    return blocks


def config_defaults(cls: type) -> dict[str, Any]:
    """Each field's default value in a config dataclass (the paper's values, by this project's convention)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def recipe_rows(inputs: ReportInputs) -> list[list[str]]:
    """[setting, this run, paper default, mark] for every train setting, switch and model setting of the run."""

    train_defaults = config_defaults(TrainConfig)
    model_defaults = config_defaults(ModelConfig)
    # Settings that decide how fast a run goes, not what it computes (those a resumed run may change), except the
    # number of epochs, which is part of the paper's recipe, and the arithmetic: the paper computed in fp32 (no
    # TF32, no bf16), so any other precision is a difference from the paper even though it is chosen for speed.
    speed_only = set(RESUMABLE_CHANGES) - {"epochs", "precision", "tf32"}
    rows = []
    seen = set()
    for source, defaults in (
        (inputs.train_config, train_defaults),
        (inputs.switches, {**model_defaults, **train_defaults}),
        (inputs.model_config, model_defaults),
    ):
        for key, value in source.items():
            if key in seen:
                continue
            seen.add(key)
            if key in NOT_GIVEN_IN_PAPER:
                rows.append([key, _fmt(value), "not given in the paper", ""])
            elif key in defaults:
                paper = defaults[key]
                if _same(value, paper):
                    mark = ""
                elif key in speed_only:
                    mark = DIFFERS_SPEED_ONLY
                else:
                    mark = DIFFERS
                rows.append([key, _fmt(value), _fmt(paper), mark])
            else:
                rows.append([key, _fmt(value), "—", ""])
    return rows


# The prepare settings that decide what the evaluated images look like (seed and shard_size only order and group the
# images). Only the size is the paper's (§2: 256×256); the others are shown for information.
PREPARE_SHOWN = ("size", "quality", "resize_filter", "pillow", "layout")
NOT_IN_PAPER = {"quality", "resize_filter", "pillow"}


def prepare_rows(settings: dict[str, Any]) -> list[list[str]]:
    """[setting, this run, paper default, mark] for the data stage's settings recorded in a manifest."""

    paper_size = config_defaults(PrepareConfig)["size"]
    rows = []
    for key in PREPARE_SHOWN:
        if key not in settings:
            continue
        value = settings[key]
        if key == "size":
            rows.append([f"prepare.{key}", _fmt(value), _fmt(paper_size), "" if value == paper_size else DIFFERS])
        else:
            rows.append([f"prepare.{key}", _fmt(value), "not given in the paper" if key in NOT_IN_PAPER else "—", ""])
    return rows


# Training settings the paper does not give a value for: their defaults are this project's choices, not the paper's.
# (lr_milestones belongs to the "step" schedule, a fixed stand-in for the paper's plateaus: lr_schedule is marked.)
NOT_GIVEN_IN_PAPER = {"lr_patience", "lr_min_improvement", "shuffle_buffer", "lr_milestones"}

DIFFERS = "differs from the paper"
DIFFERS_SPEED_ONLY = "other than the default (speed only)"


def recipe_section(inputs: ReportInputs) -> list[Block]:
    rows = prepare_rows(inputs.prepare_settings) + recipe_rows(inputs)
    differing = sum(1 for r in rows if r[3] == DIFFERS)
    return [
        Heading("Recipe"),
        Paragraph(
            "The data stage's settings (prepare.*, from the validation shards' manifest) and every setting of the "
            "training run, as stored in the checkpoint, beside its default (PrepareConfig, TrainConfig and "
            f"ModelConfig, whose defaults are the paper's values). {differing} of the recipe's settings differ from "
            "the paper; settings that only change the speed (devices, workers…) are marked apart. Any precision "
            "other than fp32 without TF32 differs from the paper's arithmetic and is marked so."
        ),
        Table(["setting", "this run", "default (the paper's)", ""], rows),
    ]


# The paper's claims that have a switch: (section, setting, the paper's value, what the paper says it is worth).
CLAIM_SWITCHES = (
    ("§3.1", "activation", "ReLU: 25% training error about 6× sooner than tanh (Figure 1)"),
    ("§3.2", "towers", "two towers: 1.7 / 1.2 points (top-1 / top-5) better than the one-GPU net"),
    ("§3.2", "layer_widths", "the one-GPU net halves conv1–conv4 (towers 1, 0.5 ×4, 1 ×3)"),
    ("§3.3", "lrn", "LRN: 1.4 / 1.2 points"),
    ("§3.4", "overlap_pool", "overlapping pooling: 0.4 / 0.3 points"),
    ("§4.1", "pca_lighting", "PCA lighting: over 1 point top-1"),
    ("§4.2", "dropout", "dropout: prevents substantial overfitting (no number)"),
    ("§4.2", "dropout_scaling", "×0.5 at test time (no comparison in the paper)"),
    ("§5", "decay_biases", "weight decay on w only (no comparison in the paper)"),
)


def claims_section(inputs: ReportInputs) -> list[Block]:
    """This run's value of every switch behind a claim of the paper, beside the paper's; the claims themselves are
    measured by `alexrepro claims` (docs/claims.md), over several runs, not by one report."""

    defaults = {**config_defaults(ModelConfig), **config_defaults(TrainConfig)}
    recorded = {**inputs.model_config, **inputs.train_config, **inputs.switches}
    rows = []
    for section, key, claim in CLAIM_SWITCHES:
        value = recorded.get(key)
        shown = "not recorded" if value is None else _fmt(value)
        if value is not None and not _same(value, defaults[key]):
            shown += " (ablated)"
        measured = inputs.measured_claims.get(key, "part of the row above" if key == "layer_widths" else "not measured")
        rows.append([section, key, shown, _fmt(defaults[key]), claim, measured])
    return [
        Heading("The paper's claims"),
        Paragraph(
            "Each claim of the paper that has a switch, this run's setting of it, and the effect measured on the "
            "built-in sample over three seeds (docs/claims.md, written by `alexrepro claims` from `dvc exp run` "
            "experiments; the sample is small, so a claim that does not show there is not refuted). 10-crop "
            "against 1-crop (§4.1) is in the results above."
        ),
        Table(["section", "setting", "this run", "the paper's", "the paper says", "measured on the sample"], rows),
    ]


# --------------------------------------------------------------------------------------------------------------
# Figures


def _figure(name: str):
    return plt.figure(figsize=FIGURE_INCHES[name], dpi=DPI)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays exactly FIGURE_INCHES × DPI
    plt.close(fig)
    return buffer.getvalue()


def _short(name: str, width: int = 22) -> str:
    first = name.split(",")[0].strip()
    return first if len(first) <= width else first[: width - 1] + "…"


def _history_series(history: list[dict[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
    epochs = [float(row.get("epoch", i + 1)) for i, row in enumerate(history)]
    keys: list[str] = []
    for row in history:
        for key, value in row.items():
            if key not in keys and key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.append(key)
    series = {k: [float(row[k]) if row.get(k) is not None else math.nan for row in history] for k in keys}
    return epochs, series


def curves_section(inputs: ReportInputs) -> list[Block]:
    epochs, series = _history_series(inputs.history)
    fig = _figure("curves")
    ax_loss, ax_err, ax_lr = fig.subplots(1, 3)
    for key, values in series.items():
        if "loss" in key:
            ax_loss.plot(epochs, values, marker=".", label=key)
        elif "top1" in key or "top5" in key or "err" in key:
            ax_err.plot(epochs, [100 * v for v in values], marker=".", label=key)
        elif key == "lr" or key.endswith("_lr") or key.startswith("lr"):
            positive = [v if v > 0 else math.nan for v in values]
            ax_lr.plot(epochs, positive, marker=".", label=key)
            ax_lr.set_yscale("log")
    for ax, title, unit in ((ax_loss, "loss", "cross-entropy"), (ax_err, "error", "%"), (ax_lr, "learning rate", "")):
        if 0 < len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not in the history", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    caption = f"Training curves over {len(inputs.history)} epochs (from the checkpoint's history)."
    return [Heading("Training curves"), Figure("curves", caption, _png(fig))]


def conv1_weights(state_dict: dict[str, Any]) -> np.ndarray:
    """The conv1 kernels (out×3×h×w) from a model state_dict, towers in order."""
    # "conv1.towers.0.weight", "conv1.towers.1.weight": one tensor per tower, in tower order
    keys = sorted(
        k for k, v in state_dict.items() if k.split(".")[0] == "conv1" and k.endswith("weight") and v.dim() == 4
    )
    if not keys:
        raise KeyError("the checkpoint's model has no conv1 weight")
    return np.concatenate([state_dict[k].detach().float().cpu().numpy() for k in keys])


def kernel_mosaic(kernels: np.ndarray, columns: int) -> np.ndarray:
    """K×3×h×w → one H×W×3 image of tiles, each kernel scaled to [0, 1] on its own, 1-pixel white gaps."""
    count, _, h, w = kernels.shape
    rows = math.ceil(count / columns)
    mosaic = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), dtype=np.float32)
    for i, kernel in enumerate(kernels):
        low, high = kernel.min(), kernel.max()
        tile = (kernel - low) / (high - low) if high > low else np.full_like(kernel, 0.5)
        r, c = divmod(i, columns)
        mosaic[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = tile.transpose(1, 2, 0)
    return mosaic


PAPER_EPOCHS_FOR_FILTERS = 30  # below this many epochs the caption says what the kernels cannot show yet


def conv1_section(inputs: ReportInputs) -> list[Block]:
    kernels = inputs.conv1
    towers = max(1, inputs.towers)
    per_tower = np.array_split(kernels, towers)
    # As many columns as make each tower's mosaic as wide, relative to its height, as the space it is drawn in
    # (a fixed 16 columns left most of the figure blank).
    width, height = FIGURE_INCHES["conv1"]
    title = 0.35  # inches above each mosaic for its title
    aspect = width / (height / towers - title)
    n = max(len(t) for t in per_tower)
    rows = max(1, round(math.sqrt(n / aspect * kernels.shape[3] / kernels.shape[2])))
    columns = math.ceil(n / rows)
    fig = _figure("conv1")
    axes = np.atleast_1d(fig.subplots(towers, 1))
    for t, (ax, group) in enumerate(zip(axes, per_tower, strict=True)):
        ax.imshow(kernel_mosaic(group, columns), interpolation="nearest")
        ax.set_title(f"tower {t + 1}: {len(group)} kernels" if towers > 1 else f"{len(group)} kernels", fontsize=10)
        ax.axis("off")
    fig.subplots_adjust(
        left=0.005, right=0.995, bottom=0.005, top=1 - title / height, hspace=title * towers / height * 2
    )
    k = kernels.shape
    caption = f"The {k[0]} conv1 kernels ({k[2]}×{k[3]}×{k[1]}), each scaled to the full colour range on its own, " + (
        "one block per tower (the paper's Figure 3)." if towers > 1 else "one tower (the paper's Figure 3)."
    )
    if len(inputs.history) < PAPER_EPOCHS_FOR_FILTERS:
        caption += (
            f" After {len(inputs.history)} epochs the kernels are still close to their random start and look like "
            "noise, each scaled on its own; the paper's oriented edges and colour blobs (and the towers' split into "
            "colour-agnostic and colour-specific kernels) come from about 90 epochs on ImageNet. On the built-in "
            "sample's few shapes, even a long run learns few such filters."
        )
    return [Heading("First-layer kernels"), Figure("conv1", caption, _png(fig))]


def _class_name(inputs: ReportInputs, index: int) -> str:
    return str(inputs.classes[index]["name"]) if 0 <= index < len(inputs.classes) else str(index)


def examples_section(inputs: ReportInputs) -> list[Block]:
    examples = inputs.examples
    if not examples:
        return []
    columns = 4
    groups = math.ceil(len(examples) / columns)
    fig = _figure("examples")
    grid = fig.add_gridspec(2 * groups, columns, height_ratios=[3, 2] * groups)
    for i, ex in enumerate(examples):
        g, c = divmod(i, columns)
        ax_img = fig.add_subplot(grid[2 * g, c])
        ax_img.imshow(ex.image)
        ax_img.set_title(f"true: {_short(_class_name(inputs, ex.label), 30)}", fontsize=LABEL_FONT + 1)
        ax_img.axis("off")
        ax_bar = fig.add_subplot(grid[2 * g + 1, c])
        names = [_short(_class_name(inputs, t)) for t in ex.top]
        colours = ["tab:red" if t == ex.label else "tab:blue" for t in ex.top]
        positions = np.arange(len(ex.top))
        ax_bar.barh(positions, ex.probs, color=colours)
        ax_bar.set_yticks(positions, names, fontsize=LABEL_FONT)
        ax_bar.invert_yaxis()
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=LABEL_FONT - 2)
    fig.tight_layout()
    caption = (
        f"{len(examples)} validation images with the network's 10-crop top-{inputs.top10.shape[1]} "
        "(averaged softmax); the true class is the red bar when it is among them (the paper's Figure 4, left)."
    )
    return [Heading("Validation images and their top-5"), Figure("examples", caption, _png(fig))]


def neighbours_section(inputs: ReportInputs) -> list[Block]:
    rows = inputs.neighbours
    heading = Heading("Nearest training images in fc7 space")
    if not any(row.neighbours for row in rows):
        return [heading, Paragraph("Not computed (no training images were scanned).")]
    columns = 1 + max(len(r.neighbours) for r in rows)
    size = rows[0].query.image.shape[0]
    gap = max(2, size // 6)  # room between tiles for the labels
    pitch = size + gap
    mosaic = np.full((len(rows) * pitch, columns * pitch, 3), 255, dtype=np.uint8)
    # One image of all tiles and one axes: far faster to draw than an axes per tile.
    fig = _figure("neighbours")
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.95))
    for r, row in enumerate(rows):
        for c, ex in enumerate([row.query, *row.neighbours]):
            y, x = r * pitch + gap, c * pitch + gap // 2
            mosaic[y : y + size, x : x + size] = ex.image[:size, :size]
            name = _short(_class_name(inputs, ex.label), 18)
            if c == 0:
                label, colour = f"query: {name}", "black"
            else:
                label = f"{name}  d={ex.distance:.3g}"
                colour = "tab:green" if ex.label == row.query.label else "tab:red"
            ax.text(x + size / 2, y - 1, label, ha="center", va="bottom", fontsize=LABEL_FONT - 1, color=colour)
    ax.imshow(mosaic)
    ax.axvline(pitch - gap / 4, color="grey", linewidth=1)
    ax.axis("off")
    caption = (
        f"Validation images (left column) and the {columns - 1} training images whose fc7 activations are nearest "
        f"by Euclidean distance, among {inputs.neighbours_scanned} training images; green = same class as the query "
        "(the paper's Figure 4, right)."
    )
    return [heading, Figure("neighbours", caption, _png(fig))]


def per_class_error(top: np.ndarray, labels: np.ndarray, num_classes: int, k: int) -> np.ndarray:
    """Top-k error per true class (NaN for a class with no validation image)."""
    miss = ~(top[:, :k] == labels[:, None]).any(axis=1)
    counts = np.bincount(labels, minlength=num_classes)
    misses = np.bincount(labels, weights=miss, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, misses / np.maximum(counts, 1), np.nan)


def confused_pairs(top: np.ndarray, labels: np.ndarray, n: int = 10) -> list[tuple[int, int, int]]:
    """The `n` most frequent (true class, top-1 guess, count) among wrong top-1 guesses, most frequent first."""
    counts = Counter((int(t), int(p)) for t, p in zip(labels.tolist(), top[:, 0].tolist(), strict=True) if t != p)
    return [(t, p, c) for (t, p), c in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]]


def per_class_section(inputs: ReportInputs, shown: int = 10) -> list[Block]:
    num_classes = len(inputs.classes)
    labels = inputs.labels
    k = inputs.top10.shape[1]
    err1 = per_class_error(inputs.top10, labels, num_classes, 1)
    errk = per_class_error(inputs.top10, labels, num_classes, k)
    counts = np.bincount(labels, minlength=num_classes)
    present = [c for c in range(num_classes) if counts[c] > 0]
    order = sorted(present, key=lambda c: (err1[c], errk[c], c))

    def row(c: int) -> list[str]:
        return [
            f"{c} {inputs.classes[c]['wnid']}",
            _short(_class_name(inputs, c), 40),
            str(counts[c]),
            _pct(100 * err1[c]),
            _pct(100 * errk[c]),
        ]

    header = ["class", "name", "images", "top-1 error %", f"top-{k} error %"]
    # Best and worst are each at most half the classes, so that neither lists every class and they never overlap.
    n = min(shown, len(order) // 2)
    best = order[:n]
    worst = [c for c in order[::-1][:n] if err1[c] > 0]  # a class without a top-1 error is not among the worst

    fig = _figure("per_class")
    ax = fig.subplots()
    ranked = sorted(present, key=lambda c: (err1[c], c))
    positions = np.arange(len(ranked))
    if len(ranked) <= MAX_NAMED_CLASSES:  # few classes: a bar per class, named
        ax.bar(positions - 0.2, [100 * err1[c] for c in ranked], width=0.4, label="top-1 error")
        ax.bar(positions + 0.2, [100 * errk[c] for c in ranked], width=0.4, label=f"top-{k} error")
        ax.set_xticks(positions, [_short(_class_name(inputs, c), 18) for c in ranked], rotation=35, ha="right",
                      fontsize=8)  # fmt: skip
        ax.set_xlabel("")
    else:  # many classes: the sorted curve, with the best and worst few named
        ax.plot(positions, [100 * err1[c] for c in ranked], label="top-1 error")
        ax.plot(positions, [100 * errk[c] for c in ranked], label=f"top-{k} error")
        for i in (*range(3), *range(len(ranked) - 3, len(ranked))):
            ax.annotate(_short(_class_name(inputs, ranked[i]), 18), (i, 100 * err1[ranked[i]]), fontsize=7,
                        rotation=60, xytext=(0, 4), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("classes, sorted by 10-crop top-1 error")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    blocks: list[Block] = [
        Heading("Per-class error (10-crop)"),
        Figure("per_class", "10-crop error of every class, classes sorted by top-1 error.", _png(fig)),
    ]
    if best:
        blocks += [Heading("Best classes", 3), Table(header, [row(c) for c in best])]
        blocks.append(Heading("Worst classes", 3))
        if worst:
            blocks.append(Table(header, [row(c) for c in worst]))
        else:
            blocks.append(Paragraph("No class has a top-1 error."))
    else:  # a single class
        blocks += [Heading("Every class", 3), Table(header, [row(c) for c in order])]
    pairs = confused_pairs(inputs.top10, labels)
    blocks.append(Heading("Most confused pairs", 3))
    if pairs:
        blocks.append(
            Table(
                ["true class", "taken for", "images", "share of the true class"],
                [
                    [
                        _short(_class_name(inputs, t), 40),
                        _short(_class_name(inputs, p), 40),
                        str(c),
                        f"{100 * c / counts[t]:.1f}%",
                    ]
                    for t, p, c in pairs
                ],
            )
        )
    else:
        blocks.append(Paragraph("No image's top-1 guess was wrong."))
    return blocks


# The report, top to bottom. A new section or figure is one function `(ReportInputs) -> list[Block]` added here
# (a figure also names its size in FIGURE_INCHES).
SECTIONS: tuple[Callable[[ReportInputs], list[Block]], ...] = (
    results_section,
    recipe_section,
    claims_section,
    curves_section,
    conv1_section,
    examples_section,
    neighbours_section,
    per_class_section,
)
