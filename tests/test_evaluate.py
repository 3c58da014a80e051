"""The evaluate stage: test-time patches, scores against brute force, exact counts, outputs, placements and ranks."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import TenCrop

from alexrepro.core.errors import EvaluationError, FormatError
from alexrepro.core.progress import NullProgress
from alexrepro.data.loader import LoaderSettings, ordered_loader
from alexrepro.data.shards.index import ShardIndex, iter_split
from alexrepro.data.shards.manifest import ClassInfo, Manifest, Sample, SplitInfo, read_manifest
from alexrepro.data.shards.writer import write_manifest, write_prepared_folder
from alexrepro.evaluate import stage as ev
from alexrepro.model import inference
from alexrepro.train.config import TrainConfig
from helpers.evaluate import (
    CROP,
    NUM_CLASSES,
    SIZE,
    VAL_IMAGES,
    evaluate_rank,
    free_port,
    save_tiny_checkpoint,
    tiny_checkpoint,
    tiny_classes,
    write_tiny_shards,
)

CONFIG = ev.EvaluateConfig(batch_size=4, devices="cpu", workers=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    shards = root / "shards"
    write_tiny_shards(shards)
    ckpt = tiny_checkpoint(shards)
    path = save_tiny_checkpoint(root / "checkpoint.pt", ckpt)
    return root, shards, path, ckpt


@pytest.fixture(scope="module")
def evaluated(data):
    root, shards, checkpoint, ckpt = data
    result = ev.evaluate(checkpoint, shards, root / "out", CONFIG, NullProgress())
    return result, root / "out"


def network(ckpt, devices=("cpu",)) -> inference.InferenceNetwork:
    return inference.InferenceNetwork(ckpt, list(devices))


# ---------------------------------------------------------------------------------------------------------------
# Patches and scores


def test_ten_views_equal_torchvision_tencrop():
    image = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8)
    ours = inference.ten_crop_views(image[None], CROP)[0]
    theirs = TenCrop(CROP)(image)
    assert ours.shape == (10, 3, CROP, CROP)
    for k in range(10):
        assert torch.equal(ours[k], theirs[k]), f"view {k} differs from TenCrop"


def test_mean_is_cut_like_the_image_and_mirrored_with_it(data):
    *_, ckpt = data
    patches = inference.TenCropPatches(ckpt["normalization"], CROP, torch.device("cpu"))
    mean = ckpt["normalization"]["mean_image"].permute(2, 0, 1)
    assert torch.equal(patches.mean_views, inference.ten_crop_views(mean[None], CROP)[0])


def test_centre_patch_is_what_training_validates_on(data):
    """Evaluation's 1-crop input equals the training loop's validation input, image for image."""
    from alexrepro.train.loop import make_preprocess
    from helpers.train import val_batches

    _, shards, _, ckpt = data
    net = network(ckpt)
    config = TrainConfig(crop=CROP, input_scale=ckpt["normalization"]["input_scale"])
    preprocess = make_preprocess(ckpt["normalization"], config, torch.device("cpu"), channels_last=False)
    val = {s.key: s for s in iter_split(shards, "val")}
    for batch in val_batches(shards, read_manifest(shards), CROP, batch_size=5, workers=0):
        ours = net.patches.centre(torch.stack([net.decode(val[key].jpeg) for key in batch.keys]))
        torch.testing.assert_close(ours, preprocess(batch, train=False), rtol=0, atol=1e-6)


def test_averaged_softmax_matches_a_manual_computation(data):
    *_, ckpt = data
    net = network(ckpt)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    averaged = net.ten_crop_probabilities(images).mean(dim=1)
    mean = ckpt["normalization"]["mean_image"].permute(2, 0, 1)
    scale = ckpt["normalization"]["input_scale"]
    for n in range(2):
        views = TenCrop(CROP)(images[n].float())
        mean_views = TenCrop(CROP)(mean)
        with torch.no_grad():
            softmaxes = [
                F.softmax(net.model(((v - m) * scale)[None]), dim=1)[0] for v, m in zip(views, mean_views, strict=True)
            ]
            manual = sum(softmaxes) / 10
        torch.testing.assert_close(averaged[n], manual, rtol=1e-5, atol=1e-6)


def test_topk_error_matches_brute_force():
    rng = np.random.default_rng(1)
    top = np.stack([rng.permutation(20)[:5] for _ in range(300)])
    labels = rng.integers(0, 20, size=300)
    for k in (1, 3, 5):
        wrong = 0
        for row, label in zip(top, labels, strict=True):
            wrong += label not in list(row[:k])
        assert ev.topk_error(top, labels, k) == pytest.approx(wrong / 300)


def test_running_nearest_matches_brute_force():
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    features = rng.normal(size=(57, 16)).astype(np.float32)
    nearest = ev.RunningNearest(torch.from_numpy(queries), k=6)
    images = torch.zeros(57, 3, 2, 2, dtype=torch.uint8)
    for start in range(0, 57, 8):  # batches of 8, the last one short
        end = min(start + 8, 57)
        nearest.update(
            torch.from_numpy(features[start:end]),
            [f"k{i:03d}" for i in range(start, end)],
            list(range(start, end)),
            images[start:end],
        )
    distances = np.sqrt(((queries[:, None, :].astype(np.float64) - features[None]) ** 2).sum(-1))
    for q in range(5):
        expected = np.argsort(distances[q])[:6]
        assert [n.label for n in nearest.best[q]] == expected.tolist()
        np.testing.assert_allclose([n.distance for n in nearest.best[q]], distances[q][expected], rtol=1e-5)


def test_readers_split_every_image_exactly_once(data):
    _, shards, *_ = data
    manifest = read_manifest(shards)
    index = ShardIndex.load(shards, manifest, "val")
    assert len(index.paths) == 3
    everything = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(VAL_IMAGES)]
    for world, workers in ((1, 0), (2, 2), (3, 0), (5, 2), (7, 0)):  # more readers than shards share the shards
        keys = [
            k
            for rank in range(world)
            for b in ordered_loader(index, None, LoaderSettings(4, workers, rank, world))
            for k in b.keys
        ]
        assert sorted(keys) == everything
    subset = ShardIndex.load(shards, manifest, "train").head(13)
    assert len(subset.paths) == 2 and sum(len(b.keys) for b in ordered_loader(subset, None, LoaderSettings(4))) == 13


# ---------------------------------------------------------------------------------------------------------------
# The stage


def read_predictions(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_match_brute_force_over_every_image(evaluated, data):
    result, out = evaluated
    *_, ckpt = data
    results = json.loads((out / "metrics.json").read_text())
    assert set(results) == {"1crop", "10crop"}  # results only; provenance in evaluation.json
    metrics = {**results, **json.loads((out / "evaluation.json").read_text())}
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["images"] == VAL_IMAGES
    assert metrics["checkpoint"]["epoch"] == 3 and len(metrics["checkpoint"]["sha256"]) == 64
    assert metrics["switches"] == json.loads(json.dumps(ckpt["switches"]))
    assert metrics["dataset"] == f"own data, {NUM_CLASSES} classes"
    assert metrics["data"]["size"] == SIZE and len(metrics["data"]["manifest_sha256"]) == 64

    rows = read_predictions(out)
    assert [r["key"] for r in rows] == [f"ILSVRC2012_val_{i + 1:08d}" for i in range(VAL_IMAGES)]
    for k, name in ((1, "top1_error"), (5, "top5_error")):
        wrong = sum(r["true_class"] not in [r[f"class{j}"] for j in range(1, k + 1)] for r in rows)
        assert metrics["10crop"][name] == pytest.approx(wrong / VAL_IMAGES)
    for row in rows:
        probs = [float(row[f"prob{j}"]) for j in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    with open(out / "per_class.csv", newline="") as handle:
        per_class = list(csv.DictReader(handle))
    assert [int(r["class"]) for r in per_class] == list(range(NUM_CLASSES))
    for r in per_class:
        mine = [row for row in rows if int(row["true_class"]) == int(r["class"])]
        assert int(r["images"]) == len(mine)
        if mine:
            wrong = sum(row["class1"] != row["true_class"] for row in mine)
            assert float(r["top1_error_10crop"]) == pytest.approx(wrong / len(mine))

    # Recompute every image's 10-crop and centre-crop top-5 directly from the shards.
    net = network(ckpt)
    wrong1 = 0
    for sample, row in zip(iter_split(data[1], "val"), rows, strict=True):
        probs = net.ten_crop_probabilities(net.decode(sample.jpeg)[None])[0]
        assert probs.mean(0).topk(5).indices.tolist() == [int(row[f"class{j}"]) for j in range(1, 6)]
        wrong1 += int(probs[inference.CENTRE_VIEW].argmax()) != sample.label
    assert metrics["1crop"]["top1_error"] == pytest.approx(wrong1 / VAL_IMAGES)


def test_submission_lists_ilsvrc_ids_in_file_name_order(evaluated):
    _, out = evaluated
    rows = read_predictions(out)
    lines = (out / "submission.txt").read_text().splitlines()
    assert len(lines) == VAL_IMAGES
    ids = {c.index: c.ilsvrc_id for c in tiny_classes()}
    for line, row in zip(lines, rows, strict=True):
        labels = line.split(" ")
        assert len(labels) == 5 and all(x.isdigit() for x in labels)
        assert [int(x) for x in labels] == [ids[int(row[f"class{j}"])] for j in range(1, 6)]


def test_submission_uses_class_indices_without_ilsvrc_ids(tmp_path):
    classes = tiny_classes(with_ids=False)
    manifest = replace(read_manifest_like(classes))
    predictions = ev.Predictions(
        ["b", "a"],
        np.array([0, 1]),
        np.array([[5, 4, 3, 2, 1], [0, 1, 2, 3, 4]]),
        np.full((2, 5), 0.2, np.float32),
        np.zeros((2, 5), np.int64),
    )
    merged = ev.Predictions.merge([predictions])
    assert ev.write_submission(tmp_path / "s.txt", merged, manifest) == "class index"
    assert (tmp_path / "s.txt").read_text() == "0 1 2 3 4\n5 4 3 2 1\n"


def read_manifest_like(classes):

    return Manifest(settings={}, classes=classes, splits={"val": SplitInfo(2, ())})


def test_report_files_are_written(evaluated):
    result, out = evaluated
    for path in (
        result.report_md,
        result.report_html,
        result.submission,
        result.predictions,
        out / "metrics.json",
        out / "per_class.csv",
    ):
        assert path.is_file() and path.stat().st_size > 0
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "conv1.png",
        "curves.png",
        "examples.png",
        "neighbours.png",
        "per_class.png",
    ]


def test_neighbours_match_brute_force_fc7_distances(evaluated, data):
    result, _ = evaluated
    _, shards, _, ckpt = data
    net = network(ckpt)
    train = list(iter_split(shards, "train"))
    images = torch.stack([net.decode(s.jpeg) for s in train])
    features = net.centre_features(images).numpy().astype(np.float64)
    assert result.neighbours, "no neighbours were computed"
    val = {s.key: s for s in iter_split(shards, "val")}
    for query_key, found in result.neighbours.items():
        query = net.centre_features(net.decode(val[query_key].jpeg)[None]).numpy()[0]
        distances = np.sqrt(((features - query) ** 2).sum(axis=1))
        assert found == [train[i].key for i in np.argsort(distances, kind="stable")[:6]]


def test_neighbour_scan_capped_by_default_takes_the_first_training_images_and_says_so(data, tmp_path):
    assert ev.EvaluateConfig().neighbours_max_train == 50000  # bounded by default; null scans every training image
    _, shards, checkpoint, _ = data
    result = ev.evaluate(checkpoint, shards, tmp_path / "out", replace(CONFIG, neighbours_max_train=3), NullProgress())
    first = [s.key for s in iter_split(shards, "train")][:3]
    assert result.neighbours and all(set(found) <= set(first) for found in result.neighbours.values())
    train = read_manifest(shards).split("train").count
    assert (
        f"among the first 3 (in the shuffled shard order, so a random subset; neighbours_max_train: null scans "
        f"all) of the {train:,} training images" in (tmp_path / "out" / "report.md").read_text()
    )


def test_manifest_count_mismatch_is_an_error(data, tmp_path):
    _, shards, checkpoint, _ = data
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = read_manifest(copy)
    val = manifest.splits["val"]
    write_manifest(copy, replace(manifest, splits={**manifest.splits, "val": replace(val, count=val.count + 1)}))
    with pytest.raises(FormatError, match=f"{VAL_IMAGES} samples do not match the counts in .*manifest.json"):
        ev.evaluate(checkpoint, copy, tmp_path / "out", replace(CONFIG, neighbours_max_train=0), NullProgress())
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_checkpoint_classes_must_match_the_manifest(data, tmp_path):
    _, shards, _, ckpt = data
    other = dict(ckpt, classes=[dict(c) for c in ckpt["classes"]])
    other["classes"][2]["wnid"] = "n09999999"
    path = save_tiny_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(EvaluationError, match="class 2 is n09999999 but .* has n01000002"):
        ev.evaluate(path, shards, tmp_path / "out", CONFIG, NullProgress())


def test_two_tower_placement_gives_the_same_probabilities(data):
    *_, ckpt = data
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    torch.testing.assert_close(
        network(ckpt, ("cpu", "cpu")).ten_crop_probabilities(images), network(ckpt).ten_crop_probabilities(images)
    )


def test_two_ranks_under_torchrun_agree_with_one_process(evaluated, data, tmp_path):
    import torch.multiprocessing as mp

    result, _ = evaluated
    root, shards, checkpoint, _ = data
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_port()
    procs = [
        context.Process(target=evaluate_rank, args=(r, 2, port, str(checkpoint), str(shards), str(tmp_path), queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    results = dict(queue.get() for _ in range(2))
    for rank in (0, 1):
        metrics, neighbours = results[rank]
        assert metrics["images"] == VAL_IMAGES
        assert metrics["10crop"] == pytest.approx(result.metrics["10crop"])
        assert metrics["1crop"] == pytest.approx(result.metrics["1crop"])
        assert neighbours == result.neighbours  # each rank scanned half the train split; the merge is exact
    assert (tmp_path / "submission.txt").read_text() == (evaluated[1] / "submission.txt").read_text()


def decided_checkpoint(ckpt: dict, path: Path, precision: str) -> Path:
    """The tiny checkpoint with fc8 scaled up, so that each image's top-1 class leads by a clear margin (the random
    net's probabilities are near uniform, where any rounding could swap the first two)."""
    sharp = {**ckpt, "model": dict(ckpt["model"]), "train_config": {**ckpt["train_config"], "precision": precision}}
    for key in ("fc8.weight", "fc8.bias"):
        sharp["model"][key] = ckpt["model"][key] * 200
    return save_tiny_checkpoint(path, sharp)


