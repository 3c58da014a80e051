"""Worker processes for the CPU-bound stages (prepare, stats, evaluate's decoders)."""

from __future__ import annotations

import multiprocessing
import os
from typing import Callable, Iterable, Iterator, TypeVar

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
    """
    if workers <= 1:
        yield from map(function, tasks)
        return
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([preload])
    else:
        context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        yield from pool.imap_unordered(function, tasks)
