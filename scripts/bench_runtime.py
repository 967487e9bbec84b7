"""Benchmark the streaming runtime: decode latency vs peers, batched sessions, scale, perplexity, recall (JSON + PNG).

  # CPU smoke (tiny random shape, about a minute):
  python scripts/bench_runtime.py --out runs/bench-smoke --model tiny --random-init --caches 64 256 \\
      --steps 16 --parts latency peers batch scale --scale-shapes tiny
  # perplexity on CPU (bundled books, eval/stream's policies):
  python scripts/bench_runtime.py --out runs/bench-ppl --parts ppl --tokens 3000 --window 256 --chunk 64
  # the GPU run of docs/results.md §3 (one H200, ~3 minutes):
  python scripts/bench_runtime.py --out runs/bench-gpu --device cuda --dtype bfloat16 --model smollm2-135m \\
      --random-init --parts latency peers batch scale compiled hf-compiled --deadline 170

Parts (`--parts`; each result is written to OUT/bench_runtime.json as soon as it is measured):
- latency: the runtime's decode (`--decode`, CUDA graph on a GPU) through a full, evicting cache of each
  `--caches` size: p50/p99 per token, p99/p50, eviction steps; plus re-computation (a fresh forward over the last
  `cache` tokens per token, StreamingLLM's baseline) and plain HF dense decode; a path check (log-probs vs the
  eager cache through evictions).
- peers: transformers' `generate` at the largest cache with a dynamic cache, and a static cache without compile.
- hf-compiled: `generate` with a static cache and its own default auto-compile (slow to start: run it last).
- compiled: the runtime's graph with `torch.compile` inside the captured step (latency, stream, path check).
- batch: for each of `--sessions` (e.g. 1 2 4 8 16), that many sessions decoded together vs one alone
  (aggregate tokens/s, greedy agreement with each session's solo run).
- scale: runtime vs re-computation at the largest cache for `--scale-shapes` (random init, timing only).
- ppl: streaming perplexity with eval/stream's policies (sink vs recompute vs window) over `--tokens` tokens.
- recall: a fact stated early, asked after `--recall-filler` tokens: plain sinks vs SirLLM.
Not a unit test: nothing here asserts speed. `--deadline` skips parts that would start after it (seconds).
`--fuse auto|true|false` is the runtime's setting (yarnkit/runtime/fused.py: projections and norms) for every runtime
measurement; the peers, baselines and the path checks' eager cache run stock transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from pathlib import Path

import torch

from yarnkit.bench import streaming as bench
from yarnkit.runtime.fused import parts_label
from yarnkit.runtime.options import DECODE_ATTENTION, FUSE

PARTS = ("latency", "batch", "scale", "peers", "compiled", "hf-compiled", "ppl", "recall")  # the order they run in


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint, or a shape name with --random-init: "
                   + ", ".join(bench.SHAPES))
    p.add_argument("--random-init", action="store_true", help="timing only: random weights of the named shape")
    p.add_argument("--books", nargs="*", default=None, help="book files for ppl/recall (default: bundled samples)")
    p.add_argument("--out", default="runs/bench-runtime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--parts", nargs="+", default=["latency", "peers", "batch", "scale"], choices=PARTS)
    p.add_argument("--caches", type=int, nargs="+", default=[256, 1024, 4096], help="cache sizes (sinks included)")
    p.add_argument("--steps", type=int, default=512, help="timed decode steps per measurement (recompute: /8)")
    p.add_argument("--decode", default="auto", choices=["auto", "eager", "static", "graph"])
    p.add_argument("--decode-attention", default="auto", choices=DECODE_ATTENTION,
                   help="attention kernel of the pooled decode step (latency, batch, compiled; its path check "
                        "compares it with the eager SDPA cache; default auto, the runtime's)")
    p.add_argument("--fuse", default="auto", choices=FUSE,
                   help="the runtime's fuse: q/k/v and gate/up projections, RMSNorms as torch.rms_norm (auto: on "
                        "for the static/graph paths)")
    p.add_argument("--sessions", type=int, nargs="+", default=[8], help="batch: session counts to decode together")
    p.add_argument("--scale-shapes", nargs="+", default=["smollm2-135m", "llama-1.2b", "llama-7b"])
    p.add_argument("--deadline", type=float, default=None, help="seconds: parts that would start later are skipped")
    p.add_argument("--tokens", type=int, default=100_000, help="ppl: stream length")
    p.add_argument("--window", type=int, default=1024, help="ppl/recall: cache size, sinks included")
    p.add_argument("--chunk", type=int, default=256, help="ppl: tokens fed per step")
    p.add_argument("--recall-trials", type=int, default=10)
    p.add_argument("--recall-filler", type=int, default=3000)
    p.add_argument("--sirllm-keep", type=int, default=256)
    return p.parse_args(argv)


def load(args):
    from yarnkit.models import load_model, to_dtype

    if args.random_init:
        if args.model not in bench.SHAPES:
            raise SystemExit(f"--random-init takes a shape name: {', '.join(bench.SHAPES)}")
        return bench.random_model(args.model, args.device, to_dtype(args.dtype)), None
    return load_model(args.model, dtype=args.dtype, device=args.device)


def book_tokens(tokenizer, books, limit):
    from yarnkit.assets import sample_path
    from yarnkit.corpus import iter_documents

    ids: list[int] = []
    for book in books or [str(sample_path("eval")), str(sample_path("train"))]:
        for _, text in iter_documents(book):
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) >= limit:
                return ids[:limit]
    return ids


def perplexity(model, tokenizer, args) -> dict:
    """Streaming perplexity through eval/stream's policies, same window and chunking for all three."""
    from yarnkit.eval.ppl import bos_token_id
    from yarnkit.eval.stream import evaluate_stream, make_policy

    bos = bos_token_id(tokenizer)
    ids = book_tokens(tokenizer, args.books, args.tokens)
    out = {}
    for name in ("sink", "recompute", "window"):
        options = {"evict_batch": args.chunk, "prefill_chunk": args.chunk} if name == "sink" else {}
        policy = make_policy(name, window=args.window, sinks=4, **options)
        result = evaluate_stream(model, policy, ids, bos, len(ids), chunk=args.chunk, segment=max(1024, args.chunk))
        out[name] = {k: result[k] for k in ("ppl", "tokens_scored", "ms_per_token")}
    return out