def agreement(reference: list[dict], other: list[dict], tolerance: float) -> None:
    """The same images, the same top-1 class for each, and every probability both list within `tolerance`."""
    assert [r["key"] for r in other] == [r["key"] for r in reference]
    margins = [float(r["prob1"]) - float(r["prob2"]) for r in reference]
    assert min(margins) > 4 * tolerance  # a decided set: a changed top-1 class would be a fault, not rounding
    assert [r["class1"] for r in other] == [r["class1"] for r in reference]
    for a, b in zip(reference, other, strict=True):
        pa = {a[f"class{j}"]: float(a[f"prob{j}"]) for j in range(1, 6)}
        pb = {b[f"class{j}"]: float(b[f"prob{j}"]) for j in range(1, 6)}
        assert all(abs(pa[c] - pb[c]) <= tolerance for c in pa.keys() & pb.keys()), (a["key"], pa, pb)


def test_a_decided_set_is_decided_the_same_way_twice(data, tmp_path):
    """The comparison the CUDA test makes, on the CPU: proves the fixed set is decided and the check can pass."""
    _, shards, _, ckpt = data
    checkpoint = decided_checkpoint(ckpt, tmp_path / "sharp.pt", "fp32")
    first = ev.evaluate(checkpoint, shards, tmp_path / "a", CONFIG, NullProgress())
    second = ev.evaluate(checkpoint, shards, tmp_path / "b", replace(CONFIG, batch_size=7), NullProgress())
    agreement(read_predictions(tmp_path / "a"), read_predictions(tmp_path / "b"), 1e-5)
    assert first.metrics["10crop"] == second.metrics["10crop"] and first.metrics["1crop"] == second.metrics["1crop"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "auto"])  # "auto": bf16 autocast on CUDA, as training ran
