"""The DVC project: dvc.yaml agrees with the stage configs, and `dvc repro` / `dvc exp run` work on a tiny sample."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alexrepro.cli.configdoc import STAGE_CONFIGS, config_class
from alexrepro.core.config import load_config
from alexrepro.evaluate.stage import result_line

ROOT = Path(__file__).resolve().parents[1]
# The module whose code each stage runs (its config class is found through the CLI's own map).
STAGE_MODULES = {
    "sample": "alexrepro.synth.sample",
    "prepare": "alexrepro.data.prepare",
    "stats": "alexrepro.data.stats",
    "train": "alexrepro.train.loop",
    "evaluate": "alexrepro.evaluate.stage",
}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_pipeline_has_the_five_stages_in_order():
    assert list(dvc_stages()) == ["sample", "prepare", "stats", "train", "evaluate"]


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_each_stage_reads_its_own_params_file_with_config(stage):
    spec = dvc_stages()[stage]
    params_file = f"stages/{stage}.yaml"
    assert f"--config {params_file}" in spec["cmd"]
    assert spec["params"] == [{params_file: None}]
    assert spec["cmd"].startswith(f"alexrepro {stage} ")


@pytest.mark.parametrize("folder", ["stages", "stages/imagenet"])
@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_every_param_key_exists_in_the_config_class(folder, stage):
    # load_config raises ConfigError on any unknown key or wrong type.
    load_config(config_class(stage), ROOT / folder / f"{stage}.yaml")


def test_imagenet_train_params_are_the_papers_defaults():
    cls = config_class("train")
    paper = load_config(cls, ROOT / "stages/imagenet/train.yaml")
    speed_only = {"devices", "workers"}
    default = cls()
    differing = {k for k in vars(default) if getattr(paper, k) != getattr(default, k)}
    assert differing <= speed_only


TINY = {
    "sample": {"classes": 3, "train_per_class": 8, "val_per_class": 2, "seed": 0, "image_scale": 0.25, "workers": 1},
    "prepare": {"size": 80, "quality": 90, "shard_size": 10, "workers": 1, "max_rejected": 0, "seed": 0},
    "stats": {"workers": 1, "max_images": None},
    "train": {
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.01,
        "crop": 67,
        "width": 0.125,
        "init": "he",
        "input_scale": 0.015625,
        "devices": "cpu",
        "workers": 0,
        "seed": 0,
        "lr_schedule": "step",
        "lr_milestones": [],
        "lrn": True,
        "overlap_pool": True,
    },
    "evaluate": {"batch_size": 8, "devices": "cpu", "workers": 0, "neighbours_max_train": None},
}


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def tiny_repo(tmp_path):
    """A copy of this project's tracked files in a fresh git repository, with tiny stage parameters."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    for stage, params in TINY.items():
        (repo / "stages" / f"{stage}.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        DVC_NO_ANALYTICS="1",
    )
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny pipeline"], repo, env)
    return repo, env


