"""bf16 module weights with float32 masters (`train.mixed_precision=bf16-weights`) on CPU with a tiny random Llama:
the master step against a float32 AdamW reference (gradients accumulated in float32), the rotary buffers left in
float32, a short run that learns, follows the float32 run's losses and resumes exactly from float32 checkpoints,
two DDP processes against one, the refused combinations; on a GPU (`-m gpu`) the fused-AdamW path.

Run: python -m pytest tests/test_master_weights.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from trainer_helpers import tiny_assets, tiny_overrides
from yarnkit.errors import RecipeError
from yarnkit.launch import accelerate_launch
from yarnkit.runs import step_dir
from yarnkit.train.master_weights import MasterWeights
from yarnkit.train.metrics import read_metrics
from yarnkit.train.optim import OptimArgs, build_optimizer
from yarnkit.train.recipe import load_recipe
from yarnkit.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
BF16W = {"train.mixed_precision": "bf16-weights"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("bf16w"))


def overrides(assets, run_dir, **extra):
    return tiny_overrides(assets["model"], assets["data"], run_dir, assets["cache"], **{**BF16W, **extra})


def bf16_params(model):
    """`model` with bf16 parameters and untouched (float32) buffers, as `MasterWeights` leaves it."""
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model


def test_master_step_accumulates_in_float32_and_equals_a_float32_adamw_step():
    """Two micro-batches: the master grads are the float32 sum of the bf16 grads (not their bf16 sum), and clip +
    AdamW on the masters equal the same step on float32 copies of the weights, bit for bit; the module's weights
    are then the masters rounded to bf16."""
    from conftest import tiny_model

    model = tiny_model("llama", seed=3).train()
    reference = bf16_params(tiny_model("llama", seed=3).train())
    start = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 48), generator=generator) for _ in range(2)]
    grads = []  # each micro-batch's bf16 gradients, computed by the reference module
    for ids in batches:
        reference.zero_grad()
        (reference(input_ids=ids, labels=ids).loss / 2).backward()
        grads.append([p.grad.clone() for p in reference.parameters()])
    summed32 = [a.float() + b.float() for a, b in zip(*grads)]
    summed16 = [(a + b).float() for a, b in zip(*grads)]
    assert not all(torch.equal(a, b) for a, b in zip(summed32, summed16))  # bf16 accumulation would show

    masters = MasterWeights(model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(m, s) for m, s in zip(masters.masters, start))  # the float32 weights, not rounded
    for ids in batches:
        (model(input_ids=ids, labels=ids).loss / 2).backward()
    assert all(m.grad.dtype == torch.float32 for m in masters.masters)
    assert all(torch.equal(m.grad, s) for m, s in zip(masters.masters, summed32))

    args = OptimArgs(lr=1e-2, warmup_steps=0)
    expected = [torch.nn.Parameter(s.clone()) for s in start]
    for param, grad in zip(expected, summed32):
        param.grad = grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(expected, 0.5, foreach=True)
    (reference_adamw, _), (adamw, _) = (build_optimizer(ps, args, 10, "cpu") for ps in (expected, masters.masters))
    reference_adamw.step()
    assert torch.equal(masters.clip(0.5), expected_norm)
    adamw.step()
    masters.publish()
    for master, want, param in zip(masters.masters, expected, model.parameters()):
        assert torch.equal(master, want)
        assert torch.equal(param, master.to(torch.bfloat16))
        assert not master.grad.any() and param.grad is None  # the next step starts from zero


def test_rotary_buffers_stay_float32(assets):
    """YaRN's frequencies are not rounded to bf16: inv_freq stays float32 and cos/sin are computed from it in
    float32, rounded only at the end (to the hidden states' dtype)."""
    from yarnkit.train.model_setup import build_model, scaled_config

    recipe = load_recipe(overrides(assets, assets["root"] / "unused"))
    model, _ = build_model(recipe.model, scaled_config(recipe.model, recipe.yarn), recipe.lora)
    rotary = model.model.rotary_emb
    assert rotary.rope_type == "yarn"
    inv_freq = rotary.inv_freq.clone()
    positions = torch.arange(512)[None]
    cos32, sin32 = rotary(torch.zeros(1, dtype=torch.float32), positions)
    MasterWeights(model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, inv_freq)
    cos, sin = rotary(torch.zeros(1, dtype=torch.bfloat16), positions)
    assert torch.equal(cos, cos32.to(torch.bfloat16)) and torch.equal(sin, sin32.to(torch.bfloat16))
    rotary.inv_freq = inv_freq.to(torch.bfloat16).float()  # what a cast buffer would do: other angles
    assert not torch.equal(rotary(torch.zeros(1, dtype=torch.bfloat16), positions)[0], cos)


@pytest.fixture(scope="module")
def straight_run(assets):
    """4 uninterrupted bf16-weights steps of 2 micro-batches, checkpoints at 2 and 4."""
    return train(load_recipe(overrides(assets, assets["root"] / "straight", **{"optim.schedule_steps": 4})))


def test_run_learns_and_checkpoints_the_float32_masters(straight_run):
    from safetensors.torch import load_file

    assert straight_run.losses[4] < straight_run.losses[1]
    run = Path(straight_run.run_dir)
    assert json.loads((run / "speed.json").read_text())["precision"] == "bf16 weights, fp32 masters (yarnkit)"
    final = step_dir(run, 4)
    exported = load_file(final / "model" / "model.safetensors")
    resumable = load_file(final / "state" / "model.safetensors")
    assert json.loads((final / "model" / "config.json").read_text())["dtype"] == "float32"
    trained = dict(straight_run.model.named_parameters())  # the masters, left in the module at the end
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, trained[name]), name
        assert torch.equal(resumable[f"model.{name}"], tensor), name
    assert not all(torch.equal(t, t.to(torch.bfloat16).float()) for t in exported.values())  # not bf16 values


