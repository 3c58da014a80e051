"""The project's exceptions.

Library code raises these; the command line catches `AlexReproError` once, prints its message as one line on
stderr and exits 1. Each message names the file or key at fault and says what to do about it.
"""

import re


class AlexReproError(Exception):
    """Base class: a problem the user can act on. The message is one line that includes the fix."""


class ConfigError(AlexReproError):
    """A configuration file or flag is wrong: unknown key, wrong type, value out of range."""


class SourceError(AlexReproError):
    """An input dataset is missing, has a layout we do not recognise, or its labels do not line up."""


class FormatError(AlexReproError):
    """A file this project wrote earlier (manifest, stats, checkpoint) is missing, of another format or version."""


class OutputExistsError(AlexReproError):
    """The output folder holds results made with other settings; rerun with --overwrite or choose another folder."""


class TooManyRejectedError(AlexReproError):
    """More input images were unreadable than the configured threshold allows."""


class TrainingError(AlexReproError):
    """Training cannot go on: the loss became NaN/Inf, or the run was interrupted (a checkpoint was written)."""


class EvaluationError(AlexReproError):
    """Evaluation saw a different number of images than the manifest promises, or a checkpoint does not fit the data."""


class OutputBusyError(AlexReproError):
    """Another run is writing into the same output folder right now."""


class OutputWriteError(AlexReproError):
    """An output could not be written: the disk is full, the folder is read-only, or a file size limit was hit."""


class WorkerDiedError(AlexReproError):
    """A worker process died without reporting (killed by a signal, typically the out-of-memory killer)."""


class SharedMemoryError(AlexReproError):
    """A loader worker could not get shared memory for a batch: /dev/shm is full or small (a container's default is
    64 MB), or a file-size limit (`ulimit -f`) forbids it."""


class DeviceMemoryError(AlexReproError):
    """The GPU ran out of memory (torch.cuda.OutOfMemoryError): the batch, the model or both are too large for it."""


_OBJECT_ADDRESS = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>|(?<=\w) object at 0x[0-9a-fA-F]+")


def exception_text(exc: BaseException, limit: int = 120) -> str:
    """The first line of `exc`'s message (its type's name when it has none), for a one-line reason.

    Object addresses are dropped: Pillow names the in-memory buffer it read ("cannot identify image file
    <_io.BytesIO object at 0x7f…>"), which would make the same file give a different message on every run (and
    prepare's manifest, which records the reason, differ between runs)."""
    text = _OBJECT_ADDRESS.sub("", str(exc)).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
