"""The `train` stage: the paper's SGD recipe (§5) with its augmentation (§4.1), checkpoints, resume, torch.distributed.

Per step: the loader workers hand over uint8 crops (alexrepro.data.loader); on the device the batch becomes float, loses
the mean image cut at each crop's window, is mirrored where the loader drew a reflection, gains the PCA lighting
shift and is scaled by `input_scale` (alexrepro.data.augment); then one SGD step. Per epoch: validation on the centre crops, checkpoint-last.pt (and
checkpoint-best.pt on a new best top-1 error), history.json and history.csv rewritten whole, the learning-rate
schedule.

Reproducibility: every random draw is derived from (seed, epoch, position): the data order and augmentation per
epoch and per image (loader.py), dropout per step. So a run interrupted at any step and resumed with `--resume`
ends with the same weights as an uninterrupted one (on CPU; GPU kernels may not be bit-deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
import yaml

from alexrepro.core.atomic import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from alexrepro.core.config import config_to_dict
from alexrepro.core.errors import (
    ConfigError,
    FormatError,
    OutputExistsError,
    OutputWriteError,
    TrainingError,
)
from alexrepro.core.files import sha256_file
from alexrepro.core.locking import output_lock, reported_write_errors
from alexrepro.core.progress import NullProgress, Progress
from alexrepro.core.signals import StopRequest
from alexrepro.core.workers import usable_cores
from alexrepro.data.augment import crop_mean, normalize
from alexrepro.data.augmentations import PER_SAMPLE
from alexrepro.data.feed import DeviceFeed, device_crops
from alexrepro.data.loader import (
    Batch,
    EpochSpec,
    LoaderSettings,
    ShardIndex,
    one_line_run_failures,
    ordered_loader,
    train_loader,
    train_plan,
    verified_index,
)
from alexrepro.data.shards.manifest import Manifest, manifest_sha256, read_manifest
from alexrepro.data.stats import check_stats_source
from alexrepro.model.checkpoint import check_resumable, load_checkpoint, load_weights, save_checkpoint
from alexrepro.model.distributed import (
    Ranks,
    all_reduce_sum,
    any_rank,
    distributed_ranks,
    rank_batch_size,
    ranks_from_env,
    wrap_model,
)
from alexrepro.train.config import RESUMABLE_CHANGES, TrainConfig
from alexrepro.train.history import epoch_line, read_timings, results_only, write_history, write_timings
from alexrepro.train.live import EpochLog, NullLog, open_epoch_log

LAST = "checkpoint-last.pt"
BEST = "checkpoint-best.pt"
RUN_FILES = (LAST, BEST, "history.json", "history.csv", "last_epoch.json")  # what a run folder holds of its results


@dataclass
class TrainResult:
    out: Path
    epochs: int  # completed epochs
    history: list[dict]  # results per epoch (alexrepro.train.history)
    timings: list[dict]  # images/s, seconds, data wait per epoch
    best_val_top1_error: float | None
    checkpoint_last: Path
    checkpoint_best: Path


# ---------------------------------------------------------------------------------------------------------- input


@dataclass
class Preprocess:
    """The per-batch float work on the training device (DESIGN.md "Training"), set up once from the stats.

    Takes the workers' uint8 crops (or, with decode_on: device, decodes and crops the batch's JPEGs on the device)
    and returns the model's input in its dtype and memory format; alexrepro.data.feed runs it one batch ahead."""

    mean_image: torch.Tensor  # 3×S×S float32 on the device, RGB 0–255
    eigval: torch.Tensor
    eigvec: torch.Tensor
    input_scale: float
    lighting_scale: Literal["eigval", "sqrt_eigval"]
    crop: int
    device: torch.device
    memory_format: torch.memory_format = torch.contiguous_format
    dtype: torch.dtype = torch.float32  # bf16 where every tower runs under CUDA bf16 autocast (its first cast)

    def __call__(self, batch: Batch, train: bool) -> torch.Tensor:
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731  (from pinned memory on CUDA)
        images = move(batch.images) if batch.images is not None else device_crops(batch, self.device)
        mean = crop_mean(self.mean_image, move(batch.offsets), self.crop)  # N×3×c×c, each crop's own window
        x = normalize(images, mean, 1.0)
        if train:  # each augmentation of §4.1 in its order; the reflection mirrors image and mean together
            for augmentation in PER_SAMPLE:
                x = augmentation.apply(x, move(batch.draws[augmentation.name]), self)
        return (x * self.input_scale).to(dtype=self.dtype, memory_format=self.memory_format)


