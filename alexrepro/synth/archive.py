"""The archive writers both synthetic downloads share: tar members with fixed metadata (so the bytes depend only on
the content), the devkit tar.gz and its meta.mat, and the output folder."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np

from alexrepro.core.errors import AlexReproError
from alexrepro.synth.ilsvrc import ARCHIVE_MTIME, DEVKIT_DIR, GROUND_TRUTH_MEMBER, META_MEMBER


class SampleOutputError(AlexReproError):
    """The sample's output folder cannot be created or written."""


def make_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SampleOutputError(f"{out}: exists and is not a folder; give OUT as a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise SampleOutputError(f"{out}: cannot create the folder ({reason}); choose a writable path") from None


def write_devkit(handle, readme: str, meta: bytes, ground_truth: str) -> None:
    """The devkit tar.gz in the real layout (the built-in sample's and `sample --scale`'s): a readme, meta.mat and
    the validation ground truth; gzip header without name or time, so the bytes depend only on the content."""
    with gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            add_folder(archive, f"{DEVKIT_DIR}/")
            add_member(archive, f"{DEVKIT_DIR}/readme.txt", readme.encode())
            add_folder(archive, f"{DEVKIT_DIR}/data/")
            add_member(archive, META_MEMBER, meta)
            add_member(archive, GROUND_TRUTH_MEMBER, ground_truth.encode())


def mat_file(variables: dict) -> bytes:
    """A MATLAB 5 file, with the creation time savemat writes into its 116-byte text header replaced by fixed text."""
    buffer = io.BytesIO()
    import scipy.io  # only the devkit needs it

    scipy.io.savemat(buffer, variables, format="5", do_compression=False)
    header = b"MATLAB 5.0 MAT-file, written by alexrepro sample".ljust(116)
    return header + buffer.getvalue()[116:]


def as_matlab(value):
    if isinstance(value, int):
        return np.array([[value]], np.uint16)
    return value


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = fixed_info(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def add_folder(archive: tarfile.TarFile, name: str) -> None:
    info = fixed_info(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    archive.addfile(info)


def fixed_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = ARCHIVE_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
