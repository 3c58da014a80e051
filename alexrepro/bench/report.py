"""What every benchmark returns: measured rows and the ratios that matter, all from one run."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field


@dataclass
class BenchReport:
    title: str
    rows: list[dict]  # one per measured pipeline: {"name": ..., "img_s": ..., ...}
    ratios: dict[str, float]  # "prepare / plain decode (per core)": 0.91, …
    notes: list[str] = field(default_factory=list)  # machine, library builds, sizes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def machine_description() -> str:
    """CPU model and core count, for the notes of every benchmark."""
    import os

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, Python {platform.python_version()}"
