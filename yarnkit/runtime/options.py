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
`--decode-attention auto|sdpa|split|flex` picks the attention kernel of the pooled steps (auto, the default: split
on CUDA, sdpa on CPU; `resolve_decode_attention`,
`yarnkit/runtime/attention.py`); on the eager path only `sdpa` runs, so an `auto` decode that resolves to eager
says so in one line and runs sdpa, while a forced `--decode eager` with another kernel is refused.
`--string S[,W]` puts STRING attention on the loaded model (`load_for_cli`); such a model decodes on `eager` or
`static` only (`resolve_decode`: `graph` and `--compile` refused, `auto` is `static` on CUDA).
`--fuse auto|true|false` (`fuse`, resolved to a bool by `resolve_fuse`): q/k/v in one matmul, gate/up in one and
each Llama-form RMSNorm as one `torch.rms_norm` (`yarnkit/runtime/fused.py`, which says why one setting covers
both), done once on the model by the first decoder built; auto is on for the pooled static/graph paths and off for
eager.

Test: `python -m pytest tests/test_runtime_chat.py tests/test_runtime_static.py -q`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, replace

from yarnkit.errors import BadValue
from yarnkit.runs import model_location
from yarnkit.sink_token import streaming_sinks

DECODE_PATHS = ("auto", "eager", "static", "graph")
DECODE_ATTENTION = ("auto", "sdpa", "split", "flex")  # auto, then yarnkit.runtime.attention.KERNELS
FUSE = ("auto", "true", "false")
SEED_RANGE = (-2**63, 2**63 - 1)  # a 64-bit signed integer: what torch's generator and OpenAI's `seed` take
DEFAULT_WINDOW = 1024

log = logging.getLogger(__name__)


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
    decode_attention: str = "auto"    # auto | sdpa | split | flex: the pooled steps' attention kernel (attention.py)
    float32_logits: bool | None = None  # bf16/fp16 model: the head's logits in float32 (runtime/head.py); None:
                                        # where free (CUDA), True: also where it costs (CPU), False: never
    fuse: bool | str = "auto"         # q/k/v and gate/up as one matmul each, RMSNorms as torch.rms_norm
                                      # (runtime/fused.py): auto (on for static/graph), "true"/True, "false"/False

    @property
    def is_resolved(self) -> bool:
        return (self.sinks is not None and self.evict_batch is not None and self.decode != "auto"
                and self.decode_attention != "auto" and isinstance(self.fuse, bool))

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
        decode = resolve_decode(self.decode, device, pooled, string=runs_string(config), compile=self.compile)
        attention = resolve_decode_attention(self.decode_attention, config, device, decode, forced=self.decode)
        return replace(self, sinks=sinks, evict_batch=max(1, min(evict, recent)),
                       prefill_chunk=max(1, self.prefill_chunk), decode=decode, decode_attention=attention,
                       fuse=resolve_fuse(self.fuse, decode))


def resolve_fuse(value: bool | str, decode: str) -> bool:
    """Whether the runtime fuses the model (projections and norms) for `value` (`--fuse`) on resolved path
    `decode`: `auto` -> on for the pooled static/graph paths (their decode step is a few small matmuls and norms
    per layer, where one launch instead of three, or of seven, counts), off for eager; `true` / `false` (or a
    bool) as given, on any path."""
    if isinstance(value, bool):
        return value
    if value not in FUSE:
        raise BadValue(f"fuse={value!r} (--fuse) is not one of {', '.join(FUSE)}", "e.g. --fuse auto")
    return decode in ("static", "graph") if value == "auto" else value == "true"


def resolve_decode(decode: str, device, pooled: bool = False, string: bool = False, compile: bool = False) -> str:
    """The decode path `decode` means on `device`: `auto` -> graph on CUDA, else static for a shared pool (the
    batched step) or eager for one session; a named path is checked and kept. A model running STRING attention
    (`string`, yarnkit/string_attention.py) decodes on eager or static only: its attention has not been checked
    inside a captured CUDA graph or under torch.compile, so `graph` and `compile` fail with the fix, and `auto`
    takes `static` on CUDA."""
    if decode not in DECODE_PATHS:
        raise BadValue(f"decode={decode!r} (--decode) is not a decode path", f"choose one of {', '.join(DECODE_PATHS)}")
    cuda = str(device).startswith("cuda")
    if string:
        if decode == "graph":
            raise BadValue("--decode graph with --string: STRING's attention is not checked inside a CUDA graph",
                           "use --decode static (or auto, which picks it)")
        if compile:
            raise BadValue("--compile with --string: STRING's attention is not checked under torch.compile here",
                           "leave out --compile")
        if decode == "auto" and cuda:
            return "static"
    if decode != "auto":
        return decode
    if cuda:
        return "graph"
    return "static" if pooled else "eager"


