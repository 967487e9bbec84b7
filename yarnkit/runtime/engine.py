"""`StreamingEngine`: feed tokens through a model with a sink cache, evicting before each chunk; stream tokens out.

What it is: the prefill/decode split of the runtime. `feed(ids)` runs the model over new tokens in chunks that
never exceed the free cache (a prompt longer than the cache is never prefilled densely), evicting in batches of
`evict_batch` tokens before a chunk would overflow the `window`; `generate(ids)` yields sampled tokens (chosen on
the model's device, `sampling.py`) and keeps evicting during long generations; `decode_together(engines,
tokens)` decodes many sessions in one batched step (continuous batching: each session keeps its own cache row
and positions) and returns their logits as one device tensor; `decode_on_device(engines, ids)` does the same on
ids still on the device (the server queues its next step before it reads the last one's ids), the bookkeeping
following once they are read (`confirm`, or `take_back` for a token that ended the reply). The token id in each
slot is kept on the host in a preallocated buffer (`cache_ids` is a view of it). Logits are computed only where
they are used (`feed(..., all_logits=False)` keeps the last row), so memory is bounded by the cache and one chunk.
Optional SirLLM retention keeps the tokens with the highest self-information (-log p, free from the forward
pass) besides sinks and recent tokens, decayed by `decay` after each dialogue round (`end_round()`). What it is
not: a chat template or a server (see `conversation.py`, `serve.py`).

The settings are `options.StreamOptions`, resolved once by the command that owns the sessions (an engine given
unresolved options resolves them itself). `window` is the whole cache, sinks (and a pinned system prompt)
included; the cache is built with the sinks and the window and evicts by its own rule (`cache.StartRecent`), the
engine choosing only what else to protect (`pin()`: everything fed so far, e.g. a system prompt) and, with
SirLLM, which older tokens to keep. Decoders (`decoders.py`, one interface): `eager` grows a `SinkCache`;
`static` / `graph` use a row of a `SlotPool` (graph: the decode step replayed as a CUDA graph, optionally
`torch.compile`d). The first decoder built with `fuse` on (auto: static / graph) fuses the model's q/k/v and
gate/up projections and its RMSNorms in place, once (`fused.py`). A model trained with a dedicated sink token
(`config.yarnkit_sink_token_id`) gets it put in slot 0 automatically.

Test: `python -m pytest tests/test_runtime_cache.py tests/test_runtime_static.py tests/test_runtime_batch.py -q`.
"""

from __future__ import annotations

import resource
from dataclasses import replace
from typing import Iterator

import torch

from yarnkit.runtime import fused
from yarnkit.runtime.cache import model_rotary
from yarnkit.runtime.decoders import EagerDecoder, PoolDecoder
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.sampling import sample
from yarnkit.runtime.static import SlotPool, make_pool

