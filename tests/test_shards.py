"""The shard format: deterministic tars, the member index, manifest round trip and checks, webdataset compatibility."""

import hashlib
import json
import tarfile

import numpy as np
import pytest

from alexrepro.core.errors import FormatError
from alexrepro.data.shards.index import ShardIndex, ShardReader, iter_shard, iter_split
from alexrepro.data.shards.manifest import ClassInfo, Manifest, RejectedFile, Sample, SplitInfo, read_manifest
from alexrepro.data.shards.verify import verify_shards
from alexrepro.data.shards.writer import scan_members, write_manifest, write_prepared_folder, write_shard

SAMPLES = [Sample(key=f"n0000000{i % 2}_{i}", jpeg=bytes([i]) * (100 + 300 * i), label=i % 2) for i in range(5)]
CLASSES = (ClassInfo(0, "n01440764", 449, "tench"), ClassInfo(1, "n01443537", None, "goldfish"))


def prepared(folder, shards=((SAMPLES[:3], SAMPLES[3:]),)) -> Manifest:
    """A folder of train shards (the given sample lists) with its index and manifest, as prepare leaves it."""
    return write_prepared_folder(folder, CLASSES, {"train": shards[0]}, {"size": 256})


def test_write_then_read_round_trip(tmp_path):
    manifest = prepared(tmp_path)
    assert [i.count for i in manifest.split("train").shards] == [3, 2]
    assert list(iter_split(tmp_path, "train")) == SAMPLES
    assert list(iter_shard(tmp_path / "train-000001.tar")) == SAMPLES[3:]


def test_recorded_members_are_where_tarfile_finds_them(tmp_path):
    info = write_shard(tmp_path / "train-000000.tar", SAMPLES)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar}
    expected = tuple((s.key, *members[f"{s.key}.jpg"], *members[f"{s.key}.cls"]) for s in SAMPLES)
    assert info.members == expected == scan_members(tmp_path / "train-000000.tar")
    assert info.size == (tmp_path / "train-000000.tar").stat().st_size


def test_index_is_one_file_named_with_its_hash_in_the_manifest(tmp_path):
    manifest = prepared(tmp_path)
    entry = json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"]["index"]
    assert entry == {
        "name": "train-index.npy",
        "sha256": hashlib.sha256((tmp_path / "train-index.npy").read_bytes()).hexdigest(),
    }
    index = ShardIndex.load(tmp_path, manifest, "train")
    assert [index.key(i) for i in range(len(index))] == [s.key for s in SAMPLES]
    assert index.shard.tolist() == [0, 0, 0, 1, 1]
    assert len(index.head(4).paths) == 2 and len(index.head(3).paths) == 1
    assert [index.only(1).key(i) for i in range(2)] == [s.key for s in SAMPLES[3:]]


