"""Timing helpers for the runtime benchmark (scripts/bench_runtime.py): decode latency, peers, batching, scale.

What it is: pure measurement functions over a model, each device-synchronised per step, returning plain dicts:
`engine_stream` (the runtime's decode through a full, evicting cache: p50/p99, eviction steps), `recompute`
(StreamingLLM's baseline: a fresh forward over the last `cache` tokens per token), `dense` (HF decode with a
growing `DynamicCache`), `hf_generate` (transformers' `generate` with a static or dynamic cache, per-token times
from a streamer), `batch_throughput` (sessions decoded together vs one alone, greedy agreement), `path_check`
(log-prob difference of a decode path against the eager cache, stock and with the same fuse), and `random_model`
for timing-only models of named shapes (SmolLM2-135M, a 1.2B Llama-3.2 shape, Llama-2-7B). Nothing here asserts
speed. The runtime fuses the model's projections and norms when its options say so (`--fuse`,
yarnkit/runtime/fused.py; each result says what ran fused); the baselines and peers (`recompute`, `dense`,
`hf_generate`, the path check's eager reference) time stock transformers, so they undo such a fuse first (the
path check also runs its eager cache once on the fused model, before undoing it).

Test: `python -m pytest tests/test_bench_streaming.py -q` (CPU, tiny shapes).
"""

from __future__ import annotations

import statistics
import time

import torch

from yarnkit.models import cache_kwargs
from yarnkit.runtime import fused
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.sampling import choose_tokens
from yarnkit.runtime.static import make_pool

SHAPES = {  # timing-only model shapes (random init); vocabularies and widths of the named models
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-1.2b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, rope_theta=10000.0, tie_word_embeddings=False),
}


def random_model(shape: str, device: str, dtype: torch.dtype, max_positions: int = 8192):
    """A Llama of a named shape with random weights, built directly on `device` (timing only)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def parameters_b(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e9


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"p50_ms": 1e3 * statistics.median(ordered), "p99_ms": 1e3 * ordered[min(len(ordered) - 1,
                                                                                     int(0.99 * len(ordered)))],
            "mean_ms": 1e3 * statistics.fmean(ordered), "steps": len(ordered)}


def random_ids(count: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def engine_stream(model, cache: int, steps: int, warmup: int = 8, sinks: int = 4, **options) -> dict:
    """The runtime's decode through a full, evicting cache of `cache` tokens: per-step p50/p99, eviction steps.

    Untimed first: the prompt, `warmup` steps and two evictions (graph captures and compilation happen there)."""
    device = next(model.parameters()).device
    engine = StreamingEngine(model, sinks=sinks, window=cache, **options)
    vocab = model.config.vocab_size
    evict = engine.options.evict_batch
    tokens = random_ids(cache + warmup + 2 * evict + steps + 8, vocab, seed=1)
    start = time.perf_counter()
    engine.feed(tokens[:cache][None], all_logits=False)
    used = cache
    while used - cache < warmup or engine.cache.rerotations < 2:
        engine.feed(tokens[used].view(1, 1), all_logits=False)
        used += 1
    sync(device)
    warm_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times, evicting = [], []
    for token in tokens[used:used + steps]:
        rerotations = engine.cache.rerotations
        sync(device)
        t0 = time.perf_counter()
        engine.feed(token.view(1, 1), all_logits=False)
        sync(device)
        times.append(time.perf_counter() - t0)
        evicting.append(engine.cache.rerotations > rerotations)
    spikes = [t for t, e in zip(times, evicting) if e]
    plain = [t for t, e in zip(times, evicting) if not e]
    result = {**percentiles(times), "max_ms": 1e3 * max(times), "evicting_steps": len(spikes),
              "evicting_step_p50_ms": 1e3 * statistics.median(spikes) if spikes else None,
              "plain_step_p50_ms": 1e3 * statistics.median(plain) if plain else None,
              "warmup_seconds": round(warm_seconds, 2), "decode_path": engine.decode_path,
              "decode_attention": engine.options.decode_attention,
              "compiled": compiled(engine), "graph_fallback": engine.decoder.fallback_reason,
              **fused.fused_parts(model), "evict_batch": evict, "cache": cache}
    result["p99_over_p50"] = result["p99_ms"] / result["p50_ms"]
    if device.type == "cuda":
        result.update(peak_cuda_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                      memory_growth_mib=round((torch.cuda.memory_allocated(device) - before) / 2**20, 2))
    engine.close()
    return result


def compiled(engine) -> bool:
    """Whether the engine's decode step really runs through torch.compile (only the CUDA graph path compiles)."""
    return bool(getattr(engine.decoder.pool, "compiled", False))


def timed(step, count: int, warmup: int, device) -> list[float]:
    times = []
    for i in range(warmup + count):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def recompute(model, cache: int, steps: int, warmup: int = 2) -> dict:
    """Sliding window with re-computation: a fresh forward over the last `cache` tokens (ids on the device)."""
    fused.unfuse(model)
    device = next(model.parameters()).device
    ids = random_ids(cache + warmup + steps, model.config.vocab_size, seed=2).to(device)
    times = timed(lambda i: model(ids[None, i:i + cache], use_cache=False, logits_to_keep=1), steps, warmup, device)
    return percentiles(times)


