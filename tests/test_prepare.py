"""`prepare`: shards and manifest from tiny sources; rejected files; determinism; resume; settings guard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alexrepro.core.errors import FormatError, OutputExistsError, TooManyRejectedError
from alexrepro.core.progress import NullProgress
from alexrepro.data import imaging
from alexrepro.data.config import PrepareConfig
from alexrepro.data.prepare import prepare
from alexrepro.data.shards.index import iter_shard
from alexrepro.data.shards.manifest import read_manifest
from alexrepro.data.sources.base import make_key
from alexrepro.synth.config import SampleConfig
from helpers import fixtures as fx

BROKEN = {"n01000003_90.JPEG": "truncated", "n01000003_91.JPEG": "empty", "notes.txt": "text", "huge.png": "bomb"}
CONFIG = PrepareConfig(size=32, shard_size=5, workers=1)  # tiny output images: these tests are about bookkeeping


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden bookkeeping included) by relative path. Two parts of the bookkeeping are
    compared by content rather than bytes: a shard record's `mtime_ns` (when that shard was written, which resume
    trusts) is left out, and an archive listing (.npz, whose zip entries carry the time of writing) by its arrays,
    less its key (which names the archive file it was read from: its inode, mtime)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name, data = path.relative_to(folder).as_posix(), path.read_bytes()
        if name.startswith(".prepare/") and name.endswith(".tar.json"):
            record = json.loads(data)
            record.pop("mtime_ns", None)
            data = json.dumps(record, sort_keys=True).encode()
        elif name.startswith(".prepare/listing-"):
            with np.load(path, allow_pickle=False) as listing:
                data = b"".join(n.encode() + listing[n].tobytes() for n in sorted(listing.files) if n != "key")
        files[name] = data
    return files


@pytest.fixture(scope="module")
def tiny():
    return fx.tiny_set(broken=BROKEN)


@pytest.fixture(scope="module")
def archives(tmp_path_factory, tiny):
    return fx.write_archives(tmp_path_factory.mktemp("download"), tiny)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, archives):
    """One uninterrupted run with one worker, which the other tests compare against (never modified)."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    result = prepare(archives, out, CONFIG, overwrite=False, progress=NullProgress())
    return out, result, tree_bytes(out)


def test_shards_hold_every_readable_image_with_its_label(reference, tiny):
    out, result, _ = reference
    manifest = read_manifest(out)
    assert manifest == result.manifest
    labels = {make_key(n): tiny.label(w) for w, images in tiny.train.items() for n, _ in images}
    labels.update({make_key(n): tiny.label(w) for n, w, _ in tiny.val})
    seen = {}
    for split in ("train", "val"):
        info = manifest.splits[split]
        for shard in info.shards:
            samples = list(iter_shard(out / shard.name))
            assert len(samples) == shard.count
            seen.update({s.key: (split, s.label, imaging.decode_rgb(s.jpeg).shape) for s in samples})
        assert sum(s.count for s in info.shards) == info.count == result.written[split]
    assert all(shape == (32, 32, 3) for _, _, shape in seen.values())
    assert {k: label for k, (_, label, _) in seen.items()} == {k: v for k, v in labels.items() if k in seen}
    assert result.written == {"train": 12, "val": 6}
    assert result.layout == "ilsvrc2012-archives" and result.pillow == imaging.pillow_build()
    assert manifest.settings == {
        "size": 32,
        "quality": 90,
        "resize_filter": imaging.RESIZE_FILTER,
        "seed": 0,
        "shard_size": 5,
        "pillow": imaging.pillow_build(),
        "layout": "ilsvrc2012-archives",
    }
    assert [(c.wnid, c.ilsvrc_id) for c in manifest.classes] == [("n01000001", 2), ("n01000002", 3), ("n01000003", 1)]


def test_broken_files_are_rejected_with_a_reason_and_counts_reconcile(reference, tiny):
    _, result, _ = reference
    rejected = {Path(r.path).name: r.reason for r in result.rejected}
    assert set(rejected) == set(BROKEN)
    assert rejected["n01000003_91.JPEG"] == "empty file"
    assert "bomb" in rejected["huge.png"]
    assert all(r.split == "train" for r in result.rejected)
    inputs = sum(len(images) for images in tiny.train.values())
    assert result.written["train"] + len(result.rejected) == inputs
    assert result.written["val"] == len(tiny.val)


def test_train_is_shuffled_across_shards_and_val_keeps_file_name_order(reference):
    out, result, _ = reference
    train = [s for shard in result.manifest.splits["train"].shards for s in iter_shard(out / shard.name)]
    assert len({s.label for s in train[:5]}) > 1  # the first shard mixes classes
    assert [s.key for s in train] != sorted(s.key for s in train)
    val = [s.key for shard in result.manifest.splits["val"].shards for s in iter_shard(out / shard.name)]
    assert val == sorted(val) and len(val) == 6


