"""Feeding the device: each loader batch is moved, decoded if need be, and preprocessed one batch ahead.

The shape is timm's `PrefetchLoader` (timm/data/loader.py): while the model works on batch k, batch k+1's uint8
pixels are copied from pinned memory with non-blocking copies and turned into the model's input (mean subtraction,
reflection, PCA lighting, scaling, dtype and memory format: `alexrepro.train.loop.Preprocess`) on a side CUDA stream; the
compute stream waits for that stream only when it takes the batch. On the CPU the same code runs in order, without a
stream, so the CPU tests (resume equality, ranks × workers independence) cover this path too.

With `decode_on="device"` the loader workers hand over JPEG bytes instead of pixels (alexrepro.data.loader); here they are
decoded as one batch (torchvision's `decode_jpeg` on a list: nvJPEG on CUDA, libjpeg-turbo on the CPU) and cut at the
offsets the workers drew, so the crops are those of the worker decoder up to the decoder's rounding (on the CPU they
are bit-identical: the same libjpeg-turbo).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec; it still works
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)  # n × (3×H×W)
    offsets = batch.offsets.tolist()
    crop = crop or int(images[0].shape[1])  # uncropped evaluation: the whole (square) image
    return torch.stack([image[:, y : y + crop, x : x + crop] for image, (y, x) in zip(images, offsets, strict=True)])


class DeviceFeed:
    """Iterate over a loader's batches with `inputs` and `targets` set on `device`, prepared one batch ahead.

    `prepare(batch)` turns a batch into the model's input on the device (alexrepro.train.loop.Preprocess); it runs on a
    side stream on CUDA. Iterating yields the loader's `Batch` objects, in order, with `inputs` and `targets` filled
    and their worker buffers released (`Batch.release`: `images` is then gone unless it was pinned).
    """

    def __init__(self, loader: Iterable[Batch], prepare: Callable[[Batch], torch.Tensor], device: torch.device):
        self.loader = loader
        self.prepare = prepare
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[Batch]:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        ahead: tuple[Batch, torch.cuda.Event | None] | None = None
        for batch in self.loader:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                batch.targets = batch.labels.to(self.device, non_blocking=True)
                batch.inputs = self.prepare(batch)
                batch.release()  # the pixels are copied out (pinned, or read by `prepare`): the worker may reuse them
                done = torch.cuda.Event() if cuda else None
                if done is not None:
                    done.record(stream)
            if ahead is not None:  # batch k+1 is now queued on the side stream: hand over batch k
                yield self._ready(*ahead)
            ahead = batch, done
        if ahead is not None:
            yield self._ready(*ahead)

    def _ready(self, batch: Batch, done: torch.cuda.Event | None) -> Batch:
        """Make the compute stream wait for `batch`'s preparation (not for the next one's), and tell the caching
        allocator its tensors are used there (else it may give their memory to a later batch too early)."""
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for tensor in (batch.inputs, batch.targets):
                assert tensor is not None  # both set by __iter__ before the batch is handed on
                tensor.record_stream(current)
        return batch
