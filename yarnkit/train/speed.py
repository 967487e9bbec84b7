"""Speed and memory knobs for long-sequence training: attention backend, SDPA kernel, Liger-Kernel's fused
RMSNorm/SwiGLU/RoPE, compiled decoder layers, selective activation checkpointing, DeepSpeed ALST's TiledMLP and
activation-checkpoint offload.

- `check_attention(attn, sdpa_kernel)`: the backend is one transformers knows and is installed, else a
  `RecipeError` naming the package to install (flash-attn is optional: `pip install flash-attn` /
  `flash-attn-3` / `flash-attn-4`). `check_speed_keys(model, train, optim)`: every speed key's value is known.
- `model.sdpa_kernel` is applied by `yarnkit.sdpa.use_sdpa_kernel` (shared with evaluation).
- `resolve_choice(key, asked, missing, ...)`: `auto` takes a fused path when it can run here and otherwise says
  in one line what runs instead; an explicit request that cannot run is a `RecipeError` naming the fix.
  `liger_missing()` / `compile_missing()` say why Liger-Kernel / `torch.compile` cannot run (None: they can).
- `apply_liger(model)`: Liger-Kernel's RMSNorm, SwiGLU MLP and RoPE on a transformers model instance (Triton:
  CUDA only). The loss side (fused linear cross-entropy) is `yarnkit.train.loss`.
- `compile_layers(model)`: `torch.compile` each decoder layer in place (regional compilation).
- `full_checkpointing(model)`: non-reentrant checkpointing of every decoder layer through transformers'
  `activation_checkpointing_enable` (5.25+), or `gradient_checkpointing_enable` where that is the only name (5.17).
- `keep_attention_checkpointing(model, layers, keep)`: non-reentrant checkpointing of each decoder layer whose
  selective policy saves the SDPA kernel's outputs (attention output + log-sum-exp, so the attention forward is
  never recomputed) and recomputes the rest (norms, projections, RoPE, MLP) in backward.
- `tile_mlps(model)`: each Llama-style MLP (gate/up/down projections) runs through `deepspeed`'s `TiledMLP`
  over `ceil(seq / hidden)` sequence shards: intermediate activations of one shard at a time, forward
  recomputed in backward.
- `activation_offload()`: DeepSpeed's context that moves checkpointed layer inputs to pinned CPU memory
  during forward and back in backward (needs gradient checkpointing).

Not the training loop (yarnkit.train.trainer). Tested on CPU by `python -m pytest tests/test_speed.py`; the Liger
path's numerics on a GPU by `python -m pytest -m gpu tests/test_speed_gpu.py`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import types

import torch

from yarnkit.errors import RecipeError
from yarnkit.sdpa import SDPA_KERNELS

ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
CHOICES = {"kernels": ("auto", "liger", "torch"), "compile_layers": ("auto", "true", "false"),
           "checkpoint_policy": ("full", "keep_attention"), "loss_impl": ("auto", "liger", "chunked"),
           "fused": ("auto", "true", "false")}
FLASH_PACKAGES = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn-3 (Hopper build of flash-attn)",
                  "flash_attention_4": "flash-attn-4"}


def check_attention(attn: str, sdpa_kernel: str = "auto") -> None:
    """Raise a RecipeError if `attn` is unknown or its package is missing, or `sdpa_kernel` does not apply."""
    if attn not in ATTENTION:
        raise RecipeError(f"model.attn_implementation={attn!r} is unknown; choose one of {', '.join(ATTENTION)}")
    if sdpa_kernel not in SDPA_KERNELS:
        raise RecipeError(f"model.sdpa_kernel={sdpa_kernel!r} is unknown; choose one of {', '.join(SDPA_KERNELS)}")
    if sdpa_kernel != "auto" and attn != "sdpa":
        raise RecipeError(f"model.sdpa_kernel={sdpa_kernel} only applies to attn_implementation=sdpa "
                            f"(got {attn}); set model.sdpa_kernel=auto or model.attn_implementation=sdpa")
    if attn in FLASH_PACKAGES:
        from transformers.utils import import_utils

        available = getattr(import_utils, f"is_{attn.replace('attention', 'attn')}_available", None)
        if available is None or not available():  # an older transformers may not know the variant at all
            raise RecipeError(f"model.attn_implementation={attn} needs the {FLASH_PACKAGES[attn]} package on a "
                                f"CUDA machine, which is not installed here; install it or use "
                                f"model.attn_implementation=sdpa model.sdpa_kernel=cudnn (or flex_attention)")
    if attn == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            raise RecipeError("model.attn_implementation=flex_attention needs torch >= 2.5; use sdpa")


def check_speed_keys(model, train, optim) -> None:
    """Normalise (a YAML `true` arrives as "True") and check the speed keys of the model/train/optim sections."""
    for section, key in ((model, "kernels"), (model, "compile_layers"), (model, "checkpoint_policy"),
                         (train, "loss_impl"), (optim, "fused")):
        value = str(getattr(section, key)).lower()
        setattr(section, key, value)
        if value not in CHOICES[key]:
            name = {id(model): "model", id(train): "train", id(optim): "optim"}[id(section)]
            raise RecipeError(f"{name}.{key}={value!r} is unknown; choose one of {', '.join(CHOICES[key])}")
    if model.checkpoint_policy != "full" and not model.gradient_checkpointing:
        raise RecipeError(f"model.checkpoint_policy={model.checkpoint_policy} chooses what checkpointing keeps; set "
                          f"model.gradient_checkpointing=true or model.checkpoint_policy=full")
    if model.keep_attention_layers < 0:
        raise RecipeError(f"model.keep_attention_layers={model.keep_attention_layers}; use 0 (all) or a count")
    if train.offload_activations and model.checkpoint_policy != "full":
        raise RecipeError("train.offload_activations works with model.checkpoint_policy=full only; set one of them "
                          "back (offload=false keeps attention outputs on the GPU)")


def resolve_choice(key: str, asked: str, missing: str | None, fused: str, plain: str) -> bool:
    """True if the fused path runs. `asked` is auto|true|<fused name>|false|<plain name>; `missing` is why the fused
    path cannot run here (None: it can). auto falls back with one line; an explicit request fails with the fix."""
    asked = str(asked).lower()
    if asked in ("false", plain):
        return False
    if missing is None:
        return True
    if asked == "auto":
        print(f"yarnkit: {key}=auto: {missing}; {plain} runs instead", flush=True)
        return False
    raise RecipeError(f"{key}={asked} cannot run here: {missing}; fix that, or set {key}=auto to fall back to "
                      f"{plain}")


def liger_missing(model=None) -> str | None:
    """Why Liger-Kernel cannot run here (None: it can): no CUDA, not installed, or `model`'s type unsupported."""
    if not torch.cuda.is_available():
        return "Liger-Kernel's Triton kernels need a CUDA GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'yarnkit[liger]')"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as err:  # a broken install (e.g. no triton) must not stop training  # noqa: BLE001
        return f"liger-kernel does not import ({str(err).splitlines()[0][:160]})"
    model_type = getattr(getattr(model, "config", None), "model_type", None) if model is not None else None
    if model is not None and model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger-Kernel has no kernels for model type {model_type!r}"
    return None


