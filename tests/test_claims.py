"""The claims table: experiments read from `dvc exp show --json`, rows as paired differences over seeds."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from alexrepro.cli.app import app
from alexrepro.evaluate import claims
from alexrepro.evaluate.report import ReportInputs, claims_section, recipe_rows
from alexrepro.train.config import TrainConfig

PAPER_SWITCHES = {"activation": "relu", "towers": 2, "layer_widths": [1, 1, 1, 1, 1, 1, 1], "lrn": True,
                  "overlap_pool": True, "pca_lighting": True, "dropout": 0.5, "dropout_scaling": "paper",
                  "decay_biases": False}  # fmt: skip


def experiment(arm: dict, seed: int, top1: float, top5: float, ten_crop_top1: float, train_top1: float) -> dict:
    """One experiment as `dvc exp show --json` lists it (DVC 3: params and metrics by file, under "data")."""
    params = {"sample": {}, "prepare": {}, "train": {}, "evaluate": {}}
    for stage, key, value in claims.CLAIMS_RECIPE:
        params[stage][key] = value
    params["train"] |= PAPER_SWITCHES | arm | {"seed": seed}
    metrics = {"1crop": {"top1_error": top1, "top5_error": top5},
               "10crop": {"top1_error": ten_crop_top1, "top5_error": top5 - 0.01}}  # fmt: skip
    return {
        "rev": f"{seed:040d}",
        "name": f"exp-{seed}",
        "data": {
            "params": {f"stages/{stage}.yaml": {"data": values} for stage, values in params.items()},
            "metrics": {
                "reports/metrics.json": {"data": metrics},
                "runs/train/last_epoch.json": {"data": {"train_top1_error": train_top1, "train_top5_error": 0.2}},
            },
        },
    }


def exp_show(entries: list[dict]) -> list[dict]:
    # Never counted: the workspace, a running experiment (DVC shows it as the workspace: its params beside the
    # previous run's metrics), and a commit's own committed metrics.
    stale = experiment({}, 0, 0.99, 0.99, 0.99, 0.99)
    workspace = stale | {"rev": "workspace", "name": None, "experiments": None}
    running = {"executor": {"state": "running", "name": "workspace"}, "name": "running",
               "revs": [stale | {"rev": "workspace"}]}  # fmt: skip
    commit = experiment({}, 1, 0.99, 0.99, 0.99, 0.99) | {"rev": "a" * 40, "name": "main"}
    commit["experiments"] = [{"executor": None, "name": e["name"], "revs": [e]} for e in entries] + [running]
    return [workspace, commit]


@pytest.fixture
def shown() -> list[dict]:
    entries = []
    for seed, (paper, no_lrn) in enumerate([(0.50, 0.55), (0.52, 0.55), (0.48, 0.55)]):
        entries.append(experiment({}, seed, paper, 0.2, paper - 0.02, 0.40))
        entries.append(experiment({"lrn": False}, seed, no_lrn, 0.25, no_lrn, 0.45))
    entries.append(experiment({"activation": "tanh"}, 0, 0.6, 0.3, 0.6, 0.70))  # one seed only
    return exp_show(entries)


def test_rows_are_paired_differences_with_mean_and_std(shown):
    runs = claims.runs_from_exp_show(shown)
    assert len(runs) == 7
    rows = {row["claim"].name: row for row in (claims.claim_row(c, runs) for c in claims.CLAIMS)}
    lrn = rows["lrn"]
    assert lrn["seeds"] == [0, 1, 2]
    assert lrn["top1"] == pytest.approx([0.05, 0.03, 0.07])  # without LRN − with it, seed by seed
    assert claims.mean_std(lrn["top1"]) == f"+5.0 ± {statistics.stdev([5.0, 3.0, 7.0]):.1f}"
    assert claims.verdict(lrn) == "shows (the paper's choice is better)"
    assert rows["ten-crop"]["top1"] == pytest.approx([0.02, 0.02, 0.02])  # 1-crop − 10-crop of the paper's arm
    assert rows["relu-vs-tanh"]["seeds"] == [0]  # training error, only where both arms ran
    assert rows["relu-vs-tanh"]["top1"] == pytest.approx([0.30])
    assert claims.verdict(rows["relu-vs-tanh"]) == "too few seeds"
    assert rows["overlap-pool"]["seeds"] == [] and claims.mean_std(rows["overlap-pool"]["top1"]) == "not measured"


def test_an_arm_is_matched_by_all_its_params_not_by_name(shown):
    runs = claims.runs_from_exp_show(shown)
    # An experiment with two switches flipped belongs to neither single-switch arm.
    both = experiment({"lrn": False, "overlap_pool": False}, 0, 0.9, 0.5, 0.9, 0.9)
    runs += claims.runs_from_exp_show(exp_show([both]))
    assert sorted(claims.arm_runs(runs, (("lrn", False),))) == [0, 1, 2]
    assert claims.arm_runs(runs, (("lrn", False),))[0].metrics["1crop"]["top1_error"] == 0.55
    assert claims.arm_runs(runs, (("overlap_pool", False),)) == {}


def test_the_table_has_every_claim_and_its_command(shown):
    text = claims.render(claims.runs_from_exp_show(shown), "a test")
    table = [line for line in text.splitlines() if line.startswith("| §")]
    assert len(table) == len(claims.CLAIMS) == 9
    lrn = next(line for line in table if "§3.3 lrn" in line)
    assert "1.4 / 1.2 points" in lrn and "+5.0 ± 2.0" in lrn
    assert 'dvc exp run "${CLAIMS[@]}" -S stages/train.yaml:lrn=false -S stages/train.yaml:seed=$SEED' in lrn
    assert "not measured" in next(line for line in table if "overlap-pool" in line)
    assert f"CLAIMS=({claims.recipe_flags()})" in text


def test_commands_cover_every_arm_and_seed_and_carry_the_recipe():
    commands = claims.commands()
    arms = 1 + sum(1 for c in claims.CLAIMS if c.arm)  # the paper's arm + each ablation (10-crop needs none)
    assert len(commands) == arms * len(claims.SEEDS) == 27
    assert all(c.startswith("dvc exp run -n claims-") and claims.recipe_flags() in c for c in commands)
    assert len(set(c.split()[4] for c in commands)) == len(commands)  # unique experiment names
    baseline = next(c for c in commands if "claims-two-towers-vs-one-gpu-s1" in c)
    assert "stages/train.yaml:towers=1" in baseline and "layer_widths=[0.5, 0.5, 0.5, 0.5, 1, 1, 1]" in baseline


def test_cli_prints_the_commands_and_reports_a_missing_project(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["claims", "--commands"])
    assert result.exit_code == 0 and result.output.count("dvc exp run") == 27
    result = runner.invoke(app, ["claims", "--repo", str(tmp_path), "--output", str(tmp_path / "claims.md")])
    assert result.exit_code == 1 and "dvc exp show" in result.output
    assert not (tmp_path / "claims.md").exists()


def test_write_claims_from_exp_show(shown, tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "exp_show", lambda repo: json.loads(json.dumps(shown)))
    text = claims.write_claims(tmp_path, tmp_path / "claims.md")
    assert (tmp_path / "claims.md").read_text() == text and "| §3.3 lrn |" in text


# --- The report's recipe and claims sections ------------------------------------------------------------------------


def report_inputs(train_config: dict) -> ReportInputs:
    from alexrepro.core.config import config_to_dict

    config = TrainConfig(**train_config)
    return ReportInputs(
        metrics={}, classes=[], labels=np.zeros(0), top10=np.zeros((0, 5)),
        model_config=config_to_dict(config.model_config(10)), train_config=config_to_dict(config),
        switches=config.switches(), history=[], conv1=np.zeros((0, 3, 11, 11)), towers=config.towers, examples=[],
        neighbours=[], submission_labels="class index",
    )  # fmt: skip


def test_report_marks_bf16_and_tf32_as_differences_from_the_paper():
    rows = {r[0]: r for r in recipe_rows(report_inputs({"precision": "bf16", "tf32": True, "workers": 2}))}
    assert rows["precision"][3] == "differs from the paper"
    assert rows["tf32"][3] == "differs from the paper"
    assert rows["workers"][3] == "other than the default (speed only)"
    for key in ("lr_patience", "lr_min_improvement", "shuffle_buffer"):
        assert rows[key][2] == "not given in the paper"
    assert {r[0]: r for r in recipe_rows(report_inputs({}))}["precision"][3] == ""  # fp32: the paper's


def test_report_claims_section_marks_ablated_switches():
    blocks = claims_section(report_inputs({"lrn": False, "dropout_scaling": "inverted"}))
    rows = {r[1]: r for r in blocks[-1].rows}
    assert set(rows) >= {"activation", "towers", "lrn", "overlap_pool", "pca_lighting", "dropout", "decay_biases"}
    assert rows["lrn"][2:4] == ["False (ablated)", "True"] and rows["activation"][2] == "relu"
    assert rows["dropout_scaling"][2] == "inverted (ablated)"
    assert rows["lrn"][5] == "not measured"  # no docs/claims.md given: the last column says so instead of staying empty


def test_dvc_is_found_beside_the_interpreter_when_not_on_path(monkeypatch):
    # `.venv/bin/python -m pytest` without activating the venv: PATH lacks the venv's bin, where dvc is.
    monkeypatch.setenv("PATH", "/nonexistent")
    found = claims.dvc_executable()
    assert found == str(Path(sys.executable).parent / "dvc")


def test_a_missing_dvc_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(claims.sys, "executable", str(tmp_path / "python"))
    result = CliRunner().invoke(app, ["claims", "--repo", str(tmp_path), "--output", str(tmp_path / "claims.md")])
    assert result.exit_code == 1 and "dvc not found" in result.output and "pip install" in result.output
