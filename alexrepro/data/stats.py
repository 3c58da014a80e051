"""Training-set statistics: the per-pixel mean image (paper §2) and the RGB covariance behind PCA lighting (§4.1).

Over every image of the train shards (or the first `max_images` in shard order):

    mean_image[y, x, c] = (1/M) Σ_images image[y, x, c]                  H×W×3, RGB, 0–255
    channel_mean[c]     = (1/N) Σ_pixels x[c]                            N = M·H·W pixels
    cov                 = (1/N) Σ_pixels x xᵀ − channel_mean channel_meanᵀ   (population covariance, 0–255 units)
    eigval, eigvec      = eigh(cov), eigenvalues in descending order, eigenvectors as columns

Exact by construction: pixel values are integers, so every partial sum is kept as an integer (uint32 per worker,
Python ints when merged) and the covariance is formed from integer sums before a single division. Results are
bit-identical for any worker count and any split of the work.

Eigenvector signs are arbitrary in any eigen-decomposition. We fix them so that the component of largest
magnitude in each column is positive (ties: the first such component). PCA lighting draws α ~ N(0, σ) symmetric
about zero, so the sign does not change the augmentation; it only makes outputs reproducible.

Sanity check, never hard-coded (REFERENCE.md §2): fb.resnet.torch's ImageNet PCA, for pixels in [0, 1], has
eigenvalues ≈ (0.2175, 0.0188, 0.0045) and a first eigenvector ≈ ±(0.57, 0.58, 0.58) (brightness). In our
0–255 units that is eigval ≈ (14 140, 1 220, 290) — `stats.json` lists eigval/255² beside them for comparison.
Caffe's ImageNet mean image averages to R 122.7, G 116.7, B 104.0.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from alexrepro.core.atomic import atomic_open, atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from alexrepro.core.errors import FormatError, OutputExistsError
from alexrepro.core.files import check_format
from alexrepro.core.locking import output_lock, reported_write_errors
from alexrepro.core.progress import Progress
from alexrepro.core.workers import map_unordered, worker_count
from alexrepro.data.config import StatsConfig
from alexrepro.data.imaging import UnreadableImage, decode_rgb_planes
from alexrepro.data.shards.index import ShardIndex, read_verified_shard
from alexrepro.data.shards.manifest import MANIFEST_NAME, manifest_sha256, read_manifest

FORMAT = "alexrepro-stats"
VERSION = 1
NPZ_NAME = "stats.npz"
JSON_NAME = "stats.json"
MEAN_PNG_NAME = "mean.png"

_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # the distinct entries of the symmetric Σ x xᵀ
_UINT32_SAFE_IMAGES = 2**32 // 256  # images a uint32 per-pixel sum can take before it could overflow


@dataclass(frozen=True)
class Stats:
    mean_image: np.ndarray  # H×W×3 float32, RGB, 0–255
    channel_mean: np.ndarray  # (3,) float64, RGB, 0–255
    cov: np.ndarray  # 3×3 float64, population covariance of RGB pixel values, 0–255 units
    eigval: np.ndarray  # (3,) float64, descending (variances, not standard deviations)
    eigvec: np.ndarray  # 3×3 float64, column k belongs to eigval[k]; orthonormal
    pixel_count: int
    image_count: int


@dataclass(frozen=True)
class StatsResult:
    stats: Stats
    out: Path
    manifest_sha256: str


def compute_stats(
    shards: Path, out: Path, config: StatsConfig, progress: Progress, overwrite: bool = False
) -> StatsResult:
    """Compute the statistics of the train split in `shards` and write stats.npz, stats.json and mean.png to `out`.

    Each shard is read whole, once, and checked against the manifest's size and sha256 in the worker that reads it
    (hashing costs a few per cent of decoding and no extra I/O). `out` may hold stats of these shards with these
    settings (they are rewritten); stats of other shards or settings are replaced only with `overwrite`.
    """
    shards, out = Path(shards), Path(out)
    written_together = [out / NPZ_NAME, out / MEAN_PNG_NAME, out / JSON_NAME]
    with output_lock(out, "stats"), reported_write_errors(out, partial=written_together):
        return _compute_stats(shards, out, config, progress, overwrite)


def _compute_stats(shards: Path, out: Path, config: StatsConfig, progress: Progress, overwrite: bool) -> StatsResult:
    manifest = read_manifest(shards)
    split = manifest.split("train")
    available = split.count if config.max_images is None else min(split.count, config.max_images)
    if available == 0:
        raise FormatError(f"{shards}: the train split has no images; prepare a source with training images")
    source_sha = manifest_sha256(shards)
    _claim_output(out, source_sha, config.max_images, overwrite)
    for stale in remove_stale_temporaries(out):  # a run killed while writing leaves its temporaries
        progress.log(f"removed {stale}, left by a run that was stopped while writing it")
    workers = worker_count(config.workers)
    tasks = _plan(ShardIndex.load(shards, manifest, "train").head(available), workers)

    progress.start("stats", available)
    total = _Sums()
    for partial in map_unordered(_sum_task, tasks, min(workers, len(tasks)), preload=__name__):
        total.merge(partial)
        progress.advance(partial.images)
    progress.finish()
    if total.images != available:
        raise FormatError(
            f"{shards}: read {total.images} train images, the manifest promises {available}; rerun `alexrepro prepare`"
        )

    stats = total.finish()
    _write(out, stats, source_sha, config.max_images)
    progress.log(f"stats: {stats.image_count:,} images, channel mean {np.round(stats.channel_mean, 2).tolist()}")
    return StatsResult(stats=stats, out=out, manifest_sha256=source_sha)


def _claim_output(out: Path, source_sha: str, max_images: int | None, overwrite: bool) -> None:
    """Refuse to replace stats of other shards or settings unless told to (the rule prepare follows)."""
    path = out / JSON_NAME
    if overwrite or not path.exists():
        return
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or (meta.get("source_manifest_sha256"), meta.get("max_images")) != (
        source_sha,
        max_images,
    ):
        raise OutputExistsError(
            f"{out}: holds statistics of other shards or settings; rerun with --overwrite to replace them, or choose "
            "another output folder"
        )


def check_stats_source(stats_dir: Path, shards_dir: Path) -> None:
    """Raise FormatError unless the stats in `stats_dir` were computed from the shards in `shards_dir` (the same
    manifest, whose hash covers every shard's)."""
    path = Path(stats_dir) / JSON_NAME
    try:
        recorded = json.loads(path.read_text()).get("source_manifest_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != manifest_sha256(shards_dir):
        raise FormatError(
            f"{path}: computed from other shards than {Path(shards_dir) / MANIFEST_NAME}; rerun "
            f"`alexrepro stats {shards_dir} {stats_dir} --overwrite`"
        )


def load_stats(stats_dir: Path) -> Stats:
    """Read what `compute_stats` wrote, checking its format and version."""
    stats_dir = Path(stats_dir)
    remedy = f"alexrepro stats SHARDS {stats_dir}"
    json_path, npz_path = stats_dir / JSON_NAME, stats_dir / NPZ_NAME
    for path in (json_path, npz_path):
        if not path.is_file():
            raise FormatError(f"{path}: not found; run `{remedy}` first")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError:
        raise FormatError(f"{json_path}: not valid JSON; rerun `{remedy}`") from None
    check_format(meta, FORMAT, VERSION, str(json_path), remedy)
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            check_format(
                {"format": str(npz["format"]), "version": int(npz["version"])}, FORMAT, VERSION, str(npz_path), remedy
            )
            stats = Stats(
                mean_image=npz["mean_image"].astype(np.float32),
                channel_mean=npz["channel_mean"],
                cov=npz["cov"],
                eigval=npz["eigval"],
                eigvec=npz["eigvec"],
                pixel_count=int(npz["pixel_count"]),
                image_count=int(npz["image_count"]),
            )
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{npz_path}: unreadable or incomplete ({exc}); rerun `{remedy}`") from None
    # A NaN or an infinity would train without a word and only evaluate would refuse the checkpoint: stop here.
    for name in ("mean_image", "channel_mean", "cov", "eigval", "eigvec"):
        if not np.all(np.isfinite(getattr(stats, name))):
            raise FormatError(f"{npz_path}: '{name}' holds NaN or infinite values; rerun `{remedy}`")
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Partial sums: what a worker returns for its share of the images, merged exactly.


class _Sums:
    """Sums over images, kept planar (channel, y, x) because that is how the cheapest decode path delivers them."""

    def __init__(self):
        self.images = 0
        self.pixel_sum: np.ndarray | None = None  # 3×H×W: uint32 inside a worker, int64 once merged
        self.products = [0] * len(_PAIRS)  # Σ x_i x_j over every pixel, Python ints (unbounded, exact)
        self._wide: np.ndarray | None = None  # scratch: the planes as uint16, so products cannot overflow
        self._product: np.ndarray | None = None
        self._sum_dtype = np.uint32

    def add(self, planes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Add one image given as its R, G, B planes (H×W uint8 each)."""
        pixel_sum, wide, product = self.pixel_sum, self._wide, self._product
        if pixel_sum is None:
            height, width = planes[0].shape
            pixel_sum = self.pixel_sum = np.zeros((3, height, width), np.uint32)
            wide = self._wide = np.empty((3, height * width), np.uint16)
            product = self._product = np.empty(height * width, np.uint16)
            # One image's Σ x_i x_j is at most H·W·255²: uint32 holds that up to 66 051 pixels (256² fits).
            self._sum_dtype = np.uint32 if height * width * 255**2 < 2**32 else np.uint64
        elif planes[0].shape != pixel_sum.shape[1:]:
            raise ValueError(f"image of size {planes[0].shape}, earlier images were {pixel_sum.shape[1:]}")
        if wide is None or product is None:  # merged or unpickled sums carry no scratch buffers
            raise RuntimeError("_Sums.add on merged sums; add images in a fresh _Sums and merge it")
        for channel, plane in enumerate(planes):
            np.add(pixel_sum[channel], plane, out=pixel_sum[channel])
            wide[channel] = plane.reshape(-1)
        for k, (i, j) in enumerate(_PAIRS):
            np.multiply(wide[i], wide[j], out=product)  # ≤ 255² < 2¹⁶: exact in uint16
            self.products[k] += int(product.sum(dtype=self._sum_dtype))
        self.images += 1

    def merge(self, other: _Sums) -> None:
        if other.pixel_sum is None:
            return
        if self.pixel_sum is None:
            self.pixel_sum = other.pixel_sum.astype(np.int64)
        elif other.pixel_sum.shape != self.pixel_sum.shape:
            raise FormatError(
                f"train images of sizes {self.pixel_sum.shape[1:]} and {other.pixel_sum.shape[1:]} in one dataset; "
                "rerun `alexrepro prepare --overwrite`"
            )
        else:
            self.pixel_sum += other.pixel_sum
        self.products = [a + b for a, b in zip(self.products, other.products, strict=True)]
        self.images += other.images

    def __getstate__(self):  # what a worker sends back: the sums, not the scratch buffers
        return {"images": self.images, "pixel_sum": self.pixel_sum, "products": self.products}

    def __setstate__(self, state):
        _Sums.__init__(self)
        self.__dict__.update(state)

    def finish(self) -> Stats:
        pixel_sum = self.pixel_sum
        if pixel_sum is None:  # compute_stats compares the count with the manifest's first; a split has images
            raise ValueError("no images were summed")
        _, height, width = pixel_sum.shape
        n = self.images * height * width
        channel_sum = [int(s) for s in pixel_sum.sum(axis=(1, 2), dtype=np.int64)]
        cov = np.empty((3, 3))
        for (i, j), s_ij in zip(_PAIRS, self.products, strict=True):
            # (1/N) Σ x_i x_j − μ_i μ_j  =  (N·Σ x_i x_j − Σ x_i · Σ x_j) / N², in exact integers until the division.
            cov[i, j] = cov[j, i] = (n * s_ij - channel_sum[i] * channel_sum[j]) / (n * n)
        eigval, eigvec = _eigen(cov)
        return Stats(
            mean_image=(pixel_sum.transpose(1, 2, 0) / self.images).astype(np.float32),
            channel_mean=np.array(channel_sum, np.float64) / n,
            cov=cov,
            eigval=eigval,
            eigvec=eigvec,
            pixel_count=n,
            image_count=self.images,
        )


def _eigen(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues descending, eigenvectors as orthonormal columns, each column's largest component positive."""
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval[::-1].copy(), eigvec[:, ::-1].copy()
    for k in range(3):
        if eigvec[np.argmax(np.abs(eigvec[:, k])), k] < 0:
            eigvec[:, k] = -eigvec[:, k]
    return eigval, eigvec


# ---------------------------------------------------------------------------------------------------------------
# Work plan and workers


@dataclass(frozen=True)
class _Task:
    index: ShardIndex  # one shard's samples (ShardIndex.only)
    start: int  # first sample of the shard to use
    stop: int  # one past the last


def _plan(index: ShardIndex, workers: int) -> list[_Task]:
    """Cut the index (the first `max_images` train images) into tasks: whole shards, or slices of shards when there
    are few shards.

    Slices keep every worker busy on a dataset of one or two big shards; `max_images` takes the first images in
    shard order, so the same images are used whatever the worker count.
    """
    pieces = max(1, (4 * workers) // max(1, len(index.paths))) if workers > 1 else 1
    tasks = []
    for number in range(len(index.paths)):
        shard = index.only(number)
        use = len(shard)
        step = max(1, -(-use // pieces))
        tasks += [_Task(shard, start, min(start + step, use)) for start in range(0, use, step)]
    return tasks


def _sum_task(task: _Task) -> _Sums:
    sums = _Sums()
    path = task.index.paths[0]
    # One read of the whole shard, checked against the manifest: Python's tarfile spends more time per member than
    # decoding a 256² JPEG takes, and the index says where each JPEG lies in the bytes already read.
    data = read_verified_shard(task.index, 0)
    for sample in range(task.start, task.stop):
        offset, size = task.index.jpg[sample]
        try:
            sums.add(decode_rgb_planes(data[offset : offset + size]))
        except (UnreadableImage, ValueError) as exc:
            key = task.index.key(sample)
            raise FormatError(f"{path}: sample {key}: {exc}; rerun `alexrepro prepare --overwrite`") from None
        if sums.images >= _UINT32_SAFE_IMAGES:
            raise FormatError(f"{path}: more than {_UINT32_SAFE_IMAGES:,} images in one shard")
    return sums


# ---------------------------------------------------------------------------------------------------------------
# Output


def _write(out: Path, stats: Stats, source_sha: str, max_images: int | None) -> None:
    arrays = {
        "format": np.array(FORMAT),
        "version": np.array(VERSION),
        "mean_image": stats.mean_image,
        "channel_mean": stats.channel_mean,
        "cov": stats.cov,
        "eigval": stats.eigval,
        "eigvec": stats.eigvec,
        "pixel_count": np.array(stats.pixel_count, np.int64),
        "image_count": np.array(stats.image_count, np.int64),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / NPZ_NAME) as handle:
        _write_npz(handle, arrays)
    mean_png = io.BytesIO()
    Image.fromarray(np.clip(np.rint(stats.mean_image), 0, 255).astype(np.uint8)).save(mean_png, format="PNG")
    atomic_write_bytes(out / MEAN_PNG_NAME, mean_png.getvalue())
    summary = {
        "format": FORMAT,
        "version": VERSION,
        "source_manifest_sha256": source_sha,
        "max_images": max_images,
        "image_count": stats.image_count,
        "pixel_count": stats.pixel_count,
        "image_size": list(stats.mean_image.shape[:2]),
        "channel_mean": stats.channel_mean.tolist(),
        "channel_std": np.sqrt(np.diag(stats.cov)).tolist(),
        "cov": stats.cov.tolist(),
        "eigval": stats.eigval.tolist(),
        "eigvec_columns": stats.eigvec.tolist(),
        # For comparison with PCA values published for pixels in [0, 1] (fb.resnet.torch; REFERENCE.md §2).
        "eigval_unit_range": (stats.eigval / 255.0**2).tolist(),
    }
    atomic_write_text(out / JSON_NAME, json.dumps(summary, indent=2) + "\n")


def _write_npz(handle, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, but with fixed zip timestamps so the same statistics give byte-identical files (DVC caching)."""
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
