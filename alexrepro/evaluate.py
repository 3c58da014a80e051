"""The `evaluate` stage: the paper's 10-crop test (§4.1) over the validation shards, and the ILSVRC-style report.

Each validation image is decoded once; its ten patches (four corners and the centre at the model's crop size, and
their horizontal reflections, in `torchvision.transforms.TenCrop` order) go through the network in one batch and their
softmax outputs are averaged. The centre patch alone (view 4) gives the 1-crop result from the same forward pass.
Patches are preprocessed exactly as in training: the per-pixel mean image cropped at the same offset (and mirrored
with the reflection) is subtracted and the result multiplied by the checkpoint's `input_scale`.

Every validation image is counted exactly once, on one device, on two (the two-tower placement) or split across
`torchrun` ranks (predictions gathered on every rank); a count that differs from the manifest is an EvaluationError.

Outputs in OUT (all written atomically, rewritten whole; only rank 0 writes):
    metrics.json      1-crop and 10-crop top-1/top-5 error (fractions), image count, checkpoint and data identity
                      (manifest sha256 and prepared image size)
    submission.txt    ILSVRC task-1 file: one line per val image in file-name order, five labels, most confident first
    predictions.csv   key, true class, 10-crop top-5 classes and probabilities
    per_class.csv     every class's 10-crop and 1-crop top-1/top-5 error
    report.md, report.html, figures/*.png   (see alexrepro.report)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alexrepro import shards as shardlib
from alexrepro.atomic import atomic_write_text
from alexrepro.augment import center_offset, crop_mean, normalize, ten_crop_offsets
from alexrepro.distributed import Ranks, init_distributed, ranks_from_env, resolve_devices, shutdown_distributed
from alexrepro.errors import EvaluationError
from alexrepro.loader import decode_pil, decode_torchvision
from alexrepro.locking import output_lock
from alexrepro.progress import Progress
from alexrepro.workers import usable_cores

TOP_K = 5  # ILSVRC scores five guesses per image (REFERENCE.md §5)
EXAMPLE_IMAGES = 8  # validation images shown with their top-5 (the paper's Figure 4, left)
NEIGHBOUR_QUERIES = 5  # validation images whose nearest training images are shown (Figure 4, right)
NEIGHBOURS = 6  # training images per query, as in Figure 4


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 128  # validation images per forward pass; each contributes its ten patches (§4.1)
    devices: str = "auto"  # "auto", "cpu", "cuda:0", or "cuda:0,cuda:1" for the paper's two-tower placement (§3.2)
    workers: int | None = None  # decoding processes; None = one per CPU core (at most 8), 0 = decode in this process
    neighbours_max_train: int | None = None  # training images scanned for Figure 4's neighbours; None = all, 0 = skip

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"key 'batch_size' must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"key 'workers' must be 0 or more (or null for one per core), got {self.workers}")
        if self.neighbours_max_train is not None and self.neighbours_max_train < 0:
            raise ValueError(f"key 'neighbours_max_train' must be 0 or more, got {self.neighbours_max_train}")
        if not self.devices.strip():
            raise ValueError("key 'devices' must be 'auto', a device (cpu, cuda:0) or two separated by a comma")


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]  # as written to metrics.json
    report_md: Path
    report_html: Path
    submission: Path
    predictions: Path
    neighbours: dict[str, list[str]] = field(default_factory=dict)  # query key → nearest training keys (Figure 4)


# --------------------------------------------------------------------------------------------------------------
# Devices and ranks


@contextlib.contextmanager
def distributed_ranks(devices_spec: str, towers: int) -> Iterator[tuple[Ranks, list[torch.device]]]:
    """This process's rank and devices; joins the process group `torchrun` describes (RANK, WORLD_SIZE), if any.

    A group the caller already initialised is used as is and left open; one opened here is closed on exit.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        yield ranks, resolve_devices(devices_spec, towers, ranks.local_rank)
        return
    ranks = ranks_from_env()
    devices = resolve_devices(devices_spec, towers, ranks.local_rank)
    if ranks.distributed and devices[0].type == "cuda":
        torch.cuda.set_device(devices[0])  # NCCL's object collectives use the current device
    init_distributed(ranks, devices[0].type)
    try:
        yield ranks, devices
    finally:
        if ranks.distributed:
            shutdown_distributed()


