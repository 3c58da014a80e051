"""The command line: help with an example, defaults and keys; bad input is one line on stderr and exit 2 (a value)
or 1 (the data); plain lines off a terminal; results on stdout."""

import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from alexrepro.cli.app import app
from alexrepro.core.progress import LineProgress
from helpers.train import make_training_data

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
    ["bench", "startup"],
    ["bench", "training"],
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
    assert result.exit_code == 2
    assert "unknown key 'clases'" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_wrong_type_from_set_is_one_line_naming_it(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path / "out"), "--set", "seed=abc", "--quiet"])
    assert result.exit_code == 2
    assert "--set seed" in one_line_error(result)


def test_malformed_set_is_one_line(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path / "out"), "--set", "seed", "--quiet"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in one_line_error(result)


def test_prepare_of_unknown_layout_is_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("not a dataset")
    result = runner.invoke(app, ["prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "src" in one_line_error(result)


def test_stats_without_manifest_says_what_to_run(tmp_path):
    (tmp_path / "nothing").mkdir()
    result = runner.invoke(app, ["stats", str(tmp_path / "nothing"), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "alexrepro prepare" in one_line_error(result)


def test_evaluate_of_missing_checkpoint_is_one_line(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path / "none.pt"), str(tmp_path), str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 2
    assert "none.pt does not exist" in one_line_error(result)


def test_evaluate_of_a_file_that_is_no_checkpoint_is_one_short_line(tmp_path):
    (tmp_path / "README.md").write_text("# a project\n")
    args = ["evaluate", str(tmp_path / "README.md"), str(tmp_path), str(tmp_path / "r"), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "README.md is not a checkpoint" in line and len(line) < 200 and "weights_only" not in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "stage", [["stats", "{missing}", "{out}"], ["train", "{missing}", "{missing}", "{out}"],
              ["evaluate", "{file}", "{missing}", "{out}"], ["prepare", "{missing}", "{out}"]],
    ids=lambda s: s[0],
)  # fmt: skip
def test_a_mistyped_input_path_is_exit_2_at_once_and_creates_nothing(tmp_path, stage):
    checkpoint = tmp_path / "c.pt"
    checkpoint.write_bytes(b"PK\x03\x04" + bytes(60))  # looks like a checkpoint: the folder check must come first
    names = {"missing": str(tmp_path / "mistyped"), "out": str(tmp_path / "out"), "file": str(checkpoint)}
    result = runner.invoke(app, [word.format(**names) for word in stage] + ["--quiet"])
    assert result.exit_code == 2, result.stderr
    assert "mistyped does not exist" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_resume_into_a_folder_without_a_run_is_exit_2_at_once(tmp_path):
    for name in ("shards", "stats"):
        (tmp_path / name).mkdir()
    out = tmp_path / "new-run"
    result = runner.invoke(app, ["train", str(tmp_path / "shards"), str(tmp_path / "stats"), str(out), "--resume"])
    assert result.exit_code == 2
    assert "holds no checkpoint-last.pt" in one_line_error(result)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Help shows defaults and every key; conventions


def test_help_shows_resolved_defaults_and_lists_every_key_with_its_section():
    result = runner.invoke(app, ["train", "-h"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "[default: 90]" in result.output and "[default: 227]" in result.output  # flags show the paper's values
    for key, default, section in (
        ("lrn", "true", "§3.3"),
        ("overlap_pool", "true", "§3.4"),
        ("dropout", "0.5", "§4.2"),
        ("pca_lighting", "true", "§4.1"),
        ("lr_schedule", "plateau", "§5"),
    ):
        line = next(line for line in result.output.splitlines() if f" {key} = " in line)
        assert f"{key} = {default}" in line and section in line, line
    assert "e.g. stages/train.yaml" not in result.output


@pytest.mark.parametrize("command", [["sample"], ["prepare"], ["stats"], ["train"], ["evaluate"]], ids=" ".join)
def test_every_stage_help_lists_each_of_its_keys(command):
    from alexrepro.cli.configdoc import stage_keys

    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    for key in stage_keys(command[0]):
        assert f" {key.name} = {key.default_text}" in result.output, key.name


def test_usage_names_arguments_in_capitals_and_flags_have_no_bool_metavar():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "train [OPTIONS] SHARDS STATS OUT" in result.output
    for flag in ("--resume", "--quiet", "--verbose", "--show-config"):
        line = next(line for line in result.output.splitlines() if flag in line)
        assert "<bool>" not in line, line


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "alexrepro")
def test_help_reads_as_people_write_it(command):
    """No `<bool>` after a flag (-h, --install-completion), no `<list[Path]>`, one style of default, and nothing
    cited that a user of the package does not have."""
    output = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    assert "<bool>" not in output and "list[" not in output and "......" not in output, output
    assert "(default:" not in output, output
    for private in ("REFERENCE.md", "DESIGN.md", "STYLE.md"):
        assert private not in output, (private, output)


def test_sample_scale_says_its_default():
    output = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "300"}).output
    line = next(line for line in output.splitlines() if "--scale" in line)
    assert "[default: none: the built-in sample]" in line, line


def test_version_and_completion():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("alexrepro ")
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_show_config_prints_the_resolved_yaml_and_exits_without_arguments(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 7\nlrn: false\n")
    result = runner.invoke(
        app, ["train", "--show-config", "--config", str(config), "--set", "dropout=0.25", "--lr", "0.5"]
    )
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["epochs"] == 7 and shown["lrn"] is False and shown["dropout"] == 0.25 and shown["lr"] == 0.5
    assert shown["momentum"] == 0.9  # untouched keys keep the paper's value
    assert "# --lr" in result.stdout and f"# {config}" in result.stdout and "# default" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any data is read


@pytest.mark.parametrize(
    "flags, flag",
    [(["--crop", "57"], "--crop"), (["--width", "-1"], "--width"), (["--towers", "3"], "--towers"),
     (["--epochs", "0"], "--epochs"), (["--set", "towers=3"], "--set towers"), (["--set", "lrn=maybe"], "--set lrn")],
)  # fmt: skip
def test_bad_train_value_is_one_line_naming_the_flag_before_data_is_read(tmp_path, flags, flag):
    # SHARDS and STATS do not exist: the value must be refused before they are looked at.
    result = runner.invoke(
        app, ["train", str(tmp_path / "no-shards"), str(tmp_path / "no-stats"), str(tmp_path / "out"), *flags]
    )
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert line.startswith(f"error: {flag} ") and "command line" not in line, line
    assert not (tmp_path / "out").exists()


def file_at(tmp_path) -> str:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return str(path)


@pytest.mark.parametrize("command", ["sample", "prepare", "stats", "train", "evaluate"])
def test_output_that_is_an_existing_file_is_one_line(tmp_path, command):
    (tmp_path / "dir").mkdir()
    (tmp_path / "ckpt.pt").write_bytes(b"")
    inputs = {"sample": [], "prepare": [str(tmp_path / "dir")], "stats": [str(tmp_path / "dir")],
              "train": [str(tmp_path / "dir")] * 2, "evaluate": [str(tmp_path / "ckpt.pt"), str(tmp_path / "dir")]}  # fmt: skip
    result = runner.invoke(app, [command, *inputs[command], file_at(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "is a file" in one_line_error(result)


def test_prepare_source_that_is_a_file_says_so(tmp_path):
    result = runner.invoke(app, ["prepare", file_at(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "is a file" in line and "not found" not in line


def test_missing_argument_is_one_line(tmp_path):
    result = runner.invoke(app, ["stats", str(tmp_path)])
    assert result.exit_code == 2
    assert "OUT" in one_line_error(result)


# ---------------------------------------------------------------------------------------------------------------
# Output off a terminal: plain lines, no bar debris, no wrapping; results on stdout


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("cli-data"))


TRAIN_FLAGS = ["--batch-size", "8", "--crop", "67", "--width", "0.125", "--init", "he", "--devices", "cpu",
               "--workers", "0", "--set", "input_scale=0.015625"]  # fmt: skip


def train_cli(tiny_data, out, *extra, timeout=300):
    """`alexrepro train` in a subprocess whose stderr is a file, as under `dvc repro > log` or SLURM."""
    command = [sys.executable, "-m", "alexrepro", "train", *map(str, tiny_data), str(out), *TRAIN_FLAGS, *extra]
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_train_off_a_terminal_prints_plain_interval_and_epoch_lines(tiny_data, tmp_path):
    # 36 images in batches of 8: 5 steps; one read-out per epoch, so the last interval line's loss is the mean
    # over the whole epoch and must equal the epoch line's train loss.
    result = train_cli(tiny_data, tmp_path / "run", "--epochs", "2", "--set", "log_every=5")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not any(c in result.stderr for c in "\r\x1b━─│"), result.stderr  # no bar debris, no escape codes
    epoch_lines = [line for line in lines if re.match(r"epoch \d/2: train loss", line)]
    assert len(epoch_lines) == 2 and all("val loss" in line and "img/s" in line for line in epoch_lines), lines
    interval = [line for line in lines if re.match(r"epoch \d/2 \[5/5 steps\]", line)]
    assert len(interval) == 2, lines
    for read_out, epoch in zip(interval, epoch_lines, strict=True):
        shown = float(re.search(r"loss (\d+\.\d+)", read_out).group(1))
        mean = float(re.search(r"train loss (\d+\.\d+)", epoch).group(1))
        assert shown == pytest.approx(mean, abs=1e-3), (read_out, epoch)  # the mean, not a sum over batches
        assert re.search(r"[\d,]+ img/s", read_out) and "step/s" not in read_out
    assert lines[0].startswith("train config: epochs=2 ")
    # The results table goes to stdout; the resolved config is saved beside the run.
    assert "train: last epoch" in result.stdout and "train: last epoch" not in result.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["crop"] == 67 and saved["log_every"] == 5


def test_quiet_keeps_the_epoch_lines_only(tiny_data, tmp_path):
    result = train_cli(tiny_data, tmp_path / "run", "--epochs", "1", "--set", "log_every=1", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1: train loss"), lines


def test_loss_before_the_first_read_out_is_a_dash_not_nan():
    stream = io.StringIO()
    progress = LineProgress(stream, interval=1)
    progress.start("epoch 1/1", 3, unit="step")
    progress.advance(1, loss=None, lr=0.01, img_s=100.0)
    progress.advance(1, loss=2.25, lr=0.01, img_s=100.0)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert "loss —" in lines[0] and "nan" not in stream.getvalue()
    assert "loss 2.2500" in lines[1] and "100 img/s" in lines[1]


def _out_of_gpu_memory(*_args, **_kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.00 GiB free.")


def test_train_out_of_gpu_memory_is_one_line_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    import alexrepro.train.loop

    out = tmp_path / "run"
    step = alexrepro.train.loop.train_step
    # epoch 1 runs and writes its checkpoint; the first step of epoch 2 runs out of memory
    monkeypatch.setattr(alexrepro.train.loop, "train_step",
                        lambda run, batch, epoch, sums: (step if epoch == 0 else _out_of_gpu_memory)(run, batch, epoch, sums))  # fmt: skip
    args = ["train", *map(str, tiny_data), str(out), *TRAIN_FLAGS, "--epochs", "2", "--quiet"]
    result = runner.invoke(app, args)
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB"), last
    assert f"{out / 'checkpoint-last.pt'} is kept" in last and "--batch-size" in last
    assert (out / "checkpoint-last.pt").is_file()


def test_evaluate_out_of_gpu_memory_is_one_line_and_writes_no_metrics(tmp_path, monkeypatch):
    from alexrepro.model.inference import InferenceNetwork
    from helpers.evaluate import save_tiny_checkpoint, tiny_checkpoint, write_tiny_shards

    write_tiny_shards(tmp_path / "shards")
    checkpoint = save_tiny_checkpoint(tmp_path / "c.pt", tiny_checkpoint(tmp_path / "shards"))
    monkeypatch.setattr(InferenceNetwork, "ten_crop_probabilities", _out_of_gpu_memory)
    result = runner.invoke(app, ["evaluate", str(checkpoint), str(tmp_path / "shards"), str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 1
    line = one_line_error(result)
    assert line.startswith("error: out of GPU memory (CUDA out of memory") and "--batch-size" in line
    assert not (tmp_path / "r" / "metrics.json").exists()


# The child signals itself as the run builds its model, after the lock and the shard check, before the first step:
# no race with the parent's timing.
SIGTERM_IN_SET_UP = """
import os, signal, sys
import alexrepro.train.loop as train
build_run = train.build_run
def build_run_after_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return build_run(*args, **kwargs)
train.build_run = build_run_after_sigterm
from alexrepro.cli.app import main
sys.argv = ["alexrepro", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("resume", [False, True])
def test_sigterm_while_setting_up_is_one_line_with_exit_143(tiny_data, tmp_path, resume):
    out = tmp_path / "run"
    if resume:
        assert train_cli(tiny_data, out, "--epochs", "1", "--quiet").returncode == 0
    args = ["train", *map(str, tiny_data), str(out), *TRAIN_FLAGS, "--epochs", "2", "--quiet"]
    args += ["--resume"] if resume else []
    result = subprocess.run([sys.executable, "-c", SIGTERM_IN_SET_UP, *args], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 143 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: stopped by SIGTERM while setting up, before the first step; ")
    if resume:
        assert "checkpoint-last.pt is kept: continue with --resume" in lines[0]
        assert train_cli(tiny_data, out, "--epochs", "2", "--resume", "--quiet").returncode == 0
    else:
        assert "no checkpoint was written: rerun the same command" in lines[0]
        assert not (out / "checkpoint-last.pt").exists() and not (out / ".alexrepro.lock").exists()


def test_sigint_exits_130_and_resume_says_where_it_continues(tiny_data, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "alexrepro", "train", *map(str, tiny_data), str(out), *TRAIN_FLAGS,
               "--epochs", "50", "--set", "log_every=1"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint-last.pt").exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGINT") and "Traceback" not in stderr
    result = train_cli(tiny_data, out, "--epochs", "1", "--resume", "--quiet")
    assert "resuming " in result.stderr and "continuing with epoch" in result.stderr, result.stderr


def test_a_conflict_between_a_flag_and_the_config_file_names_both(tmp_path):
    """`--epochs 1` against the demo's config: the error names the flag and the file's key, not the file alone."""
    config = tmp_path / "train.yaml"
    config.write_text("lr_schedule: step\nlr_milestones: [14, 18]\n")
    result = runner.invoke(app, ["train", "a", "b", "c", "--epochs", "1", "--config", str(config)])
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "lr_milestones" in line and "--epochs" in line and "at least 18" in line, line


def test_a_bad_flag_blames_only_its_own_key():
    result = runner.invoke(app, ["train", "a", "b", "c", "--workers", "-3"])
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "--workers" in line and "shuffle_buffer" not in line, line


def test_a_worker_count_far_above_the_cores_is_capped_with_one_line(tmp_path):
    """--workers 1000 would fork a thousand processes (minutes) to do two cores' work: capped, and said once."""
    from alexrepro.cli.app import WORKERS_PER_CORE
    from alexrepro.core.workers import usable_cores

    args = ["sample", str(tmp_path / "s"), "--classes", "2", "--train-per-class", "2", "--val-per-class", "1",
            "--set", "image_scale=0.25", "--workers", "1000", "--quiet"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "alexrepro", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    most = WORKERS_PER_CORE * usable_cores()
    assert f"--workers 1000 is more than {WORKERS_PER_CORE} per usable core" in result.stderr
    assert f"using {most}" in result.stderr