def _tarfile_shard(samples) -> bytes:
    """The shard as the standard library's tarfile writes it (the format write_shard promises), the reference."""
    import io

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for name, data in ((f"{sample.key}.jpg", sample.jpeg), (f"{sample.key}.cls", str(sample.label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o444, 0, 0, "", "")  # fmt: skip
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("key_bytes", [1, 9, 95])  # 95: the longest key, whose ".jpg" name fills 99 of 100 bytes
@pytest.mark.parametrize("count", [0, 1, 7, 40])  # 0: an empty shard is one record of zeros; 40 spans records
def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path, key_bytes, count):
    """write_shard builds its USTAR headers itself (faster); every byte must still be tarfile's."""
    sizes = [0, 1, 511, 512, 513, 1024, 20_000]
    samples = [Sample(f"{i:03d}".rjust(key_bytes, "k")[-key_bytes:] if key_bytes >= 3 else "k" * key_bytes,
                      bytes([i % 251]) * sizes[i % len(sizes)], label=i * 37) for i in range(count)]  # fmt: skip
    samples = list({s.key: s for s in samples}.values())  # keys unique, as in a shard
    info = write_shard(tmp_path / "a.tar", samples)
    written = (tmp_path / "a.tar").read_bytes()
    assert written == _tarfile_shard(samples)
    assert info.size == len(written) and info.sha256 == hashlib.sha256(written).hexdigest()
    with tarfile.open(tmp_path / "a.tar") as tar:  # and the offsets recorded for the index are the members'
        offsets = {m.name: (m.offset_data, m.size) for m in tar}
    assert [m[1:] for m in info.members] == [(*offsets[f"{s.key}.jpg"], *offsets[f"{s.key}.cls"]) for s in samples]


def test_same_samples_give_identical_bytes(tmp_path):
    a = write_shard(tmp_path / "a.tar", SAMPLES)
    b = write_shard(tmp_path / "b.tar", SAMPLES)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a.sha256 == b.sha256 == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    prepared(tmp_path / "one"), prepared(tmp_path / "two")
    for name in ("manifest.json", "train-index.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_webdataset_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")  # a test dependency only (not on the GPU machine)
    write_shard(tmp_path / "val-000000.tar", SAMPLES)
    seen = [
        (s["__key__"], s["jpg"], int(s["cls"]))
        for s in wds.WebDataset(str(tmp_path / "val-000000.tar"), shardshuffle=False)
    ]
    assert seen == [(s.key, s.jpeg, s.label) for s in SAMPLES]


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        write_shard(tmp_path / "x.tar", [Sample(key="a.b", jpeg=b"x", label=0)])
    assert not (tmp_path / "x.tar").exists()


def test_manifest_round_trip_and_checks(tmp_path):
    manifest = Manifest(
        settings={"size": 256},
        classes=CLASSES,
        splits={"train": SplitInfo(count=0, shards=())},
        rejected=(RejectedFile("train", "a/b.JPEG", "truncated"),),
    )
    written = write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == written and written.split("train").index.name == "train-index.npy"
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == "alexrepro-shards" and data["version"] == 2

    data["version"] = 1  # an older prepare's folder: say what to run
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="version 1.*reads version 2.*rerun `alexrepro prepare`"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["splits"]["train"]["shards"][0].update(count="3"), r"splits.train.shards\[0\].count' must be int"),
        (lambda d: d["splits"]["train"]["shards"][0].update(name="../train-000000.tar"), "not a plain file name"),
        (lambda d: d["splits"]["train"]["shards"][1].update(name="/etc/passwd"), "not a plain file name"),
        (lambda d: d["splits"]["train"]["index"].update(name=".."), "not a plain file name"),
        (lambda d: d["splits"]["train"]["shards"][0].update(sha256="0" * 63), "not a sha256"),
        (lambda d: d["splits"]["train"].update(shards={}), "splits.train.shards' must be list"),
        (lambda d: d["classes"][1].update(index=True), r"classes\[1\].index' must be int"),
        (lambda d: d.update(classes=[1, 2]), r"classes\[0\]' must be dict"),
        (lambda d: d["splits"]["train"]["shards"][0].pop("size"), r"shards\[0\].size' is missing"),
    ],
)
def test_a_wrong_manifest_field_is_one_line_naming_it(tmp_path, edit, message):
    prepared(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=message) as info:
        read_manifest(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(FormatError, match="run `alexrepro prepare"):
        read_manifest(tmp_path)


def test_truncated_shard_is_a_format_error(tmp_path):
    manifest = prepared(tmp_path)
    path = tmp_path / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(FormatError, match="train-000000.tar.*rerun `alexrepro prepare`"):
        ShardIndex.load(tmp_path, manifest, "train")


def test_edited_index_is_refused(tmp_path):
    manifest = prepared(tmp_path)
    table = np.load(tmp_path / "train-index.npy")
    table["jpg_offset"][0] += 512
    np.save(tmp_path / "train-index.npy", table)
    with pytest.raises(FormatError, match="train-index.npy: sha256 differs"):
        ShardIndex.load(tmp_path, manifest, "train")


def test_out_of_range_label_names_the_shard_and_key(tmp_path):
    prepared(tmp_path, ((SAMPLES[:3] + [Sample("n00000009_9", b"x" * 50, 7)],),))
    with pytest.raises(FormatError, match=r"train-000000.tar: sample n00000009_9: class b'7'"):
        list(iter_split(tmp_path, "train"))


def test_verify_hashes_once_per_stamp_and_again_after_a_change(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    manifest = prepared(shards)
    index = ShardIndex.load(shards, manifest, "train")
    assert verify_shards(index, out, workers=1) == 2
    assert verify_shards(index, out, workers=1) == 0  # the stamp: no second pass
    path = shards / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 1  # same size, one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="train-000001.tar: its size or sha256 differs"):
        verify_shards(ShardIndex.load(shards, manifest, "train"), out, workers=1)
    # Two ranks share the hashing: each checks its own shards.
    assert [verify_shards(index, tmp_path / "ranks", 1, (r, 2)) for r in range(1)] == [1]


def test_a_mapped_jpeg_is_the_read_one_and_a_shard_cut_after_indexing_is_one_line(tmp_path):
    manifest = prepared(tmp_path)
    index = ShardIndex.load(tmp_path, manifest, "train")
    with ShardReader(index) as reader:
        assert all(bytes(reader.jpeg_view(i)) == reader.jpeg(i) for i in range(len(index)))
    path = tmp_path / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:700])  # cut after the index was read: only the reads can tell
    assert index.shard[2] == 0  # the last sample of the first shard, beyond the cut
    with ShardReader(index) as reader, pytest.raises(FormatError, match="train-000000.tar: truncated shard"):
        reader.jpeg_view(2)
