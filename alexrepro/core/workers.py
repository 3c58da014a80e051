"""Worker processes for the CPU-bound stages (sample, prepare, stats, evaluate's decoders): how many, and the pool."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from alexrepro.core.errors import WorkerDiedError
from alexrepro.core.signals import Stopped, default_stop_signals, signal_name, stop_at_once

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """The cores this process may run on (containers and taskset restrict it), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(requested: int | None, tasks: int | None = None, most: int | None = None, least: int = 1) -> int:
    """`requested` processes, or one per usable core (at most `most`) when None; never more than one per task and
    never fewer than `least` (0 where the caller runs the work in its own process, as DataLoader does)."""
    count = min(usable_cores(), most or usable_cores()) if requested is None else requested
    if tasks is not None:
        count = min(count, tasks)
    return max(least, count)


def map_unordered(function: Callable[[T], R], tasks: Iterable[T], workers: int, preload: str) -> Iterator[R]:
    """`function` over `tasks`, results in completion order: in this process for one worker, else in a pool.

    The pool forks this process where that is safe (see `_fork_is_safe`); otherwise its processes are fresh
    interpreters, since forking a parent that has imported torch (the CLI's other stages, the tests) can deadlock.
    Where the fork server is available, it imports `preload` (the module that holds `function`) once, so each
    worker starts with it and its imports (numpy, Pillow) already loaded.

    A worker that dies (the out-of-memory killer's SIGKILL) raises WorkerDiedError. This is why the pool is
    concurrent.futures' and not multiprocessing.Pool: Pool quietly replaces a dead worker and waits forever for
    the task it held, while ProcessPoolExecutor notices the death and fails every pending task (BrokenProcessPool).
    """
    if workers <= 1:
        yield from map(function, tasks)
        return
    with _pool(workers, preload) as pool:
        pending = {pool.submit(function, task) for task in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def map_ordered(function: Callable[[T], R], tasks: Iterable[T], workers: int, preload: str) -> Iterator[R]:
    """`function` over `tasks`, results in task order (for writers whose output must not depend on the worker
    count); the same pool as `map_unordered`. At most a few tasks per worker are in flight, so results that the
    caller has not consumed yet do not pile up in memory."""
    if workers <= 1:
        yield from map(function, tasks)
        return
    with _pool(workers, preload) as pool:
        window: deque[Future[R]] = deque()
        for task in tasks:
            window.append(pool.submit(function, task))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _fork_is_safe() -> bool:
    """Whether the pool may fork this process: the cheapest start (the workers share its imports; a fork server
    costs an interpreter and the imports again, about 0.2 s of a 2-worker prepare of a few hundred images, where
    webdataset's writers fork). Safe where torch is not imported (its threads and CUDA state do not survive a fork)
    and no other thread runs: the prepare, stats and sample commands. The tests and the stages that import torch
    get fresh interpreters from the fork server."""
    return (
        "fork" in multiprocessing.get_all_start_methods()
        and "torch" not in sys.modules
        and threading.active_count() == 1
    )


@contextlib.contextmanager
def _pool(workers: int, preload: str) -> Iterator[ProcessPoolExecutor]:
    """A pool of fresh interpreters (see `map_unordered`); a dead worker becomes WorkerDiedError."""
    context: multiprocessing.context.BaseContext
    if _fork_is_safe():
        context = multiprocessing.get_context("fork")
    elif "forkserver" in multiprocessing.get_all_start_methods():
        forkserver = multiprocessing.get_context("forkserver")
        forkserver.set_forkserver_preload([preload])
        context = forkserver
    else:
        context = multiprocessing.get_context("spawn")
    # A scheduler's SIGTERM (or Ctrl-C's SIGINT) reaches the whole process group. The main process stops by an
    # exception (Stopped), so that the pool is shut down in order: killed at once, it leaves the pool's semaphores to
    # the resource tracker, which warns of them as "leaked". The workers end by the signal's default action.
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=default_stop_signals)
    stopped: list[int] = []  # the signal that stopped the main process, if one did
    with stop_at_once(_go_on, stopped):  # also while the pool shuts down: a second signal must not interrupt it
        try:
            try:
                yield pool
            except OSError:
                # A task submitted while the pool is breaking can meet the pool's wake-up pipe already closed and
                # raise OSError("handle is closed") instead of BrokenProcessPool (a race inside concurrent.futures;
                # seen on Python 3.11). The same death, so the same message; any other OSError is the task's own.
                if not getattr(pool, "_broken", False):
                    raise
                raise BrokenProcessPool from None
        except BrokenProcessPool:
            _kill_leftovers(pool)
            if stopped:  # the workers died of the same signal
                name = signal_name(stopped[0])
                raise Stopped(stopped[0], f"stopped by {name}; {_go_on(name)}") from None
            raise WorkerDiedError(
                f"a {preload.rsplit('.', 1)[-1]} worker process died without a word (killed by a signal; on Linux "
                "most often the out-of-memory killer, see `dmesg`); rerun the same command to go on where it stopped, "
                "with fewer --workers if memory is short"
            ) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _go_on(_signal: str) -> str:
    return "rerun the same command to go on"


def _kill_leftovers(pool: ProcessPoolExecutor) -> None:
    """Kill the workers a broken pool still holds, so that its shutdown cannot wait for them forever.

    Python 3.11's ProcessPoolExecutor starts fork-server workers on demand in `submit`, and `submit` can pass its
    "is the pool broken?" check just before the manager thread marks the pool broken and terminates its workers;
    the worker that `submit` then starts waits on a task queue nobody writes to, and the manager thread joins it
    forever (the dead-worker test in tests/test_workers.py hung this way). `_processes` is the executor's own map of its
    workers (private, hence getattr); killing a worker that is already gone does nothing.
    """
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        if process.is_alive():
            process.kill()
