"""Layout detection and labelling: every source layout yields the same labelled images, by the devkit's mapping."""

from __future__ import annotations

import shutil

import pytest

from alexrepro.core.errors import SourceError
from alexrepro.data.sources.base import make_key
from alexrepro.data.sources.registry import find_source
from helpers import fixtures as fx


def labelled(source) -> dict[str, dict[str, int]]:
    return {split: {r.key: r.label for r in refs} for split, refs in source.splits.items()}


def expected_labels(tiny: fx.TinySet) -> dict[str, dict[str, int]]:
    return {
        "train": {make_key(name): tiny.label(wnid) for wnid, images in tiny.train.items() for name, _ in images},
        "val": {make_key(name): tiny.label(wnid) for name, wnid, _ in tiny.val},
    }


def read(ref) -> bytes:
    with open(ref.file, "rb") as handle:
        handle.seek(ref.offset)
        return handle.read(ref.size)


@pytest.fixture(scope="module")
def tiny():
    return fx.tiny_set()


def test_archives_are_indexed_in_place_and_labelled_by_the_devkit(tmp_path, tiny):
    found = find_source(fx.write_archives(tmp_path, tiny))
    assert found.layout == "ilsvrc2012-archives"
    # Class index = sorted WNID position; the devkit's IDs (deliberately in another order) are kept beside it.
    assert [(c.index, c.wnid, c.ilsvrc_id) for c in found.classes] == [
        (0, "n01000001", 2),
        (1, "n01000002", 3),
        (2, "n01000003", 1),
    ]
    assert found.classes[0].name == "alpha, first class"
    assert labelled(found) == expected_labels(tiny)
    # The val tar's member order is scrambled; the listing is in file-name order.
    assert [r.key for r in found.splits["val"]] == sorted(r.key for r in found.splits["val"])
    # Each reference is one seek + read of the outer archive, giving the original bytes.
    originals = {make_key(n): d for images in tiny.train.values() for n, d in images}
    originals.update({make_key(n): d for n, _, d in tiny.val})
    for ref in found.splits["train"] + found.splits["val"]:
        assert read(ref) == originals[ref.key]
    assert {r.file for r in found.splits["train"]} == {str(tmp_path / "ILSVRC2012_img_train.tar")}
    assert found.splits["train"][0].path.startswith("ILSVRC2012_img_train.tar/n0100000")


@pytest.mark.parametrize(
    "layout",
    [
        "imagefolder+devkit",
        "flat-val+devkit-archive",
        "flat-val+devkit-folder",
        "flat-val+kaggle-csv",
        "kaggle-cls-loc",
    ],
)
def test_every_extracted_layout_gives_the_same_labels(tmp_path, tiny, layout):
    if layout == "imagefolder+devkit":
        fx.write_tree(tmp_path, tiny, val="folders")
        fx.write_devkit_archive(tmp_path, tiny.classes, tiny.val_ids)
    elif layout == "flat-val+devkit-archive":
        fx.write_tree(tmp_path, tiny, val="flat")
        fx.write_devkit_archive(tmp_path, tiny.classes, tiny.val_ids)
    elif layout == "flat-val+devkit-folder":
        fx.write_tree(tmp_path, tiny, val="flat")
        fx.write_devkit_folder(tmp_path, tiny.classes, tiny.val_ids)
    elif layout == "flat-val+kaggle-csv":
        fx.write_tree(tmp_path, tiny, val="flat")
        fx.write_loc_files(tmp_path, tiny)
    else:
        fx.write_kaggle(tmp_path, tiny)
    found = find_source(tmp_path)
    assert labelled(found) == expected_labels(tiny)
    assert [c.wnid for c in found.classes] == ["n01000001", "n01000002", "n01000003"]
    by_devkit = "devkit" in layout
    assert [c.ilsvrc_id for c in found.classes] == ([2, 3, 1] if by_devkit else [None] * 3)
    assert found.classes[2].name == "gamma, third class"  # from meta.mat words or LOC_synset_mapping.txt
    assert found.layout.startswith("kaggle-cls-loc" if layout == "kaggle-cls-loc" else "extracted")
    assert [r.key for r in found.splits["val"]] == sorted(r.key for r in found.splits["val"])
    assert all(r.offset == 0 and r.size == len(read(r)) for r in found.splits["val"])


