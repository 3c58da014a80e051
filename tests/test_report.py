"""The evaluation report: figures of the promised size, a self-contained HTML file, honest tables."""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexrepro.data.config import PrepareConfig
from alexrepro.data.shards.manifest import ClassInfo, Manifest, SplitInfo
from alexrepro.evaluate import report
from alexrepro.evaluate.stage import dataset_name
from alexrepro.model.config import ModelConfig
from alexrepro.train.config import TrainConfig

NUM_CLASSES = 6
IMAGES = 30


def example(rng, label, top=True, distance=None) -> report.Example:
    image = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    if not top:
        return report.Example(f"n_{rng.integers(1e6)}", image, label, distance=distance)
    return report.Example(f"val_{label}", image, label, [label, 1, 2, 3, 4], [0.5, 0.2, 0.1, 0.1, 0.05])


def make_inputs(dataset: str = "own data, 6 classes", submission: str = "class index"):
    from alexrepro.core.config import config_to_dict

    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, size=IMAGES)
    top10 = np.stack([rng.permutation(NUM_CLASSES)[:5] for _ in range(IMAGES)])
    train_config = config_to_dict(TrainConfig())
    train_config.update(epochs=3, crop=67, width=0.125)
    model_config = dataclasses.asdict(ModelConfig(num_classes=NUM_CLASSES, crop=67, width=0.125))
    metrics = {
        "1crop": {"top1_error": 0.6, "top5_error": 0.2},
        "10crop": {"top1_error": 0.5, "top5_error": 0.1},
        "images": IMAGES,
        "dataset": dataset,
        "checkpoint": {"path": "runs/train/checkpoint-best.pt", "sha256": "a" * 64, "epoch": 3},
        "data": {"manifest_sha256": "b" * 64},
        "switches": {"lrn": True},
    }
    return report.ReportInputs(
        metrics=metrics,
        classes=[
            {"index": i, "wnid": f"n0{i:07d}", "ilsvrc_id": None, "name": f"thing {i}, stuff"}
            for i in range(NUM_CLASSES)
        ],
        labels=labels,
        top10=top10,
        model_config=model_config,
        train_config=train_config,
        switches={"lrn": True, "towers": 2},
        history=[{"epoch": e, "train_loss": 2.0 / e, "val_top1_error": 0.9 / e, "lr": 0.01 / e} for e in (1, 2, 3)],
        conv1=rng.normal(size=(12, 3, 11, 11)).astype(np.float32),
        towers=2,
        examples=[example(rng, i % NUM_CLASSES) for i in range(8)],
        neighbours=[
            report.NeighbourRow(
                example(rng, q, top=False), [example(rng, j, top=False, distance=1.0 + j) for j in range(6)]
            )
            for q in range(5)
        ],
        submission_labels=submission,
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    md, html = report.write_report(out, make_inputs())
    return out, md.read_text(), html.read_text()


def test_every_figure_is_a_png_of_the_promised_size(written):
    out, *_ = written
    for name, (width, height) in report.FIGURE_INCHES.items():
        with Image.open(out / "figures" / f"{name}.png") as image:
            image.load()
            assert image.format == "PNG"
            assert image.size == (round(width * report.DPI), round(height * report.DPI)), name


def test_html_is_self_contained(written):
    out, _, html = written
    references = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)["\']', html, flags=re.IGNORECASE)
    assert len(references) == len(report.FIGURE_INCHES)
    assert all(ref.startswith("data:image/png;base64,") for ref in references)
    assert "http" not in html.replace("http-equiv", "") and "figures/" not in html and "url(" not in html
    # Each embedded figure is the PNG written beside the report, byte for byte, and each PNG is embedded once.
    embedded = sorted(base64.b64decode(ref.split(",", 1)[1]) for ref in references)
    assert embedded == sorted((out / "figures" / f"{name}.png").read_bytes() for name in report.FIGURE_INCHES)


def test_markdown_links_the_png_files(written):
    out, md, _ = written
    for name in report.FIGURE_INCHES:
        assert f"](figures/{name}.png)" in md and (out / "figures" / f"{name}.png").is_file()


def table_rows(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_results_table_names_the_dataset_on_every_row(written):
    _, md, _ = written
    rows = table_rows(md, "system")
    assert len(rows) == 2 + len(report.REFERENCE_RESULTS)
    assert all(row[1] for row in rows)
    assert rows[0][:3] == ["this run (3 epochs)", "own data, 6 classes", "1-crop (centre)"]
    assert rows[1][2:] == ["10-crop", "50.00", "10.00"]
    assert ["paper, 1 CNN", "ILSVRC-2012 val", "10-crop", "40.70", "18.20"] in rows
    assert "not comparable" in md
    assert "as class indices" in md  # the submission file's labels are said to be class indices


def test_no_warning_when_the_data_is_ilsvrc_2012(tmp_path):
    inputs = make_inputs("ILSVRC-2012 val", "ILSVRC2012_ID")
    inputs.towers = 1  # the single-tower ablation draws its kernels as one block
    md, _ = report.write_report(tmp_path, inputs)
    text = md.read_text()
    assert "not comparable" not in text and "as ILSVRC2012_IDs" in text
    assert "one tower (the paper's Figure 3)" in text


def test_recipe_marks_what_differs_from_the_paper(written):
    _, md, _ = written
    rows = {row[0]: row for row in table_rows(md, "setting")}
    assert rows["epochs"][1:] == ["3", "90", "differs from the paper"]
    assert rows["crop"][1:] == ["67", "227", "differs from the paper"]
    assert rows["lr"][1:] == ["0.01", "0.01", ""]
    assert rows["num_classes"][1:] == ["6", "1000", "differs from the paper"]
    assert rows["width"][3] == "differs from the paper" and rows["lrn"][3] == ""


@pytest.mark.parametrize("size", [112, 256])
def test_recipe_shows_the_prepared_image_size_beside_the_papers(tmp_path, size):

    inputs = make_inputs()
    inputs.prepare_settings = {
        "size": size,
        "quality": 90,
        "resize_filter": "bilinear",
        "seed": 0,
        "shard_size": 250,
        "pillow": "Pillow 13.0.0",
        "layout": "ilsvrc2012-archives",
    }
    md, html = report.write_report(tmp_path, inputs)
    rows = {row[0]: row for row in table_rows(md.read_text(), "setting")}
    paper = PrepareConfig().size
    mark = "" if size == paper else "differs from the paper"
    assert rows["prepare.size"][1:] == [str(size), str(paper), mark]
    assert rows["prepare.quality"][1:] == ["90", "not given in the paper", ""]
    assert rows["prepare.pillow"][1] == "Pillow 13.0.0" and "prepare.layout" in rows
    assert f"{4 + bool(mark)} of the recipe's settings differ from the paper" in md.read_text()
    assert "<td>prepare.size</td>" in html.read_text()


def test_speed_only_settings_are_not_counted_as_recipe_changes(tmp_path):
    inputs = make_inputs()
    inputs.train_config.update(devices="cpu", workers=0)
    md, _ = report.write_report(tmp_path, inputs)
    rows = {row[0]: row for row in table_rows(md.read_text(), "setting")}
    assert rows["devices"][3] == rows["workers"][3] == report.DIFFERS_SPEED_ONLY
    assert "4 of the recipe's settings differ from the paper" in md.read_text()  # epochs, crop, width, num_classes


def test_per_class_error_and_confused_pairs_match_brute_force():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=50)
    top = np.stack([rng.permutation(4)[:3] for _ in range(50)])
    errors = report.per_class_error(top, labels, 5, 2)
    for c in range(4):
        rows = [i for i in range(50) if labels[i] == c]
        expected = sum(labels[i] not in top[i, :2] for i in rows) / len(rows) if rows else np.nan
        assert errors[c] == pytest.approx(expected)
    assert np.isnan(errors[4])
    pairs = report.confused_pairs(top, labels, n=100)
    counts = {}
    for t, p in zip(labels, top[:, 0], strict=True):
        if t != p:
            counts[(t, p)] = counts.get((t, p), 0) + 1
    assert {(t, p): c for t, p, c in pairs} == counts
    assert [c for *_, c in pairs] == sorted(counts.values(), reverse=True)


def test_each_kernel_is_scaled_on_its_own():
    kernels = np.stack([np.full((3, 2, 2), 5.0), np.arange(12.0).reshape(3, 2, 2) * 100])
    kernels[0, 0, 0, 0] = -1.0
    mosaic = report.kernel_mosaic(kernels, columns=2)
    assert mosaic.shape == (4, 7, 3)
    for tile in (mosaic[1:3, 1:3], mosaic[1:3, 4:6]):
        assert tile.min() == 0.0 and tile.max() == 1.0


def manifest(classes: int, val: int, wnids=None) -> Manifest:
    infos = tuple(ClassInfo(i, (wnids or [f"n0{i:07d}" for i in range(classes)])[i], None, "x") for i in range(classes))
    return Manifest({}, infos, {"train": SplitInfo(10, ()), "val": SplitInfo(val, ())})


def test_dataset_name_is_ilsvrc_only_for_ilsvrc_sized_data():
    from alexrepro.synth.sample import PATTERNS

    assert dataset_name(manifest(1000, 50_000)) == "ILSVRC-2012 val"
    assert dataset_name(manifest(1000, 10_000)) == "own data, 1000 classes"
    sample = manifest(4, 40, [p.wnid for p in PATTERNS[:4]])
    assert dataset_name(sample) == "built-in sample, 4 classes"


def test_best_and_worst_classes_are_each_at_most_half_the_classes(written):
    _, md, _ = written
    sections = md.split("### ")
    best = next(s for s in sections if s.startswith("Best classes"))
    worst = next(s for s in sections if s.startswith("Worst classes"))
    best_rows = [line for line in best.splitlines() if line.startswith("| ") and "---" not in line][1:]
    worst_rows = [line for line in worst.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert 0 < len(best_rows) <= NUM_CLASSES // 2 and len(worst_rows) == len(best_rows)
    assert not set(best_rows) & set(worst_rows)


@pytest.mark.parametrize("kernels, towers", [(96, 2), (12, 2), (24, 1)])
def test_conv1_figure_is_mostly_kernels_not_whitespace(tmp_path, kernels, towers):
    inputs = dataclasses.replace(
        make_inputs(),
        conv1=np.random.default_rng(0).normal(size=(kernels, 3, 11, 11)).astype(np.float32),
        towers=towers,
    )
    report.write_report(tmp_path, inputs)
    pixels = np.asarray(Image.open(tmp_path / "figures" / "conv1.png").convert("RGB"))
    assert (pixels.min(axis=2) < 250).mean() > 0.5  # a fixed 16 columns left ~60% of it blank


def test_worst_classes_never_lists_a_class_without_errors(tmp_path):
    """On data the network gets right, "worst classes" says so instead of listing classes at 0% error."""
    inputs = make_inputs()
    top10 = inputs.top10.copy()
    top10[:, 0] = inputs.labels  # every top guess right
    md_path, _ = report.write_report(tmp_path, dataclasses.replace(inputs, top10=top10))
    worst = md_path.read_text().split("### Worst classes")[1].split("###")[0]
    assert "No class has a top-1 error." in worst and "| " not in worst, worst


def test_the_claims_table_shows_what_docs_claims_md_measured(tmp_path):
    from alexrepro.evaluate.claims import read_measured

    measured = read_measured(Path(__file__).resolve().parents[1] / "docs" / "claims.md")
    assert set(measured) >= {"activation", "towers", "lrn", "overlap_pool", "pca_lighting", "dropout"}, measured
    assert all("points top-1" in text or text == "not measured" for text in measured.values()), measured
    md_path, _ = report.write_report(tmp_path, dataclasses.replace(make_inputs(), measured_claims=measured))
    claims = md_path.read_text().split("## The paper's claims")[1].split("\n## ")[0]
    lrn_row = next(line for line in claims.splitlines() if "| lrn |" in line)
    assert measured["lrn"] in lrn_row, lrn_row
    assert read_measured(tmp_path / "no-such-file.md") == {}


def test_conv1_caption_says_what_a_short_run_cannot_show(tmp_path):
    short = make_inputs()
    assert len(short.history) < report.PAPER_EPOCHS_FOR_FILTERS
    (caption,) = [b.caption for b in report.conv1_section(short) if isinstance(b, report.Figure)]
    assert "look like noise" in caption and "Figure 3" in caption
    long_run = dataclasses.replace(short, history=[short.history[-1]] * 90)
    (caption,) = [b.caption for b in report.conv1_section(long_run) if isinstance(b, report.Figure)]
    assert "look like noise" not in caption
