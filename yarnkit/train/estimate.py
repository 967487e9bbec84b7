"""Back-of-envelope cost of a recipe before any weights load: parameters, memory per device, time per step.

FLOPs per token use the causal convention `6N + 6 * layers * heads * head_dim * seq_len` (training, attention
halved for the causal mask), time assumes `ASSUMED_MFU` of `train.peak_tflops`. Memory per device counts model
states (16 bytes per trained parameter for mixed-precision AdamW, divided by the ZeRO stage's sharding) plus
activations with or without gradient checkpointing and one loss chunk's logits. These are estimates to catch
impossible runs early (`train.memory_check`), not measurements: `metrics.jsonl` has the measured peak.
Run: `python scripts/train.py recipe=yarn-64k --dry-run`. Tested by `python -m pytest tests/test_recipe.py`.
"""

from __future__ import annotations

import os

import torch

from yarnkit.train.model import scaled_config
from yarnkit.train.recipe import check_context

ASSUMED_MFU = 0.4  # typical of published long-context fine-tuning runs (see docs/training.md)


def flops_per_token(n_params: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * n_params + 6.0 * layers * heads * head_dim * seq_len


def parameter_counts(recipe, config) -> tuple[int, int]:
    """`(total, trainable)` from a weightless (meta) instance of the scaled config."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    with torch.device("meta"):  # the class itself, not from_config: that would start ZeRO-3 init under DeepSpeed
        model = model_class(config)
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    if not recipe.lora.enabled:
        return total, total
    trainable = sum(recipe.lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    trainable += sum(p.numel() for name, p in model.named_parameters()
                     if any(part in name for part in recipe.lora.trainable_extra))
    return total, trainable


def memory_bytes(recipe, config, total: int, trainable: int, world: int, zero: int) -> dict:
    text = config.get_text_config()
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    hidden, layers = text.hidden_size, text.num_hidden_layers
    inter = getattr(text, "intermediate_size", 4 * hidden)
    shard = world if zero >= 1 else 1
    if recipe.lora.enabled:
        states = 4 * total + 16 * trainable  # frozen fp32 weights + the adapters' weights/grads/Adam
    elif zero >= 3:
        states = 16 * total / world
    elif zero == 2:
        states = 2 * total + 14 * total / shard  # bf16 weights replicated; grads, masters, Adam sharded
    else:
        states = 16 * total  # fp32 weights + grads + Adam moments, replicated
    tokens //= max(recipe.train.sp_size, 1)  # sequence parallelism: each rank holds seq_len / sp_size tokens
    full_layer = tokens * (34 * hidden + 6 * inter)  # one layer's stash without attention scores
    mlp_work = 3 * (tokens if not recipe.model.tiled_mlp else min(tokens, hidden)) * inter
    if recipe.model.gradient_checkpointing:
        kept = min(recipe.model.checkpoint_layers or layers, layers)  # checkpointed layers; the rest keep all
        stash = 0 if recipe.train.offload_activations else kept * tokens * hidden * 2
        activations = stash + (layers - kept) * full_layer + (16 * tokens * hidden + mlp_work) * 2
    else:
        activations = layers * full_layer
    logits = 3 * min(recipe.train.loss_chunk_tokens, tokens) * text.vocab_size * 4
    return {"model_states": states, "activations": activations, "loss_chunk": logits,
            "total": states + activations + logits}


def estimate(recipe, config, world: int, zero: int) -> dict:
    text = config.get_text_config()
    total, trainable = parameter_counts(recipe, config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = flops_per_token(total, text.num_hidden_layers, text.num_attention_heads, head_dim,
                                recipe.data.seq_len)
    tokens_per_device = (recipe.train.micro_batch_size * recipe.train.grad_accum * recipe.data.seq_len
                         // max(recipe.train.sp_size, 1))  # an SP group shares one sequence
    memory = memory_bytes(recipe, config, total, trainable, world, zero)
    step_seconds = per_token * tokens_per_device / (recipe.train.peak_tflops * 1e12 * ASSUMED_MFU)
    return {
        "parameters": total, "trainable_parameters": trainable, "processes": world, "zero_stage": zero,
        "context": config.max_position_embeddings, "rope_parameters": dict(text.rope_parameters or {}),
        "tokens_per_step": tokens_per_device * world,
        "flops_per_token": per_token,
        "memory_gib_per_device": {k: round(v / 2**30, 2) for k, v in memory.items()},
        "seconds_per_step": round(step_seconds, 3),
        "hours_total": round(step_seconds * recipe.train.max_steps / 3600, 3),
        "assumption": f"{ASSUMED_MFU:.0%} of {recipe.train.peak_tflops:g} TFLOPS per device",
    }


def check_memory(recipe, config, world: int, zero: int, device_bytes: int) -> None:
    total, trainable = parameter_counts(recipe, config)
    need = memory_bytes(recipe, config, total, trainable, world, zero)["total"]
    if need > device_bytes:
        raise MemoryError(
            f"estimated {need / 2**30:.1f} GiB per device > {device_bytes / 2**30:.1f} GiB available "
            f"(ZeRO stage {zero}, {world} processes, seq_len {recipe.data.seq_len}); use more GPUs, ZeRO-3 "
            f"(recipes/accelerate/zero3.yaml), model.gradient_checkpointing=true, lora.enabled=true or a shorter "
            f"data.seq_len; train.memory_check=false skips this check")


def dry_run(recipe, world: int) -> dict:
    """Estimate without loading weights (`zero` is read from the accelerate env when launched with one)."""
    config = scaled_config(recipe.model, recipe.yarn)
    check_context(recipe, config)
    zero = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    return estimate(recipe, config, world, zero)
