"""The peer libraries the benchmarks time beside alexrepro, on the same images, each used as its documentation shows.

Writers (`bench prepare`): a process pool runs prepare's own resize function (`imaging.resize_square_jpeg`) over the
same ImageFolder, in file order, and the library's writer stores what comes back: webdataset's `ShardWriter` and
MosaicML streaming's `MDSWriter`. They keep no manifest, member index, resume state or list of rejected files: what
prepare adds on top is in prepare's own rows.

Readers (`bench loader`): each library's dataset over the same images stored in its own format (written before any
timing), with the torchvision decoder, random crop, reflection and uint8 batches of the training loader:
webdataset's pipeline in its WebLoader (over prepare's shards, which are webdataset tars), MosaicML's
`StreamingDataset` in a DataLoader, litdata's `StreamingDataset` in its `StreamingDataLoader`.

webdataset is a test dependency. MosaicML streaming and litdata are not: pip would replace Pillow-SIMD with stock
Pillow for both (and numpy with an older one for MosaicML), and the comparison needs the same decoder on each side.
`scripts/install-bench-peers.sh` makes `.venv-peers`, the project's environment plus both libraries installed
without those two requirements; a benchmark run with its python has their rows. A peer whose library does not
import has no row, and the report's notes name it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import multiprocessing
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from alexrepro.data import imaging

INSTALL_HINT = "scripts/install-bench-peers.sh, then run the benchmark with .venv-peers/bin/python -m alexrepro"


@dataclass(frozen=True)
class Peer:
    name: str  # as the report's rows and ratios call it
    module: str  # what must import for its row


@functools.cache
def installed(peer: Peer) -> bool:
    """Whether the peer's library imports. One that is found but fails to import (a broken install, or the GPU
    check's stand-in that makes webdataset unimportable as on the GPU machine) has no row either.

    Imported here where torch already is (the loader benchmarks); elsewhere in a child interpreter, since each of
    these libraries imports torch, which would make bench prepare's process unsafe to fork."""
    try:
        if importlib.util.find_spec(peer.module) is None:
            return False
    except (ImportError, ValueError):
        return False
    if "torch" not in sys.modules:
        return subprocess.run([sys.executable, "-c", f"import {peer.module}"], capture_output=True).returncode == 0
    try:
        importlib.import_module(peer.module)
    except ImportError:
        return False
    return True


def missing_note(peers: tuple[Peer, ...]) -> str | None:
    """The report's note on the peers that have no row here, if any."""
    absent = [peer.name for peer in peers if not installed(peer)]
    return f"not importable here, no row: {', '.join(absent)} ({INSTALL_HINT})" if absent else None


# ---------------------------------------------------------------------------------------------------------------------
# Writers. Each is `write(source, out, workers, shard_size, shard_bytes, size, quality) -> images written`, a
# module-level function, since `bench prepare` runs it in a fresh interpreter (bench.data._timed_in_child).


@dataclass(frozen=True)
class WriterPeer(Peer):
    write: Callable[..., int]


def _resized_file(path: Path, size: int, quality: int) -> tuple[Path, bytes]:
    return path, imaging.resize_square_jpeg(path.read_bytes(), size, quality)


@contextlib.contextmanager
def _resized_in_pool(source: Path, workers: int, size: int, quality: int) -> Iterator[Iterator[tuple[str, int, bytes]]]:
    """(key, label, resized JPEG) of every image of the ImageFolder `source`, in file order, from a forked pool of
    `workers` processes, as a user of a writer library would feed it."""
    files = sorted(Path(source).rglob("*.JPEG"))
    classes = {name: i for i, name in enumerate(sorted({p.parent.name for p in files}))}
    resize = functools.partial(_resized_file, size=size, quality=quality)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield ((p.stem, classes[p.parent.name], jpeg) for p, jpeg in pool.imap(resize, files, chunksize=4))


def webdataset_writer(source, out, workers: int, shard_size: int, shard_bytes: int, size: int, quality: int) -> int:
    """webdataset's `ShardWriter`, a new tar every `shard_size` samples."""
    import webdataset

    Path(out).mkdir(parents=True, exist_ok=True)
    written = 0
    with (
        _resized_in_pool(source, workers, size, quality) as samples,
        webdataset.ShardWriter(str(Path(out) / "train-%06d.tar"), maxcount=shard_size, verbose=0) as sink,
    ):
        for key, label, jpeg in samples:
            sink.write({"__key__": key, "jpg": jpeg, "cls": label})
            written += 1
    return written


def mosaicml_writer(source, out, workers: int, shard_size: int, shard_bytes: int, size: int, quality: int) -> int:
    """MosaicML streaming's `MDSWriter`, uncompressed, a new shard at `shard_bytes` (it cuts shards by size only)."""
    from streaming import MDSWriter

    written = 0
    columns = {"jpg": "bytes", "cls": "int"}
    with (
        _resized_in_pool(source, workers, size, quality) as samples,
        MDSWriter(out=str(out), columns=columns, size_limit=shard_bytes) as sink,
    ):
        for _, label, jpeg in samples:
            sink.write({"jpg": jpeg, "cls": label})
            written += 1
    return written


