"""Training-set statistics against a brute-force numpy computation on the decoded shard images."""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from alexrepro.core.config import load_config
from alexrepro.core.errors import ConfigError, FormatError, OutputExistsError
from alexrepro.core.files import sha256_file
from alexrepro.core.progress import NullProgress
from alexrepro.data.config import StatsConfig
from alexrepro.data.shards.manifest import ClassInfo, Sample, read_manifest
from alexrepro.data.shards.writer import write_manifest, write_prepared_folder
from alexrepro.data.stats import check_stats_source, compute_stats, load_stats
from helpers.images import jpeg_bytes

SIZE = 16
SHARD_COUNTS = (5, 3, 4)  # three train shards of unequal size


def _jpeg(rng):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = rng.uniform(30, 220, 3) + 3 * np.stack([xx, yy, xx - yy], axis=2)
    return jpeg_bytes(np.clip(base + rng.normal(0, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny prepared folder: three train shards and one val shard (which stats must ignore)."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    splits = {
        split: [
            [Sample(f"{split}_{index}_{i}", _jpeg(rng), i % 2) for i in range(count)]
            for index, count in enumerate(counts)
        ]
        for split, counts in (("train", SHARD_COUNTS), ("val", (2,)))
    }
    classes = (ClassInfo(0, "n00000001", None, "a"), ClassInfo(1, "n00000002", None, "b"))
    write_prepared_folder(root, classes, splits, {"size": SIZE})
    return root


def _train_images(shards_dir, limit=None):
    from alexrepro.data.shards.index import iter_split

    images = [np.asarray(Image.open(io.BytesIO(s.jpeg)).convert("RGB")) for s in iter_split(shards_dir, "train")]
    return np.stack(images[:limit]).astype(np.float64)


def _run(shards_dir, out, **overrides):
    return compute_stats(shards_dir, out, StatsConfig(**overrides), NullProgress()).stats


def test_matches_brute_force_numpy(shards, tmp_path):
    stats = _run(shards, tmp_path, workers=1)
    images = _train_images(shards)
    pixels = images.reshape(-1, 3)
    np.testing.assert_allclose(stats.mean_image, images.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.channel_mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(pixels.T, bias=True), rtol=1e-9)
    assert stats.image_count == sum(SHARD_COUNTS)
    assert stats.pixel_count == sum(SHARD_COUNTS) * SIZE * SIZE
    assert stats.mean_image.dtype == np.float32 and stats.mean_image.shape == (SIZE, SIZE, 3)


def test_eigen_decomposition_is_descending_orthonormal_and_exact(shards, tmp_path):
    stats = _run(shards, tmp_path, workers=1)
    assert np.all(np.diff(stats.eigval) <= 0)
    np.testing.assert_allclose(stats.eigvec.T @ stats.eigvec, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(stats.cov @ stats.eigvec, stats.eigvec * stats.eigval, atol=1e-9)
    for k in range(3):  # sign convention: the largest-magnitude component of each column is positive
        assert stats.eigvec[np.argmax(np.abs(stats.eigvec[:, k])), k] > 0


def test_worker_count_does_not_change_the_result(shards, tmp_path):
    one = _run(shards, tmp_path / "one", workers=1)
    two = _run(shards, tmp_path / "two", workers=2)
    for name in ("mean_image", "channel_mean", "cov", "eigval", "eigvec"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))  # exact integer sums: bit-identical
    assert (tmp_path / "one" / "stats.npz").read_bytes() == (tmp_path / "two" / "stats.npz").read_bytes()


def test_max_images_takes_the_first_images_in_shard_order(shards, tmp_path):
    stats = _run(shards, tmp_path, workers=2, max_images=7)  # all of shard 0 and two images of shard 1
    images = _train_images(shards, limit=7)
    assert stats.image_count == 7
    np.testing.assert_allclose(stats.mean_image, images.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.cov, np.cov(images.reshape(-1, 3).T, bias=True), rtol=1e-9)
    assert json.loads((tmp_path / "stats.json").read_text())["max_images"] == 7


def test_outputs_round_trip_through_load_stats(shards, tmp_path):
    written = _run(shards, tmp_path, workers=1)
    loaded = load_stats(tmp_path)
    for name in ("mean_image", "channel_mean", "cov", "eigval", "eigvec"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(written, name))
    assert (loaded.pixel_count, loaded.image_count) == (written.pixel_count, written.image_count)
    summary = json.loads((tmp_path / "stats.json").read_text())
    assert summary["format"] == "alexrepro-stats" and summary["version"] == 1
    assert len(summary["source_manifest_sha256"]) == 64
    assert Image.open(tmp_path / "mean.png").size == (SIZE, SIZE)


def test_load_stats_names_the_fix_for_a_missing_folder(tmp_path):
    with pytest.raises(FormatError, match="alexrepro stats"):
        load_stats(tmp_path / "nowhere")


@pytest.mark.parametrize("change", [{"format": "something-else"}, {"version": 99}])
def test_load_stats_rejects_other_formats_and_versions(shards, tmp_path, change):
    _run(shards, tmp_path, workers=1)
    summary = json.loads((tmp_path / "stats.json").read_text())
    summary.update(change)
    (tmp_path / "stats.json").write_text(json.dumps(summary))
    with pytest.raises(FormatError, match="rerun|run"):
        load_stats(tmp_path)


def test_missing_manifest_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="alexrepro prepare"):
        _run(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("key,value", [("workers", -1), ("max_images", 0)])
def test_config_ranges_are_checked(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(StatsConfig, None, {key: value})


def test_shards_written_by_other_tar_tools_are_read_too(shards, tmp_path):
    """A pax-format copy of the shards (as GNU tar or webdataset may write) gives the same statistics."""
    import shutil
    import tarfile

    copy = tmp_path / "pax"
    shutil.copytree(shards, copy)
    for path in sorted(copy.glob("train-*.tar")):
        with tarfile.open(path) as source:
            members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as target:
            for member, data in members:
                member.pax_headers = {"comment": "rewritten"}
                target.addfile(member, io.BytesIO(data))
    # The manifest names the new bytes; the index is read from the pax headers once, by write_manifest.
    manifest = read_manifest(copy)
    train = manifest.split("train")
    infos = tuple(
        replace(s, sha256=sha256_file(copy / s.name), size=(copy / s.name).stat().st_size) for s in train.shards
    )
    write_manifest(copy, replace(manifest, splits={**manifest.splits, "train": replace(train, shards=infos)}))
    original = _run(shards, tmp_path / "a", workers=1)
    rewritten = _run(copy, tmp_path / "b", workers=1)
    np.testing.assert_array_equal(original.cov, rewritten.cov)
    np.testing.assert_array_equal(original.mean_image, rewritten.mean_image)


def test_bench_stats_reports_steady_state_and_whole_run_figures():
    from alexrepro.bench.data import bench_stats

    report = bench_stats(images=4, workers=2, size=32, rounds=1)
    names = [row["name"] for row in report.rows]
    assert "stats, 2 workers, steady state" in names
    assert {"stats, 1 worker, whole run of 4", "stats, 1 worker, whole run of 8"} <= set(names)
    assert "stats 2 workers / 1 worker (wall clock), steady state" in report.ratios
    assert all(value > 0 for name, value in report.ratios.items() if name.startswith("whole run"))


def test_stats_of_other_shards_or_settings_are_not_replaced_silently(shards, tmp_path):
    _run(shards, tmp_path, workers=1)
    _run(shards, tmp_path, workers=2)  # the same shards and settings: simply rewritten
    with pytest.raises(OutputExistsError, match="other shards or settings.*--overwrite"):
        _run(shards, tmp_path, workers=1, max_images=3)
    assert json.loads((tmp_path / "stats.json").read_text())["max_images"] is None
    compute_stats(shards, tmp_path, StatsConfig(workers=1, max_images=3), NullProgress(), overwrite=True)
    assert json.loads((tmp_path / "stats.json").read_text())["max_images"] == 3


def test_stats_record_their_manifest_and_other_shards_are_told_apart(shards, tmp_path):
    _run(shards, tmp_path / "stats", workers=1)
    check_stats_source(tmp_path / "stats", shards)
    summary = json.loads((tmp_path / "stats" / "stats.json").read_text())
    summary["source_manifest_sha256"] = "0" * 64
    (tmp_path / "stats" / "stats.json").write_text(json.dumps(summary))
    with pytest.raises(FormatError, match="computed from other shards.*alexrepro stats"):
        check_stats_source(tmp_path / "stats", shards)
