"""The GPU paths, each run on the CPU in the normal suite and on CUDA where a GPU is present (the `cuda` cases;
scripts/gpu-check.sh runs them, and its CPU rehearsal runs the `cpu` cases as the GPU machine will): the two towers
on two devices, DDP under torchrun, the device feed (side stream, bf16, channels_last, decoding on the device),
torch.compile, resume, and evaluation in bf16 against fp32. The device is the only difference between the cases,
so what the GPU runs is what CI ran.

Each tolerance says why: bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 0.2 % per value), nvJPEG and
libjpeg-turbo round their IDCT and colour conversion differently (a few levels at colour edges), and GPU kernels
are not bit-deterministic (cuDNN picks its algorithms by benchmark)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from alexrepro.core.progress import NullProgress
from alexrepro.data.feed import DeviceFeed
from alexrepro.data.shards.manifest import read_manifest
from alexrepro.model.checkpoint import load_checkpoint
from alexrepro.model.config import ModelConfig
from alexrepro.model.network import AlexNet, local_response_norm
from alexrepro.train.config import TrainConfig
from alexrepro.train.loop import make_preprocess, normalization_from_stats, train
from helpers.train import make_training_data, val_batches
from test_model import SMALL, assert_same_run, paper_lrn, run

pytestmark = pytest.mark.device
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_two_gpus = [*needs_cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]
CUDA = pytest.param("cuda", marks=needs_cuda)


@pytest.fixture(params=["cpu", CUDA])
def device(request) -> str:
    """The device a case runs on: the CPU always, CUDA where there is a GPU."""
    return request.param


TINY = dict(batch_size=8, crop=67, width=0.125, init="he", input_scale=1 / 64, lr=0.02, workers=2, log_every=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("data"), val_per_class=8)


# ------------------------------------------------------------------------------------------------ placement

TOWER_PLACEMENTS = [
    "cpu,cpu",
    pytest.param("cuda:0,cuda:0", marks=needs_cuda),
    pytest.param("cuda:0,cuda:1", marks=needs_two_gpus),
]


@pytest.mark.parametrize("devices", TOWER_PLACEMENTS)
@pytest.mark.usefixtures("no_tf32")
def test_one_tower_per_device_matches_one_device(devices, monkeypatch):
    """The paper's placement (§3.2) — here also both towers' placement on one device, so that it runs on one GPU
    or on the CPU — gives the one-device model's logits and gradients (same dropout masks, fp32)."""
    first = devices.split(",")[0]
    torch.manual_seed(0)
    config = ModelConfig(**SMALL, init="he")
    one = AlexNet(config, devices=[first])
    two = AlexNet(config, devices=devices.split(","))
    two.load_state_dict(one.state_dict())
    assert [str(d) for d in two.tower_devices] == devices.split(",")
    one.train(), two.train()
    x, target = torch.randn(4, 3, 99, 99, device=first) * 50, torch.tensor([1, 2, 3, 4], device=first)
    assert_same_run(run(one, x, target, monkeypatch), run(two, x, target, monkeypatch))


@pytest.mark.parametrize("devices", ["cpu", pytest.param("cuda", marks=needs_cuda), *TOWER_PLACEMENTS])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_on_one_device_or_a_tower_per_device(data, tmp_path, devices, precision):
    """Two epochs on one device or with one tower per device, in bf16 (autocast; channels_last on CUDA) and in the
    paper's fp32: the loss stays finite and does not grow, and the checkpoint's weights are saved on the CPU."""
    config = TrainConfig(epochs=2, devices=devices, precision=precision, **TINY)
    result = train(*data, tmp_path, config, False, NullProgress())
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] + 0.5
    assert load_checkpoint(result.checkpoint_last)["model"]["fc8.weight"].device.type == "cpu"


