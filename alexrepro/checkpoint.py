"""Training checkpoints: one dict of tensors and plain containers, loadable with `torch.load(weights_only=True)`.

Keys (format "alexrepro-checkpoint", version 1): format, version, epoch (completed epochs), model_config, train_config,
classes, model (state_dict on the CPU; the same keys for either tower placement), optimizer, scheduler, rng, history,
data ({"manifest_sha256", "stats_sha256"}), normalization ({"mean_image" H×W×3 float32 RGB 0–255, "input_scale",
"eigval", "eigvec"}), switches (every ablation switch and its value), and position (None at an epoch boundary; the
step reached inside the next epoch and its running sums when a run was interrupted mid-epoch).
A checkpoint carries everything evaluate and predict need: the weights, the preprocessing and the class names.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from alexrepro.atomic import atomic_open
from alexrepro.config import config_from_dict
from alexrepro.errors import ConfigError, FormatError, exception_text
from alexrepro.shards import check_format

FORMAT = "alexrepro-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically (a reader or a resumed run never sees half a checkpoint)."""
    with atomic_open(Path(path)) as handle:
        torch.save({"format": FORMAT, "version": VERSION, **state}, handle)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with weights_only=True (no code runs on load) and check its format and version."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such checkpoint; run `alexrepro train` to write one")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        reason = exception_text(exc, limit=1000)
        raise FormatError(
            f"{path}: not a readable checkpoint ({reason}); use one written by `alexrepro train`"
        ) from None
    check_format(data, FORMAT, VERSION, str(path), "alexrepro train")
    return data


def model_from_checkpoint(ckpt: dict, devices: Sequence[torch.device | str] | None = None):
    """The AlexNet described by the checkpoint's model_config, with its weights, placed on `devices`."""
    from alexrepro.model import AlexNet, ModelConfig

    config = config_from_dict(ModelConfig, model_config_of(ckpt), "checkpoint model_config")
    model = AlexNet(config, devices)
    model.load_state_dict(ckpt["model"])
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
