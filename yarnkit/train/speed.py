"""Speed and memory knobs for long-sequence training: attention backend, SDPA kernel, compiled decoder layers,
DeepSpeed ALST's TiledMLP and activation-checkpoint offload.

- `check_attention(attn, sdpa_kernel)`: the backend is one transformers knows and is installed, else a
  `RecipeError` naming the package to install (flash-attn is optional: `pip install flash-attn` /
  `flash-attn-3` / `flash-attn-4`).
- `use_sdpa_kernel("cudnn" | "flash" | "efficient" | "math")`: re-registers transformers' `sdpa` attention with a
  function that calls `F.scaled_dot_product_attention` under `torch.nn.attention.sdpa_kernel` with that kernel
  first (the others stay as fall-backs). cuDNN gets grouped-query K/V expanded to all heads (its kernel does not
  take `enable_gqa`). Process-global, like every transformers attention registration; "auto" leaves torch's
  own choice. DeepSpeed Ulysses wraps whatever `sdpa` is registered when it is set up, so this composes with SP.
- `compile_layers(model)`: `torch.compile` each decoder layer in place (regional compilation).
- `tile_mlps(model)`: each Llama-style MLP (gate/up/down projections) runs through `deepspeed`'s `TiledMLP`
  over `ceil(seq / hidden)` sequence shards: intermediate activations of one shard at a time, forward
  recomputed in backward.
- `activation_offload()`: DeepSpeed's context that moves checkpointed layer inputs to pinned CPU memory
  during forward and back in backward (needs gradient checkpointing).

Not the training loop (yarnkit.train.trainer). Tested on CPU by `python -m pytest tests/test_speed.py`.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn.functional as F

from yarnkit.train.errors import RecipeError

ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
SDPA_KERNELS = ("auto", "cudnn", "flash", "efficient", "math")
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


def _backend_order(kernel: str) -> list:
    from torch.nn.attention import SDPBackend

    named = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [named[kernel]] + [backend for name, backend in named.items() if name != kernel]


def kernel_sdpa(kernel: str):
    """An attention function for transformers' interface: causal SDPA with `kernel` tried first."""
    from torch.nn.attention import sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    order = _backend_order(kernel)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        plain = (attention_mask is None and causal and query.shape[2] > 1 and not kwargs.get("sliding_window")
                 and kwargs.get("softcap") is None and kwargs.get("position_bias") is None)
        with sdpa_kernel(order, set_priority=True):
            if not plain:  # masks, decoding, windows: transformers' own path, same kernel preference
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
            groups = query.shape[1] // key.shape[1]
            extra = {}
            if groups > 1 and kernel == "cudnn":
                key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            elif groups > 1:
                extra["enable_gqa"] = True
            if query.is_cuda and not checked and not torch.compiler.is_compiling():
                checked.append(_report_kernel(kernel, order[0], query, key, value, dropout, scaling, extra))
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout,
                                                 scale=scaling, is_causal=True, **extra)
        return out.transpose(1, 2).contiguous(), None

    checked = []  # the first CUDA call says (in the log) whether the asked-for kernel takes these inputs
    attention.yarnkit_kernel = kernel
    return attention


def _report_kernel(kernel: str, backend, query, key, value, dropout, scaling, extra) -> bool:
    from torch.nn.attention import sdpa_kernel

    try:
        with torch.no_grad(), sdpa_kernel([backend]):  # only this kernel: torch raises if it cannot run
            F.scaled_dot_product_attention(query[:, :, :128], key[:, :, :128], value[:, :, :128], dropout_p=dropout,
                                           scale=scaling, is_causal=True, **extra)
    except RuntimeError as err:
        print(f"yarnkit: SDPA kernel {kernel} cannot run these inputs ({str(err).splitlines()[0][:200]}); "
              f"torch uses the next of cudnn/flash/efficient/math", flush=True)
        return False
    print(f"yarnkit: SDPA kernel {kernel} runs (q {tuple(query.shape)} {query.dtype}, kv heads {key.shape[1]})",
          flush=True)
    return True


def use_sdpa_kernel(kernel: str) -> None:
    """Make transformers' `sdpa` attention prefer `kernel` ("auto" restores transformers' own function)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("sdpa", sdpa_attention_forward if kernel == "auto" else kernel_sdpa(kernel))


def compile_layers(model) -> int:
    """`torch.compile` every decoder layer in place; returns how many were compiled."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = lm.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


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