def _all_gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` when not distributed)."""
    if not ranks.distributed:
        return [obj]
    gathered: list[Any] = [None] * ranks.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# --------------------------------------------------------------------------------------------------------------
# Reading shards


@dataclass(frozen=True)
class ShardPart:
    path: Path
    count: int  # samples the manifest lists for this part
    truncated: bool = False  # stop after `count` samples (a subset); otherwise read the whole shard


class ShardImages(IterableDataset):
    """(key, label, image uint8 3×S×S) for every sample of `parts`, each decoded by exactly one reader.

    Readers are the DataLoader workers of every rank. With at least as many shards as readers, each reader takes whole
    shards. With fewer, each shard is shared by the readers r ≡ shard (mod shards), which take every k-th sample of it;
    either way no reader reads more than its own shards.
    """

    def __init__(self, parts: Sequence[ShardPart], ranks: Ranks = Ranks(), decoder: str = "torchvision"):
        self.parts = list(parts)
        self.ranks = ranks
        self.decoder = decoder  # by name: the dataset travels to worker processes

    def assignments(self, reader: int, readers: int) -> list[tuple[ShardPart, int, int]]:
        """(part, stride, phase) for one reader: it keeps the samples at positions ≡ phase (mod stride)."""
        n = len(self.parts)
        if n >= readers:
            return [(part, 1, 0) for part in self.parts[reader::readers]]
        shard = reader % n
        return [(self.parts[shard], len(range(shard, readers, n)), reader // n)]

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers = self.ranks.world_size * workers
        reader = self.ranks.rank * workers + worker
        decode = DECODERS[self.decoder]
        for part, stride, phase in self.assignments(reader, readers) if self.parts else []:
            for position, sample in enumerate(shardlib.iter_shard(part.path)):
                if part.truncated and position >= part.count:
                    break
                if position % stride == phase:
                    yield sample.key, sample.label, decode(sample.jpeg)


def split_parts(shards_dir: Path, manifest: shardlib.Manifest, split: str, limit: int | None = None) -> list[ShardPart]:
    """The shards of `split` as reading parts, cut after the first `limit` samples in stored order."""
    parts = []
    remaining = math.inf if limit is None else limit
    for info in manifest.split(split).shards:
        if remaining <= 0:
            break
        if remaining >= info.count:
            parts.append(ShardPart(Path(shards_dir) / info.name, info.count))
        else:
            parts.append(ShardPart(Path(shards_dir) / info.name, int(remaining), truncated=True))
        remaining -= info.count
    return parts


def _loader(parts: Sequence[ShardPart], ranks: Ranks, network: "InferenceNetwork", config: EvaluateConfig) -> DataLoader:
    workers = min(8, usable_cores()) if config.workers is None else config.workers
    return DataLoader(
        ShardImages(parts, ranks, network.decoder),
        batch_size=config.batch_size,
        num_workers=workers,
        pin_memory=network.device.type == "cuda",
        worker_init_fn=_worker_init,
    )


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker decodes one image at a time; more threads only contend for cores


# --------------------------------------------------------------------------------------------------------------
# Test-time patches (§4.1)


def ten_crop_views(images: torch.Tensor, crop: int) -> torch.Tensor:
    """N×C×S×S images → N×10×C×crop×crop in torchvision's TenCrop order: the five patches of the image, then the five
    patches of its mirror image (so view 5, the mirror's top-left, is the reflection of view 1, the top-right)."""

    def five(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[..., y : y + crop, i : i + crop] for y, i in ten_crop_offsets(x.shape[-1], crop)], dim=1)

    return torch.cat([five(images), five(images.flip(-1))], dim=1)


def ten_crop_windows(size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the ten views come from in the original image: (y, x) of each window (10×2) and whether it is mirrored.

    A window at (y, x) of the mirror image is the mirrored window at (y, size − crop − x) of the original; this is the
    form training uses (crop position, then reflection) to cut the mean image (alexrepro.augment.crop_mean).
    """
    offsets = ten_crop_offsets(size, crop)
    mirrored = [(y, size - crop - x) for y, x in offsets]
    return torch.tensor(offsets + mirrored, dtype=torch.long), torch.arange(10) >= 5


CENTRE_VIEW = 4  # index of the unreflected centre patch among the ten


class TenCropPatches:
    """Turns decoded S×S images into the network's preprocessed input, exactly as training preprocesses its crops."""

    def __init__(self, normalization: dict, crop: int, device: torch.device):
        mean_image = torch.as_tensor(normalization["mean_image"], dtype=torch.float32)  # H×W×3 RGB 0–255
        self.size = int(mean_image.shape[0])
        self.crop = crop
        self.input_scale = float(normalization["input_scale"])
        offsets, flipped = ten_crop_windows(self.size, crop)
        mean_chw = mean_image.permute(2, 0, 1).contiguous()
        self.mean_views = crop_mean(mean_chw, offsets, crop, flipped).to(device)  # 10×3×c×c, as the views

    def ten(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 (on the model's device) → (N·10)×3×c×c float, image-major."""
        views = ten_crop_views(images, self.crop)  # N×10×3×c×c
        mean = self.mean_views.expand(views.shape[0], *self.mean_views.shape)
        return normalize(views.flatten(0, 1), mean.flatten(0, 1), self.input_scale)

    def centre(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×3×c×c float: the unreflected centre patch only."""
        y, x = center_offset(self.size, self.crop)
        views = images[..., y : y + self.crop, x : x + self.crop]
        mean = self.mean_views[CENTRE_VIEW].expand(views.shape[0], -1, -1, -1)
        return normalize(views, mean, self.input_scale)


DECODERS = {"torchvision": decode_torchvision, "pil": decode_pil}  # TrainConfig.decoder → function


class InferenceNetwork:
    """A checkpoint's network in eval mode, with the preprocessing, decoder and precision it was trained with."""

    def __init__(self, ckpt: dict, devices: Sequence[torch.device | str]):
        from alexrepro.checkpoint import model_from_checkpoint

        self.device = torch.device(devices[0])
        self.model = model_from_checkpoint(ckpt, list(devices)).eval()
        self.patches = TenCropPatches(ckpt["normalization"], int(ckpt["model_config"]["crop"]), self.device)
        train = ckpt.get("train_config") or {}
        self.decoder = str(train.get("decoder", "torchvision"))
        if self.decoder not in DECODERS:
            raise EvaluationError(
                f"checkpoint train_config: unknown decoder {self.decoder!r} (known: {sorted(DECODERS)}); "
                "evaluate with the alexrepro version that trained it"
            )
        # bf16 autocast and channels_last on CUDA, as training ran (DESIGN.md "Training"); softmax always in fp32.
        cuda = self.device.type == "cuda"
        self.bf16 = cuda and train.get("precision", "auto") != "fp32"
        self.memory_format = torch.channels_last if cuda and train.get("channels_last", True) else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)

    @property
    def size(self) -> int:
        return self.patches.size

    def decode(self, jpeg: bytes) -> torch.Tensor:
        return DECODERS[self.decoder](jpeg)

    def _run(self, forward, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return forward(x).float()

    def ten_crop_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×10×K softmax outputs, one row per patch (the 10-crop result is their mean)."""
        x = self.patches.ten(images.to(self.device, non_blocking=True))
        return F.softmax(self._run(self.model, x), dim=1).view(images.shape[0], 10, -1)

    def centre_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×K softmax outputs of the centre patch."""
        x = self.patches.centre(images.to(self.device, non_blocking=True))
        return F.softmax(self._run(self.model, x), dim=1)

    def centre_features(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → N×D fc7 activations (after ReLU) of the centre patch, float32 on the first device."""
        x = self.patches.centre(images.to(self.device, non_blocking=True))
        return self._run(self.model.fc7_features, x)

    def check_size(self, images: torch.Tensor, source: str) -> None:
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise EvaluationError(
                f"{source}: images are {images.shape[-1]}×{images.shape[-2]} but the checkpoint's mean image is "
                f"{self.size}×{self.size}; evaluate on shards prepared with --size {self.size}"
            )


# --------------------------------------------------------------------------------------------------------------
# Scores


def topk_error(top: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose true label is not among the first `k` guesses of `top` (N×≥k, most confident first)."""
    if len(labels) == 0:
        return float("nan")
    hit = (top[:, :k] == labels[:, None]).any(axis=1)
    return float(1.0 - hit.mean())


@dataclass
class Predictions:
    """Per-image results over the whole validation split, in file-name (key) order."""

    keys: list[str]
    labels: np.ndarray  # N, true class index
    top10: np.ndarray  # N×k class indices, 10-crop, most confident first
    prob10: np.ndarray  # N×k their averaged softmax probabilities
    top1: np.ndarray  # N×k class indices from the centre patch alone

    @classmethod
    def merge(cls, pieces: Sequence["Predictions"]) -> "Predictions":
        keys = [key for p in pieces for key in p.keys]
        order = sorted(range(len(keys)), key=keys.__getitem__)

        def cat(name):
            return np.concatenate([getattr(p, name) for p in pieces])[order]

        return cls([keys[i] for i in order], cat("labels"), cat("top10"), cat("prob10"), cat("top1"))


def check_classes(checkpoint_classes: list[dict], manifest: shardlib.Manifest, checkpoint: Path, shards: Path) -> None:
    """The network's outputs must mean the manifest's classes: same count, same WNID at every index."""
    mine = [c["wnid"] for c in checkpoint_classes]
    theirs = [c.wnid for c in manifest.classes]
    if len(mine) != len(theirs):
        raise EvaluationError(
            f"{checkpoint} was trained on {len(mine)} classes but {shards / shardlib.MANIFEST_NAME} has "
            f"{len(theirs)}; evaluate on the shards it was trained on"
        )
    for index, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            raise EvaluationError(
                f"{checkpoint}: class {index} is {a} but {shards / shardlib.MANIFEST_NAME} has {b} there; "
                "evaluate on the shards it was trained on"
            )


def dataset_name(manifest: shardlib.Manifest) -> str:
    """How the report names the data: ILSVRC-2012 only when it has ILSVRC-2012's 1000 classes and 50,000 val images."""
    classes = manifest.num_classes
    val = manifest.split("val").count
    if classes == 1000 and val == 50_000:
        return "ILSVRC-2012 val"
    if _is_builtin_sample(manifest):
        return f"built-in sample ({classes} classes)"
    return f"own data ({classes} classes, {val:,} val images)"


def _is_builtin_sample(manifest: shardlib.Manifest) -> bool:
    """The built-in miniature's WNIDs start with n2 and can never be real WordNet synsets (alexrepro.sample)."""
    from alexrepro.sample import PATTERNS

    return manifest.num_classes > 0 and {c.wnid for c in manifest.classes} <= {p.wnid for p in PATTERNS}


# --------------------------------------------------------------------------------------------------------------
# fc7 features and nearest neighbours (Figure 4, right)


@dataclass
class Neighbour:
    distance: float
    key: str
    label: int
    image: torch.Tensor  # 3×S×S uint8, on the CPU


class RunningNearest:
    """The `k` nearest items to each query seen so far, by Euclidean distance; nothing else is kept."""

    def __init__(self, queries: torch.Tensor, k: int = NEIGHBOURS):
        self.queries = queries.float()
        self.k = k
        self.best: list[list[Neighbour]] = [[] for _ in range(len(queries))]

    def update(self, features: torch.Tensor, keys: Sequence[str], labels: Sequence[int], images: torch.Tensor) -> None:
        # The exact (not matrix-product) formula, so that near-ties order as a direct computation would.
        distances = torch.cdist(self.queries, features.float(), compute_mode="donot_use_mm_for_euclid_dist")
        take = min(self.k, features.shape[0])
        for q, row in enumerate(distances):
            values, indices = torch.topk(row, take, largest=False)
            fresh = [
                Neighbour(float(v), keys[i], int(labels[i]), images[i].cpu().clone())
                for v, i in zip(values.tolist(), indices.tolist())
            ]
            self.best[q] = merge_nearest([self.best[q], fresh], self.k)


def merge_nearest(lists: Sequence[Sequence[Neighbour]], k: int) -> list[Neighbour]:
    return sorted((n for lst in lists for n in lst), key=lambda n: (n.distance, n.key))[:k]


def nearest_training_images(
    network: InferenceNetwork,
    queries: torch.Tensor,
    shards_dir: Path,
    manifest: shardlib.Manifest,
    config: EvaluateConfig,
    ranks: Ranks,
    progress: Progress,
) -> list[list[Neighbour]]:
    """For each query image (Q×3×S×S uint8), the NEIGHBOURS training images nearest in fc7 space.

    Streams the train shards (the first `config.neighbours_max_train` images in stored order, a random subset since
    train shards are shuffled), split across ranks and workers, keeping only a running top-k per query.
    """
    nearest = RunningNearest(network.centre_features(queries))
    parts = split_parts(shards_dir, manifest, "train", config.neighbours_max_train)
    total = sum(p.count for p in parts)
    progress.start("nearest training images (fc7)", math.ceil(total / ranks.world_size))
    for keys, labels, images in _loader(parts, ranks, network, config):
        nearest.update(network.centre_features(images), keys, labels.tolist(), images)
        progress.advance(len(keys))
    progress.finish()
    gathered = _all_gather(nearest.best, ranks)
    return [merge_nearest([g[q] for g in gathered], NEIGHBOURS) for q in range(len(queries))]


def fetch_images(
    shards_dir: Path,
    manifest: shardlib.Manifest,
    split: str,
    keys: Sequence[str],
    decode: Callable[[bytes], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Decode the samples named `keys`, reading the split from its start only until all are found."""
    wanted = set(keys)
    found: dict[str, torch.Tensor] = {}
    for sample in shardlib.iter_split(shards_dir, split, manifest):
        if sample.key in wanted:
            found[sample.key] = decode(sample.jpeg)
            if len(found) == len(wanted):
                break
    return found


def pick_spread(labels: np.ndarray, n: int) -> list[int]:
    """Indices of the first `n` images (file-name order) with distinct true classes, then others in order if too few."""
    chosen: list[int] = []
    seen: set[int] = set()
    for i, label in enumerate(labels.tolist()):
        if label not in seen:
            chosen.append(i)
            seen.add(label)
            if len(chosen) == n:
                return chosen
    taken = set(chosen)
    return chosen + [i for i in range(len(labels)) if i not in taken][: n - len(chosen)]


# --------------------------------------------------------------------------------------------------------------
# The stage


def evaluate(checkpoint: Path, shards: Path, out: Path, config: EvaluateConfig, progress: Progress) -> EvaluateResult:
    """Score a checkpoint on the validation shards (1-crop and 10-crop) and write metrics, submission and report."""
    checkpoint, shards, out = Path(checkpoint), Path(shards), Path(out)
    # One run per report folder; under torchrun rank 0 alone holds the lock (see train()).
    with output_lock(out, "evaluate") if ranks_from_env().rank == 0 else contextlib.nullcontext():
        return _evaluate_locked(checkpoint, shards, out, config, progress)


def _evaluate_locked(checkpoint: Path, shards: Path, out: Path, config: EvaluateConfig, progress: Progress):
    from alexrepro.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    manifest = shardlib.read_manifest(shards)
    check_classes(ckpt["classes"], manifest, checkpoint, shards)

    with distributed_ranks(config.devices, int(ckpt["model_config"].get("towers", 2))) as (ranks, devices):
        network = InferenceNetwork(ckpt, devices)
        prepared_size = manifest.settings.get("size")
        if prepared_size is not None and int(prepared_size) != network.size:
            raise EvaluationError(
                f"{shards / shardlib.MANIFEST_NAME}: images are {prepared_size}×{prepared_size} but the checkpoint's "
                f"mean image is {network.size}×{network.size}; evaluate on shards prepared with --size {network.size}"
            )

        mine = _score_split(network, shards, manifest, config, ranks, progress)
        predictions = Predictions.merge(_all_gather(mine, ranks))
        _check_count(predictions, manifest.split("val").count, manifest.num_classes, shards)

        examples = [predictions.keys[i] for i in pick_spread(predictions.labels, EXAMPLE_IMAGES)]
        images = fetch_images(shards, manifest, "val", examples, network.decode)
        query_keys = examples[:NEIGHBOUR_QUERIES]
        neighbours: list[list[Neighbour]] = []
        if config.neighbours_max_train != 0 and query_keys and "train" in manifest.splits:
            queries = torch.stack([images[k] for k in query_keys])
            neighbours = nearest_training_images(network, queries, shards, manifest, config, ranks, progress)

    metrics = _metrics(predictions, checkpoint, ckpt, shards, manifest)
    result = EvaluateResult(
        metrics=metrics,
        report_md=out / "report.md",
        report_html=out / "report.html",
        submission=out / "submission.txt",
        predictions=out / "predictions.csv",
        neighbours={key: [n.key for n in found] for key, found in zip(query_keys, neighbours)},
    )
    if ranks.rank != 0:
        return result

    progress.start("writing report", None)
    out.mkdir(parents=True, exist_ok=True)
    id_kind = write_submission(out / "submission.txt", predictions, manifest)
    write_predictions_csv(out / "predictions.csv", predictions, manifest)
    write_per_class_csv(out / "per_class.csv", predictions, manifest)
    _write_report(out, predictions, metrics, ckpt, manifest, images, examples, query_keys, neighbours, id_kind, config)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")  # last: present means complete
    progress.finish()
    progress.log(
        f"{metrics['images']:,} images ({metrics['dataset']}): 10-crop top-1 {metrics['10crop']['top1_error']:.2%}, "
        f"top-5 {metrics['10crop']['top5_error']:.2%}; 1-crop top-1 {metrics['1crop']['top1_error']:.2%}, "
        f"top-5 {metrics['1crop']['top5_error']:.2%}"
    )
    return result


def _score_split(network: InferenceNetwork, shards: Path, manifest, config: EvaluateConfig, ranks: Ranks,
                 progress: Progress) -> Predictions:
    """This rank's share of the validation split, scored: top-k of the 10-crop average and of the centre patch."""
    k = min(TOP_K, manifest.num_classes)
    keys: list[str] = []
    labels, top10, prob10, top1 = [], [], [], []
    parts = split_parts(shards, manifest, "val")
    progress.start("evaluating (10 patches per image)", math.ceil(manifest.split("val").count / ranks.world_size))
    for batch_keys, batch_labels, images in _loader(parts, ranks, network, config):
        network.check_size(images, str(shards))
        probs = network.ten_crop_probabilities(images)  # N×10×K
        p10, i10 = probs.mean(dim=1).topk(k, dim=1)
        i1 = probs[:, CENTRE_VIEW].topk(k, dim=1).indices
        keys.extend(batch_keys)
        labels.append(batch_labels.numpy())
        top10.append(i10.cpu().numpy())
        prob10.append(p10.cpu().numpy())
        top1.append(i1.cpu().numpy())
        progress.advance(len(batch_keys))
    progress.finish()

    def cat(chunks, shape, dtype):
        return np.concatenate(chunks) if chunks else np.zeros(shape, dtype)

    return Predictions(
        keys,
        cat(labels, (0,), np.int64),
        cat(top10, (0, k), np.int64),
        cat(prob10, (0, k), np.float32),
        cat(top1, (0, k), np.int64),
    )


def _check_count(predictions: Predictions, expected: int, num_classes: int, shards: Path) -> None:
    if expected == 0:
        raise EvaluationError(f"{shards / shardlib.MANIFEST_NAME} lists no val images; prepare a source with a val split")
    seen = len(predictions.keys)
    unique = len(set(predictions.keys))
    if seen != expected or unique != seen:
        duplicates = f" ({seen - unique} keys seen twice)" if unique != seen else ""
        raise EvaluationError(
            f"{shards / shardlib.MANIFEST_NAME} promises {expected:,} val images but evaluation saw {seen:,}"
            f"{duplicates}; the shards do not match their manifest: rerun `alexrepro prepare`"
        )
    if seen and (predictions.labels.min() < 0 or predictions.labels.max() >= num_classes):
        raise EvaluationError(f"{shards}: a val label lies outside 0–{num_classes - 1}; rerun `alexrepro prepare`")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _metrics(predictions: Predictions, checkpoint: Path, ckpt: dict, shards: Path, manifest) -> dict[str, Any]:
    labels = predictions.labels

    def scores(top):
        return {"top1_error": topk_error(top, labels, 1), "top5_error": topk_error(top, labels, TOP_K)}

    return {
        "1crop": scores(predictions.top1),
        "10crop": scores(predictions.top10),
        "images": len(predictions.keys),
        "dataset": dataset_name(manifest),
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_file(checkpoint), "epoch": int(ckpt["epoch"])},
        "data": {"manifest_sha256": shardlib.manifest_sha256(shards), "size": manifest.settings.get("size")},
        "switches": _plain(ckpt.get("switches", {})),
    }


def _plain(value: Any) -> Any:
    """JSON-safe copy of a switches/config mapping (tensors and tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def submission_ids(manifest: shardlib.Manifest) -> tuple[list[int], str]:
    """The label written for each class index: ILSVRC2012_IDs when every class has one, else the index itself."""
    ids = [c.ilsvrc_id for c in manifest.classes]
    if ids and all(i is not None for i in ids):
        return [int(i) for i in ids], "ILSVRC2012_ID"
    return [c.index for c in manifest.classes], "class index"


def write_submission(path: Path, predictions: Predictions, manifest: shardlib.Manifest) -> str:
    """ILSVRC task-1 format (REFERENCE.md §5): one line per image in file-name order, guesses most confident first."""
    ids, kind = submission_ids(manifest)
    lines = (" ".join(str(ids[c]) for c in row) for row in predictions.top10.tolist())
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return kind


def write_predictions_csv(path: Path, predictions: Predictions, manifest: shardlib.Manifest) -> None:
    k = predictions.top10.shape[1]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["key", "true_class", "true_wnid"]
    for j in range(1, k + 1):
        header += [f"class{j}", f"prob{j}"]
    writer.writerow(header)
    for key, label, top, prob in zip(predictions.keys, predictions.labels.tolist(), predictions.top10.tolist(),
                                     predictions.prob10.tolist()):
        row: list[Any] = [key, label, manifest.classes[label].wnid]
        for c, p in zip(top, prob):
            row += [c, f"{p:.6f}"]
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def write_per_class_csv(path: Path, predictions: Predictions, manifest: shardlib.Manifest) -> None:
    """Every class's 10-crop and 1-crop error (the report shows only the best and worst)."""
    from alexrepro.report import per_class_error

    k = predictions.top10.shape[1]
    counts = np.bincount(predictions.labels, minlength=manifest.num_classes)
    columns = {
        "top1_error_10crop": per_class_error(predictions.top10, predictions.labels, manifest.num_classes, 1),
        f"top{k}_error_10crop": per_class_error(predictions.top10, predictions.labels, manifest.num_classes, k),
        "top1_error_1crop": per_class_error(predictions.top1, predictions.labels, manifest.num_classes, 1),
        f"top{k}_error_1crop": per_class_error(predictions.top1, predictions.labels, manifest.num_classes, k),
    }
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", "wnid", "name", "images", *columns])
    for c in manifest.classes:
        errors = ["" if np.isnan(v[c.index]) else f"{v[c.index]:.6f}" for v in columns.values()]
        writer.writerow([c.index, c.wnid, c.name, int(counts[c.index]), *errors])
    atomic_write_text(path, buffer.getvalue())


def _write_report(out, predictions, metrics, ckpt, manifest, images, examples, query_keys, neighbours, id_kind, config):
    from alexrepro import report

    def as_hwc(image: torch.Tensor) -> np.ndarray:
        return image.permute(1, 2, 0).numpy()

    index = {key: i for i, key in enumerate(predictions.keys)}
    example_rows = [
        report.Example(
            key=key,
            image=as_hwc(images[key]),
            label=int(predictions.labels[index[key]]),
            top=predictions.top10[index[key]].tolist(),
            probs=predictions.prob10[index[key]].tolist(),
        )
        for key in examples
    ]
    neighbour_rows = [
        report.NeighbourRow(
            query=report.Example(key=key, image=as_hwc(images[key]), label=int(predictions.labels[index[key]])),
            neighbours=[report.Example(n.key, as_hwc(n.image), n.label, distance=n.distance) for n in found],
        )
        for key, found in zip(query_keys, neighbours)
    ]
    train_count = manifest.split("train").count if "train" in manifest.splits else 0
    limit = config.neighbours_max_train
    scanned = f"all {train_count:,}" if limit is None or limit >= train_count else f"{limit:,} of the {train_count:,}"
    inputs = report.ReportInputs(
        metrics=metrics,
        classes=[dataclasses.asdict(c) for c in manifest.classes],
        labels=predictions.labels,
        top10=predictions.top10,
        model_config=dict(ckpt.get("model_config", {})),
        train_config=dict(ckpt.get("train_config", {})),
        switches=dict(ckpt.get("switches", {})),
        history=list(ckpt.get("history", [])),
        conv1=report.conv1_weights(ckpt["model"]),
        towers=int(ckpt["model_config"].get("towers", 2)),
        examples=example_rows,
        neighbours=neighbour_rows,
        submission_labels=id_kind,
        neighbours_scanned=scanned,
        checkpoint_manifest_sha256=(ckpt.get("data") or {}).get("manifest_sha256"),
        prepare_settings=dict(manifest.settings),
    )
    report.write_report(out, inputs)
