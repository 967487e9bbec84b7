"""Training metrics: one JSON object per logged step in `RUN/metrics.jsonl` (rank 0), optionally TensorBoard.

On resume, rows after the resumed step (written by the interrupted process) are dropped first, so the file
always describes one consistent run. Not a progress bar (the trainer's tqdm is). `read_metrics(RUN)` is its
reader (benchmarks, e2e, plots): the rows as dicts, oldest first. `StageClock` times a run's stages end to end
(from the process start: launch and imports, set-up, model load, data, steps, checkpoint saves) into
`RUN/stages.json`. `scaling(one, many)` compares two runs of the same training (the same tokens per step) on 1 and
N GPUs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
STAGES_FILE = "stages.json"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The logged rows of `RUN/metrics.jsonl`, oldest first (one dict per logged step)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: the run has not logged a step yet (or run_dir is wrong)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False, truncate_after: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled, self.writer = enabled, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(run_dir) if self.path.is_file() else []
        kept = [row for row in rows if row.get("step", 0) <= truncate_after]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("train.tensorboard=true needs the `tensorboard` package: pip install tensorboard"
                                  ) from err
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def process_age() -> float:
    """Seconds since this process started (launch and imports included); 0.0 where the OS does not say."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except (ImportError, OSError):
        return 0.0


class StageClock:
    """Wall-clock seconds per stage of a run. `lap(name)` closes the stage that ran since the previous lap;
    `add(name, seconds)` adds time measured elsewhere (checkpoint saves inside the step loop). The first stage,
    "launch and imports", is the process's age when the clock starts."""

    def __init__(self):
        self.seconds = {"launch and imports": process_age()}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.add(name, now - self.last)
        self.last = now

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        return sum(self.seconds.values())

    def line(self) -> str:
        parts = ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
        return f"wall time: {parts}; total {self.total():.1f} s"

    def write(self, run_dir: str | Path) -> None:
        rows = {**{name: round(value, 3) for name, value in self.seconds.items()}, "total": round(self.total(), 3)}
        (Path(run_dir) / STAGES_FILE).write_text(json.dumps(rows, indent=1) + "\n")


def scaling(one: dict, many: dict, target: float = 0.85) -> dict:
    """Strong scaling of a training stage from `one` (1 GPU) to `many` (N GPUs), each a dict with `gpus`,
    `seconds` (the stage's wall time: start-up, tokenization and steps) and `tokens_per_s` (steady-state, all
    GPUs). Efficiency = speed-up / N, from the throughput (the target's measure) and from the wall time."""
    gpus = many["gpus"]
    throughput = many["tokens_per_s"] / (gpus * one["tokens_per_s"])
    return {"gpus": gpus, "reference_gpus": one["gpus"], "reference_seconds": one["seconds"],
            "seconds": many["seconds"], "speedup_wall": one["seconds"] / many["seconds"],
            "efficiency_wall": one["seconds"] / (gpus * many["seconds"]), "efficiency_throughput": throughput,
            "target": f"efficiency (throughput) >= {target:.0%}", "met": throughput >= target}
