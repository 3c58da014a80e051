"""The `alexrepro` command line: parse flags, call one library function, print what happened.

Each stage command builds its config from defaults (the paper's values), then `--config FILE`, then `--set KEY=VALUE`,
then the named flags, and calls the stage's library function. Library errors (`AlexReproError`) become one red line on
stderr and exit code 1; set ALEXREPRO_TRACEBACK=1 to see the traceback instead. Heavy imports (torch) happen inside
the commands so that `--help` is instant.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from alexrepro.errors import AlexReproError, ConfigError
from alexrepro.progress import NullProgress

app = typer.Typer(
    help="Reproduce AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) on ILSVRC-2012.\n\n"
    "Pipeline: sample → prepare → stats → train → evaluate (or `dvc repro`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Throughput of each stage on this machine, each figure beside a baseline measured in the same run.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

err_console = Console(stderr=True)
out_console = Console()

# Options every stage command shares.
ConfigOption = typer.Option(None, "--config", help="YAML file of this stage's parameters (e.g. stages/train.yaml).")
SetOption = typer.Option(None, "--set", "-S", help="Override any parameter: --set key=value (repeatable).")
QuietOption = typer.Option(False, "--quiet", "-q", help="No progress bars; errors are still printed.")


# ---------------------------------------------------------------------------------------------------------------
# Terminal progress and error reporting


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {task.fields.get('unit', 'img')}/s" if speed else "", style="cyan")


class _CountColumn(ProgressColumn):
    def render(self, task) -> Text:
        total = f"{task.total:,.0f}" if task.total is not None else "?"
        return Text(f"{task.completed:,.0f}/{total}")


class RichProgress:
    """The terminal implementation of alexrepro.progress.Progress: a Rich bar on stderr."""

    def __init__(self, console: Console):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _CountColumn(),
            _RateColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = None

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def start(self, description: str, total: int | None) -> None:
        self.finish()
        self._task = self._progress.add_task(description, total=total, info="")

    def advance(self, units: int = 1, **fields: object) -> None:
        if self._task is None:
            return
        info = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        self._progress.update(self._task, advance=units, info=info)

    def log(self, line: str) -> None:
        self._progress.console.print(line, highlight=False)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)
            self._task = None


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@contextmanager
def _stage(quiet: bool) -> Iterator[Any]:
    """Run a stage: give it a progress sink and turn library errors into one line on stderr plus exit code 1."""
    try:
        if quiet:
            yield NullProgress()
        else:
            with RichProgress(err_console) as progress:
                yield progress
    except AlexReproError as exc:
        if os.environ.get("ALEXREPRO_TRACEBACK"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def _overrides(sets: Optional[List[str]], flags: dict[str, Any]) -> dict[str, Any]:
    """Merge `--set key=value` pairs (values parsed as YAML) and named flags; named flags win."""
    merged: dict[str, Any] = {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lrn=false")
        merged[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged


def _config(cls, config_path: Optional[Path], sets: Optional[List[str]], flags: dict[str, Any]):
    from alexrepro.config import load_config

    return load_config(cls, config_path, _overrides(sets, flags))


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Pipeline stages


@app.command()
def sample(
    out: Path = typer.Argument(..., help="Folder to write the three ILSVRC-2012-style archives into."),
    classes: Optional[int] = typer.Option(None, help="Number of synthetic classes."),
    train_per_class: Optional[int] = typer.Option(None, help="Training images per class."),
    val_per_class: Optional[int] = typer.Option(None, help="Validation images per class."),
    seed: Optional[int] = typer.Option(None, help="Random seed; the same seed writes byte-identical archives."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    quiet: bool = QuietOption,
) -> None:
    """Write the built-in miniature ILSVRC-2012: the real download's three archives, in the real formats.

    Example: alexrepro sample data/sample --classes 10
    """
    with _stage(quiet) as progress:
        from alexrepro.sample import SampleConfig, write_sample

        cfg = _config(
            SampleConfig, config, set_,
            dict(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed),
        )
        result = write_sample(out, cfg, progress)
    if not quiet:
        err_console.print(f"wrote the sample ILSVRC-2012 to [bold]{out}[/] ({_describe_counts(result)})")


def _describe_counts(result: Any) -> str:
    counts = getattr(result, "counts", None)
    if isinstance(counts, dict):
        return ", ".join(f"{k}: {v}" for k, v in counts.items())
    return str(counts)


@app.command()
def prepare(
    source: Path = typer.Argument(..., help="The ILSVRC-2012 download folder, an extracted tree or an ImageFolder."),
    out: Path = typer.Argument(..., help="Folder for the webdataset shards and manifest.json."),
    size: Optional[int] = typer.Option(None, help="Shorter side and square crop size in pixels (paper §2: 256)."),
    quality: Optional[int] = typer.Option(None, help="JPEG quality of the re-encoded images."),
    shard_size: Optional[int] = typer.Option(None, help="Images per shard."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (0 = all cores)."),
    max_rejected: Optional[int] = typer.Option(None, help="Exit non-zero if more unreadable images than this."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output made with other settings."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    quiet: bool = QuietOption,
) -> None:
    """Resize to 256, centre-crop and pack into webdataset shards, reading archives in place.

    Example: alexrepro prepare /datasets/ILSVRC2012 data/shards --workers 16
    """
    with _stage(quiet) as progress:
        from alexrepro.prepare import PrepareConfig
        from alexrepro.prepare import prepare as run_prepare

        cfg = _config(
            PrepareConfig, config, set_,
            dict(size=size, quality=quality, shard_size=shard_size, workers=workers, max_rejected=max_rejected),
        )
        result = run_prepare(source, out, cfg, overwrite, progress)
    if not quiet:
        rows = [("layout", str(result.layout)), ("Pillow", str(result.pillow))]
        for split, count in result.written.items():
            rejected = sum(1 for r in result.rejected if r.split == split)
            shards = len(result.manifest.splits[split].shards)
            rows.append((split, f"{count:,} images in {shards} shards, {rejected} rejected"))
        rows.append(("output", str(out)))
        err_console.print(_table("prepare", rows))


@app.command()
def stats(
    shards: Path = typer.Argument(..., help="Folder written by `alexrepro prepare`."),
    out: Path = typer.Argument(..., help="Folder for stats.npz, stats.json and mean.png."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (0 = all cores)."),
    max_images: Optional[int] = typer.Option(None, help="Use only the first N training images (a quick estimate)."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    quiet: bool = QuietOption,
) -> None:
    """Per-pixel mean image and the RGB covariance with its eigen-decomposition (paper §2, §4.1).

    Example: alexrepro stats data/shards data/stats
    """
    with _stage(quiet) as progress:
        from alexrepro.stats import StatsConfig, compute_stats

        cfg = _config(StatsConfig, config, set_, dict(workers=workers, max_images=max_images))
        result = compute_stats(shards, out, cfg, progress)
    if not quiet:
        s = result.stats if hasattr(result, "stats") else result
        rows = []
        for name in ("image_count", "channel_mean", "eigval"):
            value = getattr(s, name, None)
            if value is not None:
                rows.append((name, _short(value)))
        rows.append(("output", str(out)))
        err_console.print(_table("stats", rows))


def _short(value: Any) -> str:
    try:
        import numpy as np

        return np.array2string(np.asarray(value), precision=3, suppress_small=True)
    except Exception:  # a plain number or something numpy does not take
        return str(value)


@app.command()
def train(
    shards: Path = typer.Argument(..., help="Folder written by `alexrepro prepare`."),
    stats: Path = typer.Argument(..., help="Folder written by `alexrepro stats`."),
    out: Path = typer.Argument(..., help="Folder for checkpoints and the per-epoch history."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (paper §5: about 90)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size (paper §5: 128)."),
    lr: Optional[float] = typer.Option(None, help="Initial learning rate (paper §5: 0.01)."),
    crop: Optional[int] = typer.Option(None, help="Crop size fed to the network (227; the paper's text says 224)."),
    width: Optional[float] = typer.Option(None, help="Channel multiplier (1.0 = the paper's widths)."),
    towers: Optional[int] = typer.Option(None, help="2 = the paper's two towers; 1 = one tower (§3.2's one-GPU net also halves conv1–4: layer_widths)."),
    init: Optional[str] = typer.Option(None, help="Weight initialisation: paper (§5) or he."),
    devices: Optional[str] = typer.Option(None, help="auto, cpu, cuda, or cuda:0,cuda:1 for one tower per GPU."),
    workers: Optional[int] = typer.Option(None, help="Data loader worker processes."),
    seed: Optional[int] = typer.Option(None, help="Random seed for initialisation, shuffling and augmentation."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint-last.pt."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    quiet: bool = QuietOption,
) -> None:
    """Train the two-tower network with the paper's augmentation and SGD recipe (§4, §5).

    Example: alexrepro train data/shards data/stats runs/train --devices cuda:0,cuda:1
    Multi-GPU data parallel: torchrun --nproc_per_node 8 -m alexrepro train …
    """
    with _stage(quiet) as progress:
        from alexrepro.train import TrainConfig
        from alexrepro.train import train as run_train

        cfg = _config(
            TrainConfig, config, set_,
            dict(epochs=epochs, batch_size=batch_size, lr=lr, crop=crop, width=width, towers=towers, init=init,
                 devices=devices, workers=workers, seed=seed),
        )
        result = run_train(shards, stats, out, cfg, resume, progress)
    if not quiet:
        history = getattr(result, "history", None) or []
        last = history[-1] if history else {}
        rows = [(k, _fmt(v)) for k, v in last.items()]
        rows.append(("output", str(out)))
        err_console.print(_table("train: last epoch", rows))


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `alexrepro train`."),
    shards: Path = typer.Argument(..., help="Folder written by `alexrepro prepare` (its val split is used)."),
    out: Path = typer.Argument(..., help="Folder for metrics.json, the submission file and the report."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (each image gives 10 views)."),
    devices: Optional[str] = typer.Option(None, help="auto, cpu, cuda, or cuda:0,cuda:1 for one tower per GPU."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    quiet: bool = QuietOption,
) -> None:
    """1-crop and 10-crop evaluation (paper §4.1) with an ILSVRC-style report and submission file.

    Example: alexrepro evaluate runs/train/checkpoint-best.pt data/shards reports
    """
    with _stage(quiet) as progress:
        from alexrepro.evaluate import EvaluateConfig
        from alexrepro.evaluate import evaluate as run_evaluate

        cfg = _config(EvaluateConfig, config, set_, dict(batch_size=batch_size, devices=devices))
        result = run_evaluate(checkpoint, shards, out, cfg, progress)
    metrics = result.metrics
    table = Table(title=f"evaluate: {metrics.get('images', '?')} validation images", title_justify="left")
    table.add_column("protocol")
    table.add_column("top-1 error", justify="right")
    table.add_column("top-5 error", justify="right")
    for protocol in ("1crop", "10crop"):
        if protocol in metrics:
            m = metrics[protocol]
            table.add_row(protocol, f"{100 * m['top1_error']:.2f}%", f"{100 * m['top5_error']:.2f}%")
    err_console.print(table)
    err_console.print(f"report: [bold]{result.report_html}[/] and {result.report_md}")


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `alexrepro train`."),
    images: List[Path] = typer.Argument(..., help="Image files of any size and format Pillow reads."),
    crops: int = typer.Option(10, help="10 = the paper's ten-patch average (§4.1); 1 = the centre crop."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
) -> None:
    """Top-5 classes with names and probabilities for each image.

    Example: alexrepro predict runs/train/checkpoint-best.pt cat.jpg dog.png --crops 1
    """
    if crops not in (1, 10):
        err_console.print(f"[bold red]error:[/] --crops must be 1 or 10, got {crops}")
        raise typer.Exit(2)
    with _stage(quiet=True):
        from alexrepro.predict import PredictionError
        from alexrepro.predict import predict as run_predict

        results = run_predict(checkpoint, list(images), crops=crops, device=device)
    failed = [r for r in results if isinstance(r, PredictionError)]
    if as_json:
        print(json.dumps([_prediction_dict(r) for r in results], indent=2))
    else:
        for r in results:
            if isinstance(r, PredictionError):
                continue
            table = Table(title=str(r.path), title_justify="left")
            table.add_column("#", justify="right")
            table.add_column("class")
            table.add_column("probability", justify="right")
            for rank, (name, prob) in enumerate(zip(r.names, r.probabilities), start=1):
                table.add_row(str(rank), name, f"{prob:.3f}")
            out_console.print(table)
    for r in failed:
        err_console.print(f"[bold red]error:[/] {r.path}: {r.reason}", highlight=False)
    if failed:
        raise typer.Exit(1)


def _prediction_dict(result: Any) -> dict:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    from dataclasses import asdict

    data = asdict(result)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks


def _print_bench(report: Any, json_out: Optional[Path]) -> None:
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
    if json_out is not None:
        from alexrepro.atomic import atomic_write_text

        atomic_write_text(json_out, report.to_json())


JsonOption = typer.Option(None, "--json-out", help="Also write the report as JSON to this file.")


@bench_app.command("prepare")
def bench_prepare(
    images: int = typer.Option(
        800, help="N: ImageNet-sized JPEGs per run; prepare also runs on 2N for the steady-state rate."
    ),
    workers: int = typer.Option(2, help="Worker processes for the parallel measurement."),
    json_out: Optional[Path] = JsonOption,
) -> None:
    """prepare vs plain decode, vs the obvious way, and 2 workers vs 1.

    Example: alexrepro bench prepare --images 300
    """
    with _stage(quiet=True):
        from alexrepro.bench_data import bench_prepare as run

        report = run(images=images, workers=workers)
    _print_bench(report, json_out)


@bench_app.command("stats")
def bench_stats(
    images: int = typer.Option(
        2000, help="N: 256×256 shard images per run; stats also runs on 2N for the steady-state rate."
    ),
    workers: int = typer.Option(2, help="Worker processes for the parallel measurement (1 is always measured)."),
    json_out: Optional[Path] = JsonOption,
) -> None:
    """stats vs plain decode of the same 256×256 shard JPEGs.

    Example: alexrepro bench stats --images 1000
    """
    with _stage(quiet=True):
        from alexrepro.bench_data import bench_stats as run

        report = run(images=images, workers=workers)
    _print_bench(report, json_out)


@bench_app.command("train")
def bench_train(
    device: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: int = typer.Option(64, help="Batch size of the timed training steps."),
    steps: int = typer.Option(5, help="Timed steps per model."),
    precision: str = typer.Option("auto", help="fp32, bf16, or auto (bf16 on cuda, fp32 on cpu)."),
    compile: bool = typer.Option(False, "--compile", help="Also time torch.compile'd models."),
    json_out: Optional[Path] = JsonOption,
) -> None:
    """Training-step img/s of the paper's model vs torchvision's AlexNet on the same batch.

    Example: alexrepro bench train --device cuda --batch-size 512 --compile
    """
    with _stage(quiet=True):
        from alexrepro.bench_model import bench_train as run

        if precision == "auto":
            precision = "bf16" if device.startswith("cuda") else "fp32"
        report = run(device=device, batch_size=batch_size, steps=steps, precision=precision, compile=compile)
    _print_bench(report, json_out)


@bench_app.command("loader")
def bench_loader(
    images: int = typer.Option(1500, help="Number of 256×256 shard images to stream."),
    workers: int = typer.Option(2, help="Loader worker processes (also measured with 1)."),
    json_out: Optional[Path] = JsonOption,
) -> None:
    """Loader img/s per worker vs plain decode of the same shard JPEGs.

    Example: alexrepro bench loader --images 2000 --workers 2
    """
    with _stage(quiet=True):
        from alexrepro.bench_loader import bench_loader as run

        report = run(images=images, workers=workers)
    _print_bench(report, json_out)


@app.command()
def claims(
    repo: Path = typer.Option(Path("."), help="The DVC project whose experiments hold the claims runs."),
    output: Path = typer.Option(Path("docs/claims.md"), help="Where to write the table."),
    commands: bool = typer.Option(False, "--commands", help="Print the `dvc exp run` commands instead."),
) -> None:
    """The paper's claims measured: docs/claims.md from `dvc exp show --json` (alexrepro.claims).

    Example: alexrepro claims --commands > runs.sh; alexrepro claims --output docs/claims.md
    """
    with _stage(quiet=True):
        from alexrepro import claims as measured

        if commands:
            typer.echo("\n".join(measured.commands()))
            return
        measured.write_claims(repo, output)
    typer.echo(f"claims: {output}")


def main() -> None:
    app(prog_name="alexrepro")


if __name__ == "__main__":
    main()
