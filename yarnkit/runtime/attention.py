"""Decode attention for the static pool's step: one query row per session against its cache row.

What it is: the `--decode-attention` choice of the pooled decode paths (`StreamOptions.decode_attention`).
transformers dispatches every attention layer through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
and hands the function the rotated `query [B, heads, n, D]`, the cache's `key`/`value [B, kv_heads, S, D]` and
the 4-D additive slot mask `[B, 1, n, S]` that `SlotPool.forward_rows` built (a 4-D mask passes transformers'
mask builders unchanged). `install(model)` switches a model that runs `sdpa` to `yarnkit_decode`, registered
once in `AttentionInterface`, whose function is SDPA itself unless the forward names a kernel
(`DecodeKernelArgument`: only the pool's forward does, so every other caller of the model gets SDPA, bit for bit):

- `sdpa`: torch's SDPA with the additive mask; for one query row of a GQA model the query heads that share a
  K/V head are packed as that head's query rows (`[B, kv_heads, groups, D]`, `packed_sdpa`), so K/V are read as
  cached instead of copied `groups` times per layer (transformers' `repeat_kv`: 60 copy kernels of a 30-layer
  step, 15% of a one-session step's GPU time and 35% of an 8-session one, H100 profile 2026-12-07; transformers
  packs the same way from 5.2x, outside torch.compile only);
- `split`: plain torch, for a single query row (flash-decoding's split over keys): the query is viewed as
  `[B, kv_heads, groups, D]` (GQA without repeating K/V), scores and softmax in float32 over the row's slots
  with the additive mask, then `probs @ V` in chunks of `KEY_CHUNK` slots (one small GEMM per chunk, so a GPU
  spreads one row over many blocks) summed in float32. The softmax is global, so the chunks need no
  log-sum-exp rescaling. Static shapes, no host sync: it runs inside a CUDA graph and under torch.compile. The
  pool pads its slot count to a multiple of `KEY_CHUNK` for it (padded slots are masked, never written);
- `flex`: `torch.nn.attention.flex_attention` with the mask as a score mod (`score + mask[b, 0, q, k]`, no block
  mask: every slot is visited, like SDPA) and `enable_gqa`; compiled on CUDA (its decoding kernel splits the
  keys), eager elsewhere (a reference that materialises scores: CPU tests only).

Prefill chunks (n > 1 query rows) run SDPA on every choice.

Test: `python -m pytest tests/test_runtime_static.py tests/test_runtime_batch.py -q -k attention`.
"""

from __future__ import annotations

import functools

import torch

IMPLEMENTATION = "yarnkit_decode"
KERNELS = ("sdpa", "split", "flex")
KERNEL_ARGUMENT = "yarnkit_decode_kernel"  # the forward keyword that reaches the attention function
KEY_CHUNK = 128                            # split: slots per chunk of the probs @ V product


