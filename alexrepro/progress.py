"""How library code reports progress without knowing about terminals.

Stages take a `Progress` and call it; the command line passes a Rich-backed one, tests and `--quiet` pass
`NullProgress`. This keeps Rich out of the library (STYLE.md: bars live in the CLI layer).
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total: int | None) -> None:
        """A new phase begins; `total` is the number of units (images, steps) it will take, if known."""

    def advance(self, units: int = 1, **fields: object) -> None:
        """`units` more are done; `fields` are live figures to show (loss=…, lr=…, img_s=…)."""

    def log(self, line: str) -> None:
        """A line worth keeping in the terminal's scrollback (one per epoch, a summary)."""

    def finish(self) -> None:
        """The current phase has ended."""


class NullProgress:
    """A Progress that shows nothing: the no-op used by tests and by `--quiet`."""

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, units: int = 1, **fields: object) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def finish(self) -> None:
        pass
