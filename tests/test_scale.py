"""ILSVRC-2012's shape at a small scale: `sample --scale` writes the real class structure, and `prepare` takes it whole.

Hundreds of classes with a few images each, through the real CLI: the same code path that the full count runs
(1000 classes, 1,281,167 + 50,000 images; see `alexrepro bench scale` and docs/benchmarks.md).
"""

import gzip
import io
import tarfile
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from alexrepro.cli.app import app
from alexrepro.core.progress import NullProgress
from alexrepro.data.shards.manifest import read_manifest
from alexrepro.synth.config import ScaleConfig
from alexrepro.synth.ilsvrc import (
    DEVKIT_ARCHIVE,
    GROUND_TRUTH_MEMBER,
    ILSVRC_TRAIN_IMAGES,
    META_MEMBER,
    TRAIN_ARCHIVE,
    VAL_ARCHIVE,
)
from alexrepro.synth.scale import ilsvrc_train_counts, scale_classes, write_scaled_sample

CLASSES = 300
SCALE = "1/512"  # 2–3 train images per class, 1 val image per class


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaled")
    result = CliRunner().invoke(
        app, ["sample", str(out), "--scale", SCALE, "--classes", str(CLASSES), "--quiet"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return out


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def devkit(out) -> dict[str, bytes]:
    return members(gzip.decompress((out / DEVKIT_ARCHIVE).read_bytes()))


def test_per_class_counts_have_the_real_spread_and_total():
    counts = ilsvrc_train_counts()
    assert len(counts) == 1000
    assert sum(counts) == ILSVRC_TRAIN_IMAGES == 1_281_167
    assert (min(counts), max(counts)) == (732, 1300)
    full = ScaleConfig(scale=Fraction(1))
    assert [c.train_count for c in scale_classes(full)] == list(counts)
    assert full.val_count_per_class * full.classes == 50_000


def test_outer_train_tar_holds_one_inner_tar_per_class_with_the_scaled_counts(download):
    classes = scale_classes(ScaleConfig(scale=Fraction(SCALE), classes=CLASSES))
    inner = members((download / TRAIN_ARCHIVE).read_bytes())
    assert list(inner) == sorted(f"{c.info.wnid}.tar" for c in classes)  # sorted WNID order, as in the real tar
    counts = {name.removesuffix(".tar"): len(members(data)) for name, data in inner.items()}
    assert counts == {c.info.wnid: max(1, round(ilsvrc_train_counts()[c.info.ilsvrc_id - 1] / 512)) for c in classes}
    assert {2, 3} <= set(counts.values()) <= {1, 2, 3}  # 1300/512 rounds to 3, short classes to 2 or 1


def test_meta_mat_has_leaves_out_of_sorted_order_and_internal_nodes(download):
    synsets = scipy.io.loadmat(io.BytesIO(devkit(download)[META_MEMBER]), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s["num_children"]) == 0]
    internal = [s for s in synsets if int(s["num_children"]) > 0]
    assert [int(s["ILSVRC2012_ID"]) for s in leaves] == list(range(1, CLASSES + 1))
    wnids = [str(s["WNID"]) for s in leaves]
    assert len(set(wnids)) == CLASSES and wnids != sorted(wnids)
    assert internal and all(int(s["ILSVRC2012_ID"]) > CLASSES for s in internal)
    root = max(internal, key=lambda s: int(s["wordnet_height"]))
    assert int(root["num_train_images"]) == sum(int(s["num_train_images"]) for s in leaves)
    children = {int(c) for s in internal for c in np.atleast_1d(s["children"])}
    assert set(range(1, CLASSES + 1)) <= children  # every leaf hangs under an internal node


def test_val_ground_truth_gives_each_class_its_share_and_the_tar_is_out_of_name_order(download):
    truth = [int(line) for line in devkit(download)[GROUND_TRUTH_MEMBER].decode().split()]
    assert Counter(truth) == {i: 1 for i in range(1, CLASSES + 1)}  # max(1, round(50/512)) = 1 per class
    names = list(members((download / VAL_ARCHIVE).read_bytes()))
    assert sorted(names) == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, CLASSES + 1)]
    assert names != sorted(names)