def apply_liger(model) -> None:
    """Liger-Kernel's RMSNorm, SwiGLU and RoPE on `model` (a transformers model, before any peft wrapping).
    Like Liger itself this also swaps the modeling module's classes/RoPE function for models built later."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    MODEL_TYPE_TO_APPLY_LIGER_FN[model.config.model_type](model=model, rope=True, rms_norm=True, swiglu=True,
                                                          cross_entropy=False, fused_linear_cross_entropy=False)


def compile_missing(device: str) -> str | None:
    """Why `torch.compile` (Inductor) cannot compile for `device` here (None: it can)."""
    if not str(device).startswith("cuda"):
        return "compiled layers are used on CUDA only (on CPU the compile time outweighs the gain)"
    from torch.utils._triton import has_triton

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported by this Python/torch build"
    if not has_triton():
        return "Inductor needs triton for this GPU, which is not installed or does not support it"
    return None


def compile_layers(model) -> int:
    """`torch.compile` every decoder layer in place; returns how many were compiled."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = lm.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


@functools.cache
def _attention_ops() -> frozenset:
    names = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = {getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name)}
    flash_attn = getattr(torch.ops, "flash_attn", None)  # flash-attn's custom ops, when that package is loaded
    for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        if flash_attn is not None and hasattr(flash_attn, name):
            ops.add(getattr(flash_attn, name).default)
    return frozenset(ops)