def normalization_from_stats(stats_dir: Path, input_scale: float) -> dict:
    """The checkpoint's `normalization` entry: everything needed to preprocess an image as training did."""
    from alexrepro.data.stats import load_stats

    stats = load_stats(stats_dir)
    return {
        "mean_image": torch.as_tensor(stats.mean_image, dtype=torch.float32).clone(),  # H×W×3 RGB 0–255
        "input_scale": float(input_scale),
        "eigval": torch.as_tensor(stats.eigval, dtype=torch.float32).clone(),
        "eigvec": torch.as_tensor(stats.eigvec, dtype=torch.float32).clone(),
    }


def make_preprocess(
    normalization: dict,
    config: TrainConfig,
    device: torch.device,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
) -> Preprocess:
    return Preprocess(
        mean_image=normalization["mean_image"].permute(2, 0, 1).contiguous().to(device),
        eigval=normalization["eigval"].to(device),
        eigvec=normalization["eigvec"].to(device),
        input_scale=config.input_scale,
        lighting_scale=config.lighting_scale,
        crop=config.crop,
        device=device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        dtype=dtype,
    )


def input_dtype(bf16: bool, devices: list[torch.device]) -> torch.dtype:
    """The dtype the batch is handed to the model in: bf16 when every tower runs under CUDA bf16 autocast, whose
    first convolution would cast it anyway (half the bytes, one cast fewer); else float32."""
    return torch.bfloat16 if bf16 and all(d.type == "cuda" for d in devices) else torch.float32


# ------------------------------------------------------------------------------------------------ learning rate


@dataclass
class LrSchedule:
    """§5: ε ÷ 10 when the validation error stops improving ("plateau"), or after fixed epochs ("step")."""

    lr: float
    best_error: float = math.inf
    bad_epochs: int = 0
    drops: int = 0

    def after_epoch(self, config: TrainConfig, completed: int, val_top1_error: float) -> float:
        """The learning rate for the next epoch, given the `completed` epochs and the latest validation error."""
        if config.lr_schedule == "step":
            self.drops = sum(1 for m in config.lr_milestones if completed >= m)
            self.lr = config.lr / 10**self.drops
            return self.lr
        if val_top1_error < self.best_error - config.lr_min_improvement:
            self.best_error, self.bad_epochs = val_top1_error, 0
            return self.lr
        self.bad_epochs += 1
        if self.bad_epochs >= config.lr_patience and self.drops < config.max_lr_drops:
            self.lr, self.bad_epochs, self.drops = self.lr / 10, 0, self.drops + 1
        return self.lr

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Position:
    """Where a run stands: the epochs completed, how far the next one got (a checkpoint written mid-epoch: its steps
    done and their running sums), the history rows so far and the learning-rate schedule."""

    schedule: LrSchedule
    epoch: int = 0  # epochs completed
    step: int = 0  # steps of the next epoch already done
    sums: dict | None = None  # Sums.to_state() of those steps
    history: list[dict] = dataclasses.field(default_factory=list)  # results, as the checkpoint embeds them
    timings: list[dict] = dataclasses.field(default_factory=list)  # not in the checkpoint: they differ per run


def apply_lr(optimizer: torch.optim.SGD, lr: float, update_rule: str) -> None:
    """Set the learning rate. With the paper's rule, rescale the momentum buffers so the velocity carries over.

    Paper (§5): v ← 0.9·v − 0.0005·ε·w − ε·∂L/∂w; w ← w + v. PyTorch's SGD keeps b ← 0.9·b + ∂L/∂w + 0.0005·w and
    steps w ← w − ε·b, i.e. v = −ε·b. The two agree while ε is fixed; when ε changes from ε₀ to ε₁, the paper's v
    still holds the steps taken at ε₀, which is b·ε₀/ε₁ in PyTorch's form. "pytorch" keeps b as it is (so the old
    velocity shrinks by ε₁/ε₀ at once).
    """
    for group in optimizer.param_groups:
        old = group["lr"]
        if old == lr:
            continue
        group["lr"] = lr
        if update_rule == "paper":
            for p in group["params"]:
                buffer = optimizer.state.get(p, {}).get("momentum_buffer")
                if buffer is not None:
                    buffer.mul_(old / lr)