@pytest.mark.slow
def test_dvc_repro_then_experiment_on_a_tiny_sample(tiny_repo):
    repo, env = tiny_repo
    run(["dvc", "repro", "--quiet"], repo, env)
    assert json.loads((repo / "reports" / "evaluation.json").read_text())["images"] == 3 * 2
    # what scripts/demo.sh prints at the end, from the files the pipeline wrote
    assert result_line(repo / "reports").startswith("6 images (built-in sample, 3 classes): 10-crop top-1 ")
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert 0.0 <= metrics["10crop"]["top1_error"] <= 1.0
    assert (repo / "reports" / "report.html").stat().st_size > 10_000
    assert "up to date" in run(["dvc", "status"], repo, env)
    assert "didn't change" in run(["dvc", "repro"], repo, env)  # a second repro does nothing

    # Metrics files hold results only: no switches, hashes, paths, timings, throughput or lr (a param).
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env))
    files = next(iter(shown.values()))["data"]
    assert set(files["reports/metrics.json"]["data"]) == {"1crop", "10crop"}, files
    assert set(files["runs/train/last_epoch.json"]["data"]) == {
        "train_loss",
        "train_top1_error",
        "train_top5_error",
        "val_loss",
        "val_top1_error",
        "val_top5_error",
    }
    # `dvc plots show` is silent: every plot loads (no "failed to load some plots").
    plots = subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert plots.returncode == 0 and plots.stderr.strip() == "", plots.stderr
    rendered = json.loads(plots.stdout)
    assert not rendered.get("errors"), rendered.get("errors")
    for plot_id in (
        "loss",
        "top-1 and top-5 error",
        "confusion matrix (10-crop top guess)",
        "reports/figures/conv1.png",
    ):
        assert rendered["data"].get(plot_id), (plot_id, list(rendered["data"]))

    # Two ablations, queued and run exactly as the README's recipe says.
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline results"], repo, env)
    recipe = readme_ablation_commands()
    arms = {"no-lrn": ("lrn", False), "no-overlap": ("overlap_pool", False)}
    for name in arms:
        run(recipe[name], repo, env)
    run(recipe["run-all"], repo, env)
    baseline = yaml.safe_load((repo / "stages" / "train.yaml").read_text())
    params = experiment_params(json.loads(run(["dvc", "exp", "show", "--json"], repo, env)))
    for name, (key, value) in arms.items():
        changed = {k: v for k, v in params[name]["params"].items() if baseline.get(k) != v}
        assert changed == {key: value}, (name, changed)  # its own key only: the arms did not mix
        assert "10crop" in params[name]["metrics"], params[name]  # the arm's own results were recorded
    # The workspace keeps the baseline: parameters, outputs and the checkpoint that `predict` reads.
    assert load_config(config_class("train"), repo / "stages" / "train.yaml").lrn is True
    assert json.loads((repo / "reports" / "evaluation.json").read_text())["switches"]["lrn"] is True
    # The README's comparison shows each arm's errors side by side in a 120-column terminal.
    table = subprocess.run(recipe["show"], cwd=repo, capture_output=True, text=True, timeout=600,
                           env={**env, "COLUMNS": "120"})  # fmt: skip
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120, table.stdout
    header = next(line for line in lines if "Experiment" in line)
    assert all(column in header for column in ("1crop.top1_error", "10crop.top1_error")), header
    assert all(any(f"[{name}]" in line for line in lines) for name in arms), table.stdout


def readme_ablation_commands() -> dict[str, list[str]]:
    """The README's ablation recipe: each queued arm's command by name, and its run-all and show commands."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Ablations") :]
    block = block[block.index("```bash") : block.index("```", block.index("```bash") + 3)].replace("\\\n", " ")
    commands = {}
    for line in block.splitlines():
        words = shlex.split(line.split(" #")[0])
        if words[:4] == ["dvc", "exp", "run", "--queue"]:
            commands[words[words.index("-n") + 1]] = words
        elif words[:4] == ["dvc", "exp", "run", "--run-all"]:
            commands["run-all"] = words
        elif words[:3] == ["dvc", "exp", "show"]:
            commands["show"] = words
    assert {"run-all", "show"} <= set(commands) and re.search("--queue", block), commands
    return commands


def experiment_params(shown: list) -> dict[str, dict]:
    """Each named experiment's stages/train.yaml params and reports/metrics.json from `dvc exp show --json`."""
    found = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            data = experiment["revs"][0]["data"]
            found[experiment.get("name")] = {
                "params": data["params"]["stages/train.yaml"]["data"],
                "metrics": data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {}),
            }
    return found


def import_closure(module: str) -> set[str]:
    """The alexrepro modules `module` imports, directly or not, at module level or inside functions (by ast)."""
    import ast

    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo.append(node.module)
                todo += [f"{node.module}.{alias.name}" for alias in node.names]  # `from alexrepro.data import shards`
    return {name for name in seen if name.startswith("alexrepro.")}


def stage_closure(stage: str) -> set[str]:
    """The files a stage runs: its module, its config's module and the strict YAML loader (alexrepro.core.config)."""
    config_module = STAGE_CONFIGS[stage][0]
    closure = (
        import_closure(STAGE_MODULES[stage]) | import_closure(config_module) | import_closure("alexrepro.core.config")
    )
    return {name.replace(".", "/") + ".py" for name in closure}