def resolve_decode_attention(kernel: str, config, device, decode: str, forced: str = "auto") -> str:
    """The attention kernel the pooled steps run for `kernel` (`--decode-attention`) on resolved path `decode`.
    `auto`: `split` on CUDA with an SDPA model, for one session and for many (one H100, bf16, SmolLM2-135M, cache
    4096, graph decode with fused projections and norms, 2026-12-07: 2.72 / 3.72 / 4.29 ms per step at 1 / 8 / 16
    sessions against SDPA's 4.01 / 6.10 / 6.24), else `sdpa` (CPU: unmeasured). Measured in docs/results.md §3.1
    (`python -m yarnkit.bench.decode_step --decode-attention sdpa split`).
    `split` and `flex` replace SDPA in the pool's single-row steps, so they need a model on SDPA (not STRING, not
    eager attention) and a pooled path: when `auto` resolved to `eager` (one session on CPU) the kernel falls back
    to sdpa in one logged line; a forced `--decode eager` is refused, like any kernel that cannot run."""
    if kernel not in DECODE_ATTENTION:
        raise BadValue(f"decode_attention={kernel!r} (--decode-attention) is not a decode attention kernel",
                       f"choose one of {', '.join(DECODE_ATTENTION)}")
    from yarnkit.runtime.attention import IMPLEMENTATION

    running = getattr(config.get_text_config(), "_attn_implementation", None)
    if kernel == "auto":
        cuda = str(device).startswith("cuda")
        return "split" if cuda and decode != "eager" and running in ("sdpa", IMPLEMENTATION) else "sdpa"
    if kernel == "sdpa":
        return kernel
    if running not in ("sdpa", IMPLEMENTATION):
        what = "STRING's own attention (--string)" if runs_string(config) else f"{running!r} attention"
        raise BadValue(f"--decode-attention {kernel} replaces SDPA in the pooled decode step; this model runs {what}",
                       "use --decode-attention sdpa (or load the model with SDPA attention)")
    if kernel == "flex":
        check_flex(device)
    if decode == "eager":
        if forced == "eager":
            raise BadValue(f"--decode-attention {kernel} runs on the pooled static/graph decode paths, not on --decode "
                           "eager", "use --decode static (or graph on a GPU), or --decode-attention sdpa")
        log.warning("decode attention %s runs on the pooled static/graph paths; this session decodes on the eager "
                    "path (--decode auto, one session on CPU), which runs sdpa (pass --decode static for %s)",
                    kernel, kernel)
        return "sdpa"
    return kernel


