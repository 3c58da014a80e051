"""Worker processes for the CPU-bound stages (prepare, stats, evaluate's decoders)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from alexrepro.errors import AlexReproError, WorkerDiedError

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """The cores this process may run on (containers and taskset restrict it), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def map_unordered(function: Callable[[T], R], tasks: Iterable[T], workers: int, preload: str) -> Iterator[R]:
    """`function` over `tasks`, results in completion order: in this process for one worker, else in a pool.

    The pool's processes are fresh interpreters, never forks: forking a parent that has imported torch (the CLI's
    other stages, the tests) can deadlock. Where the fork server is available, it imports `preload` (the module
    that holds `function`) once, so each worker starts with it and its imports (numpy, Pillow) already loaded.

    A worker that dies (the out-of-memory killer's SIGKILL) raises WorkerDiedError. This is why the pool is
    concurrent.futures' and not multiprocessing.Pool: Pool quietly replaces a dead worker and waits forever for
    the task it held, while ProcessPoolExecutor notices the death and fails every pending task (BrokenProcessPool).
    """
    if workers <= 1:
        yield from map(function, tasks)
        return
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([preload])
    else:
        context = multiprocessing.get_context("spawn")
    # A scheduler's SIGTERM (or Ctrl-C's SIGINT) reaches the whole process group. The main process stops by an
    # exception, so that the pool is shut down in order: killed at once, it leaves the pool's semaphores to the
    # resource tracker, which warns of them as "leaked".
    pool = ProcessPoolExecutor(workers, mp_context=context)
    stopped: list[str] = []
    previous = _stop_by_exception(stopped)
    try:
        pending = {pool.submit(function, task) for task in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    except BrokenProcessPool:
        if stopped:  # the workers died of the same signal
            raise _stopped(stopped[0]) from None
        raise WorkerDiedError(
            f"a {preload.rsplit('.', 1)[-1]} worker process died without a word (killed by a signal; on Linux most "
            "often the out-of-memory killer, see `dmesg`); rerun the same command to go on where it stopped, with "
            "fewer --workers if memory is short"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stopped(name: str) -> AlexReproError:
    return AlexReproError(f"stopped by {name}; rerun the same command to go on")


def _stop_by_exception(stopped: list[str]) -> dict:
    """Make SIGINT and SIGTERM raise "stopped by SIG…" (the command line exits 128+N), once, noting the signal in
    `stopped`; return the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, _frame):
        name = signal.Signals(signum).name
        if stopped:  # already unwinding
            return
        stopped.append(name)
        raise _stopped(name)

    return {sig: signal.signal(sig, stop) for sig in _STOP_SIGNALS}
