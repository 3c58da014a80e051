"""Two data-parallel ranks on the CPU (gloo): disjoint data, weights in sync, the same result as one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from alexrepro.core.errors import ConfigError
from alexrepro.core.progress import NullProgress
from alexrepro.model.checkpoint import load_checkpoint
from alexrepro.model.distributed import Ranks, rank_batch_size, resolve_devices
from alexrepro.train.config import TrainConfig
from alexrepro.train.loop import train
from helpers.train import make_training_data

# dropout 0: its masks are drawn per rank, so they are the one thing a split run cannot share with a single process.
# Crops, reflections and lighting are drawn per image and are therefore the same for any number of ranks.
CONFIG = TrainConfig(
    epochs=2, batch_size=8, crop=67, width=0.125, init="he", input_scale=1 / 64, lr=0.02, dropout=0.0, workers=0,
    devices="cpu", log_every=2,
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, shards: Path, stats: Path, out: Path, record: Path) -> None:
    """One torchrun-like process: the environment torchrun would set, then the library's train()."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    import alexrepro.train.loop as module

    seen: list = []
    step, finish = module.train_step, module.finish_epoch

    def recording_step(run, batch, epoch, sums):
        seen.append([epoch, batch.step, batch.keys])
        return step(run, batch, epoch, sums)

    def recording_finish(run, epoch, sums, position):
        row = finish(run, epoch, sums, position)
        torch.save(run.net.state_dict(), record / f"weights-{rank}.pt")
        return row

    module.train_step, module.finish_epoch = recording_step, recording_finish
    module.train(shards, stats, out, CONFIG, False, NullProgress())
    (record / f"seen-{rank}.json").write_text(json.dumps(seen))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 33 train images in batches of 8: the last global batch holds one image, so one rank's share is empty
    return make_training_data(tmp_path_factory.mktemp("data"), train_per_class=11)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(data, tmp_path):
    shards, stats = data
    record = tmp_path / "record"
    record.mkdir()
    mp.spawn(_rank_main, args=(2, _free_port(), shards, stats, tmp_path / "ddp", record), nprocs=2, join=True)

    seen = [json.loads((record / f"seen-{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        keys = [k for r in range(2) for e, _, ks in seen[r] if e == epoch for k in ks]
        assert len(keys) == len(set(keys)) == 33  # disjoint and covering the epoch
        assert [s for e, s, _ in seen[0] if e == epoch] == [s for e, s, _ in seen[1] if e == epoch]  # same steps

    rank0, rank1 = (torch.load(record / f"weights-{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP keeps the replicas identical

    torch.set_num_threads(1)
    single = train(shards, stats, tmp_path / "single", CONFIG, False, NullProgress())
    reference = load_checkpoint(single.checkpoint_last)["model"]
    for k in reference:  # the same global batches: equal up to the order of floating-point sums
        assert torch.allclose(rank0[k], reference[k], rtol=1e-4, atol=1e-5), k
    ddp_history = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert ddp_history[-1]["val_top1_error"] == pytest.approx(single.history[-1]["val_top1_error"])
    assert ddp_history[-1]["train_loss"] == pytest.approx(single.history[-1]["train_loss"], rel=1e-4)


def test_global_batch_must_split_evenly():
    assert rank_batch_size(128, Ranks(0, 4, 0)) == 32
    with pytest.raises(ConfigError, match="batch_size"):
        rank_batch_size(128, Ranks(0, 3, 0))


def test_device_spec():
    assert resolve_devices("cpu", 2) == [torch.device("cpu")]
    assert resolve_devices("cpu,cpu", 2) == [torch.device("cpu")] * 2
    with pytest.raises(ConfigError, match="towers"):
        resolve_devices("cpu,cpu", 1)
    if not torch.cuda.is_available():
        assert resolve_devices("auto", 2) == [torch.device("cpu")]
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_devices("cuda:0", 2)
