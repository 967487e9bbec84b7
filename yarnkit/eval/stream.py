"""Streaming perplexity over a long token stream through a KV-cache policy (StreamingLLM's eval_long_ppl protocol).

Documents are concatenated into one stream (each starts with BOS; BOS targets are not scored; a model whose
config has `yarnkit_sink_token_id` gets that token once at the very start, as in its training) and fed `chunk`
tokens at a time (1 = token by token, as in StreamingLLM) to a `StreamPolicy`, which owns the KV cache and
returns logits for the new tokens. Only the last logit row is carried between steps; per-token losses are summed
into segments, so a multi-million-token stream needs O(cache) memory. Policies here:
  dense      one growing cache; stops with a recorded reason at `--max-cache` tokens or out of GPU memory
  window     the last W KV entries; positions keep growing (StreamingLLM's window-attention baseline)
  recompute  each token scored by a fresh forward over the last W tokens (positions 0..W-1); no cache kept
  sink       `SinkPolicy`: the streaming runtime's engine (attention sinks + rolling window, positions in the cache)
W (`--window`) is the whole KV cache, sinks included (one meaning across `eval stream`, `chat` and `serve`): the
keys a token attends to, itself included. Tests: tests/test_eval_stream.py.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from yarnkit.eval.ppl import safe_exp
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions
from yarnkit.models import forward_with_cache


class StreamPolicy(Protocol):
    name: str

    def reset(self) -> None: ...

    def step(self, model, input_ids: torch.LongTensor) -> torch.Tensor:  # [1, n] new tokens -> logits [1, n, vocab]
        ...

    def cache_tokens(self) -> int: ...  # how many tokens the KV cache holds now


class StreamStop(Exception):
    """Raised by a policy that cannot take more tokens (e.g. a full dense cache); the message is the reason."""


def kv_length(cache) -> int:
    return 0 if cache is None else cache.get_seq_length()


def keep_last(cache, count: int) -> None:
    """Drop all but the last `count` entries of every layer of a transformers `DynamicCache` (in place)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., -count:, :]
            layer.values = layer.values[..., -count:, :]