def test_reference_check_value_val_image_1_is_sea_snake(tmp_path):
    """REFERENCE.md §5: val image 1 is n01751748, ILSVRC2012_ID 490, sorted index 65."""
    below = [(f"n0100{i:04d}", 10 + i, f"class {i}") for i in range(65)]  # 65 WNIDs sort before the sea snake
    above = [(f"n0200{i:04d}", 100 + i, f"class {i}") for i in range(5)]
    leaves = below + [("n01751748", 490, "sea snake")] + above
    fx.write_devkit_folder(tmp_path, leaves, [490, 10])
    for wnid, _, _ in leaves:  # every devkit class needs a training image
        (tmp_path / "train" / wnid).mkdir(parents=True)
        (tmp_path / "train" / wnid / f"{wnid}_1.JPEG").write_bytes(fx.image_bytes(1))
    (tmp_path / "val").mkdir()
    for i in (1, 2):
        (tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(fx.image_bytes(i))
    found = find_source(tmp_path)
    first = found.splits["val"][0]
    assert first.key == "ILSVRC2012_val_00000001" and first.label == 65
    assert found.classes[65].wnid == "n01751748" and found.classes[65].ilsvrc_id == 490
    assert found.splits["val"][1].label == 0
    assert len(found.classes) == 71  # the internal node of meta.mat is not a class


def test_own_classes_imagefolder(tmp_path):
    found = find_source(fx.write_own_classes(tmp_path))
    assert found.layout == "imagefolder, val in class folders"
    assert [(c.index, c.wnid, c.ilsvrc_id, c.name) for c in found.classes] == [
        (0, "Mango", None, "Mango"),
        (1, "apple", None, "apple"),
        (2, "zebra", None, "zebra"),
    ]
    val = {r.key: (r.label, r.path) for r in found.splits["val"]}
    assert val["apple_val_0"] == (1, "val/apple/sub/apple.val.0.png")  # nested folder; '.' gone from the key
    assert sorted(r.label for r in found.splits["train"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_train_only_tree_has_no_val_split(tmp_path):
    fx.write_own_classes(tmp_path)
    shutil.rmtree(tmp_path / "val")
    assert set(find_source(tmp_path).splits) == {"train"}


def test_unknown_layout_says_what_was_looked_for(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(SourceError, match="ILSVRC2012_img_train.tar.*CLS-LOC.*train/<class>"):
        find_source(tmp_path)
    with pytest.raises(SourceError, match="not found"):
        find_source(tmp_path / "missing")


def test_flat_val_without_labels_is_an_error(tmp_path, tiny):
    fx.write_tree(tmp_path, tiny, val="flat")
    with pytest.raises(SourceError, match="flat val/ needs labels.*LOC_val_solution.csv"):
        find_source(tmp_path)


def test_val_image_missing_from_the_kaggle_csv_is_an_error(tmp_path, tiny):
    fx.write_kaggle(tmp_path, tiny)
    solution = tmp_path / "LOC_val_solution.csv"
    solution.write_text("".join(solution.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(SourceError, match="ILSVRC2012_val_00000006"):
        find_source(tmp_path)


def test_key_collision_names_both_files(tmp_path, tiny):
    fx.write_tree(tmp_path, tiny, val="folders")
    (tmp_path / "train" / "n01000002" / "n01000001_1.png").write_bytes(fx.image_bytes(3, fmt="PNG"))
    with pytest.raises(SourceError, match=r"n01000001/n01000001_1\.JPEG and .*n01000002/n01000001_1\.png"):
        find_source(tmp_path)


def test_class_folder_unknown_to_the_devkit_is_an_error(tmp_path, tiny):
    fx.write_tree(tmp_path, tiny, val="folders")
    fx.write_devkit_archive(tmp_path, tiny.classes[:2], [1])
    with pytest.raises(SourceError, match="n01000002"):
        find_source(tmp_path)


def test_val_tar_without_devkit_is_an_error(tmp_path, tiny):
    fx.write_archives(tmp_path, tiny)
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    with pytest.raises(SourceError, match="devkit"):
        find_source(tmp_path)


def test_damaged_archive_is_a_source_error(tmp_path, tiny):
    fx.write_archives(tmp_path, tiny)
    (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"not a tar" * 200)
    with pytest.raises(SourceError, match="ILSVRC2012_img_train.tar"):
        find_source(tmp_path)


def test_a_new_layout_is_one_reader_registered_in_one_place(tmp_path, monkeypatch):
    """find_source asks each registered reader in turn; a reader added to the registry is found without any other
    change, and the unknown-layout error lists what every reader looks for."""
    from alexrepro.core.errors import SourceError
    from alexrepro.data.shards.manifest import ClassInfo
    from alexrepro.data.sources import registry
    from alexrepro.data.sources.base import ImageRef, ReadOptions, Source

    class OneFileReader:
        looked_for = "only.jpg (a one-image layout)"

        def recognises(self, path):
            return (path / "only.jpg").is_file()

        def read(self, path, options: ReadOptions):
            file = path / "only.jpg"
            ref = ImageRef("only", 0, "only.jpg", str(file), 0, file.stat().st_size)
            return Source("one-file", (ClassInfo(0, "n00000001", None, "one"),), {"train": (ref,)})

    (tmp_path / "only.jpg").write_bytes(b"x")
    with pytest.raises(SourceError, match="only.jpg"):
        monkeypatch.setattr(registry, "READERS", registry.READERS + (OneFileReader(),))
        (tmp_path / "empty").mkdir()
        registry.find_source(tmp_path / "empty")
    assert registry.find_source(tmp_path).layout == "one-file"