def test_prepare_takes_every_image_and_class(download, tmp_path):
    shards = tmp_path / "shards"
    result = CliRunner().invoke(
        app,
        ["prepare", str(download), str(shards), "--size", "32", "--workers", "1", "--quiet"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(shards)
    classes = scale_classes(ScaleConfig(scale=Fraction(SCALE), classes=CLASSES))
    assert manifest.num_classes == CLASSES
    assert manifest.split("train").count == sum(c.train_count for c in classes)
    assert manifest.split("val").count == CLASSES
    assert not manifest.rejected  # the PNG, CMYK and grayscale files are read, not rejected
    by_wnid = {c.info.wnid: c.info.ilsvrc_id for c in classes}
    assert {c.wnid: c.ilsvrc_id for c in manifest.classes} == by_wnid


def test_same_seed_gives_identical_archives_whatever_the_worker_count(tmp_path):
    config = ScaleConfig(scale=Fraction(1, 256), classes=12, seed=3, workers=1)
    one = write_scaled_sample(tmp_path / "one", config, NullProgress())
    two = write_scaled_sample(tmp_path / "two", ScaleConfig(**{**config.__dict__, "workers": 2}), NullProgress())
    for key in ("train", "val", "devkit"):
        assert one.paths[key].read_bytes() == two.paths[key].read_bytes()
    assert sorted(one.odd_files.values()) == ["cmyk", "cmyk", "gray", "png"]


@pytest.mark.parametrize("scale", ["0", "2", "x/3", "1/0"])
def test_bad_scale_is_a_one_line_error(tmp_path, scale):
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "out"), "--scale", scale, "--quiet"])
    assert result.exit_code == 2  # a bad flag is a usage error
    assert "--scale" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--train-per-class", "3"], ["--set", "seed=1"]])
def test_settings_that_scale_decides_are_refused(tmp_path, extra):
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "out"), "--scale", "1/8", *extra, "--quiet"])
    assert result.exit_code == 2
    assert "--scale" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_bench_runs_a_stage_as_a_subprocess_and_measures_it(tmp_path):
    from alexrepro.bench.scale import run_stage

    out = tmp_path / "download"
    args = ["sample", str(out), "--scale", "1/512", "--classes", "3", "--seed", "1"]
    measure = run_stage("sample", "1/512", args, out, images=9, first_file="ILSVRC2012_devkit_t12.tar.gz")
    assert measure.rc == 0
    written = sum(f.stat().st_size for f in out.iterdir())
    assert measure.disk_mb == pytest.approx(written / 1e6)
    assert measure.peak_main_mb > 0 and measure.peak_tree_mb >= measure.peak_main_mb
    assert measure.first_s is None or 0 < measure.first_s <= measure.wall_s


def test_bench_scale_refuses_a_class_count_out_of_range(tmp_path):
    result = CliRunner().invoke(app, ["bench", "scale", "--classes", "2", "--work", str(tmp_path / "work")])
    assert result.exit_code == 2
    assert "classes" in result.output and "Traceback" not in result.output


def test_prepare_killed_with_signal_9_resumes_to_the_same_bytes_without_starting_over(download, tmp_path):
    """What `alexrepro bench scale --kill-resume` does at 1/64 … 1: the same functions, at a small scale."""
    from alexrepro.bench.scale import run_stage, same_output

    common = ["--size", "32", "--shard-size", "5", "--workers", "1"]
    reference, again = tmp_path / "reference", tmp_path / "again"
    images = sum(c.train_count for c in scale_classes(ScaleConfig(scale=Fraction(SCALE), classes=CLASSES))) + CLASSES
    assert run_stage("prepare", SCALE, ["prepare", str(download), str(reference), *common], reference, images).rc == 0
    killed = run_stage(
        "prepare killed",
        SCALE,
        ["prepare", str(download), str(again), *common],
        again,
        images,
        kill_at_files=("train-*.tar", 3),
    )
    assert killed.rc == -9 and not (again / "manifest.json").exists()
    finished = {p.name.removesuffix(".json") for p in (again / ".prepare").glob("train-*.tar.json")}
    assert finished  # some shards were complete when it died
    kept = {name: (again / name).stat().st_mtime_ns for name in finished}
    assert (again / ".prepare" / "listing-ILSVRC2012_img_train.tar.npz").is_file()  # saved before the first shard
    resumed = run_stage("prepare resumed", SCALE, ["prepare", str(download), str(again), *common], again, images)
    assert resumed.rc == 0
    assert {name: (again / name).stat().st_mtime_ns for name in finished} == kept  # not written again
    assert same_output(reference, again) == (True, f"{len(list(reference.glob('*.tar'))) + 3} files byte-identical")