# ------------------------------------------------------------------------------------------------- interruption


# ------------------------------------------------------------------------------------------------------ metrics


@dataclass
class Sums:
    """Running totals of an epoch phase, kept on the device (no sync per step)."""

    loss: torch.Tensor
    top1: torch.Tensor
    top5: torch.Tensor
    images: int = 0  # known on the host: reading it never waits for the device
    seconds: float = 0.0
    wait: float = 0.0

    @classmethod
    def zeros(cls, device: torch.device) -> Sums:
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(), z(), z())

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        k = min(5, logits.shape[1])
        top = logits.detach().topk(k, dim=1).indices  # N×5
        hits = top == labels[:, None]
        self.loss += loss_sum.detach().double()
        self.top1 += hits[:, :1].sum()
        self.top5 += hits.sum()
        self.images += int(labels.shape[0])

    def reduced(self, ranks: Ranks) -> tuple[float, float, float, int]:
        """(mean loss, top-1 error, top-5 error, images) over all ranks."""
        images = torch.tensor(float(self.images), dtype=torch.float64, device=self.loss.device)
        totals = all_reduce_sum(torch.stack([self.loss, self.top1, self.top5, images]), ranks).tolist()
        loss, top1, top5, images = totals
        n = max(images, 1)
        return loss / n, 1 - top1 / n, 1 - top5 / n, int(images)

    def to_state(self) -> dict:
        return {"loss": self.loss.item(), "top1": self.top1.item(), "top5": self.top5.item(),
                "images": self.images, "seconds": self.seconds, "wait": self.wait}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Sums:
        t = lambda v: torch.tensor(float(v), dtype=torch.float64, device=device)  # noqa: E731
        return cls(t(state["loss"]), t(state["top1"]), t(state["top5"]), int(state["images"]),
                   float(state["seconds"]), float(state["wait"]))  # fmt: skip


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of the dropout masks at one step: a function of the position only, so a resumed run matches."""
    return random.Random(f"alexrepro-dropout/{seed}/{epoch}/{step}/{rank}").getrandbits(63)


# --------------------------------------------------------------------------------------------------------- train


@dataclass(frozen=True)
class RunPaths:
    """The folders of one training run: what it reads (shards, stats) and where it writes (out)."""

    shards: Path
    stats: Path
    out: Path


@dataclass
class Run:
    """What stays fixed for one call of `train`: where things are, what runs where."""

    shards: Path
    out: Path
    config: TrainConfig
    manifest: Manifest
    indexes: dict[str, ShardIndex]  # "train", "val": where each sample lies in the shards, read once per run
    loading: LoaderSettings  # how every epoch reads them: this rank's share, the workers, the decoder
    ranks: Ranks
    devices: list[torch.device]
    net: torch.nn.Module  # the AlexNet itself (its state_dict is what checkpoints hold)
    model: torch.nn.Module  # what the step calls: net, or DDP / torch.compile around it
    optimizer: torch.optim.SGD
    preprocess: Preprocess
    bf16: bool  # forward passes under bf16 autocast (LRN and the loss stay fp32)
    base_state: dict  # the checkpoint entries that never change during the run
    progress: Progress
    live: EpochLog = dataclasses.field(default_factory=NullLog)  # DVCLive or TensorBoard (rank 0), see config.live

    def autocast(self) -> torch.autocast:
        """The forward pass's autocast context: bf16 when the run says so, else disabled (fp32)."""
        return torch.autocast(device_type=self.devices[0].type, dtype=torch.bfloat16, enabled=self.bf16)


def train(shards: Path, stats: Path, out: Path, config: TrainConfig, resume: bool, progress: Progress) -> TrainResult:
    """Train on `shards` (alexrepro prepare) normalised by `stats` (alexrepro stats); write checkpoints to `out`.

    Under torchrun, each process is one data-parallel rank; `config.batch_size` is the global batch.
    """
    ranks = ranks_from_env()
    # One run per folder. Rank 0 alone holds the lock (every rank's exclusive lock would exclude its own job, and
    # shared locks would let two jobs in); a refused rank 0 exits and torchrun then stops the job's other ranks.
    paths = RunPaths(Path(shards), Path(stats), Path(out))
    setting_up = lambda name: f"while setting up, before the first step; {kept_checkpoint(paths.out)}"  # noqa: E731
    with StopRequest(setting_up) as stop, backend_flags_restored():
        with output_lock(paths.out, "train") if ranks.rank == 0 else contextlib.nullcontext():
            return _train_locked(paths, config, resume, progress, stop)