def test_cuda_matches_cpu(data, tmp_path, precision):
    """Every image of a fixed, decided set gets the same top-1 class on the GPU as on the CPU, and probabilities
    within bf16 rounding (8 significant bits: about 0.4% of a logit, so 0.02 on a probability is ample)."""
    _, shards, _, ckpt = data
    checkpoint = decided_checkpoint(ckpt, tmp_path / "sharp.pt", precision)
    on_cpu = ev.evaluate(checkpoint, shards, tmp_path / "cpu", CONFIG, NullProgress())
    on_gpu = ev.evaluate(checkpoint, shards, tmp_path / "gpu", replace(CONFIG, devices="cuda:0"), NullProgress())
    assert on_gpu.metrics["images"] == VAL_IMAGES
    agreement(read_predictions(tmp_path / "cpu"), read_predictions(tmp_path / "gpu"), 0.02)
    assert on_gpu.metrics["1crop"]["top1_error"] == on_cpu.metrics["1crop"]["top1_error"]
    assert on_gpu.metrics["10crop"]["top1_error"] == on_cpu.metrics["10crop"]["top1_error"]


def test_examples_show_misclassified_images_first_one_per_class():
    """The examples figure (the paper's Figure 4, left) shows where the network fails, not the first classes."""
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    top1 = np.array([0, 0, 1, 1, 2, 9, 3, 9, 4, 9])  # wrong: indices 5 (class 2), 7 (class 3), 9 (class 4)
    chosen = ev.pick_examples(labels, top1, 4)
    assert chosen[:2] == [5, 7]  # misclassified first, up to half
    assert chosen[2:] == [0, 2]  # then correct ones of classes not shown yet
    assert len(set(labels[chosen])) == 4
    assert sorted(ev.pick_examples(labels, top1, 20)) == list(range(10))  # too few images: every one, once


