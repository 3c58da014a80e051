"""Input pipelines over the shards: split by rank and by loader worker, read by offset, batched in the workers.

How an epoch's data is laid out (the same on 1 process or on many):

1. The epoch's *global sequence*, a permutation of the split's samples: for train, the shards in an order shuffled
   by (seed, epoch), then a shuffle buffer of `shuffle_buffer` samples seeded by (seed, epoch) (webdataset's
   shard-shuffle + buffer-shuffle recipe, applied to sample numbers); for validation, manifest order.
2. The global sequence is cut into global batches of `batch_size` (the last one may be smaller, or left out of a
   training epoch with `drop_last`); the epoch length comes from the manifest's counts, so every process knows
   every batch's size without reading anything.
3. Each global batch is split evenly across ranks (torch.distributed); each rank's share is one *rank batch*;
   a rank's DataLoader worker w builds the rank batches k with k % workers == w, and DataLoader's in-order
   round robin hands them to the training loop in step order.

So no sample is duplicated or dropped (but for a partial last batch that `drop_last` leaves out), and the union of
the ranks' batches at step k is exactly the global batch a single process sees at step k: a 2-rank run and a 1-rank
run with the same global batch train on the same data.

The split is at the sample level, never by shard, so it works whatever the number of shards (the built-in sample has
a handful) and whatever ranks × workers. What makes that cheap is the `ShardIndex` that prepare persisted: the byte
offset of every sample's members in the (webdataset-format) tars, one file read per run (alexrepro.data.shards). Each
worker then reads only its own samples, by offset, through `shards.ShardReader`; a streaming reader would have to
stream every shard's bytes and throw most away, a cost that grows with ranks × workers (docs/benchmarks.md "Loader").

Randomness is per sample: the crop position, the reflection and the PCA lighting coefficients of the image at
position i of epoch e come from a generator seeded by (seed, e, i). An epoch's data is therefore the same for any
number of ranks or workers, and a run resumed mid-epoch skips the batches it already did (without reading them)
and sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import random
import re
import signal
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alexrepro.core.errors import (
    AlexReproError,
    DeviceMemoryError,
    FormatError,
    SharedMemoryError,
    WorkerDiedError,
    exception_text,
)
from alexrepro.core.progress import NullProgress, Progress
from alexrepro.core.signals import STOP_SIGNALS, ignore_stop_signals
from alexrepro.data.augment import center_offset
from alexrepro.data.augmentations import PER_SAMPLE, draws_of
from alexrepro.data.config import Augmentation
from alexrepro.data.shards.index import ShardIndex, ShardReader
from alexrepro.data.shards.manifest import Manifest
from alexrepro.data.shards.verify import verify_shards

Decoder = Literal["torchvision", "pil"]
DecodeOn = Literal["workers", "device"]  # where the JPEGs are decoded (alexrepro.data.feed decodes on the device)
JpegDecoder = Callable[[bytes | memoryview], torch.Tensor]  # JPEG bytes (or a view of a mapped shard) → 3×H×W uint8


@dataclass(frozen=True)
class EpochPlan:
    """Which samples of the global sequence each rank takes at each step: arithmetic on the manifest's count."""

    samples: int  # length of the global sequence (the split's count in the manifest)
    batch_size: int  # global batch
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False  # leave out the last global batch when it is partial (under batch_size images)

    @property
    def steps(self) -> int:
        if self.drop_last and self.samples >= self.batch_size:
            return self.samples // self.batch_size
        return -(-self.samples // self.batch_size)

    def global_batch(self, step: int) -> tuple[int, int]:
        """[start, end) of global batch `step` in the sequence."""
        start = step * self.batch_size
        return start, min(start + self.batch_size, self.samples)

    def rank_batch(self, step: int) -> tuple[int, int]:
        """[start, end) of this rank's share of global batch `step` (shares differ by at most one sample)."""
        start, end = self.global_batch(step)
        size = end - start
        return start + self.rank * size // self.world_size, start + (self.rank + 1) * size // self.world_size


@dataclass(frozen=True)
class EpochSpec:
    """Which pass over a split to read: its order, keyed by (seed, epoch), and the step to start from (a resume)."""

    seed: int
    epoch: int  # 0-based
    start_step: int = 0
    shuffle_buffer: int = 2000  # samples in the shuffle buffer; 0: the shards' stored order


STORED_ORDER = EpochSpec(seed=0, epoch=0, shuffle_buffer=0)  # evaluation: every sample once, as stored


@dataclass(frozen=True)
class LoaderSettings:
    """How a run reads its splits, the same in every epoch: the global batch, this rank's share of it, the worker
    processes, and where the JPEGs are decoded."""

    batch_size: int  # the global batch: all ranks' shares together
    workers: int = 0  # DataLoader worker processes; 0 reads in the calling process
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False  # page-locked batches, for non-blocking copies to a CUDA device
    decoder: Decoder = "torchvision"
    decode_on: DecodeOn = "workers"  # "device": workers only read; alexrepro.data.feed decodes the batch
    # Training epochs only (validation and evaluation see every image): leave out the epoch's last batch when it is
    # partial, so that a compiled model sees one batch shape (alexrepro.train.config.TrainConfig.drop_last).
    drop_last: bool = False
    # Seconds the training process waits for a worker's next batch before it gives up on the worker (a frozen
    # process, SIGSTOP, a hung disk): without a bound a stalled worker stalls the run silently. 0: wait forever.
    timeout: float = 0.0


@dataclass
class Batch:
    """One rank batch as the workers hand it over: uint8 crops (or the JPEG bytes) and where they came from.

    The crops are not yet augmented: `draws` holds what each per-sample augmentation (alexrepro.data.augmentations:
    the reflection, the PCA lighting) drew for each image, and the device applies them, where it costs nothing (in a
    worker, mirroring an H×W×3 crop costs about a sixth of the JPEG decode).
    With `decode_on="device"` the workers only read: `images` is None and `jpegs` holds the batch's JPEG files end
    to end (one buffer, so one shared-memory segment per batch), cut by `jpeg_sizes`; alexrepro.data.feed decodes and
    crops them on the device at the same `offsets`.
    """

    images: torch.Tensor | None  # n×3×crop×crop uint8 (channels-last storage: n×crop×crop×3 in memory)
    labels: torch.Tensor  # n int64
    offsets: torch.Tensor  # n×2 int64 (y, x) of each crop in the full image
    draws: dict[str, torch.Tensor]  # augmentation name → n×size float32 of what it drew (zeros where it is off)
    keys: list[str]
    step: int  # index of the global batch in the epoch
    global_size: int  # images in the whole global batch (all ranks), for averaging the loss
    crop: int = 0  # side of the crops (the whole image's side when evaluating uncropped)
    jpegs: torch.Tensor | None = None  # decode_on="device": the n JPEG files concatenated, uint8
    jpeg_sizes: torch.Tensor | None = None  # n int64: the length of each file in `jpegs`
    inputs: torch.Tensor | None = None  # set by alexrepro.data.feed: the preprocessed batch on the device
    targets: torch.Tensor | None = None  # set by alexrepro.data.feed: `labels` on the device
    slot: torch.Tensor | None = None  # the flag of the worker's shared buffer that `images` lies in (SharedSlots)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def flipped(self) -> torch.Tensor:
        """n bool: the crops the device mirrors left-right."""
        return self.draws["flip"][:, 0] > 0

    @property
    def alphas(self) -> torch.Tensor:
        """n×3: the PCA lighting coefficients α (zeros when lighting is off)."""
        return self.draws["pca_lighting"]

    def pin_memory(self) -> Batch:
        if self.images is not None:  # pin the contiguous (channels-last) storage
            self.images = self.images.permute(0, 2, 3, 1).pin_memory().permute(0, 3, 1, 2)
            self.release()  # the pixels are copied out: the worker may refill its buffer
        for name in ("labels", "offsets", "jpegs"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).pin_memory())
        self.draws = {name: values.pin_memory() for name, values in self.draws.items()}
        return self

    def release(self) -> None:
        """Hand the worker's shared buffer back for a later batch; `images` may be overwritten from now on (so it is
        dropped here). Whoever has copied the pixels out calls this: alexrepro.data.feed after preprocessing, or
        pin_memory. Batches never released keep their buffer (see SharedSlots)."""
        if self.slot is not None:
            self.images = None if self.images is None or not self.images.is_pinned() else self.images
            self.slot.zero_()
            self.slot = None


