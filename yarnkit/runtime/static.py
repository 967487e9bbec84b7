"""Static-shape sink cache and decode step: fixed K/V buffers, a slot mask, device positions, an optional CUDA graph.

What it is: the fast decode path of the streaming runtime. `StaticSinkCache` preallocates ONE key and ONE value
buffer `[layers, 1, kv_heads, capacity, head_dim]` for all layers (capacity = sinks + window); a forward writes
its tokens into slots `positions` (a device tensor) with `index_copy_`, and attention sees the whole buffer
through a boolean mask `slot <= position`, so no tensor ever changes shape or address. The host keeps the number
of filled slots as a Python int (no `.item()`, no `len()` over GPU tensors). `StaticDecoder.forward_static(ids,
positions)` is the single function that runs the model: the engine calls it eagerly for prefill chunks and
single tokens (CPU, `decode="static"`), and on CUDA (`decode="graph"`) the 1-token call of that same function is
captured once in a `torch.cuda.CUDAGraph` and replayed. If capture fails, the decoder logs the reason and keeps
running the same function eagerly. What it is not: an eviction policy (the engine chooses which slots to keep).

Eviction (`keep(indices)`) runs outside the graph, in place: kept slot indices are strictly increasing, so the
tokens that move form a suffix; that suffix of all layers is gathered with one `index_select`, rotated back by
each token's delta (pure rotation, float32, like `cache.SinkCache`) and copied to the front of the same buffers
— a handful of kernels for all 30 layers, however many layers the model has. The plan of an eviction is
memoised; in graph mode a plan that repeats is captured at its second (eager) run and replayed afterwards.

Test: `python -m pytest tests/test_runtime_static.py -q` (CPU; graph capture itself runs only on CUDA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from yarnkit import rope
from yarnkit.runtime.cache import Rotary, rotate_back

log = logging.getLogger(__name__)


class StaticSlots:
    """One layer's view of the shared buffers, shaped like a `DynamicLayer` (`keys`/`values` = filled slots)."""

    is_sliding = False
    is_compileable = True
    is_initialized = True
    supports_early_init = False

    def __init__(self, cache: "StaticSinkCache", index: int):
        self.cache, self.index = cache, index

    @property
    def keys(self) -> torch.Tensor:
        return self.cache.key_buffer[self.index][..., :self.cache.length, :]

    @property
    def values(self) -> torch.Tensor:
        return self.cache.value_buffer[self.index][..., :self.cache.length, :]


class StaticSinkCache(Cache):
    """Fixed-capacity K/V for every layer; `write_positions` says where the current forward's tokens go."""

    def __init__(self, config, capacity: int, rotary: Rotary, device, dtype):
        heads = config.num_key_value_heads
        head_dim = rope.head_dim(config)
        layers = config.num_hidden_layers
        super().__init__(layers=[StaticSlots(self, i) for i in range(layers)])
        shape = (layers, 1, heads, capacity, head_dim)
        self.key_buffer = torch.zeros(shape, device=device, dtype=dtype)
        self.value_buffer = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = torch.arange(capacity, device=device)
        self.capacity = capacity
        self.rotary = rotary
        self.length = 0                # filled slots, host side: advanced by the decoder after a forward completes
        self.rerotations = 0
        self.write_positions = self.slots[:0]
        self._plans: dict[bytes, MovePlan] = {}
        self.graph_moves = False       # set by a graph decoder: capture each eviction plan after its first run
        self._move_pool = None

    def clear(self) -> None:
        """Forget every token; buffers (and any captured graph that uses them) stay valid."""
        self.length, self.rerotations = 0, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.capacity, 0

    def nbytes(self) -> int:
        return 2 * self.key_buffer.numel() * self.key_buffer.element_size()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[-1] != self.key_buffer.shape[-1] or key_states.shape[1] != self.key_buffer.shape[2]:
            raise ValueError(f"key states {tuple(key_states.shape)} do not fit the static cache "
                             f"{tuple(self.key_buffer.shape[1:])}: config head_dim / num_key_value_heads disagree "
                             "with the attention module; use decode='eager' for this model")
        keys, values = self.key_buffer[layer_idx], self.value_buffer[layer_idx]
        keys.index_copy_(2, self.write_positions, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_positions, value_states.to(values.dtype))
        return keys, values

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """`[1, 1, n, capacity]` bool: a query at position p sees slots 0..p (older tokens and its own chunk)."""
        return (self.slots[None, :] <= positions[:, None])[None, None]

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
                if self.graph_moves and plan.runs == 2:  # a repeated eviction (not SirLLM's ever-new ones): capture
                    self._capture_move(plan)
            self.rerotations += 1
        self.length = kept

    def _move(self, plan: "MovePlan") -> None:
        """Gather the moved suffix of all layers, rotate its keys back by the deltas, write it to the front."""
        end = plan.first + plan.source.numel()
        keys = self.key_buffer.index_select(3, plan.source)                  # [layers, 1, heads, moved, dim]
        self.key_buffer[..., plan.first:end, :] = rotate_back(keys, plan.cos, plan.sin)
        self.value_buffer[..., plan.first:end, :] = self.value_buffer.index_select(3, plan.source)

    def _capture_move(self, plan: "MovePlan") -> None:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._move_pool, capture_error_mode="thread_local"):
                self._move(plan)
            plan.graph, self._move_pool = graph, graph.pool()  # eviction graphs share one memory pool
        except Exception as error:  # noqa: BLE001 - keep evicting eagerly, say why
            self.graph_moves = False
            log.warning("CUDA graph capture of the eviction failed, evicting eagerly: %s: %s",
                        type(error).__name__, error)

    def _move_plan(self, indices: torch.Tensor) -> "MovePlan | None":
        """The device side of an eviction, memoised: a stream repeats the same eviction (same length, same drop)
        over and over, so a repeat needs no host-to-device copy, no rotary call (and, on CUDA, replays a graph)."""
        key = indices.numpy().tobytes()
        if key not in self._plans:
            deltas = indices - torch.arange(indices.numel())
            moved = deltas > 0  # deltas never decrease along sorted indices: the moved tokens are a suffix
            if not moved.any():
                return None
            first = int(moved.long().argmax())
            device = self.key_buffer.device
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
    graph: torch.cuda.CUDAGraph | None = None
    runs: int = 0              # eager runs so far; captured (graph mode) at the second


