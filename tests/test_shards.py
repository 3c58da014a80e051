"""The shard format: deterministic tars, manifest round trip, format checks, and webdataset compatibility."""

import json

import pytest
import webdataset as wds

from alexrepro.errors import FormatError
from alexrepro.shards import (
    ClassInfo,
    Manifest,
    RejectedFile,
    Sample,
    SplitInfo,
    iter_shard,
    read_manifest,
    write_manifest,
    write_shard,
)

SAMPLES = [Sample(key=f"n0000000{i % 2}_{i}", jpeg=bytes([i]) * (100 + i), label=i % 2) for i in range(5)]


def test_write_then_read_round_trip(tmp_path):
    info = write_shard(tmp_path / "train-000000.tar", SAMPLES)
    assert info.name == "train-000000.tar" and info.count == 5
    assert list(iter_shard(tmp_path / "train-000000.tar")) == SAMPLES


def test_same_samples_give_identical_bytes(tmp_path):
    a = write_shard(tmp_path / "a.tar", SAMPLES)
    b = write_shard(tmp_path / "b.tar", SAMPLES)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a.sha256 == b.sha256
    import hashlib

    assert a.sha256 == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()


def test_webdataset_reads_our_shards(tmp_path):
    write_shard(tmp_path / "val-000000.tar", SAMPLES)
    seen = [(s["__key__"], s["jpg"], int(s["cls"])) for s in wds.WebDataset(str(tmp_path / "val-000000.tar"), shardshuffle=False)]
    assert seen == [(s.key, s.jpeg, s.label) for s in SAMPLES]


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        write_shard(tmp_path / "x.tar", [Sample(key="a.b", jpeg=b"x", label=0)])
    assert not (tmp_path / "x.tar").exists()


def test_manifest_round_trip_and_checks(tmp_path):
    manifest = Manifest(
        settings={"size": 256},
        classes=(ClassInfo(0, "n01440764", 449, "tench"), ClassInfo(1, "n01443537", None, "goldfish")),
        splits={"train": SplitInfo(count=5, shards=())},
        rejected=(RejectedFile("train", "a/b.JPEG", "truncated"),),
    )
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == "alexrepro-shards" and data["version"] == 1

    data["version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="version 99.*alexrepro prepare"):
        read_manifest(tmp_path)


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(FormatError, match="run `alexrepro prepare"):
        read_manifest(tmp_path)


def test_truncated_shard_is_a_format_error(tmp_path):
    path = tmp_path / "train-000000.tar"
    write_shard(path, SAMPLES)
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(FormatError, match="train-000000.tar"):
        list(iter_shard(path))