@torch.no_grad()
def recall(model, tokenizer, args) -> dict:
    """Fact early, question late; greedy answer accuracy and answer NLL for plain sinks vs SirLLM."""
    from yarnkit.runtime.engine import StreamingEngine

    rng = random.Random(0)
    ids = book_tokens(tokenizer, args.books, args.recall_filler * 4)
    results = {"sinks": [], "sirllm": []}
    for _ in range(args.recall_trials):
        code = f"{rng.randrange(10**5, 10**6)}"
        fact = tokenizer(f"Remember this: the secret code is {code}. ", add_special_tokens=False)["input_ids"]
        question = tokenizer(" Now, what was the secret code? The secret code is", add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + code, add_special_tokens=False)["input_ids"]
        start = rng.randrange(0, max(1, len(ids) - args.recall_filler))
        for name, keep in (("sinks", 0), ("sirllm", args.sirllm_keep)):
            engine = StreamingEngine(model, sinks=4, window=args.window, sirllm_keep=keep, sirllm_decay=1.0)
            before = engine.feed(torch.tensor([fact + ids[start:start + args.recall_filler] + question]),
                                 all_logits=False)[0, -1]
            logits = engine.feed(torch.tensor([answer]))[0]
            previous = torch.cat((before[None], logits[:-1]))  # teacher-forced argmax == greedy decoding
            nll = torch.nn.functional.cross_entropy(previous.float(), torch.tensor(answer).to(previous.device))
            results[name].append({"correct": previous.argmax(-1).tolist() == answer, "answer_nll": nll.item()})
    return {name: {"accuracy": sum(r["correct"] for r in rows) / len(rows),
                   "answer_nll": statistics.mean(r["answer_nll"] for r in rows)} for name, rows in results.items()}


