"""`StreamingEngine`: feed tokens through a model with a `SinkCache`, evicting before each chunk; stream tokens out.

What it is: the prefill/decode split of the runtime. `feed(ids)` runs the model over new tokens in chunks that
never exceed the window (a prompt longer than the window is never prefilled densely), evicting in batches of
`evict_batch` tokens before a chunk would overflow `sinks + window`; `generate(ids)` yields sampled tokens and
keeps evicting during long generations. Optional SirLLM retention keeps the tokens with the highest
self-information (-log p, free from the forward pass) besides sinks and recent tokens, decayed by `decay` after
each dialogue round (`end_round()`). What it is not: a chat template or a server (see `chat.py`, `serve.py`).

Decode paths (`decode=`): `eager` grows a `SinkCache`; `static` / `graph` run the fixed-shape cache of
`static.py` (graph: the 1-token step replayed as a CUDA graph); `auto` picks graph on CUDA, eager elsewhere.

Sinks: 1 when the model's config records a dedicated sink token (`config.yarnkit_sink_token_id`; it is put in
slot 0 automatically and never evicted), else 4. `pin()` also protects everything fed so far (a system prompt).

Test: `python -m pytest tests/test_runtime_cache.py tests/test_runtime_static.py -q`.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Iterator

import torch

from yarnkit.errors import BadValue
from yarnkit.runtime.cache import SinkCache, model_rotary
from yarnkit.runtime.static import StaticDecoder, StaticSinkCache

DEFAULT_SINKS = 4
DECODE_PATHS = ("auto", "eager", "static", "graph")


@dataclass
class StreamOptions:
    """Knobs of the streaming runtime; `None` means "derive from the model / the window"."""

    sinks: int | None = None          # None: 1 if config.yarnkit_sink_token_id is set, else 4
    window: int = 1020                # recent tokens kept besides the sinks (cache holds sinks + window)
    evict_batch: int | None = None    # tokens dropped per eviction; None: max(1, window // 16)
    prefill_chunk: int = 512          # longest single forward (clipped to the free window)
    sirllm_keep: int = 0              # SirLLM: window slots reserved for high self-information tokens (0: off)
    sirllm_decay: float = 0.9         # SirLLM: scores *= decay after each dialogue round
    decode: str = "auto"              # eager | static | graph | auto (graph on CUDA, eager elsewhere)

    def resolved(self, config) -> "StreamOptions":
        sink_token = getattr(config, "yarnkit_sink_token_id", None)
        sinks = self.sinks if self.sinks is not None else (1 if sink_token is not None else DEFAULT_SINKS)
        if sinks < 0 or self.window < 1:  # BadValue is a ValueError that the CLI boundary prints as one line
            raise BadValue(f"--window {self.window} / --sinks {sinks}: need window >= 1 and sinks >= 0",
                           "e.g. --window 1020 --sinks 4")
        if not 0 <= self.sirllm_keep < self.window:
            raise BadValue(f"sirllm_keep={self.sirllm_keep} (--sirllm-keep) must be in [0, window={self.window})",
                           "lower it")
        if not 0.0 < self.sirllm_decay <= 1.0:
            raise BadValue(f"--sirllm-decay {self.sirllm_decay} must be in (0, 1]", "e.g. --sirllm-decay 0.9")
        if self.decode not in DECODE_PATHS:
            raise BadValue(f"decode={self.decode!r} (--decode) is not a decode path",
                           f"choose one of {', '.join(DECODE_PATHS)}")
        evict = self.evict_batch if self.evict_batch is not None else max(1, self.window // 16)
        return StreamOptions(sinks, self.window, max(1, min(evict, self.window)), max(1, self.prefill_chunk),
                             self.sirllm_keep, self.sirllm_decay, self.decode)


class StreamingEngine:
    """One conversation's cache over a shared model; batch size 1."""

    def __init__(self, model, options: StreamOptions | None = None, **overrides):
        self.model = model
        base = options or StreamOptions()
        self.options = StreamOptions(**{**base.__dict__, **overrides}).resolved(model.config)
        check_supported(model.config, self.options.sinks, self.options.window)
        self.sink_token_id = getattr(model.config, "yarnkit_sink_token_id", None)
        self.rotary = model_rotary(model)
        parameter = next(model.parameters())
        self.device = parameter.device
        decode = self.options.decode
        if decode == "auto":
            decode = "graph" if self.device.type == "cuda" else "eager"
        self.decoder = None
        if decode != "eager":
            cache = StaticSinkCache(model.config, self.capacity, self.rotary, self.device, parameter.dtype)
            self.decoder = StaticDecoder(model, cache, graph=decode == "graph")
        self.reset()

    @property
    def capacity(self) -> int:
        return self.options.sinks + self.options.window

    def reset(self) -> None:
        if self.decoder is not None:
            self.cache = self.decoder.cache
            self.cache.clear()
        else:
            self.cache = SinkCache(self.rotary)
        self.cache_ids = torch.empty(0, dtype=torch.long)    # token id in each slot
        self.scores = torch.empty(0)                         # SirLLM self-information per slot
        self.pinned = 0
        self.tokens_seen = 0
        self.last_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    @property
    def decode_path(self) -> str:
        """The decode path in use: eager (growing `SinkCache`), static, or graph (falls back to static loudly)."""
        return self.decoder.path if self.decoder is not None else "eager"

    def is_consistent(self) -> bool:
        """False after a forward was interrupted half-way (some layers hold a chunk the others do not). The static
        cache only counts a chunk once its forward completed, so it is always consistent."""
        if self.decoder is not None:
            return len(self) == len(self.cache_ids)
        lengths = {layer.keys.shape[-2] for layer in self.cache.layers if layer.is_initialized}
        return lengths <= {len(self.cache_ids)} and len(self.cache.layers) in (0, self.model.config.num_hidden_layers)

    @property
    def protected(self) -> int:
        return min(max(self.options.sinks, self.pinned), len(self))

    def pin(self) -> None:
        """Protect every token fed so far (e.g. the system prompt) from eviction, like extra sinks."""
        if self.capacity - len(self) < 16:
            raise ValueError(f"cannot pin {len(self)} tokens: the cache holds {self.capacity} and needs room to "
                             "stream; shorten the system prompt or raise --window")
        self.pinned = len(self)

    def end_round(self) -> None:
        """SirLLM memory decay: older rounds' self-information fades by `sirllm_decay` each round."""
        self.scores = self.scores * self.options.sirllm_decay

    def _make_room(self, incoming: int) -> None:
        length = len(self)
        need = length + incoming - self.capacity
        if need <= 0:
            return
        evictable = length - self.protected
        drop = min(max(need, self.options.evict_batch), evictable)
        if drop < need:
            raise ValueError(f"a chunk of {incoming} tokens does not fit next to {self.protected} protected tokens "
                             f"in a cache of {self.capacity}")
        keep = self._choose_keep(length, length - drop)
        self.cache.keep(keep)
        self.cache_ids = self.cache_ids[keep]
        if self.scores.numel():
            self.scores = self.scores[keep]

    def _choose_keep(self, length: int, keep_total: int) -> torch.Tensor:
        """Slots to keep: protected prefix, then (SirLLM) top-score older tokens, then the most recent ones."""
        protected = self.protected
        budget = keep_total - protected
        retain = min(self.options.sirllm_keep, budget) if self.scores.numel() == length else 0
        recent = budget - retain
        older = torch.arange(protected, length - recent)
        chosen = older[self.scores[older].topk(retain).indices] if retain else older[:0]
        keep = torch.cat((torch.arange(protected), chosen, torch.arange(length - recent, length)))
        return keep.sort().values

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

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Run new token ids `[1, n]` (or `[n]`) through the model; returns float32 logits `[1, n, vocab]` on the
        model's device. `ids` may live on any device: the engine's token bookkeeping is on the host."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).cpu()
        if ids.shape[1] == 0:
            raise ValueError("feed() got no tokens")
        strip = 0
        if self.sink_token_id is not None and len(self) == 0 and int(ids[0, 0]) != self.sink_token_id:
            ids = torch.cat((torch.tensor([[self.sink_token_id]]), ids), dim=1)
            strip = 1
        outputs = []
        start = 0
        while start < ids.shape[1]:
            room = self.capacity - self.protected
            chunk = ids[:, start:start + min(self.options.prefill_chunk, room)]
            self._make_room(chunk.shape[1])
            logits = self._forward(chunk)  # float32, stays on the model's device
            if self.options.sirllm_keep:
                self.scores = torch.cat((self.scores, self._self_information(chunk, logits)))
            self.cache_ids = torch.cat((self.cache_ids, chunk[0]))
            self.last_logits = logits[0, -1]
            outputs.append(logits)
            start += chunk.shape[1]
        self.tokens_seen += ids.shape[1]
        logits = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return logits[:, strip:] if strip else logits

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder(chunk)
        logits = self.model(input_ids=chunk.to(self.device), past_key_values=self.cache, use_cache=True).logits
        return logits.float()

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: set[int] | frozenset = frozenset(),
                 generator: torch.Generator | None = None) -> Iterator[int]:
        """Feed the prompt, then yield sampled tokens (greedy when temperature == 0) until a stop id or the limit.

        Every yielded token except a final stop id is fed back, so eviction continues through long generations.
        """
        logits = self.feed(prompt_ids)[0, -1]
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)
            yield token
            if token in stop_ids or step == max_new_tokens - 1:
                return
            logits = self.feed(torch.tensor([[token]]))[0, -1]

    def stats(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "cache_tokens": len(self), "cache_capacity": self.capacity,
                "sinks": self.options.sinks, "pinned": self.pinned, "cache_mib": round(self.cache.nbytes() / 2**20, 3),
                "rerotations": self.cache.rerotations, "decode_path": self.decode_path,
                "graph_fallback": self.decoder.fallback_reason if self.decoder is not None else None,
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def check_supported(config, sinks: int, window: int) -> None:
    """Hybrid sliding-window models keep per-layer windows of their own: not supported by this cache yet."""
    kinds = set(getattr(config, "layer_types", None) or [])
    if kinds - {"full_attention"}:
        raise ValueError(f"{config.model_type} has {sorted(kinds)} layers; the sink cache supports full-attention "
                         "models only (use plain generation for this model)")
    own = getattr(config, "sliding_window", None)
    if own and sinks + window > own:
        raise ValueError(f"sinks + window = {sinks + window} exceeds the model's own sliding_window={own}; "
                         f"pass --window {own - sinks} or less")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """Greedy (temperature 0) or temperature + nucleus sampling from one logits vector."""
    logits = logits.float().cpu()
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