def test_bf16_autocast_keeps_lrn_in_float32(device):
    """Under bf16 autocast the network runs in bf16 but each LRN computes in float32 and rounds once (§3.3's
    constants in bf16 would lose k + α Σ a² to rounding), on the window sums of `device` (a pooled window on CUDA,
    shifted adds on the CPU)."""
    torch.manual_seed(0)
    model = AlexNet(ModelConfig(**SMALL), devices=[device])
    seen = []
    handle = model.norm.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    x = torch.randn(2, 3, 99, 99, device=device) * 50
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(x)
    handle.remove()
    assert logits.dtype == torch.bfloat16 and seen == [(torch.bfloat16, torch.bfloat16)] * 2
    a = (torch.relu(torch.randn(2, 16, 4, 4, device=device)) * 100).bfloat16()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = local_response_norm(a, 2)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, local_response_norm(a.float(), 2).bfloat16())  # computed in float32, rounded once
    torch.testing.assert_close(y.double().cpu(), paper_lrn(a.double().cpu(), 2), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------- the device feed


@pytest.mark.parametrize("decode_on", ["workers", "device"])
def test_feed_gives_the_reference_input_in_bf16_channels_last(data, device, decode_on):
    """What the model is fed (on CUDA: a side stream and pinned non-blocking copies; decoded on the device when
    decode_on is device, by nvJPEG on CUDA; bf16, channels_last) against the CPU path's float32 input in NCHW:
    equal up to bf16 rounding (and the decoders' rounding: a crop one pixel off, or channels swapped, differ by
    far more)."""
    shards, stats = data
    manifest = read_manifest(shards)
    config = TrainConfig(crop=67, input_scale=1.0)  # the smallest crop three 3/2 max-pools take
    normalization = normalization_from_stats(stats, 1.0)
    reference = make_preprocess(normalization, config, torch.device("cpu"), channels_last=False)
    fed_as = make_preprocess(normalization, config, torch.device(device), channels_last=True, dtype=torch.bfloat16)
    expected = [reference(b, train=False) for b in val_batches(shards, manifest, 67, 5, workers=0)]
    loader = val_batches(shards, manifest, 67, 5, workers=2, pin_memory=device == "cuda", decode_on=decode_on)
    fed = list(DeviceFeed(loader, lambda b: fed_as(b, train=False), torch.device(device)))
    assert len(fed) == len(expected)
    # nvJPEG may upsample chroma differently from libjpeg-turbo's "fancy" filter: a few levels at colour edges.
    # A crop one pixel off on these noisy images differs by ~13 levels on average. On the CPU both are libjpeg-turbo.
    nvjpeg = decode_on == "device" and device == "cuda"
    for batch, want in zip(fed, expected, strict=True):
        x = batch.inputs
        assert x.device.type == device and batch.targets.device.type == device
        assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(batch.targets.cpu(), batch.labels)
        error = (x.float().cpu() - want).abs()
        rounding = want.abs() * 2**-8 + (8.0 if nvjpeg else 0.0)
        assert (error <= rounding + 1e-3).float().mean() > 0.98, f"{error.max()} at batch {batch.step}"
        assert error.mean() < (3.0 if nvjpeg else 0.3)


def test_feed_prepares_off_the_training_thread_and_raises_its_errors_in_order(data, device):
    """The preparation (where decoding on the device blocks) runs on a thread of its own, one batch ahead; an error
    there is raised on the training thread when its batch is taken, after every batch before it."""
    shards, _ = data
    threads, taken = set(), []

    def prepare(batch):
        threads.add(threading.get_ident())
        if batch.step == 2:
            raise ValueError("batch 2 cannot be prepared")
        return batch.images.to(device, non_blocking=True).float()

    loader = val_batches(shards, read_manifest(shards), 67, 5, workers=0, pin_memory=device == "cuda")
    with pytest.raises(ValueError, match="batch 2 cannot be prepared"):
        for batch in DeviceFeed(loader, prepare, torch.device(device)):
            taken.append(batch.step)
            assert batch.inputs.device.type == device
    assert taken == [0, 1] and threading.get_ident() not in threads and len(threads) == 1


# ------------------------------------------------------------------------------------- compile, resume, DDP


@pytest.mark.compile
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize(
    ("device", "memory_format"),
    [
        ("cpu", torch.contiguous_format),  # the CPU trains in NCHW
        ("cpu", torch.channels_last),
        pytest.param("cuda", torch.channels_last, marks=needs_cuda),  # CUDA trains in channels_last
    ],
)
def test_compiled_model_matches_eager(device, memory_format):
    """torch.compile traces LRN's hand-written forward and backward (in-place adds or the pooled window) and the
    towers: the compiled model's outputs and gradients are the eager model's, in each layout a device trains in
    (one compile per case: the GPU check's time is spent where the GPU runs)."""
    torch.manual_seed(0)
    model = AlexNet(ModelConfig(**SMALL, dropout=0.0, init="he"), devices=[device])
    model = model.to(memory_format=memory_format)
    compiled = torch.compile(model, dynamic=False)
    x = (torch.randn(4, 3, 99, 99, device=device) * 50).contiguous(memory_format=memory_format)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


class StepTotals(NullProgress):
    """The step count each training epoch announces."""

    def __init__(self):
        self.totals: list[int | None] = []

    def start(self, description: str, total: int | None, unit: str = "img") -> None:
        if description.startswith("epoch"):
            self.totals.append(total)


@pytest.mark.compile
def test_compiled_bf16_training_run(data, tmp_path, device):
    """A compiled bf16 run that drops each epoch's partial last batch: 36 images at batch 8 are 4 steps, not 5,
    so the compiled step sees one batch shape."""
    config = TrainConfig(epochs=1, devices=device, compile=True, precision="bf16", drop_last=True, **TINY)
    progress = StepTotals()
    result = train(*data, tmp_path, config, False, progress)
    assert math.isfinite(result.history[0]["train_loss"])
    assert progress.totals == [4]


@pytest.mark.usefixtures("no_tf32")
def test_resume_ends_where_an_uninterrupted_run_ends(data, tmp_path, device):
    """fp32: 2 epochs straight vs 1 + resume 1. On CUDA not bit-identical (cuDNN), but a resume that lost the
    momentum, the data position or the schedule would differ by far more than kernel rounding (the CPU's
    bit-identity is tests/test_train.py's)."""
    config = dict(devices=device, precision="fp32", dropout=0.0, **TINY)
    straight = train(*data, tmp_path / "a", TrainConfig(epochs=2, **config), False, NullProgress())
    train(*data, tmp_path / "b", TrainConfig(epochs=1, **config), False, NullProgress())
    resumed = train(*data, tmp_path / "b", TrainConfig(epochs=2, **config), True, NullProgress())
    a, b = load_checkpoint(straight.checkpoint_last)["model"], load_checkpoint(resumed.checkpoint_last)["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=name)
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-4)


def torchrun(nproc: int, device: str, shards: Path, stats: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "alexrepro", "train", str(shards), str(stats), str(out), "--epochs", "2", "--devices", device,
               "--batch-size", "8", "--crop", "67", "--width", "0.125", "--init", "he", "--workers", "2",
               "--set", "input_scale=0.015625", "--set", "lr=0.02", "--set", "precision=fp32", "--set", "dropout=0.0",
               "--set", "live=none"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})