def covered_by(deps: list[str]) -> set[str]:
    """The package's files a list of DVC deps covers: each file, and every module of each folder."""
    files = set()
    for dep in deps:
        path = ROOT / dep
        if path.is_dir():
            files |= {str(f.relative_to(ROOT)) for f in path.glob("*.py") if f.name != "__init__.py"}
        elif dep.startswith("alexrepro/"):
            files.add(dep)
    return files


# Folders a stage lists whole although it runs only part of them: one column each in `dvc exp show` instead of one
# per module, for code that changes together or stages that are cheap to rerun. Everything else is listed exactly.
WHOLE_FOLDERS = {
    "alexrepro/core": "the foundations: every stage runs most of them",
    "alexrepro/data/shards": "the shard format (manifest, writer, member index, verification) changes as one",
    "alexrepro/evaluate": "the evaluate stage runs all of it but predict.py, and reruns in minutes",
    "alexrepro/synth": "the sample stage runs all of it but the full-count generator, and reruns in seconds",
}


@pytest.mark.parametrize("stage", list(STAGE_MODULES))
def test_each_stage_depends_on_the_code_it_runs(stage):
    """DVC reruns a stage only when a dep changes, so its code deps must cover the import closure of the stage's
    module, and nothing else beyond the few whole folders above: a subpackage is one dep (a folder) where the stage
    runs every module of it, single files otherwise. The CLI is left out: it imports every stage and only parses
    and prints, so listing it would make every stage depend on every module."""
    closure = stage_closure(stage)
    deps = [dep for dep in dvc_stages()[stage]["deps"] if dep.startswith("alexrepro/")]
    assert closure <= covered_by(deps), f"dvc.yaml stage {stage}: add {sorted(closure - covered_by(deps))}"
    for dep in deps:
        extra = covered_by([dep]) - closure
        if dep in WHOLE_FOLDERS:
            assert closure & covered_by([dep]), f"dvc.yaml stage {stage}: {dep} is not run at all"
            continue
        assert not extra, f"dvc.yaml stage {stage}: {dep} covers {sorted(extra)}, which the stage does not run"


def test_dvc_exp_show_has_at_most_22_code_columns():
    """`dvc exp show` gives every distinct dep a column: the code deps of all stages together stay at most 22 (the
    count of the flat layout, before the subpackages)."""
    code = {dep for stage in dvc_stages().values() for dep in stage["deps"] if dep.startswith("alexrepro/")}
    assert len(code) <= 22, sorted(code)


def test_the_built_in_patterns_do_not_invalidate_the_imagenet_stages():
    """Editing the synthetic sample's pictures reruns the sample stage only (DVC would otherwise re-evaluate a
    checkpoint trained on ImageNet because a pattern changed)."""
    for stage in ("prepare", "stats", "train", "evaluate"):
        deps = [dep for dep in dvc_stages()[stage]["deps"] if dep.startswith("alexrepro/")]
        assert "alexrepro/synth/sample.py" not in covered_by(deps), stage


@pytest.mark.parametrize("ten, one, ok", [(0.048, 0.054, True), (0.30, 0.31, False)])
def test_the_demo_checks_its_result_against_the_readme(tmp_path, ten, one, ok):
    """scripts/demo.sh ends with scripts/demo_result.py: inside the README's range it passes, outside it fails."""
    reports = tmp_path / "reports"
    reports.mkdir()
    metrics = {"1crop": {"top1_error": one, "top5_error": 0.0}, "10crop": {"top1_error": ten, "top5_error": 0.0}}
    (reports / "metrics.json").write_text(json.dumps(metrics))
    (reports / "evaluation.json").write_text(json.dumps({"images": 500, "dataset": "built-in sample, 10 classes"}))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_result.py"), str(reports)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    assert "500 images (built-in sample, 10 classes)" in done.stdout
    if not ok:
        assert "outside the README's range" in done.stderr
