"""Trainer on CPU with a tiny random Llama: chunked loss vs transformers, clipping, run layout, exact resume after
kill -9, temp checkpoints ignored, LoRA + PoSE.

Run: python -m pytest tests/test_trainer.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_helpers import tiny_assets, tiny_overrides
from yarnkit.runs import TMP_PREFIX, latest_checkpoint, list_checkpoints, step_dir
from yarnkit.train.recipe import load_recipe
from yarnkit.errors import RecipeError
from yarnkit.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("trainer"))


def overrides(assets, run_dir, **extra):
    return tiny_overrides(assets["model"], assets["data"], run_dir, assets["cache"], **extra)


@pytest.fixture(scope="module")
def straight_run(assets):
    """4 uninterrupted steps; the reference for the resume tests (schedule fixed at 4 steps)."""
    run_dir = assets["root"] / "straight"
    return train(load_recipe(overrides(assets, run_dir, **{"optim.schedule_steps": 4})))


def test_chunked_loss_and_grads_match_transformers():
    from conftest import tiny_model

    from yarnkit.train.data import answer_positions
    from yarnkit.train.loss import CausalLMLoss

    model = tiny_model("llama", seed=1).train()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids, labels=ids).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = CausalLMLoss(model, chunk_tokens=7)(ids)  # 78 targets in 12 chunks, the last one partial
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)  # float32 summation order
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-4)


def test_run_directory_layout(straight_run):
    from transformers import AutoModelForCausalLM

    run = Path(straight_run.run_dir)
    assert straight_run.losses[4] < straight_run.losses[1]
    assert load_recipe([f"recipe={run / 'recipe.yaml'}"]).train.max_steps == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb"} <= set(rows[0])
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    final = step_dir(run, 4)
    assert json.loads((final / "state" / "trainer_state.json").read_text())["samples_seen"] == 16
    assert (final / "recipe.yaml").is_file() and (final / "model" / "tokenizer.json").is_file()
    config = json.loads((final / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 512
    reloaded = AutoModelForCausalLM.from_pretrained(final / "model")
    assert reloaded.config.rope_parameters["original_max_position_embeddings"] == 256
    start = AutoModelForCausalLM.from_pretrained(assets_model_dir(run))
    assert not torch.equal(reloaded.model.norm.weight, start.model.norm.weight)  # trained weights were saved


def test_stage_wall_times_cover_the_run(straight_run):
    """RUN/stages.json: every stage of the run in order, none negative, summing to the total; two saves timed."""
    stages = json.loads((Path(straight_run.run_dir) / "stages.json").read_text())
    names = ["launch and imports", "set-up", "model load", "data", "optimizer, prepare and resume", "steps",
             "checkpoint saves", "total"]
    assert list(stages) == names
    assert all(value >= 0 for value in stages.values())
    assert stages["launch and imports"] > 0  # this process's age at train(): pytest's start-up at least
    assert stages["checkpoint saves"] > 0 and stages["steps"] > 0
    assert stages["total"] == pytest.approx(sum(stages[name] for name in names[:-1]), abs=0.01)


def assets_model_dir(run: Path) -> str:
    return load_recipe([f"recipe={run / 'recipe.yaml'}"]).model.name_or_path


def test_kill_9_then_resume_reproduces_losses(assets, straight_run):
    run_dir = assets["root"] / "killed"
    command = [sys.executable, str(REPO / "scripts" / "train.py"),
               *overrides(assets, run_dir, **{"optim.schedule_steps": 4, "train.max_steps": 100000})]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (step_dir(run_dir, 2) / "state" / "trainer_state.json").is_file():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no step-2 checkpoint within 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # really killed while still training

    resumed = train(load_recipe(overrides(assets, run_dir, **{
        "optim.schedule_steps": 4, "resume": step_dir(run_dir, 2)})))
    assert resumed.first_step == 3 and sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(straight_run.losses[step], abs=1e-6)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the killed process's later rows were dropped


def test_leftover_temp_checkpoint_is_never_resumed(assets, straight_run):
    run = Path(straight_run.run_dir)
    half_written = run / "checkpoints" / f"{TMP_PREFIX}step_000006"
    (half_written / "state").mkdir(parents=True)
    (half_written / "state" / "trainer_state.json").write_text('{"step": 6}')
    incomplete = run / "checkpoints" / "step_000005"  # renamed but without trainer state: not complete
    (incomplete / "model").mkdir(parents=True)
    assert latest_checkpoint(run) == step_dir(run, 4)
    more = train(load_recipe(overrides(assets, run, **{"optim.schedule_steps": 4, "train.max_steps": 5,
                                                        "checkpoint.keep_last": 2})))
    assert more.first_step == 5 and sorted(more.losses) == [5]
    assert [step for step, _ in list_checkpoints(run)] == [4, 5]  # keep_last pruned step 2


def test_resume_refuses_a_different_model_setup(assets, straight_run):
    with pytest.raises(RecipeError, match="different yarn settings"):
        train(load_recipe(overrides(assets, straight_run.run_dir, **{"yarn.factor": 4.0, "train.max_steps": 9})))


def test_resume_none_refuses_to_overwrite(assets, straight_run):
    with pytest.raises(FileExistsError, match="resume=auto"):
        train(load_recipe(overrides(assets, straight_run.run_dir, resume="none")))


def _reference_first_step(assets, clip: float, eps: float):
    """One optimizer step by hand: same batches, mean of micro-batch losses, clip_grad_norm_, AdamW."""
    from transformers import AutoModelForCausalLM

    from yarnkit.train.data import DataArgs, SampleOrder, build_dataset, micro_batch
    from yarnkit.models import load_tokenizer
    from yarnkit.patch import apply_rope_scaling

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    apply_rope_scaling(model, "yarn", factor=2.0)
    data = DataArgs(source=str(assets["data"]), seq_len=64, cache_dir=str(assets["cache"]))
    dataset = build_dataset(data, load_tokenizer(assets["model"]))
    order = SampleOrder(len(dataset), data.seed, data.shuffle)
    for first in (0, 2):
        ids = micro_batch(dataset, order, first, 0, 1, 2)["input_ids"]
        (model(input_ids=ids, labels=ids).loss / 2).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
    torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=eps, weight_decay=0.0).step()
    return norm.item(), model


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_clipping_runs_and_logged_norm_is_pre_clip(assets, clip):
    from transformers import AutoModelForCausalLM

    run_dir = assets["root"] / f"clip-{clip}"
    train(load_recipe(overrides(assets, run_dir, **{"train.max_steps": 1, "train.clip": clip, "optim.eps": 1.0})))
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    norm, reference = _reference_first_step(assets, clip, eps=1.0)
    assert logged == pytest.approx(norm, rel=1e-4) and norm > 0.05  # pre-clip norm, above the clip value
    trained = AutoModelForCausalLM.from_pretrained(step_dir(run_dir, 1) / "model")
    for (name, a), b in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    if clip:  # eps=1 makes AdamW sensitive to the gradient's scale, so clipping must show in the update
        _, unclipped = _reference_first_step(assets, 0.0, eps=1.0)
        gap = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), unclipped.parameters()))
        assert gap > 1e-5


def test_lora_with_trainable_norms_and_pose(assets):
    run_dir = assets["root"] / "lora"
    result = train(load_recipe(overrides(assets, run_dir, **{
        "train.max_steps": 2, "lora.enabled": True, "lora.r": 4, "lora.trainable_extra": "[norm]",
        "pose.enabled": True, "model.gradient_checkpointing": True})))
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    model_dir = step_dir(run_dir, 2) / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and "norm" in adapter["modules_to_save"]
    from safetensors.torch import load_file

    weights = load_file(model_dir / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("norm" in k and "lora" not in k for k in weights)


def test_packing_feeds_per_document_positions(assets, tmp_path):
    """Short documents (a BOS every ~50 tokens): with packing, positions restart at each document, which must
    change the loss of the very same chunks."""
    import gzip

    text = gzip.open(assets["data"], "rt").read()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text[i:i + 48]}) + "\n" for i in range(0, 9600, 48)))
    losses = {}
    for packing in (False, True):
        result = train(load_recipe(overrides(assets, tmp_path / f"run-{packing}", **{
            "train.max_steps": 1, "data.packing": packing, "data.source": docs})))
        losses[packing] = result.losses[1]
    assert torch.isfinite(torch.tensor(losses[True])) and abs(losses[True] - losses[False]) > 1e-4


def test_pose_batches_keep_attention_across_the_skip(assets):
    """PoSE's position jump must not be read as a packed-document boundary: the second part attends to the first."""
    from conftest import tiny_model

    from yarnkit.train.data import DataArgs, SampleOrder, build_dataset, micro_batch
    from yarnkit.models import load_tokenizer

    dataset = build_dataset(DataArgs(source=str(assets["data"]), seq_len=64, cache_dir=str(assets["cache"])),
                            load_tokenizer(assets["model"]))
    batch = micro_batch(dataset, SampleOrder(len(dataset), 0, False), 0, 0, 1, 1, pose_target=512, pose_seed=3)
    ids, positions = batch["input_ids"], batch["position_ids"]
    split = int((positions.diff() != 1).nonzero()[0, 1]) + 1 if (positions.diff() != 1).any() else None
    assert split is not None and batch["attention_mask"] is not None
    edited = ids.clone()
    edited[0, 0] = (ids[0, 0] + 1) % 97  # change a token of the first part
    body = tiny_model("llama", seed=0, max_position_embeddings=512).model
    with torch.no_grad():
        def tail(tokens, mask):
            return body(input_ids=tokens, position_ids=positions, attention_mask=mask,
                        use_cache=False).last_hidden_state[0, split:]  # as in training (CausalLMLoss)

        assert not torch.allclose(tail(ids, batch["attention_mask"]), tail(edited, batch["attention_mask"]))
        torch.testing.assert_close(tail(ids, None), tail(edited, None))  # why the mask is needed


