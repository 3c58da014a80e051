"""What a training run records per epoch, and where each part goes.

Two kinds of figures, kept apart so that a rerun with the same results leaves every tracked file unchanged:
- results (losses, errors) and the learning rate: `history.json` and `history.csv` (DVC plots), `last_epoch.json`
  (the stage's DVC metrics: results only), the checkpoint's embedded history (the report's curves, resume), and the
  live view (alexrepro.train.live);
- timings (images/s, seconds, the fraction of time spent waiting for data), which differ from run to run:
  `timings.csv` in the run folder, which dvc.yaml does not declare and git ignores, and the per-epoch line.
Each file is rewritten whole and atomically, by rank 0 only.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from alexrepro.core.atomic import atomic_write_text

HISTORY_FIELDS = (
    "epoch", "train_loss", "train_top1_error", "train_top5_error", "val_loss", "val_top1_error", "val_top5_error",
    "lr",
)  # fmt: skip
# What last_epoch.json (the stage's DVC metrics) holds: results only.
RESULT_FIELDS = ("train_loss", "train_top1_error", "train_top5_error", "val_loss", "val_top1_error", "val_top5_error")
TIMING_FIELDS = ("epoch", "images_per_s", "seconds", "data_wait_fraction")
TIMINGS_NAME = "timings.csv"


def results_only(row: dict[str, Any]) -> dict[str, Any]:
    """A history row without timings (checkpoints written before the split carried both)."""
    return {k: row[k] for k in HISTORY_FIELDS if k in row}


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    """history.json (a list of rows) and history.csv, rewritten whole (DVC plots read either), and
    last_epoch.json: the latest epoch's results only, so that `dvc metrics show` and `dvc exp show` list results,
    not settings or timings (lr is a param)."""
    rows = [results_only(row) for row in history]
    atomic_write_text(out / "history.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "last_epoch.json", json.dumps({k: rows[-1][k] for k in RESULT_FIELDS}, indent=2) + "\n")
    atomic_write_text(out / "history.csv", _csv(rows, HISTORY_FIELDS))


def write_timings(out: Path, timings: list[dict[str, Any]]) -> None:
    atomic_write_text(out / TIMINGS_NAME, _csv(timings, TIMING_FIELDS))


def read_timings(out: Path, epochs: int) -> list[dict[str, Any]]:
    """The timings of the first `epochs` epochs from an earlier part of this run, as far as the file has them (a
    resumed run continues the file; it is not a result, so a missing or damaged one just starts again)."""
    try:
        with open(out / TIMINGS_NAME, newline="") as handle:
            rows = [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    except (OSError, ValueError, TypeError):
        return []
    return [row for row in rows if row.get("epoch", 0) <= epochs]


def epoch_line(row: dict[str, Any], timing: dict[str, Any], epochs: int) -> str:
    """One plain line per epoch (errors as percentages, as every line for people; files hold fractions)."""
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.3f}, top-1 err {row['train_top1_error']:.1%} · "
        f"val loss {row['val_loss']:.3f}, top-1 err {row['val_top1_error']:.1%}, top-5 err {row['val_top5_error']:.1%}"
        f" · lr {row['lr']:g} · {timing['images_per_s']:.0f} img/s · data wait {timing['data_wait_fraction']:.0%}"
    )


def _csv(rows: list[dict[str, Any]], fields: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
