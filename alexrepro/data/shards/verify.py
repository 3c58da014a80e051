"""The sha256 check of a consumer's shards against the manifest, once per shard per output folder."""

from __future__ import annotations

import json
from pathlib import Path

from alexrepro.core.atomic import atomic_write_text
from alexrepro.core.errors import FormatError
from alexrepro.core.files import sha256_file
from alexrepro.core.progress import NullProgress, Progress
from alexrepro.core.workers import map_unordered
from alexrepro.data.shards.index import ShardIndex, changed_since_verified

VERIFIED_NAME = ".verified-shards.json"  # the stamp `verify_shards` keeps in a consumer's output folder


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _hash_task(path: str) -> tuple[str, str]:
    try:
        return path, sha256_file(Path(path))
    except OSError as exc:
        raise FormatError(
            f"{path}: cannot read the shard ({exc.strerror or exc}); check its permissions, or rerun `alexrepro "
            "prepare` to rewrite it"
        ) from None


def verify_shards(
    index: ShardIndex,
    stamp_dir: Path,
    workers: int,
    part: tuple[int, int] = (0, 1),
    progress: Progress = NullProgress(),
) -> int:
    """Check the sha256 of the index's shards against the manifest, once per shard per `stamp_dir`; return how
    many were hashed. `part=(rank, world)` checks every world-th shard from rank on (ranks share the work)."""

    rank, world = part
    stamp_path = Path(stamp_dir) / (VERIFIED_NAME if world == 1 else f".verified-shards-{rank}-of-{world}.json")
    try:
        stamp = json.loads(stamp_path.read_text())
        known = stamp["shards"] if stamp.get("format") == "alexrepro-verified" else {}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        known = {}
    expected = {}
    todo = []
    for path, info in list(zip(index.paths, index.infos, strict=True))[rank::world]:
        path = str(Path(path).resolve())
        expected[path] = info.sha256
        entry = known.get(path) if isinstance(known, dict) else None
        if entry != {"sha256": info.sha256, "file": _identity(Path(path))}:
            todo.append(path)
    if todo:
        progress.start("checking shards", len(todo), unit="shard")
    for path, digest in map_unordered(_hash_task, todo, max(1, min(workers, len(todo))), preload=__name__):
        if digest != expected[path]:
            raise FormatError(changed_since_verified(Path(path)))
        progress.advance(1)
    if todo:
        progress.finish()
    if todo:
        # The folder's record keeps the shards of other splits (train and val are checked in two calls): one run
        # folder hashes each shard once, not once per split per start.
        verified = dict(known) if isinstance(known, dict) else {}
        verified.update({path: {"sha256": sha, "file": _identity(Path(path))} for path, sha in expected.items()})
        Path(stamp_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp_path, json.dumps({"format": "alexrepro-verified", "shards": verified}, indent=1) + "\n")
    return len(todo)
