"""The `evaluate` stage: the paper's 10-crop test (§4.1) over the validation shards, and the ILSVRC-style report.

Each validation image is decoded once; its ten patches (four corners and the centre at the model's crop size, and
their horizontal reflections, in `torchvision.transforms.TenCrop` order) go through the network in one batch and their
softmax outputs are averaged. The centre patch alone (view 4) gives the 1-crop result from the same forward pass.
Patches are preprocessed exactly as in training: the per-pixel mean image cropped at the same offset (and mirrored
with the reflection) is subtracted and the result multiplied by the checkpoint's `input_scale` (alexrepro.model.inference).

Every validation image is counted exactly once, on one device, on two (the two-tower placement) or split across
`torchrun` ranks (predictions gathered on every rank); a count that differs from the manifest is an EvaluationError.
Shards are read through the loader by offset; each shard read is checked against the manifest's sha256 once per OUT
folder (alexrepro.data.shards.verify_shards).

Outputs in OUT (all written atomically, rewritten whole; only rank 0 writes):
    metrics.json      1-crop and 10-crop top-1/top-5 error (fractions): results only, for `dvc metrics`
    evaluation.json   image count, dataset, checkpoint and data identity (manifest sha256, prepared image size), switches
    submission.txt    ILSVRC task-1 file: one line per val image in file-name order, five labels, most confident first
    predictions.csv   key, true class, 10-crop top-5 classes and probabilities
    per_class.csv     every class's 10-crop and 1-crop top-1/top-5 error
    report.md, report.html, figures/*.png   (see alexrepro.evaluate.report)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from alexrepro.core.atomic import atomic_write_text
from alexrepro.core.errors import EvaluationError
from alexrepro.core.files import sha256_file
from alexrepro.core.locking import output_lock, reported_write_errors
from alexrepro.core.progress import Progress
from alexrepro.core.signals import stop_at_once
from alexrepro.core.workers import worker_count
from alexrepro.data.loader import (
    JpegDecoder,
    LoaderSettings,
    decode_sample,
    one_line_run_failures,
    ordered_loader,
    split_index,
    verified_index,
)
from alexrepro.data.shards.index import ShardIndex, ShardReader
from alexrepro.data.shards.manifest import MANIFEST_NAME, Manifest, manifest_sha256, read_manifest
from alexrepro.data.shards.verify import verify_shards
from alexrepro.evaluate.config import EvaluateConfig
from alexrepro.evaluate.reference import ReferenceNetwork, is_reference, reference_checkpoint
from alexrepro.model.distributed import Ranks, distributed_ranks, ranks_from_env
from alexrepro.model.inference import CENTRE_VIEW, InferenceNetwork

TOP_K = 5  # ILSVRC scores five guesses per image (REFERENCE.md §5)
EXAMPLE_IMAGES = 8  # validation images shown with their top-5 (the paper's Figure 4, left)
NEIGHBOUR_QUERIES = 5  # validation images whose nearest training images are shown (Figure 4, right)
NEIGHBOURS = 6  # training images per query, as in Figure 4


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


def _all_gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` when not distributed)."""
    if not ranks.distributed:
        return [obj]
    gathered: list[Any] = [None] * ranks.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# --------------------------------------------------------------------------------------------------------------
# Reading shards: through the loader (alexrepro.data.loader), which reads by offset with the index prepare persisted


def _loader(
    index: ShardIndex, ranks: Ranks, network: InferenceNetwork | ReferenceNetwork, config: EvaluateConfig
) -> DataLoader:
    """Whole images of `index`, each exactly once across ranks and workers; `batch_size` images per rank batch."""
    settings = LoaderSettings(
        config.batch_size * ranks.world_size,
        _workers(config),
        ranks.rank,
        ranks.world_size,
        pin_memory=network.device.type == "cuda",
        decoder=network.decoder,
    )
    return ordered_loader(index, None, settings)


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
    def merge(cls, pieces: Sequence[Predictions]) -> Predictions:
        keys = [key for p in pieces for key in p.keys]
        order = sorted(range(len(keys)), key=keys.__getitem__)

        def cat(name):
            return np.concatenate([getattr(p, name) for p in pieces])[order]

        return cls([keys[i] for i in order], cat("labels"), cat("top10"), cat("prob10"), cat("top1"))


