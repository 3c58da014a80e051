"""CUDA paths (marked `cuda`, skipped without a GPU; scripts/gpu-check.sh runs them): tower placement on two
devices, DDP with NCCL under torchrun, the device feed (side stream, bf16, channels_last, nvJPEG decoding),
torch.compile, resume, and evaluation against the CPU with tolerances a real bug would exceed.

Each tolerance says why: bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 0.2 % per value), nvJPEG and
libjpeg-turbo round their IDCT and colour conversion differently (a few levels at colour edges), and GPU kernels
are not bit-deterministic (cuDNN picks its algorithms by benchmark)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from alexrepro.core.progress import NullProgress
from alexrepro.data.feed import DeviceFeed
from alexrepro.data.shards.manifest import read_manifest
from alexrepro.model.checkpoint import load_checkpoint
from alexrepro.model.config import ModelConfig
from alexrepro.model.network import AlexNet
from alexrepro.train.config import TrainConfig
from alexrepro.train.loop import make_preprocess, normalization_from_stats, train
from helpers.train import make_shards, make_stats, val_batches
from test_model import SMALL, assert_same_run, run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

TINY = dict(batch_size=8, crop=67, width=0.125, init="he", input_scale=1 / 64, lr=0.02, workers=2, log_every=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_shards(root / "shards", classes=3, train_per_class=12, val_per_class=8, size=72, shard_size=10)
    make_stats(root / "shards", root / "stats")
    return root / "shards", root / "stats"


# ------------------------------------------------------------------------------------------------ placement


@pytest.mark.parametrize("devices", ["cuda:0,cuda:0", pytest.param("cuda:0,cuda:1", marks=two_gpus)])
@pytest.mark.usefixtures("no_tf32")
def test_one_tower_per_device_matches_one_device(devices, monkeypatch):
    """The paper's placement (§3.2) — here also both towers' placement on one GPU, so that it runs on one — gives
    the one-device model's logits and gradients (same dropout masks, fp32)."""
    torch.manual_seed(0)
    config = ModelConfig(**SMALL, init="he")
    one = AlexNet(config, devices=["cuda:0"])
    two = AlexNet(config, devices=devices.split(","))
    two.load_state_dict(one.state_dict())
    assert [str(d) for d in two.tower_devices] == devices.split(",")
    one.train(), two.train()
    x, target = torch.randn(4, 3, 99, 99, device="cuda:0") * 50, torch.tensor([1, 2, 3, 4], device="cuda:0")
    assert_same_run(run(one, x, target, monkeypatch), run(two, x, target, monkeypatch))


@pytest.mark.parametrize("devices", ["cuda:0,cuda:0", pytest.param("cuda:0,cuda:1", marks=two_gpus)])
def test_training_with_one_tower_per_device(data, tmp_path, devices):
    result = train(*data, tmp_path, TrainConfig(epochs=2, devices=devices, **TINY), False, NullProgress())
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] + 0.5


# ------------------------------------------------------------------------------------------- the device feed


@pytest.mark.parametrize("decode_on", ["workers", "device"])
def test_feed_on_cuda_gives_the_cpu_input_in_bf16_channels_last(data, decode_on):
    """What the model is fed on CUDA (side stream, pinned non-blocking copies, nvJPEG when decode_on is device,
    bf16, channels_last) against the CPU path's float32 input: equal up to bf16 rounding (and the decoders' rounding:
    a crop one pixel off, or channels swapped, differ by far more)."""
    shards, stats = data
    manifest = read_manifest(shards)
    config = TrainConfig(crop=67, input_scale=1.0)  # the smallest crop three 3/2 max-pools take
    normalization = normalization_from_stats(stats, 1.0)
    cpu = make_preprocess(normalization, config, torch.device("cpu"), channels_last=False)
    gpu = make_preprocess(normalization, config, torch.device("cuda"), channels_last=True, dtype=torch.bfloat16)
    expected = [cpu(b, train=False) for b in val_batches(shards, manifest, 67, 5, workers=0)]
    loader = val_batches(shards, manifest, 67, 5, workers=2, pin_memory=True, decode_on=decode_on)
    fed = list(DeviceFeed(loader, lambda b: gpu(b, train=False), torch.device("cuda")))
    assert len(fed) == len(expected)
    for batch, want in zip(fed, expected, strict=True):
        x = batch.inputs
        assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
        assert batch.targets.device.type == "cuda" and torch.equal(batch.targets.cpu(), batch.labels)
        error = (x.float().cpu() - want).abs()
        # nvJPEG may upsample chroma differently from libjpeg-turbo's "fancy" filter: a few levels at colour edges.
        # A crop one pixel off on these noisy images differs by ~13 levels on average.
        rounding = want.abs() * 2**-8 + (8.0 if decode_on == "device" else 0.0)
        assert (error <= rounding + 1e-3).float().mean() > 0.98, f"{error.max()} at batch {batch.step}"
        assert error.mean() < (3.0 if decode_on == "device" else 0.3)