def test_losses_follow_the_float32_run(assets, straight_run):
    """The same 4 steps with float32 weights: bf16 rounding apart (2e-4 relative here), the same losses."""
    fp32 = train(load_recipe(overrides(assets, assets["root"] / "fp32", **{
        "optim.schedule_steps": 4, "train.mixed_precision": "fp32"})))
    for step, loss in fp32.losses.items():
        assert straight_run.losses[step] == pytest.approx(loss, rel=1e-3)


def test_resume_continues_exactly(assets, straight_run):
    run_dir = assets["root"] / "resumed"
    first = train(load_recipe(overrides(assets, run_dir, **{"optim.schedule_steps": 4, "train.max_steps": 2})))
    assert first.losses == {step: straight_run.losses[step] for step in (1, 2)}
    resumed = train(load_recipe(overrides(assets, run_dir, **{"optim.schedule_steps": 4, "resume": "auto"})))
    assert resumed.first_step == 3
    assert resumed.losses == {step: straight_run.losses[step] for step in (3, 4)}  # bit for bit
    for (name, param), (_, want) in zip(resumed.model.named_parameters(), straight_run.model.named_parameters()):
        assert torch.equal(param, want), name


def test_two_ddp_processes_equal_one_accumulating(assets, straight_run):
    """2 processes x 2 chunks reduce their float32 grads once per step: the steps of one process accumulating 2
    micro-batches of 2 chunks, up to bf16 rounding (a rank's micro-batch pairs other chunks: samples 0 and 2, not
    0 and 1). Without the reduction the ranks' weights would part; without the average the norm would double."""
    run_dir = assets["root"] / "ddp"
    argv = overrides(assets, run_dir, **{"optim.schedule_steps": 4, "train.max_steps": 2, "train.grad_accum": 1,
                                         "checkpoint.every": 0})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*accelerate_launch(), "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "tests" / "dist_probe.py"),
                           *argv], env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["distributed_type"] == "MULTI_CPU" for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    rows = {name: read_metrics(folder) for name, folder in (("ddp", run_dir), ("one", straight_run.run_dir))}
    for ddp, one in zip(rows["ddp"], rows["one"]):
        assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert ddp["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)


def test_refused_combinations_name_the_fix(assets, monkeypatch):
    from yarnkit.train.estimate import dry_run
    from yarnkit.train.loop import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RecipeError) as refused:
        make_accelerator(load_recipe(overrides(assets, assets["root"] / "unused")).train)
    assert str(refused.value) == ("train.mixed_precision=bf16-weights is for one-process and DDP launches "
                                  "(DeepSpeed's bf16 already keeps bf16 weights with float32 masters) — use "
                                  "train.mixed_precision=bf16 under DeepSpeed")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(RecipeError, match="under DeepSpeed$"):  # the dry run of a DeepSpeed launch says it too
        dry_run(load_recipe(overrides(assets, assets["root"] / "unused")), 1)
    with pytest.raises(RecipeError, match="use train.mixed_precision=bf16 with lora.enabled$"):
        load_recipe(overrides(assets, assets["root"] / "unused", **{"lora.enabled": True}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_follows_the_float32_run(assets):
    """On a GPU (`pytest -m gpu`): fused AdamW steps the masters (CUDA's mixed-dtype `_foreach_copy_` publishes
    them), and the losses follow a float32 run's within 2e-3 relative (bf16 rounding of the module, 2e-4 on the
    CPU; a dropped or doubled gradient is off by far more). float32, not bf16 autocast: accelerate keeps one mixed-precision setting
    per process, and both of these run without autocast."""
    runs = {mode: train(load_recipe(overrides(assets, assets["root"] / f"cuda-{mode}", **{
        "train.mixed_precision": mode}))) for mode in ("fp32", "bf16-weights")}
    speed = json.loads((Path(runs["bf16-weights"].run_dir) / "speed.json").read_text())
    assert speed["optimizer"] == "AdamW fused" and speed["precision"] == "bf16 weights, fp32 masters (yarnkit)"
    assert runs["bf16-weights"].losses[4] < runs["bf16-weights"].losses[1]
    for step, loss in runs["fp32"].losses.items():
        assert runs["bf16-weights"].losses[step] == pytest.approx(loss, rel=2e-3)
