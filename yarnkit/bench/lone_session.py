"""A lone session's decode speed by the cache row it holds (`python -m yarnkit.bench.lone_session`).

What it measures: one shared `SlotPool` of `--rows` rows (serve's `--max-sessions`), each row holding a session
that was fed a `--prompt`-token prompt and sits idle (as cached conversations do in `yarnkit serve`); then the
session of each row in turn decodes `--steps` greedy tokens alone (`--rounds` passes, interleaved), through the
call the server's loop makes for its decoding turns (`StreamingEngine.decode_together`). Per row: tokens/s from
the median step time, the rows the pool's step runs (`SlotPool.step_rows`) and the batch sizes the model's
forward was seen to get (a replayed CUDA graph calls no forward: only its capture is seen). Prints a table and
writes JSON (`--out`). Timing only: nothing here asserts speed.

  python -m yarnkit.bench.lone_session                            # bundled SmolLM2-135M, CPU, 8 rows
  python -m yarnkit.bench.lone_session --rows 4 --steps 32 --out runs/lone-session.json
  python -m yarnkit.bench.lone_session --device cuda --dtype bfloat16 --window 4096 --decode graph
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from yarnkit.bench.streaming import random_ids, sync
from yarnkit.outputs import write_json_atomic
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions, load_chat_model
from yarnkit.runtime.static import make_pool


@torch.no_grad()
def lone_session_by_row(model, rows: int, window: int, prompt: int, steps: int, rounds: int = 3,
                        warmup: int = 2, decode: str = "static") -> list[dict]:
    """Per row of a full pool (the other rows idle): the median time of a lone session's decode step, over
    `rounds` passes through the rows (interleaved, so a busy moment of the machine hits every row alike)."""
    device = next(model.parameters()).device
    options = StreamOptions(window=window, decode=decode)
    pool = make_pool(model, options, rows)
    engines = [StreamingEngine(model, options, pool=pool) for _ in range(rows)]
    vocab = model.config.vocab_size
    tokens = [int(engine.feed(random_ids(prompt, vocab, seed=row)[None], all_logits=False)[0, -1].argmax())
              for row, engine in enumerate(engines)]
    times: list[list[float]] = [[] for _ in engines]
    batch_sizes: list[set[int]] = [set() for _ in engines]
    current: list[int] = [0]
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes[current[0]].add(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        for _ in range(rounds):
            for row, engine in enumerate(engines):
                current[0] = row
                for step in range(warmup + steps):
                    sync(device)
                    start = time.perf_counter()
                    tokens[row] = int(StreamingEngine.decode_together([engine], [tokens[row]])[0].argmax())
                    sync(device)
                    if step >= warmup:
                        times[row].append(time.perf_counter() - start)
    finally:
        hook.remove()
        for engine in engines:
            engine.close()
    return [{"row": engine.cache.row, "tokens_per_s": round(1 / statistics.median(spent), 2),
             "median_ms_per_token": round(1e3 * statistics.median(spent), 2), "steps": len(spent),
             "step_rows": pool.step_rows([engine.cache.row])[1], "forward_batches": sorted(batch_sizes[row])}
            for row, (engine, spent) in enumerate(zip(engines, times))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m yarnkit.bench.lone_session", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="run dir, HF dir, .gguf or a bundled name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, default=8, help="cache rows of the pool (serve's --max-sessions)")
    parser.add_argument("--window", type=int, default=1024, help="cache tokens per row (serve's --window)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens fed to every row first")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="passes through the rows (interleaved)")
    parser.add_argument("--decode", default="static", choices=("static", "graph"),
                        help="the pool's decode path (graph: CUDA graphs, needs --device cuda)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.decode == "graph" and not args.device.startswith("cuda"):
        parser.error("--decode graph needs a CUDA device: add --device cuda, or use --decode static")
    model, _ = load_chat_model(args.model, dtype=args.dtype, device=args.device)
    results = lone_session_by_row(model, args.rows, args.window, args.prompt, args.steps, args.rounds,
                                  decode=args.decode)
    print(f"{'row':>4} {'tokens/s':>9} {'median ms/token':>16} {'step rows':>10} {'forward batches':>16}")
    for r in results:
        batches = ",".join(map(str, r["forward_batches"])) or "-"
        print(f"{r['row']:>4} {r['tokens_per_s']:>9} {r['median_ms_per_token']:>16} {r['step_rows']:>10} {batches:>16}")
    speeds = [result["tokens_per_s"] for result in results]
    print(f"slowest row / fastest row: {min(speeds) / max(speeds):.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": results}, indent=2)


if __name__ == "__main__":
    main()