def band_mask(cached: int, new: int, window: int, dtype, device) -> torch.Tensor:
    """Additive mask [1, 1, new, cached + new]: new token j (at kv index cached + j) sees the `window` keys ending
    at itself."""
    query = torch.arange(new, device=device)[:, None] + cached
    key = torch.arange(cached + new, device=device)[None, :]
    allowed = (key <= query) & (key > query - window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class DensePolicy:
    """Full attention with one growing cache, up to `max_cache` tokens (None: until memory runs out)."""

    name = "dense"

    def __init__(self, max_cache: int | None = None):
        self.max_cache = max_cache
        self.reset()

    def reset(self) -> None:
        self.cache = None

    def step(self, model, input_ids):
        if self.max_cache is not None and self.cache_tokens() + input_ids.shape[1] > self.max_cache:
            raise StreamStop(f"dense cache full: {self.cache_tokens()} tokens held, --max-cache {self.max_cache}")
        out, self.cache = forward_with_cache(model, self.cache, input_ids=input_ids, use_cache=True)
        return out.logits

    def cache_tokens(self) -> int:
        return kv_length(self.cache)


class WindowPolicy:
    """Window attention: after each step the cache holds the last `window` KV entries; positions keep growing."""

    name = "window"

    def __init__(self, window: int = 1024):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.cache, self.seen = None, 0

    def step(self, model, input_ids):
        new, cached = input_ids.shape[1], self.cache_tokens()
        positions = torch.arange(self.seen, self.seen + new, device=input_ids.device)[None]
        mask = None
        if cached + new > self.window:  # some new token would otherwise see more than `window` keys
            mask = band_mask(cached, new, self.window, model.dtype, input_ids.device)
        out, self.cache = forward_with_cache(model, self.cache, input_ids=input_ids, position_ids=positions,
                                             attention_mask=mask, use_cache=True)
        self.seen += new
        keep_last(self.cache, self.window)
        return out.logits

    def cache_tokens(self) -> int:
        return kv_length(self.cache)


class RecomputePolicy:
    """Sliding window with re-computation: token t is scored by a fresh forward over tokens t-W+1..t."""

    name = "recompute"

    def __init__(self, window: int = 1024):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.history = None  # the last window-1 tokens: context for the next ones

    def step(self, model, input_ids):
        seq = input_ids if self.history is None else torch.cat([self.history, input_ids], dim=1)
        held, new, width = seq.shape[1] - input_ids.shape[1], input_ids.shape[1], self.window
        parts = []
        if held < width:  # tokens whose whole history fits in the window: one causal forward
            head = model(input_ids=seq[:, :width], use_cache=False).logits
            parts.append(head[:, held:])
        ends = range(max(width, held) + 1, held + new + 1)  # later tokens: one fresh window each, batched
        if len(ends):
            batch = torch.stack([seq[0, end - width:end] for end in ends])
            parts.append(model(input_ids=batch, use_cache=False, logits_to_keep=1).logits[:, -1][None])
        self.history = seq[:, -(width - 1):] if width > 1 else seq[:, :0]
        return torch.cat(parts, dim=1)

    def cache_tokens(self) -> int:
        return 0 if self.history is None else self.history.shape[1]


class SinkPolicy:
    """Attention sinks + rolling window through the runtime's `StreamingEngine` (built lazily per model).

    `window` is the whole cache, sinks included; `sinks=None` takes the runtime's default (`yarnkit.sink_token.streaming_sinks`: 1 for a
    model with a dedicated sink token, else 4). Other options are `StreamOptions`' (evict_batch, prefill_chunk,
    sirllm_keep, sirllm_decay, decode). With `evict_batch=1` this is exactly StreamingLLM's `sinks + (W - sinks)`
    cache; the default evicts in batches of `(W - sinks) // 16` (amortised re-rotation), so the cache then holds
    between `W - evict_batch` and `W` tokens.
    """

    def __init__(self, sinks: int | None = None, window: int = 1024, **options):
        self.options = StreamOptions(sinks=sinks, window=window, **options)
        label = "auto" if sinks is None else sinks
        self.name = f"sinks{label}+W{window}" + (f"+sir{self.options.sirllm_keep}" if self.options.sirllm_keep else "")
        self.engine: StreamingEngine | None = None

    def reset(self) -> None:
        if self.engine is not None:
            self.engine.reset()

    def step(self, model, input_ids: torch.LongTensor) -> torch.Tensor:
        if self.engine is None or self.engine.model is not model:
            self.engine = StreamingEngine(model, self.options)
        return self.engine.feed(input_ids)

    def cache_tokens(self) -> int:
        return 0 if self.engine is None else len(self.engine)


POLICIES = {"dense": DensePolicy, "window": WindowPolicy, "recompute": RecomputePolicy, "sink": SinkPolicy}


def make_policy(name: str, window: int = 1024, sinks: int | None = None, max_cache: int | None = None,
                **sink_options) -> StreamPolicy:
    """A policy by name; `window` is the whole cache (sinks included) for every policy but `dense`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "dense":
        return DensePolicy(max_cache=max_cache)
    if name == "sink":
        return SinkPolicy(sinks=sinks, window=window, **sink_options)
    return POLICIES[name](window=window)


def token_stream(documents: Iterable[tuple[str, list[int]]], bos: int, sink: int | None = None) -> Iterator[int]:
    """BOS + ids of each document, one stream; a model trained with a dedicated sink token gets it first (never
    scored: the first token is context only). Whether it stays in the cache is the policy's business (`sink` with
    sinks >= 1 keeps it; sinks=0, `window` evict it)."""
    if sink is not None:
        yield sink
    for _, ids in documents:
        yield bos
        yield from ids


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; process-wide peak


@torch.no_grad()
def evaluate_stream(model, policy: StreamPolicy, tokens: Iterable[int], bos: int, max_tokens: int,
                    chunk: int = 1, segment: int = 1024) -> dict:
    """Segments of token-weighted perplexity and latency while streaming up to `max_tokens` tokens."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    policy.reset()
    last_logits, segments, stop = None, [], "end of data"
    total_nll = total_count = 0.0
    seg_nll = seg_count = seg_seconds = seg_steps = 0.0
    step_seconds, processed = 0.0, 0
    stream, bar = iter(tokens), tqdm(total=max_tokens, desc=f"stream/{policy.name}", unit="tok")
    while processed < max_tokens:
        ids = [token for _, token in zip(range(min(chunk, max_tokens - processed)), stream)]
        if not ids:
            break
        input_ids = torch.tensor([ids], device=device)
        start = time.perf_counter()
        try:
            logits = policy.step(model, input_ids)
        except StreamStop as reason:
            stop = str(reason)
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            stop = f"out of GPU memory with {policy.cache_tokens()} tokens cached"
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        scoring = logits[0, :-1] if last_logits is None else torch.cat([last_logits, logits[0, :-1]])
        targets = input_ids[0, 1:] if last_logits is None else input_ids[0]
        last_logits = logits[0, -1:]
        nll = F.cross_entropy(scoring.float(), targets, reduction="none")[targets != bos]
        seg_nll, seg_count = seg_nll + nll.double().sum().item(), seg_count + nll.numel()
        seg_seconds, seg_steps, step_seconds = seg_seconds + elapsed, seg_steps + len(ids), step_seconds + elapsed
        processed += len(ids)
        bar.update(len(ids))
        if seg_count >= segment:
            segments.append(_segment(processed, seg_nll, seg_count, seg_seconds, seg_steps, policy))
            total_nll, total_count = total_nll + seg_nll, total_count + seg_count
            seg_nll = seg_count = seg_seconds = seg_steps = 0.0
    bar.close()
    if seg_count:
        segments.append(_segment(processed, seg_nll, seg_count, seg_seconds, seg_steps, policy))
        total_nll, total_count = total_nll + seg_nll, total_count + seg_count
    if processed >= max_tokens:
        stop = f"reached --max-tokens {max_tokens}"
    return {"policy": policy.name, "tokens_processed": processed, "tokens_scored": int(total_count),
            "ppl": safe_exp(total_nll / total_count) if total_count else None, "stop_reason": stop,
            "ms_per_token": 1000 * step_seconds / processed if processed else None,
            "peak_memory_bytes": peak_memory_bytes(device), "memory_kind": "cuda_max_allocated"
            if device.type == "cuda" else "process_peak_rss", "segments": segments}


def _segment(end: int, nll: float, count: float, seconds: float, steps: float, policy) -> dict:
    return {"end": end, "tokens": int(count), "ppl": safe_exp(nll / count),
            "ms_per_token": 1000 * seconds / steps, "cache_tokens": policy.cache_tokens()}
