"""Back-of-envelope cost of a recipe before any weights load: parameters, memory per device, time per step.

FLOPs per token use the causal convention `6N + 6 * layers * heads * head_dim * seq_len` (training, attention
halved for the causal mask), time assumes `ASSUMED_MFU` of `train.peak_tflops`. Memory per device (`memory_bytes`)
counts model states (16 bytes per trained parameter for mixed-precision AdamW, divided by the ZeRO stage's
sharding; 18 under `train.mixed_precision=bf16-weights`: bf16 weights, float32 masters, master grads and Adam
moments), activations and the loss:

- each rank holds `micro_batch_size x seq_len / sp_size` tokens (Ulysses gives every rank the whole sequence for
  heads/sp_size heads inside attention: the same number of elements);
- the residual stream (a checkpointed layer's input, the final hidden states) is fp32 under accelerate's bf16
  autocast (fp32 master weights: fp32 + bf16 adds stay fp32) and bf16 under DeepSpeed or `bf16-weights`, which
  run a bf16 module;
- a layer keeps `34 * hidden` bytes per token outside its MLP (Korthikanti et al. 2022, bf16) and a gated MLP
  8 bytes per intermediate unit (gate, up, act, product); in backward the MLP adds ~2 more (its gradients);
  TiledMLP (`model.tiled_mlp`) runs the MLP over ceil(seq / hidden) shards, so only one shard's MLP is live;
- with gradient checkpointing: the checkpointed layers' inputs (on the host instead with
  `train.offload_activations`: reported as `host_offload`), plus one layer recomputed and back-propagated;
- the loss: one chunk's fp32 logits three times (`train.loss_chunk_tokens`) and the final hidden states with
  their gradient.

Checked against the peaks measured on one H200 (tests/test_recipe.py lists them). These are estimates to catch
impossible runs early (`train.memory_check`), not measurements: `metrics.jsonl` has the measured peak. A dry run
estimates the launch it runs under (WORLD_SIZE and ACCELERATE_DEEPSPEED_ZERO_STAGE, set by `accelerate launch`;
set them by hand to estimate another). Run: `python scripts/train.py recipe=yarn-64k --dry-run`.
Tested by `python -m pytest tests/test_recipe.py`.
"""

from __future__ import annotations

import os

import torch

from yarnkit import rope
from yarnkit.errors import MemoryBudgetError, RecipeError
from yarnkit.train.loop import check_precision
from yarnkit.train.model_setup import scaled_config
from yarnkit.train.recipe import check_context
from yarnkit.train.seq_parallel import check_sequence_parallel

ASSUMED_MFU = 0.4  # typical of published long-context fine-tuning runs (see docs/training.md)