# ------------------------------------------------------------------------------------- compile, resume, DDP


@pytest.mark.compile
@pytest.mark.usefixtures("no_tf32")
def test_compiled_model_matches_eager_on_cuda():
    torch.manual_seed(0)
    model = AlexNet(ModelConfig(**SMALL, dropout=0.0, init="he"), devices=["cuda"])
    model = model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model)
    x = (torch.randn(4, 3, 99, 99, device="cuda") * 50).contiguous(memory_format=torch.channels_last)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


@pytest.mark.compile
def test_compiled_bf16_training_run(data, tmp_path):
    result = train(*data, tmp_path, TrainConfig(epochs=1, devices="cuda", compile=True, **TINY), False, NullProgress())
    assert math.isfinite(result.history[0]["train_loss"])


@pytest.mark.usefixtures("no_tf32")
def test_resume_on_cuda_ends_where_an_uninterrupted_run_ends(data, tmp_path):
    """fp32 on CUDA: 2 epochs straight vs 1 + resume 1. Not bit-identical (cuDNN), but a resume that lost the
    momentum, the data position or the schedule would differ by far more than kernel rounding."""
    config = dict(devices="cuda", precision="fp32", dropout=0.0, **TINY)
    straight = train(*data, tmp_path / "a", TrainConfig(epochs=2, **config), False, NullProgress())
    train(*data, tmp_path / "b", TrainConfig(epochs=1, **config), False, NullProgress())
    resumed = train(*data, tmp_path / "b", TrainConfig(epochs=2, **config), True, NullProgress())
    a, b = load_checkpoint(straight.checkpoint_last)["model"], load_checkpoint(resumed.checkpoint_last)["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=name)
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-4)


def torchrun(nproc: int, shards: Path, stats: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "alexrepro", "train", str(shards), str(stats), str(out), "--epochs", "2", "--devices", "cuda",
               "--batch-size", "8", "--crop", "67", "--width", "0.125", "--init", "he", "--workers", "2",
               "--set", "input_scale=0.015625", "--set", "lr=0.02", "--set", "precision=fp32", "--set", "dropout=0.0",
               *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=two_gpus)])
@pytest.mark.usefixtures("no_tf32")
def test_ddp_with_nccl_under_torchrun(data, tmp_path, nproc):
    """torchrun with NCCL: the run completes, validates every image once, and (global batch 8 either way) follows
    the single-process run. Two ranks need two GPUs: NCCL refuses two ranks on one device, and each local rank
    takes its own GPU (alexrepro.model.distributed.resolve_devices)."""
    result = torchrun(nproc, *data, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    single = train(*data, tmp_path / "one", TrainConfig(epochs=2, devices="cuda", precision="fp32", dropout=0.0,
                                                        **TINY), False, NullProgress())  # fmt: skip
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint-last.pt")
    assert ddp["epoch"] == 2 and len(ddp["history"]) == 2
    for name, weight in single_weights(single).items():
        torch.testing.assert_close(ddp["model"][name], weight, rtol=1e-3, atol=1e-4, msg=name)


def single_weights(result) -> dict:
    return load_checkpoint(result.checkpoint_last)["model"]


# ------------------------------------------------------------------------------------------------- evaluate


def test_evaluation_on_cuda_agrees_with_the_cpu(data, tmp_path):
    """A trained tiny network's validation logits: CUDA in bf16 (the default there) vs the CPU in fp32. The logits
    agree within bf16 error, and the top-1 class agrees wherever the CPU's margin exceeds that error."""
    shards, stats = data
    result = train(shards, stats, tmp_path, TrainConfig(epochs=3, devices="cpu", **TINY), False, NullProgress())
    ckpt = load_checkpoint(result.checkpoint_last)
    logits = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        config = TrainConfig(**{**TINY, "devices": device})
        net = AlexNet(config.model_config(3), [torch.device(device)])
        net.load_state_dict(ckpt["model"])
        net.eval()
        pre = make_preprocess(ckpt["normalization"], config, torch.device(device), device == "cuda", dtype)
        loader = val_batches(shards, read_manifest(shards), config.crop, 5, workers=0, pin_memory=device == "cuda")
        out = []
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            for batch in DeviceFeed(loader, partial(pre, train=False), torch.device(device)):
                out.append(net(batch.inputs).float().cpu())
        logits[device] = torch.cat(out)
    cpu, gpu = logits["cpu"], logits["cuda"]
    scale = cpu.abs().max().item()
    tolerance = 0.03 * scale  # bf16 through eight layers: a few 2⁻⁹ roundings per layer, relative to the logits
    assert (gpu - cpu).abs().max().item() < tolerance
    top2 = cpu.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    assert clear.sum() > 0 and torch.equal(gpu.argmax(1)[clear], cpu.argmax(1)[clear])


@pytest.mark.parametrize("tf32", [False, True])
def test_evaluation_computes_as_training_did_without_or_with_tf32(data, tf32):
    """cuDNN's default is TF32 on: a network trained at tf32 false must be evaluated without it."""
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
