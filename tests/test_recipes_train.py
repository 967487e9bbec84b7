"""Every shipped recipe trains two steps on CPU at a small shape, through the same entry point as
`scripts/train.py` (`yarnkit.cli.main(["train", ...])`).

Only the shape, the precision and the paths are overridden (sequence 256, micro-batch 2, fp32, no checkpoints but
the final one); every other key (data mix, long rows, PoSE, YaRN settings, sink token, checkpointing, kernels)
stays the recipe's own, so a recipe whose combination of keys cannot train fails here, not on a GPU. Recipes
that name a hub model or hub data (unreachable offline) train the bundled SmolLM2-135M on the bundled novel
instead, and `yarn-128k` continues from the checkpoint `yarn-64k` wrote, as its header says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import yarnkit
from yarnkit.cli import main
from yarnkit.recipe_files import recipe_names
from yarnkit.runs import find_checkpoint
from yarnkit.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # the real 135M model, ~10 s per recipe on 2 cores

SMALL = {"data.seq_len": 256, "data.num_proc": 1, "train.max_steps": 2, "train.micro_batch_size": 2,
         "train.grad_accum": 1, "train.global_batch": 0, "train.mixed_precision": "fp32",
         "train.loss_chunk_tokens": 128, "train.memory_check": False, "train.log_every": 1, "optim.warmup_steps": 1,
         "checkpoint.every": 0, "checkpoint.save_final": False}
OFFLINE = {"model.name_or_path": "smollm2-135m", "data.source": "bundled:train"}  # for hub models and hub data
SMALL_CODE = str(Path(yarnkit.__file__).parent / "train")  # a mix's `code` part: a few .py files, not the stdlib
PER_RECIPE = {
    "tiny": {},
    "smollm2-yarn-64k": {},
    "smollm2-yarn-64k-pose": {},
    "smollm2-yarn-64k-retrieval": {"data.code_source": SMALL_CODE, "data.seq_len": 1024},  # rows hold 2+ facts
    "sink-pretrain": {"data.source": "bundled:train", "model.scratch.layers": 2, "model.scratch.context": 256},
    "yarn-64k": {**OFFLINE, "checkpoint.save_final": True},
    "yarn-128k": {"data.source": "bundled:train"},  # model: yarn-64k's final checkpoint (the fixture below)
}


def test_every_shipped_recipe_has_a_small_shape():
    assert sorted(PER_RECIPE) == recipe_names(), "a new recipe needs its small-shape overrides in PER_RECIPE"


def train(name: str, tmp: Path, cache: Path, **extra) -> Path:
    run_dir = tmp / name
    overrides = {**SMALL, **PER_RECIPE[name], "run_dir": run_dir, "resume": "none", "data.cache_dir": cache, **extra}
    code = main(["train", f"recipe={name}", *(f"{key}={value}" for key, value in overrides.items())])
    assert code == 0, f"recipe {name} exited {code}"
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2], rows
    assert all(row["loss"] == row["loss"] and 0 < row["loss"] < 20 for row in rows), rows  # finite, sane
    return run_dir


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")  # the recipes share one tokenized copy of the novel


@pytest.fixture(scope="module")
def yarn_64k_run(tmp_path_factory, cache):
    return train("yarn-64k", tmp_path_factory.mktemp("runs"), cache)


@pytest.mark.parametrize("name", [n for n in sorted(PER_RECIPE) if n not in ("yarn-64k", "yarn-128k")])
def test_recipe_trains_two_steps(name, tmp_path, cache):
    train(name, tmp_path, cache)


def test_yarn_64k_then_yarn_128k_continues_from_its_checkpoint(yarn_64k_run, tmp_path, cache):
    model_dir = find_checkpoint(yarn_64k_run) / "model"
    assert model_dir.is_dir()
    run_dir = train("yarn-128k", tmp_path, cache, **{"model.name_or_path": model_dir, "checkpoint.save_final": True})
    config = json.loads((find_checkpoint(run_dir) / "model" / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    assert rope["factor"] == 32.0 and rope["original_max_position_embeddings"] == 4096  # re-scaled from 4k