def test_a_standard_webdataset_reader_reads_the_shards(reference):
    import webdataset as wds

    out, result, _ = reference
    urls = [str(out / s.name) for s in result.manifest.splits["val"].shards]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls")
    rows = list(dataset)
    assert [key for key, _, _ in rows] == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 7)]
    assert all(image.size == (32, 32) and image.mode == "RGB" for _, image, _ in rows)
    assert [label for _, _, label in rows] == [s.label for s in iter_shard(out / "val-000000.tar")] + [
        s.label for s in iter_shard(out / "val-000001.tar")
    ]


def test_output_is_byte_identical_for_two_workers(tmp_path, archives, reference):
    config = PrepareConfig(size=32, shard_size=5, workers=2)
    prepare(archives, tmp_path / "shards", config, overwrite=False, progress=NullProgress())
    assert tree_bytes(tmp_path / "shards") == reference[2]


def test_resume_redoes_only_missing_or_damaged_shards(tmp_path, archives, reference):
    out = tmp_path / "shards"
    shutil.copytree(reference[0], out)
    (out / "manifest.json").unlink()
    (out / "train-000001.tar").unlink()  # lost shard
    (out / ".prepare" / "val-000000.tar.json").unlink()  # shard written, record not: killed between the two
    (out / "train-000002.tar").write_bytes(b"half a shard")  # damaged: its sha256 no longer matches
    (out / ".train-000003.tar.tmp-12345").write_bytes(b"partial")  # left by a killed worker
    result = prepare(archives, out, CONFIG, overwrite=False, progress=NullProgress())
    assert result.reused_shards == 3  # of 6: train-000000, train-000003, val-000001
    assert tree_bytes(out) == reference[2]


def test_resume_after_kill_9_ends_byte_identical(tmp_path, archives, reference):
    out = tmp_path / "shards"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from alexrepro.data import imaging\n"
        "from alexrepro.data.prepare import PrepareConfig, prepare\n"
        "resize = imaging.resize_square_jpeg\n"
        "def slow(*args):\n"
        "    time.sleep(0.05)\n"
        "    return resize(*args)\n"
        "imaging.resize_square_jpeg = slow\n"
        "prepare(Path(sys.argv[1]), Path(sys.argv[2]), PrepareConfig(size=32, shard_size=5, workers=1))\n"
    )
    # The kill comes once the second shard's record is written: polling for the shard itself could kill in the gap
    # between its rename and its record, and the resume would then redo it (a count that depends on timing).
    record = out / ".prepare" / "train-000001.tar.json"
    child = subprocess.Popen([sys.executable, "-c", code, str(archives), str(out)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None and not record.exists():
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)  # no-op if it already ended (the asserts below then say so)
    finally:
        child.wait(timeout=30)
    assert record.exists(), "prepare ended or stalled before its second shard was recorded"
    assert child.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists() and not (out / "val-000001.tar").exists()
    result = prepare(archives, out, CONFIG, overwrite=False, progress=NullProgress())
    assert result.reused_shards >= 2
    assert tree_bytes(out) == reference[2]


def test_other_settings_over_existing_output_need_overwrite(tmp_path, archives, reference):
    out = tmp_path / "shards"
    shutil.copytree(reference[0], out)
    other = PrepareConfig(size=32, quality=80, shard_size=4, workers=1)
    with pytest.raises(OutputExistsError, match=r"quality 90 → 80.*--overwrite"):
        prepare(archives, out, other, overwrite=False, progress=NullProgress())
    assert tree_bytes(out) == reference[2]  # untouched
    (out / "notes.md").write_text("the user's own file")
    result = prepare(archives, out, other, overwrite=True, progress=NullProgress())
    assert [s.name for s in result.manifest.splits["train"].shards] == [f"train-00000{i}.tar" for i in range(4)]
    fresh = tmp_path / "fresh"
    prepare(archives, fresh, other, overwrite=False, progress=NullProgress())
    assert tree_bytes(out) == {**tree_bytes(fresh), "notes.md": b"the user's own file"}


def test_a_folder_not_written_by_prepare_is_not_overwritten_silently(tmp_path, archives):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match="not empty"):
        prepare(archives, out, CONFIG, overwrite=False, progress=NullProgress())


def test_too_many_rejected_fails_after_writing_the_manifest(tmp_path, archives):
    out = tmp_path / "shards"
    config = PrepareConfig(size=32, shard_size=5, workers=1, max_rejected=3)
    with pytest.raises(TooManyRejectedError, match=r"4 images.*max_rejected=3.*manifest.json"):
        prepare(archives, out, config, overwrite=False, progress=NullProgress())
    assert len(read_manifest(out, allow_failed=True).rejected) == 4
    with pytest.raises(FormatError, match="prepare did not succeed.*4 images rejected"):
        read_manifest(out)  # what every downstream stage reads


