"""The training benchmark's groups on CPU: the peers' process and yarnkit's process each run one case, and a
group process that dies is reported with its own error, its exit code and the end of its log, in the row and in
compare.md (`python -m yarnkit.bench.training --cases`, `yarnkit/bench/training.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from yarnkit.bench import training, training_table

REPO = Path(__file__).resolve().parents[1]


def test_peer_group_and_yarnkit_group_each_run_one_cpu_case(tmp_path):
    out = tmp_path / "speed"
    done = subprocess.run([sys.executable, str(REPO / "scripts/bench_train.py"), "--out", str(out), "--cpu",
                           "--steps", "2", "--warmup", "1", "--cases", "tiny@128@hf", "tiny@128@yarnkit"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["case"]: row for row in json.loads((out / "compare.json").read_text())["cases"]}
    for case in ("tiny@128@hf", "tiny@128@yarnkit"):
        assert rows[case]["status"] == "ok", rows[case].get("error")
        assert len(rows[case]["losses"]) == 2 and rows[case]["tokens_per_s_per_gpu"] > 0
    # same batches, same initial weights, fp32: yarnkit's trainer and plain transformers agree
    assert rows["tiny@128@yarnkit"]["loss_vs_ref"] < 1e-3
    assert "| tiny@128@yarnkit | ok |" in (out / "compare.md").read_text()


def test_a_group_process_that_dies_reports_its_error_exit_code_and_log(tmp_path, monkeypatch):
    out = tmp_path / "speed"
    crash = ("Traceback (most recent call last):\n  File \"<frozen runpy>\", line 198, in _run_module_as_main\n"
             "ImportError: cannot import name 'main' from 'yarnkit.train.trainer'\n")

    def dies(command, log, timeout):  # the child process starts, writes its traceback and exits 1
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(crash)
        return 1

    monkeypatch.setattr(training, "_launch", dies)
    args = SimpleNamespace(cpu=True, model_dir=None, data=None, steps=2, profile=[], warmup=1)
    row = training.new_row("tiny", "128", "yarnkit")
    row["command"], row["argv"] = training.case_command(args, out, row["case"], "tiny", "128", "yarnkit", 2)
    training.run_group(args, out, [row], time.time() + 600)
    assert row["status"] == "error"
    assert "exited 1" in row["error"] and "ImportError: cannot import name 'main'" in row["error"]
    assert "ImportError" in row["log_tail"]
    table = training_table.markdown({"matmul_peak_tflops": 1.0, "device": "cpu", "peak_tflops": 989.0, "cases": [row],
                                  "max_len": []})
    assert "exited 1" in table and "ImportError: cannot import name 'main'" in table
