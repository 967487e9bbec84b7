"""Training throughput benchmark. Two modes:

1. `--cases MODEL@SEQ@VARIANT ...` (yarnkit vs plain transformers, issue 5; handed to scripts/bench_compare.py,
   which takes the same command line): each case is its own process on the
   same GPU(s): `hf` = scripts/bench_hf_baseline.py (SDPA + full gradient checkpointing + AdamW + HF loss),
   the other variants = yarnkit's trainer with the overrides in VARIANTS (attention kernel, checkpointing,
   compile, TiledMLP, activation offload, `sp<N>` suffix = sequence parallelism over N GPUs). Reports
   tokens/s/GPU, step time, peak memory and causal MFU (FLOPs/token = 6N + 6*layers*heads*head_dim*seq) against
   `--peak-tflops` (989, H100/H200 dense bf16) and against a bf16 matmul peak measured at the start of the same
   run. A case `MODEL@L1,L2,..@VARIANT` searches the longest length that trains (2 steps each, upwards until one
   does not fit; `MODEL@L1,@VARIANT` tries one length that way). Cases run in the given order until `--budget-s` is spent (the rest are recorded as skipped).
   Writes OUT/compare.json and OUT/compare.md (a markdown table), and prints the table last.

       python scripts/bench_train.py --out out/speed --steps 6 --budget-s 450 \
           --cases smollm2-135m@65536@hf smollm2-135m@65536@yarnkit smollm2-135m@65536@fast \
                   llama-1b@131072,262144@offload
       # CPU smoke test (a tiny random Llama):
       python scripts/bench_train.py --out /tmp/speed --cpu --steps 2 --cases tiny@128@hf tiny@128@yarnkit

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

from yarnkit.recipes import accelerate_config
from yarnkit.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def launch_command(processes: int, zero: int) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes == 1:
        return launch + ["--config_file", str(accelerate_config("single"))]
    config = accelerate_config(f"zero{zero}" if zero else "ddp")
    return launch + ["--config_file", str(config), "--num_processes", str(processes)]


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
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--recipe", default="smollm2-yarn-64k")
    parser.add_argument("--gpus", default="1", help="comma-separated process counts, e.g. 1,2,4")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 2, 3), help="ZeRO stage for >1 process; 0=DDP")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra recipe overrides")
    parser.add_argument("--cases", nargs="*", default=[], metavar="MODEL@SEQ@VARIANT",
                        help="compare mode, run by scripts/bench_compare.py (see its --help for its options)")
    argv = sys.argv[1:] if argv is None else argv
    if "--cases" in argv:  # its own process: scripts import only yarnkit, never another script
        return subprocess.run([sys.executable, str(REPO / "scripts/bench_compare.py"), *argv]).returncode
    args = parser.parse_args(argv)
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