class StreamingEngine:
    """One conversation's cache over a shared model; batch size 1 per engine (see `decode_together`)."""

    def __init__(self, model, options: StreamOptions | None = None, pool: SlotPool | None = None, **overrides):
        self.model = model
        self.device = next(model.parameters()).device
        options = replace(options or StreamOptions(), **overrides)
        self.options = options.resolved(model.config, self.device, pooled=pool is not None)  # a no-op when resolved
        check_supported(model.config, self.options.window)
        self.sink_token_id = getattr(model.config, "yarnkit_sink_token_id", None)
        if pool is not None:
            if (pool.window, pool.sinks) != (self.window, self.options.sinks):
                raise ValueError(f"the pool holds {pool.window} tokens with {pool.sinks} sinks per session, the "
                                 f"options {self.window} with {self.options.sinks}")
            self.decoder = PoolDecoder(pool)
        elif self.options.decode == "eager":
            self.decoder = EagerDecoder(model, model_rotary(model), self.options)
        else:
            self.decoder = PoolDecoder(make_pool(model, self.options))
        self.reset()

    @property
    def window(self) -> int:
        return self.options.window

    @property
    def cache(self):
        return self.decoder.cache

    def reset(self) -> None:
        self.decoder.reset()
        self._slot_ids = torch.empty(self.window, dtype=torch.long)  # token id in each slot, the first `_filled`
        self._filled = 0
        self.scores = torch.empty(0)                         # SirLLM self-information per slot
        self.pinned = 0
        self.tokens_seen = 0
        self.last_logits: torch.Tensor | None = None

    def close(self) -> None:
        """Give the cache (a pool row) back; the engine must not be used afterwards."""
        self.decoder.release()

    @property
    def cache_ids(self) -> torch.Tensor:
        """The token id in each filled slot, on the host (a view: it changes as the engine feeds and evicts)."""
        return self._slot_ids[:self._filled]

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    @property
    def decode_path(self) -> str:
        """The decode path in use: eager (growing `SinkCache`), static, or graph (falls back to static loudly)."""
        return self.decoder.path

    def is_consistent(self) -> bool:
        """False after a forward was interrupted half-way; the pooled caches only count a completed forward."""
        return self.decoder.consistent(len(self.cache_ids))

    @property
    def protected(self) -> int:
        return min(max(self.options.sinks, self.pinned), len(self))

    def pin(self) -> None:
        """Protect every token fed so far (e.g. the system prompt) from eviction, like extra sinks."""
        if self.window - len(self) < 16:
            raise ValueError(f"cannot pin {len(self)} tokens: the cache holds {self.window} and needs room to "
                             "stream; shorten the system prompt or raise --window")
        self.pinned = len(self)

    def end_round(self) -> None:
        """SirLLM memory decay: older rounds' self-information fades by `sirllm_decay` each round."""
        self.scores = self.scores * self.options.sirllm_decay

    def _make_room(self, incoming: int) -> None:
        """The cache drops what its sinks-and-window rule says, protecting pinned tokens and (SirLLM) keeping the
        older tokens with the highest self-information; the bookkeeping follows the kept slots."""
        scores = self.scores if self.scores.numel() == len(self) else None
        keep = self.cache.evict_for_space(incoming, self.pinned, scores, self.options.sirllm_keep)
        if keep is None:
            return
        self._slot_ids[:keep.numel()] = self._slot_ids[keep]
        self._filled = keep.numel()
        if self.scores.numel():
            self.scores = self.scores[keep]

    def _self_information(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """-log p(x_i | x_<i) for each fed token; the first uses the previous chunk's last logits."""
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        ids = ids.to(logits.device)
        info = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()
        if self.last_logits is not None:
            first = -torch.log_softmax(self.last_logits.float(), dim=-1)[ids[0, 0]].cpu()
        else:  # no prediction for the very first token: SirLLM gives it the chunk's maximum
            first = info.max() if info.numel() else torch.tensor(0.0)
        return torch.cat((first.reshape(1), info))

    def _record(self, chunk: torch.Tensor, logits: torch.Tensor) -> None:
        """Bookkeeping after a forward of `chunk [1, n]` completed (see `_remember`)."""
        information = self._self_information(chunk, logits) if self.options.sirllm_keep else None
        self._remember(chunk[0], logits[0, -1], information)

    def _remember(self, ids: torch.Tensor | int, last_logits: torch.Tensor, information: torch.Tensor | None) -> None:
        """The fed `ids` (`[n]`, or one int: the batched step's path, which builds no tensor per session) fill the
        next slots; `last_logits` predict the next token; `information`: their SirLLM self-information on the host."""
        count = 1 if isinstance(ids, int) else ids.numel()
        if self.options.sirllm_keep:
            self.scores = torch.cat((self.scores, information))
        self._slot_ids[self._filled:self._filled + count] = ids
        self._filled += count
        self.last_logits = last_logits
        self.tokens_seen += count

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, all_logits: bool = True) -> torch.Tensor:
        """Run new token ids `[1, n]` (or `[n]`) through the model; returns float32 logits `[1, n, vocab]` on the
        model's device, or only the last row `[1, 1, vocab]` with `all_logits=False` (then no chunk computes more
        logits than it needs). `ids` may live on any device: the engine's token bookkeeping is on the host."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).cpu()
        if ids.shape[1] == 0:
            raise ValueError("feed() got no tokens")
        strip = 0
        if self.sink_token_id is not None and len(self) == 0 and int(ids[0, 0]) != self.sink_token_id:
            ids = torch.cat((torch.tensor([[self.sink_token_id]]), ids), dim=1)
            strip = 1
        keep = 0 if all_logits or self.options.sirllm_keep else 1
        outputs = []
        start = 0
        while start < ids.shape[1]:
            room = self.window - self.protected
            chunk = ids[:, start:start + min(self.options.prefill_chunk, room)]
            self._make_room(chunk.shape[1])
            logits = self.decoder.forward(chunk, keep)  # float32, stays on the model's device
            self._record(chunk, logits)
            if all_logits:
                outputs.append(logits)
            start += chunk.shape[1]
        if not all_logits:
            return self.last_logits.view(1, 1, -1)
        logits = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return logits[:, strip:] if strip else logits

    @staticmethod
    @torch.no_grad()
    def decode_together(engines: list["StreamingEngine"], tokens: list[int]) -> torch.Tensor:
        """Feed one token to each engine; returns their next-token logits `[len(engines), vocab]` (float32, on the
        model's device: choose the next tokens there, `sampling.choose_tokens`). Engines that share a `SlotPool`
        run ONE batched step (each keeps its own cache and positions); others are fed one by one."""
        pools = {id(engine.decoder.pool) for engine in engines}
        if len(engines) == 1 or len(pools) > 1 or engines[0].decoder.pool is None:
            return torch.stack([engine.feed(torch.tensor([[token]]), all_logits=False)[0, -1]
                                for engine, token in zip(engines, tokens)])
        for engine in engines:
            if len(engine) == 0:
                raise ValueError("decode_together() needs sessions that were fed a prompt")
            engine._make_room(1)
        retaining = {i: j for j, i in enumerate(i for i, engine in enumerate(engines) if engine.options.sirllm_keep)}
        previous = [engines[i].last_logits for i in retaining]
        logits = engines[0].decoder.pool.decode([engine.cache for engine in engines], tokens)
        if retaining:  # SirLLM: every session's -log p of its token, in one go and one copy to the host
            chosen = torch.tensor([tokens[i] for i in retaining], device=logits.device)
            information = -torch.log_softmax(torch.stack(previous).float(), dim=-1).gather(-1, chosen[:, None]).cpu()
        for i, (engine, token, row) in enumerate(zip(engines, tokens, logits)):
            engine._remember(token, row, information[retaining[i]] if i in retaining else None)
        return logits

    @staticmethod
    @torch.no_grad()
    def decode_on_device(engines: list["StreamingEngine"], ids: torch.Tensor) -> torch.Tensor:
        """`decode_together` for engines that share a `SlotPool`, on token ids `[len]` still on the device (the
        previous step's choice, not yet read): logits `[len, vocab]`. Only for engines that `fit_one_more()`;
        nothing is recorded until the ids reach the host: then each engine `confirm`s the token it took, or
        `take_back`s one it should not have (a stop id)."""
        return engines[0].decoder.pool.decode([engine.cache for engine in engines], ids)

    def fit_one_more(self) -> bool:
        """Whether `decode_on_device` may feed this engine a token: a pooled row, holding a prompt, that takes one
        more token without evicting, and no SirLLM scores to compute for it (they need the token's id)."""
        return self.decoder.pool is not None and not self.options.sirllm_keep and 0 < len(self) < self.window

    def confirm(self, token: int, logits: torch.Tensor) -> None:
        """`token` was fed by `decode_on_device`; `logits` (its row of that step) predict the next one."""
        self._remember(token, logits, None)

    def take_back(self) -> None:
        """Forget the last token `decode_on_device` fed (its slot is hidden by position and written over next)."""
        self.cache.drop_last()

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: set[int] | frozenset = frozenset(),
                 generator: torch.Generator | None = None) -> Iterator[int]:
        """Feed the prompt, then yield sampled tokens (greedy when temperature == 0) until a stop id or the limit.

        Every yielded token except a final stop id is fed back, so eviction continues through long generations.
        """
        logits = self.feed(prompt_ids, all_logits=False)[0, -1]
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)
            yield token
            if token in stop_ids or step == max_new_tokens - 1:
                return
            logits = self.feed(torch.tensor([[token]]), all_logits=False)[0, -1]

    def stats(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "cache_tokens": len(self), "cache_capacity": self.window,
                "sinks": self.options.sinks, "pinned": self.pinned, "cache_mib": round(self.cache.nbytes() / 2**20, 3),
                "rerotations": self.cache.rerotations, "decode_path": self.decode_path,
                "graph_fallback": self.decoder.fallback_reason, **fused.fused_parts(self.model),
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def check_supported(config, window: int) -> None:
    """Hybrid sliding-window models keep per-layer windows of their own: not supported by this cache yet."""
    kinds = set(getattr(config, "layer_types", None) or [])
    if kinds - {"full_attention"}:
        raise ValueError(f"{config.model_type} has {sorted(kinds)} layers; the sink cache supports full-attention "
                         "models only (use plain generation for this model)")
    own = getattr(config, "sliding_window", None)
    if own and window > own:
        raise ValueError(f"window = {window} exceeds the model's own sliding_window={own}; pass --window {own} or less")

