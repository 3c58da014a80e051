"""`alexrepro bench startup`: the folder it measures is a real prepared folder, and opening it stays cheap."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from alexrepro.bench.startup import write_repeated_folder
from alexrepro.cli.app import app
from alexrepro.data.config import Augmentation
from alexrepro.data.loader import EpochSpec, LoaderSettings, train_loader
from alexrepro.data.shards.index import ShardIndex
from alexrepro.data.shards.manifest import read_manifest


def test_the_repeated_folder_is_a_prepared_folder_the_loader_reads(tmp_path):
    write_repeated_folder(tmp_path, 2500)
    manifest = read_manifest(tmp_path)
    index = ShardIndex.load(tmp_path, manifest, "train")
    assert len(index) == 2500 and len(index.paths) == 3 and index.shard_starts().tolist() == [0, 960, 1920]
    batch = next(iter(train_loader(index, Augmentation(67), EpochSpec(0, 0), LoaderSettings(batch_size=16))))
    assert tuple(batch.images.shape) == (16, 3, 67, 67) and set(batch.labels.tolist()) == {0}


def test_the_member_index_is_mapped_not_copied(tmp_path):
    """Opening a split reads no row of its index: the arrays are views of the mapped file."""
    write_repeated_folder(tmp_path, 5000)
    index = ShardIndex.load(tmp_path, read_manifest(tmp_path), "train")
    for column in (index.shard, index.jpg, index.cls, index.keys):
        assert (
            isinstance(column.base, np.memmap) or isinstance(column, np.memmap) or np.shares_memory(column, index.shard)
        ), type(column.base)


def test_bench_startup_reports_time_and_memory(tmp_path):
    result = CliRunner().invoke(app, ["bench", "startup", "--samples", "3000", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["name"] for row in report["rows"]] == ["member index: load", "construct + first batch"]
    assert all(row["seconds"] > 0 and "private_added_mb" in row for row in report["rows"])