def slot_count(window: int, kernel: str) -> int:
    """Slots of a pool row for `kernel`: the window plus the scratch slot, rounded up to whole key chunks for
    `split`."""
    slots = window + 1
    if kernel == "split":
        return -(-slots // KEY_CHUNK) * KEY_CHUNK
    return slots


def register() -> None:
    """Register `yarnkit_decode` with transformers (idempotent): the attention function and SDPA's mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, decode_attention)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def runs_sdpa(model) -> bool:
    """Whether `model` runs SDPA attention (or already this module's), the one `install` can replace."""
    return model.config.get_text_config()._attn_implementation in ("sdpa", IMPLEMENTATION)


def install(model) -> None:
    """Let `model`'s forwards choose a decode kernel: `sdpa` -> `yarnkit_decode` (SDPA unless a kernel is named).
    Any other attention (STRING, eager) is left alone and refused (`options.resolve_decode_attention` says why
    in one line before a pool is built)."""
    running = model.config.get_text_config()._attn_implementation
    if running == IMPLEMENTATION:
        return
    if running != "sdpa":
        raise ValueError(f"a decode attention kernel replaces SDPA; this model runs {running!r} attention")
    register()
    model.set_attn_implementation(IMPLEMENTATION)


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: `split` / `flex` for one query row when the forward names it, else SDPA.
    Returns `([B, n, heads, D], None)` like every attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kernel = kwargs.pop(KERNEL_ARGUMENT, None)
    grouped = query.shape[1] != key.shape[1]  # sdpa packs only grouped heads; one K/V head per query head is as is
    if kernel is None or query.shape[2] != 1 or dropout or (kernel == "sdpa" and not grouped):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kernel == "sdpa":
        out = packed_sdpa(query, key, value, attention_mask, scaling)
    elif kernel == "split":
        out = split_attention(query, key, value, attention_mask, scaling)
    elif kernel == "flex":
        out = flex_attention(query, key, value, attention_mask, scaling)
    else:
        raise ValueError(f"decode attention kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    return out.transpose(1, 2).contiguous(), None


def packed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scaling: float) -> torch.Tensor:
    """SDPA of ONE query row per head with grouped K/V read in place: `query [B, heads, 1, D]` viewed as
    `[B, kv_heads, groups, D]` (head h reads K/V head h // groups, as `repeat_kv` pairs them), `key`/`value
    [B, kv_heads, S, D]`, additive `mask [B, 1, 1, S]` (it broadcasts over the packed rows) -> `[B, heads, 1, D]`."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim)


def split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, chunk: int = KEY_CHUNK) -> torch.Tensor:
    """Attention of ONE query row: `query [B, heads, 1, D]`, `key`/`value [B, kv_heads, S, D]`, additive `mask`
    broadcastable to `[B, 1, 1, S]` -> `[B, heads, 1, D]` in the query's dtype. Float32 scores, softmax and
    sums; `probs @ V` over key chunks of `chunk` slots when S is a multiple of it (else one product)."""
    batch, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    q = query.reshape(batch * kv_heads, groups, dim)                        # head h reads kv head h // groups
    scores = float32_bmm(q, key.reshape(batch * kv_heads, slots, dim).transpose(1, 2))
    scores = scores.view(batch, kv_heads, groups, slots) * scaling
    if mask is not None:
        scores = scores + mask.reshape(mask.shape[0], 1, 1, slots).float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)  # like flash kernels: P in the value dtype for P @ V
    chunks = slots // chunk if slots % chunk == 0 and slots > chunk else 1
    width = slots // chunks
    probs = probs.view(batch, kv_heads, groups, chunks, width).transpose(2, 3)   # [B, kv, chunks, groups, width]
    parts = float32_bmm(probs.reshape(batch * kv_heads * chunks, groups, width),
                        value.reshape(batch * kv_heads * chunks, width, dim))     # a view: slots split into chunks
    out = parts.view(batch, kv_heads, chunks, groups, dim).sum(dim=2)
    return out.reshape(batch, heads, 1, dim).to(query.dtype)


def float32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` with a float32 result: half-precision inputs keep their dtype on CUDA (cuBLAS accumulates in
    float32 and writes float32, `out_dtype`), and are widened first elsewhere."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
    """FlexAttention of the query rows with the additive `mask [B, 1, n, S]` as a score mod -> `[B, heads, n, D]`."""
    if mask is None:
        score_mod = None
    else:
        mask = mask.expand(query.shape[0], 1, query.shape[2], key.shape[2])

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + mask[b, 0, q_idx, kv_idx]

    return flex_function(query.is_cuda)(query, key, value, score_mod=score_mod, scale=scaling,
                                        enable_gqa=query.shape[1] != key.shape[1])


@functools.cache
def flex_function(cuda: bool):
    """FlexAttention compiled once (CUDA: the fused kernel, decoding path for short queries), or eager."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False) if cuda else flex
