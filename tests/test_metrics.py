"""`RUN/metrics.jsonl`: the trainer's writer and its one reader (`yarnkit.train.metrics.read_metrics`), used by
scripts/bench_train.py, scripts/bench_compare.py and scripts/e2e.py.

Run: python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import pytest

from yarnkit.train.metrics import METRICS_FILE, MetricsLog, read_metrics


def test_reader_returns_what_the_writer_logged_and_resume_drops_later_rows(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    assert read_metrics(tmp_path) == [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    MetricsLog(tmp_path, enabled=True, truncate_after=2).close()  # resumed from the step-2 checkpoint
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / METRICS_FILE).write_text((tmp_path / METRICS_FILE).read_text() + "\n")  # a trailing blank line
    assert len(read_metrics(tmp_path)) == 2


def test_a_run_without_metrics_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no {tmp_path / METRICS_FILE}: the run has not logged"):
        read_metrics(tmp_path)
