"""The one worker pool (alexrepro.core.workers): how many workers, results in order, a dead worker reported."""

from __future__ import annotations

import os
import subprocess
import sys

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
    """Forking a process that has imported torch can deadlock: there (as in this test process), the pool must never
    use the fork start method."""
    assert "torch" in sys.modules
    methods = []

    class Recording(workers.ProcessPoolExecutor):
        def __init__(self, max_workers, mp_context, **options):
            methods.append(mp_context.get_start_method())
            super().__init__(max_workers, mp_context=mp_context, **options)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", Recording)
    assert list(map_ordered(abs, [-1, -2, -3], 2, preload="alexrepro.core.workers")) == [1, 2, 3]
    assert methods and "fork" not in methods


@pytest.mark.parametrize("mapper", [map_ordered, map_unordered])
def test_a_worker_that_dies_is_reported_not_waited_for(mapper):
    with pytest.raises(WorkerDiedError, match="worker process died"):
        list(mapper(os._exit, [3, 3, 3], 2, preload="alexrepro.core.workers"))


def test_a_process_without_torch_forks_its_workers_with_default_stop_signals():
    """prepare, stats and sample import no torch: their pool forks (no interpreter to start) and each worker ends
    on SIGTERM by default, leaving the message and exit code to the main process."""
    code = (
        "import signal, sys\n"
        "from alexrepro.core import workers\n"
        "methods = []\n"
        "class Recording(workers.ProcessPoolExecutor):\n"
        "    def __init__(self, max_workers, mp_context, **options):\n"
        "        methods.append(mp_context.get_start_method())\n"
        "        super().__init__(max_workers, mp_context=mp_context, **options)\n"
        "workers.ProcessPoolExecutor = Recording\n"
        "def handler(sig):\n"
        "    return signal.getsignal(sig) == signal.SIG_DFL\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "result = list(workers.map_ordered(handler, [signal.SIGTERM, signal.SIGINT], 2, preload='alexrepro.core.workers'))\n"
        "assert 'torch' not in sys.modules and methods == ['fork'] and result == [True, True], (methods, result)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