@torch.no_grad()
def dense(model, cache: int, steps: int, warmup: int = 2) -> dict:
    """Plain HF decode with a growing `DynamicCache` that already holds `cache` tokens (eager)."""
    from transformers import DynamicCache

    fused.unfuse(model)
    device = next(model.parameters()).device
    ids = random_ids(cache + warmup + steps, model.config.vocab_size, seed=3).to(device)
    past = DynamicCache()
    model(ids[None, :cache], use_cache=True, logits_to_keep=1, **cache_kwargs(past))
    times = timed(lambda i: model(ids[None, cache + i:cache + i + 1], use_cache=True,
                                  **cache_kwargs(past)), steps, warmup, device)
    return percentiles(times)


class StepClock:
    """A `generate` streamer that timestamps every new token (the host sees it: the step is done)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        value.cpu()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def hf_generate(model, cache: int, new_tokens: int, cache_implementation: str, compile: bool | None) -> dict:
    """transformers' `generate` after a prompt of `cache` tokens: per-token times (greedy), after one untimed
    identical call (which compiles, when `generate` compiles). `compile=None` leaves generate's own default."""
    from transformers import GenerationConfig

    fused.unfuse(model)
    device = next(model.parameters()).device
    prompt = random_ids(cache, model.config.vocab_size, seed=4)[None].to(device)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=None,  # "dynamic": generate's default cache
                              cache_implementation=None if cache_implementation == "dynamic" else cache_implementation)
    if compile is not None:
        config.disable_compile = not compile
    start = time.perf_counter()
    model.generate(prompt, generation_config=config)
    first_call = time.perf_counter() - start
    clock = StepClock()
    model.generate(prompt, generation_config=config, streamer=clock)
    steps = [b - a for a, b in zip(clock.stamps[2:], clock.stamps[3:])]  # [0] prompt, [1] first token (prefill)
    return {**percentiles(steps), "cache_implementation": cache_implementation, "first_call_seconds":
            round(first_call, 1), "compile": "default" if compile is None else compile}


