"""Settings of `alexrepro evaluate`, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 128  # validation images per forward pass; each contributes its ten patches (§4.1)
    devices: str = "auto"  # "auto", "cpu", "cuda:0", or "cuda:0,cuda:1" for the paper's two-tower placement (§3.2)
    workers: int | None = None  # decoding processes; None = one per CPU core (at most 8), 0 = decode in this process
    # Training images scanned for Figure 4's neighbours: the first this many in stored order, a uniform random
    # subset since prepare shuffles the train shards (the paper searched all 1.2 M; fc7 of every training image costs
    # a full inference pass over the train set, an hour or more on a CPU). null = all, 0 = skip the figure.
    neighbours_max_train: int | None = 50000
    # The measured effects the report shows beside each claim of the paper (`alexrepro claims` writes the file);
    # a path relative to where evaluate runs, null = none.
    claims_table: str | None = "docs/claims.md"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"key 'batch_size' must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"key 'workers' must be 0 or more (or null for one per core), got {self.workers}")
        if self.neighbours_max_train is not None and self.neighbours_max_train < 0:
            raise ValueError(f"key 'neighbours_max_train' must be 0 or more, got {self.neighbours_max_train}")
        if not self.devices.strip():
            raise ValueError("key 'devices' must be 'auto', a device (cpu, cuda:0) or two separated by a comma")
