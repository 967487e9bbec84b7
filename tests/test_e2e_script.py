"""scripts/e2e.py, the whole train -> eval -> export -> stream sequence, runs end to end on CPU (the `tiny` recipe
with 2 steps, tiny lengths) and leaves every artefact the GPU run reports. Slow: it trains and evaluates the real
SmolLM2-135M (about 2-3 minutes on 2 cores).

Run: `python -m pytest tests/test_e2e_script.py -q`
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_e2e_smoke_leaves_every_artefact(tmp_path):
    out = tmp_path / "e2e"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "e2e.py"), "--smoke", "--out", str(out), "--",
                    "train.max_steps=2"], check=True, cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["train"]["last_loss"] > 0
    assert summary["recipe"] == "tiny" and summary["overrides"] == ["train.max_steps=2"]
    evals = {path.name for path in (out / "eval").glob("*.json")}
    tasks = ("ppl", "niah", "multikey", "chat")  # the smoke's retrieval tasks: those with targets
    for label in ("base", "dynamic-ntk_x2", "yarn_x2", "yarn_x2_fine-tuned"):  # baselines at tiny's YaRN factor, 2
        assert {f"{task}-SmolLM2-135M_{label}.json" for task in tasks} <= evals
    base_niah = json.loads((out / "eval" / "niah-SmolLM2-135M_base.json").read_text())
    assert [s["length"] for s in base_niah["skipped"]] == [512]  # the unscaled model stops at --native 256
    assert (out / "eval" / "ppl-compare.png").stat().st_size > 0
    export = json.loads((out / "export" / "export_report.json").read_text())
    assert (out / "export" / "model.safetensors").is_file() and list((out / "export").glob("*.gguf"))
    assert json.loads((out / "export" / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    assert export["hf_check"]["passed"] and export["gguf_check"]["passed"]  # reloaded in fresh processes
    assert export["hf_check"]["prompt_tokens"] == 512  # the smoke's --verify-tokens
    stream = summary["stream"]
    assert stream["tokens_processed"] == 1024 and max(stream["cache_tokens_per_segment"]) <= 256  # flat cache
    assert len(summary["targets"]) == 5 and all(t["met"] is not None for t in summary["targets"])  # all measured
    assert "| target | measured | met |" in (out / "results.md").read_text()
    started = summary["seconds"]  # a second run keeps every finished stage's output
    subprocess.run([sys.executable, str(ROOT / "scripts" / "e2e.py"), "--smoke", "--out", str(out), "--stages",
                    "train,eval", "--", "train.max_steps=2"], check=True, cwd=tmp_path)
    again = json.loads((out / "summary.json").read_text())
    assert again["train"]["steps"] == 2 and again["seconds"] < started
