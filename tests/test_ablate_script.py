"""scripts/ablate.py on CPU: one variant of the retrieval recipe (YaRN x8 with far rows, look-alike facts and the
answer loss) trains 2 steps at a small shape through scripts/e2e.py and is evaluated on the ablation's tasks; the table, the JSON and the
winner come out, and a second call finds the variant done and runs nothing (resumable). Slow: the real SmolLM2-135M.

Run: `python -m pytest tests/test_ablate_script.py -q`
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_variant_trains_is_evaluated_and_tabled(tmp_path):
    out = tmp_path / "ablate"
    command = [sys.executable, str(ROOT / "scripts" / "ablate.py"), "--smoke", "--out", str(out), "--variants", "data-x8"]
    subprocess.run(command, check=True, cwd=tmp_path, capture_output=True)
    table = json.loads((out / "ablation.json").read_text())
    rows = table["variants"]
    assert [row["variant"] for row in rows] == ["data-x8"]
    assert set(map(int, table["base_ppl"])) == {512, 1024}  # the base model within its context, run first
    assert rows[0]["keeps_perplexity"] in (True, False)
    row = rows[0]
    assert row["overrides"] == ["optim.lr=5e-5", "yarn.factor=8", "data.synthetic.restate=0",
                                "data.synthetic.numbers=0"]  # as first run, before the recipe took number clutter
    recipe = (out / "data-x8" / "run" / "recipe.yaml").read_text()
    assert "far: 0.5" in recipe and "answer_loss_weight: 1.0" in recipe and "seq_len: 1024" in recipe
    assert "numbers: 0.0" in recipe or "numbers: 0\n" in recipe
    assert "factor: 8.0" in recipe and "restate: 0" in recipe and "lr: 5.0e-05" in recipe
    assert set(map(int, row["ppl"])) == {512, 1024}
    for task in ("niah", "multikey", "chat"):
        assert len(row[task]["by_length"]) == 2 and row[task]["accuracy"] is not None
        assert set(map(float, row[task]["far"])) == {0.0, 0.05}
        trials = [t for path in (out / "data-x8" / "eval").glob(f"{task}-*.json")
                  for cell in json.loads(path.read_text())["cells"] for t in cell["trials"]]
        assert sum(row[task]["misses"].values()) == sum(not t["correct"] for t in trials) and trials
    markdown = (out / "ablation.md").read_text()
    assert "| data-x8 |" in markdown and "What the wrong answers gave" in markdown
    if row["keeps_perplexity"]:
        assert (out / "winner.txt").read_text().splitlines() == row["overrides"]
    again = subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    assert "start data-x8" not in again.stdout  # evaluated already: nothing runs again


def test_every_variant_is_a_valid_recipe():
    """Each variant's overrides load on the shipped recipe and take effect (the recipe is strict: a misspelt key
    fails here, not minutes into a GPU run)."""
    from omegaconf import OmegaConf

    from yarnkit.train.recipe import load_recipe

    spec = importlib.util.spec_from_file_location("ablate", ROOT / "scripts" / "ablate.py")
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    for name, overrides in ablate.VARIANTS.items():
        resolved = OmegaConf.structured(load_recipe(["recipe=smollm2-yarn-64k-retrieval", *overrides]))
        for override in overrides:
            key, value = override.split("=", 1)
            assert str(OmegaConf.select(resolved, key)) == value or float(OmegaConf.select(resolved, key)) == float(
                value), (name, override)
