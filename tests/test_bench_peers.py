"""The peer libraries the benchmarks time (alexrepro.bench.peers) really write and read every image.

webdataset is installed with the tests; MosaicML streaming and litdata only in .venv-peers
(scripts/install-bench-peers.sh), where CI runs this file again: elsewhere their cases skip, naming the script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from alexrepro.bench.data import photo_like_jpegs, write_image_folder
from alexrepro.bench.loader import write_bench_shards
from alexrepro.bench.peers import INSTALL_HINT, READERS, WRITERS, Peer, installed
from alexrepro.data.imaging import decode_rgb, pillow_build

pytestmark = pytest.mark.peers


def _needs(peer: Peer) -> None:
    if not installed(peer):
        pytest.skip(f"{peer.module} is not installed ({INSTALL_HINT})")


def _read_back(peer: Peer, out) -> list[tuple[bytes, int]]:
    """Every (jpeg, label) in a writer's output, read with the library's own reader."""
    if peer.module == "webdataset":
        import webdataset

        urls = sorted(map(str, out.glob("*.tar")))
        return [(s["jpg"], int(s["cls"])) for s in webdataset.WebDataset(urls, shardshuffle=False)]
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return [(dataset[i]["jpg"], int(dataset[i]["cls"])) for i in range(len(dataset))]


@pytest.mark.parametrize("peer", WRITERS, ids=lambda p: p.module)
def test_peer_writers_store_every_image_resized_like_prepare(tmp_path, peer):
    _needs(peer)
    write_image_folder(tmp_path / "src", photo_like_jpegs(6, 0))
    out = tmp_path / "out"
    assert peer.write(tmp_path / "src", out, 2, 4, 2_000, 32, 90) == 6
    samples = _read_back(peer, out)
    assert len(samples) == 6 and all(decode_rgb(jpeg).shape == (32, 32, 3) for jpeg, _ in samples)
    assert sorted(label for _, label in samples) == [0, 0, 1, 1, 2, 3]  # write_image_folder's 4 classes
    if peer.module == "streaming":  # cut by bytes: six images of about 1 KB over 2 KB shards make several shards
        assert len(json.loads((out / "index.json").read_text())["shards"]) > 1


@pytest.mark.parametrize("peer", READERS, ids=lambda p: p.module)
@pytest.mark.parametrize("workers", [0, 2])
def test_peer_readers_give_every_image_as_uint8_crops(tmp_path, peer, workers):
    _needs(peer)
    manifest = write_bench_shards(tmp_path / "shards", 20, 48, seed=0)
    dataset = peer.store(tmp_path / "shards", manifest, tmp_path / "stored")
    epoch = peer.epoch(dataset, 40, 8, workers, 0)
    assert epoch["images"] == 20 and epoch["img_s"] > 0


def test_peers_environment_keeps_the_projects_decoder():
    """In .venv-peers the peers sit beside Pillow-SIMD where .venv has it, never stock Pillow over it."""
    if not all(installed(peer) for peer in (*WRITERS, *READERS)):
        pytest.skip(f"not every peer is installed ({INSTALL_HINT})")
    import PIL

    assert "/.venv/" in PIL.__file__ and pillow_build().startswith(("Pillow-SIMD", "Pillow "))
    assert torch.__file__.startswith(PIL.__file__.split("/PIL/")[0])


def test_a_peer_that_is_found_but_does_not_import_has_no_row(tmp_path):
    """As on the GPU machine, which the GPU check imitates with a webdataset that raises ImportError: `bench
    loader` leaves the peer out and names it, instead of failing."""
    (tmp_path / "webdataset.py").write_text('raise ImportError("webdataset is not installed on the GPU machine")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "alexrepro", "bench", "loader", "--images", "16", "--workers", "1",
               "--batch-size", "8", "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert not any(row["name"].startswith("webdataset pipeline") for row in report["rows"])
    note = next(note for note in report["notes"] if note.startswith("not importable here, no row:"))
    assert "webdataset" in note and "install-bench-peers.sh" in note
