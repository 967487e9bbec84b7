"""One session's row of a `SlotPool` (`static.py`): its filled length, its per-layer views, eviction in place.

`RowCache` is the cache object a `StreamingEngine` holds on the fast path: the row's length is a host int, and
`layers[i]` (`RowSlots`) views layer i's filled slots `[1, kv_heads, length, head_dim]` of the pool's buffers.
Eviction (`RowCache.keep(indices)`) runs outside the decode step, in place, on the session's row: kept slot indices
are strictly increasing, so the tokens that move form a suffix; that suffix of all layers is gathered with one
`index_select`, rotated back by each token's delta (pure rotation, float32, like `cache.SinkCache`) and copied to
the front of the same row. Re-rotation happens only on eviction. Eviction plans (`MovePlan`) are memoised; in graph
mode a plan that repeats is captured at its second run and replayed afterwards.

Test: `python -m pytest tests/test_runtime_static.py -q` (CPU; graphs need CUDA: tests/test_runtime_gpu.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
import torch

from yarnkit.errors import one_line
from yarnkit.runtime.cache import StartRecent, rotate_back

log = logging.getLogger(__name__)


class RowSlots:
    """One layer of one session's row: `keys` / `values` are its filled slots `[1, kv_heads, length, head_dim]`."""

    def __init__(self, cache: "RowCache", index: int):
        self.cache, self.index = cache, index

    @property
    def keys(self) -> torch.Tensor:
        c = self.cache
        return c.pool.key_buffer[self.index, c.row:c.row + 1, :, :c.length]

    @property
    def values(self) -> torch.Tensor:
        c = self.cache
        return c.pool.value_buffer[self.index, c.row:c.row + 1, :, :c.length]


class RowCache(StartRecent):
    """One session's row of a `SlotPool` (`pool`, which imports this module): its length (host int), eviction in
    place, per-layer views."""

    def __init__(self, pool, row: int):
        self.pool, self.row = pool, row
        self.sinks, self.window, self.evict_batch = pool.sinks, pool.window, pool.evict_batch
        self.length = 0
        self.rerotations = 0
        self.rotary = pool.rotary
        self.layers = [RowSlots(self, i) for i in range(len(pool.layers))]
        self._plans: dict[bytes, MovePlan] = {}
        self._move_pool = None

    def clear(self) -> None:
        """Forget every token; the row's buffers (and any captured graph that uses them) stay valid."""
        self.length, self.rerotations = 0, 0

    def get_seq_length(self) -> int:
        return self.length

    def nbytes(self) -> int:
        return self.pool.nbytes_per_row()

    def drop_last(self) -> None:
        """Forget the last token: its slot lies past the length, so no step reads it and the next one writes it."""
        if self.length == 0:
            raise ValueError("drop_last(): the row holds no token")
        self.length -= 1

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the tokens at sorted slot `indices`; each moves to slot `j` and is rotated back by `old - j`."""
        length = self.length
        if length == 0:
            return
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        if indices.numel() > 1 and (indices.diff() <= 0).any():
            raise ValueError("keep(indices) needs strictly increasing slot indices")
        if indices.numel() and (indices[0] < 0 or indices[-1] >= length):
            raise ValueError(f"keep(indices): indices must lie in [0, {length})")
        kept = indices.numel()
        if kept == length:
            return
        plan = self._move_plan(indices)
        if plan is not None:
            if plan.graph is not None:
                plan.graph.replay()
            else:
                self._move(plan)
                plan.runs += 1
                if self.pool.graph_moves and plan.runs == 2:  # a repeated eviction (not SirLLM's ever-new ones)
                    self._capture_move(plan)
            self.rerotations += 1
        self.length = kept

    def _move(self, plan: "MovePlan") -> None:
        """Gather the moved suffix of all layers of this row, rotate its keys back, write it to the front."""
        end = plan.first + plan.source.numel()
        keys, values = self.pool.key_buffer[:, self.row], self.pool.value_buffer[:, self.row]  # [layers, h, S, d]
        keys[:, :, plan.first:end] = rotate_back(keys.index_select(2, plan.source), plan.cos, plan.sin)
        values[:, :, plan.first:end] = values.index_select(2, plan.source)

    def _capture_move(self, plan: "MovePlan") -> None:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._move_pool, capture_error_mode="thread_local"):
                self._move(plan)
            plan.graph, self._move_pool = graph, graph.pool()
        except Exception as error:  # noqa: BLE001 - keep evicting eagerly, say why
            self.pool.graph_moves = False
            log.warning("CUDA graph capture of the eviction failed, evicting eagerly: %s", one_line(error))

    def _move_plan(self, indices: torch.Tensor) -> "MovePlan | None":
        """The device side of an eviction, memoised: a stream repeats the same eviction (same length, same drop),
        so a repeat needs no host-to-device copy, no rotary call (and, on CUDA, replays a graph)."""
        key = indices.numpy().tobytes()
        if key not in self._plans:
            deltas = indices - torch.arange(indices.numel())
            moved = deltas > 0  # deltas never decrease along sorted indices: the moved tokens are a suffix
            if not moved.any():
                return None
            first = int(moved.long().argmax())
            device = self.pool.device
            cos, sin = self.rotary(deltas[first:])
            if len(self._plans) >= 8:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = MovePlan(first, indices[first:].to(device), cos.to(device), sin.to(device))
        return self._plans[key]


@dataclass
class MovePlan:
    first: int                 # first slot that receives a moved token
    source: torch.Tensor       # device slots the moved tokens come from
    cos: torch.Tensor          # pure rotation by each token's delta
    sin: torch.Tensor
    graph: "torch.cuda.CUDAGraph | None" = None
    runs: int = 0              # eager runs so far; captured (graph mode) at the second