class StaticDecoder:
    """Runs the model over a `StaticSinkCache`; `graph=True` replays a captured 1-token step on CUDA."""

    def __init__(self, model, cache: StaticSinkCache, graph: bool):
        self.model, self.cache = model, cache
        self.device = cache.key_buffer.device
        if graph and self.device.type != "cuda":
            raise ValueError(f"decode='graph' needs a CUDA model (the model is on {self.device}); "
                             "use decode='static' or 'auto'")
        self.use_graph = graph
        cache.graph_moves = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fallback_reason: str | None = None

    @property
    def path(self) -> str:
        return "graph" if self.use_graph else "static"

    def forward_static(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """THE step: ids `[1, n]` at device `positions [n]` -> float32 logits `[1, n, vocab]`. No host sync inside."""
        self.cache.write_positions = positions
        mask = self.cache.attention_mask(positions)
        out = self.model(input_ids=ids, position_ids=positions[None], attention_mask=mask, past_key_values=self.cache,
                         use_cache=True)
        return out.logits.float()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed `ids [1, n]` into the next free slots (the caller made room); returns float32 logits."""
        start, count = self.cache.length, ids.shape[1]
        if start + count > self.cache.capacity:
            raise ValueError(f"{count} tokens do not fit after {start} in a cache of {self.cache.capacity}")
        ids = ids.to(self.device, non_blocking=True)
        if count == 1 and self.use_graph:
            logits = self._replay(ids, start)
        else:
            logits = self.forward_static(ids, torch.arange(start, start + count, device=self.device))
        self.cache.length = start + count
        return logits

    def _replay(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if self.graph is None:
            try:
                self._capture(ids, start)
            except Exception as error:  # noqa: BLE001 - any capture failure: keep serving eagerly, say why
                self.use_graph, self.graph, self.cache.graph_moves = False, None, False
                self.fallback_reason = f"{type(error).__name__}: {error}"
                log.warning("CUDA graph capture of the decode step failed, falling back to the static eager path "
                            "(same function, no graph): %s", self.fallback_reason)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return self.forward_static(ids, torch.arange(start, start + 1, device=self.device))
        self.static_ids.copy_(ids)
        self.static_positions.fill_(start)
        self.graph.replay()
        return self.static_logits.clone()

    def _capture(self, ids: torch.Tensor, start: int) -> None:
        """Warm up on a side stream, then capture `forward_static` for one token. The warm-up and capture write
        slot `start`, the slot this very token is about to fill, so no cached token is disturbed."""
        self.static_ids = ids.clone()
        self.static_positions = torch.full((1,), start, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward_static(self.static_ids, self.static_positions)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # serve's other threads may sync
            self.static_logits = self.forward_static(self.static_ids, self.static_positions)
        self.graph = graph