def test_torchvision_alexnet_is_evaluated_with_its_own_preprocessing(tmp_path):
    """`evaluate torchvision:alexnet-random` (torchvision's architecture, random weights: no download) runs the whole
    stage; its 1-crop input is torchvision's own eval transform of the 256-pixel image (CenterCrop(224), ToTensor,
    Normalize), so the published 43.45% / 20.91% can check this path on the real val set."""
    from torchvision import transforms
    from typer.testing import CliRunner

    from alexrepro.cli.app import app
    from alexrepro.data.shards.manifest import read_manifest
    from alexrepro.evaluate.reference import RANDOM, ReferenceNetwork, reference_checkpoint
    from helpers.images import jpeg_bytes

    shards = tmp_path / "shards"
    classes = tuple(ClassInfo(i, f"n0{i:07d}", None, f"class {i}") for i in range(3))
    rng = np.random.default_rng(0)
    samples = [Sample(f"ILSVRC2012_val_{i + 1:08d}", jpeg_bytes(rng.integers(0, 255, (256, 256, 3), np.uint8)), i % 3)
               for i in range(6)]  # fmt: skip
    write_prepared_folder(shards, classes, {"train": [samples[:3]], "val": [samples]}, {"size": 256})
    result = CliRunner().invoke(app, ["evaluate", RANDOM, str(shards), str(tmp_path / "out"), "--workers", "0",
                                      "--devices", "cpu", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    provenance = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert provenance["checkpoint"]["path"] == RANDOM and len(provenance["checkpoint"]["sha256"]) == 64

    ckpt = reference_checkpoint(RANDOM, read_manifest(shards))
    network = ReferenceNetwork(ckpt, ["cpu"], 256)
    image = network.decode(samples[0].jpeg)
    torchvision_way = transforms.Compose([transforms.CenterCrop(224), transforms.ConvertImageDtype(torch.float32),
                                          transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])  # fmt: skip
    with torch.inference_mode():
        expected = torch.softmax(network.model(torchvision_way(image)[None]), dim=1)[0]
    torch.testing.assert_close(network.ten_crop_probabilities(image[None])[0, 4], expected, rtol=1e-5, atol=1e-6)
