"""The terminal implementation of `alexrepro.core.progress.Progress`: one live Rich bar on stderr.

A terminal shows the phase that is running and nothing else live: when a phase ends its bar is replaced by one line
in the scrollback (`epoch 3/20: 120 step in 0:00:41  2,345 img/s`), so a run of many epochs never grows a pile of
finished bars that Rich would cut at a screenful (hiding the current one). The bar fits the terminal: the step
count, rate, elapsed time and ETA are never shortened; the live figures (loss, lr, data wait) get what width is
left, and the bar itself narrows on an 80-column terminal.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import TimeRemainingColumn as _TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from alexrepro.core.progress import format_fields, format_seconds, units

DESCRIPTION_WIDTH = 24  # labels are short ("epoch 12/90", "checking shards"); a longer one is cut with "…"
WIDE = 120  # at this width or more the bar is 20 cells, else 10
# The columns other than the live figures, at their widest: description, bar, "12,345/12,345 shards", "12,345 img/s",
# elapsed, "ETA 0:00:00", and the spaces between them.
RESERVED = DESCRIPTION_WIDTH + 20 + 20 + 13 + 7 + 11 + 6


class _CountColumn(ProgressColumn):
    def render(self, task) -> Text:
        total = f"{task.total:,.0f}" if task.total is not None else "?"
        unit = units(task.total if task.total is not None else task.completed, task.fields.get("unit", "img"))
        return Text(f"{task.completed:,.0f}/{total} {unit}")


class _RateColumn(ProgressColumn):
    """One rate: the stage's own images/s when it reports one (training counts steps), else units counted per s."""

    def render(self, task) -> Text:
        if task.fields.get("img_s") is not None:
            return Text(f"{task.fields['img_s']:,.0f} img/s", style="cyan")
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {task.fields.get('unit', 'img')}/s" if speed else "", style="cyan")


class _FiguresColumn(ProgressColumn):
    """The live figures, cut to the width the other columns leave (nothing on a narrow terminal)."""

    def __init__(self, console: Console):
        super().__init__(table_column=Column(no_wrap=True, overflow="crop"))
        self._console = console

    def render(self, task) -> Text:
        room = self._console.width - RESERVED + (0 if self._console.width >= WIDE else 10)
        info = str(task.fields.get("info", ""))
        if room <= 1 or not info:
            return Text("")
        return Text(info if len(info) <= room else info[: room - 1] + "…")


class _EtaColumn(_TimeRemainingColumn):
    def render(self, task) -> Text:
        text = super().render(task)
        return Text(f"ETA {text.plain}", style=text.style) if task.total is not None else Text("")


class RichProgress:
    """A live bar for the running phase; a finished phase becomes one plain line above it."""

    def __init__(self, console: Console):
        self._console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, max_width=DESCRIPTION_WIDTH)),
            BarColumn(bar_width=20 if console.width >= WIDE else 10),
            _CountColumn(table_column=Column(no_wrap=True)),
            _RateColumn(table_column=Column(no_wrap=True)),
            _FiguresColumn(console),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            _EtaColumn(table_column=Column(no_wrap=True)),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self.finish()
        self._progress.stop()

    def start(self, description: str, total: int | None, unit: str = "img") -> None:
        self.finish()
        if len(description) > DESCRIPTION_WIDTH:
            description = description[: DESCRIPTION_WIDTH - 1] + "…"
        self._task = self._progress.add_task(description, total=total, info="", unit=unit, img_s=None)

    def advance(self, units: int = 1, **fields: object) -> None:
        if self._task is None:
            return
        shown = {k: v for k, v in fields.items() if k != "img_s"}  # the rate column shows img_s
        self._progress.update(self._task, advance=units, info=format_fields(shown), img_s=fields.get("img_s"))

    def log(self, line: str) -> None:
        self._progress.console.print(line, highlight=False, markup=False, overflow="ignore", crop=False)

    def finish(self) -> None:
        """The phase's bar leaves the live area and one line says what it did."""
        if self._task is None:
            return
        task = self._progress.tasks[[t.id for t in self._progress.tasks].index(self._task)]
        self._progress.remove_task(self._task)
        self._task = None
        if task.completed:
            unit = task.fields.get("unit", "img")
            rate = task.fields.get("img_s")
            speed = f"  {rate:,.0f} img/s" if rate is not None else ""
            elapsed = task.finished_time if task.finished_time is not None else task.elapsed or 0.0
            counted = f"{task.completed:,.0f} {units(task.completed, unit)}"
            self.log(f"{task.description}: {counted} in {format_seconds(elapsed)}{speed}")