WRITERS = (
    WriterPeer("webdataset ShardWriter + pool", "webdataset", webdataset_writer),
    WriterPeer("MosaicML MDSWriter + pool", "streaming", mosaicml_writer),
)


# ---------------------------------------------------------------------------------------------------------------------
# Readers. `store(folder, manifest, out) -> where its dataset lies` writes the prepared folder's train images in the
# library's format (untimed); `epoch(dataset, crop, batch_size, workers, seed) -> bench.epochs.timed_epoch's dict`.


@dataclass(frozen=True)
class ReaderPeer(Peer):
    store: Callable[..., Path]
    epoch: Callable[..., dict]


def _train_samples(folder: Path, manifest) -> Iterator[tuple[bytes, int]]:
    from alexrepro.data.shards.index import iter_split

    for sample in iter_split(folder, "train", manifest):
        yield sample.jpeg, sample.label


def _as_is(folder: Path, manifest, out: Path) -> Path:
    return folder  # prepare's shards are webdataset tars


def webdataset_epoch(folder: Path, crop: int, batch_size: int, workers: int, seed: int) -> dict:
    """webdataset's pipeline as its documentation builds one: shard shuffle, a 2000-sample shuffle buffer, map,
    batched, in its WebLoader."""
    import webdataset

    from alexrepro.bench.epochs import crop_flip, stack, timed_epoch
    from alexrepro.data.loader import decode_torchvision

    augment = crop_flip(crop, decode_torchvision, seed)
    urls = sorted(str(path) for path in Path(folder).glob("train-*.tar"))
    pipeline = (
        webdataset.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False)
        .shuffle(2000)
        .map(lambda sample: (augment(sample["jpg"]), int(sample["cls"])))
        .batched(batch_size, collation_fn=stack, partial=True)
    )
    return timed_epoch(webdataset.WebLoader(pipeline, batch_size=None, num_workers=workers), lambda b: len(b[0]))


def _mosaicml_store(folder: Path, manifest, out: Path, shards: int = 8) -> Path:
    from streaming import MDSWriter

    total = sum(shard.size for shard in manifest.splits["train"].shards)
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "cls": "int"}, size_limit=math.ceil(total / shards)) as sink:
        for jpeg, label in _train_samples(folder, manifest):
            sink.write({"jpg": jpeg, "cls": label})
    return out


def mosaicml_epoch(dataset: Path, crop: int, batch_size: int, workers: int, seed: int) -> dict:
    """MosaicML's `StreamingDataset` subclassed for the sample's transform, as its documentation does, shuffled,
    in a DataLoader."""
    import torch
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    from alexrepro.bench.epochs import crop_flip, stack, timed_epoch
    from alexrepro.data.loader import decode_torchvision

    augment = crop_flip(crop, decode_torchvision, seed)

    class Crops(StreamingDataset):
        def __getitem__(self, index: int):
            sample = super().__getitem__(index)
            return augment(sample["jpg"]), int(sample["cls"])

    # A dataset keeps its local folder registered in shared memory until it is collected; the previous epoch's is
    # gone by now, and this drops its registration, which a new dataset on the same folder would otherwise refuse.
    clean_stale_shared_memory()
    crops = Crops(local=str(dataset), shuffle=True, shuffle_seed=seed, batch_size=batch_size)
    loader: torch.utils.data.DataLoader = torch.utils.data.DataLoader(
        crops, batch_size=batch_size, num_workers=workers, collate_fn=stack
    )
    return timed_epoch(loader, lambda b: len(b[0]))


def _litdata_store(folder: Path, manifest, out: Path, shards: int = 8) -> Path:
    from litdata.streaming.writer import BinaryWriter

    # litdata's writer as `litdata.optimize` drives it, in this process (optimize would start its own workers)
    writer = BinaryWriter(str(out), chunk_size=math.ceil(manifest.splits["train"].count / shards))
    for index, (jpeg, label) in enumerate(_train_samples(folder, manifest)):
        writer.add_item(index, {"jpg": jpeg, "cls": label})
    writer.done()
    writer.merge()
    return out


def litdata_epoch(dataset: Path, crop: int, batch_size: int, workers: int, seed: int) -> dict:
    """litdata's `StreamingDataset` subclassed for the sample's transform, shuffled, in its `StreamingDataLoader`."""
    import litdata

    from alexrepro.bench.epochs import crop_flip, stack, timed_epoch
    from alexrepro.data.loader import decode_torchvision

    augment = crop_flip(crop, decode_torchvision, seed)

    class Crops(litdata.StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            return augment(sample["jpg"]), int(sample["cls"])

    crops = Crops(input_dir=str(dataset), shuffle=True, seed=seed)
    loader = litdata.StreamingDataLoader(crops, batch_size=batch_size, num_workers=workers, collate_fn=stack)
    return timed_epoch(loader, lambda b: len(b[0]))


READERS = (
    ReaderPeer("webdataset", "webdataset", _as_is, webdataset_epoch),
    ReaderPeer("MosaicML streaming", "streaming", _mosaicml_store, mosaicml_epoch),
    ReaderPeer("litdata", "litdata", _litdata_store, litdata_epoch),
)
