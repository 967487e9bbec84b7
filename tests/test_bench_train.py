"""The training benchmark's groups on CPU: the peers' process and yarnkit's process each run one case, and a
group process that dies is reported with its own error, its exit code and the end of its log, in the row and in
compare.md (`python -m yarnkit.bench.training --cases`, `yarnkit/bench/training.py`). A case that crashes inside
its group's process gets one line with its cause and the group's next cases still run; after a group's process
dies, the next group still runs; bf16-weights cases run in a process of their own."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from yarnkit.bench import training, training_cases, training_table

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


def test_bf16_weights_cases_get_a_process_of_their_own():
    """accelerate keeps one mixed-precision setting per process: bf16-weights ("no") never joins the recipes' bf16."""
    groups = {variant: training.group_of(training.new_row("smollm2-135m", "4x8192:65536", variant))
              for variant in ("yarnkit", "compiled", "yarnkit-bf16w", "compiled-bf16w")}
    assert groups == {"yarnkit": "yarnkit", "compiled": "yarnkit", "yarnkit-bf16w": "yarnkit-bf16w",
                      "compiled-bf16w": "yarnkit-bf16w"}
    assert training_table.VARIANTS["yarnkit-bf16w"] == {"train.mixed_precision": "bf16-weights"}


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


def test_a_crashing_case_gets_its_own_line_and_the_next_cases_still_run(tmp_path):
    """The child side of a group (`run_plan`): each case's failure is caught, named in one line, and the next runs."""
    def run_one(argv):
        if argv == ["crash"]:
            raise ValueError("data.seq_len 100 is not a multiple of 64\n(a second line the row leaves out)")
        if argv == ["oom"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 2 if argv == ["exits"] else 0

    cases = ["crash", "exits", "oom", "ok"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"deadline": time.time() + 600, "cases": [
        {"name": case, "argv": [case], "status": str(tmp_path / f"{case}.json")} for case in cases]}))
    assert training_cases.run_plan(str(plan), run_one) == 0
    status = {case: json.loads((tmp_path / f"{case}.json").read_text()) for case in cases}
    assert status["crash"]["status"] == "error"
    assert status["crash"]["error"] == "ValueError: data.seq_len 100 is not a multiple of 64"
    assert (status["exits"]["status"], status["exits"]["error"]) == ("error", "exit 2")
    assert status["oom"]["status"] == "oom" and status["oom"]["error"].startswith("CUDA out of memory")
    assert status["ok"]["status"] == "ok"


def test_after_a_group_process_dies_the_next_group_still_runs(tmp_path, monkeypatch):
    """Two groups whose processes both die, each with its own error: the second group ran after the first died,
    and each row (and compare.md) names its own group's cause."""
    def dies(command, log, timeout):
        log.parent.mkdir(parents=True, exist_ok=True)
        cause = ("RuntimeError: CUDA error: an illegal memory access was encountered" if log.name.startswith("peers")
                 else "ImportError: cannot import name 'main' from 'yarnkit.train.trainer'")  # the group's log
        log.write_text(f"Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n{cause}\n")
        return 1

    monkeypatch.setattr(training, "_launch", dies)
    out = tmp_path / "speed"
    args = SimpleNamespace(out=str(out), budget_s=600, cpu=True, peak_tflops=989.0, steps=2, warmup=1, profile=[],
                           model_dir="", data="", cases=["tiny@128@hf", "tiny@128@yarnkit"])
    assert training.run_compare(args) == 0
    rows = {row["case"]: row for row in json.loads((out / "compare.json").read_text())["cases"]}
    assert rows["tiny@128@hf"]["status"] == rows["tiny@128@yarnkit"]["status"] == "error"
    assert "CUDA error: an illegal memory access" in rows["tiny@128@hf"]["error"]
    assert "ImportError: cannot import name 'main'" in rows["tiny@128@yarnkit"]["error"]
    table = (out / "compare.md").read_text()
    assert "illegal memory access" in table and "cannot import name 'main'" in table
