"""The GPU check's orchestration on CPU (`scripts/gpu_check.py`, `yarnkit/bench/gpu_check.py`): every path in its
own process with its own limit inside one budget, one JSON, a pass/fail table, a non-zero exit when a path fails,
and a one-line refusal without CUDA.

The whole run goes through the script with `--cpu-smoke`: the bundled-model path, a recipe that trains (a tiny
random Llama, 2 steps) and a recipe with a typo that fails, side by side. The scheduler's limits are checked
with stand-in commands (a pass, a crash, a reported failure, a sleeper past its limit, a path the budget never
reaches). The paths themselves run on the GPU (`python scripts/gpu_check.py`); `--cpu-smoke` without
`--paths` runs all of them on CPU at tiny sizes (minutes).

Run: python -m pytest tests/test_gpu_check.py -q   (about 40 s on 2 cores)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainer_helpers import make_text_file, make_tiny_model_dir
from yarnkit.bench.gpu_check import CheckPath, main, run_paths, table

REPO = Path(__file__).resolve().parents[1]


def stand_in(tmp: Path, name: str, code: str, limit_s: float = 60) -> CheckPath:
    folder = tmp / name
    return CheckPath(name, [sys.executable, "-c", code, str(folder)], folder, limit_s)


WRITES_PASS = ("import json, pathlib, sys; pathlib.Path(sys.argv[1], 'result.json').write_text(json.dumps("
               "{'passed': True, 'summary': 'all good', 'detail': {'n': 3}}))")
WRITES_FAIL = ("import json, pathlib, sys; pathlib.Path(sys.argv[1], 'result.json').write_text(json.dumps("
               "{'passed': False, 'error': 'loss is nan'})); sys.exit(1)")


def test_each_path_gets_its_status_its_line_and_its_limit(tmp_path):
    paths = [stand_in(tmp_path, "ok", WRITES_PASS), stand_in(tmp_path, "crash", "raise ValueError('boom')"),
             stand_in(tmp_path, "reported", WRITES_FAIL),
             stand_in(tmp_path, "slow", "import time; time.sleep(60)", limit_s=1)]
    started = time.monotonic()
    seen = []
    rows = run_paths(paths, tmp_path / "logs", time.monotonic() + 60, 4, None, None, seen.append)
    assert time.monotonic() - started < 20  # the sleeper was stopped at its own limit, not waited for
    by_name = {row["name"]: row for row in rows}
    assert [row["name"] for row in rows] == ["ok", "crash", "reported", "slow"] and len(seen) == 4
    assert by_name["ok"]["status"] == "pass" and by_name["ok"]["summary"] == "all good"
    assert by_name["ok"]["detail"] == {"n": 3}
    assert by_name["crash"]["status"] == "fail" and by_name["crash"]["error"] == "exited 1: ValueError: boom"
    assert by_name["reported"]["status"] == "fail" and by_name["reported"]["error"] == "loss is nan"
    assert by_name["slow"]["status"] == "timeout" and "at its limit of 1 s" in by_name["slow"]["error"]
    assert "Traceback" in Path(by_name["crash"]["log"]).read_text()  # the whole story stays in the path's log


def test_the_budget_stops_a_running_path_and_leaves_the_rest_not_run(tmp_path):
    paths = [stand_in(tmp_path, "sleeper", "import time; time.sleep(60)"), stand_in(tmp_path, "never", WRITES_PASS)]
    started = time.monotonic()
    rows = run_paths(paths, tmp_path / "logs", time.monotonic() + 2, 1, None, None)
    assert time.monotonic() - started < 15
    assert rows[0]["status"] == "timeout" and "when the budget ran out" in rows[0]["error"]
    assert rows[1]["status"] == "not run" and "budget" in rows[1]["error"]
    text = table({"paths": rows, "seconds": 2.0, "device": "cpu", "budget_s": 2.0, "json": "x.json"})
    assert "0/2 paths passed" in text and "TIMEOUT" in text and "NOT RUN" in text


def test_without_cuda_it_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--out", str(tmp_path / "gc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("yarnkit: error: gpu_check needs a CUDA GPU") and "--cpu-smoke" in err[0]
    assert not (tmp_path / "gc").exists()


def test_bad_arguments_are_one_line_and_a_foreign_out_folder_is_left_alone(tmp_path, capsys):
    assert main(["--cpu-smoke", "--paths", "rutime", "--out", str(tmp_path / "gc")]) == 2
    assert "--paths rutime: no such path" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["--cpu-smoke", "--out", str(foreign)]) == 2
    assert "gpu_check did not write" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"


def test_cpu_smoke_run_writes_the_json_prints_the_table_and_fails_on_a_bad_recipe(tmp_path):
    model, data = make_tiny_model_dir(tmp_path / "model"), make_text_file(tmp_path / "data.txt.gz")
    good, bad = tmp_path / "tiny-random.yaml", tmp_path / "typo.yaml"
    good.write_text(f"model: {{name_or_path: {model}, gradient_checkpointing: false}}\nyarn: {{factor: 2.0}}\n"
                    f"data: {{source: {data}}}\n")
    bad.write_text("train:\n  max_stepz: 3\n")
    out = tmp_path / "gc"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                           "--paths", "recipe", "--recipes", f"{good},{bad}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {row["name"]: row for row in report["paths"]}
    assert list(rows) == ["bundled-model", "recipe:tiny-random.yaml", "recipe:typo.yaml"] and not report["passed"]
    assert rows["bundled-model"]["status"] == "pass"
    assert rows["recipe:tiny-random.yaml"]["status"] == "pass", rows["recipe:tiny-random.yaml"]
    assert len(rows["recipe:tiny-random.yaml"]["detail"]["losses"]) == 2
    assert rows["recipe:typo.yaml"]["status"] == "fail"
    assert rows["recipe:typo.yaml"]["error"].startswith("RecipeError: unknown recipe key 'train.max_stepz'")
    lines = done.stdout.splitlines()
    assert lines[-4].startswith("gpu_check: 2/3 paths passed")
    assert lines[-2].split()[0] == "pass" and "recipe:tiny-random.yaml" in lines[-2]
    assert lines[-1].split()[0] == "FAIL" and "max_stepz" in lines[-1]


def test_runtime_path_asserts_float32_exactness_and_the_batch_on_cpu(tmp_path):
    """The runtime path at its CPU size: the static decode vs the eager cache (stock, and on the same fused model)
    through evictions, and a batch of two sessions vs their solo runs, asserted exact in float32 (the GPU run adds
    the graph, compile and bf16 with its float32 reference)."""
    out = tmp_path / "runtime"
    done = subprocess.run([sys.executable, "-m", "yarnkit.bench.gpu_paths", "runtime", "--out", str(out),
                           "--cpu-smoke"], capture_output=True, text=True, timeout=600)
    result = json.loads((out / "result.json").read_text())
    assert done.returncode == 0 and result["passed"], result.get("error")
    single, batch = result["detail"]["float32 static"], result["detail"]["float32 batch of 2 (static)"]
    assert single["rerotations"] >= 2 and single["max_abs_logprob_diff"] <= 1e-3 and single["greedy_agreement"] == 1
    assert single["decided_agreement"] == 1 and single["decided_rows"] * 2 >= single["steps"]
    assert single["fused_norms"] and single["same_fuse"]["max_abs_logprob_diff"] <= 1e-3  # the fused eager cache too
    assert "vs the eager cache with the same fuse" in result["summary"]
    assert batch["all_identical"] and batch["identical_prefix_tokens"] == [8, 8]


def test_gpu_tests_command_runs_the_marked_tests_and_splits_them_over_workers(tmp_path):
    """The gpu-tests path's pytest command: one process runs the marked tests of a file (JUnit counts them, the
    unmarked one is deselected); more than one worker hands the tests to pytest-xdist, each to the next free one."""
    from yarnkit.bench.gpu_paths import junit_counts, pytest_command

    (tmp_path / "test_marked.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_a():\n    pass\n\n@pytest.mark.gpu\ndef test_b():\n    pass\n\n"
        "def test_unmarked():\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    junit = tmp_path / "junit.xml"
    command = pytest_command([str(tmp_path / "test_marked.py")], junit, workers=1)
    assert "-n" not in command
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert junit_counts(junit) == ({"passed": 2, "skipped": 0, "failed": 0}, [])
    parallel = pytest_command(["t.py"], junit, workers=4)
    assert parallel[parallel.index("-n") + 1] == "4" and parallel[parallel.index("--dist") + 1] == "load"
