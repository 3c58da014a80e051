"""How library code reports progress without knowing about terminals.

Stages take a `Progress` and call it; the command line passes a Rich bar on a terminal and a `LineProgress` (plain
lines at an interval) when stderr is a file or a pipe (`dvc repro > log`, `| cat`, nohup, SLURM), as torchvision's
`MetricLogger` and timm's `--log-interval` do. Tests pass `NullProgress`. This keeps Rich out of the library
(STYLE.md: bars live in the CLI layer).

Fields a stage may pass to `advance` (each optional): `loss` (mean over the images since the last read-out, None
before the first), `lr`, `img_s` (images per second; when given it is the only rate shown, whatever the units
counted), `data_wait` (fraction of the time spent waiting for the loader).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    def start(self, description: str, total: int | None, unit: str = "img") -> None:
        """A new phase begins; `total` is the number of `unit`s (images, steps) it will take, if known."""

    def advance(self, units: int = 1, **fields: object) -> None:
        """`units` more are done; `fields` are live figures to show (loss=…, lr=…, img_s=…)."""

    def log(self, line: str) -> None:
        """A line worth keeping in the terminal's scrollback (one per epoch, a summary)."""

    def finish(self) -> None:
        """The current phase has ended."""


class NullProgress:
    """A Progress that shows nothing: the no-op used by tests."""

    def start(self, description: str, total: int | None, unit: str = "img") -> None:
        pass

    def advance(self, units: int = 1, **fields: object) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def finish(self) -> None:
        pass


def format_fields(fields: dict[str, object]) -> str:
    """`loss 2.244  lr 0.02  412 img/s  data wait 3%`: the live figures, '—' for a loss not read out yet."""
    parts = []
    if "loss" in fields:
        loss = fields["loss"]
        parts.append("loss —" if loss is None else f"loss {float(loss):.4f}")  # type: ignore[arg-type]
    if fields.get("lr") is not None:
        parts.append(f"lr {float(fields['lr']):.4g}")  # type: ignore[arg-type]
    if fields.get("img_s") is not None:
        parts.append(f"{float(fields['img_s']):,.0f} img/s")  # type: ignore[arg-type]
    if fields.get("data_wait") is not None:
        parts.append(f"data wait {float(fields['data_wait']):.0%}")  # type: ignore[arg-type]
    for key, value in fields.items():
        if key not in ("loss", "lr", "img_s", "data_wait"):
            parts.append(f"{key} {value}")
    return "  ".join(parts)


def units(count: float, unit: str) -> str:
    """The unit for `count` of it: "47 steps", "1 shard"; "img" stays as it is (an abbreviation)."""
    return unit if unit == "img" or round(count) == 1 else unit + "s"


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """Plain, unwrapped lines for logs: one every `interval` units and one when a phase ends; nothing live.

    `interval` None picks a tenth of the phase (or every 1000 units when the total is unknown). `bars=False`
    (`--quiet`) keeps only the `log` lines (one per epoch, summaries).
    """

    def __init__(self, stream: TextIO | None = None, interval: int | None = None, bars: bool = True):
        self._stream = stream
        self._interval = interval
        self._bars = bars
        self._description = ""
        self._total: int | None = None
        self._unit = "img"
        self._done = 0
        self._next = 0
        self._step = 1
        self._started = 0.0
        self._fields: dict[str, object] = {}
        self._active = False

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def start(self, description: str, total: int | None, unit: str = "img") -> None:
        self.finish()
        self._description, self._total, self._unit = description, total, unit
        self._done, self._fields, self._active = 0, {}, True
        self._started = time.perf_counter()
        if self._interval is not None:
            self._step = max(1, self._interval)
        elif total:
            self._step = max(1, math.ceil(total / 10))
        else:
            self._step = 1000
        self._next = self._step

    def advance(self, units: int = 1, **fields: object) -> None:
        if not self._active:
            return
        self._done += units
        self._fields = fields
        if self._done >= self._next and (self._total is None or self._done < self._total):
            self._emit()
            while self._next <= self._done:
                self._next += self._step

    def log(self, line: str) -> None:
        self._write(line)

    def finish(self) -> None:
        if self._active and self._done > 0:
            self._emit()
        self._active = False

    def _emit(self) -> None:
        if not self._bars:
            return
        elapsed = time.perf_counter() - self._started
        total = f"/{self._total:,}" if self._total is not None else ""
        parts = [f"{self._description} [{self._done:,}{total} {units(self._total or self._done, self._unit)}]"]
        figures = format_fields(self._fields)
        if not figures and elapsed > 0 and self._unit == "img":
            figures = f"{self._done / elapsed:,.0f} img/s"
        if figures:
            parts.append(figures)
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self._total and self._done < self._total and self._done > 0:
            parts.append(f"eta {format_seconds(elapsed / self._done * (self._total - self._done))}")
        self._write("  ".join(parts))