@contextlib.contextmanager
def backend_flags_restored() -> Iterator[None]:
    """cuDNN's autotuning and the TF32 switches are process-wide: a run sets them for itself, and leaves them as it
    found them (a later run, a test comparing fp32 results, or evaluate in the same process must not inherit them)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def speed_note(config: TrainConfig, bf16: bool, cores: int) -> str:
    """One line at the start of a CUDA run: what the paper's arithmetic costs there, and which settings are fast."""
    arithmetic = "bf16" if bf16 else ("fp32 with TF32" if config.tf32 else "fp32 without TF32 (the paper's)")
    faster = []
    if not bf16:
        faster.append("--set precision=bf16")
    if config.workers < max(1, cores - 2):
        faster.append(f"--workers {max(1, cores - 2)}")
    if not config.compile:
        faster.append("--set compile=true --set drop_last=true")
    line = (
        f"on CUDA in {arithmetic}, with {config.workers} loader workers (each decodes about 1,200 img/s on a CPU "
        "core); fp32 without TF32 is estimated by its FLOP count to cap an H100 near 15,000 img/s"
    )
    return line + (f"; faster: {', '.join(faster)}" if faster else "")


def _train_locked(
    paths: RunPaths, config: TrainConfig, resume: bool, progress: Progress, stop: StopRequest
) -> TrainResult:
    out = paths.out
    with distributed_ranks(config.devices, config.towers) as (ranks, devices):
        failures = one_line_run_failures(
            lambda: kept_checkpoint(out),
            memory_fix="resume with --precision bf16, or train into a new folder with a smaller --batch-size or on "
            "more GPUs",
            worker_fix="use fewer --workers or a smaller --batch-size if memory is short",
        )
        try:
            with failures, reported_write_errors(out):
                return _train(paths, config, resume, ranks, devices, progress, stop)
        except OutputWriteError as exc:  # a full disk, a read-only folder: say what is left to resume from
            raise OutputWriteError(f"{exc}; {kept_checkpoint(out)}") from None


def kept_checkpoint(out: Path) -> str:
    """What a failed run leaves to go on from: the last good checkpoint (written atomically), or nothing."""
    kept = out / LAST
    if kept.is_file():
        return f"the last good checkpoint {kept} is kept: continue with --resume"
    return "no checkpoint was written: rerun the same command"


def _train(
    paths: RunPaths,
    config: TrainConfig,
    resume: bool,
    ranks: Ranks,
    devices: list[torch.device],
    progress: Progress,
    stop: StopRequest,
) -> TrainResult:
    shards, stats, out = paths.shards, paths.stats, paths.out
    if ranks.is_main:
        for tmp in remove_stale_temporaries(out):  # a run killed while writing a checkpoint leaves its temporary
            progress.log(f"removed {tmp}, left by a run that was stopped while writing it")
    manifest = read_manifest(shards)
    rank_batch_size(config.batch_size, ranks)
    normalization = normalization_from_stats(stats, config.input_scale)
    check_stats_source(stats, shards)  # normalised by statistics of these very shards
    check_sizes(manifest, normalization, config.crop, stats)
    if not resume and ranks.is_main:
        refuse_a_used_folder(out)  # before build_run hashes the shards, which a refused run would waste
    run = build_run(paths, config, manifest, normalization, ranks, devices, progress)
    position = start_position(run, resume)
    if resume:
        run.progress.log(
            f"resuming {out / LAST}: {position.epoch} of {config.epochs} epochs done, continuing with epoch "
            f"{position.epoch + 1} at step {position.step}"
        )
        if ranks.is_main:
            for line in complete_epoch_end(run, position):
                run.progress.log(line)
    if ranks.is_main:  # OUT can take a checkpoint now, not after an epoch's work
        check_room(out, checkpoint_bytes(run), missing=sum(not (out / name).exists() for name in (LAST, BEST)))
        # the resolved settings beside the run, as plain YAML (timm's args.yaml); also the first write into OUT
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    stop.begin()
    run.live = open_epoch_log(config.live, out, resume, ranks.rank)
    try:
        for epoch in range(position.epoch, config.epochs):
            sums = train_epoch(run, epoch, position, stop)
            position.step, position.sums = 0, None
            row, timing = finish_epoch(run, epoch, sums, position)
            position.epoch = epoch + 1
            run.progress.log(epoch_line(row, timing, config.epochs))
    finally:
        run.live.close()
    history = position.history
    best = min((r["val_top1_error"] for r in history), default=None)
    return TrainResult(out, position.epoch, history, position.timings, best, out / LAST, out / BEST)