def epoch_seed(seed: int, epoch: int) -> int:
    """One integer per (seed, epoch) for the shard order and the shuffle buffer."""
    return random.Random(f"alexrepro/{seed}/{epoch}").getrandbits(63)


def global_sequence(index: ShardIndex, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """The epoch's order of sample numbers: shard shuffle + buffer shuffle, seeded by (seed, epoch); 0 = stored order.

    The shards are visited in a shuffled order and their samples streamed through a buffer of `shuffle_buffer`: each
    new sample replaces a uniformly drawn slot (`rng.randrange(shuffle_buffer)`), whose sample is emitted; at the end
    the buffer is shuffled and emitted. Computed with numpy, not one Python step per sample (0.3 s at ILSVRC-2012's
    count, paid by every worker at every epoch's start), with the very same draws: `_randranges` takes them from
    the same Mersenne Twister stream as `random.Random.randrange`, and the buffer's replacements are resolved by
    finding, for each draw, the last earlier draw of the same slot. tests/test_loader.py holds the step-by-step
    version as the reference.
    """
    if not shuffle_buffer:
        return np.arange(len(index), dtype=np.int32)
    rng = random.Random(epoch_seed(seed, epoch))
    starts = [*index.shard_starts().tolist(), len(index)]
    order = list(range(len(index.paths)))
    rng.shuffle(order)
    # int32 throughout (a split has fewer than 2**31 samples): the arrays live in every loader worker.
    ranges = [np.arange(starts[shard], starts[shard + 1], dtype=np.int32) for shard in order]
    samples = np.concatenate(ranges) if ranges else np.zeros(0, np.int32)
    buffer, incoming = samples[:shuffle_buffer].copy(), samples[shuffle_buffer:]
    slots = _randranges(rng, shuffle_buffer, len(incoming))
    out = np.empty(len(incoming), np.int32)
    # Sample i of `incoming` goes into slot slots[i] and pushes out what that slot held: the sample of the last
    # earlier draw of the same slot, or the buffer's content before the block. Blocks of 2**16 draws keep the
    # temporaries small (the order is computed in every loader worker).
    block = 1 << 16
    for begin in range(0, len(incoming), block):
        drawn, coming = slots[begin : begin + block], incoming[begin : begin + block]
        # The block's draws grouped by slot, in draw order within a slot (a stable radix sort on 16-bit keys).
        by_slot = np.argsort(drawn.astype(np.int16) if shuffle_buffer <= 1 << 15 else drawn, kind="stable")
        previous = np.full(len(drawn), -1, np.int64)
        same = drawn[by_slot[1:]] == drawn[by_slot[:-1]]
        previous[by_slot[1:][same]] = by_slot[:-1][same]
        out[begin : begin + len(drawn)] = np.where(previous >= 0, coming[np.maximum(previous, 0)], buffer[drawn])
        last = np.ones(len(drawn), bool)
        last[by_slot[:-1][same]] = False  # the last draw of each slot leaves its sample in the buffer
        buffer[drawn[last]] = coming[last]
    remaining = buffer.tolist()
    rng.shuffle(remaining)
    return np.concatenate([out, np.asarray(remaining, np.int32)])


def _randranges(rng: random.Random, n: int, count: int) -> np.ndarray:
    """`count` values of `rng.randrange(n)`, drawn in bulk, leaving `rng` where those calls would have left it.

    randrange(n) takes 32-bit Mersenne Twister outputs, keeps their top n.bit_length() bits and rejects values of
    n or more; numpy's MT19937 continues the same stream from Python's state."""
    if count == 0:
        return np.zeros(0, np.int32)
    bits = n.bit_length()
    version, internal, gauss = rng.getstate()
    generator = np.random.MT19937()
    generator.state = {
        "bit_generator": "MT19937",
        "state": {"key": np.array(internal[:-1], np.uint32), "pos": internal[-1]},
    }
    taken: list[np.ndarray] = []
    have = used = 0
    while have < count:
        # Rejections are about (2**bits - n) / 2**bits of the draws; chunks of at most 2**18 keep the temporaries
        # small (they would otherwise stay in the heap of every worker that computes an epoch's order).
        chunk = min(int((count - have) * (1 << bits) / n * 1.05) + 64, 1 << 18)
        raw = (generator.random_raw(chunk) >> np.uint64(32 - bits)).astype(np.int32)
        accepted = np.flatnonzero(raw < n)
        need = count - have
        if len(accepted) >= need:  # stop at the draw that completes the count; rewind the rest
            used += int(accepted[need - 1]) + 1
            taken.append(raw[accepted[:need]])
            have = count
        else:
            used += chunk
            taken.append(raw[accepted])
            have += len(accepted)
    # Leave `rng` exactly `used` outputs further on: replay them on a fresh generator from the starting state.
    replay = np.random.MT19937()
    replay.state = {
        "bit_generator": "MT19937",
        "state": {"key": np.array(internal[:-1], np.uint32), "pos": internal[-1]},
    }
    replay.random_raw(used)
    state = replay.state["state"]
    rng.setstate((version, (*(int(v) for v in state["key"]), int(state["pos"])), gauss))
    return np.concatenate(taken)


class ShardBatches(IterableDataset):
    """The rank batches of one epoch, built in DataLoader workers (or in the main process with 0 workers)."""

    def __init__(
        self,
        index: ShardIndex,
        plan: EpochPlan,
        augmentation: Augmentation | None,
        epoch: EpochSpec,
        decoder: Decoder = "torchvision",
        crop: int | None = None,
        decode_on: DecodeOn = "workers",
    ):
        self.index = index
        self.plan = plan
        self.augmentation = augmentation  # None: evaluation, the centre `crop` (or the whole image if crop is None)
        self.epoch = epoch
        self.decoder = decoder
        self.crop: int | None = augmentation.crop if augmentation else crop
        if decode_on not in ("workers", "device"):
            raise ValueError(f"decode_on must be 'workers' or 'device', got {decode_on!r}")
        self.decode_on = decode_on
        self._slots = SharedSlots()  # filled in each worker process (each has its own copy of the dataset)
        if decode_on == "workers":
            load_decoder(decoder)

    def __iter__(self) -> Iterator[Batch | _Fault]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        sequence = global_sequence(self.index, self.epoch.seed, self.epoch.epoch, self.epoch.shuffle_buffer)
        decode = DECODERS[self.decoder]
        with ShardReader(self.index) as files:
            for step in range(self.epoch.start_step, self.plan.steps):
                if step % workers != worker:
                    continue
                start, end = self.plan.rank_batch(step)
                try:
                    if self.decode_on == "device":
                        batch = self._collate_jpegs(
                            [self._read(files, int(sequence[i]), i) for i in range(start, end)], step
                        )
                    elif self.crop is None:  # whole images: their size is known once decoded
                        items = [self._load(files, int(sequence[i]), i, decode) for i in range(start, end)]
                        batch = self._collate(items, step)
                    else:
                        batch = self._decode_batch(files, sequence, start, end, step, decode)
                except (AlexReproError, MemoryError) as exc:
                    if info is None:
                        raise
                    # DataLoader re-raises a worker's exception with the worker's whole traceback in its message;
                    # handed over as data, it reaches the user as the one line it is (see _BatchLoader).
                    yield _Fault(exc)
                    return
                yield batch

    def _load(self, files: ShardReader, sample: int, position: int, decode: JpegDecoder):
        label = files.label(sample)  # checked against the manifest's classes
        image = decode_sample(decode, files.jpeg_view(sample), self.index, sample)  # 3×H×W uint8
        if min(image.shape[1:]) < (self.crop or 0):
            raise FormatError(
                f"{self.index.paths[self.index.shard[sample]]}: sample {self.index.key(sample)} is "
                f"{image.shape[2]}×{image.shape[1]}, smaller than the {self.crop}-pixel crop; rerun `alexrepro prepare`"
            )
        crop, (y, x), draws = self._view(position, image.shape[1], image.shape[2])
        # Crop in the decoder's H×W×3 layout: rows of the crop are contiguous there, so stacking is a plain copy
        # (cropping the 3×H×W view instead costs 15× more). The reflection is left to the device (see Batch).
        view = image.permute(1, 2, 0)[y : y + crop, x : x + crop]  # crop×crop×3
        return view, label, (y, x), draws, self.index.key(sample)

    def _read(self, files: ShardReader, sample: int, position: int):
        """decode_on="device": the JPEG bytes and the same view draws as `_load`, sized from the JPEG's header."""
        data = files.jpeg_view(sample)  # copied once, into the batch's buffer (_collate_jpegs)
        height, width = jpeg_size(data)
        crop, offset, draws = self._view(position, height, width)
        return data, files.label(sample), offset, draws, self.index.key(sample)

    def _view(self, position: int, height: int, width: int):
        """(crop side, (y, x), draws) of the image at `position`: per sample, independent of ranks and workers. The
        crop comes first from the sample's random stream, then each augmentation's draws in their order."""
        aug = self.augmentation
        if aug is None:
            crop = self.crop or height
            return crop, center_offset(height, crop), draws_of(None, None)
        crop = aug.crop
        # per sample: independent of ranks and workers
        rng = random.Random(f"{self.epoch.seed}/{self.epoch.epoch}/{position}")
        if aug.random_crop:
            offset = (rng.randrange(height - crop + 1), rng.randrange(width - crop + 1))
        else:
            offset = center_offset(height, crop)
        return crop, offset, draws_of(aug, rng)

    def _decode_batch(self, files: ShardReader, sequence: np.ndarray, start: int, end: int, step: int, decode) -> Batch:
        crop = self.crop
        assert crop is not None, "whole images go through _collate"
        images, slot = self._buffer((end - start, crop, crop, 3))  # n×crop×crop×3
        rows = images.numpy()  # numpy copies a strided crop 5× faster than Tensor.copy_ (4 vs 24 µs for 227²)
        items = []
        for row, position in enumerate(range(start, end)):
            view, *meta = self._load(files, int(sequence[position]), position, decode)
            # Copied at once, so each decoded image is freed before the next one is decoded and the allocator
            # hands the same, cache-warm memory back (holding a batch of them costs fresh pages, which page faults
            # make dear: docs/benchmarks.md "Loader").
            rows[row] = view.numpy()
            items.append((None, *meta))
        batch = self._batch(items, step, crop, images=images.permute(0, 3, 1, 2))  # n×3×crop×crop, channels-last
        batch.slot = slot
        return batch

    def _collate(self, items: list, step: int) -> Batch:
        crop = items[0][0].shape[0] if items else 0
        images, slot = self._buffer((len(items), crop, crop, 3))  # n×crop×crop×3
        if items:
            torch.stack([item[0] for item in items], out=images)
        batch = self._batch(items, step, crop, images=images.permute(0, 3, 1, 2))  # n×3×crop×crop, channels-last
        batch.slot = slot
        return batch

    def _buffer(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where a batch's pixels go. In a worker: shared memory (as DataLoader's default_collate does), one of the
        worker's reusable buffers when one is free (SharedSlots), so that the batch crosses to the training process
        without another copy and without the page faults of a fresh segment."""
        if get_worker_info() is None:
            return torch.empty(shape, dtype=torch.uint8), None
        return self._slots.take(shape)

    def _collate_jpegs(self, items: list, step: int) -> Batch:
        sizes = [len(item[0]) for item in items]
        jpegs = _shared_empty((sum(sizes),), torch.uint8)
        if items:
            jpegs.numpy()[:] = np.frombuffer(b"".join(item[0] for item in items), dtype=np.uint8)
        batch = self._batch(items, step, self.crop or 0, images=None)
        batch.jpegs, batch.jpeg_sizes = jpegs, torch.tensor(sizes, dtype=torch.int64)
        return batch

    def _batch(self, items: list, step: int, crop: int, images: torch.Tensor | None) -> Batch:
        start, end = self.plan.global_batch(step)
        return Batch(
            images=images,
            labels=torch.tensor([item[1] for item in items], dtype=torch.int64),
            offsets=torch.tensor([item[2] for item in items], dtype=torch.int64).reshape(-1, 2),
            draws={
                a.name: torch.tensor([item[3][a.name] for item in items], dtype=torch.float32).reshape(-1, a.size)
                for a in PER_SAMPLE
            },
            keys=[item[4] for item in items],
            step=step,
            global_size=end - start,
            crop=crop,
        )


class SharedSlots:
    """A loader worker's few shared-memory buffers for its batches' pixels, reused once the training process is done
    with them.

    Why: a fresh shared-memory segment per batch (what DataLoader does) is paid in page faults: measured ~100 µs per
    227² crop in the worker alone, a fifth of the JPEG decode (docs/benchmarks.md "Loader"). Each buffer starts with a
    flag byte: the worker sets it when it fills the buffer; the training process clears it (`Batch.release`) once it
    has copied the pixels out. A consumer that never releases loses nothing: with every buffer taken, the worker
    falls back to a fresh segment per batch. `size` covers the batches in flight: DataLoader's prefetch (4 per
    worker), the batch being pinned and the feed's one batch ahead.
    """

    HEADER = 64  # bytes before the pixels: the flag, and alignment

    def __init__(self, size: int = 7):
        self.size = size
        self.buffers: list[torch.UntypedStorage] = []

    def __getstate__(self) -> dict:
        return {"size": self.size, "buffers": []}  # each worker keeps its own buffers

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An uninitialised uint8 tensor of `shape` in shared memory, and its buffer's flag (None: not pooled)."""
        nbytes = self.HEADER + int(np.prod(shape))
        free = next((b for b in self.buffers if b[0] == 0 and b.nbytes() >= nbytes), None)
        if free is None and len(self.buffers) < self.size:
            free = new_shared_storage(nbytes)
            self.buffers.append(free)
        if free is None:
            return _shared_empty(shape, torch.uint8), None
        free[0] = 1
        # torch accepts set_(storage, offset, size) (strides: contiguous); its stubs list only the 4-argument form.
        flag = torch.empty(0, dtype=torch.uint8).set_(free, 0, (1,))  # type: ignore[call-overload]
        return torch.empty(0, dtype=torch.uint8).set_(free, self.HEADER, shape), flag  # type: ignore[call-overload]


