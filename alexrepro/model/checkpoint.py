"""Training checkpoints: one dict of tensors and plain containers, loadable with `torch.load(weights_only=True)`.

Keys (format "alexrepro-checkpoint", version 1): format, version, epoch (completed epochs), model_config, train_config,
classes, model (state_dict on the CPU; the same keys for either tower placement), optimizer, scheduler, rng, history,
data ({"manifest_sha256", "stats_sha256"}), normalization ({"mean_image" H×W×3 float32 RGB 0–255, "input_scale",
"eigval", "eigvec"}), switches (every ablation switch and its value), and position (None at an epoch boundary; the
step reached inside the next epoch and its running sums when a run was interrupted mid-epoch).
A checkpoint carries everything evaluate and predict need: the weights, the preprocessing and the class names.
"""

from __future__ import annotations

import errno
import math
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, cast

import torch

from alexrepro.core.atomic import atomic_open
from alexrepro.core.config import config_from_dict
from alexrepro.core.errors import ConfigError, FormatError, exception_text
from alexrepro.core.files import check_format
from alexrepro.model.config import ModelConfig

FORMAT = "alexrepro-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically (a reader or a resumed run never sees half a checkpoint)."""
    with atomic_open(Path(path)) as handle:
        writer = _Writer(handle)
        try:
            # torch.save only calls write and flush on a file object; its stubs ask for a whole IO[bytes].
            torch.save({"format": FORMAT, "version": VERSION, **state}, cast(IO[bytes], writer))
        except RuntimeError:
            # torch's zip writer turns a failed write (disk full, file size limit) into "unexpected pos …";
            # the OSError it swallowed says what happened.
            if writer.error is not None:
                raise writer.error from None
            raise


class _Writer:
    """A file for torch.save that remembers the OSError of a failed write."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with weights_only=True (no code runs on load) and check its format and version."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such checkpoint; run `alexrepro train` to write one")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # EACCES, EIO: the file is there but cannot be read (not a problem writing anything)
        reason = errno.errorcode.get(exc.errno or 0, exc.strerror or type(exc).__name__)
        raise FormatError(
            f"{path}: cannot read the checkpoint ({reason}); check its permissions and the disk"
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        reason = exception_text(exc, limit=1000)
        raise FormatError(
            f"{path}: not a readable checkpoint ({reason}); use one written by `alexrepro train`"
        ) from None
    check_format(data, FORMAT, VERSION, str(path), "alexrepro train")
    check_entries(data, str(path))
    return data


def check_entries(ckpt: dict, source: str) -> None:
    """The entries every consumer reads (weights, their config, classes, normalisation) are there and well formed:
    a checkpoint missing one is a FormatError naming it, not a KeyError far from where it was loaded."""

    def fail(entry: str, problem: str):
        raise FormatError(f"{source}: entry '{entry}' {problem}; use a checkpoint written by `alexrepro train`")

    for entry, kind in (("epoch", int), ("model_config", dict), ("model", dict), ("classes", list),
                        ("normalization", dict)):  # fmt: skip
        if entry not in ckpt:
            fail(entry, "is missing")
        if not isinstance(ckpt[entry], kind):
            fail(entry, f"is a {type(ckpt[entry]).__name__}, not a {kind.__name__}")
    if not all(isinstance(c, dict) and {"wnid", "name"} <= set(c) for c in ckpt["classes"]):
        fail("classes", "lacks a class's wnid or name")
    norm = ckpt["normalization"]
    shapes = {"mean_image": 3, "eigval": 1, "eigvec": 2}
    for name, dims in shapes.items():
        value = norm.get(name)
        if not isinstance(value, torch.Tensor):
            fail(f"normalization.{name}", "is missing" if value is None else "is not a tensor")
        if value.dim() != dims or not torch.isfinite(value).all():
            fail(f"normalization.{name}", f"is not a finite {dims}-D tensor (shape {tuple(value.shape)})")
    side = norm["mean_image"].shape
    if (
        side[0] != side[1]
        or side[2] != 3
        or tuple(norm["eigval"].shape) != (3,)
        or tuple(norm["eigvec"].shape) != (3, 3)
    ):
        fail("normalization", "does not hold an S×S×3 mean image with 3 RGB eigenpairs")
    scale = norm.get("input_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        fail("normalization.input_scale", f"must be a number above 0, got {scale!r}")


def load_weights(module: torch.nn.Module, weights: dict, source: str) -> None:
    """`module.load_state_dict(weights)`, with a mismatch (other layers, other shapes) as one FormatError line."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        if len(detail) > 200:
            detail = detail[:200] + " …"
        raise FormatError(
            f"{source}: its weights do not fit its model_config ({detail}); use a checkpoint written by "
            "`alexrepro train`, unmodified"
        ) from None


def model_from_checkpoint(ckpt: dict, devices: Sequence[torch.device | str] | None = None, source: str = "checkpoint"):
    """The AlexNet described by the checkpoint's model_config, with its weights, placed on `devices`."""
    from alexrepro.model.network import AlexNet

    config = config_from_dict(ModelConfig, model_config_of(ckpt), f"{source} model_config")
    model = AlexNet(config, devices)
    load_weights(model, ckpt["model"], source)
    return model


def model_config_of(ckpt: dict) -> dict:
    """The checkpoint's model_config, completed for checkpoints written before a switch existed, with the value
    those runs trained with: dropout_scaling "inverted" (nn.Dropout was the only dropout then); activation and
    layer_widths take their defaults (ReLU, the paper's widths), which is what those runs had."""
    config = dict(ckpt["model_config"])
    config.setdefault("dropout_scaling", "inverted")
    return config


def differing_keys(saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Names of the settings whose values differ between two config dicts (missing on one side counts)."""
    skip = set(ignore)
    names = sorted((set(saved) | set(current)) - skip)
    return [name for name in names if _plain(saved.get(name)) != _plain(current.get(name))]


def check_resumable(ckpt: dict, train_config: dict, data: dict, ignore: Iterable[str], source: str) -> None:
    """Refuse to continue a run with other settings or other data: name what differs and what to do."""
    differing = differing_keys(ckpt.get("train_config", {}), train_config, ignore)
    if differing:
        details = ", ".join(
            f"{k} ({_plain(ckpt['train_config'].get(k))!r} → {_plain(train_config.get(k))!r})" for k in differing
        )
        raise ConfigError(
            f"{source} was trained with other settings: {details}; resume with the same settings or train into "
            "another folder without --resume"
        )
    changed = [k for k in ("manifest_sha256", "stats_sha256") if ckpt.get("data", {}).get(k) != data.get(k)]
    if changed:
        raise ConfigError(
            f"{source} was trained on other data ({', '.join(changed)} differ); resume with the same SHARDS and "
            "STATS or train into another folder without --resume"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
