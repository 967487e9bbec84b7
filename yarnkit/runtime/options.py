"""The streaming runtime's settings, in one place: the flags `yarnkit chat` and `yarnkit serve` declare (and the
`--window` / `--sinks` pair that `yarnkit eval stream` reuses), `StreamOptions`, the one resolver of
`decode="auto"`, and the loader of the model to stream.

    parser = argparse.ArgumentParser(); add_stream_arguments(parser)
    args = parser.parse_args(["--window", "4096"])
    options = stream_options(args).resolved(model.config, device="cpu")   # once, by the command that owns it

`window` is the whole cache: sinks and a pinned system prompt included, in `chat`, `serve` and `eval stream`
alike; the cache objects take it as given (`cache.SinkCache(rotary, sinks, window, evict_batch)`, like
streaming-llm's `StartRecentKVCache(start_size, recent_size)` with `window = start + recent`). `resolved()`
fills in what derives from the model and the device (sinks: 1 with a dedicated sink token, else 4; the eviction
batch; the decode path) and checks every value, so bad options fail before the first request; it runs once, in
the command that builds the sessions, and resolved options pass through the scheduler, the conversation and the
engine unchanged. Decode paths: `eager` grows a `SinkCache`; `static` / `graph` use a row of a `SlotPool`;
`auto` is `graph` on CUDA, and on CPU `eager` for one session or `static` for a shared pool (serve batches).

Test: `python -m pytest tests/test_runtime_chat.py tests/test_runtime_static.py -q`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

from yarnkit.errors import BadValue
from yarnkit.runs import model_location
from yarnkit.sink_token import streaming_sinks

DECODE_PATHS = ("auto", "eager", "static", "graph")
DEFAULT_WINDOW = 1024


@dataclass
class StreamOptions:
    """Knobs of the streaming runtime; `None` / "auto" mean "derive from the model, the window or the device"."""

    sinks: int | None = None          # None: yarnkit.sink_token.streaming_sinks(config)
    window: int = DEFAULT_WINDOW      # tokens the cache holds in all, sinks and pinned tokens included
    evict_batch: int | None = None    # tokens dropped per eviction; None: max(1, (window - sinks) // 16)
    prefill_chunk: int = 512          # longest single forward (clipped to the free cache)
    sirllm_keep: int = 0              # SirLLM: cache slots reserved for high self-information tokens (0: off)
    sirllm_decay: float = 0.9         # SirLLM: scores *= decay after each dialogue round
    decode: str = "auto"              # eager | static | graph | auto (see resolve_decode)
    compile: bool = False             # graph path: torch.compile the decode step inside the captured graph

    @property
    def is_resolved(self) -> bool:
        return self.sinks is not None and self.evict_batch is not None and self.decode != "auto"

    def resolved(self, config, device, pooled: bool = False) -> "StreamOptions":
        """These options for `config`'s model on `device` (a shared pool of sessions when `pooled`): every `None`
        and `auto` filled in, every value checked (`BadValue`, printed as one line by the CLI)."""
        if self.is_resolved:
            return self
        sinks = streaming_sinks(config, self.sinks)  # 1 with a sink token, else 4; 0 there warns
        if sinks < 0 or self.window <= sinks:
            raise BadValue(f"--window {self.window} / --sinks {sinks}: need sinks >= 0 and a window larger than the "
                           f"sinks (the window counts the whole cache, sinks included)", "e.g. --window 1024 --sinks 4")
        recent = self.window - sinks
        if not 0 <= self.sirllm_keep < recent:
            raise BadValue(f"sirllm_keep={self.sirllm_keep} (--sirllm-keep) must be in [0, window - sinks = {recent})",
                           "lower it")
        if not 0.0 < self.sirllm_decay <= 1.0:
            raise BadValue(f"--sirllm-decay {self.sirllm_decay} must be in (0, 1]", "e.g. --sirllm-decay 0.9")
        evict = self.evict_batch if self.evict_batch is not None else max(1, recent // 16)
        return replace(self, sinks=sinks, evict_batch=max(1, min(evict, recent)),
                       prefill_chunk=max(1, self.prefill_chunk), decode=resolve_decode(self.decode, device, pooled))


def resolve_decode(decode: str, device, pooled: bool = False) -> str:
    """The decode path `decode` means on `device`: `auto` -> graph on CUDA, else static for a shared pool (the
    batched step) or eager for one session; a named path is checked and kept."""
    if decode not in DECODE_PATHS:
        raise BadValue(f"decode={decode!r} (--decode) is not a decode path", f"choose one of {', '.join(DECODE_PATHS)}")
    if decode != "auto":
        return decode
    if str(device).startswith("cuda"):
        return "graph"
    return "static" if pooled else "eager"


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """`--window` and `--sinks`: the cache's two sizes (chat, serve, eval stream)."""
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"tokens the cache holds in all, sinks and a pinned system prompt included "
                             f"(default {DEFAULT_WINDOW})")
    parser.add_argument("--sinks", type=int, default=None,
                        help="attention-sink tokens kept at the start of the cache (default: 1 for a model trained "
                             "with a sink token, config.yarnkit_sink_token_id; else 4)")


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `chat` and `serve`: the cache, the decode path, retention, sampling, the model's device."""
    add_cache_arguments(parser)
    parser.add_argument("--evict-batch", type=int, default=None, help="tokens dropped per eviction (window//16)")
    parser.add_argument("--decode", default="auto", choices=DECODE_PATHS,
                        help="decode path: auto = CUDA graph on a GPU (falls back loudly), eager growing cache on CPU "
                             "(serve: the batched static cache on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="graph path: torch.compile the decode step inside the CUDA graph (fused kernels; "
                             "a minute of compiling at start)")
    parser.add_argument("--sirllm-keep", type=int, default=0, help="SirLLM: window slots for high-information tokens")
    parser.add_argument("--sirllm-decay", type=float, default=0.9, help="SirLLM: score decay per dialogue round")
    parser.add_argument("--compress-rate", type=float, default=None,
                        help="LLMLingua-style: keep this fraction of long user messages' tokens (e.g. 0.5)")
    parser.add_argument("--compress-over", type=int, default=512, help="compress user messages above this many tokens")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable replies")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")


def stream_options(args) -> StreamOptions:
    """The parsed flags of `add_stream_arguments` as (unresolved) `StreamOptions`."""
    return StreamOptions(sinks=args.sinks, window=args.window, evict_batch=args.evict_batch,
                         sirllm_keep=args.sirllm_keep, sirllm_decay=args.sirllm_decay, decode=args.decode,
                         compile=args.compile)


def load_chat_model(ckpt: str, dtype: str = "float32", device: str = "cpu"):
    """`(model, tokenizer)` of a run dir (its newest complete checkpoint), an HF dir, a .gguf or a bundled name."""
    from yarnkit.models import load_model

    return load_model(model_location(ckpt), dtype=dtype, device=device)


def load_for_cli(args):
    """`(model, tokenizer)` for `args.ckpt`, or None when Ctrl-C interrupted the loading (a clean exit, no
    traceback)."""
    try:
        return load_chat_model(args.ckpt, dtype=args.dtype, device=args.device)
    except KeyboardInterrupt:
        print("\ninterrupted while loading the model", file=sys.stderr)
        return None
