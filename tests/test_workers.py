"""The one worker pool (alexrepro.core.workers): how many workers, results in order, a dead worker reported."""

from __future__ import annotations

import os

import pytest

from alexrepro.core import workers
from alexrepro.core.errors import WorkerDiedError
from alexrepro.core.workers import map_ordered, map_unordered, usable_cores, worker_count


def test_worker_count_defaults_to_the_usable_cores_and_keeps_to_the_limits():
    assert worker_count(None) == usable_cores()
    assert worker_count(None, most=1) == 1
    assert worker_count(3) == 3 and worker_count(0) == 1 and worker_count(0, least=0) == 0
    assert worker_count(8, tasks=2) == 2 and worker_count(None, tasks=0) == 1


def test_ordered_results_come_in_task_order_from_a_pool():
    tasks = [-i for i in range(300)]
    assert list(map_ordered(abs, tasks, 3, preload="alexrepro.core.workers")) == list(range(300))
    assert sorted(map_unordered(abs, tasks, 3, preload="alexrepro.core.workers")) == list(range(300))


def test_pool_workers_are_fresh_interpreters_not_forks(monkeypatch):
    """Forking a process that has imported torch can deadlock; the pool must never use the fork start method."""
    methods = []

    class Recording(workers.ProcessPoolExecutor):
        def __init__(self, max_workers, mp_context):
            methods.append(mp_context.get_start_method())
            super().__init__(max_workers, mp_context=mp_context)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", Recording)
    assert list(map_ordered(abs, [-1, -2, -3], 2, preload="alexrepro.core.workers")) == [1, 2, 3]
    assert methods and "fork" not in methods


@pytest.mark.parametrize("mapper", [map_ordered, map_unordered])
def test_a_worker_that_dies_is_reported_not_waited_for(mapper):
    with pytest.raises(WorkerDiedError, match="worker process died"):
        list(mapper(os._exit, [3, 3, 3], 2, preload="alexrepro.core.workers"))