@pytest.mark.parametrize(
    ("nproc", "device"),
    [(1, "cpu"), pytest.param(1, "cuda", marks=needs_cuda), pytest.param(2, "cuda", marks=needs_two_gpus)],
)
@pytest.mark.usefixtures("no_tf32")
def test_ddp_under_torchrun(data, tmp_path, nproc, device):
    """torchrun (NCCL on CUDA, gloo on the CPU): the run completes, validates every image once, and (global batch
    8 either way) follows the single-process run. Two ranks on CUDA need two GPUs: NCCL refuses two ranks on one
    device, and each local rank takes its own GPU (alexrepro.model.distributed.resolve_devices); two gloo ranks on
    the CPU are tests/test_distributed.py's."""
    result = torchrun(nproc, device, *data, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    single = train(*data, tmp_path / "one", TrainConfig(epochs=2, devices=device, precision="fp32", dropout=0.0,
                                                        **TINY), False, NullProgress())  # fmt: skip
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint-last.pt")
    assert ddp["epoch"] == 2 and len(ddp["history"]) == 2
    for name, weight in load_checkpoint(single.checkpoint_last)["model"].items():
        torch.testing.assert_close(ddp["model"][name], weight, rtol=1e-3, atol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------- evaluate


def test_evaluation_in_bf16_agrees_with_fp32(data, tmp_path, device):
    """A trained tiny network's validation logits: bf16 autocast on `device` (the default on CUDA) vs fp32 on the
    CPU. The logits agree within bf16 error, and the top-1 class agrees wherever the fp32 margin exceeds that
    error."""
    shards, stats = data
    result = train(shards, stats, tmp_path, TrainConfig(epochs=3, devices="cpu", **TINY), False, NullProgress())
    ckpt = load_checkpoint(result.checkpoint_last)
    logits = {}
    for name, on, bf16 in (("fp32", "cpu", False), ("bf16", device, True)):
        config = TrainConfig(**{**TINY, "devices": on})
        net = AlexNet(config.model_config(3), [torch.device(on)])
        net.load_state_dict(ckpt["model"])
        net.eval()
        dtype = torch.bfloat16 if bf16 else torch.float32
        pre = make_preprocess(ckpt["normalization"], config, torch.device(on), on == "cuda", dtype)
        loader = val_batches(shards, read_manifest(shards), config.crop, 5, workers=0, pin_memory=on == "cuda")
        out = []
        with torch.no_grad(), torch.autocast(on, dtype=torch.bfloat16, enabled=bf16):
            for batch in DeviceFeed(loader, partial(pre, train=False), torch.device(on)):
                out.append(net(batch.inputs).float().cpu())
        logits[name] = torch.cat(out)
    exact, rounded = logits["fp32"], logits["bf16"]
    assert not torch.equal(exact, rounded)  # the bf16 case did compute in bf16
    scale = exact.abs().max().item()
    tolerance = 0.03 * scale  # bf16 through eight layers: a few 2⁻⁹ roundings per layer, relative to the logits
    assert (rounded - exact).abs().max().item() < tolerance
    top2 = exact.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    assert clear.sum() > 0 and torch.equal(rounded.argmax(1)[clear], exact.argmax(1)[clear])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tf32", [False, True])
def test_evaluation_computes_as_training_did_without_or_with_tf32(data, tf32):
    """cuDNN's default is TF32 on: a network trained at tf32 false must be evaluated without it. (CUDA only: TF32
    is a property of NVIDIA's tensor cores; the CPU ignores these flags.)"""
    from alexrepro.model.inference import InferenceNetwork
    from helpers.evaluate import tiny_checkpoint

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
        ckpt = tiny_checkpoint(data[0])
        ckpt["train_config"] = {**ckpt["train_config"], "tf32": tf32}
        InferenceNetwork(ckpt, ["cuda"])
        assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