def check_flex(device) -> None:
    """FlexAttention needs `torch.nn.attention.flex_attention`, and Triton on CUDA (it is compiled there)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        raise BadValue("--decode-attention flex needs torch.nn.attention.flex_attention (torch >= 2.5)",
                       "upgrade torch, or use --decode-attention split") from None
    if str(device).startswith("cuda"):
        from torch.utils._triton import has_triton

        if not has_triton():
            raise BadValue("--decode-attention flex compiles FlexAttention with Triton, which is not installed",
                           "pip install triton, or use --decode-attention split")


def runs_string(config) -> bool:
    """Whether the model of `config` runs STRING attention (`yarnkit.string_attention.apply_string`)."""
    from yarnkit.string_attention import IMPLEMENTATION

    return getattr(config.get_text_config(), "_attn_implementation", None) == IMPLEMENTATION


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
    parser.add_argument("--decode-attention", default="auto", choices=DECODE_ATTENTION,
                        help="attention kernel of the pooled decode step: auto (default: split on CUDA, the "
                             "fastest measured for 1 to 16 sessions; sdpa on CPU), sdpa (grouped heads packed onto "
                             "their K/V head), split (plain torch, float32 softmax, keys in chunks) or flex "
                             "(FlexAttention); prefill chunks run sdpa")
    parser.add_argument("--fuse", default="auto", choices=FUSE,
                        help="fuse the loaded model once: q/k/v and gate/up projections as one matmul each (4 "
                             "matmuls per Llama layer instead of 7) and RMSNorms as one torch.rms_norm kernel each: "
                             "auto (default: on for the static/graph decode paths), true, false; a part the model "
                             "cannot take (not Llama-like) is left alone (one logged line)")
    parser.add_argument("--string", metavar="SHIFT[,WINDOW]",
                        help="STRING attention: cache distances >= SHIFT are read as distance - SHIFT + WINDOW "
                             "(default window 128; SHIFT below --window; eager/static decode paths)")
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
                         compile=args.compile, decode_attention=args.decode_attention,
                         fuse=args.fuse)


def check_stream_arguments(args) -> None:
    """The `chat`/`serve` flags that cannot work, refused before the model loads (the window against the model's
    sinks is checked once its config is known: `StreamOptions.resolved`)."""
    def positive(flag: str, value) -> None:
        if value is not None and value < 1:
            raise BadValue(f"{flag} {value} must be at least 1", f"e.g. {flag} {defaults.get(flag, 8)}")

    defaults = {"--window": 1024, "--max-new-tokens": 256, "--evict-batch": 64, "--compress-over": 512}
    positive("--window", args.window)
    positive("--max-new-tokens", args.max_new_tokens)
    positive("--evict-batch", args.evict_batch)
    positive("--compress-over", args.compress_over)
    if args.sinks is not None and not 0 <= args.sinks < args.window:
        raise BadValue(f"--sinks {args.sinks} must be in [0, --window {args.window})", "e.g. --sinks 4")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise BadValue(f"--temperature {args.temperature:g} is not a sampling temperature",
                       "use 0 (greedy) or a positive value, e.g. --temperature 0.7")
    if not 0.0 < args.top_p <= 1.0:
        raise BadValue(f"--top-p {args.top_p:g} must be in (0, 1]: the probability mass sampled from",
                       "e.g. --top-p 0.9 (1 turns it off)")
    if args.compress_rate is not None and not 0.0 < args.compress_rate < 1.0:
        raise BadValue(f"--compress-rate {args.compress_rate:g} must be in (0, 1): the fraction of tokens kept",
                       "e.g. --compress-rate 0.5, or leave it out to keep every token")
    if args.seed is not None and not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise BadValue(f"--seed {args.seed} is outside the 64-bit range", f"use a seed in [{SEED_RANGE[0]}, "
                       f"{SEED_RANGE[1]}], e.g. --seed 0")
    if args.sirllm_keep < 0 or not 0.0 < args.sirllm_decay <= 1.0:
        raise BadValue(f"--sirllm-keep {args.sirllm_keep} / --sirllm-decay {args.sirllm_decay:g}: need keep >= 0 "
                       "and decay in (0, 1]", "e.g. --sirllm-keep 64 --sirllm-decay 0.9")
    check_string(args)  # a decode path STRING cannot run is refused on any device, so before the CUDA checks
    on_gpu = str(args.device).startswith("cuda")
    if args.decode == "graph" and not on_gpu:
        raise BadValue(f"--decode graph needs a CUDA GPU (--device {args.device})",
                       "use --decode auto or static on CPU, or --device cuda on a GPU machine")
    if args.compile and not on_gpu:
        raise BadValue(f"--compile compiles the CUDA-graph decode step; --device {args.device} has none",
                       "leave out --compile on CPU")


def load_chat_model(ckpt: str, dtype: str = "float32", device: str = "cpu"):
    """`(model, tokenizer)` of a run dir (its newest complete checkpoint), an HF dir, a .gguf or a bundled name."""
    from yarnkit.models import load_model

    return load_model(model_location(ckpt), dtype=dtype, device=device)


def load_for_cli(args):
    """`(model, tokenizer)` for `args.ckpt` with `--string` applied, or None when Ctrl-C interrupted the loading (a
    clean exit, no traceback)."""
    string = check_string(args)
    try:
        model, tokenizer = load_chat_model(args.ckpt, dtype=args.dtype, device=args.device)
    except KeyboardInterrupt:
        print("\ninterrupted while loading the model", file=sys.stderr)
        return None
    if string is not None:
        apply_string_option(model, args, *string)
    return model, tokenizer


def check_string(args) -> tuple[int, int] | None:
    """`--string S[,W]` before the model loads: its syntax, S > W, S below `--window` (cache distances stay below
    the window, so a larger S would change nothing), and a decode path that runs it."""
    if getattr(args, "string", None) is None:
        return None
    from yarnkit.string_attention import check_setting, parse_setting

    shift, window = parse_setting(args.string)
    check_setting(shift, window, args.window, "--window")
    resolve_decode(args.decode, args.device, string=True, compile=args.compile)
    return shift, window


def apply_string_option(model, args, shift: int, window: int) -> None:
    """STRING on the loaded model (S also below the model's context); an `auto` decode path that STRING moves from
    the CUDA graph to `static` says so in one line."""
    from yarnkit.string_attention import apply_string

    context = min(args.window, getattr(model.config, "max_position_embeddings", None) or args.window)
    apply_string(model, shift, window, context=context,
                 context_name="--window" if context == args.window else "the model's context")
    path = resolve_decode(args.decode, args.device, string=True)
    if path != resolve_decode(args.decode, args.device):
        print(f"yarnkit: STRING S={shift} W={window} runs on the {path} decode path (its attention is not checked "
              "inside a CUDA graph)", file=sys.stderr)
