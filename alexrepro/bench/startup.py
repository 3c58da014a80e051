"""`alexrepro bench startup`: what opening the training split costs at a dataset's full size, before any work.

A prepared folder with ILSVRC-2012's train count (1,281,167 samples by default, 960 per shard: 1,335 shards) is
written once, cheaply: every shard is a real tar holding one small JPEG, and the member index points each of the
shard's samples at that member. The index, the manifest and the shard files are what a real folder at that count
holds; only the pixels repeat. Then, in a fresh process, the figures a training run pays once at start:
- seconds from nothing to the first batch: loading the member index (its sha256 and the shards' sizes checked)
  and the loader's first batch of 128 random crops, in the calling process (workers 0);
- resident memory (RSS) that this adds to the process, which every loader worker forked from it inherits.
The per-shard sha256 check (`verify_shards`, once per run folder) is not timed here: it reads the shards, which
is disk speed, not start-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from alexrepro.bench.report import BenchReport, machine_description
from alexrepro.core.atomic import atomic_write_bytes
from alexrepro.data.shards.manifest import ClassInfo, IndexInfo, Manifest, Sample, SplitInfo, index_name, shard_name
from alexrepro.data.shards.writer import index_dtype, write_shard

ILSVRC_TRAIN = 1_281_167
PER_SHARD = 960


def bench_startup(samples: int = ILSVRC_TRAIN, folder: Path | None = None) -> BenchReport:
    """Construct + first batch and the memory it adds, measured in a fresh process over a folder of `samples`."""
    with tempfile.TemporaryDirectory(prefix="alexrepro-startup-") as tmp:
        shards = Path(folder) if folder is not None else Path(tmp) / "shards"
        if not (shards / "manifest.json").exists():
            write_repeated_folder(shards, samples)
        measured = json.loads(
            subprocess.run(
                [sys.executable, "-c", _CHILD, str(shards)], capture_output=True, text=True, check=True, timeout=600
            ).stdout
        )
    report = BenchReport(
        title=f"start-up at {samples:,} train samples ({-(-samples // PER_SHARD):,} shards)",
        rows=[],
        ratios={},
        notes=[machine_description()],
    )
    for name, key in (("member index: load", "index"), ("construct + first batch", "first_batch")):
        report.rows.append({"name": name, "seconds": round(measured[f"{key}_s"], 3),
                            "rss_added_mb": round(measured[f"{key}_mb"], 1),
                            "private_added_mb": round(measured[f"{key}_anon_mb"], 1)})  # fmt: skip
    report.notes.append(
        "one process, workers 0, batch 128, crop 227, torch and the JPEG decoder imported before timing; "
        "private = anonymous RSS (/proc/self/status RssAnon), what each forked worker would copy"
    )
    return report


def write_repeated_folder(shards: Path, samples: int) -> Manifest:
    """A prepared folder of `samples` train samples whose shards each hold one real JPEG that all of the shard's
    samples point at (see the module doc)."""
    from PIL import Image

    shards.mkdir(parents=True, exist_ok=True)
    picture = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)).save(picture, "JPEG")
    jpeg = picture.getvalue()
    count = -(-samples // PER_SHARD)
    infos, rows = [], []
    for number in range(count):
        in_shard = min(PER_SHARD, samples - number * PER_SHARD)
        info = write_shard(shards / shard_name("train", number), [Sample(f"s{number:06d}", jpeg, 0)])
        (_, jpg_offset, jpg_size, cls_offset, cls_size) = info.members[0]  # type: ignore[index]
        rows.append((number, in_shard, jpg_offset, jpg_size, cls_offset, cls_size))
        infos.append(dataclasses.replace(info, count=in_shard, members=None))
    table = np.zeros(samples, index_dtype(12))
    at = 0
    for number, in_shard, jpg_offset, jpg_size, cls_offset, cls_size in rows:
        block = table[at : at + in_shard]
        block["shard"], block["jpg_offset"], block["jpg_size"] = number, jpg_offset, jpg_size
        block["cls_offset"], block["cls_size"] = cls_offset, cls_size
        block["key"] = [f"s{number:06d}_{i:04d}".encode() for i in range(in_shard)]
        at += in_shard
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    data = buffer.getvalue()
    atomic_write_bytes(shards / index_name("train"), data)
    index = IndexInfo(index_name("train"), hashlib.sha256(data).hexdigest())
    manifest = Manifest(
        {"size": 256},
        (ClassInfo(0, "n00000001", None, "repeated"),),
        {"train": SplitInfo(samples, tuple(infos), index)},
    )
    (shards / "manifest.json").write_text(manifest.to_json())
    return manifest


# Runs in a fresh process, so that nothing measured is already in memory.
_CHILD = r"""
import json, os, sys, time
from pathlib import Path

def memory_mb():
    # RSS, and its anonymous part: private memory, which a forked loader worker gets its own copy of as soon as
    # either side writes to it (file-backed pages of the mapped index stay shared, and the kernel can drop them).
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024

from alexrepro.data.config import Augmentation
from alexrepro.data.loader import EpochSpec, LoaderSettings, load_decoder, train_loader
from alexrepro.data.shards.index import ShardIndex
from alexrepro.data.shards.manifest import read_manifest
import torch  # imported, and the decoder loaded, before the clock starts: a process pays them at any size
load_decoder("torchvision")

shards = Path(sys.argv[1])
manifest = read_manifest(shards)
(rss0, anon0), started = memory_mb(), time.perf_counter()
index = ShardIndex.load(shards, manifest, "train")
(rss1, anon1), index_s = memory_mb(), time.perf_counter() - started
loader = train_loader(index, Augmentation(227), EpochSpec(seed=0, epoch=0), LoaderSettings(batch_size=128))
next(iter(loader))
(rss2, anon2), first_s = memory_mb(), time.perf_counter() - started
print(json.dumps({"index_s": index_s, "index_mb": rss1 - rss0, "index_anon_mb": anon1 - anon0,
                  "first_batch_s": first_s, "first_batch_mb": rss2 - rss0, "first_batch_anon_mb": anon2 - anon0}))
"""