def test_progress_counts_every_input_image(tmp_path, archives, tiny):
    class Recorder(NullProgress):
        def __init__(self):
            self.total, self.done = None, 0

        def start(self, description, total, unit="img"):
            self.total = total

        def advance(self, units=1, **fields):
            self.done += units

    recorder = Recorder()
    prepare(archives, tmp_path / "shards", CONFIG, overwrite=False, progress=recorder)
    inputs = sum(len(images) for images in tiny.train.values()) + len(tiny.val)
    assert recorder.total == recorder.done == inputs


def test_the_same_images_give_the_same_shards_from_an_extracted_tree(tmp_path, tiny, reference):
    """Layouts differ only in where bytes come from: the shards are the same (the manifest names the layout)."""
    fx.write_tree(tmp_path / "tree", tiny, val="flat")
    fx.write_devkit_archive(tmp_path / "tree", tiny.classes, tiny.val_ids)
    result = prepare(tmp_path / "tree", tmp_path / "shards", CONFIG, overwrite=False, progress=NullProgress())
    assert result.layout == "extracted, flat val labelled by devkit"
    shards = {k: v for k, v in tree_bytes(tmp_path / "shards").items() if k.endswith(".tar")}
    assert shards == {k: v for k, v in reference[2].items() if k.endswith(".tar")}
    assert [r.path for r in result.rejected] == sorted(f"train/n01000003/{name}" for name in BROKEN)


def test_own_classes_imagefolder(tmp_path):
    source = fx.write_own_classes(tmp_path / "mine")
    result = prepare(source, tmp_path / "shards", CONFIG, overwrite=False, progress=NullProgress())
    assert result.written == {"train": 9, "val": 3} and result.rejected == []
    assert [c.name for c in result.manifest.classes] == ["Mango", "apple", "zebra"]
    assert [s.key for s in iter_shard(tmp_path / "shards" / "val-000000.tar")] == [
        "Mango_val_0",
        "apple_val_0",
        "zebra_val_0",
    ]


def test_prepares_the_built_in_sample(tmp_path):
    from alexrepro.synth.sample import write_sample

    sample = write_sample(tmp_path / "sample", SampleConfig.tiny(), NullProgress())
    result = prepare(tmp_path / "sample", tmp_path / "shards", CONFIG, overwrite=False, progress=NullProgress())
    assert result.rejected == []  # its odd files (PNG named .JPEG, CMYK, grayscale) are all readable
    assert result.written == {"train": sample.counts["train"], "val": sample.counts["val"]}
    ids = {c.wnid: c.ilsvrc_id for c in sample.classes}
    assert {c.wnid: c.ilsvrc_id for c in result.manifest.classes} == ids
    assert [c.wnid for c in result.manifest.classes] == sorted(ids)


def test_config_ranges_name_the_key():
    with pytest.raises(ValueError, match="key 'quality'"):
        PrepareConfig(quality=0)
    with pytest.raises(ValueError, match="key 'shard_size'"):
        PrepareConfig(shard_size=0)
    assert PrepareConfig().size == 256


def test_changed_source_over_existing_output_needs_overwrite(tmp_path):
    source = fx.write_own_classes(tmp_path / "mine")
    prepare(source, tmp_path / "shards", CONFIG, overwrite=False, progress=NullProgress())
    (source / "train" / "apple" / "apple-new.jpg").write_bytes(fx.image_bytes(7))
    with pytest.raises(OutputExistsError, match="source has changed"):
        prepare(source, tmp_path / "shards", CONFIG, overwrite=False, progress=NullProgress())
    result = prepare(source, tmp_path / "shards", CONFIG, overwrite=True, progress=NullProgress())
    assert result.written["train"] == 10


def _counting_headers(monkeypatch) -> list[str]:
    """Record every tar that `sources` reads the headers of (the listing work that a saved listing spares)."""
    from alexrepro.data.sources import archives

    calls: list[str] = []
    real = archives._tar_members

    def counting(tar_path, *args, **kwargs):
        calls.append(Path(tar_path).name)
        return real(tar_path, *args, **kwargs)

    monkeypatch.setattr(archives, "_tar_members", counting)
    return calls


def test_a_rerun_reads_the_saved_archive_listing_instead_of_every_header(tmp_path, archives, reference, monkeypatch):
    out = tmp_path / "shards"
    shutil.copytree(reference[0], out)
    assert sorted(p.name for p in (out / ".prepare").glob("listing-*")) == [
        "listing-ILSVRC2012_img_train.tar.npz",
        "listing-ILSVRC2012_img_val.tar.npz",
    ]
    calls = _counting_headers(monkeypatch)
    result = prepare(archives, out, CONFIG, overwrite=False, progress=NullProgress())
    assert calls == []  # not one tar header read: the listing came from .prepare
    assert result.reused_shards == 6 and tree_bytes(out) == reference[2]


