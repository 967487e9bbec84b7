"""Static-shape sink caches for many sessions: one pool of fixed K/V buffers, a slot mask, a batched decode step.

What it is: the fast decode path of the streaming runtime, and the home of continuous batching.
`make_pool(model, options, rows)` builds one from resolved `StreamOptions` (its `window` and `sinks`; first it fuses
the model's q/k/v and gate/up projections and its RMSNorms when `fuse` is on, the default here: `fused.py`, 4
matmuls per Llama layer in every step instead of 7, one `torch.rms_norm` per norm). `SlotPool` preallocates ONE
key and ONE value buffer `[layers, rows, kv_heads, window + 1, head_dim]`: each session
(`RowCache`, one per `StreamingEngine`) owns a row, slots `0..window-1` hold its tokens and the last slot is a
scratch slot that idle rows of a batched step write to. Every forward goes through one function,
`SlotPool.forward_rows(first, ids [B, n], positions [B, n])`: rows `first..first+B-1` write their new K/V at their
own positions and attend through a boolean mask `slot <= position`, so no tensor ever changes shape or address and
each row keeps its own cache-relative positions. The write is a `scatter_` into the rows' view of the buffer,
`key_buffer[layer, rows]`, when the step runs eagerly or in a plain CUDA graph, and one `index_put_` into the whole
buffer (indexed by layer, row, head and position) while torch.compile traces it: Inductor turned a write into the
view into a copy of the rows and of both whole buffers every step, and keeps the whole-buffer write in place; the
eager `index_put_` was slower than `scatter_` in the plain graph (H100, 2026-12-07: 2.80 against 2.72 ms per step,
and its 2-row step did not capture), so each path keeps the write that suits it (the same values either way).
The host keeps each row's filled length as a Python int (no `.item()` inside a step).

- prefill / a chunk: `forward_rows` on the session's row alone (eager);
- decode: `SlotPool.decode(rows, tokens)` runs ONE step over a range of rows (`step_rows`): eagerly the span
  from the lowest to the highest decoding row, so a lone session's step is one row wherever it sits; with a
  graph or a compiled step, rows `0..B-1` (B = the highest decoding row + 1, rounded up to a power of two: one
  fixed shape per B). Rows in the range that are not decoding write to the scratch slot and their output is
  dropped. The step's token ids and positions travel in ONE host-to-device copy (`[2, B, 1]`; ids chosen on the
  device by the previous step are written in after it, `decode(rows, ids_on_device)`). On CUDA with
  `graph=True` each B is captured once as a `torch.cuda.CUDAGraph` and replayed; `compiled=True` first wraps the
  step in `torch.compile` (kernel fusion) inside that graph: two compilations in all, B = 1 and every B >= 2
  (a symbolic batch dimension, `_step_inputs`). A capture or compile failure is logged and the same function keeps
  running eagerly.

The attention of the single-row steps is `attention` (resolved `StreamOptions.decode_attention`): `split` by default
on CUDA, SDPA on CPU (grouped query heads packed onto their K/V head, no `repeat_kv` copy), or `flex`
(`yarnkit/runtime/attention.py`, each reached through transformers' attention registry on an SDPA model); `split`
rounds the row's slots up to whole key chunks (the extra slots are masked for every row and never written).

Eviction (`RowCache.keep(indices)`, `rows.py`) runs outside the step, in place, on the session's row.

Test: `python -m pytest tests/test_runtime_static.py tests/test_runtime_batch.py -q` (CPU; graphs need CUDA:
tests/test_runtime_gpu.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from math import inf

import torch
from transformers.cache_utils import Cache

from yarnkit import rope
from yarnkit.errors import BadValue, one_line
from yarnkit.models import cache_kwargs, host_memory_bytes
from yarnkit.runtime import attention as decode_attention
from yarnkit.runtime import fused
from yarnkit.runtime.cache import Rotary, model_rotary
from yarnkit.runtime.head import float32_head, forward_logits
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.rows import RowCache

log = logging.getLogger(__name__)


def make_pool(model, options: StreamOptions, rows: int = 1) -> SlotPool:
    """A cache pool of `rows` sessions for the `static` / `graph` paths (`auto`: graph on CUDA, else static);
    the model is fused first when the options say so (`fused.py`, once per model)."""
    options = options.resolved(model.config, next(model.parameters()).device, pooled=True)
    if options.decode == "eager":
        raise ValueError("a shared cache pool needs decode='static', 'graph' or 'auto'")
    if options.fuse:
        fused.fuse(model)  # once per model, before any step runs or is captured
    return SlotPool(model, options.window, model_rotary(model), rows, graph=options.decode == "graph",
                    compiled=options.compile, sinks=options.sinks, evict_batch=options.evict_batch,
                    attention=options.decode_attention, float32_logits=options.float32_logits)


def allocate_rows(shape: tuple, device: torch.device, dtype: torch.dtype, window: int, rows: int):
    """The pool's zeroed key and value buffers; a size this device cannot hold fails as one line, before trying
    (a CPU allocation beyond physical memory may only fail once its pages are touched, mid-conversation)."""
    size = 2 * torch.Size(shape).numel() * dtype.itemsize
    room = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_memory_bytes()

    def too_big(reason: str) -> BadValue:
        return BadValue(f"--window {window} x {rows} session(s) needs a {size / 2**30:.1f} GiB cache on {device}, "
                        f"{reason}", "lower --window (or --max-sessions)")

    if size > room:
        raise too_big(f"more than the {room / 2**30:.1f} GiB there")
    try:
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        raise too_big(f"which cannot be allocated ({str(error).splitlines()[0][:80]})") from None


class SlotPool(Cache):
    """Fixed-size K/V rows (`window` slots) for up to `rows` sessions over one model; also the `Cache` every
    forward sees."""

    def __init__(self, model, window: int, rotary: Rotary, rows: int = 1, graph: bool = False,
                 compiled: bool = False, sinks: int = 0, evict_batch: int = 1, attention: str = "sdpa",
                 float32_logits: bool | None = None):
        config = model.config
        parameter = next(model.parameters())
        self.model, self.window, self.rotary = model, window, rotary
        self.sinks, self.evict_batch = sinks, evict_batch  # how every row evicts (`cache.StartRecent`)
        self.device, self.dtype = parameter.device, parameter.dtype
        if graph and self.device.type != "cuda":
            raise BadValue(f"decode='graph' (--decode graph) needs a CUDA model; the model is on {self.device}",
                           "use --decode auto or static (or --device cuda on a GPU machine)")
        layers = config.num_hidden_layers
        super().__init__(layers=[PoolLayer(self, i) for i in range(layers)])
        self.attention = attention  # the single-row steps' kernel (yarnkit/runtime/attention.py)
        named = attention != "sdpa" or decode_attention.runs_sdpa(model)  # sdpa too: it packs grouped heads
        if named:
            decode_attention.install(model)
        shape = (layers, rows, config.num_key_value_heads, decode_attention.slot_count(window, attention),
                 rope.head_dim(config))
        self.key_buffer, self.value_buffer = allocate_rows(shape, self.device, self.dtype, window, rows)
        # update()'s indices into the whole buffers (layer, row, head; positions come with each forward)
        self._layer_ids, self._row_ids = (torch.arange(n, device=self.device) for n in shape[:2])
        self._head_ids = torch.arange(shape[2], device=self.device)[None, :, None]
        self.slots = torch.arange(shape[3], device=self.device)  # slots past the scratch slot (split's padding)
        # are masked for every row: no position reaches them
        self._open, self._shut = (torch.full((), value, dtype=self.dtype, device=self.device) for value in (0.0, -inf))
        self.rows = rows
        self.free = list(range(rows))
        self.first, self.count = 0, 1                   # the row range of the forward in flight
        self.positions = self.slots[None, :0]            # [B, n] write positions of the forward in flight
        self.use_graph, self.compiled = graph, compiled and self.device.type == "cuda"
        self.graph_moves = graph
        self.fallback_reason: str | None = None
        self._graphs: dict[int, DecodeGraph] = {}
        self._graph_pool = None
        self._forward_kwargs = cache_kwargs(self)  # looked up here, not inside a traced step
        if named:
            self._forward_kwargs[decode_attention.KERNEL_ARGUMENT] = attention  # reaches the attention function
        self._head = float32_head(model, float32_logits)  # likewise (it probes the device); the eager path's too
        self._step = self.forward_rows
        if self.compiled:  # shapes: see `_step_inputs`
            self._step = torch.compile(self.forward_rows)

    # -- the transformers Cache interface, for the forward in flight ---------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.slots.numel(), 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[-1] != self.key_buffer.shape[-1] or key_states.shape[1] != self.key_buffer.shape[2]:
            raise ValueError(f"key states {tuple(key_states.shape)} do not fit the static cache "
                             f"{tuple(self.key_buffer.shape[1:])}: config head_dim / num_key_value_heads disagree "
                             "with the attention module; use decode='eager' for this model")
        rows = slice(self.first, self.first + self.count)
        if torch.compiler.is_compiling():  # Inductor keeps a write into the whole buffer in place (module docstring)
            index = (self._layer_ids[layer_idx], self._row_ids[rows, None, None], self._head_ids,
                     self.positions[:, None, :])  # -> [B, kv_heads, n] slots of the WHOLE buffer
            self.key_buffer.index_put_(index, key_states.to(self.dtype))
            self.value_buffer.index_put_(index, value_states.to(self.dtype))
            return self.key_buffer[layer_idx, rows], self.value_buffer[layer_idx, rows]
        keys, values = self.key_buffer[layer_idx, rows], self.value_buffer[layer_idx, rows]
        index = self.positions[:, None, :, None].expand_as(key_states)
        keys.scatter_(2, index, key_states.to(self.dtype))
        values.scatter_(2, index, value_states.to(self.dtype))
        return keys, values

    # -- sessions -------------------------------------------------------------------------------------------------
    def acquire(self) -> RowCache:
        if not self.free:
            raise RuntimeError(f"all {self.rows} cache rows are in use")
        return RowCache(self, self.free.pop(0))

    def release(self, cache: RowCache) -> None:
        cache.length = 0
        if cache.row not in self.free:
            self.free.append(cache.row)
            self.free.sort()

    def nbytes_per_row(self) -> int:
        return 2 * self.key_buffer[:, 0].numel() * self.key_buffer.element_size()

    # -- the step ---------------------------------------------------------------------------------------------------
    def forward_rows(self, first: int, ids: torch.Tensor, positions: torch.Tensor, logits_to_keep: int = 0):
        """THE forward: rows `first..first+B-1` take `ids [B, n]` at device `positions [B, n]` -> float32 logits."""
        self.first, self.count, self.positions = first, ids.shape[0], positions
        visible = self.slots[None, None, None, :] <= positions[:, None, :, None]
        mask = torch.where(visible, self._open, self._shut)  # additive, built once: SDPA converts a boolean
        # mask in every layer (two kernels each); the values are the same, so is every logit
        return forward_logits(self.model, self._head, logits_to_keep, input_ids=ids, position_ids=positions,
                              attention_mask=mask, use_cache=True, **self._forward_kwargs)

    def prefill(self, cache: RowCache, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Feed `ids [1, n]` into the row's next free slots (the caller made room)."""
        start, count = cache.length, ids.shape[1]
        if start + count > self.window:
            raise ValueError(f"{count} tokens do not fit after {start} in a cache of {self.window}")
        positions = torch.arange(start, start + count, device=self.device)[None]
        logits = self.forward_rows(cache.row, ids.to(self.device, non_blocking=True), positions, logits_to_keep)
        cache.length = start + count
        return logits

    def decode(self, caches: list[RowCache], tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """One batched step: each cache takes one token at its own next position -> float32 logits `[len, vocab]`.
        `tokens`: host ints, or ids `[len]` already on the device (a step chosen there and not yet read: they are
        written into the step's inputs on the device, after the positions' copy)."""
        rows = [cache.row for cache in caches]
        if len(set(rows)) != len(rows):
            raise ValueError("decode() got the same session twice")
        for cache in caches:
            if cache.pool is not self or cache.length >= self.window:
                raise ValueError(f"row {cache.row}: no room for a token (the caller must evict first)")
        first, width = self.step_rows(rows)
        picked = [row - first for row in rows]
        on_device = isinstance(tokens, torch.Tensor)
        ids, positions = [0] * width, [self.window] * width  # idle rows: the scratch slot
        for slot, cache, token in zip(picked, caches, [0] * len(caches) if on_device else tokens):
            ids[slot], positions[slot] = token, cache.length
        inputs = torch.tensor([ids, positions])[:, :, None]  # [2, width, 1]: ONE host-to-device copy
        usual = picked == list(range(len(picked)))  # the usual order: views, no index to copy to the device

        def place(device_inputs: torch.Tensor) -> torch.Tensor:
            if on_device:
                if usual:
                    device_inputs[0, :len(picked), 0].copy_(tokens)
                else:
                    device_inputs[0, picked, 0] = tokens
            return device_inputs

        logits = self._run(first, width, inputs, place)
        for cache in caches:
            cache.length += 1
        if usual:
            return logits[:len(picked), -1]
        return logits[picked, -1]

    def step_rows(self, rows: list[int]) -> tuple[int, int]:
        """`(first, count)`: the rows `first..first+count-1` a decode step for sessions in `rows` runs. Eagerly,
        just the span of those rows, so a lone session costs one row wherever it sits. A captured graph or a
        compiled step has one fixed shape per count: rows `0..count-1`, count = the highest row + 1 rounded up to
        a power of two (one graph or compilation each)."""
        if self.use_graph or self.compiled:
            return 0, min(1 << max(rows).bit_length(), self.rows)
        return min(rows), max(rows) - min(rows) + 1

    def warm_up(self) -> list[int]:
        """Capture (and, compiled, compile) the decode step of every batch width `decode` can run, before a server
        takes requests, so that no session waits for it later. Every row is idle in these steps (it writes its
        scratch slot), so no cache changes. Returns the widths warmed; none when the step runs eagerly."""
        if not (self.use_graph or self.compiled):
            return []
        widths = sorted({self.step_rows([row])[1] for row in range(self.rows)})
        for width in widths:
            self._run(0, width, torch.tensor([[0] * width, [self.window] * width])[:, :, None], lambda inputs: inputs)
        return widths

    def _run(self, first: int, width: int, inputs: torch.Tensor, place) -> torch.Tensor:
        """One decode step for rows `first..first+width-1` on host `inputs [2, width, 1]` (token ids, positions):
        the captured graph's replay, or the step itself (eager or compiled); `place` completes the inputs once
        they are on the device (ids chosen there)."""
        if self.use_graph:
            return self._replay(width, inputs, place)
        return self._step(first, *self._step_inputs(place(inputs.to(self.device))), 1)

    def _step_inputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's token ids and positions `[B, 1]` from device `inputs [2, B, 1]`. For a compiled step with
        B > 1 their batch dimension is marked dynamic, so every width from 2 up shares ONE compilation (each width
        still gets its own CUDA graph); B = 1 keeps its own, specialised. Before, each new width compiled anew
        (34-41 s each on an H100, cold), with every session on the server waiting."""
        ids, positions = inputs[0], inputs[1]
        if self.compiled and ids.shape[0] > 1:
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        return ids, positions

    def _replay(self, width: int, inputs: torch.Tensor, place) -> torch.Tensor:
        """The captured step for rows 0..width-1 on host `inputs [2, width, 1]` (token ids, positions); `place`
        completes them once on the device (ids chosen there)."""
        graph = self._graphs.get(width)
        if graph is None:
            try:
                graph = self._capture(width, place(inputs.to(self.device)))
            except Exception as error:  # noqa: BLE001 - any capture failure: keep serving eagerly, say why
                self.use_graph = self.graph_moves = False
                self.fallback_reason = one_line(error)
                log.warning("CUDA graph capture of the decode step failed, falling back to the static eager path "
                            "(same function, no graph): %s", self.fallback_reason)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return self._run(0, width, inputs, place)
        else:
            place(graph.inputs.copy_(inputs, non_blocking=True))
        graph.graph.replay()
        return graph.logits.clone()  # the graph's own buffer is overwritten by the next replay

    def _capture(self, width: int, static_inputs: torch.Tensor) -> "DecodeGraph":
        """Warm up (and compile) on a side stream, then capture one step for rows 0..width-1 reading
        `static_inputs` (on the device). Warm-up and capture write only the slots these very tokens are about to
        fill (or the scratch slot)."""
        static_ids, static_positions = self._step_inputs(static_inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(0, static_ids, static_positions, 1)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            logits = self._step(0, static_ids, static_positions, 1)
        self._graph_pool = graph.pool()
        self._graphs[width] = DecodeGraph(graph, static_inputs, logits)
        return self._graphs[width]


@dataclass
class DecodeGraph:
    graph: "torch.cuda.CUDAGraph"
    inputs: torch.Tensor       # [2, width, 1]: token ids, positions (the captured step reads these addresses)
    logits: torch.Tensor


class PoolLayer:
    """Layer `index` of the forward in flight, shaped like a `DynamicLayer` for transformers' bookkeeping."""

    is_sliding = False
    is_compileable = True
    is_initialized = True
    supports_early_init = False

    def __init__(self, pool: SlotPool, index: int):
        self.pool, self.index = pool, index

    @property
    def keys(self) -> torch.Tensor:
        p = self.pool
        return p.key_buffer[self.index, p.first:p.first + p.count]

    @property
    def values(self) -> torch.Tensor:
        p = self.pool
        return p.value_buffer[self.index, p.first:p.first + p.count]