def new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    """`nbytes` of shared memory for a batch (in /dev/shm); a failure is one line that says what to change, where
    torch's own error would arrive as the worker's whole traceback."""
    try:
        return torch.UntypedStorage._new_shared(nbytes)
    except (RuntimeError, OSError) as exc:
        raise SharedMemoryError(
            f"a loader worker could not get {nbytes / 1e6:,.1f} MB of shared memory for a batch "
            f"({exception_text(exc, 160)}); give /dev/shm more room (a container's default is 64 MB: e.g. docker "
            "run --shm-size=8g), raise `ulimit -f`, or read in the main process with --workers 0"
        ) from None


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor in shared memory inside a DataLoader worker (plain memory elsewhere)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = new_shared_storage(numel * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame header, without decoding (ITU-T T.81 §B.2.2)."""
    at = 2  # after the SOI marker
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            break
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: baseline, progressive, …
            return int.from_bytes(data[at + 5 : at + 7], "big"), int.from_bytes(data[at + 7 : at + 9], "big")
        at += 2 + length
    raise FormatError("a shard member is not a JPEG with a frame header; rerun `alexrepro prepare`")


def split_index(shards: Path, manifest: Manifest, split: str) -> ShardIndex:
    """The ShardIndex of one split, as prepare persisted it (load it once per run, pass it to every epoch's loader)."""
    return ShardIndex.load(shards, manifest, split)


def verified_index(
    shards: Path,
    manifest: Manifest,
    split: str,
    stamp_dir: Path,
    workers: int,
    part: tuple[int, int] = (0, 1),
    progress: Progress = NullProgress(),
) -> ShardIndex:
    """split_index, with the split's shards checked against the manifest's sha256 once per `stamp_dir` (the
    consumer's output folder; alexrepro.data.shards.verify_shards); `part=(rank, world)` shares the hashing."""
    index = split_index(shards, manifest, split)
    verify_shards(index, stamp_dir, max(1, workers), part, progress)
    return index


def train_loader(
    index: ShardIndex, augmentation: Augmentation, epoch: EpochSpec, settings: LoaderSettings
) -> DataLoader:
    """This rank's batches of training epoch `epoch`, from its `start_step` on (`index`: the train split's, see
    split_index). With `decode_on="device"` the batches hold JPEG bytes, for alexrepro.data.feed to decode on the device."""
    plan = train_plan(len(index), settings)
    dataset = ShardBatches(index, plan, augmentation, epoch, settings.decoder, decode_on=settings.decode_on)
    return _loader(dataset, settings)


def train_plan(samples: int, settings: LoaderSettings) -> EpochPlan:
    """The steps of a training epoch over `samples` images, for this rank."""
    return EpochPlan(samples, settings.batch_size, settings.rank, settings.world_size, settings.drop_last)


def ordered_loader(index: ShardIndex, crop: int | None, settings: LoaderSettings) -> DataLoader:
    """Every sample of `index` exactly once across ranks, in stored order, centre-cropped to `crop` (None: whole):
    validation in training, and evaluation."""
    plan = EpochPlan(len(index), settings.batch_size, settings.rank, settings.world_size)
    dataset = ShardBatches(index, plan, None, STORED_ORDER, settings.decoder, crop, settings.decode_on)
    return _loader(dataset, settings)


def _loader(dataset: ShardBatches, settings: LoaderSettings) -> DataLoader:
    # batch_size=None: the workers already batch; each yields whole rank batches, which DataLoader passes through
    # in worker round-robin order, i.e. in step order.
    return _BatchLoader(
        dataset,
        batch_size=None,
        num_workers=settings.workers,
        pin_memory=settings.pin_memory,
        collate_fn=_identity,
        prefetch_factor=4 if settings.workers else None,
        persistent_workers=False,
        worker_init_fn=_worker_init,
        timeout=settings.timeout if settings.workers else 0,
    )


def _identity(batch: Any) -> Any:  # DataLoader's stubs ask for a list (true only when it batches itself)
    return batch


@dataclass
class _Fault:
    """An error met in a worker (a corrupt sample, no memory), passed to the main process in place of a batch."""

    error: BaseException


class _BatchLoader(DataLoader):
    """DataLoader whose workers ignore the signals that stop a run, and whose worker errors stay one line.

    A scheduler (SLURM, Kubernetes) or Ctrl-C signals the whole process group. Workers that die of it make the main
    process raise from its SIGCHLD handler, wherever it is (even half-way through writing a checkpoint); so workers
    ignore SIGINT and SIGTERM and the main process alone decides how to stop. The signals stay blocked while the
    workers are forked, so that none arrives before a worker has set them aside (`_worker_init`).
    """

    def __iter__(self):
        can_block = hasattr(signal, "pthread_sigmask")
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if can_block else None
        try:
            batches = super().__iter__()
        finally:
            if previous is not None:  # can_block
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if self.num_workers:
            _running.add(batches)
            # Exit handlers run last-registered first: this one must run before multiprocessing's (registered when
            # the first worker started), which would stop the workers with SIGTERM, which they ignore.
            atexit.unregister(_stop_workers_at_exit)
            atexit.register(_stop_workers_at_exit)
        return _raise_faults(batches)


# The iterators whose workers may still run. A run that stops on an error can exit with its iterator still held by
# the error's traceback; multiprocessing's exit handler would then wait for the workers forever.
_running: weakref.WeakSet = weakref.WeakSet()


def _stop_workers_at_exit() -> None:
    for batches in list(_running):
        batches._shutdown_workers()  # unregisters them from torch's SIGCHLD check, asks them to stop, joins them
        for worker in getattr(batches, "_workers", ()):
            if worker.is_alive():  # one that did not answer in time
                worker.kill()
    # A worker whose iterator is gone already but which cannot end (stopped by SIGSTOP: SIGTERM stays pending)
    # would make multiprocessing's own exit handler, which terminates and joins every child, wait forever.
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


def _raise_faults(batches: Iterator) -> Iterator[Batch]:
    for batch in batches:
        if isinstance(batch, _Fault):
            raise batch.error
        yield batch


def _worker_init(_worker_id: int) -> None:
    ignore_stop_signals()  # the main process stops the run; see _BatchLoader
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    torch.set_num_threads(1)  # a worker decodes one image at a time; extra threads only contend for cores


_WORKER_DIED = re.compile(r"DataLoader worker \(pid")
_STALLED = re.compile(r"DataLoader timed out after (\d+(?:\.\d+)?) seconds")


def _worker_death(exc: BaseException) -> str | None:
    """torch's own message when `exc` says a DataLoader worker died (a signal, the out-of-memory killer), else None.

    torch reports it as a plain RuntimeError, raised from its SIGCHLD handler or from the loader's iterator."""
    if isinstance(exc, RuntimeError) and _WORKER_DIED.match(str(exc)):
        return str(exc).strip().splitlines()[0].rstrip(". ")
    return None


@contextlib.contextmanager
def one_line_run_failures(kept: Callable[[], str], memory_fix: str, worker_fix: str) -> Iterator[None]:
    """The two ways a train or evaluate run fails outside its own code, each turned into one line: the GPU out of
    memory, and a loader worker that died. `kept()` says, when it happens, what the run leaves to go on from."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:  # before RuntimeError, its base class
        raise DeviceMemoryError(f"out of GPU memory ({exception_text(exc, 200)}); {kept()}; {memory_fix}") from None
    except RuntimeError as exc:
        stalled = _STALLED.match(str(exc))
        if stalled:  # DataLoader's timeout: a worker alive but making no progress
            seconds = stalled.group(1)
            raise WorkerDiedError(
                f"a loader worker made no progress for {seconds} s (stopped, frozen, or waiting for a disk); "
                f"{kept()}; {worker_fix}, or raise loader_timeout if a batch can take that long"
            ) from None
        died = _worker_death(exc)
        if died is None:
            raise
        raise WorkerDiedError(
            f"a loader worker process died ({died}; on Linux most often the out-of-memory killer, see `dmesg`); "
            f"{kept()}; {worker_fix}"
        ) from None


def decode_sample(decode: JpegDecoder, data: bytes | memoryview, index: ShardIndex, sample: int) -> torch.Tensor:
    """`decode(data)` for sample `sample` of `index`; a JPEG the decoder refuses is a FormatError naming the shard and
    the key (torchvision raises RuntimeError, Pillow OSError or ValueError)."""
    try:
        return decode(data)
    except (RuntimeError, OSError, ValueError, SyntaxError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = re.sub(r"^\w+, \S+:\d+, ", "", reason)  # torchvision's "decode_jpeg, <source file>:171, …"
        raise FormatError(
            f"{index.paths[index.shard[sample]]}: sample {index.key(sample)} is not a decodable JPEG ({reason}); "
            "rerun `alexrepro prepare` to rewrite the shards"
        ) from None


def load_decoder(decoder: Decoder) -> None:
    """Import the decoder's library in this process, before the loader forks its workers.

    A worker that imports torchvision (or Pillow) itself pays for it in every worker of every epoch: on two cores
    about 0.1 CPU-second per worker per epoch, measured (docs/benchmarks.md "Loader"). Forked workers inherit it.
    """
    if decoder == "torchvision":
        _jpeg_op()
    else:
        from PIL import Image  # noqa: F401  (imported for its side effect: loaded once, before the fork)


def decode_torchvision(data: bytes | memoryview) -> torch.Tensor:
    """libjpeg-turbo via torchvision: JPEG bytes → 3×H×W uint8 RGB (faster than PIL here; see bench_loader).
    A writable view (ShardReader.jpeg_view) is decoded in place; bytes are copied, as torch wraps only writable
    buffers without a warning."""
    buffer = data if isinstance(data, memoryview) and not data.readonly else bytearray(data)
    return _jpeg_op()(torch.frombuffer(buffer, dtype=torch.uint8))


@functools.cache
def _jpeg_op() -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision's JPEG decoding op (`torch.ops.image.decode_jpeg`, what `torchvision.io.decode_jpeg` calls on the
    CPU), called directly: per image, the Python wrapper's API-usage log and the deprecation warning that
    torchvision 0.29 raises on every call (silenced with `warnings.catch_warnings`) cost 10–15 % of the decode
    itself on 256² JPEGs (docs/benchmarks.md "Loader"). Falls back to the wrapper where the op is missing."""
    from torchvision.io import ImageReadMode, decode_jpeg

    rgb = ImageReadMode.RGB
    op = getattr(torch.ops.image, "decode_jpeg", None)
    if op is not None:
        return lambda tensor: op(tensor, rgb.value, False)  # (data, mode, apply_exif_orientation)

    def wrapped(tensor: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in favour of TorchCodec; still works
            return decode_jpeg(tensor, mode=rgb)

    return wrapped


def decode_pil(data: bytes | memoryview) -> torch.Tensor:
    """Pillow (or Pillow-SIMD): JPEG bytes → 3×H×W uint8 RGB."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


# The JPEG decoders a loader can use, by the name `decoder` settings give. A loader takes its decoder from here in
# each worker, so that registering a decoder (a faster library; in the tests, one that fails on purpose) is one
# call and needs no other change.
DECODERS: dict[str, JpegDecoder] = {"torchvision": decode_torchvision, "pil": decode_pil}


def register_decoder(name: str, decode: JpegDecoder) -> None:
    """Make `decode` the decoder that `name` selects (JPEG bytes → 3×H×W uint8 RGB tensor)."""
    DECODERS[name] = decode
