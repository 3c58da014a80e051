"""The train stage on a tiny dataset: loss falls, checkpoints, exact resume, signals, NaN stop, refused resumes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alexrepro.core.errors import ConfigError, OutputExistsError, TrainingError
from alexrepro.core.progress import NullProgress
from alexrepro.model.checkpoint import load_checkpoint, model_from_checkpoint
from alexrepro.train.config import TrainConfig
from alexrepro.train.history import HISTORY_FIELDS, RESULT_FIELDS
from alexrepro.train.loop import train
from helpers.train import make_training_data

TINY = dict(
    batch_size=8, crop=67, width=0.125, init="he", input_scale=1 / 64, lr=0.02, workers=0, devices="cpu", log_every=2
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def two_epochs(data, tmp_path_factory):
    """An uninterrupted 2-epoch run: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("two")
    result = train(*data, out, TrainConfig(epochs=2, **TINY), False, NullProgress())
    return out, result


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def test_tiny_run_learns_and_writes_its_outputs(data, tmp_path):
    result = train(*data, tmp_path, TrainConfig(epochs=5, dropout=0.0, **TINY), False, NullProgress())
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] and losses[0] < math.log(3) + 0.3
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5] and result.epochs == 5
    assert set(result.history[0]) == set(HISTORY_FIELDS)
    assert (tmp_path / "history.csv").read_text().splitlines()[0] == ",".join(HISTORY_FIELDS)
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 6
    assert (tmp_path / "checkpoint-best.pt").is_file() and result.checkpoint_last.is_file()
    last = json.loads((tmp_path / "last_epoch.json").read_text())
    assert last == {k: result.history[-1][k] for k in RESULT_FIELDS}  # results only: no lr, timings or throughput


def test_checkpoint_is_weights_only_and_self_contained(two_epochs, data):
    out, _ = two_epochs
    raw = torch.load(out / "checkpoint-last.pt", weights_only=True)
    for key in ("format", "version", "epoch", "model_config", "train_config", "classes", "model", "optimizer",
                "scheduler", "rng", "history", "data", "normalization", "switches"):  # fmt: skip
        assert key in raw
    assert raw["format"] == "alexrepro-checkpoint" and raw["epoch"] == 2 and len(raw["history"]) == 2
    assert raw["normalization"]["mean_image"].shape == (72, 72, 3) and raw["normalization"]["input_scale"] == 1 / 64
    assert [c["index"] for c in raw["classes"]] == [0, 1, 2] and raw["switches"]["pca_lighting"] is True
    model = model_from_checkpoint(raw, ["cpu"]).eval()
    assert torch.equal(model.state_dict()["fc8.weight"], raw["model"]["fc8.weight"])
    assert model(torch.zeros(2, 3, 67, 67)).shape == (2, 3)


