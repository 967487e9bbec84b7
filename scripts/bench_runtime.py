"""Benchmark the streaming runtime: perplexity, per-token latency, memory, and long-range recall (JSON + PNG).

  # CPU smoke (about a minute):
  python scripts/bench_runtime.py --out runs/bench-smoke --tokens 3000 --window 252 --chunk 64 \\
      --latency-caches 64 256 --latency-steps 8 --stream-steps 64 --recall-trials 2 --recall-filler 600
  # GPU latency only (one H200, ~3 min; see docs/runtime.md):
  python scripts/bench_runtime.py --out runs/bench-latency --device cuda --dtype bfloat16 \\
      --books BOOKS/test_*.txt.gz --parts latency stream --decode auto eager --stream-steps 2048
  # GPU everything (one H100/H200, ~9 min):
  python scripts/bench_runtime.py --out runs/bench-gpu --device cuda --dtype bfloat16 \\
      --books /path/to/pg19/test_*.txt.gz --tokens 1000000 --chunk 256

Measures, on one token stream cut from the books (`--parts` picks which):
1. ppl: streaming perplexity: sinks+window (StreamingLLM) vs sliding window with re-computation (same window)
   vs window only (0 sinks). Tokens are fed `--chunk` at a time: a chunk's tokens see between window-chunk and
   window earlier tokens, identically for all three methods.
2. latency: per-token decode latency with a full cache of 256/1024/4096 tokens, p50 and p99 over
   `--latency-steps` after untimed warm-up steps (at least `--warmup` and two evictions: graph captures happen
   there):
   - sinks: the runtime's `StreamingEngine` (sinks + window = cache), once per `--decode` path; the first path
     gives the headline and the speed-up; the path that actually ran is reported (graph falls back loudly);
   - recompute: StreamingLLM's baseline, a fresh eager HF forward (SDPA, no KV cache) over the last `cache`
     tokens for every generated token; input ids already on the device, logits of the last position only;
   - dense: plain HF decode with a growing `DynamicCache` that already holds `cache` tokens (eager).
   - path check: the first path against the eager cache on the same 353 tokens (through evictions): max
     |log-prob difference| and greedy agreement, so a graph that replays wrongly would show.
3. stream: decode `--stream-steps` tokens through a full, evicting cache: p50/p99 (eviction spikes), p99/p50,
   the eviction cost alone, peak memory and its growth over the stream (flat when nothing leaks).
4. recall: a fact (a random 6-digit code) stated early, asked after `--recall-filler` tokens of book text (more
   than the window): plain sinks vs SirLLM retention; accuracy of the greedy answer and the answer's NLL.
It is not a unit test: nothing here asserts speed. Outputs: OUT/bench_runtime.json, OUT/bench_runtime.png and a
short table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's yarnkit, even if another is installed
from yarnkit.runtime.engine import StreamingEngine  # noqa: E402


PARTS = ("ppl", "latency", "stream", "recall")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--books", nargs="*", default=None, help="book files (.txt/.gz); default: the bundled samples")
    p.add_argument("--out", default="runs/bench-runtime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--random-init", action="store_true",
                   help="timing only: build the model from MODEL's config.json with random weights")
    p.add_argument("--tokens", type=int, default=1_000_000, help="perplexity stream length")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--chunk", type=int, default=256, help="tokens fed per forward in the perplexity stream")
    p.add_argument("--latency-caches", type=int, nargs="*", default=[256, 1024, 4096])
    p.add_argument("--latency-steps", type=int, default=256)
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps before each timed run")
    p.add_argument("--stream-steps", type=int, default=4096, help="decode steps of the eviction-latency stream")
    p.add_argument("--decode", nargs="+", default=["auto"], choices=["auto", "eager", "static", "graph"],
                   help="sink-cache decode paths to time (auto: graph on CUDA, else eager); the first is the headline")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="what to measure")
    p.add_argument("--recall-trials", type=int, default=20)
    p.add_argument("--recall-filler", type=int, default=3000, help="book tokens between fact and question")
    p.add_argument("--sirllm-keep", type=int, default=256)
    return p.parse_args(argv)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def load_tokens(tokenizer, books, limit):
    from yarnkit.train.corpus import iter_documents

    ids: list[int] = []
    for book in books:
        for _, text in iter_documents(book):
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) >= limit:
                return torch.tensor(ids[:limit])
    return torch.tensor(ids)


def nll_of(logits, targets):
    return torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum").item()


@torch.no_grad()
def stream_ppl_engine(model, ids, chunk, **options):
    engine = StreamingEngine(model, prefill_chunk=chunk, evict_batch=chunk, **options)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(ids) - 1, chunk), desc=f"ppl sinks={options['sinks']}", leave=False):
        piece = ids[start:start + chunk + 1]
        logits = engine.feed(piece[:-1][None])[0]
        total, count = total + nll_of(logits, piece[1:]), count + len(piece) - 1
    return math.exp(total / count)


@torch.no_grad()
def stream_ppl_recompute(model, ids, chunk, window):
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(ids) - 1, chunk), desc="ppl recompute", leave=False):
        piece = ids[start:start + chunk + 1]
        context = ids[max(0, start - (window - chunk)):start]
        inputs = torch.cat((context, piece[:-1]))[None].to(device)
        logits = model(inputs).logits[0, len(context):]
        total, count = total + nll_of(logits, piece[1:]), count + len(piece) - 1
    return math.exp(total / count)


def percentiles(times):
    ordered = sorted(times)
    return {"p50_ms": 1e3 * statistics.median(ordered), "p99_ms": 1e3 * ordered[min(len(ordered) - 1,
                                                                                     int(0.99 * len(ordered)))]}


def timed(step, items, warmup, device):
    """Run `step(item)` untimed on the first `warmup` items, then time each of the rest (device-synchronised)."""
    times = []
    for i, item in enumerate(items):
        sync(device)
        start = time.perf_counter()
        step(item)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def eviction_slack(cache: int) -> int:
    """Extra warm-up tokens for a sinks engine: two default-size evictions (window // 16 each) and a spare."""
    return 2 * max(1, cache // 16) + 2


def warm_up(engine, tokens, warmup) -> int:
    """Feed tokens one by one until `warmup` are fed AND two evictions happened (on CUDA the decode graph is
    captured on the first step and an eviction graph on the second eviction); returns how many were fed."""
    fed = 0
    while fed < warmup or engine.cache.rerotations < 2:
        if fed == len(tokens):
            raise ValueError(f"{len(tokens)} warm-up tokens did not reach two evictions; raise --warmup")
        engine.feed(tokens[fed].view(1, 1))
        fed += 1
    return fed


@torch.no_grad()
def latency(model, ids, cache, steps, warmup, device, sinks, decodes):
    """Per-token decode at a full cache of `cache` tokens: sinks cache (each decode path), recompute, dense."""
    from transformers import DynamicCache

    total = warmup + steps
    prompt, extra = ids[:cache][None], ids[cache:cache + total + eviction_slack(cache)]
    result = {}
    for i, decode in enumerate(decodes):
        engine = StreamingEngine(model, sinks=sinks, window=cache - sinks, decode=decode)
        engine.feed(prompt)
        used = warm_up(engine, extra, warmup)
        times = timed(lambda token: engine.feed(token.view(1, 1)), extra[used:used + steps], 0, device)
        name = "sinks" if i == 0 else f"sinks_{decode}"
        result[name] = {**percentiles(times), "decode_path": engine.decode_path,
                        "graph_fallback": engine.stats()["graph_fallback"], "evict_batch": engine.options.evict_batch}
        del engine
    on_device = ids[:cache + total].to(device)

    def recompute(t):  # the window ending at token t, fresh forward, no cache
        model(on_device[None, t - cache + 1:t + 1], use_cache=False, logits_to_keep=1)

    result["recompute"] = percentiles(timed(recompute, range(cache, cache + total), warmup, device))
    past = DynamicCache()
    model(prompt.to(device), past_key_values=past, use_cache=True, logits_to_keep=1)
    step = lambda t: model(on_device[None, t:t + 1], past_key_values=past, use_cache=True)  # noqa: E731
    result["dense"] = percentiles(timed(step, range(cache, cache + total), warmup, device))
    del past
    result["speedup_vs_recompute"] = result["recompute"]["p50_ms"] / result["sinks"]["p50_ms"]
    result["speedup_vs_dense"] = result["dense"]["p50_ms"] / result["sinks"]["p50_ms"]
    return result


@torch.no_grad()
def path_check(model, ids, decode, sinks, window=252, prompt=256, steps=96):
    """The timed path against the eager cache on the same tokens, through evictions: max |log-prob difference|
    and how often the greedy token agrees (bf16 on GPU: small differences; float32 on CPU: ~1e-5)."""
    engines = [StreamingEngine(model, sinks=sinks, window=window, decode=path) for path in (decode, "eager")]
    logps = []
    for engine in engines:
        rows = [engine.feed(ids[:prompt][None])[0, -1]]
        rows += [engine.feed(token.view(1, 1))[0, -1] for token in ids[prompt:prompt + steps]]
        logps.append(torch.log_softmax(torch.stack(rows).float(), dim=-1))
    return {"decode_path": engines[0].decode_path, "steps": steps + 1, "rerotations": engines[0].cache.rerotations,
            "max_abs_logprob_diff": (logps[0] - logps[1]).abs().max().item(),
            "greedy_agreement": (logps[0].argmax(-1) == logps[1].argmax(-1)).float().mean().item()}


def memory_now(device):
    if str(device).startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def stream_latency(model, ids, steps, warmup, device, sinks, window, decode):
    """Decode `steps` tokens through a full, evicting cache: p50/p99 (eviction spikes), eviction cost, memory."""
    engine = StreamingEngine(model, sinks=sinks, window=window, decode=decode)
    engine.feed(ids[:sinks + window][None])
    tokens = ids[sinks + window:sinks + window + warmup + steps + eviction_slack(window)]
    used = warm_up(engine, tokens, warmup)
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    before = memory_now(device)
    times, evicting = [], []
    for token in tqdm(tokens[used:used + steps], desc="stream latency", leave=False):
        rerotations = engine.cache.rerotations
        sync(device)
        start = time.perf_counter()
        engine.feed(token.view(1, 1))
        sync(device)
        times.append(time.perf_counter() - start)
        evicting.append(engine.cache.rerotations > rerotations)
    peak = torch.cuda.max_memory_allocated() / 2**20 if str(device).startswith("cuda") else None
    stats = percentiles(times)
    spikes = [t for t, e in zip(times, evicting) if e]
    plain = [t for t, e in zip(times, evicting) if not e]
    return {**stats, "p99_over_p50": stats["p99_ms"] / stats["p50_ms"], "max_ms": 1e3 * max(times),
            "evicting_steps": len(spikes), "evicting_step_p50_ms": 1e3 * statistics.median(spikes) if spikes else None,
            "plain_step_p50_ms": 1e3 * statistics.median(plain) if plain else None,
            "peak_cuda_mib": peak, "memory_growth_mib": memory_now(device) - before, **engine.stats()}


@torch.no_grad()
def recall(model, tokenizer, ids, trials, filler, sinks, window, sirllm_keep):
    """Fact early, question late; greedy answer accuracy and answer NLL for plain sinks vs SirLLM."""
    rng = random.Random(0)
    results = {"sinks": [], "sirllm": []}
    for trial in tqdm(range(trials), desc="recall", leave=False):
        code = f"{rng.randrange(10**5, 10**6)}"
        fact = f"Remember this: the secret code is {code}. "
        question = " Now, what was the secret code? The secret code is "
        start = rng.randrange(0, max(1, len(ids) - filler))
        text_ids = ids[start:start + filler].tolist()
        fact_ids = tokenizer(fact, add_special_tokens=False)["input_ids"]
        q_ids = tokenizer(question.rstrip(), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(" " + code, add_special_tokens=False)["input_ids"]
        for name, keep in (("sinks", 0), ("sirllm", sirllm_keep)):
            engine = StreamingEngine(model, sinks=sinks, window=window, sirllm_keep=keep, sirllm_decay=1.0)
            engine.feed(torch.tensor([fact_ids + text_ids + q_ids]))
            before = engine.last_logits.clone()  # predicts the first answer token
            logits = engine.feed(torch.tensor([answer_ids]))[0]
            prev = torch.cat((before[None], logits[:-1]))  # teacher-forced argmax == greedy decoding
            nll = nll_of(prev, torch.tensor(answer_ids)) / len(answer_ids)
            greedy = [int(t) for t in prev.argmax(-1)]
            results[name].append({"correct": greedy == answer_ids, "answer_nll": nll})
    return {name: {"accuracy": sum(r["correct"] for r in rows) / len(rows),
                   "answer_nll": statistics.mean(r["answer_nll"] for r in rows)} for name, rows in results.items()}


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ppl = report.get("perplexity", {})
    names = [k for k in ("sinks", "recompute", "window_only") if k in ppl]
    left.bar(names, [ppl[k] for k in names])
    left.set_yscale("log")
    left.set_title(f"streaming PPL over {report['stream_tokens']} tokens" if ppl else "perplexity not measured")
    latencies = report.get("latency", {})
    caches = sorted(latencies, key=int)
    methods = sorted({m for c in caches for m, v in latencies[c].items() if isinstance(v, dict)})
    for method in methods:
        label = f"{method} ({latencies[caches[0]][method]['decode_path']})" if method.startswith("sinks") else method
        right.plot([int(c) for c in caches], [latencies[c][method]["p50_ms"] for c in caches], "o-", label=label)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("cache tokens")
    right.set_ylabel("p50 ms / token")
    if methods:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(report) -> str:
    """The short table printed last."""
    lines = [f"device {report['device']} {report['dtype']}, {report['seconds']} s"]
    for name, value in report.get("perplexity", {}).items():
        lines.append(f"ppl {name:<12} {value:8.2f}")
    for cache, row in sorted(report.get("latency", {}).items(), key=lambda kv: int(kv[0])):
        cells = "  ".join(f"{m} {v['p50_ms']:.2f}/{v['p99_ms']:.2f}" + (f" [{v['decode_path']}]" if "decode_path" in v
                                                                          else "")
                          for m, v in row.items() if isinstance(v, dict))
        lines.append(f"cache {cache:>5} p50/p99 ms: {cells}  speed-up vs recompute {row['speedup_vs_recompute']:.1f}x")
    if "stream_latency" in report:
        s = report["stream_latency"]
        lines.append(f"stream [{s['decode_path']}] p50 {s['p50_ms']:.2f} p99 {s['p99_ms']:.2f} ms, p99/p50 "
                     f"{s['p99_over_p50']:.2f}, {s['evicting_steps']} evicting steps, peak {s['peak_cuda_mib']} MiB, "
                     f"growth {s['memory_growth_mib']:.1f} MiB" + (f", graph fallback: {s['graph_fallback']}"
                                                                   if s["graph_fallback"] else ""))
    if "path_check" in report:
        c = report["path_check"]
        lines.append(f"path check [{c['decode_path']} vs eager, {c['steps']} steps, {c['rerotations']} evictions]: "
                     f"max |dlogp| {c['max_abs_logprob_diff']:.3g}, greedy agreement {c['greedy_agreement']:.3f}")
    for name, value in report.get("recall", {}).items():
        lines.append(f"recall {name:<7} accuracy {value['accuracy']:.2f} answer NLL {value['answer_nll']:.2f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    from yarnkit.assets import sample_path
    from yarnkit.models import load_model

    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from yarnkit.models import to_dtype

        config = AutoConfig.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(config, dtype=to_dtype(args.dtype), attn_implementation="sdpa")
        model, tokenizer = model.to(args.device).eval(), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    books = args.books or [str(sample_path("eval")), str(sample_path("train"))]
    biggest = max(args.latency_caches)
    need = max(args.tokens if "ppl" in args.parts else 0,
               biggest + args.warmup + args.latency_steps + eviction_slack(biggest),
               args.sinks + args.window + args.warmup + args.stream_steps + eviction_slack(args.window),
               args.recall_filler + 1, 256 + 96)
    ids = load_tokens(tokenizer, books, need)
    stream = ids[:args.tokens] if "ppl" in args.parts else ids[:0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "bench_runtime.log")], force=True)
    import transformers

    report = {"model": args.model, "random_init": args.random_init, "device": args.device, "dtype": args.dtype,
              "gpu": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else None,
              "torch": torch.__version__, "transformers": transformers.__version__, "stream_tokens": len(stream),
              "sinks": args.sinks, "window": args.window, "chunk": args.chunk, "decode": args.decode, "books": books}
    logging.info("bench_runtime %s", json.dumps({k: v for k, v in report.items() if k != "books"}))
    start = time.time()
    if "ppl" in args.parts:
        report["perplexity"] = {
            "sinks": stream_ppl_engine(model, stream, args.chunk, sinks=args.sinks, window=args.window),
            "recompute": stream_ppl_recompute(model, stream, args.chunk, args.sinks + args.window),
            "window_only": stream_ppl_engine(model, stream, args.chunk, sinks=0, window=args.sinks + args.window)}
    if "latency" in args.parts:
        report["latency"] = {str(c): latency(model, ids, c, args.latency_steps, args.warmup, args.device,
                                             args.sinks, args.decode)
                             for c in tqdm(args.latency_caches, desc="latency", leave=False)
                             if c + args.warmup + args.latency_steps + eviction_slack(c) <= len(ids)}
    if "latency" in args.parts:
        report["path_check"] = path_check(model, ids, args.decode[0], args.sinks)
    if "stream" in args.parts:
        report["stream_latency"] = stream_latency(model, ids, args.stream_steps, args.warmup, args.device,
                                                  args.sinks, args.window, args.decode[0])
    if "recall" in args.parts:
        report["recall"] = recall(model, tokenizer, ids, args.recall_trials, args.recall_filler, args.sinks,
                                  args.window, args.sirllm_keep)
    report["seconds"] = round(time.time() - start, 1)
    (out / "bench_runtime.json").write_text(json.dumps(report, indent=2))
    logging.info("wrote %s", out / "bench_runtime.json")
    plot(report, out / "bench_runtime.png")
    print(summary(report))
    return report


if __name__ == "__main__":
    main()
