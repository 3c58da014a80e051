"""The terminal progress display (alexrepro.cli.progress) at the widths people use: nothing is cut or wrapped that
matters, finished phases collapse into one line each, and the running phase's bar is the only live one."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from alexrepro.cli.progress import RichProgress


def run_phases(width: int) -> tuple[str, RichProgress]:
    stream = io.StringIO()
    console = Console(file=stream, width=width, force_terminal=True, color_system=None, legacy_windows=False)
    with RichProgress(console) as progress:
        progress.start("checking shards", 12, unit="shard")
        progress.advance(12)
        for epoch in range(1, 31):  # more epochs than a screen has rows
            progress.start(f"epoch {epoch}/30", 1250, unit="step")
            for _ in range(5):
                progress.advance(250, loss=2.2441, lr=0.01, img_s=12345.0, data_wait=0.03)
                progress._progress.refresh()
            live = [task for task in progress._progress.tasks]
            assert len(live) == 1 and live[0].description == f"epoch {epoch}/30"  # only the current bar is live
    return stream.getvalue(), progress


@pytest.mark.parametrize("width", [80, 120])
def test_bars_fit_the_terminal_and_finished_phases_are_one_line_each(width):
    output, _ = run_phases(width)
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in re.split(r"[\r\n]", output)]
    lines = [line.rstrip() for line in lines if line.strip()]
    assert max(len(line) for line in lines) <= width, max(lines, key=len)
    live = [line for line in lines if re.search(r"\b[1-9][0-9,]*/1,250 steps", line)]
    assert live, "no live bar was drawn"
    for line in live:  # the figures that matter are whole: count, rate, elapsed, ETA
        assert "…" not in line.split("steps")[0], line
        assert re.search(r"\d+/1,250 steps", line) and "12,345 img/s" in line, line
        assert re.search(r"\d:\d\d:\d\d", line), line
    summaries = [
        line for line in lines if re.fullmatch(r"epoch \d+/30: 1,250 steps in \d:\d\d:\d\d  12,345 img/s", line)
    ]
    assert len(summaries) == 30, summaries[:3]
    assert any(line.startswith("checking shards: 12 shards in ") for line in lines)


def test_a_long_label_is_cut_not_wrapped():
    stream = io.StringIO()
    console = Console(file=stream, width=80, force_terminal=True, color_system=None)
    with RichProgress(console) as progress:
        progress.start("a label much longer than any phase should have", 10)
        progress.advance(5)
        progress._progress.refresh()
    assert "a label much longer than" not in stream.getvalue().replace("…", "")