@torch.no_grad()
def batch_throughput(model, cache: int, sessions: int, steps: int, warmup: int = 4, check_tokens: int = 64,
                     **options) -> dict:
    """Aggregate greedy tokens/s of `sessions` sessions decoded together vs one alone (same path), and whether
    each session's first `check_tokens` tokens equal its solo run."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    options = StreamOptions(sinks=4, window=cache, **options).resolved(model.config, device, pooled=True)
    check_tokens = min(check_tokens, warmup + steps)

    def run(count: int, total_steps: int, record: int):
        pool = make_pool(model, options, rows=count)
        engines = [StreamingEngine(model, options, pool=pool) for _ in range(count)]
        logits = torch.stack([engine.feed(random_ids(cache - 16, vocab, seed=10 + i)[None], all_logits=False)[0, -1]
                              for i, engine in enumerate(engines)])
        produced = [[] for _ in engines]
        sync(device)
        start = None
        for step in range(warmup + total_steps):
            if step == warmup:
                sync(device)
                start = time.perf_counter()
            chosen = choose_tokens(logits, [0.0] * count, [1.0] * count, [None] * count)  # as the server: on the
            # device, one copy of the ids to the host per step
            for i, token in enumerate(chosen):
                if len(produced[i]) < record:
                    produced[i].append(token)
            logits = StreamingEngine.decode_together(engines, chosen)
        sync(device)
        seconds = time.perf_counter() - start
        path = engines[0].decode_path
        for engine in engines:
            engine.close()
        return count * total_steps / seconds, produced, path

    together, produced, path = run(sessions, steps, check_tokens)
    alone_rate, _, _ = run(1, steps, 0)
    agree = []
    for i in range(sessions):
        pool = make_pool(model, options, rows=1)
        engine = StreamingEngine(model, options, pool=pool)
        logits = engine.feed(random_ids(cache - 16, vocab, seed=10 + i)[None], all_logits=False)[0, -1]
        solo = []
        for _ in range(len(produced[i])):
            solo.append(int(logits.argmax()))
            logits = engine.feed(torch.tensor([[solo[-1]]]), all_logits=False)[0, -1]
        engine.close()
        same = next((k for k, (a, b) in enumerate(zip(solo, produced[i])) if a != b), len(solo))
        agree.append(same)
    return {"sessions": sessions, "cache": cache, "tokens_per_s_together": together, "tokens_per_s_alone": alone_rate,
            "speedup": together / alone_rate, "decode_path": path, **fused.fused_parts(model),
            "decode_attention": options.decode_attention, "check_tokens": check_tokens,
            "identical_prefix_tokens": agree, "all_identical": all(a == check_tokens for a in agree)}


NEAR_TIE = 2e-3  # nats: a row whose best token leads by less is a near-tie that a rounding may break either way


def share(mask: torch.Tensor) -> float:
    """The share of True in `mask`, counted in integers: a float32 mean on CUDA multiplies by a rounded 1/n, so 97
    agreeing rows of 97 came out as 0.99999994 and failed an equality bound."""
    return int(mask.sum()) / mask.numel()


def decided_agreement(reference: torch.Tensor, other: torch.Tensor, margin: float = NEAR_TIE) -> tuple[float, int]:
    """Greedy agreement of two `[rows, vocab]` log-prob tables over the rows where `reference`'s best token leads its
    runner-up by more than `margin` (float32 paths differ by ~1e-5, enough to flip a near-tie), and that row count."""
    top2 = reference.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > margin
    if not decided.any():
        return 0.0, 0
    same = reference.argmax(-1)[decided] == other.argmax(-1)[decided]
    return share(same), int(decided.sum())


@torch.no_grad()
def path_check(model, decode: str, window: int = 256, prompt: int = 256, steps: int = 96, evict_batch: int = 16,
               ids: torch.Tensor | None = None, float32_logits: bool | None = None, reference=None,
               **options) -> dict:
    """`decode` path vs the eager cache on the same tokens through evictions: max |log-prob difference|, greedy
    agreement (bf16 on GPU; an identical path gives 0). `ids`: `prompt + steps` tokens to feed (default random);
    `float32_logits` goes to both paths, `options` (e.g. compile) to the `decode` path only. `reference`: a
    float32 copy of the model (e.g. `model.float()` of a copy): every run is also compared with its eager cache
    (`vs_reference`, keyed `decode` ("decode_path" when it is "eager"), "eager" and "eager_same_fuse"), which says
    which path is further from the truth. The eager run of the headline numbers is stock transformers: a fuse the
    `decode` path made (`fused_projections`, `fused_norms`) is undone after it ran. When the `decode` path ran
    fused, the eager cache also runs once on the same fused model first (`same_fuse`: the same numbers against it;
    `vs_reference["eager_same_fuse"]`): then both paths share every kernel but attention, so what differs is the
    cache and its attention, not the fuse's rounding (fused.py: one bf16 rounding per norm instead of two)."""
    ids = random_ids(prompt + steps, model.config.vocab_size, seed=5) if ids is None else ids[:prompt + steps]
    logps, engines = {}, {}
    runs = [("ours", model, decode, options), ("eager", model, "eager", {})]
    runs += [("reference", reference, "eager", {})] if reference is not None else []
    for name, net, path, extra in runs:
        if name == "eager":
            fuse = fused.fused_parts(model)
            if fused.is_fused(model):
                logps["same_fuse"], engines["same_fuse"] = feed_through(net, path, ids, prompt, window, evict_batch,
                                                                        float32_logits, {"fuse": True})
            fused.unfuse(model)
        logps[name], engines[name] = feed_through(net, path, ids, prompt, window, evict_batch, float32_logits, extra)
    ours = engines["ours"]
    result = {"decode_path": ours.decode_path, "decode_attention": ours.options.decode_attention,
              "compiled": compiled(ours), **fuse, "steps": steps + 1, "rerotations": ours.cache.rerotations,
              **compare(logps["ours"], logps["eager"])}
    if "same_fuse" in logps:
        result["same_fuse"] = compare(logps["ours"], logps["same_fuse"])
    if reference is not None:
        names = {"ours": decode if decode != "eager" else "decode_path", "eager": "eager",
                 "same_fuse": "eager_same_fuse"}
        result["vs_reference"] = {names[name]: compare(logp, logps["reference"])
                                  for name, logp in logps.items() if name != "reference"}
    for engine in engines.values():
        engine.close()
    return result


def feed_through(model, decode: str, ids: torch.Tensor, prompt: int, window: int, evict_batch: int,
                 float32_logits: bool | None, options: dict) -> tuple[torch.Tensor, StreamingEngine]:
    """The prompt as one feed, then one token at a time: float32 log-probs `[1 + len(ids) - prompt, vocab]` of the
    last position after each feed, and the engine (to close)."""
    engine = StreamingEngine(model, sinks=4, window=window, evict_batch=evict_batch, decode=decode,
                             float32_logits=float32_logits, **options)
    rows = [engine.feed(ids[:prompt][None], all_logits=False)[0, -1]]
    rows += [engine.feed(token.view(1, 1), all_logits=False)[0, -1] for token in ids[prompt:]]
    return torch.log_softmax(torch.stack(rows).float(), dim=-1), engine


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Max |log-prob difference|, greedy agreement, and the agreement over the rows `theirs` decides (ties out)."""
    decided, rows = decided_agreement(theirs, ours)
    return {"max_abs_logprob_diff": (ours - theirs).abs().max().item(), "greedy_agreement": agreement(ours, theirs),
            "decided_agreement": decided, "decided_rows": rows}


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of rows whose greedy (argmax) token is the same."""
    return share(a.argmax(-1) == b.argmax(-1))
