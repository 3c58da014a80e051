"""The built-in miniature ILSVRC-2012: real archive names and layouts, devkit, odd files, determinism, no colour cue."""

import dataclasses
import gzip
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image, JpegImagePlugin

from alexrepro.core.config import load_config
from alexrepro.core.errors import AlexReproError, ConfigError
from alexrepro.core.progress import NullProgress
from alexrepro.synth.config import SampleConfig
from alexrepro.synth.ilsvrc import DEVKIT_ARCHIVE, GROUND_TRUTH_MEMBER, META_MEMBER, TRAIN_ARCHIVE, VAL_ARCHIVE
from alexrepro.synth.sample import PATTERNS, plan_sample, render_image, write_sample

WNID = re.compile(r"^n\d{8}$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, write_sample(out, SampleConfig.tiny(seed=7), NullProgress())


def read_tar(data: bytes) -> dict[str, bytes]:
    """Members in stored order (dicts keep insertion order)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def train_images(out: Path) -> dict[str, dict[str, bytes]]:
    """WNID -> {file name -> bytes}, read through the inner tars."""
    inner = read_tar((out / TRAIN_ARCHIVE).read_bytes())
    return {name.removesuffix(".tar"): read_tar(data) for name, data in inner.items()}


def devkit(out: Path) -> dict[str, bytes]:
    return read_tar(gzip.decompress((out / DEVKIT_ARCHIVE).read_bytes()))


def load_synsets(out: Path) -> np.ndarray:
    return scipy.io.loadmat(io.BytesIO(devkit(out)[META_MEMBER]), squeeze_me=True)["synsets"]


def test_archives_have_the_real_names_and_layouts(tiny):
    out, result = tiny
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [TRAIN_ARCHIVE, VAL_ARCHIVE, DEVKIT_ARCHIVE]
    )
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".alexrepro-sample.json"]  # whose they are
    assert result.paths == {"train": out / TRAIN_ARCHIVE, "val": out / VAL_ARCHIVE, "devkit": out / DEVKIT_ARCHIVE}

    outer = read_tar((out / TRAIN_ARCHIVE).read_bytes())
    wnids = [c.wnid for c in result.classes]
    assert list(outer) == [f"{w}.tar" for w in sorted(wnids)]  # one inner tar per class
    for wnid, files in train_images(out).items():
        assert WNID.match(wnid)
        assert len(files) == 6
        assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", name) for name in files)

    val = read_tar((out / VAL_ARCHIVE).read_bytes())
    expected = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]
    assert sorted(val) == expected  # flat: no folders
    assert list(val) != expected  # stored out of file-name order, like the real tar

    assert {META_MEMBER, GROUND_TRUTH_MEMBER} <= set(devkit(out))
    assert result.counts == {"train": 18, "val": 6, "classes": 3}


def test_meta_mat_reads_like_the_real_one(tiny):
    out, result = tiny
    synsets = load_synsets(out)
    fields = "ILSVRC2012_ID WNID words gloss num_children children wordnet_height num_train_images"
    assert synsets.dtype.names == tuple(fields.split())
    # torchvision's parser: leaves are the rows with num_children == 0, fields taken by position.
    leaves = [row for row in synsets if row[4] == 0]
    ids, wnids, words = (list(column) for column in list(zip(*leaves, strict=True))[:3])
    assert ids == [1, 2, 3]
    assert [(c.ilsvrc_id, c.wnid, c.name) for c in result.classes] == list(zip(ids, wnids, words, strict=True))
    assert all(WNID.match(w) for w in synsets["WNID"])
    assert all(row["children"].size == 0 and row["num_train_images"] == 6 for row in leaves)
    internal = [row for row in synsets if row["num_children"] > 0]
    assert internal and all(row["ILSVRC2012_ID"] > 3 and row["wordnet_height"] > 0 for row in internal)
    # A mapping bug shows: ILSVRC2012_ID order is not sorted WNID order (REFERENCE.md §5).
    assert wnids != sorted(wnids)
    # savemat's header records the creation time; a reproducible devkit must not.
    assert b"Created on" not in devkit(out)[META_MEMBER][:116]


def test_ground_truth_gives_each_val_image_its_class(tiny):
    out, result = tiny
    plan = plan_sample(SampleConfig.tiny(seed=7))
    truth = [int(line) for line in devkit(out)[GROUND_TRUTH_MEMBER].decode().splitlines()]
    assert truth == [spec.pattern + 1 for spec in plan.val]  # file-name order, ILSVRC2012_IDs
    assert sorted(truth) == [1, 1, 2, 2, 3, 3]
    # Each stored image is the rendering of its planned class, so the labels describe the pixels.
    val = read_tar((out / VAL_ARCHIVE).read_bytes())
    for spec in plan.val:
        assert val[spec.name] == render_image(spec)
    train = train_images(out)
    for wnid, specs in plan.train.items():
        assert {PATTERNS[s.pattern].wnid for s in specs} == {wnid}
        assert [train[wnid][s.name] for s in specs] == [render_image(s) for s in specs]


def test_odd_files_are_really_png_cmyk_and_grayscale(tiny):
    out, result = tiny
    train = train_images(out)
    val = read_tar((out / VAL_ARCHIVE).read_bytes())
    assert sorted(result.odd_files.values()) == ["cmyk", "cmyk", "gray", "png"]
    modes = {}
    for member, kind in result.odd_files.items():
        inner, _, name = member.rpartition("/")
        data = train[inner.removesuffix(".tar")][name] if inner else val[name]
        assert name.endswith(".JPEG")
        image = Image.open(io.BytesIO(data))
        modes[kind] = (image.format, image.mode)
        assert np.asarray(image.convert("L"), dtype=np.float32).std() > 10  # still shows its pattern
    assert modes == {"png": ("PNG", "RGB"), "cmyk": ("JPEG", "CMYK"), "gray": ("JPEG", "L")}
    assert any(m.startswith("ILSVRC2012_val_") and k == "cmyk" for m, k in result.odd_files.items())
    # Everything else is an ordinary photo-like JPEG: RGB with 4:2:0 chroma subsampling.
    odd_names = {member.rpartition("/")[2] for member in result.odd_files}
    ordinary = [data for files in train.values() for name, data in files.items() if name not in odd_names]
    for data in ordinary:
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.mode) == ("JPEG", "RGB")
        assert JpegImagePlugin.get_sampling(image) == 2


def test_sizes_and_aspect_ratios_are_imagenet_like():
    plan = plan_sample(SampleConfig())
    sizes = np.array([(s.width, s.height) for specs in plan.train.values() for s in specs])
    long_side, short_side = sizes.max(1), sizes.min(1)
    assert np.mean((sizes[:, 0] == 500) & (sizes[:, 1] < 500)) > 0.5  # mostly 500 px landscape
    assert 0.1 < np.mean(sizes[:, 1] > sizes[:, 0]) < 0.3  # some portrait
    assert 0 < np.mean(long_side > 1000) < 0.1  # a few big ones
    assert 0 < np.mean(long_side < 300) < 0.2  # some small ones
    assert np.all((long_side / short_side >= 1) & (long_side / short_side <= 2))


def test_stored_images_have_their_planned_sizes(tiny):
    out, _ = tiny
    plan = plan_sample(SampleConfig.tiny(seed=7))
    val = read_tar((out / VAL_ARCHIVE).read_bytes())
    assert all(Image.open(io.BytesIO(val[s.name])).size == (s.width, s.height) for s in plan.val)


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path, pool_start_methods):
    # Enough images that two workers really use a process pool (for the train archive; val has too few images).
    config = SampleConfig(classes=2, train_per_class=40, val_per_class=2, seed=3, image_scale=0.1, workers=1)
    one = write_sample(tmp_path / "one", config, NullProgress())
    assert pool_start_methods == []
    two = write_sample(tmp_path / "two", dataclasses.replace(config, workers=2), NullProgress())
    # The suite has imported torch: its pool must start fresh interpreters, not forks of this process.
    assert pool_start_methods and "fork" not in pool_start_methods
    for key in ("train", "val", "devkit"):
        assert one.paths[key].read_bytes() == two.paths[key].read_bytes(), key
    assert gzip.open(one.paths["devkit"]).read()  # a valid gzip whose header holds no time or name:
    assert one.paths["devkit"].read_bytes()[3:8] == b"\x00\x00\x00\x00\x00"

    other = write_sample(tmp_path / "other", dataclasses.replace(config, seed=4), NullProgress())
    first = read_tar(other.paths["val"].read_bytes())
    assert first != read_tar(one.paths["val"].read_bytes())
    assert other.paths["train"].read_bytes() != one.paths["train"].read_bytes()


def test_tar_members_carry_fixed_metadata(tiny):
    out, _ = tiny
    with tarfile.open(out / TRAIN_ARCHIVE) as archive:
        members = archive.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(members[0].mtime, 0, 0, "", "")}


def test_colour_alone_does_not_tell_the_classes_apart(tmp_path):
    """A nearest-mean-colour classifier (mean RGB per image, class centroids from train) scores near chance."""
    config = SampleConfig(classes=10, train_per_class=30, val_per_class=10, seed=1, image_scale=0.15, workers=1)
    plan = plan_sample(config)

    def mean_rgb(spec):
        return np.asarray(Image.open(io.BytesIO(render_image(spec))).convert("RGB"), np.float64).mean((0, 1))

    train = [s for specs in plan.train.values() for s in specs]
    x_train, y_train = np.array([mean_rgb(s) for s in train]), np.array([s.pattern for s in train])
    x_val, y_val = np.array([mean_rgb(s) for s in plan.val]), np.array([s.pattern for s in plan.val])
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(config.classes)])
    predicted = np.linalg.norm(x_val[:, None] - centroids[None], axis=2).argmin(1)
    accuracy = np.mean(predicted == y_val)
    assert accuracy < 2 / config.classes


def test_progress_counts_every_image(tmp_path):
    class Recorder:
        def __init__(self):
            self.phases = []

        def start(self, description, total, unit="img"):
            self.phases.append([description, total, 0])

        def advance(self, units=1, **fields):
            self.phases[-1][2] += units

        def log(self, line):
            pass

        def finish(self):
            pass

    recorder = Recorder()
    write_sample(tmp_path, SampleConfig.tiny(), recorder)
    assert [(total, done) for _, total, done in recorder.phases] == [(18, 18), (6, 6), (1, 1)]


def test_output_that_is_a_file_is_a_one_line_error(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(AlexReproError) as error:
        write_sample(target, SampleConfig.tiny(), NullProgress())
    assert str(target) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("classes", 1),
        ("classes", len(PATTERNS) + 1),
        ("train_per_class", 1),
        ("val_per_class", 0),
        ("seed", -1),
        ("image_scale", 0.0),
        ("workers", -1),
    ],
)
def test_out_of_range_settings_name_their_key(key, value):
    with pytest.raises(ValueError, match=f"key '{key}' must be"):
        SampleConfig(**{key: value})
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(SampleConfig, None, {key: value})


def test_default_sample_is_the_demo_size():
    config = SampleConfig()
    assert (config.classes, config.val_per_class) == (10, 50)
    assert config.train_per_class >= 250


def test_torchvision_reads_the_devkit(tiny, tmp_path, monkeypatch):
    """An independent reader: torchvision's ImageNet devkit parser (its checksum check switched off)."""
    imagenet = pytest.importorskip("torchvision.datasets.imagenet")
    import torch

    out, result = tiny
    (tmp_path / DEVKIT_ARCHIVE).write_bytes((out / DEVKIT_ARCHIVE).read_bytes())
    monkeypatch.setattr(imagenet, "_verify_archive", lambda *args: None)
    imagenet.parse_devkit_archive(str(tmp_path))
    wnid_to_words, val_wnids = torch.load(tmp_path / imagenet.META_FILE, weights_only=False)
    assert wnid_to_words == {c.wnid: tuple(c.name.split(", ")) for c in result.classes}
    plan = plan_sample(SampleConfig.tiny(seed=7))
    assert val_wnids == [PATTERNS[spec.pattern].wnid for spec in plan.val]
