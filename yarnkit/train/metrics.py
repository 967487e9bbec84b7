"""Training metrics: one JSON object per logged step in `RUN/metrics.jsonl` (rank 0), optionally TensorBoard.

On resume, rows after the resumed step (written by the interrupted process) are dropped first, so the file
always describes one consistent run. Not a progress bar (the trainer's tqdm is). Read it with
`[json.loads(l) for l in open("RUN/metrics.jsonl")]`.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False, truncate_after: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled, self.writer = enabled, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] \
            if self.path.is_file() else []
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
