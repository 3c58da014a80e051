"""The paper's claims, measured: `dvc exp run` experiments on the built-in sample, turned into docs/claims.md.

Every claim of the paper that has a switch is one row: the paper's network with that switch flipped, against the
paper's network, both trained under the same seeds. The experiments are plain `dvc exp run -S …` runs of this
project's pipeline (`commands()` lists them); `alexrepro claims` reads what `dvc exp show --json` recorded (each
experiment's params and metrics) and writes the table. Nothing in the table is typed by hand: an arm whose
experiments are missing shows as "not measured".

The claims recipe is the demo's (stages/*.yaml) made smaller to cost about a minute per train + evaluate on two
quiet CPU cores: fewer, smaller images (76 px, cropped to 67, the smallest input with three 3/2 max-pools), an
eighth of the channels, batch 32 and 15 epochs, enough for the paper's arm to learn the sample (about 30 % top-1
error against 90 % for chance; with 4 epochs of 60 images per class it stayed near chance, and every arm that
learns faster at first looked better). Its departures from the paper are the demo's (He init, input scale 1/64,
lr 0.02 with a fixed step) plus these sizes; CLAIMS_RECIPE lists them all.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alexrepro.core.errors import AlexReproError
from alexrepro.train.config import TrainConfig

SEEDS = (0, 1, 2)

# Overrides of stages/*.yaml shared by every claims experiment (stage file, key, value).
CLAIMS_RECIPE: tuple[tuple[str, str, Any], ...] = (
    ("sample", "train_per_class", 100),  # demo: 300 (the real set: 732–1300)
    ("sample", "val_per_class", 20),  # demo and the real set: 50
    ("prepare", "size", 76),  # paper: 256; 67/76 crops about as much as 227/256
    ("train", "crop", 67),  # paper: 227; the smallest input for conv1 and three 3/2 max-pools
    ("train", "width", 0.125),  # paper: 1.0
    ("train", "epochs", 15),  # paper: ~90
    ("train", "batch_size", 32),  # paper: 128; more steps for the same images
    ("train", "lr_milestones", [11]),  # paper: ÷10 on plateaus of the validation error
    ("evaluate", "neighbours_max_train", 0),  # Figure 4's neighbours are not a claim: skipped
    ("evaluate", "workers", 1),
)


def recipe_value(stage: str, key: str) -> Any:
    """The claims recipe's value of `stage`'s `key`."""
    return next(value for s, k, value in CLAIMS_RECIPE if (s, k) == (stage, key))


@dataclass(frozen=True)
class Claim:
    name: str  # also the experiment name prefix
    section: str
    claim: str  # what the paper says, with its number where it gives one
    arm: tuple[tuple[str, Any], ...]  # train.yaml overrides of the ablated arm ((), for a test-time comparison)
    metric: str = "1crop"  # "1crop": val error with the ablated arm minus the paper's; "10crop": 1-crop minus 10-crop
    # "train_error": last epoch's training top-1 error, ablated minus the paper's


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "relu-vs-tanh",
        "§3.1",
        "ReLU reaches 25% training error about 6× sooner than tanh (Figure 1; CIFAR-10, a 4-layer net)",
        (("activation", "tanh"),),
        "train_error",
    ),
    Claim(
        "two-towers-vs-one-gpu",
        "§3.2",
        "two towers beat the one-GPU net (half the kernels in conv1–conv4) by 1.7 top-1 / 1.2 top-5 points",
        (("towers", 1), ("layer_widths", [0.5, 0.5, 0.5, 0.5, 1, 1, 1])),
    ),
    Claim("lrn", "§3.3", "LRN lowers top-1 / top-5 error by 1.4 / 1.2 points", (("lrn", False),)),
    Claim(
        "overlap-pool",
        "§3.4",
        "overlapping pooling (3/2 vs 2/2) lowers top-1 / top-5 error by 0.4 / 0.3 points",
        (("overlap_pool", False),),
    ),
    Claim("pca-lighting", "§4.1", "PCA lighting lowers top-1 error by over 1 point", (("pca_lighting", False),)),
    Claim("ten-crop", "§4.1", "averaging 10 patches at test time (no number given in the paper)", (), "10crop"),
    Claim(
        "dropout",
        "§4.2",
        "without dropout the net overfits substantially (no number given; dropout about "
        "doubles the iterations to converge)",
        (("dropout", 0.0),),
    ),
    Claim(
        "dropout-scaling",
        "§4.2",
        "×0.5 at test time (not compared in the paper; inverted = nn.Dropout)",
        (("dropout_scaling", "inverted"),),
    ),
    Claim(
        "bias-decay",
        "§5",
        "weight decay on weights only (not compared in the paper; decayed biases = PyTorch's habit)",
        (("decay_biases", True),),
    ),
)


def _flag(stage: str, key: str, value: Any) -> str:
    if value == "$SEED":  # a shell variable, left for the shell to expand
        return f"-S stages/{stage}.yaml:{key}=$SEED"
    return f"-S {shlex.quote(f'stages/{stage}.yaml:{key}={json.dumps(value)}')}"


def recipe_flags() -> str:
    return " ".join(_flag(stage, key, value) for stage, key, value in CLAIMS_RECIPE)


def arm_flags(arm: tuple[tuple[str, Any], ...], seed: int | str) -> str:  # str: a shell variable, "$SEED"
    return " ".join([_flag("train", k, v) for k, v in arm] + [_flag("train", "seed", seed)])


def commands() -> list[str]:
    """Every `dvc exp run` the table needs: the paper's arm and each ablated arm, seed by seed (so that every row
    has its first seeds early). Each starts from the committed stages/*.yaml (`git checkout -- stages` between)."""
    arms = {"paper": ()} | {c.name: c.arm for c in CLAIMS if c.arm}
    return [
        f"dvc exp run -n claims-{name}-s{seed} {recipe_flags()} {arm_flags(arm, seed)}"
        for seed in SEEDS
        for name, arm in arms.items()
    ]


# ----------------------------------------------------------------------------------------------- reading results


@dataclass
class Run:
    params: dict[str, dict[str, Any]]  # stage → params file contents
    metrics: dict[str, Any]  # reports/metrics.json
    last_epoch: dict[str, Any]  # runs/train/last_epoch.json
    baseline: str = ""  # the commit the experiment ran on (its code)


class ClaimsError(AlexReproError):
    pass


def runs_from_exp_show(shown: list[dict]) -> list[Run]:
    """Every finished experiment in `dvc exp show --json` output that has evaluation metrics. Left out: the
    workspace and running or queued experiments (while one runs, it shows the workspace: its own params beside the
    previous run's metrics), and the commits themselves (a commit's metrics are whatever was committed)."""
    runs = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            if exp.get("executor"):  # running, queued or failed: not a finished experiment
                continue
            for entry in exp.get("revs") or []:
                data = entry.get("data") or {}
                if entry.get("rev") == "workspace" or entry.get("error"):
                    continue
                params = {Path(p).stem: (v.get("data") or {}) for p, v in (data.get("params") or {}).items()}
                metrics = {Path(p).name: (v.get("data") or {}) for p, v in (data.get("metrics") or {}).items()}
                if "metrics.json" in metrics and "last_epoch.json" in metrics and "train" in params:
                    runs.append(Run(params, metrics["metrics.json"], metrics["last_epoch.json"], commit.get("rev", "")))
    return runs


def _matches(run: Run, overrides: dict[tuple[str, str], Any]) -> bool:
    for (stage, key), value in overrides.items():
        have = run.params.get(stage, {}).get(key)
        if isinstance(value, (list, tuple)):
            if not isinstance(have, (list, tuple)) or [float(v) for v in have] != [float(v) for v in value]:
                return False
        elif have != value:
            return False
    return True


def arm_runs(runs: list[Run], arm: tuple[tuple[str, Any], ...]) -> dict[int, Run]:
    """The runs of one arm (the claims recipe plus `arm`; every other switch at the paper's value), by seed."""

    paper = TrainConfig()
    overrides = {(stage, key): value for stage, key, value in CLAIMS_RECIPE}
    switches = {k for c in CLAIMS for k, _ in c.arm}
    overrides |= {("train", k): _plain(getattr(paper, k)) for k in switches}  # the paper's arm, unless flipped
    overrides |= {("train", k): v for k, v in arm}
    found: dict[int, Run] = {}
    for run in runs:
        seed = run.params.get("train", {}).get("seed")
        if seed in SEEDS and _matches(run, overrides):
            found[seed] = run  # several identical experiments: any one (they ran the same command)
    return found


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------------------- the table


def _errors(run: Run, metric: str) -> tuple[float, float]:
    if metric == "train_error":
        return float(run.last_epoch["train_top1_error"]), float(run.last_epoch["train_top5_error"])
    crop = run.metrics["1crop"]
    return float(crop["top1_error"]), float(crop["top5_error"])


def mean_std(values: list[float]) -> str:
    """Percentage points, mean ± sample std."""
    if not values:
        return "not measured"
    mean = statistics.fmean(values) * 100
    std = statistics.stdev(values) * 100 if len(values) > 1 else math.nan
    return f"{mean:+.1f} ± {std:.1f}" if not math.isnan(std) else f"{mean:+.1f}"


def claim_row(claim: Claim, runs: list[Run]) -> dict[str, Any]:
    """One row: the effect of the paper's choice (ablated error − paper's error; positive = the paper's choice
    helps), per seed, then mean ± std over the seeds that both arms have."""
    paper = arm_runs(runs, ())
    if claim.metric == "10crop":
        seeds = sorted(paper)
        top1 = [paper[s].metrics["1crop"]["top1_error"] - paper[s].metrics["10crop"]["top1_error"] for s in seeds]
        top5 = [paper[s].metrics["1crop"]["top5_error"] - paper[s].metrics["10crop"]["top5_error"] for s in seeds]
    else:
        ablated = arm_runs(runs, claim.arm)
        seeds = sorted(set(paper) & set(ablated))
        pairs = [(_errors(ablated[s], claim.metric), _errors(paper[s], claim.metric)) for s in seeds]
        top1 = [a[0] - p[0] for a, p in pairs]
        top5 = [a[1] - p[1] for a, p in pairs]
    return {"claim": claim, "seeds": seeds, "top1": top1, "top5": top5}


def verdict(row: dict[str, Any]) -> str:
    """Whether the measured effect shows: its mean is beyond two standard errors of zero, in which direction."""
    values = row["top1"]
    if not values:
        return "not measured"
    if len(values) < 2:
        return "too few seeds"
    mean, std = statistics.fmean(values), statistics.stdev(values)
    margin = 2 * std / math.sqrt(len(values))
    if mean > margin:
        return "shows (the paper's choice is better)"
    if mean < -margin:
        return "reversed here"
    return "does not show on this sample"


def render(runs: list[Run], source: str) -> str:
    """docs/claims.md: the table, the recipe and the commands."""
    rows = [claim_row(c, runs) for c in CLAIMS]
    lines = [
        "# The paper's claims, measured on the built-in sample",
        "",
        f"Generated by `alexrepro claims` from {source}; do not edit by hand.",
        "",
        "Effect = error of the ablated arm − error of the paper's arm, in percentage points of validation error",
        "(1-crop, 200 images), mean ± std over the seeds listed; positive means the paper's choice helps, as the",
        "paper claims. The ReLU row compares the last epoch's training error (the claim is about training speed);",
        "the 10-crop row compares 1-crop with 10-crop error of the paper's arm. The paper's numbers are for the",
        "full net on ILSVRC-2012 after ~90 epochs: this is a ten-class synthetic set, an eighth of the channels and",
        f"{recipe_value('train', 'epochs')} epochs, so a claim that does not show here is not refuted by it.",
        "",
        "| Claim | Paper says | Measured top-1 effect | Measured top-5 effect | Seeds | Here | Command |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        claim: Claim = row["claim"]
        arm = arm_flags(claim.arm, "$SEED") if claim.arm else _flag("train", "seed", "$SEED")
        command = f'`dvc exp run "${{CLAIMS[@]}}" {arm}`'
        if claim.arm:
            command += " and the paper's arm"
        lines.append(
            f"| {claim.section} {claim.name} | {claim.claim} | {mean_std(row['top1'])} | {mean_std(row['top5'])} | "
            f"{', '.join(map(str, row['seeds'])) or '–'} | {verdict(row)} | {command} |"
        )
    paper = arm_runs(runs, ())
    used = [r for c in CLAIMS for r in arm_runs(runs, c.arm).values()] + list(paper.values())
    commits = sorted({r.baseline[:12] for r in used if r.baseline})
    classes = int(next(iter(paper.values())).params.get("sample", {}).get("classes", 10)) if paper else 10
    lines += [
        "",
        "The paper's arm alone (absolute errors, %, mean ± std): " + _absolute(paper),
        f"Chance on {classes} classes: {100 - 100 / classes:.0f}% top-1, {max(0, 100 - 500 / classes):.0f}% top-5.",
        "",
        f"{len({id(r) for r in used})} experiments, run on commit {', '.join(commits) or '–'} of this project.",
        "",
        "## Reproduce",
        "",
        "Each row's command above runs one seed of its ablated arm (with `SEED` set and `CLAIMS` as below); the paper's",
        "arm is the same command without the row's switch. Every experiment, one after another, then the table:",
        "",
        "```sh",
        f"CLAIMS=({recipe_flags()})   # a bash array: its quoted flags stay whole",
        "dvc repro   # the demo pipeline once (the claims recipe then resamples the data itself)",
        "alexrepro claims --commands | while read -r cmd; do",
        "  git checkout HEAD -- stages/   # dvc exp run leaves the last experiment's params in the workspace",
        '  eval "nice -n 10 $cmd"',
        "done",
        "alexrepro claims --output docs/claims.md",
        "```",
        "",
        "`alexrepro claims --commands` prints every experiment as one line. The claims recipe differs from the",
        "paper in: "
        + "; ".join(f"{stage}.{key} = {json.dumps(value)}" for stage, key, value in CLAIMS_RECIPE)
        + "; and the demo's own departures (stages/train.yaml: He init, input scale 1/64, lr 0.02, fixed"
        " lr steps).",
        "",
    ]
    return "\n".join(lines)


def _absolute(paper: dict[int, Run]) -> str:
    if not paper:
        return "not measured."
    parts = []
    for label, values in (
        ("1-crop top-1", [r.metrics["1crop"]["top1_error"] for r in paper.values()]),
        ("1-crop top-5", [r.metrics["1crop"]["top5_error"] for r in paper.values()]),
        ("10-crop top-1", [r.metrics["10crop"]["top1_error"] for r in paper.values()]),
        ("last-epoch training top-1", [r.last_epoch["train_top1_error"] for r in paper.values()]),
    ):
        std = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
        parts.append(f"{label} {statistics.fmean(values) * 100:.1f} ± {std:.1f}")
    return "; ".join(parts) + f" (seeds {', '.join(map(str, sorted(paper)))})."


def dvc_executable() -> str:
    """The `dvc` on PATH, else the one installed beside this interpreter (a venv run without activating it)."""
    beside = Path(sys.executable).parent / "dvc"
    found = shutil.which("dvc") or (str(beside) if beside.is_file() else None)
    if found is None:
        raise ClaimsError("dvc not found on PATH nor beside this Python; install it with: pip install -e '.[dvc]'")
    return found


def exp_show(repo: Path) -> list[dict]:
    """`dvc exp show --json` in `repo`."""
    result = subprocess.run(
        [dvc_executable(), "exp", "show", "--json", "--all-commits"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ClaimsError(f"{repo}: `dvc exp show --json` failed ({first}); run it in the DVC project")
    return json.loads(result.stdout)


def write_claims(repo: Path, output: Path) -> str:
    text = render(runs_from_exp_show(exp_show(repo)), "`dvc exp show --json`")
    output.write_text(text)
    return text


def read_measured(path: Path) -> dict[str, str]:
    """What docs/claims.md measured, by the first switch of each claim's arm (`lrn` → "-3.3 ± 10.9 points top-1: does
    not show on this sample"); {} when the file is missing. Read by the report, which shows it beside the paper's."""
    path = Path(path)
    if not path.is_file():
        return {}
    by_name = {f"{c.section} {c.name}": c for c in CLAIMS}
    measured = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        claim = by_name.get(cells[0]) if len(cells) >= 6 else None
        if claim is None or not claim.arm:
            continue
        top1, here = cells[2], cells[5]
        measured[claim.arm[0][0]] = f"{top1} points top-1: {here}" if top1 != "not measured" else top1
    return measured
