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
    for label in ("base", "dynamic-ntk_x8", "yarn_x8", "yarn_x2_fine-tuned"):  # tiny's YaRN factor is 2
        assert {f"ppl-SmolLM2-135M_{label}.json", f"passkey-SmolLM2-135M_{label}.json"} <= evals
    assert (out / "eval" / "ppl-compare.png").stat().st_size > 0
    export = json.loads((out / "export" / "export_report.json").read_text())
    assert (out / "export" / "model.safetensors").is_file() and list((out / "export").glob("*.gguf"))
    assert json.loads((out / "export" / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    assert export["hf_check"]["passed"] and export["gguf_check"]["passed"]  # reloaded in fresh processes
    assert export["hf_check"]["prompt_tokens"] == 512  # the smoke's --verify-tokens
    stream = summary["stream"]
    assert stream["tokens_processed"] == 1024 and max(stream["cache_tokens_per_segment"]) <= 256  # flat cache
    assert [t["met"] is None for t in summary["targets"]] == [False, False, False]  # all three were measured
    assert "| target | measured | met |" in (out / "results.md").read_text()