def check_sizes(manifest: Manifest, normalization: dict, crop: int, stats: Path) -> None:
    mean_side = int(normalization["mean_image"].shape[0])
    size = manifest.settings.get("size")
    if size is not None and int(size) != mean_side:
        raise FormatError(
            f"{stats}: the mean image is {mean_side}×{mean_side} but the shards hold {size}×{size} images; "
            "rerun `alexrepro stats` on these shards"
        )
    if crop > mean_side:
        raise ConfigError(
            f"key 'crop' ({crop}) is larger than the {mean_side}×{mean_side} images; use a smaller --crop"
        )


def build_run(
    paths: RunPaths,
    config: TrainConfig,
    manifest: Manifest,
    normalization: dict,
    ranks: Ranks,
    devices: list[torch.device],
    progress: Progress,
) -> Run:
    from alexrepro.model.network import AlexNet, set_tf32

    shards, out = paths.shards, paths.out
    cuda = devices[0].type == "cuda"
    torch.manual_seed(config.seed)  # the initial weights; DDP also broadcasts rank 0's at wrap time
    model_config = config.model_config(manifest.num_classes)
    net = AlexNet(model_config, devices)
    channels_last = cuda and config.channels_last
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = wrap_model(net, devices, ranks)
    if config.compile:
        # torch.compile returns an OptimizedModule (a Module) for a Module; its stubs only promise a callable.
        # mode "reduce-overhead" replays the step as CUDA graphs: at batch 128 the step issues a few hundred kernel
        # launches, about as much host time as a bf16 step's GPU time on a current GPU. dynamic=False: a batch of
        # another size (an epoch's partial last batch, unless drop_last) gets its own graph, compiled once, rather
        # than turning every later step into a graph for any batch size, which specialises less.
        model = cast(torch.nn.Module, torch.compile(model, mode=config.compile_mode, dynamic=False))
    optimizer = make_optimizer(net, config)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda)
    if cuda:
        set_tf32(config.tf32)
        if ranks.is_main:
            progress.log(speed_note(config, bf16, usable_cores()))
    base_state = {
        "model_config": config_to_dict(model_config),
        "train_config": config_to_dict(config),
        "classes": [dataclasses.asdict(c) for c in manifest.classes],
        "data": {"manifest_sha256": manifest_sha256(shards), "stats_sha256": stats_sha256(paths.stats)},
        "normalization": normalization,
        "switches": config.switches(),
    }
    return Run(
        shards=shards, out=out, config=config, manifest=manifest, ranks=ranks,
        indexes={split: verified_index(shards, manifest, split, out, config.workers, (ranks.rank, ranks.world_size),
                                       progress if ranks.is_main else NullProgress())
                 for split in ("train", "val")},
        loading=LoaderSettings(config.batch_size, config.workers, ranks.rank, ranks.world_size, pin_memory=cuda,
                               decoder=config.decoder, decode_on=config.decode_on, timeout=config.loader_timeout,
                               drop_last=config.drop_last),
        devices=devices, net=net, model=model, optimizer=optimizer,
        preprocess=make_preprocess(normalization, config, devices[0], channels_last, input_dtype(bf16, devices)),
        bf16=bf16, base_state=base_state, progress=progress if ranks.is_main else NullProgress(),
    )  # fmt: skip


