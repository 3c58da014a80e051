"""Downstream stages trust nothing they read: each tamper below goes through the real command line and must end in
one line on stderr naming the file, and a non-zero exit."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alexrepro.cli.app import app
from alexrepro.data.shards.manifest import Sample, read_manifest
from alexrepro.data.shards.writer import write_manifest, write_shard
from helpers.evaluate import CROP, image_array, jpeg_bytes, save_tiny_checkpoint, tiny_checkpoint, write_tiny_shards

runner = CliRunner()
TRAIN = [
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--crop",
    str(CROP),
    "--width",
    "0.125",
    "--devices",
    "cpu",
    "--workers",
    "0",
    "--quiet",
]
EVALUATE = ["--set", "devices=cpu", "--set", "workers=0", "--set", "neighbours_max_train=0", "--quiet"]


def failure(args: list[str]) -> str:
    """Run `alexrepro ARGS`; it must fail with exactly one `error:` line on stderr, the last one, which is returned.

    Log lines the stage printed before it failed (a summary of what it did) may precede it."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def succeeds(args: list[str]) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Shards, their stats and a checkpoint that fits them, made once; each test tampers with a copy."""
    root = tmp_path_factory.mktemp("pristine")
    write_tiny_shards(root / "shards")
    succeeds(["stats", root / "shards", root / "stats", "--workers", "1", "--quiet"])
    save_tiny_checkpoint(root / "checkpoint.pt", tiny_checkpoint(root / "shards"))
    return root


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    return tmp_path


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data, indent=2))


def every_stage(root: Path) -> list[list]:
    return [
        ["stats", root / "shards", root / "new-stats", "--workers", "1", "--quiet"],
        ["train", root / "shards", root / "stats", root / "run", *TRAIN],
        ["evaluate", root / "checkpoint.pt", root / "shards", root / "reports", *EVALUATE],
    ]


def test_untouched_shards_pass_every_check(copy):
    succeeds(["evaluate", copy / "checkpoint.pt", copy / "shards", copy / "reports", *EVALUATE])


@pytest.mark.parametrize("split, readers", [("train", ("stats", "train")), ("val", ("train", "evaluate"))])
def test_a_flipped_byte_is_caught(copy, split, readers):
    flip_byte(copy / "shards" / f"{split}-000000.tar", 1500)  # inside the first JPEG; the size is unchanged
    for args in every_stage(copy):
        if args[0] in readers:  # (evaluate reads train shards only for Figure 4's neighbours, off here)
            assert f"{split}-000000.tar: its size or sha256 differs" in failure(args)
    if split == "train":  # evaluate reads train shards for Figure 4's neighbours, when they are on
        with_neighbours = ["evaluate", copy / "checkpoint.pt", copy / "shards", copy / "r2", *EVALUATE[:4], "--quiet"]
        assert "train-000000.tar: its size or sha256 differs" in failure(with_neighbours)


def test_an_edited_label_is_caught(copy):
    path = copy / "shards" / "train-000000.tar"
    data = path.read_bytes()
    at = data.index(b".cls\0") + 512  # the first .cls member's data block: one ASCII digit
    data = data[:at] + (b"1" if data[at : at + 1] != b"1" else b"2") + data[at + 1 :]
    path.write_bytes(data)
    for args in every_stage(copy)[:2]:
        assert "train-000000.tar: its size or sha256 differs" in failure(args)


def test_swapped_shards_are_caught(copy):
    a, b = copy / "shards" / "train-000000.tar", copy / "shards" / "train-000001.tar"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    for args in every_stage(copy)[:2]:
        assert "train-00000" in failure(args)


def test_a_zeroed_manifest_hash_is_caught(copy):
    edit_manifest(copy / "shards", lambda d: d["splits"]["train"]["shards"][1].update(sha256="0" * 64))
    assert "train-000001.tar: its size or sha256 differs" in failure(every_stage(copy)[0])
    # train also learns that its stats came from another manifest (this one changed) and says so first
    assert "computed from other shards" in failure(every_stage(copy)[1])


def test_a_shard_name_outside_the_folder_is_refused(copy):
    (copy / "outside.tar").write_bytes((copy / "shards" / "train-000000.tar").read_bytes())
    edit_manifest(copy / "shards", lambda d: d["splits"]["train"]["shards"][0].update(name="../outside.tar"))
    for args in every_stage(copy):
        assert "'splits.train.shards[0].name' is '../outside.tar', not a plain file name" in failure(args)


def test_a_wrongly_typed_manifest_field_is_one_line(copy):
    edit_manifest(copy / "shards", lambda d: d["splits"]["val"].update(count="14"))
    for args in every_stage(copy):
        assert "'splits.val.count' must be int, found str" in failure(args)


def test_a_label_out_of_range_names_the_shard_and_key(copy):
    shards = copy / "shards"
    manifest = read_manifest(shards)
    val = manifest.split("val")
    import numpy as np

    bad = [
        Sample(f"ILSVRC2012_val_{i + 1:08d}", jpeg_bytes(image_array(0, np.random.default_rng(i))), 99 if i == 2 else 0)
        for i in range(val.shards[0].count)
    ]
    info = write_shard(shards / "val-000000.tar", bad)  # as a faulty prepare would: manifest and index agree
    write_manifest(
        shards, replace(manifest, splits={**manifest.splits, "val": replace(val, shards=(info, *val.shards[1:]))})
    )
    line = failure(every_stage(copy)[2])
    assert "val-000000.tar: sample ILSVRC2012_val_00000003: class b'99' is not one of the manifest's 6" in line


def test_train_refuses_stats_of_other_shards(copy):
    write_tiny_shards(copy / "other", seed=1)
    succeeds(["stats", copy / "other", copy / "other-stats", "--workers", "1", "--quiet"])
    line = failure(["train", copy / "shards", copy / "other-stats", copy / "run", *TRAIN])
    assert "other-stats/stats.json: computed from other shards" in line and "alexrepro stats" in line


def test_stats_into_a_folder_of_other_stats_needs_overwrite(copy):
    write_tiny_shards(copy / "other", seed=1)
    before = (copy / "stats" / "stats.npz").read_bytes()
    line = failure(["stats", copy / "other", copy / "stats", "--workers", "1", "--quiet"])
    assert "other shards or settings" in line and "--overwrite" in line
    assert (copy / "stats" / "stats.npz").read_bytes() == before  # nothing replaced
    succeeds(["stats", copy / "other", copy / "stats", "--workers", "1", "--quiet", "--overwrite"])


def test_a_failed_prepare_leaves_no_manifest_that_downstream_accepts(tmp_path):
    from helpers.evaluate import SIZE

    for split, names in (("train", ["a", "b", "broken"]), ("val", ["c"])):
        folder = tmp_path / "source" / split / "n00000001"
        folder.mkdir(parents=True)
        for name in names:
            data = (
                b"not an image"
                if name == "broken"
                else jpeg_bytes(image_array(0, __import__("numpy").random.default_rng(0)))
            )
            (folder / f"{name}.JPEG").write_bytes(data)
    line = failure(
        [
            "prepare",
            tmp_path / "source",
            tmp_path / "shards",
            "--size",
            SIZE,
            "--workers",
            "1",
            "--max-rejected",
            "0",
            "--quiet",
        ]
    )
    assert "max_rejected=0" in line
    assert len(read_manifest(tmp_path / "shards", allow_failed=True).rejected) == 1  # the list stays readable
    line = failure(["stats", tmp_path / "shards", tmp_path / "stats", "--workers", "1", "--quiet"])
    assert "prepare did not succeed (1 images rejected, more than max_rejected=0)" in line
