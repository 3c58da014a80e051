"""Training-step throughput of the paper's network beside torchvision's AlexNet, measured in one run.

Both models take the same optimiser (SGD, momentum 0.9, weight decay 5e-4, §5), batch, precision and memory format
on the same device, on synthetic input. Their timed steps alternate (paper, torchvision, torchvision, paper, …), so a
machine shared with other work slows both alike and the ratio stays meaningful when the absolute numbers do not.
The forward multiply-adds are nearly equal (724 M vs 714 M per image), so the ratio measures what the paper's model
adds: LRN and the two towers.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from alexrepro.bench.report import BenchReport, machine_description
from alexrepro.model.config import ModelConfig
from alexrepro.model.network import AlexNet

TORCHVISION_CROP = 224  # torchvision's AlexNet is defined on 224 inputs; the paper's network on 227


def bench_train(
    device: str = "cpu",
    batch_size: int = 64,
    steps: int = 5,
    precision: str = "fp32",
    compile: bool = False,
    channels_last: bool = True,
    warmup: int = 2,
    compile_backend: str = "inductor",
) -> BenchReport:
    """Training-step img/s (forward, backward, SGD step) of AlexNet(ModelConfig()) and torchvision's alexnet.

    steps: timed steps per model (on CUDA each timed unit is 10 steps, the median of the units is reported).
    precision: "fp32" (the paper's: no TF32 anywhere), "tf32" (TF32 matmuls and convolutions) or "bf16" (autocast;
    LRN stays in fp32). compile: also time both models under torch.compile, with `compile_backend` ("aot_eager"
    traces the models without generating kernels: what the CPU rehearsal of the GPU check runs, in seconds).
    channels_last: memory format of input and weights (default True: cuDNN's fast layout, and on a CPU max-pooling
    runs about 10× faster in it than in NCHW, for both models).
    """
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be fp32, tf32 or bf16, got {precision!r}")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    with _arithmetic(precision, cuda):
        return _bench_train(dev, batch_size, steps, precision, compile, channels_last, warmup, compile_backend)


@contextlib.contextmanager
def _arithmetic(precision: str, cuda: bool):
    """fp32 is the paper's arithmetic: TF32 off for matmuls and for cuDNN's convolutions (cuDNN's is on by default, and
    would make "fp32" rows TF32 rows); tf32 switches both on; bf16 autocasts (the step's own switch). cuDNN picks its
    algorithms by benchmark. Every flag is restored afterwards."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        if cuda:
            torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _bench_train(
    dev: torch.device,
    batch_size: int,
    steps: int,
    precision: str,
    compile: bool,
    channels_last: bool,
    warmup: int,
    compile_backend: str = "inductor",
) -> BenchReport:
    cuda = dev.type == "cuda"
    unit = 10 if cuda else 1
    variants = [False, True] if compile else [False]

    rows, ratios = [], {}
    for compiled in variants:
        torch.manual_seed(0)
        paper = _TrainStep(
            AlexNet(ModelConfig(), devices=[dev]),
            ModelConfig().crop,
            batch_size,
            dev,
            precision,
            channels_last,
            compile_backend if compiled else None,
        )
        reference = _TrainStep(
            torchvision.models.alexnet(weights=None).to(dev),
            TORCHVISION_CROP,
            batch_size,
            dev,
            precision,
            channels_last,
            compile_backend if compiled else None,
        )
        for step in (paper, reference):
            for _ in range(warmup):
                step()
        times, cpu_times = _interleaved({"paper": paper, "torchvision": reference}, steps, unit, cuda)
        suffix = (", compiled" + ("" if compile_backend == "inductor" else f" ({compile_backend})")) if compiled else ""
        for name, label in (("paper", "paper AlexNet (2 towers, LRN)"), ("torchvision", "torchvision alexnet")):
            median = statistics.median(times[name]) / unit
            rows.append(
                {
                    "name": label + suffix,
                    "img_s": batch_size / median,
                    "step_ms": median * 1e3,
                    "cpu_ms": statistics.median(cpu_times[name]) / unit * 1e3,
                    "steps": steps * unit,
                }
            )
        ratios[f"paper / torchvision img/s{suffix}"] = statistics.median(times["torchvision"]) / statistics.median(
            times["paper"]
        )
        if not cuda:  # CPU seconds per step: what each model costs, less disturbed by other work on the machine
            ratios[f"paper / torchvision by CPU time{suffix}"] = statistics.median(
                cpu_times["torchvision"]
            ) / statistics.median(cpu_times["paper"])

    notes = [
        _device_description(dev),
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} CPU threads",
        (
            f"batch {batch_size}, {precision}, channels_last={channels_last}, synthetic input "
            f"(paper {ModelConfig().crop}², torchvision {TORCHVISION_CROP}²); timed steps alternate between the models; "
            "img/s from the median step; cpu_ms = process CPU time per step (all threads)"
        ),
    ]
    return BenchReport(title=f"bench train ({dev})", rows=rows, ratios=ratios, notes=notes)


class _TrainStep:
    """One SGD training step of `model` on a fixed synthetic batch; calling it runs one step."""

    def __init__(self, model, crop, batch_size, device, precision, channels_last, backend: str | None):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=memory_format).train()
        self.forward: Callable = torch.compile(self.model, backend=backend) if backend else self.model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        generator = torch.Generator().manual_seed(0)
        # Mean-subtracted 0–255 pixels have a standard deviation of about 60 (REFERENCE.md §2).
        x = torch.randn(batch_size, 3, crop, crop, generator=generator) * 60
        self.x = x.to(device).contiguous(memory_format=memory_format)
        self.y = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = F.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.optimizer.step()


def _interleaved(steps: dict[str, _TrainStep], rounds: int, unit: int, cuda: bool):
    """Wall and process CPU seconds per timed unit of `unit` steps for each model, the models taking turns (the
    order flipped each round)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    names = list(steps)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(unit):
                steps[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host: {machine_description()}"
    return machine_description()