def flops_per_token(n_params: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * n_params + 6.0 * layers * heads * head_dim * seq_len


def meta_model(config):
    """A weightless (meta) instance of `config`'s causal LM."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    with torch.device("meta"):  # the class itself, not from_config: that would start ZeRO-3 init under DeepSpeed
        return model_class(config)


def count_parameters(model) -> int:
    """Parameters of `model`, tied weights counted once."""
    return sum(param.numel() for param in {id(p): p for p in model.parameters()}.values())


def model_flops(config, seq_len: int) -> tuple[float, int]:
    """`(causal training FLOPs per token at seq_len, parameters)` of `config`'s model, without weights."""
    text = config.get_text_config()
    head_dim = rope.head_dim(text)
    total = count_parameters(meta_model(config))
    return flops_per_token(total, text.num_hidden_layers, text.num_attention_heads, head_dim, seq_len), total


def parameter_counts(recipe, config) -> tuple[int, int]:
    """`(total, trainable)` from a weightless (meta) instance of the scaled config."""
    model = meta_model(config)
    total = count_parameters(model)
    if not recipe.lora.enabled:
        return total, total
    trainable = sum(recipe.lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    trainable += sum(p.numel() for name, p in model.named_parameters()
                     if any(part in name for part in recipe.lora.trainable_extra))
    return total, trainable


def memory_bytes(recipe, config, total: int, trainable: int, world: int, zero: int) -> dict:
    """Bytes per device by part (see the module docstring); `host_offload` is pinned host memory per process."""
    text = config.get_text_config()
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len // max(recipe.train.sp_size, 1)
    hidden, layers, model = text.hidden_size, text.num_hidden_layers, recipe.model
    inter = getattr(text, "intermediate_size", 4 * hidden)
    shard = world if zero >= 1 else 1
    bf16_weights = recipe.train.mixed_precision == "bf16-weights"  # refused with LoRA and under DeepSpeed
    if recipe.lora.enabled:
        states = 4 * total + 16 * trainable  # frozen fp32 weights + the adapters' weights/grads/Adam
    elif zero >= 3:
        states = 16 * total / world
    elif zero == 2:
        states = 2 * total + 14 * total / shard  # bf16 weights replicated; grads, masters, Adam sharded
    elif bf16_weights:
        states = 18 * total  # bf16 weights + fp32 masters, master grads, Adam moments (bf16 grads die in backward)
    else:
        states = 16 * total  # fp32 weights + grads + Adam moments, replicated
    stream = 2 if bf16_weights or (zero > 0 and recipe.train.mixed_precision != "fp32") else 4  # residual stream
    mlp_tokens = min(tokens, hidden) if model.tiled_mlp else tokens  # TiledMLP: one shard of <= hidden tokens
    full_layer = tokens * 34 * hidden + mlp_tokens * 8 * inter  # what one layer keeps for its backward
    host = 0
    if model.gradient_checkpointing:
        kept = min(model.checkpoint_layers or layers, layers)  # checkpointed layers; the rest keep all
        inputs = kept * tokens * hidden * stream
        stash, host = (0, inputs) if recipe.train.offload_activations else (inputs, 0)
        if model.checkpoint_policy == "keep_attention":  # + each keeping layer's bf16 attention output
            stash += min(model.keep_attention_layers or kept, kept) * tokens * hidden * 2
        backward = full_layer + mlp_tokens * 4 * inter + tokens * hidden * stream  # MLP grads, the layer's grad
        activations = stash + (layers - kept) * full_layer + backward
    else:
        activations = layers * full_layer
    loss = 3 * min(recipe.train.loss_chunk_tokens, tokens) * text.vocab_size * 4 + 2 * tokens * hidden * stream
    return {"model_states": states, "activations": activations, "loss": loss,
            "total": states + activations + loss, "host_offload": host}


def estimate(recipe, config, world: int, zero: int) -> dict:
    text = config.get_text_config()
    total, trainable = parameter_counts(recipe, config)
    head_dim = rope.head_dim(text)
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
        "sp_size": recipe.train.sp_size, "tokens_per_device_per_micro_batch":
            recipe.train.micro_batch_size * recipe.data.seq_len // max(recipe.train.sp_size, 1),
        "memory_gib_per_device": {k: round(v / 2**30, 2) for k, v in memory.items()},
        "seconds_per_step": round(step_seconds, 3),
        "hours_total": round(step_seconds * recipe.train.max_steps / 3600, 3),
        "assumption": f"{ASSUMED_MFU:.0%} of {recipe.train.peak_tflops:g} TFLOPS per device",
    }


def check_memory(recipe, config, world: int, zero: int, device_bytes: int) -> None:
    total, trainable = parameter_counts(recipe, config)
    need = memory_bytes(recipe, config, total, trainable, world, zero)["total"]
    if need > device_bytes:
        raise MemoryBudgetError(
            f"estimated {need / 2**30:.1f} GiB per device > {device_bytes / 2**30:.1f} GiB available "
            f"(ZeRO stage {zero}, {world} processes, seq_len {recipe.data.seq_len}); use more GPUs, ZeRO-3 "
            f"(recipes/accelerate/zero3.yaml), model.gradient_checkpointing=true, lora.enabled=true or a "
            f"shorter data.seq_len; train.memory_check=false skips this check")


def dry_run(recipe, world: int) -> dict:
    """Estimate without loading weights (`zero` is read from the accelerate env when launched with one). The
    recipe is checked as the launch would check it, sequence parallelism included."""
    config = scaled_config(recipe.model, recipe.yarn)
    check_context(recipe, config)
    zero = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    check_precision(recipe.train, deepspeed=zero > 0)
    sp = recipe.train.sp_size
    if sp > 1 and (zero == 0 or world % sp):
        raise RecipeError(f"the dry run of train.sp_size={sp} needs the launch it estimates: run it under `accelerate "
                          f"launch --config_file recipes/accelerate/zero2.yaml --num_processes {sp} ...`, or "
                          f"set WORLD_SIZE={sp} ACCELERATE_DEEPSPEED_ZERO_STAGE=2 (what that launch sets)")
    check_sequence_parallel(sp, world, config.get_text_config(), recipe.data.seq_len,
                            recipe.model.attn_implementation, recipe.data.packing, zero > 0)
    return estimate(recipe, config, world, zero)
