"""`SinkCache`: a transformers `Cache` that keeps attention-sink tokens plus a rolling window of recent tokens.

    cache = SinkCache(model_rotary(model), sinks=4, window=1024, evict_batch=64)
    cache.evict_for_space(incoming)      # before each forward: drop old tokens so `incoming` more fit

What it is: a small object that holds per-layer key/value tensors `[batch, kv_heads, length, head_dim]` and can
drop tokens. Like streaming-llm's `StartRecentKVCache(start_size, recent_size)` it is given its sizes: `sinks`
first tokens that are never dropped and a `window` that counts the whole cache (so recent = window - sinks);
`evict_for_space` (the rule `StartRecent`, shared with the static pool's rows) keeps those and the most recent
tokens, dropping at least `evict_batch` at a time. It knows nothing about the model beyond those tensors and one
callable, `rotary(positions) -> (cos, sin)`, that must return a *pure* rotation (the model's own rotary
frequencies, attention factor removed); `model_rotary(model)` builds it from the model's patched rotary module.
What it is not: a generator, a tokenizer or a chat loop (see `engine.py`).

Design (see docs/runtime.md): positions are counted inside the cache (StreamingLLM §3.2), so the token in slot
`i` sits at position `i`. Keys are stored *after* rotation, exactly as the stock attention forward writes them,
which keeps stock SDPA/FlashAttention kernels usable and needs no patched forward. When tokens are dropped, each
kept token moves from slot `old` to slot `new < old` and its key is rotated back by `old - new`:

    R(p) k * a  --rotate by -(d)-->  R(p - d) k * a

This is a pure rotation: cos/sin of the delta WITHOUT the attention factor `a` (YaRN's mscale), otherwise `a`
would be applied twice. Partial rotary (Phi-3, NeoX) rotates only the first `cos.shape[-1]` channels. The
rotation is done in float32 and dropping happens in batches (`engine.py` evicts `evict_batch` tokens at a
time), so a token is re-rotated at most about `window / evict_batch` times in its life (bounded rounding).

Test: `python -m pytest tests/test_runtime_cache.py -q`.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from yarnkit.patch import rotary_module

Rotary = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE pairing used by transformers: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_back(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `keys [b, h, n, d]` by MINUS the angles whose pure cos/sin `[n, r]` are given (r <= d: partial rotary).

    Computed in float32 and cast back to the keys' dtype; channels past `r` pass through unchanged.
    """
    rot_dim = cos.shape[-1]
    k = keys.float()
    k_rot, k_pass = k[..., :rot_dim], k[..., rot_dim:]
    cos, sin = cos.float()[None, None], sin.float()[None, None]
    turned = k_rot * cos - rotate_half(k_rot) * sin
    return torch.cat((turned, k_pass), dim=-1).to(keys.dtype)




def model_rotary(model) -> Rotary:
    """A pure-rotation callable from the model's own rotary module: cos/sin divided by its attention factor.

    The module's forward multiplies cos/sin by `attention_scaling` (YaRN's mscale); re-rotating a stored key must
    not apply that factor again, so it is divided out here. Frequencies (YaRN-interpolated) are the module's own.
    """
    module = rotary_module(model)

    def rotary(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.zeros(1, dtype=torch.float32, device=module.inv_freq.device)
        cos, sin = module(probe, positions.to(module.inv_freq.device)[None])
        scale = float(module.attention_scaling)
        return cos[0] / scale, sin[0] / scale

    return rotary


class StartRecent:
    """The eviction rule of a sink cache: keep the first `sinks` slots and the most recent ones within `window`.

    A subclass sets `sinks`, `window` and `evict_batch` and provides `get_seq_length()` and `keep(indices)`.
    """

    sinks: int
    window: int
    evict_batch: int

    def evict_for_space(self, incoming: int, protected: int = 0, scores: torch.Tensor | None = None,
                        retain: int = 0) -> torch.Tensor | None:
        """Drop tokens so that `incoming` more fit in the window; returns the kept slot indices (None: nothing
        dropped). `protected` extends the sinks (a pinned system prompt); with `scores` (one per slot), `retain`
        older slots with the highest scores are kept too (SirLLM)."""
        length = self.get_seq_length()
        need = length + incoming - self.window
        if need <= 0:
            return None
        protected = min(max(self.sinks, protected), length)
        drop = min(max(need, self.evict_batch), length - protected)
        if drop < need:
            raise ValueError(f"a chunk of {incoming} tokens does not fit next to {protected} protected tokens "
                             f"in a cache of {self.window}")
        keep = start_recent_slots(length, length - drop, protected, scores, retain)
        self.keep(keep)
        return keep


def start_recent_slots(length: int, keep_total: int, protected: int, scores: torch.Tensor | None = None,
                       retain: int = 0) -> torch.Tensor:
    """`keep_total` sorted slots of `length`: the `protected` prefix, then up to `retain` older slots with the
    highest `scores`, then the most recent ones."""
    budget = keep_total - protected
    retain = min(retain, budget) if scores is not None else 0
    recent = budget - retain
    older = torch.arange(protected, length - recent)
    chosen = older[scores[older].topk(retain).indices] if retain else older[:0]
    keep = torch.cat((torch.arange(protected), chosen, torch.arange(length - recent, length)))
    return keep.sort().values


class SinkCache(StartRecent, Cache):
    """Per-layer K/V with cache-relative positions; `keep(indices)` drops every other token and re-rotates.

    The cache never evicts inside `update` (a forward is never cut in half): the engine calls `evict_for_space`
    *before* each chunk so that the tokens held plus the chunk fit in the window.
    """

    def __init__(self, rotary: Rotary, sinks: int, window: int, evict_batch: int = 1):
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.rotary = rotary
        self.sinks, self.window, self.evict_batch = sinks, window, evict_batch
        self.rerotations = 0  # how many batched re-rotations happened (for stats and benchmarks)

    def clear(self) -> None:
        """Forget every token (the next forward starts an empty cache)."""
        self.layers = []
        self.rerotations = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the tokens at sorted slot `indices`; each moves to slot `j` and is rotated back by `old - j`."""
        length = self.get_seq_length()
        if length == 0:
            return
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() > 1 and (indices.diff() <= 0).any():
            raise ValueError("keep(indices) needs strictly increasing slot indices")
        if indices.numel() and (indices[0] < 0 or indices[-1] >= length):
            raise ValueError(f"keep(indices): indices must lie in [0, {length})")
        if indices.numel() == length:
            return
        deltas = indices - torch.arange(indices.numel())
        moved = deltas > 0
        cos = sin = None
        if moved.any():
            cos, sin = self.rotary(deltas[moved])
            self.rerotations += 1
        for layer in self.layers:
            if not layer.is_initialized or layer.keys.numel() == 0:
                continue
            device = layer.keys.device
            keys = layer.keys.index_select(-2, indices.to(device))
            layer.values = layer.values.index_select(-2, indices.to(device))
            if cos is not None:
                slots = moved.nonzero().squeeze(-1).to(device)
                keys[..., slots, :] = rotate_back(keys[..., slots, :], cos.to(device), sin.to(device))
            layer.keys = keys
