"""Two CPU processes through `accelerate launch` (gloo): DDP and DeepSpeed ZeRO-2/3 really distribute the work.

Each rank must report world size 2, read a disjoint (interleaved) half of the samples, end with bit-identical
weights, and reproduce the losses of one process doing the same global batch through gradient accumulation
(2 x micro-batch 2 vs 1 x micro-batch 2 x accumulation 2; equal-length chunks make both means the same;
tolerance 1e-5 for float32 reduction order); the checkpoint's full weights (gathered from shards under ZeRO-3)
must equal the single process's. The first DeepSpeed run JIT-builds its CPU shared-memory comm op
(cached under ~/.cache/torch_extensions).

Run: python -m pytest tests/test_distributed.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_helpers import make_text_file, make_tiny_model_dir, tiny_overrides
from yarnkit.recipe_files import accelerate_config
from yarnkit.train.recipe import load_recipe
from yarnkit.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    assets = {"model": make_tiny_model_dir(root / "model"), "data": make_text_file(root / "data.txt.gz"),
              "cache": root / "cache", "root": root}
    single = train(load_recipe(tiny_overrides(assets["model"], assets["data"], root / "single", assets["cache"],
                                              **{"train.max_steps": 2, "checkpoint.every": 0})))
    return assets, single


def launch(assets, launcher: list[str], name: str) -> list[dict]:
    run_dir = assets["root"] / name
    overrides = tiny_overrides(assets["model"], assets["data"], run_dir, assets["cache"], **{
        "train.max_steps": 2, "train.grad_accum": 1, "checkpoint.every": 0})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*ACCELERATE, *launcher, str(REPO / "tests" / "dist_probe.py"), *overrides], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def check_distributed(ranks: list[dict], single, distributed_type: str, run_dir: Path, zero3: bool = False) -> None:
    from safetensors.torch import load_file

    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["distributed_type"] == distributed_type for r in ranks)
    assert ranks[0]["samples"] == [0, 2, 4, 6] and ranks[1]["samples"] == [1, 3, 5, 7]
    if not zero3:  # ZeRO-3 ranks hold only shards; their gathered weights are checked below
        assert ranks[0]["hashed_elements"] > 0 and ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    for step, loss in single.losses.items():
        assert ranks[0]["losses"][str(step)] == pytest.approx(loss, abs=1e-5)
    saved = load_file(run_dir / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    reference = load_file(Path(single.run_dir) / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    assert saved.keys() == reference.keys()
    for name, tensor in reference.items():  # full (gathered) weights equal one process's
        torch.testing.assert_close(saved[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_two_process_ddp_on_cpu(setup):
    assets, single = setup
    ranks = launch(assets, ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no"], "ddp")
    check_distributed(ranks, single, "MULTI_CPU", assets["root"] / "ddp")


@pytest.mark.skipif(shutil.which("c++") is None, reason="DeepSpeed's CPU comm op needs a C++ compiler to JIT-build")
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_zero_on_cpu(setup, stage):
    pytest.importorskip("deepspeed")
    assets, single = setup
    name = f"zero{stage}"
    ranks = launch(assets, ["--config_file", str(accelerate_config(name)),
                            "--num_processes", "2"], name)
    check_distributed(ranks, single, "DEEPSPEED", assets["root"] / name, zero3=stage == 3)
    shards = assets["root"] / name / "checkpoints" / "step_000002" / "state" / "pytorch_model"
    assert sorted(p.name for p in shards.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # sharded Adam