def test_a_changed_archive_is_listed_again(tmp_path, archives, reference, monkeypatch):
    source = tmp_path / "download"
    shutil.copytree(archives, source)  # a copy: new inodes, so the reference's listing does not fit it
    out = tmp_path / "shards"
    shutil.copytree(reference[0], out)
    calls = _counting_headers(monkeypatch)
    prepare(source, out, CONFIG, overwrite=False, progress=NullProgress())
    assert "ILSVRC2012_img_train.tar" in calls and "ILSVRC2012_img_val.tar" in calls
    assert tree_bytes(out) == reference[2]  # the same images, so the same output

    calls.clear()
    prepare(source, out, CONFIG, overwrite=False, progress=NullProgress())
    assert calls == []
    # A rewrite in place that keeps size, mtime and inode (one byte of the end padding changed, mtime put back).
    val = source / "ILSVRC2012_img_val.tar"
    before = val.stat()
    with open(val, "r+b") as handle:
        handle.seek(before.st_size - 1)
        handle.write(b"\x01")
    os.utime(val, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (val.stat().st_size, val.stat().st_mtime_ns, val.stat().st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    prepare(source, out, CONFIG, overwrite=False, progress=NullProgress())
    assert calls == ["ILSVRC2012_img_val.tar"]  # the val tar listed again, the unchanged train tar not


def test_a_kept_shard_is_trusted_by_size_and_mtime_and_hashed_with_verify_finished(tmp_path, archives, reference):
    out = tmp_path / "shards"
    shutil.copytree(reference[0], out)  # copy2 keeps the mtimes the records noted
    shard = out / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first image's bytes: same size
    stat = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare(archives, out, CONFIG, overwrite=False, progress=NullProgress()).reused_shards == 6
    verify = PrepareConfig(**{**CONFIG.__dict__, "verify_finished": True})
    assert prepare(archives, out, verify, overwrite=False, progress=NullProgress()).reused_shards == 5
    assert tree_bytes(out) == reference[2]
    os.utime(out / "train-000001.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: hashed, still kept
    assert prepare(archives, out, CONFIG, overwrite=False, progress=NullProgress()).reused_shards == 6


def test_a_source_without_val_is_said_at_prepare_and_val_can_be_held_out(tmp_path):
    """An ImageFolder of train/ only: prepare says at once that train will need a val split, and --val-fraction holds
    out part of each class, the same images on every run, recorded in the manifest."""
    import json
    import shutil
    import subprocess
    import sys

    source = fx.write_own_classes(tmp_path / "src", per_class=8)
    shutil.rmtree(source / "val")
    run = lambda out, *more: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "alexrepro", "prepare", str(source), str(out), "--size", "32", "--quiet", *more],
        capture_output=True,
        text=True,
        timeout=120,
    )
    plain = run(tmp_path / "plain")
    assert plain.returncode == 0 and "has no val split" in plain.stderr and "--val-fraction" in plain.stderr
    held = [run(tmp_path / f"held{i}", "--val-fraction", "0.25") for i in range(2)]
    assert all(r.returncode == 0 for r in held), held[0].stderr
    manifest = json.loads((tmp_path / "held0" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["count"] == 3 * 2 and manifest["splits"]["train"]["count"] == 3 * 6
    assert manifest["settings"]["val_fraction"] == 0.25 and "held out" in manifest["settings"]["layout"]
    for name in ("manifest.json", "val-000000.tar"):  # the same images held out on every run
        assert (tmp_path / "held0" / name).read_bytes() == (tmp_path / "held1" / name).read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_of_ones_own_data_is_said_in_its_words(tmp_path, split):
    """Not ImageNet's "the download is incomplete"; and an empty val class folder is refused as a train one is."""
    import subprocess
    import sys

    source = fx.write_own_classes(tmp_path / "src")
    (source / split / "kiwi").mkdir()
    if split == "val":
        (source / "train" / "kiwi").mkdir()
        (source / "train" / "kiwi" / "k.jpg").write_bytes((source / "train" / "apple" / "apple-1.jpg").read_bytes())
    result = subprocess.run([sys.executable, "-m", "alexrepro", "prepare", str(source), str(tmp_path / "out"),
                             "--size", "32", "--quiet"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    images = "training images" if split == "train" else "val images"
    assert f"no {images} (kiwi)" in lines[0] and "put images in each class folder" in lines[0], lines
    assert "download" not in lines[0]
