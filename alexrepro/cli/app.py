"""The `alexrepro` command line: parse flags, call one library function, print what happened.

Each stage command builds its config from defaults (the paper's values), then `--config FILE`, then `--set KEY=VALUE`,
then the named flags, and calls the stage's library function. Results go to stdout (a table, or JSON with `--json`);
progress and logs go to stderr: a live bar on a terminal, plain unwrapped lines at an interval otherwise (`dvc repro >
log`, SLURM). Exit codes: 0 done; 1 a library error (`AlexReproError`: one line on stderr; ALEXREPRO_TRACEBACK=1
shows the traceback); 2 a bad flag, config value or path, found before any data is read; 128+N stopped by signal N
(130 for Ctrl-C). Heavy imports (torch) happen inside the commands so that `--help` is instant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import typer
import typer.core
import yaml
from rich.console import Console
from rich.table import Table

from alexrepro import __version__
from alexrepro.cli.configdoc import show_value, stage_keys
from alexrepro.cli.progress import RichProgress
from alexrepro.core.errors import AlexReproError, ConfigError
from alexrepro.core.progress import LineProgress
from alexrepro.core.signals import Stopped
from alexrepro.data.config import PrepareConfig, StatsConfig
from alexrepro.evaluate.config import EvaluateConfig
from alexrepro.synth.config import SampleConfig, ScaleConfig, parse_scale
from alexrepro.synth.ilsvrc import ILSVRC_CLASSES
from alexrepro.train.config import TrainConfig

if TYPE_CHECKING:  # the stages import torch; the CLI imports them inside the commands so that --help is instant
    import numpy as np
    from _typeshed import DataclassInstance

    from alexrepro.bench.report import BenchReport
    from alexrepro.synth.sample import SampleResult


C = TypeVar("C", bound="DataclassInstance")  # a stage's config dataclass


# Typer 0.29 writes required arguments as `{shards}` in the usage line; click, argparse and POSIX usage write SHARDS.
# Every argument of this CLI is needed to run a command (the stage commands declare theirs optional only so that
# --show-config works without them), so none is shown in brackets.
def _usage_name(self) -> str:
    return self.display_name_raw.upper() + ("..." if self.nargs != 1 else "")


typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]
_typer_display_type = typer.core._TyperParameter.display_type_rich


def _display_type(self, ctx) -> str | None:
    """The value's type in help as a person writes it: nothing after a flag (-h, --install-completion) and
    `<path>...` for several paths, where Typer 0.29 writes `<bool>` and `<list[Path]>`."""
    if getattr(self, "is_flag", False):
        return None
    shown = _typer_display_type(self, ctx)
    if shown and shown.startswith("<list[") and shown.endswith("]>"):
        return f"<{shown[6:-2].lower()}>..."
    return shown


typer.core._TyperParameter.display_type_rich = _display_type  # type: ignore[method-assign]
typer.core.TyperOption.display_type_rich = _display_type  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        print(f"alexrepro {__version__}")
        raise typer.Exit()


app = typer.Typer(
    help="Reproduce AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) on ILSVRC-2012.\n\n"
    "Pipeline: sample → prepare → stats → train → evaluate (or `dvc repro`).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app = typer.Typer(
    help="Throughput of each stage on this machine, each figure beside a baseline measured in the same run.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(bench_app, name="bench")


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."
    ),
) -> None:
    """Reproduce AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) on ILSVRC-2012.

    Pipeline: sample → prepare → stats → train → evaluate (or `dvc repro`).
    """


err_console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)

# Options every stage command shares. Flags take metavar "" so that help shows no `<bool>` after them.
SetOption = typer.Option(
    None, "--set", "-S", metavar="KEY=VALUE",
    help="Override any key of this stage (repeatable); the keys and their defaults are listed below and by --show-config.",
)  # fmt: skip
QuietOption = typer.Option(
    False, "--quiet", "-q", metavar="", help="No progress bars or interval lines; keeps the per-epoch lines and errors."
)
VerboseOption = typer.Option(
    False, "--verbose", "-v", metavar="", help="Also print the whole resolved configuration at the start."
)
ShowConfigOption = typer.Option(
    False, "--show-config", metavar="", help="Print the resolved configuration (every key, its value and source) as YAML and exit."
)  # fmt: skip


def config_option(stage: str) -> Any:
    return typer.Option(
        None, "--config", metavar="FILE", help=f"YAML file of {stage} keys (the pipeline uses stages/{stage}.yaml)."
    )


def keys_epilog(stage: str) -> str:
    """The help's list of every key `--set` and `--config` take, with its default and the paper's section."""
    lines = ["[bold]Keys[/] (--set KEY=VALUE or --config FILE; default, and why):"]
    for key in stage_keys(stage):
        lines.append(f"  [bold]{key.name}[/] = {_escape(key.default_text)}  [dim]{_escape(key.comment)}[/]")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def default_help(stage: str, key: str, text: str) -> dict:
    """typer.Option keywords that show the key's default (the paper's value) although the flag itself defaults to
    None: a flag that is not given leaves the value to --config and --set."""
    defaults = {k.name: k.default_text for k in stage_keys(stage)}
    return {"help": f"{text} " + _escape(f"[default: {defaults[key]}]"), "show_default": False}


# ---------------------------------------------------------------------------------------------------------------
# Terminal progress and error reporting


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _error(message: str, code: int) -> typer.Exit:
    """Print one line 'error: …' on stderr, plain (never wrapped), and return the Exit to raise."""
    prefix = "\x1b[1;31merror:\x1b[0m" if err_console.is_terminal else "error:"
    sys.stderr.write(f"{prefix} {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


@contextmanager
def _stage(quiet: bool, flags: dict[str, str] | None = None, interval: int | None = None) -> Iterator[Any]:
    """Run a stage: give it a progress sink and turn library errors into one line on stderr and an exit code.

    A live bar only when stderr is a terminal; otherwise plain lines every `interval` units (torchvision's
    MetricLogger). `flags` maps config keys to the flag that set them, so that an error names the flag.
    """
    try:
        if quiet or not err_console.is_terminal:
            yield LineProgress(sys.stderr, interval=interval, bars=not quiet)
        else:
            with RichProgress(err_console) as progress:
                yield progress
    except ConfigError as exc:
        if os.environ.get("ALEXREPRO_TRACEBACK"):
            raise
        raise _error(_name_flag(str(exc), flags or {}), 2) from None
    except Stopped as exc:  # a stop signal: exit 128 + its number (130 for Ctrl-C), as a shell reports it
        if os.environ.get("ALEXREPRO_TRACEBACK"):
            raise
        raise _error(str(exc), exc.exit_code) from None
    except AlexReproError as exc:
        if os.environ.get("ALEXREPRO_TRACEBACK"):
            raise
        raise _error(str(exc), 1) from None
    except KeyboardInterrupt:
        raise _error("interrupted", 130) from None
    except MemoryError:
        if os.environ.get("ALEXREPRO_TRACEBACK"):
            raise
        raise _error("out of memory; rerun with fewer --workers or a smaller --batch-size", 1) from None


def _name_flag(message: str, flags: dict[str, str]) -> str:
    """'command line: key 'crop' must be …' → '--crop must be …': every key a flag or --set gave is named by it."""
    keys = list(dict.fromkeys(re.findall(r"key '(\w+)'", message)))
    if not keys:
        return message
    if keys[0] in flags:
        message = re.sub(r"^[^:]*(?<!key): (?=(unknown )?key ')", "", message)  # drop the 'command line: ' source
    for key in keys:
        if key in flags:
            message = message.replace(f"key '{key}' (from command line)", flags[key], 1)
            message = message.replace(f"key '{key}'", flags[key], 1)
    return message


def _overrides(sets: list[str] | None, flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge `--set key=value` pairs (values parsed as YAML) and named flags (named flags win); also return which
    flag gave each key, for error messages."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise _error(f"--set {item!r}: expected KEY=VALUE, e.g. --set lrn=false", 2)
        if not raw.strip():  # YAML reads an empty value as null, which would quietly keep the default
            raise _error(f"--set {item!r}: key '{key.strip()}' has an empty value; give a value or drop the --set", 2)
        key = key.strip().replace("-", "_")
        merged[key] = yaml.safe_load(raw)
        origin[key] = f"--set {key}"
    for key, value in flags.items():
        if value is not None:
            merged[key] = value
            origin[key] = "--" + key.replace("_", "-")
    return merged, origin


def _config(
    stage: str, cls: type[C], config_path: Path | None, sets: list[str] | None, flags: dict[str, Any],
    show: bool, verbose: bool, quiet: bool, check: Callable[[C], object] | None = None,
) -> C:  # fmt: skip
    """The resolved config, or exit 2 naming the flag at fault. `check` runs extra validation that needs the config
    (e.g. the model's own checks) so that a bad value stops the run before any data is read."""
    from alexrepro.core.config import config_to_dict, load_config

    overrides, origin = _overrides(sets, flags)
    try:
        cfg = load_config(cls, config_path, overrides)
        if check is not None:
            try:
                check(cfg)
            except ValueError as exc:
                raise ConfigError(f"command line: {exc}") from None
    except ConfigError as exc:
        raise _error(_name_flag(str(exc), origin), 2) from None
    cfg = _capped_workers(cfg, origin)
    values = config_to_dict(cfg)
    if show:
        defaults = {k.name: k.comment for k in stage_keys(stage)}
        for key, value in values.items():
            where = origin.get(key) or (
                str(config_path) if config_path and key in _file_keys(config_path) else "default"
            )
            note = f"  # {where}" + (f"; {defaults[key]}" if defaults.get(key) else "")
            print(f"{key}: {show_value(value)}{note}")
        raise typer.Exit(0)
    return cfg


WORKERS_PER_CORE = 4  # more worker processes than this per usable core only contend (and fork, and hold memory)


def _capped_workers(cfg: C, origin: dict[str, str]) -> C:
    """A worker count far above the cores is a typo or a copy from a bigger machine (1000 workers took 153 s to
    fork where 2 do the work in 12 s): cap it at WORKERS_PER_CORE per usable core and say so in one line."""
    from alexrepro.core.workers import usable_cores

    requested = getattr(cfg, "workers", None)
    most = WORKERS_PER_CORE * usable_cores()
    if requested is None or requested <= most:
        return cfg
    flag = origin.get("workers", "workers")
    err_console.print(
        f"note: {flag} {requested} is more than {WORKERS_PER_CORE} per usable core ({usable_cores()} here); using {most}",
        highlight=False, markup=False, soft_wrap=True,
    )  # fmt: skip
    return dataclasses.replace(cfg, workers=most)


def _announce(stage: str, cfg: Any, verbose: bool, quiet: bool) -> None:
    """The resolved configuration at the start of a run: one unwrapped line, or one line per key with -v."""
    from alexrepro.core.config import config_to_dict

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return
    values = config_to_dict(cfg)
    if verbose:
        sys.stderr.write(f"{stage} config:\n" + "".join(f"  {k}: {show_value(v)}\n" for k, v in values.items()))
    elif not quiet:
        sys.stderr.write(f"{stage} config: " + " ".join(f"{k}={show_value(v)}" for k, v in values.items()) + "\n")
    sys.stderr.flush()


def _file_keys(path: Path) -> set[str]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def _require(**arguments: Path | None) -> tuple[Path, ...]:
    """The positional arguments, in the order given, all present. They are optional to click only so that
    --show-config works without them."""
    missing = [name.upper() for name, value in arguments.items() if value is None]
    if missing:
        raise _error(f"missing argument {' '.join(missing)}; see --help", 2)
    return tuple(value for value in arguments.values() if value is not None)


def _folder_out(out: Path, what: str) -> None:
    """OUT must be a folder (or not exist yet): a file there is a mistake caught before any work."""
    if out.exists() and not out.is_dir():
        raise _error(f"OUT {out} is a file; {what} writes a folder: give a folder path", 2)


def _folder_in(path: Path, name: str, made_by: str) -> None:
    """An input folder must exist: a mistyped path is a bad argument (exit 2) found before any work."""
    if not path.exists():
        raise _error(f"{name} {path} does not exist; give the folder written by `{made_by}`", 2)
    if not path.is_dir():
        raise _error(f"{name} {path} is a file; give the folder written by `{made_by}`", 2)


# torch.save writes a zip archive; anything else cannot be a checkpoint of this toolkit.
_ZIP_MAGIC = b"PK\x03\x04"


def _checkpoint_in(path: Path) -> None:
    """CHECKPOINT must be a file torch.save wrote, checked by its first bytes before torch is imported."""
    if not path.exists():
        raise _error(f"CHECKPOINT {path} does not exist; give a .pt file written by `alexrepro train`", 2)
    if path.is_dir():
        raise _error(f"CHECKPOINT {path} is a folder; give a .pt file written by `alexrepro train`", 2)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(_ZIP_MAGIC))
    except OSError as exc:
        raise _error(f"CHECKPOINT {path}: cannot read it ({exc.strerror}); check its permissions", 1) from None
    if magic != _ZIP_MAGIC:
        raise _error(f"CHECKPOINT {path} is not a checkpoint (not a file written by torch.save); give a .pt file "
                     "written by `alexrepro train`", 2)  # fmt: skip


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _percent(fraction: float) -> str:
    """Errors for people are percentages with a sign; files hold fractions (metrics.json, history.csv)."""
    return f"{100 * fraction:.2f}%"


