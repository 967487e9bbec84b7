"""Benchmark the streaming runtime: perplexity, per-token latency, memory, and long-range recall (JSON + PNG).

  # CPU smoke (about a minute):
  python scripts/bench_runtime.py --out runs/bench-smoke --tokens 3000 --window 252 --chunk 64 \\
      --latency-caches 64 256 --latency-steps 8 --stream-steps 64 --recall-trials 2 --recall-filler 600
  # GPU (one H100, ~8 min; see docs/runtime.md):
  python scripts/bench_runtime.py --out runs/bench-gpu --device cuda --dtype bfloat16 \\
      --books /path/to/pg19/test_*.txt.gz --tokens 1000000 --chunk 256

Measures, on one token stream cut from the books:
1. streaming perplexity: sinks+window (StreamingLLM) vs sliding window with re-computation (same window) vs
   window only (0 sinks). Tokens are fed `--chunk` at a time: a chunk's tokens see between window-chunk and
   window earlier tokens, identically for all three methods.
2. per-token decode latency with a full cache of 256/1024/4096: sinks cache vs recompute vs dense decode
   (plain HF cache at that length), p50 and p99 over `--latency-steps`, plus p50/p99 and peak memory over a
   `--stream-steps` decode that keeps evicting.
3. recall: a fact (a random 6-digit code) stated early, asked after `--recall-filler` tokens of book text (more
   than the window): plain sinks vs SirLLM retention; accuracy of the greedy answer and the answer's NLL.
It is not a unit test: nothing here asserts speed. Outputs: OUT/bench_runtime.json and OUT/bench_runtime.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from yarnkit.runtime.engine import StreamingEngine


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
    p.add_argument("--latency-steps", type=int, default=64)
    p.add_argument("--stream-steps", type=int, default=2048, help="decode steps of the eviction-latency stream")
    p.add_argument("--recall-trials", type=int, default=20)
    p.add_argument("--recall-filler", type=int, default=3000, help="book tokens between fact and question")
    p.add_argument("--sirllm-keep", type=int, default=256)
    return p.parse_args(argv)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def load_tokens(tokenizer, books, limit):
    from yarnkit.corpus import iter_documents

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


@torch.no_grad()
def latency(model, ids, cache, steps, device, sinks):
    """Per-token decode at a full cache of `cache` tokens: sinks cache, recompute over the window, dense decode."""
    from transformers import DynamicCache

    prompt, extra = ids[:cache][None], ids[cache:cache + steps]
    result = {}
    engine = StreamingEngine(model, sinks=sinks, window=cache - sinks, evict_batch=max(1, cache // 16))
    engine.feed(prompt)
    times = []
    for token in extra:
        sync(device); start = time.perf_counter()
        engine.feed(token.view(1, 1))
        sync(device); times.append(time.perf_counter() - start)
    result["sinks"] = percentiles(times)
    times, context = [], prompt[0].tolist()
    for token in extra:
        context = (context + [int(token)])[-cache:]
        sync(device); start = time.perf_counter()
        model(torch.tensor([context], device=device))
        sync(device); times.append(time.perf_counter() - start)
    result["recompute"] = percentiles(times)
    past = DynamicCache()
    model(prompt.to(device), past_key_values=past, use_cache=True)
    times = []
    for token in extra:
        sync(device); start = time.perf_counter()
        model(token.view(1, 1).to(device), past_key_values=past, use_cache=True)
        sync(device); times.append(time.perf_counter() - start)
    result["dense"] = percentiles(times)
    result["speedup_vs_recompute"] = result["recompute"]["p50_ms"] / result["sinks"]["p50_ms"]
    return result


@torch.no_grad()
def stream_latency(model, ids, steps, device, sinks, window):
    """Decode `steps` tokens through a full, evicting cache: p50/p99 (eviction spikes) and peak memory."""
    engine = StreamingEngine(model, sinks=sinks, window=window)
    engine.feed(ids[:sinks + window][None])
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for token in tqdm(ids[sinks + window:sinks + window + steps], desc="stream latency", leave=False):
        sync(device); start = time.perf_counter()
        engine.feed(token.view(1, 1))
        sync(device); times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if str(device).startswith("cuda") else None
    return {**percentiles(times), "peak_cuda_mib": peak, **engine.stats()}


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
    ppl = report["perplexity"]
    names = [k for k in ("sinks", "recompute", "window_only") if k in ppl]
    left.bar(names, [ppl[k] for k in names])
    left.set_yscale("log")
    left.set_title(f"streaming PPL over {report['stream_tokens']} tokens")
    caches = sorted(report["latency"], key=int)
    for method in ("sinks", "recompute", "dense"):
        right.plot([int(c) for c in caches], [report["latency"][c][method]["p50_ms"] for c in caches], "o-",
                   label=method)
    right.set_xscale("log", base=2)
    right.set_xlabel("cache tokens")
    right.set_ylabel("p50 ms / token")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    need = max(args.tokens, max(args.latency_caches) + args.latency_steps, args.sinks + args.window
               + args.stream_steps, args.recall_filler + 1)
    ids = load_tokens(tokenizer, books, need)
    stream = ids[:args.tokens]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "random_init": args.random_init, "device": args.device, "dtype": args.dtype, "stream_tokens": len(stream),
              "sinks": args.sinks, "window": args.window, "chunk": args.chunk, "books": books}
    start = time.time()
    report["perplexity"] = {
        "sinks": stream_ppl_engine(model, stream, args.chunk, sinks=args.sinks, window=args.window),
        "recompute": stream_ppl_recompute(model, stream, args.chunk, args.sinks + args.window),
        "window_only": stream_ppl_engine(model, stream, args.chunk, sinks=0, window=args.sinks + args.window)}
    report["latency"] = {str(c): latency(model, ids, c, args.latency_steps, args.device, args.sinks)
                         for c in args.latency_caches if c + args.latency_steps <= len(ids)}
    report["stream_latency"] = stream_latency(model, ids, args.stream_steps, args.device, args.sinks, args.window)
    report["recall"] = recall(model, tokenizer, ids, args.recall_trials, args.recall_filler, args.sinks,
                              args.window, args.sirllm_keep)
    report["seconds"] = round(time.time() - start, 1)
    (out / "bench_runtime.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "bench_runtime.png")
    print(json.dumps({k: report[k] for k in ("perplexity", "recall", "seconds")}, indent=2))
    return report


if __name__ == "__main__":
    main()
