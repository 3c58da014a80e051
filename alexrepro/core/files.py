"""File helpers every stage shares: a file's sha256, and the check of a JSON file's format and version."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from alexrepro.core.errors import AlexReproError, FormatError


def check_format(data: Any, expected_format: str, expected_version: int, source: str, remedy: str) -> None:
    """Raise FormatError unless `data` is a mapping carrying the expected `format` and `version`."""
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FormatError(f"{source}: expected format '{expected_format}', found {found!r}; run `{remedy}` to make it")
    if data.get("version") != expected_version:
        raise FormatError(
            f"{source}: {expected_format} version {data.get('version')!r}, this alexrepro reads version "
            f"{expected_version}; rerun `{remedy}`"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_utf8(path: Path, error: type[AlexReproError], what: str, fix: str) -> str:
    """The text of `path`; a byte that is not UTF-8, or a file that cannot be read, is `error` as one line naming
    the byte or the cause, and `fix` (what to do about a damaged or mis-encoded file)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); {fix}"
        ) from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc}); check its permissions") from None