def test_resumed_run_ends_with_identical_weights(two_epochs, data, tmp_path):
    reference, _ = two_epochs
    train(*data, tmp_path, TrainConfig(epochs=1, **TINY), False, NullProgress())
    resumed = TrainConfig(epochs=2, **{**TINY, "workers": 2})  # the worker count does not change the data
    train(*data, tmp_path, resumed, True, NullProgress())
    a, b = weights(reference / "checkpoint-last.pt"), weights(tmp_path / "checkpoint-last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(two_epochs, data):
    out, _ = two_epochs
    with pytest.raises(ConfigError, match=r"other settings: crop \(67 → 69\), lr \(0.02 → 0.05\)"):
        train(*data, out, TrainConfig(epochs=3, **{**TINY, "lr": 0.05, "crop": 69}), True, NullProgress())
    with pytest.raises(OutputExistsError, match="--resume"):
        train(*data, out, TrainConfig(epochs=3, **TINY), False, NullProgress())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    train(*data, tmp_path, TrainConfig(epochs=1, **TINY), False, NullProgress())
    good = weights(tmp_path / "checkpoint-last.pt")
    import alexrepro.train.loop as module

    clean = module.Preprocess.__call__
    monkeypatch.setattr(module.Preprocess, "__call__", lambda self, batch, train: clean(self, batch, train) * math.nan)
    with pytest.raises(TrainingError, match="loss became nan in epoch 2.*last good checkpoint"):
        train(*data, tmp_path, TrainConfig(epochs=2, **TINY), True, NullProgress())
    kept = load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert kept["epoch"] == 1 and all(torch.equal(good[k], kept["model"][k]) for k in good)


SCRIPT = """
import os, signal, sys, torch
from pathlib import Path
import alexrepro.train.loop as module
from alexrepro.core.errors import AlexReproError
from alexrepro.core.progress import NullProgress
from alexrepro.train.loop import TrainConfig, train
torch.set_num_threads(1)
step = module.train_step
def step_then_signal(run, batch, epoch, sums):
    loss = step(run, batch, epoch, sums)
    if (epoch, batch.step) == (1, 2):  # a fixed point: epoch 2, after its third step
        os.kill(os.getpid(), signal.SIGTERM)
    return loss
module.train_step = step_then_signal
shards, stats, out = map(Path, sys.argv[1:4])
config = TrainConfig(epochs=40, **{tiny!r})
try:
    train(shards, stats, out, config, False, NullProgress())
except AlexReproError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""


def test_sigterm_writes_a_checkpoint_that_resumes_exactly(two_epochs, data, tmp_path):
    out = tmp_path / "run"
    script = SCRIPT.format(tiny=TINY)
    process = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, data), str(out)], stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # only if the time limit struck; a no-op once it has ended
    assert process.returncode == 1, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last_line and "--resume" in last_line and "Traceback" not in stderr
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    assert (ckpt["epoch"], ckpt["position"]["step"]) == (1, 3)  # stopped after the step the signal came in
    train(*data, out, TrainConfig(epochs=2, **TINY), True, NullProgress())  # finishing epoch 2 …
    a, b = weights(two_epochs[0] / "checkpoint-last.pt"), weights(out / "checkpoint-last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # … ends where the uninterrupted run did


def test_paper_update_rule_matches_the_papers_formula_across_an_lr_change():
    """v ← 0.9·v − 0.0005·ε·w − ε·g; w ← w + v (§5), written out by hand, against SGD + apply_lr("paper")."""
    from alexrepro.train.loop import apply_lr

    torch.manual_seed(0)
    grads = [torch.randn(4) for _ in range(6)]
    lrs = [0.1, 0.1, 0.1, 0.01, 0.01, 0.001]
    w_ref, v = torch.ones(4), torch.zeros(4)
    for g, eps in zip(grads, lrs, strict=True):
        v = 0.9 * v - 0.0005 * eps * w_ref - eps * g
        w_ref = w_ref + v
    w = torch.nn.Parameter(torch.ones(4))
    sgd = torch.optim.SGD([w], lr=lrs[0], momentum=0.9, weight_decay=0.0005)
    for g, eps in zip(grads, lrs, strict=True):
        apply_lr(sgd, eps, "paper")
        w.grad = g.clone()
        sgd.step()
    assert torch.allclose(w.detach(), w_ref, atol=1e-6)


def test_plateau_schedule_divides_by_ten_and_stops_after_max_drops():
    from alexrepro.train.loop import LrSchedule

    config = TrainConfig(lr=0.01, lr_patience=2, lr_min_improvement=0.01, max_lr_drops=2)
    schedule = LrSchedule(config.lr)
    errors = [0.9, 0.8, 0.795, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    lrs = [schedule.after_epoch(config, epoch + 1, error) for epoch, error in enumerate(errors)]
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.0001, 0.0001, 0.0001, 0.0001])
    step = TrainConfig(lr=0.01, lr_schedule="step", lr_milestones=(2, 4))
    assert [LrSchedule(0.01).after_epoch(step, e, 0.5) for e in (1, 2, 3, 4)] == pytest.approx(
        [0.01, 0.001, 0.001, 0.0001]
    )


# --- The paper's defaults and their switches ----------------------------------------------------------------------


def test_biases_are_untouched_by_weight_decay_after_one_step():
    """§5 decays the weights w; cuda-convnet gives biases a weight cost of 0. With a zero gradient, one SGD step
    moves a weight by −ε·λ·w (hand computation: momentum buffer starts at λ·w) and leaves every bias as it was."""
    from alexrepro.model.network import AlexNet
    from alexrepro.train.loop import make_optimizer

    config = TrainConfig(lr=0.01, weight_decay=5e-4, crop=67, width=0.125)
    torch.manual_seed(0)
    net = AlexNet(config.model_config(num_classes=3))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = make_optimizer(net, config)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in net.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, before[name]), name
        else:
            torch.testing.assert_close(p, before[name] * (1 - 0.01 * 5e-4), rtol=1e-6, atol=0)
    assert before["conv2.towers.0.bias"].eq(1).all()  # the paper's init: bias 1, still 1 after the step

    decayed = TrainConfig(lr=0.01, weight_decay=5e-4, crop=67, width=0.125, decay_biases=True)  # PyTorch's habit
    optimizer = make_optimizer(net, decayed)
    optimizer.step()
    torch.testing.assert_close(net.conv2.towers[0].bias, before["conv2.towers.0.bias"] * (1 - 0.01 * 5e-4))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"width": 0}, "key 'width'"),
        ({"width": -1.0}, "key 'width'"),
        ({"towers": 3}, "key 'towers' must be 1 or 2"),
        ({"crop": 60}, "key 'crop' must be at least 67"),
        ({"dropout": 1.0}, "key 'dropout'"),
        ({"dropout": -0.1}, "key 'dropout'"),
        ({"dropout_scaling": "scaled"}, "key 'dropout_scaling'"),
        ({"activation": "sigmoid"}, "key 'activation'"),
        ({"layer_widths": (0.5, 0.5)}, "key 'layer_widths'"),
        ({"epochs": 10, "lr_schedule": "step", "lr_milestones": (5, 12)}, "key 'lr_milestones'.*beyond key 'epochs'"),
    ],
)
def test_train_config_rejects_bad_values_naming_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_a_bad_model_value_fails_at_config_load_before_any_data_is_read(tmp_path):
    """Through the real CLI: one line naming the key, non-zero exit, and the (missing) data is never opened."""
    config = tmp_path / "train.yaml"
    config.write_text("width: 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "alexrepro", "train", str(tmp_path / "no-shards"), str(tmp_path / "no-stats"),
         str(tmp_path / "out"), "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "width" in result.stderr and "no-shards" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_milestones_within_epochs_and_plateau_ignores_them():
    TrainConfig(epochs=6, lr_schedule="step", lr_milestones=(5, 6))
    TrainConfig(epochs=2)  # the default milestones are unused by the plateau schedule


def test_paper_switches_are_recorded_in_the_checkpoint(two_epochs):
    out, _ = two_epochs
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    assert ckpt["model_config"]["dropout_scaling"] == "paper"
    assert ckpt["model_config"]["activation"] == "relu"
    assert ckpt["switches"]["decay_biases"] is False and ckpt["switches"]["precision"] == "fp32"
    assert model_from_checkpoint(ckpt).dropout.scaling == "paper"


def test_a_checkpoint_from_before_the_switch_evaluates_with_inverted_dropout(two_epochs):
    """Checkpoints written before dropout_scaling existed were trained with nn.Dropout: they keep evaluating so."""
    out, _ = two_epochs
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    del ckpt["model_config"]["dropout_scaling"]
    model = model_from_checkpoint(ckpt).eval()
    assert model.dropout.scaling == "inverted"
    x = torch.ones(2, 8)
    assert torch.equal(model.dropout(x), x)  # identity at test time, as nn.Dropout was


def test_identical_runs_leave_every_tracked_file_identical(data, tmp_path):
    """What DVC tracks (the checkpoints included) is the same bytes for the same results; the timings, which differ
    from run to run, go to timings.csv, which dvc.yaml does not declare."""
    config = TrainConfig(epochs=2, **TINY)
    first, second = tmp_path / "a", tmp_path / "b"
    results = [train(*data, out, config, False, NullProgress()) for out in (first, second)]
    tracked = ["checkpoint-last.pt", "checkpoint-best.pt", "history.json", "history.csv", "last_epoch.json",
               "config.yaml"]  # fmt: skip
    live = sorted(p.relative_to(first) for p in (first / "dvclive").rglob("*") if p.is_file())
    for name in [*tracked, *map(str, live)]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for out, result in zip((first, second), results, strict=True):
        timings = (out / "timings.csv").read_text().splitlines()
        assert timings[0] == "epoch,images_per_s,seconds,data_wait_fraction" and len(timings) == 3
        assert [row["epoch"] for row in result.timings] == [1, 2] and result.timings[-1]["images_per_s"] > 0
        assert "images_per_s" not in json.loads((out / "history.json").read_text())[0]


def test_live_metrics_are_logged_each_epoch(data, tmp_path):
    """DVCLive (the default where installed) and TensorBoard each get one step per epoch with the results."""
    pytest.importorskip("dvclive")
    result = train(
        *data, tmp_path / "dvclive-run", TrainConfig(epochs=2, live="dvclive", **TINY), False, NullProgress()
    )
    folder = tmp_path / "dvclive-run" / "dvclive"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["val_top1_error"] == result.history[-1]["val_top1_error"] and metrics["step"] == 1
    rows = (folder / "plots" / "metrics" / "val_loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tval_loss" and len(rows) == 3
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(*data, tmp_path / "tb-run", TrainConfig(epochs=2, live="tensorboard", **TINY), False, NullProgress())
    events = EventAccumulator(str(tmp_path / "tb-run" / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("val_top1_error")
    assert [s.step for s in scalars] == [1, 2]
    assert scalars[-1].value == pytest.approx(result.history[-1]["val_top1_error"], rel=1e-6)


def test_dvclive_leaves_no_colour_reset_for_the_progress_bar(tmp_path):
    """Importing DVCLive runs DVC's colorama set-up, which would write an ANSI reset at exit to the stdout of the
    moment: under the command line's live bar, the bar's proxy, which prints it as text ("[0m"). A process whose
    stdout is such a proxy while the live log opens must get nothing from it at exit."""
    pytest.importorskip("dvclive")
    code = textwrap.dedent("""
        import sys
        from pathlib import Path

        class Proxy:  # stands for the live bar's stdout proxy, which is a terminal's
            closed = False

            def isatty(self):
                return True

            def write(self, text):
                sys.__stdout__.write(text.replace("\\x1b", "<ESC>"))
                return len(text)

            def flush(self):
                sys.__stdout__.flush()

        sys.stdout = Proxy()
        from alexrepro.train.live import open_epoch_log

        log = open_epoch_log("dvclive", Path(sys.argv[1]), False)
        log.epoch({"epoch": 1, "val_loss": 1.0})
        log.close()
        print("closed")
    """)
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("closed") and "<ESC>" not in run.stdout, run.stdout


def test_process_wide_backend_flags_are_restored_after_a_run():
    """cudnn.benchmark and TF32, set by a CUDA run for itself, must not leak into what runs next in the process."""
    from alexrepro.train.loop import backend_flags_restored

    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with pytest.raises(RuntimeError), backend_flags_restored():
        torch.backends.cudnn.benchmark = not before[0]
        torch.backends.cudnn.allow_tf32 = not before[1]
        torch.backends.cuda.matmul.allow_tf32 = not before[2]
        raise RuntimeError("the run failed")
    after = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    assert after == before


def test_a_cuda_run_says_what_the_paper_arithmetic_costs_and_what_is_fast():
    from alexrepro.train.loop import speed_note

    paper = speed_note(TrainConfig(workers=4), bf16=False, cores=16)
    assert "fp32 without TF32" in paper and "--set precision=bf16" in paper and "--workers 14" in paper
    fast = speed_note(TrainConfig(workers=14, precision="bf16", compile=True), bf16=True, cores=16)
    assert "faster" not in fast and "in bf16" in fast
