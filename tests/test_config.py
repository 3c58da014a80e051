"""Strict config loading: unknown keys and wrong types are errors naming the key; flags override the file."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from alexrepro.core.config import config_from_dict, config_to_dict, load_config
from alexrepro.core.errors import ConfigError


@dataclass(frozen=True)
class Example:
    epochs: int = 90
    lr: float = 0.01
    lrn: bool = True
    init: Literal["paper", "he"] = "paper"
    max_images: int | None = None
    milestones: tuple[int, ...] = (30, 60)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"key 'epochs' must be at least 1, got {self.epochs}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    assert load_config(Example) == Example()


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, "epochs: 10\nlr: 1e-3\nlrn: false\nmilestones: [3, 6]\n")
    cfg = load_config(Example, path, {"epochs": 5, "lr": None})
    assert cfg == Example(epochs=5, lr=0.001, lrn=False, milestones=(3, 6))


def test_int_accepted_for_float_but_not_bool_for_int(tmp_path):
    assert load_config(Example, write(tmp_path, "lr: 1\n")).lr == 1.0
    with pytest.raises(ConfigError, match="'epochs' must be an integer"):
        load_config(Example, write(tmp_path, "epochs: true\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch: 10\n", "unknown key 'epoch'"),
        ("epochs: ten\n", "key 'epochs' must be an integer"),
        ("lrn: 'no'\n", "key 'lrn' must be true or false"),
        ("init: xavier\n", "key 'init' must be one of 'paper', 'he'"),
        ("max_images: 1.5\n", "key 'max_images' must be an integer or null"),
        ("epochs: 0\n", "key 'epochs' must be at least 1"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("epochs: [1\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(Example, path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Example, tmp_path / "absent.yaml")


def test_dict_round_trip():
    cfg = Example(epochs=3, milestones=(1, 2))
    assert config_from_dict(Example, config_to_dict(cfg), "checkpoint") == cfg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", ".inf"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="key 'lr' must be a finite number"):
        load_config(Example, None, {"lr": value})


def test_duplicate_yaml_key_is_refused(tmp_path):
    path = write(tmp_path, "epochs: 10\nlr: 0.01\nepochs: 20\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' appears twice \(line 3\)"):
        load_config(Example, path)


# Through the real command line, for every stage: the config is checked before any work starts.
CLI_CASES = [
    (["train", "s", "t", "o", "--lr", "inf"], "key 'lr' must be a finite number"),
    (["train", "s", "t", "o", "--set", "lighting_std=nan"], "key 'lighting_std' must be a finite number"),
    (["train", "s", "t", "o", "--set", "lr="], "key 'lr' has an empty value"),
    (["prepare", "s", "o", "--set", "quality="], "key 'quality' has an empty value"),
    (["stats", "s", "o", "--set", "max_images="], "key 'max_images' has an empty value"),
    (["sample", "o", "--set", "image_scale=nan"], "key 'image_scale' must be a finite number"),
    (["evaluate", "c", "s", "o", "--set", "batch_size="], "key 'batch_size' has an empty value"),
]


@pytest.mark.parametrize("args,message", CLI_CASES)
def test_cli_refuses_non_finite_and_empty_values(tmp_path, monkeypatch, args, message):
    from typer.testing import CliRunner

    from alexrepro.cli.app import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 2  # a bad value on the command line is a usage error
    # The CLI names the flag that gave the key (--lr, --set lr) where it can, else the key ("key 'lr' …").
    key = message.split("'")[1]
    said = " ".join(result.output.split())
    flags = (f"key '{key}'", f"--set {key}", "--" + key.replace("_", "-"))
    assert any(message.replace(f"key '{key}'", flag) in said for flag in flags), said
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", ["prepare", "stats", "train", "sample"])
def test_cli_refuses_duplicate_keys_in_a_stage_config(tmp_path, monkeypatch, stage):
    from typer.testing import CliRunner

    from alexrepro.cli.app import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "stage.yaml").write_text("seed: 1\nworkers: 1\nseed: 2\n")
    args = {"prepare": ["s", "o"], "stats": ["s", "o"], "train": ["s", "t", "o"], "sample": ["o"]}[stage]
    if stage == "stats":
        (tmp_path / "stage.yaml").write_text("workers: 1\nworkers: 2\n")
    result = CliRunner().invoke(app, [stage, *args, "--config", "stage.yaml", "--quiet"])
    assert result.exit_code == 2  # a bad config is a usage error
    assert "appears twice (line 3)" in result.output or "appears twice (line 2)" in result.output