def _keep_attention_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    # no_grad calls (the kernel probe of kernel_sdpa) are not backward inputs: never cache them
    if op in _attention_ops() and torch.is_grad_enabled():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward(self, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn

    if not (self.training and torch.is_grad_enabled()):
        return self._yarnkit_forward(*args, **kwargs)
    context = (functools.partial(create_selective_checkpoint_contexts, _keep_attention_policy)
               if self._yarnkit_keep_attention else noop_context_fn)
    for name in ("cache", "past_key_values", "past_key_value"):  # a cache updated twice would differ in backward
        if kwargs.get(name) is not None:
            kwargs[name] = None
    return checkpoint(self._yarnkit_forward, *args, use_reentrant=False, context_fn=context, **kwargs)


def full_checkpointing(model) -> None:
    """Recompute every decoder layer in backward (non-reentrant), under the name this transformers version takes:
    `gradient_checkpointing_enable` warns that v6 removes it in favour of `activation_checkpointing_enable`."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def keep_attention_checkpointing(model, layers: int = 0, keep: int = 0) -> int:
    """Checkpoint the first `layers` decoder layers (0 = all); the first `keep` of them (0 = all) save their SDPA
    outputs and recompute only the rest in backward, the others recompute everything. Returns how many keep.
    Call before `compile_layers`: the compiled region then holds the checkpoint and Inductor applies the policy."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpointed = lm.get_decoder().layers[:layers or None]
    keep = len(checkpointed) if keep == 0 else min(keep, len(checkpointed))
    for index, layer in enumerate(checkpointed):
        layer._yarnkit_forward, layer._yarnkit_keep_attention = layer.forward, index < keep
        layer.forward = types.MethodType(_checkpointed_forward, layer)
    return keep


def _tiled_forward(self, x):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = max(1, math.ceil(x.shape[-2] / x.shape[-1]))  # same on every rank: sequences have a fixed length
    params = [p for proj in (self.gate_proj, self.up_proj, self.down_proj) for p in proj.parameters()]
    return TiledMLP.apply(_mlp, self, x, shards, params)


def _mlp(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def tile_mlps(model) -> int:
    """Run each gated MLP (gate_proj/up_proj/down_proj/act_fn) through DeepSpeed's TiledMLP; returns the count."""
    patched = 0
    for module in model.modules():
        if all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = types.MethodType(_tiled_forward, module)
            patched += 1
    if not patched:
        raise RecipeError("model.tiled_mlp=true found no gated MLP (gate_proj/up_proj/down_proj) to tile in "
                            f"{type(model).__name__}; set model.tiled_mlp=false")
    return patched


def activation_offload(enabled: bool):
    """Context for forward + backward: checkpointed layer inputs live in pinned CPU memory in between. Re-enter
    the same instance every micro-step (its pinned buffer pool is kept)."""
    if not enabled:
        return contextlib.nullcontext()
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )

    return get_checkpoint_hidden_states_offloading_ctx_manager(use_pin_memory=torch.cuda.is_available(),
                                                               use_streams=torch.cuda.is_available())
