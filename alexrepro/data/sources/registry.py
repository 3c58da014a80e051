"""The readers, in the order they are tried, and `find_source`, which asks each whether it recognises a folder.

A new layout is one reader (see `base.SourceReader`) added to READERS; the order matters where one layout holds
another's marks (the Kaggle tree has a `train/` too, deeper down).
"""

from __future__ import annotations

import errno
from pathlib import Path

from alexrepro.core.errors import SourceError
from alexrepro.data.sources.archives import ArchiveReader
from alexrepro.data.sources.base import ReadOptions, Source, SourceReader, printable
from alexrepro.data.sources.tree import KaggleReader, TreeReader

READERS: tuple[SourceReader, ...] = (ArchiveReader(), KaggleReader(), TreeReader())


def find_source(path: Path, follow_symlinks: bool = False, listings: Path | None = None) -> Source:
    """Recognise the layout of `path` and list its labelled images; raise SourceError saying what was looked for.

    In a folder tree, a symbolic link that points outside `path` is refused unless `follow_symlinks` is set; a
    dangling link or a link loop is always an error (the file it stood for would otherwise be lost silently).
    `listings`: a folder where archive listings saved by `save_listings` are looked for (prepare's state folder).
    """
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: source folder not found; pass the folder that holds the ILSVRC-2012 download")
    options = ReadOptions(follow_symlinks, listings)
    for reader in READERS:
        if reader.recognises(path):
            try:
                return reader.read(path, options)
            except OSError as exc:  # an archive, a class folder or a label file the user may not read
                where = printable(str(exc.filename or path))
                code = errno.errorcode.get(exc.errno or 0, exc.strerror or type(exc).__name__)
                raise SourceError(f"{where}: cannot read it ({code}); check its permissions, or the disk") from None
    looked_for = ", ".join(reader.looked_for for reader in READERS[:-1]) + f" and {READERS[-1].looked_for}"
    raise SourceError(
        f"{path}: no known dataset layout; looked for {looked_for}; point SOURCE at the folder holding one of them"
    )