def test_answer_loss_adds_the_weighted_mean_loss_of_the_marked_tokens():
    """CausalLMLoss(answer_weight=w) = plain loss + w x mean cross-entropy of the marked tokens, against full logits
    (weight 0: the plain loss)."""
    import torch.nn.functional as F
    from conftest import tiny_model

    from yarnkit.train.data import answer_positions
    from yarnkit.train.loss import CausalLMLoss

    model = tiny_model("llama", seed=3).train()
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 40))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 10:13], mask[1, 30:32] = True, True
    logits = model(input_ids=ids).logits.float()
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="none").view(2, 39)
    plain, answers = per_token.mean(), per_token[mask[:, 1:]].mean()
    weighted = CausalLMLoss(model, chunk_tokens=16, answer_weight=2.5)
    positions = answer_positions(mask)
    assert positions.tolist() == [9, 10, 11, 39 + 29, 39 + 30]  # token t is predicted at position t - 1
    torch.testing.assert_close(weighted(ids, answer_positions=positions), plain + 2.5 * answers, atol=1e-5, rtol=0)
    torch.testing.assert_close(weighted(ids), plain, atol=1e-5, rtol=0)  # none marked: the plain loss
    torch.testing.assert_close(CausalLMLoss(model, 16)(ids, answer_positions=positions), plain, atol=1e-5, rtol=0)
    assert answer_positions(torch.zeros_like(mask)) is None