def check_classes(checkpoint_classes: list[dict], manifest: Manifest, checkpoint: Path, shards: Path) -> None:
    """The network's outputs must mean the manifest's classes: same count, same WNID at every index."""
    mine = [c["wnid"] for c in checkpoint_classes]
    theirs = [c.wnid for c in manifest.classes]
    if len(mine) != len(theirs):
        raise EvaluationError(
            f"{checkpoint} was trained on {len(mine)} classes but {shards / MANIFEST_NAME} has "
            f"{len(theirs)}; evaluate on the shards it was trained on"
        )
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if a != b:
            raise EvaluationError(
                f"{checkpoint}: class {index} is {a} but {shards / MANIFEST_NAME} has {b} there; "
                "evaluate on the shards it was trained on"
            )


def dataset_name(manifest: Manifest) -> str:
    """How the report names the data: ILSVRC-2012 only when it has ILSVRC-2012's 1000 classes and 50,000 val images."""
    classes = manifest.num_classes
    if classes == 1000 and manifest.split("val").count == 50_000:
        return "ILSVRC-2012 val"
    # No count of images here: the report and the result line give it once, beside the name.
    if _is_builtin_sample(manifest):
        return f"built-in sample, {classes} classes"
    return f"own data, {classes} classes"


def _is_builtin_sample(manifest: Manifest) -> bool:
    """The built-in miniature's WNIDs start with n2 and can never be real WordNet synsets (alexrepro.synth.ilsvrc)."""
    from alexrepro.synth.ilsvrc import is_builtin_sample

    return is_builtin_sample({c.wnid for c in manifest.classes})


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
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)
            ]
            self.best[q] = merge_nearest([self.best[q], fresh], self.k)


def merge_nearest(lists: Sequence[Sequence[Neighbour]], k: int) -> list[Neighbour]:
    return sorted((n for lst in lists for n in lst), key=lambda n: (n.distance, n.key))[:k]


def nearest_training_images(
    network: InferenceNetwork | ReferenceNetwork,
    queries: torch.Tensor,
    shards_dir: Path,
    manifest: Manifest,
    config: EvaluateConfig,
    ranks: Ranks,
    progress: Progress,
    out: Path,
) -> list[list[Neighbour]]:
    """For each query image (Q×3×S×S uint8), the NEIGHBOURS training images nearest in fc7 space.

    Streams the train shards (the first `config.neighbours_max_train` images in stored order, a random subset since
    train shards are shuffled), split across ranks and workers, keeping only a running top-k per query.
    """
    nearest = RunningNearest(network.centre_features(queries))
    index = split_index(shards_dir, manifest, "train").head(config.neighbours_max_train)
    verify_shards(index, out, max(1, _workers(config)), (ranks.rank, ranks.world_size), progress)  # only those it reads
    progress.start("nearest training images (fc7)", math.ceil(len(index) / ranks.world_size))
    for batch in _loader(index, ranks, network, config):
        nearest.update(network.centre_features(batch.images), batch.keys, batch.labels.tolist(), batch.images)
        progress.advance(len(batch.keys))
    progress.finish()
    gathered = _all_gather(nearest.best, ranks)
    return [merge_nearest([g[q] for g in gathered], NEIGHBOURS) for q in range(len(queries))]


def fetch_images(index: ShardIndex, keys: Sequence[str], decode: JpegDecoder) -> dict[str, torch.Tensor]:
    """Decode the samples named `keys`, found by the index and read by offset."""
    wanted = set(keys)
    with ShardReader(index) as reader:
        return {index.key(i): decode_sample(decode, reader.jpeg(i), index, i) for i in range(len(index))
                if index.key(i) in wanted}  # fmt: skip