def make_optimizer(net: torch.nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay (§5), in two groups: weights, decayed; biases, decayed only with
    decay_biases (the paper's rule decays w; cuda-convnet's layer files give biases a weight cost of 0)."""
    named = list(net.named_parameters())
    weights = [p for name, p in named if not name.endswith("bias")]
    biases = [p for name, p in named if name.endswith("bias")]
    groups = [
        {"params": weights, "weight_decay": config.weight_decay},
        {"params": biases, "weight_decay": config.weight_decay if config.decay_biases else 0.0},
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def checkpoint_bytes(run: Run) -> int:
    """About the size of one checkpoint: the weights, a momentum buffer per parameter, the normalisation."""
    weights = sum(t.numel() * t.element_size() for t in run.net.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in run.net.parameters())
    normalization = sum(t.numel() * t.element_size() for t in run.base_state["normalization"].values()
                        if isinstance(t, torch.Tensor))  # fmt: skip
    return weights + momentum + normalization


def check_room(out: Path, checkpoint: int, missing: int) -> None:
    """Refuse to start when OUT cannot take the checkpoints: the file size limit (`ulimit -f`) is below one, or the
    free space is below what the next saves need (a checkpoint is written beside the one it replaces; a run without
    checkpoint-last.pt and checkpoint-best.pt yet adds both)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    if limit != resource.RLIM_INFINITY and limit < checkpoint:
        raise OutputWriteError(
            f"{out}: cannot write (EFBIG: files may not grow past {mb(limit)} here, a checkpoint takes about "
            f"{mb(checkpoint)}); raise the file size limit (`ulimit -f`), then rerun"
        )
    needed = checkpoint * max(1, missing)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise OutputWriteError(
            f"{out}: cannot write (ENOSPC: disk full, {mb(free)} free, the checkpoints need about {mb(needed)}); "
            "free disk space or choose another output folder, then rerun"
        )


def stats_sha256(stats: Path) -> str:
    """Identity of the stats the run was normalised with (the hash of stats.npz)."""
    path = Path(stats) / "stats.npz"
    return sha256_file(path) if path.is_file() else ""


def refuse_a_used_folder(out: Path) -> None:
    """A fresh run into a folder with any of a run's files, not only checkpoint-last.pt, would overwrite a
    checkpoint-best.pt (or a history) that a user kept: refused, before any shard is hashed."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        how = "pass --resume to continue it, or" if (out / LAST).exists() else "move them away, or"
        raise OutputExistsError(
            f"{out} already holds a training run's files ({', '.join(found)}); {how} choose another folder"
        )


def start_position(run: Run, resume: bool) -> Position:
    """Where training starts: from scratch, or where checkpoint-last.pt left off (weights, optimizer, schedule)."""
    last = run.out / LAST
    fresh = Position(LrSchedule(run.config.lr))
    if not resume:
        refuse_a_used_folder(run.out)
        return fresh
    if not last.is_file():
        raise FormatError(f"{last}: nothing to resume; run without --resume to start training")
    ckpt = load_checkpoint(last)
    check_resumable(ckpt, run.base_state["train_config"], run.base_state["data"], RESUMABLE_CHANGES, str(last))
    load_weights(run.net, ckpt["model"], str(last))
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        schedule = LrSchedule(**ckpt["scheduler"])
        partial = ckpt.get("position") or {}
        epoch = int(ckpt["epoch"])
        return Position(
            schedule,
            epoch=epoch,
            step=int(partial.get("step", 0)),
            sums=partial.get("sums"),
            history=[results_only(row) for row in ckpt["history"]],
            timings=read_timings(run.out, epoch),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(
            f"{last}: its optimizer, scheduler, history or position entry is missing or does not fit the model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); resume from a checkpoint "
            "written by `alexrepro train`, or train into another folder without --resume"
        ) from None


def train_epoch(run: Run, epoch: int, position: Position, stop: StopRequest) -> Sums:
    """One pass over the training set from `position.step`; returns the epoch's running sums."""
    config, ranks, device = run.config, run.ranks, run.devices[0]
    order = EpochSpec(config.seed, epoch, position.step, config.shuffle_buffer)
    loader = train_loader(run.indexes["train"], config.augmentation(), order, run.loading)
    batches = DeviceFeed(loader, lambda batch: run.preprocess(batch, train=True), device)  # one batch ahead
    steps = train_plan(run.manifest.split("train").count, run.loading).steps
    sums = Sums.from_state(position.sums, device) if position.sums else Sums.zeros(device)
    run.model.train()
    run.progress.start(f"epoch {epoch + 1}/{config.epochs}", steps - position.step, unit="step")
    window = torch.zeros((), dtype=torch.float64, device=device)  # loss summed since the last read-out
    window_images = 0  # images (all ranks) in that sum
    loss_value: float | None = None  # shown as '—' until the first read-out
    stopping = False
    tick = time.perf_counter()
    for batch in batches:
        waited = time.perf_counter() - tick
        loss_sum = train_step(run, batch, epoch, sums)
        window += loss_sum.detach().double()
        window_images += batch.global_size
        sums.wait += waited
        stopping = should_stop(stop, batch.step, config.log_every, device, ranks)
        if (batch.step + 1) % config.log_every == 0 or stopping or batch.step == steps - 1:
            loss_value = read_loss(window, batch, run, epoch) / max(window_images, 1)
            window.zero_()
            window_images = 0
        sums.seconds += time.perf_counter() - tick
        run.progress.advance(
            1, loss=loss_value, lr=run.optimizer.param_groups[0]["lr"],
            img_s=sums.images / max(sums.seconds, 1e-9) * ranks.world_size, data_wait=sums.wait / max(sums.seconds, 1e-9),
        )  # fmt: skip
        if stopping:
            break  # leaving the loop shuts the loader's workers down before the checkpoint is written
        tick = time.perf_counter()
    run.progress.finish()
    if stopping:
        interrupt(run, epoch, batch.step + 1, sums, position, stop)
    return sums


def should_stop(stop: StopRequest, step: int, log_every: int, device: torch.device, ranks: Ranks) -> bool:
    """Whether to stop after this step. One process: as soon as a signal came. Several: every rank must stop at the
    same step, so they agree by an all-reduce, every `log_every` steps (each one waits for the device)."""
    if not ranks.distributed:
        return stop.signal is not None
    return (step + 1) % log_every == 0 and any_rank(stop.signal is not None, device, ranks)


def train_step(run: Run, batch: Batch, epoch: int, sums: Sums) -> torch.Tensor:
    """Forward, backward and one SGD step on this rank's share of a global batch; returns the share's loss sum."""
    torch.manual_seed(step_seed(run.config.seed, epoch, batch.step, run.ranks.rank))  # dropout masks
    x, labels = batch.inputs, batch.targets  # preprocessed on the device by alexrepro.data.feed
    assert x is not None and labels is not None
    with run.autocast():
        logits = run.model(x)
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    # Each rank's share is summed and divided by the global batch's size; DDP averages the ranks' gradients, hence
    # the factor world_size: the gradient is the global batch's mean whatever the split (AlexNet has no BatchNorm).
    loss = losses.sum() * (run.ranks.world_size / batch.global_size)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    sums.add(logits, labels, losses.sum())
    return losses.sum()


def read_loss(window: torch.Tensor, batch: Batch, run: Run, epoch: int) -> float:
    """The loss summed since the last read-out, over all ranks (the caller divides by the images in it); stop the
    run if it is not finite."""
    total = all_reduce_sum(window.clone(), run.ranks).item()
    if not math.isfinite(total):
        kept = run.out / LAST
        keeps = f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint was written"
        raise TrainingError(
            f"loss became {total} in epoch {epoch + 1} by step {batch.step + 1}; {keeps}; lower --lr (now "
            f"{run.optimizer.param_groups[0]['lr']:g}) or check the input scale"
        )
    return total


def interrupt(run: Run, epoch: int, step: int, sums: Sums, position: Position, stop: StopRequest) -> None:
    """Write a mid-epoch checkpoint that --resume continues exactly, then stop."""
    path = run.out / LAST
    if run.ranks.is_main:
        partial = {"step": step, "sums": sums.to_state()}
        save_checkpoint(path, checkpoint_state(run, epoch, position, partial))
    raise stop.stopped(f"in epoch {epoch + 1} after step {step}; checkpoint written to {path}; continue with --resume")


def complete_epoch_end(run: Run, position: Position) -> list[str]:
    """Make the run folder agree with checkpoint-last.pt, the commit of an epoch's end (written first).

    A run killed while it ended an epoch (after checkpoint-last.pt, before checkpoint-best.pt or the history) left
    the other files one epoch behind; resuming would find every epoch done and stop there. The history and the
    metrics are rewritten from the checkpoint's own history, and checkpoint-best.pt gets the last epoch's state when
    that epoch is the best and the best checkpoint is not of it. Returns what was completed, for the log."""
    done: list[str] = []
    if not position.history:
        return done
    write_history(run.out, position.history)
    write_timings(run.out, position.timings)
    best_row = min(position.history, key=lambda row: row["val_top1_error"])
    at_epoch_end = position.step == 0 and position.sums is None
    if at_epoch_end and best_row["epoch"] == position.epoch:
        best = run.out / BEST
        best_epoch = load_checkpoint(best).get("epoch") if best.is_file() else None
        if best_epoch != position.epoch:
            atomic_write_bytes(best, (run.out / LAST).read_bytes())  # the same state, byte for byte
            done.append(
                f"completed the end of epoch {position.epoch}, which a stopped run left unfinished: {BEST} (was "
                f"{'missing' if best_epoch is None else f'epoch {best_epoch}'}), history and metrics rewritten"
            )
    return done


def finish_epoch(run: Run, epoch: int, sums: Sums, position: Position) -> tuple[dict, dict]:
    """Validate, step the schedule, write checkpoints and history (rank 0); return the epoch's results and timings."""
    train_loss, train_top1, train_top5, _ = sums.reduced(run.ranks)
    started = time.perf_counter()
    val_loss, val_top1, val_top5 = validate(run)
    lr = run.optimizer.param_groups[0]["lr"]
    row = {
        "epoch": epoch + 1, "train_loss": train_loss, "train_top1_error": train_top1, "train_top5_error": train_top5,
        "val_loss": val_loss, "val_top1_error": val_top1, "val_top5_error": val_top5, "lr": lr,
    }  # fmt: skip
    timing = {
        "epoch": epoch + 1,
        "images_per_s": sums.images * run.ranks.world_size / max(sums.seconds, 1e-9),
        "seconds": sums.seconds + time.perf_counter() - started,  # training (also before a resume) + validation
        "data_wait_fraction": sums.wait / max(sums.seconds, 1e-9),
    }
    position.timings.append(timing)
    history = position.history
    best_before = min((r["val_top1_error"] for r in history), default=math.inf)
    history.append(row)
    apply_lr(run.optimizer, position.schedule.after_epoch(run.config, epoch + 1, val_top1), run.config.update_rule)
    if run.ranks.is_main:
        state = checkpoint_state(run, epoch + 1, position, None)
        save_checkpoint(run.out / LAST, state)
        if val_top1 < best_before:
            save_checkpoint(run.out / BEST, state)
        write_history(run.out, history)
        write_timings(run.out, position.timings)
        run.live.epoch(row)
    return row, timing


@torch.no_grad()
def validate(run: Run) -> tuple[float, float, float]:
    """Centre-crop loss, top-1 and top-5 error over every validation image exactly once (all ranks together)."""
    config, ranks, device = run.config, run.ranks, run.devices[0]
    loader = ordered_loader(run.indexes["val"], config.crop, run.loading)
    expected = run.manifest.split("val").count
    sums = Sums.zeros(device)
    run.net.eval()
    run.progress.start("validate", -(-expected // config.batch_size), unit="step")
    for batch in DeviceFeed(loader, lambda batch: run.preprocess(batch, train=False), device):
        x, labels = batch.inputs, batch.targets
        assert x is not None and labels is not None  # set by DeviceFeed
        with run.autocast():
            logits = run.net(x)  # not the DDP wrapper: no gradient sync in evaluation
        sums.add(logits.float(), labels, F.cross_entropy(logits.float(), labels, reduction="sum"))
        run.progress.advance(1)
    run.progress.finish()
    loss, top1, top5, images = sums.reduced(ranks)
    if images != expected:
        raise TrainingError(
            f"validation saw {images} images but {run.shards}/manifest.json lists {expected}; rerun `alexrepro prepare`"
        )
    return loss, top1, top5


def checkpoint_state(run: Run, epoch: int, position: Position, partial: dict | None) -> dict:
    """The checkpoint dict (alexrepro.model.checkpoint) for `epoch` completed epochs (+ `partial` of the next)."""
    return {
        **run.base_state,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in run.net.state_dict().items()},
        "optimizer": _to_cpu(run.optimizer.state_dict()),
        "scheduler": position.schedule.state_dict(),
        "rng": {"seed": run.config.seed, "scheme": "derived from (seed, epoch, step, rank) at each use"},
        "history": list(position.history),
        "position": partial,
    }


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
