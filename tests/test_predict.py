"""`predict`: any image Pillow reads, the evaluation's patches, and a per-file error for what cannot be read."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from alexrepro.cli.app import app
from alexrepro.core.errors import ConfigError
from alexrepro.evaluate.predict import Prediction, PredictionError, load_image, predict
from alexrepro.model.inference import InferenceNetwork
from helpers.evaluate import NUM_CLASSES, image_array, save_tiny_checkpoint, tiny_checkpoint, write_tiny_shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    write_tiny_shards(root / "shards")
    ckpt = tiny_checkpoint(root / "shards")
    checkpoint = save_tiny_checkpoint(root / "checkpoint.pt", ckpt)
    rng = np.random.default_rng(5)
    files = {}
    # A wide PNG with transparency, a small grayscale JPEG (scaled up), a CMYK JPEG: all must be answered.
    files["wide.png"] = _encode(Image.fromarray(image_array(1, rng, 120)).resize((150, 70)).convert("RGBA"), "PNG")
    files["gray.jpg"] = _encode(Image.fromarray(image_array(2, rng, 50)).convert("L"), "JPEG")
    files["cmyk.jpg"] = _encode(Image.fromarray(image_array(3, rng, 90)).convert("CMYK"), "JPEG")
    files["broken.jpg"] = b"\xff\xd8\xff\xe0 this is not really a JPEG"
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, checkpoint, ckpt


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_good_images_are_answered_and_bad_ones_named(setup):
    root, checkpoint, ckpt = setup
    paths = [root / "wide.png", root / "missing.jpg", root / "gray.jpg", root / "broken.jpg", root / "cmyk.jpg", root]
    results = predict(checkpoint, paths, crops=10, device="cpu")
    assert [r.path for r in results] == paths
    assert [type(r) for r in results] == [
        Prediction,
        PredictionError,
        Prediction,
        PredictionError,
        Prediction,
        PredictionError,
    ]
    assert results[1].reason == "no such file"
    assert "not a readable image" in results[3].reason and "0x" not in results[3].reason
    assert "folder" in results[5].reason
    names = {c["index"]: c["name"] for c in ckpt["classes"]}
    for r in results[::2][:3]:
        assert len(r.classes) == 5 == len(set(r.classes)) and r.crops == 10
        assert r.probabilities == sorted(r.probabilities, reverse=True) and sum(r.probabilities) <= 1 + 1e-5
        assert r.names == [names[c] for c in r.classes]


def test_json_output_of_the_command_line(setup):
    """`alexrepro predict --json`: one object per file, in the order given, the failures included."""
    root, checkpoint, _ = setup
    paths = [root / "wide.png", root / "broken.jpg"]
    result = CliRunner().invoke(app, ["predict", str(checkpoint), *map(str, paths), "--json", "--devices", "cpu"])
    assert result.exit_code == 1  # a file could not be predicted
    printed = json.loads(result.stdout)
    expected = [r.to_dict() for r in predict(checkpoint, paths, crops=10, device="cpu")]
    assert [p["path"] for p in printed] == list(map(str, paths)) and printed[1] == expected[1]
    assert set(printed[1]) == {"path", "error"}
    assert printed[0]["crops"] == 10 and [t["class"] for t in printed[0]["top"]] == [
        t["class"] for t in expected[0]["top"]
    ]
    assert [t["probability"] for t in printed[0]["top"]] == pytest.approx(
        [t["probability"] for t in expected[0]["top"]]
    )


def test_probabilities_are_the_evaluation_path_on_the_prepared_image(setup):
    root, checkpoint, ckpt = setup
    network = InferenceNetwork(ckpt, ["cpu"])
    image = load_image(root / "wide.png", network, quality=90)
    assert image.shape == (3, network.size, network.size) and image.dtype == torch.uint8
    for crops, expected in (
        (10, network.ten_crop_probabilities(image[None]).mean(1)[0]),
        (1, network.centre_probabilities(image[None])[0]),
    ):
        [result] = predict(checkpoint, [root / "wide.png"], crops=crops, device="cpu", top_k=NUM_CLASSES)
        assert result.classes == expected.argsort(descending=True).tolist()
        np.testing.assert_allclose(result.probabilities, expected.sort(descending=True).values.numpy(), rtol=1e-5)


def test_crops_must_be_one_or_ten(setup):
    root, checkpoint, _ = setup
    with pytest.raises(ConfigError, match="--crops must be 1"):
        predict(checkpoint, [root / "wide.png"], crops=5, device="cpu")


def test_cli_refuses_other_crops_once_with_the_usage_exit_code(setup):
    root, checkpoint, _ = setup
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(root / "wide.png"), "--crops", "5"])
    assert result.exit_code == 2 and result.output.count("--crops must be 1") == 1


def test_a_missing_image_or_checkpoint_is_a_bad_argument(setup, tmp_path):
    """A mistyped path is exit 2 at once, before the checkpoint is loaded (the README's exit codes)."""
    root, checkpoint, _ = setup
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(root / "wide.png"), str(root / "missing.jpg")])
    assert result.exit_code == 2 and "missing.jpg does not exist" in result.stderr, result.stderr
    (tmp_path / "notes.md").write_text("# not a checkpoint\n")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "notes.md"), str(root / "wide.png")])
    assert result.exit_code == 2 and "is not a checkpoint" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and len(result.stderr) < 200, result.stderr
