"""What the whole suite shares: its thread setting, the tiny prepared-folder builder, the pool recorder."""

from __future__ import annotations

import pytest
import torch

from alexrepro.core import workers

# The test machine's cores are shared and the suite's tensors are tiny: more threads only contend. Processes the
# tests start set their own (the loader's worker init; the scripts run by subprocess).
torch.set_num_threads(1)


@pytest.fixture
def pool_start_methods(monkeypatch) -> list[str]:
    """The start method of every worker pool alexrepro.core.workers opens during the test (to check none forks)."""
    methods: list[str] = []

    class Recording(workers.ProcessPoolExecutor):
        def __init__(self, max_workers, mp_context, **options):
            methods.append(mp_context.get_start_method())
            super().__init__(max_workers, mp_context=mp_context, **options)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", Recording)
    return methods


@pytest.fixture
def no_tf32():
    """fp32 matmuls and cuDNN convolutions without TF32 for one test (the CUDA comparisons with CPU results)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
