"""The two decoders behind a `StreamingEngine`, one interface: eager (a growing `SinkCache`) and pooled static.

Both expose `cache` (with `evict_for_space(incoming, ...)`, `keep(indices)`, `get_seq_length()`,
`layers[i].keys/values`, `rerotations`, `nbytes()`), `forward(ids [1, n], logits_to_keep) -> float32 logits`,
`reset()`, `release()`, `consistent(n)`, `path` and `fallback_reason`. The engine calls only these, so it has one
code path; which decoder runs is `decode=` (eager | static | graph | auto). `PoolDecoder` additionally lets
sessions that share a `SlotPool` decode together in one batched step (`StreamingEngine.decode_together`).

Test: `python -m pytest tests/test_runtime_static.py tests/test_runtime_cache.py -q`.
"""

from __future__ import annotations

import torch

from yarnkit.models import cache_kwargs
from yarnkit.runtime import fused
from yarnkit.runtime.cache import Rotary, SinkCache
from yarnkit.runtime.head import float32_head, forward_logits
from yarnkit.runtime.static import SlotPool


class EagerDecoder:
    """The stock forward over a `SinkCache` that grows up to its window (any model with RoPE), given resolved
    `StreamOptions`."""

    path = "eager"
    fallback_reason = None
    pool = None

    def __init__(self, model, rotary: Rotary, options):
        if options.fuse:  # `true` on the eager path (auto is off here)
            fused.fuse(model)
        self.model, self.rotary = model, rotary
        self.device = next(model.parameters()).device
        self.cache = SinkCache(rotary, options.sinks, options.window, options.evict_batch)
        self.head = float32_head(model, options.float32_logits)  # as the pooled step's (head.py)

    def reset(self) -> None:
        self.cache.clear()

    def release(self) -> None:
        self.cache.clear()

    def forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        return forward_logits(self.model, self.head, logits_to_keep, input_ids=ids.to(self.device), use_cache=True,
                              **cache_kwargs(self.cache))

    def consistent(self, tokens: int) -> bool:
        """False after a forward was interrupted half-way (some layers hold a chunk the others do not)."""
        lengths = {layer.keys.shape[-2] for layer in self.cache.layers if layer.is_initialized}
        layers = len(self.cache.layers)
        return lengths <= {tokens} and layers in (0, self.model.config.num_hidden_layers)


class PoolDecoder:
    """One row of a `SlotPool`: prefill chunks eagerly, single tokens through the pool's (graph) decode step.

    The row's length only advances once a forward completed, so an interrupted forward leaves it consistent.
    """

    def __init__(self, pool: SlotPool):
        self.pool = pool
        self.cache = pool.acquire()

    @property
    def path(self) -> str:
        return "graph" if self.pool.use_graph else "static"

    @property
    def fallback_reason(self) -> str | None:
        return self.pool.fallback_reason

    def reset(self) -> None:
        self.cache.clear()

    def release(self) -> None:
        self.pool.release(self.cache)

    def forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        if ids.shape[1] == 1:
            return self.pool.decode([self.cache], [int(ids[0, 0])])[None]
        return self.pool.prefill(self.cache, ids, logits_to_keep)

    def consistent(self, tokens: int) -> bool:
        return self.cache.length == tokens