# ---------------------------------------------------------------------------------------------------------------
# Pipeline stages


@app.command(epilog=keys_epilog("sample"))
def sample(
    out: Path | None = typer.Argument(
        None, metavar="OUT", help="Folder to write the three ILSVRC-2012-style archives into."
    ),
    classes: int | None = typer.Option(None, **default_help("sample", "classes", "Number of synthetic classes.")),
    train_per_class: int | None = typer.Option(
        None, **default_help("sample", "train_per_class", "Training images per class.")
    ),
    val_per_class: int | None = typer.Option(
        None, **default_help("sample", "val_per_class", "Validation images per class.")
    ),
    seed: int | None = typer.Option(
        None, **default_help("sample", "seed", "Random seed; the same seed writes byte-identical archives.")
    ),
    workers: int | None = typer.Option(
        None, **default_help("sample", "workers", "Worker processes (0 = in this process; null = one per core).")
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", metavar="", help="Replace ILSVRC2012_* archives already in OUT."
    ),
    scale: str | None = typer.Option(
        None,
        help="Write ILSVRC-2012's shape instead: 1000 classes at this fraction of the real counts "
        "(1/64, 1/8, 1 = 1,281,167 train + 50,000 val), tiny images. --classes takes the first N classes. "
        r"\[default: none: the built-in sample]",
        show_default=False,
    ),
    config: Path | None = config_option("sample"),
    set_: list[str] | None = SetOption,
    show_config: bool = ShowConfigOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Write the built-in miniature ILSVRC-2012: the real download's three archives, in the real formats.

    Example: alexrepro sample data/sample --classes 10
    """
    if scale is not None:
        _sample_at_scale(out, scale, classes, train_per_class, val_per_class, seed, quiet, config or set_)
        return
    from alexrepro.core.locking import output_lock
    from alexrepro.synth.sample import write_sample

    flags = dict(
        classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed, workers=workers
    )
    cfg = _config("sample", SampleConfig, config, set_, flags, show_config, verbose, quiet)
    (out,) = _require(out=out)
    _folder_out(out, "sample")
    _announce("sample", cfg, verbose, quiet)
    with _stage(quiet) as progress:
        with output_lock(out, "sample"):
            result = write_sample(out, cfg, progress, overwrite)
    out_console.print(f"wrote the sample ILSVRC-2012 to [bold]{out}[/] ({_describe_counts(result)})")


def _sample_at_scale(
    out: Path | None,
    scale: str,
    classes: int | None,
    train_per_class: int | None,
    val_per_class: int | None,
    seed: int | None,
    quiet: bool,
    config_given: Any,
) -> None:
    """`sample --scale`: the ILSVRC-2012-shaped download of alexrepro.synth.scale."""
    from alexrepro.core.locking import output_lock
    from alexrepro.synth.scale import write_scaled_sample

    if config_given:
        raise _error("--config/--set and --scale: a scaled sample takes only the flags; drop one", 2)
    if train_per_class is not None:
        raise _error("--train-per-class and --scale: the per-class train counts follow from --scale; drop one", 2)
    try:
        cfg = ScaleConfig(
            scale=parse_scale(scale), classes=classes or ILSVRC_CLASSES, val_per_class=val_per_class, seed=seed or 0
        )
    except ValueError as exc:
        raise _error(f"--scale: {exc}", 2) from None
    (out,) = _require(out=out)
    _folder_out(out, "sample")
    with _stage(quiet) as progress:
        with output_lock(out, "sample"):
            result = write_scaled_sample(out, cfg, progress)
    out_console.print(f"wrote an ILSVRC-2012-shaped sample to [bold]{out}[/] ({_describe_counts(result)})")


def _describe_counts(result: SampleResult) -> str:
    return ", ".join(f"{k}: {v}" for k, v in result.counts.items())


@app.command(epilog=keys_epilog("prepare"))
def prepare(
    source: Path | None = typer.Argument(
        None, metavar="SOURCE", help="The ILSVRC-2012 download folder, an extracted tree or an ImageFolder."
    ),
    out: Path | None = typer.Argument(None, metavar="OUT", help="Folder for the webdataset shards and manifest.json."),
    size: int | None = typer.Option(
        None, **default_help("prepare", "size", "Shorter side and square crop size in pixels (paper §2).")
    ),
    quality: int | None = typer.Option(
        None, **default_help("prepare", "quality", "JPEG quality of the re-encoded images.")
    ),
    shard_size: int | None = typer.Option(None, **default_help("prepare", "shard_size", "Images per shard.")),
    workers: int | None = typer.Option(
        None, **default_help("prepare", "workers", "Worker processes (0 = in this process; null = one per core).")
    ),
    max_rejected: int | None = typer.Option(
        None, **default_help("prepare", "max_rejected", "Exit non-zero if more unreadable images than this.")
    ),
    val_fraction: float | None = typer.Option(
        None, **default_help("prepare", "val_fraction", "A source without val/: hold out this part of each class.")
    ),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace output made with other settings."),
    config: Path | None = config_option("prepare"),
    set_: list[str] | None = SetOption,
    show_config: bool = ShowConfigOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Resize each image's shorter side to --size (256, the paper's), keep the centre square and pack the images
    into webdataset shards; archives are read in place.

    Example: alexrepro prepare /datasets/ILSVRC2012 data/shards --workers 16
    """
    flags = dict(size=size, quality=quality, shard_size=shard_size, workers=workers, max_rejected=max_rejected,
                 val_fraction=val_fraction)  # fmt: skip
    cfg = _config("prepare", PrepareConfig, config, set_, flags, show_config, verbose, quiet)
    source, out = _require(source=source, out=out)
    if not source.exists():
        raise _error(f"SOURCE {source} does not exist; give the folder that holds the download or your images", 2)
    if not source.is_dir():
        raise _error(
            f"SOURCE {source} is a file; give the folder that holds it (the three ILSVRC-2012 archives, an extracted "
            "tree or an ImageFolder)", 2,
        )  # fmt: skip
    _folder_out(out, "prepare")
    _announce("prepare", cfg, verbose, quiet)
    from alexrepro.data.prepare import prepare as run_prepare  # torch, once the flags and paths are known good

    with _stage(quiet) as progress:
        result = run_prepare(source, out, cfg, overwrite, progress)
    rows = [("layout", str(result.layout)), ("Pillow", str(result.pillow))]
    for split, count in result.written.items():
        rejected = sum(1 for r in result.rejected if r.split == split)
        shards = len(result.manifest.splits[split].shards)
        rows.append((split, f"{count:,} images in {shards} shards, {rejected} rejected"))
    rows.append(("output", str(out)))
    out_console.print(_table("prepare", rows))
    _name_rejected(result.rejected, out)


REJECTED_SHOWN = 5  # rejected files named on the console; manifest.json lists them all


def _name_rejected(rejected: list, out: Path) -> None:
    """The first few rejected files with their reasons, and where the whole list is."""
    if not rejected:
        return
    for entry in rejected[:REJECTED_SHOWN]:
        err_console.print(f"rejected ({entry.split}): {entry.path}: {entry.reason}", highlight=False, markup=False,
                          soft_wrap=True)  # fmt: skip
    more = f"{len(rejected) - REJECTED_SHOWN:,} more; " if len(rejected) > REJECTED_SHOWN else ""
    err_console.print(f"{more}all {len(rejected):,} rejected files and why: {out / 'manifest.json'} (\"rejected\")",
                      highlight=False, markup=False, soft_wrap=True)  # fmt: skip


@app.command(epilog=keys_epilog("stats"))
def stats(
    shards: Path | None = typer.Argument(None, metavar="SHARDS", help="Folder written by `alexrepro prepare`."),
    out: Path | None = typer.Argument(None, metavar="OUT", help="Folder for stats.npz, stats.json and mean.png."),
    workers: int | None = typer.Option(
        None, **default_help("stats", "workers", "Worker processes (0 = in this process; null = one per core).")
    ),
    max_images: int | None = typer.Option(
        None, **default_help("stats", "max_images", "Use only the first N training images (a quick estimate).")
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", metavar="", help="Replace statistics of other shards or settings."
    ),
    config: Path | None = config_option("stats"),
    set_: list[str] | None = SetOption,
    show_config: bool = ShowConfigOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Per-pixel mean image and the RGB covariance with its eigen-decomposition (paper §2, §4.1).

    Example: alexrepro stats data/shards data/stats
    """
    cfg = _config(
        "stats", StatsConfig, config, set_, dict(workers=workers, max_images=max_images), show_config, verbose, quiet
    )
    shards, out = _require(shards=shards, out=out)
    _folder_in(shards, "SHARDS", "alexrepro prepare")
    _folder_out(out, "stats")
    _announce("stats", cfg, verbose, quiet)
    from alexrepro.data.stats import compute_stats  # torch, once the flags and paths are known good

    with _stage(quiet) as progress:
        result = compute_stats(shards, out, cfg, progress, overwrite)
    s = result.stats
    rows = [("image_count", str(s.image_count)), ("channel_mean", _short(s.channel_mean)), ("eigval", _short(s.eigval))]
    rows.append(("output", str(out)))
    out_console.print(_table("stats", rows))


def _short(value: np.ndarray) -> str:
    import numpy as np

    return np.array2string(value, precision=3, suppress_small=True)


def _check_model(cfg: TrainConfig) -> None:
    """The network's own checks (crop, width, towers, …) before any data is read; the class count is not known
    yet and does not enter them."""
    cfg.model_config(num_classes=1000)


@app.command(epilog=keys_epilog("train"))
def train(
    shards: Path | None = typer.Argument(None, metavar="SHARDS", help="Folder written by `alexrepro prepare`."),
    stats: Path | None = typer.Argument(None, metavar="STATS", help="Folder written by `alexrepro stats`."),
    out: Path | None = typer.Argument(
        None, metavar="OUT", help="Folder for checkpoints, the per-epoch history and config.yaml."
    ),
    epochs: int | None = typer.Option(None, **default_help("train", "epochs", "Epochs (paper §5: about 90).")),
    batch_size: int | None = typer.Option(None, **default_help("train", "batch_size", "Global batch size (paper §5).")),
    lr: float | None = typer.Option(None, **default_help("train", "lr", "Initial learning rate (paper §5).")),
    crop: int | None = typer.Option(
        None, **default_help("train", "crop", "Crop size fed to the network (the paper's text says 224).")
    ),
    width: float | None = typer.Option(
        None, **default_help("train", "width", "Channel multiplier (1.0 = the paper's widths).")
    ),
    towers: int | None = typer.Option(
        None,
        **default_help(
            "train",
            "towers",
            "2 = the paper's two towers (§3.2); 1 = one tower (§3.2's one-GPU net also halves conv1–4: layer_widths).",
        ),
    ),
    init: str | None = typer.Option(None, **default_help("train", "init", "Weight initialisation: paper (§5) or he.")),
    devices: str | None = typer.Option(
        None, **default_help("train", "devices", "auto, cpu, cuda, or cuda:0,cuda:1 for one tower per GPU.")
    ),
    workers: int | None = typer.Option(
        None, **default_help("train", "workers", "Loader worker processes per rank (0 = in this process).")
    ),
    seed: int | None = typer.Option(
        None, **default_help("train", "seed", "Random seed for initialisation, shuffling and augmentation.")
    ),
    resume: bool = typer.Option(
        False, "--resume", metavar="", help="Continue from OUT/checkpoint-last.pt (says which epoch and step)."
    ),
    config: Path | None = config_option("train"),
    set_: list[str] | None = SetOption,
    show_config: bool = ShowConfigOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Train the two-tower network with the paper's augmentation and SGD recipe (§4, §5).

    Example: alexrepro train data/shards data/stats runs/train --devices cuda:0,cuda:1
    Multi-GPU data parallel: torchrun --nproc_per_node 8 -m alexrepro train …
    """
    flags = dict(epochs=epochs, batch_size=batch_size, lr=lr, crop=crop, width=width, towers=towers, init=init,
                 devices=devices, workers=workers, seed=seed)  # fmt: skip
    cfg = _config("train", TrainConfig, config, set_, flags, show_config, verbose, quiet, check=_check_model)
    shards, stats, out = _require(shards=shards, stats=stats, out=out)
    _folder_in(shards, "SHARDS", "alexrepro prepare")
    _folder_in(stats, "STATS", "alexrepro stats")
    _folder_out(out, "train")
    if resume and not (out / "checkpoint-last.pt").is_file():
        raise _error(
            f"--resume: {out} holds no checkpoint-last.pt to continue from; drop --resume to start a new run", 2
        )
    _announce("train", cfg, verbose, quiet)
    from alexrepro.train.loop import train as run_train  # torch, once the flags and paths are known good

    with _stage(quiet, _overrides(set_, flags)[1], interval=cfg.log_every) as progress:
        result = run_train(shards, stats, out, cfg, resume, progress)
    last = {**result.history[-1], **result.timings[-1]} if result.history and result.timings else {}
    rows = [(k, _percent(v) if k.endswith("_error") else _fmt(v)) for k, v in last.items()]
    rows.append(("output", str(out)))
    out_console.print(_table("train: last epoch", rows))


@app.command(epilog=keys_epilog("evaluate"))
def evaluate(
    checkpoint: Path | None = typer.Argument(
        None,
        metavar="CHECKPOINT",
        help="A checkpoint written by `alexrepro train`; or torchvision:alexnet, torchvision's pretrained AlexNet with "
        "its own preprocessing, to check this evaluation against its published 1-crop 43.45% / 20.91%.",
    ),
    shards: Path | None = typer.Argument(
        None, metavar="SHARDS", help="Folder written by `alexrepro prepare` (its val split is used)."
    ),
    out: Path | None = typer.Argument(
        None, metavar="OUT", help="Folder for metrics.json, the submission file and the report."
    ),
    batch_size: int | None = typer.Option(
        None, **default_help("evaluate", "batch_size", "Images per batch (each image gives 10 views).")
    ),
    devices: str | None = typer.Option(
        None, **default_help("evaluate", "devices", "auto, cpu, cuda, or cuda:0,cuda:1 for one tower per GPU.")
    ),
    workers: int | None = typer.Option(
        None,
        **default_help(
            "evaluate", "workers", "Decoding processes (0 = in this process; null = one per core, at most 8)."
        ),
    ),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print metrics.json on stdout instead of a table."),
    config: Path | None = config_option("evaluate"),
    set_: list[str] | None = SetOption,
    show_config: bool = ShowConfigOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """1-crop and 10-crop evaluation (paper §4.1) with an ILSVRC-style report and submission file.

    Example: alexrepro evaluate runs/train/checkpoint-best.pt data/shards reports
    """
    flags = dict(batch_size=batch_size, devices=devices, workers=workers)
    cfg = _config("evaluate", EvaluateConfig, config, set_, flags, show_config, verbose, quiet)
    checkpoint, shards, out = _require(checkpoint=checkpoint, shards=shards, out=out)
    _folder_out(out, "evaluate")
    if not str(checkpoint).startswith("torchvision:"):  # torchvision:alexnet, torchvision's pretrained reference
        _checkpoint_in(checkpoint)
    _folder_in(shards, "SHARDS", "alexrepro prepare")
    _announce("evaluate", cfg, verbose, quiet)
    from alexrepro.evaluate.stage import evaluate as run_evaluate  # torch, once the flags and paths are known good

    with _stage(quiet, _overrides(set_, flags)[1]) as progress:
        result = run_evaluate(checkpoint, shards, out, cfg, progress)
    metrics = result.metrics
    if as_json:
        print(json.dumps({k: metrics[k] for k in ("1crop", "10crop") if k in metrics}, indent=2))
        return
    table = Table(title=f"evaluate: {metrics.get('images', '?')} validation images", title_justify="left")
    table.add_column("protocol")
    table.add_column("top-1 error", justify="right")
    table.add_column("top-5 error", justify="right")
    for protocol in ("1crop", "10crop"):
        if protocol in metrics:
            m = metrics[protocol]
            table.add_row(protocol, _percent(m["top1_error"]), _percent(m["top5_error"]))
    out_console.print(table)
    out_console.print(f"report: [bold]{result.report_html}[/] and {result.report_md}")


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint written by `alexrepro train`."),
    images: list[Path] = typer.Argument(..., metavar="IMAGE", help="Image files of any size and format Pillow reads."),
    crops: int = typer.Option(10, help="10 = the paper's ten-patch average (§4.1); 1 = the centre crop."),
    devices: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print JSON on stdout instead of a table."),
) -> None:
    """Top-5 classes with names and probabilities for each image.

    Example: alexrepro predict runs/train/checkpoint-best.pt cat.jpg dog.png --crops 1
    """
    _checkpoint_in(checkpoint)
    for image in images:
        if not image.is_file():
            reason = "is a folder" if image.is_dir() else "does not exist"
            raise _error(f"IMAGE {image} {reason}; give image files", 2)
    with _stage(quiet=True):  # predict() checks --crops: a ConfigError, exit 2
        from alexrepro.evaluate.predict import PredictionError
        from alexrepro.evaluate.predict import predict as run_predict

        results = run_predict(checkpoint, list(images), crops=crops, device=devices)
    failed = [r for r in results if isinstance(r, PredictionError)]
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            if isinstance(r, PredictionError):
                continue
            table = Table(title=str(r.path), title_justify="left")
            table.add_column("#", justify="right")
            table.add_column("class")
            table.add_column("probability", justify="right")
            for rank, (name, prob) in enumerate(zip(r.names, r.probabilities, strict=True), start=1):
                table.add_row(str(rank), name, f"{prob:.3f}")
            out_console.print(table)
    for r in failed:
        _error(f"{r.path}: {r.reason}", 1)
    if failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks


def _print_bench(report: BenchReport, as_json: bool) -> None:
    if as_json:
        print(report.to_json())
        return
    table = Table(title=report.title, title_justify="left")
    columns = list(dict.fromkeys(k for row in report.rows for k in row))
    for column in columns:
        table.add_column(column, justify="left" if column == "name" else "right")
    for row in report.rows:
        table.add_row(*[_fmt(row.get(c, "")) for c in columns])
    out_console.print(table)
    ratios = Table(title="ratios (measured in this run)", title_justify="left")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    for name, value in report.ratios.items():
        ratios.add_row(name, f"{value:.2f}×")
    out_console.print(ratios)
    for note in report.notes:
        out_console.print(f"[dim]{note}[/]", highlight=False)


JsonOption = typer.Option(False, "--json", metavar="", help="Print the report as JSON on stdout instead of tables.")


@bench_app.command("prepare")
def bench_prepare(
    images: int = typer.Option(
        800, help="N: ImageNet-sized JPEGs per run; prepare also runs on 2N for the steady-state rate."
    ),
    workers: int = typer.Option(2, help="Worker processes for the parallel measurement."),
    as_json: bool = JsonOption,
) -> None:
    """prepare vs plain decode, the obvious way and the peer libraries' writers; 2 workers vs 1.

    The peers' rows: webdataset where it is installed (the tests install it), MosaicML streaming under
    .venv-peers/bin/python (scripts/install-bench-peers.sh).

    Example: alexrepro bench prepare --images 300
    """
    with _stage(quiet=True):
        from alexrepro.bench.data import bench_prepare as run

        report = run(images=images, workers=workers)
    _print_bench(report, as_json)


@bench_app.command("stats")
def bench_stats(
    images: int = typer.Option(
        2000, help="N: 256×256 shard images per run; stats also runs on 2N for the steady-state rate."
    ),
    workers: int = typer.Option(2, help="Worker processes for the parallel measurement (1 is always measured)."),
    as_json: bool = JsonOption,
) -> None:
    """stats vs plain decode of the same 256×256 shard JPEGs.

    Example: alexrepro bench stats --images 1000
    """
    with _stage(quiet=True):
        from alexrepro.bench.data import bench_stats as run

        report = run(images=images, workers=workers)
    _print_bench(report, as_json)


@bench_app.command("train")
def bench_train(
    devices: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: int = typer.Option(64, help="Batch size of the timed training steps."),
    steps: int = typer.Option(5, help="Timed steps per model."),
    precision: str = typer.Option(
        "auto", help="fp32 (the paper's: no TF32), tf32, bf16, or auto (bf16 on cuda, fp32 on cpu)."
    ),
    compile: bool = typer.Option(False, "--compile", metavar="", help="Also time torch.compile'd models."),
    compile_backend: str = typer.Option(
        "inductor", help="torch.compile's backend: inductor (generates kernels), or aot_eager (traces only: quick)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Training-step img/s of the paper's model vs torchvision's AlexNet on the same batch.

    Example: alexrepro bench train --devices cuda --batch-size 512 --compile
    """
    with _stage(quiet=True):
        from alexrepro.bench.model import bench_train as run

        if precision == "auto":
            precision = "bf16" if devices.startswith("cuda") else "fp32"
        report = run(device=devices, batch_size=batch_size, steps=steps, precision=precision, compile=compile,
                     compile_backend=compile_backend)  # fmt: skip
    _print_bench(report, as_json)


@bench_app.command("loader")
def bench_loader(
    images: int = typer.Option(1500, help="Number of 256×256 shard images to stream."),
    workers: int = typer.Option(2, help="Loader worker processes (also measured with 1)."),
    device: str = typer.Option(
        "cpu", help="Device the feed rows bring the crops to (cpu, cuda), decoded in the workers or on it."
    ),
    batch_size: int = typer.Option(128, help="Images per batch (128 = the paper's)."),
    as_json: bool = JsonOption,
) -> None:
    """Loader img/s per worker vs plain decode of the same shard JPEGs and the peer libraries' readers.

    The peers' rows: webdataset where it is installed (the tests install it), MosaicML streaming and litdata under
    .venv-peers/bin/python (scripts/install-bench-peers.sh).

    Example: alexrepro bench loader --images 2000 --workers 2
    """
    with _stage(quiet=True):
        from alexrepro.bench.loader import bench_loader as run

        report = run(images=images, workers=workers, device=device, batch_size=batch_size)
    _print_bench(report, as_json)


@bench_app.command("training")
def bench_training(
    folder: Path = typer.Option(Path("bench-training"), help="Where the prepared sample is written once and reused."),
    images: int = typer.Option(51_200, help="Train images of the sample (cycling a few hundred distinct ones)."),
    workers: int = typer.Option(8, help="Loader worker processes."),
    decode_on: str = typer.Option("workers", help="workers, or device (the GPU decodes the JPEGs)."),
    devices: str = typer.Option("cuda", help="cuda or cpu."),
    precision: str = typer.Option("bf16", help="bf16, or fp32 (the paper's: no TF32)."),
    width: float = typer.Option(1.0, help="Channel multiplier (1 = the paper's network)."),
    crop: int = typer.Option(227, help="Training crop (227 = the paper's)."),
    size: int = typer.Option(256, help="Side of the sample's images (256 = prepare's)."),
    as_json: bool = JsonOption,
) -> None:
    """End to end in steady state: img/s and data wait of the second of two epochs of `alexrepro train`.

    Example: alexrepro bench training --devices cuda --workers 14 --precision bf16
    """
    if decode_on not in ("workers", "device") or precision not in ("bf16", "fp32"):
        raise _error("--decode-on must be workers or device, --precision bf16 or fp32", 2)
    with _stage(quiet=True):
        from alexrepro.bench.loader import bench_training as run
        from alexrepro.bench.report import BenchReport

        small = devices == "cpu"  # a rehearsal: ten classes, a few distinct pictures
        row = run(folder, images=images, workers=workers, decode_on=cast(Any, decode_on), device=devices,
                  width=width, crop=crop, size=size, precision=cast(Any, precision), classes=10 if small else 1000,
                  distinct=64 if small else 512)  # fmt: skip
        report = BenchReport("end to end", [row], {}, [])
    _print_bench(report, as_json)


@bench_app.command("startup")
def bench_startup(
    samples: int = typer.Option(1_281_167, help="Train samples of the folder measured (ILSVRC-2012's by default)."),
    as_json: bool = JsonOption,
) -> None:
    """Seconds and memory from nothing to the first training batch, at a dataset's full count.

    Example: alexrepro bench startup --samples 1281167
    """
    with _stage(quiet=True):
        from alexrepro.bench.startup import bench_startup as run

        report = run(samples=samples)
    _print_bench(report, as_json)


@bench_app.command("scale")
def bench_scale(
    scales: str = typer.Option("1/64,1/8", help="Comma-separated fractions of ILSVRC-2012's counts (1 = full)."),
    work: Path = typer.Option(Path("bench-scale"), help="Folder for the downloads, shards and outputs (GBs)."),
    classes: int = typer.Option(1000, help="Classes (the real 1000; fewer for a quick look)."),
    steps: int = typer.Option(10, help="Training steps before train is stopped (SIGTERM, its clean stop)."),
    workers: int = typer.Option(2, help="Worker processes of prepare, stats, train's loader."),
    log: Path | None = typer.Option(None, help="Append every stage's output to this file."),
    markdown_out: Path | None = typer.Option(None, help="Also write the tables as Markdown to this file."),
    rows_out: Path | None = typer.Option(None, help="Append each stage's row as a JSON line when it ends."),
    download: list[str] | None = typer.Option(None, help="SCALE=DIR: use this existing download at that scale."),
    kill_resume: bool = typer.Option(
        False, "--kill-resume", metavar="", help="Also kill -9 a prepare halfway, rerun, compare."
    ),
    only: str | None = typer.Option(None, help="Comma-separated stages to run over an earlier run's work folder."),
    as_json: bool = JsonOption,
) -> None:
    """Every stage run for real at several scales: wall time, ms/image, peak RSS, disk, time to first result.

    Example: alexrepro bench scale --scales 1/64,1/8 --work /tmp/bench-scale
    """
    with _stage(quiet=True):
        from alexrepro.bench.scale import bench_scale as run

        try:
            fractions = [parse_scale(s) for s in scales.split(",") if s.strip()]
            downloads = {parse_scale(d.partition("=")[0]): Path(d.partition("=")[2]) for d in download or []}
        except ValueError as exc:
            raise _error(f"--scales/--download: {exc}", 2) from None
        report = run(
            fractions,
            work,
            classes=classes,
            steps=steps,
            workers=workers,
            log=log,
            progress_file=rows_out,
            downloads=downloads,
            kill_resume=kill_resume,
            only={s.strip() for s in only.split(",")} if only else None,
        )
    _print_bench(report, as_json)
    if markdown_out is not None:
        from alexrepro.bench.scale import markdown_table
        from alexrepro.core.atomic import atomic_write_text

        atomic_write_text(markdown_out, markdown_table(report))


@app.command()
def claims(
    repo: Path = typer.Option(Path("."), help="The DVC project whose experiments hold the claims runs."),
    output: Path = typer.Option(Path("docs/claims.md"), help="Where to write the table."),
    commands: bool = typer.Option(False, "--commands", metavar="", help="Print the `dvc exp run` commands instead."),
) -> None:
    """The paper's claims measured: docs/claims.md from `dvc exp show --json` (alexrepro.evaluate.claims).

    Example: alexrepro claims --commands > runs.sh; alexrepro claims --output docs/claims.md
    """
    with _stage(quiet=True):
        from alexrepro.evaluate import claims as measured

        if commands:
            typer.echo("\n".join(measured.commands()))
            return
        measured.write_claims(repo, output)
    typer.echo(f"claims: {output}")


def main() -> None:
    app(prog_name="alexrepro")


if __name__ == "__main__":
    main()
