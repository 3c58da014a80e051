"""The command line: every command has help with an example; bad input is one line on stderr and a non-zero exit."""

import pytest
from typer.testing import CliRunner

from alexrepro.cli import app

runner = CliRunner()

COMMANDS = [
    ["sample"],
    ["prepare"],
    ["stats"],
    ["train"],
    ["evaluate"],
    ["predict"],
    ["bench", "prepare"],
    ["bench", "stats"],
    ["bench", "train"],
    ["bench", "loader"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output


def test_top_level_help_lists_the_pipeline():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("sample", "prepare", "stats", "train", "evaluate", "predict", "bench"):
        assert name in result.output


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    return lines[0]


def test_unknown_config_key_is_one_line_naming_it(tmp_path):
    config = tmp_path / "sample.yaml"
    config.write_text("clases: 3\n")
    result = runner.invoke(app, ["sample", str(tmp_path / "out"), "--config", str(config), "--quiet"])
    assert result.exit_code == 1
    assert "unknown key 'clases'" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_wrong_type_from_set_is_one_line_naming_it(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path / "out"), "--set", "seed=abc", "--quiet"])
    assert result.exit_code == 1
    assert "'seed'" in one_line_error(result)


def test_malformed_set_is_one_line(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path / "out"), "--set", "seed", "--quiet"])
    assert result.exit_code == 1
    assert "KEY=VALUE" in one_line_error(result)


def test_prepare_of_unknown_layout_is_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("not a dataset")
    result = runner.invoke(app, ["prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "src" in one_line_error(result)


def test_stats_without_manifest_says_what_to_run(tmp_path):
    result = runner.invoke(app, ["stats", str(tmp_path / "nothing"), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "alexrepro prepare" in one_line_error(result)


def test_evaluate_of_missing_checkpoint_is_one_line(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path / "none.pt"), str(tmp_path), str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 1
    assert "none.pt" in one_line_error(result)
