"""Per-epoch metrics for the tools people watch a run with, as each epoch ends: DVCLive and TensorBoard.

The run folder's own files (history.csv, history.json, last_epoch.json: what dvc.yaml declares) are written by the
training loop whatever is chosen here; this adds one live view on top, written by rank 0 only:

- `dvclive`: DVCLive's folder `OUT/dvclive/` (metrics.json and one .tsv per metric under plots/), so that `dvc exp
  show` lists a running experiment's latest epoch, `dvc plots show` and the VS Code extension draw its curves as
  it trains, and Studio receives live updates where it is configured. The library of the DVC project, not our
  own writer: it is what those tools read.
- `tensorboard`: event files in `OUT/tensorboard/` (torchvision's and timm's crowd open `tensorboard --logdir`).
- `auto` (the default): `dvclive` where it is installed (`pip install -e '.[dvc]'`), nothing otherwise;
  `none`: nothing.

Only the results of an epoch are logged (losses, errors) plus the learning rate, never timings: a rerun with the
same results must leave tracked files unchanged.
"""

from __future__ import annotations

import atexit
import importlib.util
from pathlib import Path
from typing import Any, Protocol

from alexrepro.core.errors import ConfigError, exception_text

LIVE_KINDS = ("auto", "dvclive", "tensorboard", "none")
LOGGED = (
    "train_loss", "train_top1_error", "train_top5_error", "val_loss", "val_top1_error", "val_top5_error", "lr",
)  # fmt: skip


class EpochLog(Protocol):
    def epoch(self, row: dict[str, Any]) -> None:
        """Log one finished epoch's row (its `epoch` is 1-based)."""

    def close(self) -> None: ...


class NullLog:
    def epoch(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class DvcLiveLog:
    """DVCLive's Live, one step per epoch. A resumed run continues the same step sequence (`resume=True`)."""

    def __init__(self, folder: Path, resume: bool):
        from dvclive import Live

        _no_colour_reset_at_exit()
        # dvc.yaml declares the stage's outputs, so DVCLive must not write a dvc.yaml of its own; a report and the
        # experiment commit are DVC's job (`dvc exp run` commits the outputs).
        self._live = Live(str(folder), resume=resume, dvcyaml=None, save_dvc_exp=False, report=None)

    def epoch(self, row: dict[str, Any]) -> None:
        self._live.step = int(row["epoch"]) - 1
        for key in LOGGED:
            if row.get(key) is not None:
                self._live.log_metric(key, float(row[key]), plot=True)
        self._live.next_step()

    def close(self) -> None:
        self._live.end()


def _no_colour_reset_at_exit() -> None:
    """Importing DVCLive runs DVC's logging set-up, whose `colorama.init()` registers an exit handler that writes an
    ANSI reset to sys.stdout as it was then: under the command line's live progress bar, the bar's stdout proxy,
    which prints it as text ("[0m" under the last line of a run in a terminal). The reset is for Windows consoles;
    take the handler back."""
    try:
        from colorama import initialise
    except ImportError:
        return
    atexit.unregister(initialise.reset_all)


class TensorBoardLog:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, row: dict[str, Any]) -> None:
        for key in LOGGED:
            if row.get(key) is not None:
                self._writer.add_scalar(key, float(row[key]), int(row["epoch"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_epoch_log(kind: str, out: Path, resume: bool, rank: int = 0) -> EpochLog:
    """The live log `kind` names, writing under `out`; a null log on every rank but 0."""
    if rank != 0 or kind == "none":
        return NullLog()
    if kind in ("auto", "dvclive"):
        # DVCLive opens the DVC repository around the working folder (its state database, its temporaries): an
        # import that fails, or a repository it cannot use (a read-only or full disk), must not stop a training run
        # that asked for nothing in particular.
        try:
            return DvcLiveLog(out / "dvclive", resume)
        except Exception as exc:
            if kind == "auto":
                return NullLog()
            raise ConfigError(
                f"key 'live' is dvclive but DVCLive cannot start ({exception_text(exc)}): pip install -e '.[dvc]', "
                "or set live=none"
            ) from None
    if kind == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "key 'live' is tensorboard but TensorBoard is not installed: pip install tensorboard, or set live=none"
            )
        return TensorBoardLog(out / "tensorboard")
    raise ConfigError(f"key 'live' must be one of {', '.join(LIVE_KINDS)}, got {kind!r}")
