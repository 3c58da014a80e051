"""The one way a stage stops on SIGTERM (a scheduler) or SIGINT (Ctrl-C): a `Stopped` exception that carries the
signal, from which the command line takes its exit code (128 + the signal's number, 130 for Ctrl-C).

Two ways to react, both here:
- `stop_at_once`: the first signal raises `Stopped` where the main thread is (evaluate; a run still setting up;
  a pool of workers), and later ones are ignored while it unwinds;
- `StopRequest`: a loop asks for it between steps (training: finish the step, write a checkpoint, then raise).
Worker processes leave both signals to the main process: `ignore_stop_signals` (loader workers, which must not die
half-way through a batch) or `default_stop_signals` (pool workers, which the main process replaces).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from alexrepro.core.errors import AlexReproError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(AlexReproError):
    """A stop signal ended the stage. `signum` None: the stop was agreed with other ranks that got the signal."""

    def __init__(self, signum: int | None, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else 1


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def handling_stop_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """`handler(signum)` for SIGTERM and SIGINT while the block runs, the previous handlers after it. Signals go to
    the main thread only; elsewhere (a library caller's thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: handler(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def stop_at_once(consequence: Callable[[str], str], seen: list[int] | None = None) -> Iterator[None]:
    """The first stop signal raises `Stopped("stopped by SIG…; <consequence(name)>")` where the main thread is;
    a second one while that unwinds is ignored. `seen` (if given) receives the signal's number."""
    caught: list[int] = [] if seen is None else seen

    def stop(signum: int) -> None:
        if caught:  # already unwinding
            return
        caught.append(signum)
        name = signal_name(signum)
        raise Stopped(signum, f"stopped by {name}; {consequence(name)}")

    with handling_stop_signals(stop):
        yield


class StopRequest:
    """SIGTERM and SIGINT for a loop, in two phases.

    While the loop sets up there is nothing new to save: a signal stops it at once (`Stopped`, with the message
    `setting_up(name)` gives). Once the work has begun (`begin`), a signal only sets `signum`; the loop finishes its
    step, saves what it must and raises `stopped(...)`.
    """

    def __init__(self, setting_up: Callable[[str], str]):
        self.setting_up = setting_up
        self.signum: int | None = None
        self.working = False
        self._handling: contextlib.ExitStack = contextlib.ExitStack()

    @property
    def signal(self) -> str | None:
        """The name of the signal received, if any."""
        return signal_name(self.signum) if self.signum is not None else None

    def __enter__(self) -> StopRequest:
        self._handling.enter_context(handling_stop_signals(self._handle))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handling.close()

    def begin(self) -> None:
        self.working = True

    def stopped(self, message: str) -> Stopped:
        """The exception that ends the loop after it saved its state: "stopped by SIG… <message>"."""
        name = self.signal or "a signal on another rank"
        return Stopped(self.signum, f"stopped by {name} {message}")

    def _handle(self, signum: int) -> None:
        if self.working or self.signum is not None:  # working: the loop stops; setting up: already unwinding
            self.signum = self.signum or signum
            return
        self.signum = signum
        name = signal_name(signum)
        raise Stopped(signum, f"stopped by {name} {self.setting_up(name)}")


def ignore_stop_signals() -> None:
    """In a worker whose death would break the main process's work (a loader worker mid-batch): ignore both."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def default_stop_signals() -> None:
    """In a pool worker: SIGINT and SIGTERM end it (the default), whatever handler a forked worker inherited."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
