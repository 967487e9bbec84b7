"""`SinkPolicy`: the eval suite's `StreamPolicy` backed by the streaming engine (attention sinks + rolling window).

The eval suite (yarnkit/eval/stream.py) imports `yarnkit.runtime.policy:SinkPolicy` lazily and calls
`reset()`, then `step(model, input_ids [1, n]) -> logits [1, n, vocab]` over a token stream, and
`cache_tokens()` for the cache size. Options are those of `StreamOptions` (evict_batch, prefill_chunk,
sirllm_keep, sirllm_decay); `sinks=None` picks 1 for a model with a dedicated sink token, else 4.
With `evict_batch=1` it is exactly StreamingLLM's `sinks + window` cache; the default evicts in batches of
`window // 16` (amortised re-rotation), so the window then varies between `window - evict_batch` and `window`.

Test: `python -m pytest tests/test_runtime_policy.py -q`.
"""

from __future__ import annotations

import torch

from yarnkit.runtime.engine import StreamingEngine, StreamOptions


class SinkPolicy:
    """Sinks + window streaming; the engine is (re)built lazily for whichever model `step` receives."""

    def __init__(self, sinks: int | None = 4, window: int = 1020, **options):
        self.options = StreamOptions(sinks=sinks, window=window, **options)
        label = "auto" if sinks is None else sinks
        self.name = f"sinks{label}+{window}" + (f"+sir{self.options.sirllm_keep}" if self.options.sirllm_keep else "")
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
