"""The bookkeeping of the multi-GPU runs (docs/results.md §6), on synthetic rows and a tiny model: the training
benchmark's sequence-parallel rows (`yarnkit/bench/training.py`, `training_table.py`: `-spN` variants, the comparison with `-sp1` against
bf16 noise, scaling efficiency, `--dry-run` estimates) and scripts/e2e.py's scaling report
(`yarnkit.train.metrics.scaling`). The GPU runs themselves are not here.

Run: python -m pytest tests/test_multigpu_reports.py -q
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from yarnkit.bench import training, training_table
from yarnkit.train.metrics import scaling


def test_sp_variants_parse_and_launch_under_deepspeed():
    assert training_table.parse_variant("keep-attention-sp2") == ("keep-attention", 2)
    assert training_table.parse_variant("yarnkit-sp1") == ("yarnkit", 1)  # ZeRO-2 on one GPU: the -spN reference
    assert training_table.parse_variant("alst") == ("alst", 0)  # no suffix: one plain process
    for bad in ("hf-liger-sp2", "yarnkit-sp0", "yarnkit-spx", "nope"):
        with pytest.raises(SystemExit, match="unknown variant"):
            training_table.parse_variant(bad)
    assert training.new_row("llama-1b", "131072", "yarnkit-sp1")["gpus"] == 1
    assert training.group_of(training.new_row("llama-1b", "131072", "yarnkit-sp1")) == "llama-1b@131072@yarnkit-sp1"


def _row(variant: str, tokens: float, losses: list[float], norms: list[float]) -> dict:
    row = training.new_row("llama-1b", "131072", variant)
    row.update(status="ok", tokens_per_s_per_gpu=tokens, achieved_tflops=tokens * 3e10 / 1e12, losses=losses,
               grad_norms=norms, step_seconds=1.0, peak_memory_gb=30.0)
    return row


def test_sp_rows_compare_with_sp1_and_report_efficiency():
    rows = [_row("keep-attention-sp1", 10_000, [11.0, 10.8, 10.6], [2.0, 1.5, 1.2]),
            _row("keep-attention-sp2", 9_000, [11.0, 10.81, 10.6], [2.0, 1.5, 1.21]),
            _row("keep-attention-sp4", 8_000, [11.0, 10.9, 10.6], [2.0, 1.5, 1.2])]
    training_table.add_ratios(rows, peak=989.0, measured=771.0)
    two, four = rows[1]["vs_sp1"], rows[2]["vs_sp1"]
    assert two["efficiency"] == pytest.approx(0.9) and two["loss"] == pytest.approx(0.01 / 10.8)
    assert two["grad_norm"] == pytest.approx(0.01 / 1.2) and two["equal"] is True  # 9.3e-4 < 2^-8, 8.3e-3 < 1e-2
    assert four["equal"] is False and four["loss"] == pytest.approx(0.1 / 10.8)  # 9.3e-3 > 2^-8
    assert "vs_sp1" not in rows[0]
    table = training_table.markdown({"matmul_peak_tflops": 771.0, "device": "x", "peak_tflops": 989.0, "cases": rows,
                                  "max_len": []})
    assert "| llama-1b@131072@keep-attention-sp4 | 4 | 8,000 | 80.0% | 9.3e-03 | 0.0e+00 | no |" in table


def test_dry_run_estimates_each_case_for_its_launch(tmp_path):
    args = SimpleNamespace(out=str(tmp_path), cases=["tiny@256@yarnkit-sp2", "tiny@128,65536@alst-sp1",
                                                      "tiny@128@hf-liger"],
                           steps=3, profile=[], model_dir="", data="", cpu=True)
    assert training.run_dry(args) == 0
    rows = json.loads((tmp_path / "dry-run.json").read_text())["cases"]
    assert [r["case"] for r in rows] == ["tiny@256@yarnkit-sp2", "tiny@128@alst-sp1", "tiny@65536@alst-sp1"]
    sp2, alst = rows[0]["estimate"], rows[2]["estimate"]
    assert sp2["processes"] == 2 and sp2["zero_stage"] == 2 and sp2["sp_size"] == 2 and sp2["tokens_per_step"] == 256
    assert alst["memory_gib_per_device"]["host_offload"] == 0.03  # offloaded inputs: 2 layers x 65536 x 64 x 4 B (fp32)


def test_e2e_scaling_against_one_gpu():
    one = {"gpus": 1, "seconds": 120.0, "tokens_per_s": 140_000.0}
    four = {"gpus": 4, "seconds": 45.0, "tokens_per_s": 490_000.0}  # 30 s of start-up does not scale
    report = scaling(one, four)
    assert report["efficiency_throughput"] == pytest.approx(0.875) and report["met"] is True
    assert report["speedup_wall"] == pytest.approx(120 / 45) and report["efficiency_wall"] == pytest.approx(120 / 180)
    assert scaling(one, {**four, "tokens_per_s": 460_000.0})["met"] is False  # 82%
