"""One writer per output folder, and write failures reported as one line with nothing partial left behind.

Two runs writing into one folder interleave their files: a prepare with --overwrite can delete the shards another
prepare's manifest names, and two trains overwrite each other's checkpoints, while both exit 0. `output_lock` takes
an exclusive `fcntl.flock` on a lock file inside the folder and refuses a second run. The kernel drops a flock when
its holder dies, even by SIGKILL, so a lock file left by a dead run is stale by construction and simply reused.
The lock file is removed on exit, so DVC (which hashes an output after the stage exits) and byte-identical output
listings never see it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from alexrepro.core.errors import OutputBusyError, OutputExistsError, OutputWriteError

LOCK_NAME = ".alexrepro.lock"

# Causes of a failed write that the user fixes outside the program; other OSErrors keep their traceback.
_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def output_lock(out: Path, stage: str) -> Iterator[Path]:
    """Hold an exclusive lock on the folder `out` while the block runs; refuse if another run holds it.

    `out` is created if missing, and removed again at the end if it is still empty."""
    out = Path(out)
    with reported_write_errors(out):
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out}: is a file, not a folder; choose a folder for the {stage} output")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK_NAME
        handle = _acquire(path, out, stage)
    try:
        yield out
    finally:
        # Unlink before closing: whoever opens the path after this gets a new file, and `_acquire` makes a run
        # that opened the old one just before the unlink try again.
        with contextlib.suppress(OSError):
            os.unlink(path)
        handle.close()
        if created:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()


def _acquire(path: Path, out: Path, stage: str):
    while True:
        try:
            handle = open(path, "a+")
        except FileNotFoundError:  # a finishing run removed the empty folder in between
            out.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutputBusyError(
                f"{out}: another run is writing into this folder (it holds {LOCK_NAME}); wait for it to finish, "
                f"stop it, or give this {stage} another output folder"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:  # the previous holder removed it between our open and our lock
            same = False
        if same:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{stage} pid {os.getpid()}\n")  # for people wondering who holds it
            handle.flush()
            return handle
        handle.close()


@contextlib.contextmanager
def reported_write_errors(out: Path, partial: Iterable[Path] = ()) -> Iterator[None]:
    """Turn an OSError raised while writing under `out` into one OutputWriteError line naming the path and the
    cause (ENOSPC, EROFS, EACCES, EFBIG). On such a failure the files in `partial` are deleted: outputs that make
    sense only together (a new stats.npz beside an old stats.json would be a lie)."""
    try:
        yield
    except OSError as exc:
        _remove(partial)
        where = Path(exc.filename) if exc.filename else Path(out)
        if exc.errno not in _WRITE_FAILURES or not _inside(where, Path(out)):
            raise
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        raise OutputWriteError(
            f"{where}: cannot write ({name}: {exc.strerror}); free disk space or choose a writable output folder, "
            "then rerun"
        ) from None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).unlink()