def latency(model, args, caches, **options) -> dict:
    rows = {}
    for cache in caches:
        row = {"sinks": bench.engine_stream(model, cache, args.steps, decode=args.decode,
                                            decode_attention=args.decode_attention,
                                            fuse=args.fuse, **options)}
        if not options:
            row["recompute"] = bench.recompute(model, cache, max(4, args.steps // 16))
            row["speedup_vs_recompute"] = row["recompute"]["p50_ms"] / row["sinks"]["p50_ms"]
            if cache == max(caches):  # plain HF decode at the largest cache only (slow, eager)
                row["dense"] = bench.dense(model, cache, max(4, args.steps // 16))
                row["speedup_vs_dense"] = row["dense"]["p50_ms"] / row["sinks"]["p50_ms"]
        rows[str(cache)] = row
        logging.info("latency %s %s", cache, json.dumps(row))
    return rows


def scale(args) -> dict:
    from yarnkit.models import to_dtype

    cache, rows = max(args.caches), {}
    for shape in args.scale_shapes:
        model = bench.random_model(shape, args.device, to_dtype(args.dtype))
        ours = bench.engine_stream(model, cache, max(32, args.steps // 4), decode=args.decode,
                                   fuse=args.fuse)
        base = bench.recompute(model, cache, max(3, args.steps // 32))
        rows[shape] = {"parameters_b": round(bench.parameters_b(model), 3), "cache": cache, "sinks": ours,
                       "recompute": base, "speedup_vs_recompute": base["p50_ms"] / ours["p50_ms"]}
        logging.info("scale %s %s", shape, json.dumps(rows[shape]))
        del model
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def plot(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    latencies = report.get("latency", {})
    caches = sorted(latencies, key=int)
    for method in ("sinks", "recompute", "dense"):
        points = [(int(c), latencies[c][method]["p50_ms"]) for c in caches if method in latencies[c]]
        if points:
            left.plot(*zip(*points), "o-", label=method if method != "sinks" else "yarnkit sinks (graph)")
    compiled = report.get("compiled", {}).get("latency", {})
    if compiled:
        left.plot(*zip(*[(int(c), v["sinks"]["p50_ms"]) for c, v in sorted(compiled.items(), key=lambda kv: int(
            kv[0]))]), "o-", label="yarnkit sinks (graph + compile)")
    left.set_xscale("log", base=2)
    left.set(yscale="log", xlabel="cache tokens", ylabel="p50 ms / token", title="decode latency")
    if caches or compiled:
        left.legend()
    scaled = report.get("scale", {})
    if scaled:
        names = list(scaled)
        right.bar(names, [scaled[n]["speedup_vs_recompute"] for n in names])
        right.axhline(22.2, color="grey", linestyle="--", label="StreamingLLM, Llama-2-7B: 22.2x")
        right.set(ylabel="speed-up vs re-computation", title=f"cache {max(report['caches'])}")
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "bench_runtime.log")], force=True)
    import transformers

    began = time.time()
    cuda = torch.device(args.device).type == "cuda"
    report = {"model": args.model, "random_init": args.random_init, "device": args.device, "dtype": args.dtype,
              "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
              "transformers": transformers.__version__, "caches": args.caches, "steps": args.steps,
              "parts": args.parts, "skipped": []}
    model, tokenizer = load(args)
    check = {"window": max(args.caches), "prompt": max(args.caches), "evict_batch": 16}  # path checks: 6 evictions

    def save():
        report["seconds"] = round(time.time() - began, 1)
        (out / "bench_runtime.json").write_text(json.dumps(report, indent=2))

    for part in [p for p in PARTS if p in args.parts]:
        if args.deadline is not None and time.time() - began > args.deadline:
            report["skipped"].append(part)
            logging.warning("skipping %s: past --deadline %s s", part, args.deadline)
            continue
        started = time.time()
        if part == "latency":
            report["latency"] = latency(model, args, args.caches)
            report["path_check"] = bench.path_check(model, args.decode, decode_attention=args.decode_attention,
                                                    fuse=args.fuse, **check)
        elif part == "peers":
            cache = max(args.caches)
            report["peers"] = {name: bench.hf_generate(model, cache, max(8, args.steps // 8), name, False)
                               for name in ("dynamic", "static")}
        elif part == "hf-compiled":
            report["peers_compiled"] = bench.hf_generate(model, max(args.caches), max(8, args.steps // 4), "static",
                                                         None)
        elif part == "compiled":
            # one cache size: each new shape is a new compilation (about a minute on a GPU)
            report["compiled"] = {"latency": latency(model, args, [max(args.caches)], compile=True),
                                  "path_check": bench.path_check(model, args.decode, compile=True,
                                                                 decode_attention=args.decode_attention,
                                                                 fuse=args.fuse, **check)}
        elif part == "batch":
            report["batch"] = {str(count): bench.batch_throughput(model, max(args.caches), count, args.steps,
                                                                  decode="static" if args.decode == "eager"
                                                                  else args.decode,
                                                                  decode_attention=args.decode_attention,
                                                                  fuse=args.fuse)
                               for count in args.sessions}
        elif part == "scale":
            report["scale"] = scale(args)
        elif part == "ppl":
            report["perplexity"] = perplexity(model, tokenizer, args)
        elif part == "recall":
            report["recall"] = recall(model, tokenizer, args)
        report.setdefault("part_seconds", {})[part] = round(time.time() - started, 1)
        save()
    save()
    plot(report, out / "bench_runtime.png")
    print(summary(report))
    return report


def summary(report) -> str:
    """The short table printed last."""
    lines = [f"device {report['gpu'] or report['device']} {report['dtype']}, {report['seconds']} s, "
             f"skipped: {report['skipped'] or 'none'}"]
    for title, rows in (("graph", report.get("latency", {})), ("graph+compile",
                                                                report.get("compiled", {}).get("latency", {}))):
        for cache, row in sorted(rows.items(), key=lambda kv: int(kv[0])):
            s = row["sinks"]
            cells = f"sinks[{s['decode_path']}{'+compile' if s['compiled'] else ''}, " \
                    f"{s.get('decode_attention', 'sdpa')}, fused: {parts_label(s)}] " \
                    f"p50 {s['p50_ms']:.3f} p99 " \
                    f"{s['p99_ms']:.3f} p99/p50 {s['p99_over_p50']:.2f}"
            if "recompute" in row:
                cells += f"  recompute {row['recompute']['p50_ms']:.2f}  x{row['speedup_vs_recompute']:.1f} vs recompute"
                if "dense" in row:
                    cells += f"  dense {row['dense']['p50_ms']:.2f}"
            lines.append(f"{title:<13} cache {cache:>5}: {cells}")
    for name, peer in {**report.get("peers", {}), **({"static+compile": report["peers_compiled"]}
                                                     if "peers_compiled" in report else {})}.items():
        lines.append(f"HF generate {name:<15} p50 {peer['p50_ms']:.2f} ms/token (first call {peer['first_call_seconds']} s)")
    for b in report.get("batch", {}).values():
        lines.append(f"batch {b['sessions']} sessions: {b['tokens_per_s_together']:.0f} tok/s vs "
                     f"{b['tokens_per_s_alone']:.0f} alone = {b['speedup']:.2f}x; identical prefixes "
                     f"{b['identical_prefix_tokens']} of {b['check_tokens']}")
    for shape, row in report.get("scale", {}).items():
        lines.append(f"scale {shape:<13} {row['parameters_b']:.2f}B: sinks {row['sinks']['p50_ms']:.2f} ms, "
                     f"recompute {row['recompute']['p50_ms']:.1f} ms -> {row['speedup_vs_recompute']:.1f}x")
    for key in ("path_check",):
        if key in report:
            c = report[key]
            lines.append(f"path check [{c['decode_path']}]: max |dlogp| {c['max_abs_logprob_diff']:.3g}, greedy "
                         f"agreement {c['greedy_agreement']:.3f}")
    if "compiled" in report:
        c = report["compiled"]["path_check"]
        lines.append(f"path check [graph+compile]: max |dlogp| {c['max_abs_logprob_diff']:.3g}, greedy agreement "
                     f"{c['greedy_agreement']:.3f}")
    for name, value in report.get("perplexity", {}).items():
        lines.append(f"ppl {name:<10} {value['ppl']:8.2f}")
    for name, value in report.get("recall", {}).items():
        lines.append(f"recall {name:<7} accuracy {value['accuracy']:.2f} answer NLL {value['answer_nll']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
