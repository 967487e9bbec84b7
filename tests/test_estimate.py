"""The memory/time estimate (`yarnkit/train/estimate.py`) against measured peaks, and its long-sequence terms:
sequence parallelism, TiledMLP, activation offload, the residual stream's dtype, the loss.

The measured peaks are yarnkit's own runs on one H200 (2026-11-22, `docs/data/bench-train-compare-1gpu.json`:
single process, bf16 autocast, full gradient checkpointing, torch kernels, chunked loss of 8192 tokens). The
estimate must not undercount any of them and may exceed them by at most 35% (it counts every gradient as live
and the loss chunk three times); its growth from 64k to 256k tokens (the per-token part) must be within
-5%/+20% of the measured growth. The estimate before this test undercounted 256k by 24% (66 vs 86.9 GiB): it
took the checkpointed layer inputs as bf16, but under autocast the residual stream is fp32.

Run: python -m pytest tests/test_estimate.py -q
"""

from __future__ import annotations

import pytest

from yarnkit.train.estimate import dry_run, estimate, memory_bytes, parameter_counts
from yarnkit.train.model_setup import scaled_config
from yarnkit.train.recipe import load_recipe
from yarnkit.errors import RecipeError

GIB = 2**30
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=49152, tie_word_embeddings=False, rope_theta=500000.0)
MEASURED = [  # (model, seq_len, checkpoint_layers, measured peak GiB): bench-train-compare-1gpu.json
    ("llama-1b", 65536, 0, 32.0), ("llama-1b", 262144, 0, 86.9), ("llama-1b", 65536, 8, 91.1),
    ("smollm2-135m", 65536, 0, 11.0), ("smollm2-135m", 32768, 0, 8.6)]


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    """bench.py's `llama-1b` shape as a config folder (no weights, no tokenizer: the estimate reads the config)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-1b")
    LlamaConfig(**LLAMA_1B, max_position_embeddings=1 << 21).save_pretrained(folder)
    return str(folder)


def recipe_for(model: str, seq: int, llama_1b: str, *overrides: str):
    name = llama_1b if model == "llama-1b" else "smollm2-135m"
    factor = max(1.0, seq / 8192) if model == "smollm2-135m" else 1.0
    return load_recipe(["recipe=smollm2-yarn-64k", f"model.name_or_path={name}", f"yarn.factor={factor}",
                        f"data.seq_len={seq}", "train.grad_accum=1", *overrides])


def gib(recipe, world: int = 1, zero: int = 0) -> dict:
    config = scaled_config(recipe.model, recipe.yarn)
    total, trainable = parameter_counts(recipe, config)
    return {k: v / GIB for k, v in memory_bytes(recipe, config, total, trainable, world, zero).items()}


def test_estimate_covers_measured_single_gpu_peaks(llama_1b):
    estimated = {}
    for model, seq, layers, measured in MEASURED:
        recipe = recipe_for(model, seq, llama_1b, "model.gradient_checkpointing=true",
                            f"model.checkpoint_layers={layers}", "train.loss_chunk_tokens=8192")
        estimated[model, seq, layers] = gib(recipe)["total"]
        assert 1.0 <= estimated[model, seq, layers] / measured <= 1.35, (model, seq, layers, estimated, measured)
    growth = (estimated["llama-1b", 262144, 0] - estimated["llama-1b", 65536, 0]) / (86.9 - 32.0)
    assert 0.95 <= growth <= 1.2


def test_long_sequence_terms_for_the_sp4_million_token_run(llama_1b):
    """Issue 19's 4-GPU shape: 1,048,576 tokens, sp_size=4 under ZeRO-2, full checkpointing, TiledMLP, offload."""
    alst = ["model.gradient_checkpointing=true", "model.tiled_mlp=true", "train.offload_activations=true",
            "train.sp_size=4", "train.loss_chunk_tokens=4096"]
    recipe = recipe_for("llama-1b", 1 << 20, llama_1b, *alst)
    tokens, hidden, inter, layers = (1 << 20) // 4, 2048, 8192, 16  # per rank
    memory = gib(recipe, world=4, zero=2)
    assert memory["host_offload"] * GIB == layers * tokens * hidden * 2  # bf16 layer inputs (DeepSpeed) on the host
    one_layer = tokens * 34 * hidden + hidden * 8 * inter  # TiledMLP: one shard of `hidden` tokens is live
    assert memory["activations"] * GIB == one_layer + hidden * 4 * inter + tokens * hidden * 2
    assert memory["loss"] * GIB == 3 * 4096 * 49152 * 4 + 2 * tokens * hidden * 2
    untiled = gib(recipe_for("llama-1b", 1 << 20, llama_1b, *alst, "model.tiled_mlp=false"), world=4, zero=2)
    assert (untiled["activations"] - memory["activations"]) * GIB == (tokens - hidden) * 12 * inter
    kept = gib(recipe_for("llama-1b", 1 << 20, llama_1b, *alst, "train.offload_activations=false"), world=4, zero=2)
    assert kept["host_offload"] == 0 and kept["activations"] - memory["activations"] == pytest.approx(
        memory["host_offload"])
    sp1 = gib(recipe_for("llama-1b", 1 << 20, llama_1b, *alst[:-2], "train.sp_size=1"), world=4, zero=2)
    assert sp1["host_offload"] == pytest.approx(4 * memory["host_offload"])  # each rank holds 1/sp_size of it
    report = estimate(recipe, scaled_config(recipe.model, recipe.yarn), world=4, zero=2)
    assert report["tokens_per_step"] == 1 << 20 and report["tokens_per_device_per_micro_batch"] == tokens


def test_residual_stream_is_fp32_under_autocast_and_bf16_under_deepspeed(llama_1b):
    recipe = recipe_for("llama-1b", 65536, llama_1b, "model.gradient_checkpointing=true")
    autocast, deepspeed = gib(recipe, world=1, zero=0), gib(recipe, world=1, zero=2)
    stash = 16 * 65536 * 2048 / GIB
    assert autocast["activations"] - deepspeed["activations"] == pytest.approx(2 * stash + 2 * 65536 * 2048 / GIB)


def test_dry_run_of_sequence_parallelism_needs_its_launch(llama_1b, monkeypatch):
    recipe = recipe_for("llama-1b", 131072, llama_1b, "train.sp_size=2")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    with pytest.raises(RecipeError, match="WORLD_SIZE=2 ACCELERATE_DEEPSPEED_ZERO_STAGE=2"):
        dry_run(recipe, world=1)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    report = dry_run(recipe, world=2)
    assert report["sp_size"] == 2 and report["tokens_per_step"] == 131072
    with pytest.raises(RecipeError, match="does not divide the model's 9 attention heads"):
        dry_run(recipe_for("smollm2-135m", 131072, llama_1b, "train.sp_size=2"), world=2)  # SmolLM2: 9 heads