def pick_examples(labels: np.ndarray, top1: np.ndarray, n: int) -> list[int]:
    """Indices of `n` images for the examples figure, as the paper's Figure 4 shows them: the misclassified first
    (up to half, so that the figure shows where the network fails), then correctly classified ones; each group in
    file-name order, one image per true class while classes last, then any."""
    wrong = [i for i in range(len(labels)) if top1[i] != labels[i]]
    right = [i for i in range(len(labels)) if top1[i] == labels[i]]
    chosen: list[int] = []
    seen: set[int] = set()

    def take(candidates: list[int], limit: int, distinct: bool) -> None:
        for i in candidates:
            if len(chosen) >= limit:
                return
            if i in chosen or (distinct and int(labels[i]) in seen):
                continue
            chosen.append(i)
            seen.add(int(labels[i]))

    take(wrong, n // 2, distinct=True)
    take(right, n, distinct=True)
    take(wrong, n, distinct=True)
    take(wrong + right, n, distinct=False)
    return chosen


# --------------------------------------------------------------------------------------------------------------
# The stage


def evaluate(checkpoint: Path, shards: Path, out: Path, config: EvaluateConfig, progress: Progress) -> EvaluateResult:
    """Score a checkpoint on the validation shards (1-crop and 10-crop) and write metrics, submission and report."""
    checkpoint, shards, out = Path(checkpoint), Path(shards), Path(out)
    # One run per report folder; under torchrun rank 0 alone holds the lock (see train()).
    with output_lock(out, "evaluate") if ranks_from_env().rank == 0 else contextlib.nullcontext():
        failures = one_line_run_failures(
            lambda: f"{out / 'metrics.json'} was not written",
            memory_fix="rerun with a smaller --batch-size",
            worker_fix="rerun, with fewer --workers or a smaller --batch-size if memory is short",
        )
        # a full disk, a read-only folder: one line naming the path
        # SIGTERM (a scheduler) or SIGINT (Ctrl-C) stop evaluate at once; nothing is left that looks complete:
        # metrics.json, written last, is not there. The loader's workers ignore both (alexrepro.data.loader).
        not_written = lambda name: f"{out / 'metrics.json'} was not written: rerun the same command"  # noqa: E731
        with stop_at_once(not_written), failures, reported_write_errors(out):
            return _evaluate_locked(checkpoint, shards, out, config, progress)


def _evaluate_locked(checkpoint: Path, shards: Path, out: Path, config: EvaluateConfig, progress: Progress):
    from alexrepro.model.checkpoint import load_checkpoint

    manifest = read_manifest(shards)
    reference = is_reference(checkpoint)  # torchvision's pretrained AlexNet, a known result (evaluate.reference)
    ckpt = reference_checkpoint(str(checkpoint), manifest) if reference else load_checkpoint(checkpoint)
    check_classes(ckpt["classes"], manifest, checkpoint, shards)

    with distributed_ranks(config.devices, int(ckpt["model_config"].get("towers", 2))) as (ranks, devices):
        network: InferenceNetwork | ReferenceNetwork
        if reference:
            network = ReferenceNetwork(ckpt, devices, int(manifest.settings.get("size") or 256))
        else:
            network = InferenceNetwork(ckpt, devices, str(checkpoint))
        prepared_size = manifest.settings.get("size")
        if prepared_size is not None and int(prepared_size) != network.size:
            raise EvaluationError(
                f"{shards / MANIFEST_NAME}: images are {prepared_size}×{prepared_size} but the checkpoint's "
                f"mean image is {network.size}×{network.size}; evaluate on shards prepared with --size {network.size}"
            )

        val_index = verified_index(
            shards, manifest, "val", out, _workers(config), (ranks.rank, ranks.world_size), progress
        )
        mine = _score_split(network, val_index, manifest, config, ranks, progress)
        predictions = Predictions.merge(_all_gather(mine, ranks))
        _check_count(predictions, manifest.split("val").count, manifest.num_classes, shards)

        guesses = predictions.top10[:, 0]  # 10-crop top guess
        examples = [predictions.keys[i] for i in pick_examples(predictions.labels, guesses, EXAMPLE_IMAGES)]
        images = fetch_images(val_index, examples, network.decode)
        query_keys = examples[:NEIGHBOUR_QUERIES]
        neighbours: list[list[Neighbour]] = []
        if config.neighbours_max_train != 0 and query_keys and "train" in manifest.splits:
            queries = torch.stack([images[k] for k in query_keys])
            neighbours = nearest_training_images(network, queries, shards, manifest, config, ranks, progress, out)

    metrics = _metrics(predictions, checkpoint, ckpt, shards, manifest)
    result = EvaluateResult(
        metrics=metrics,
        report_md=out / "report.md",
        report_html=out / "report.html",
        submission=out / "submission.txt",
        predictions=out / "predictions.csv",
        # `neighbours` is empty when the scan is off (neighbours_max_train: 0): then there are no rows.
        neighbours={key: [n.key for n in found] for key, found in zip(query_keys, neighbours, strict=False)},
    )
    if ranks.rank != 0:
        return result

    progress.start("writing report", None)
    # The outputs of one evaluation appear together or not at all: they are written into a staging folder inside
    # OUT and moved into place only once every one is written, metrics.json last. A failure (a full disk, a signal)
    # leaves the earlier evaluation's set as it was; a stale staging folder of a killed run is removed.
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir()
    try:
        id_kind = write_submission(staging / "submission.txt", predictions, manifest)
        write_predictions_csv(staging / "predictions.csv", predictions, manifest)
        write_per_class_csv(staging / "per_class.csv", predictions, manifest)
        _write_report(staging, predictions, metrics, ckpt, manifest, images, examples, query_keys, neighbours, id_kind,
                      config)  # fmt: skip
        # metrics.json holds results only (what `dvc metrics` and `dvc exp show` list); the provenance (image count,
        # dataset, checkpoint and data identity, switches) goes to evaluation.json, which DVC does not read as
        # metrics.
        provenance = {k: v for k, v in metrics.items() if k not in RESULT_KEYS}
        atomic_write_text(staging / "evaluation.json", json.dumps(provenance, indent=2) + "\n")
        results = {k: metrics[k] for k in RESULT_KEYS}
        atomic_write_text(staging / "metrics.json", json.dumps(results, indent=2) + "\n")
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress.finish()
    progress.log(result_line(out))
    return result


STAGING_PREFIX = ".evaluate-staging-"


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace the earlier evaluation's outputs by the staged ones: metrics.json goes first (so that nothing looks
    complete while files move) and comes back last; each file and the figures folder move by rename."""
    (out / "metrics.json").unlink(missing_ok=True)
    names = sorted(p.name for p in staging.iterdir() if p.name != "metrics.json")
    for name in [*names, "metrics.json"]:
        target = out / name
        if (staging / name).is_dir():  # figures/: the old folder aside, the new one in, the old one gone
            old = out / f"{STAGING_PREFIX}old-{name}"
            if target.exists():
                os.replace(target, old)
            os.replace(staging / name, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging / name, target)


def result_line(out: Path) -> str:
    """One line of what an evaluation in `out` found, read from the files it wrote (metrics.json, evaluation.json):
    printed at the end of `evaluate` and of scripts/demo.sh."""
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    provenance = json.loads((Path(out) / "evaluation.json").read_text())
    return (
        f"{provenance['images']:,} images ({provenance['dataset']}): 10-crop top-1 "
        f"{metrics['10crop']['top1_error']:.2%}, top-5 {metrics['10crop']['top5_error']:.2%}; 1-crop top-1 "
        f"{metrics['1crop']['top1_error']:.2%}, top-5 {metrics['1crop']['top5_error']:.2%}"
    )


def _workers(config: EvaluateConfig) -> int:
    return worker_count(config.workers, most=8, least=0)  # DataLoader workers: 0 decodes in this process


def _score_split(
    network: InferenceNetwork | ReferenceNetwork,
    index: ShardIndex,
    manifest,
    config: EvaluateConfig,
    ranks: Ranks,
    progress: Progress,
) -> Predictions:
    """This rank's share of the validation split, scored: top-k of the 10-crop average and of the centre patch."""
    k = min(TOP_K, manifest.num_classes)
    keys: list[str] = []
    # Filled in place rather than appended batch by batch: a few small arrays kept from every batch, between the
    # batch's large temporaries, stopped the allocator from reusing their memory, and the process grew by ~5 MB per
    # batch (2.8 GB for 50,000 images, measured; docs/benchmarks.md, Scale). This rank gets at most len(index).
    labels = np.zeros(len(index), np.int64)
    top10, top1 = np.zeros((len(index), k), np.int64), np.zeros((len(index), k), np.int64)
    prob10 = np.zeros((len(index), k), np.float32)
    filled = 0
    progress.start("evaluating (10 patches per image)", math.ceil(len(index) / ranks.world_size))
    for batch in _loader(index, ranks, network, config):
        batch_keys, batch_labels, images = batch.keys, batch.labels, batch.images
        network.check_size(images, str(Path(index.paths[0]).parent))
        probs = network.ten_crop_probabilities(images)  # N×10×K
        p10, i10 = probs.mean(dim=1).topk(k, dim=1)
        i1 = probs[:, CENTRE_VIEW].topk(k, dim=1).indices
        rows = slice(filled, filled + len(batch_keys))
        keys.extend(batch_keys)
        labels[rows] = batch_labels.numpy()
        top10[rows], prob10[rows], top1[rows] = i10.cpu().numpy(), p10.cpu().numpy(), i1.cpu().numpy()
        filled = rows.stop
        progress.advance(len(batch_keys))
    progress.finish()
    return Predictions(
        keys, labels[:filled].copy(), top10[:filled].copy(), prob10[:filled].copy(), top1[:filled].copy()
    )


