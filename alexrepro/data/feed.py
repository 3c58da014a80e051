"""Feeding the device: each loader batch is moved, decoded if need be, and preprocessed one batch ahead.

The shape is timm's `PrefetchLoader` (timm/data/loader.py): while the model works on batch k, batch k+1's uint8
pixels are copied from pinned memory with non-blocking copies and turned into the model's input (mean subtraction,
reflection, PCA lighting, scaling, dtype and memory format: `alexrepro.train.loop.Preprocess`) on a side CUDA stream;
the compute stream waits for that stream only when it takes the batch. Unlike timm's, the preparation runs on a
thread of its own: decoding on the device blocks its caller (below), and the training thread must stay free to queue
the step's kernels. On the CPU the same code runs, without a stream, so the CPU tests (resume equality, ranks ×
workers independence) cover this path too; the preparation has no randomness of its own (the workers drew it), so
the thread changes no result.

With `decode_on="device"` the loader workers hand over JPEG bytes instead of pixels (alexrepro.data.loader); here they
are decoded as one batch (torchvision's `decode_jpeg` on a list: nvJPEG on CUDA, libjpeg-turbo on the CPU) and cut at
the offsets the workers drew, so the crops are those of the worker decoder up to the decoder's rounding (on the CPU
they are bit-identical: the same libjpeg-turbo). torchvision's CUDA decoder holds a global lock, parses every header
on the calling thread and synchronises its own stream before and after each batch: all of that now waits on the
preparing thread, not on the training thread.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from alexrepro.data.loader import Batch


def device_crops(batch: Batch, device: torch.device) -> torch.Tensor:
    """A `decode_on="device"` batch's crops on `device`: n×3×crop×crop uint8, decoded together, cut at the
    workers' offsets (not mirrored: `flipped` is applied with the mean, as for the workers' crops)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    assert batch.jpegs is not None and batch.jpeg_sizes is not None, "not a decode_on='device' batch"
    n, crop = len(batch), batch.crop
    if n == 0:
        return torch.zeros((0, 3, crop, crop), dtype=torch.uint8, device=device)
    files = list(torch.split(batch.jpegs, batch.jpeg_sizes.tolist()))  # views of the one buffer: no copies
    if device.type == "cuda":
        # The decoder allocates its outputs on the calling stream but writes them on a stream of its own, which does
        # not wait for the calling stream. Memory an earlier batch's decoded images held goes back to the calling
        # stream's pool once they are cropped, and may be handed out again for this batch's outputs while the crop
        # that reads them is still queued: finish the calling stream's work first (it holds only the feed's own
        # copies and preprocessing, and this runs on the preparing thread, so the training thread does not wait).
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec; it still works
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)  # n × (3×H×W)
    offsets = batch.offsets.tolist()
    crop = crop or int(images[0].shape[1])  # uncropped evaluation: the whole (square) image
    return torch.stack([image[:, y : y + crop, x : x + crop] for image, (y, x) in zip(images, offsets, strict=True)])


class DeviceFeed:
    """Iterate over a loader's batches with `inputs` and `targets` set on `device`, prepared one batch ahead.

    `prepare(batch)` turns a batch into the model's input on the device (alexrepro.train.loop.Preprocess); it runs on
    a thread of its own and, on CUDA, on a side stream. The loader is read on the calling thread, so its errors and
    a stop signal surface there as before; an error in `prepare` is raised when its batch is taken. Iterating yields
    the loader's `Batch` objects, in order, with `inputs` and `targets` filled and their worker buffers released
    (`Batch.release`: `images` is then gone unless it was pinned).
    """

    def __init__(self, loader: Iterable[Batch], prepare: Callable[[Batch], torch.Tensor], device: torch.device):
        self.loader = loader
        self.prepare = prepare
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[Batch]:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # One thread: batches are prepared in order, at most one ahead of the one the model works on.
        with ThreadPoolExecutor(1, thread_name_prefix="alexrepro-feed") as preparer:
            ahead: tuple[Batch, Future] | None = None
            for batch in self.loader:
                preparing = preparer.submit(self._prepare, batch, stream)
                if ahead is not None:  # batch k+1 is being prepared: hand over batch k
                    yield self._ready(*ahead)
                ahead = batch, preparing
            if ahead is not None:
                yield self._ready(*ahead)

    def _prepare(self, batch: Batch, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """On the preparing thread: fill `batch.inputs` and `batch.targets`; on CUDA, return the event that marks
        them done on the side stream. (The current device and stream are per thread: both are set here.)"""
        on_side = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with torch.cuda.device(self.device) if stream is not None else contextlib.nullcontext(), on_side:
            batch.targets = batch.labels.to(self.device, non_blocking=True)
            batch.inputs = self.prepare(batch)
            batch.release()  # the pixels are copied out (pinned, or read by `prepare`): the worker may reuse them
            if stream is None:
                return None
            done = torch.cuda.Event()
            done.record(stream)
            return done

    def _ready(self, batch: Batch, preparing: Future) -> Batch:
        """Wait until `batch` is prepared (raising what its preparation raised); on CUDA make the compute stream wait
        for its side-stream work (not for the next batch's), and tell the caching allocator its tensors are used
        there (else it may give their memory to a later batch too early)."""
        done = preparing.result()
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for tensor in (batch.inputs, batch.targets):
                assert tensor is not None  # both set by _prepare before its future completes
                tensor.record_stream(current)
        return batch