def _check_count(predictions: Predictions, expected: int, num_classes: int, shards: Path) -> None:
    if expected == 0:
        raise EvaluationError(f"{shards / MANIFEST_NAME} lists no val images; prepare a source with a val split")
    seen = len(predictions.keys)
    unique = len(set(predictions.keys))
    if seen != expected or unique != seen:
        duplicates = f" ({seen - unique} keys seen twice)" if unique != seen else ""
        raise EvaluationError(
            f"{shards / MANIFEST_NAME} promises {expected:,} val images but evaluation saw {seen:,}"
            f"{duplicates}; the shards do not match their manifest: rerun `alexrepro prepare`"
        )
    if seen and (predictions.labels.min() < 0 or predictions.labels.max() >= num_classes):
        raise EvaluationError(f"{shards}: a val label lies outside 0–{num_classes - 1}; rerun `alexrepro prepare`")


RESULT_KEYS = ("1crop", "10crop")  # what metrics.json holds: top-1/top-5 error (fractions) per protocol


def _metrics(predictions: Predictions, checkpoint: Path, ckpt: dict, shards: Path, manifest) -> dict[str, Any]:
    labels = predictions.labels

    def scores(top):
        return {"top1_error": topk_error(top, labels, 1), "top5_error": topk_error(top, labels, TOP_K)}

    return {
        "1crop": scores(predictions.top1),
        "10crop": scores(predictions.top10),
        "images": len(predictions.keys),
        "dataset": dataset_name(manifest),
        "checkpoint": {
            "path": str(checkpoint),
            "sha256": ckpt["sha256"] if "reference" in ckpt else sha256_file(checkpoint),  # the weights' own hash
            "epoch": int(ckpt["epoch"]),
        },
        "data": {"manifest_sha256": manifest_sha256(shards), "size": manifest.settings.get("size")},
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


def submission_ids(manifest: Manifest) -> tuple[list[int], str]:
    """The label written for each class index: ILSVRC2012_IDs when every class has one, else the index itself."""
    ids = [c.ilsvrc_id for c in manifest.classes]
    known = [i for i in ids if i is not None]
    if ids and len(known) == len(ids):
        return known, "ILSVRC2012_ID"
    return [c.index for c in manifest.classes], "class index"


def write_submission(path: Path, predictions: Predictions, manifest: Manifest) -> str:
    """ILSVRC task-1 format (REFERENCE.md §5): one line per image in file-name order, guesses most confident first."""
    ids, kind = submission_ids(manifest)
    lines = (" ".join(str(ids[c]) for c in row) for row in predictions.top10.tolist())
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return kind


def write_predictions_csv(path: Path, predictions: Predictions, manifest: Manifest) -> None:
    k = predictions.top10.shape[1]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["key", "true_class", "true_wnid"]
    for j in range(1, k + 1):
        header += [f"class{j}", f"prob{j}"]
    writer.writerow(header)
    for key, label, top, prob in zip(
        predictions.keys,
        predictions.labels.tolist(),
        predictions.top10.tolist(),
        predictions.prob10.tolist(),
        strict=True,
    ):
        row: list[Any] = [key, label, manifest.classes[label].wnid]
        for c, p in zip(top, prob, strict=True):
            row += [c, f"{p:.6f}"]
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def write_per_class_csv(path: Path, predictions: Predictions, manifest: Manifest) -> None:
    """Every class's 10-crop and 1-crop error (the report shows only the best and worst)."""
    from alexrepro.evaluate.report import per_class_error

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
    from alexrepro.evaluate import report
    from alexrepro.evaluate.claims import read_measured

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
        for key, found in zip(query_keys, neighbours, strict=False)  # no rows when the scan was off
    ]
    train_count = manifest.split("train").count if "train" in manifest.splits else 0
    limit = config.neighbours_max_train
    scanned = (
        f"all {train_count:,}"
        if limit is None or limit >= train_count
        else f"the first {limit:,} (in the shuffled shard order, so a random subset; neighbours_max_train: null "
        f"scans all) of the {train_count:,}"
    )
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
        measured_claims=read_measured(Path(config.claims_table)) if config.claims_table else {},
    )
    report.write_report(out, inputs)
