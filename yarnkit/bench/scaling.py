"""Process-count scaling of one recipe (`python -m yarnkit.bench.training --gpus 1,2,4`): the same recipe launched
with `accelerate launch` on 1, 2, 4.. processes (DDP, or DeepSpeed ZeRO-2/3 with `--zero`).

    # GPU machine (1 GPU, then 2 and 4 GPUs with DeepSpeed ZeRO-2), books copied to /data/books:
    python -m yarnkit.bench.training --out out/train-bench --gpus 1,2,4 --zero 2 --steps 10 \
        --set "data.source=/data/books/train_*.txt.gz"
    # CPU smoke test (tiny model sizes):
    python -m yarnkit.bench.training --out /tmp/bench --recipe tiny --gpus 1 --steps 2 --set data.seq_len=128

Each configuration is a normal `yarnkit train` run (`accelerate launch -m yarnkit.cli train ...`) under
OUT/<name>/ (metrics.jsonl, recipe.yaml, final checkpoint); several calls with the same --out add up. Writes
OUT/summary.json (median tokens/s per device, step time, MFU, peak memory over the steps after the first
`--warmup`; losses) and OUT/throughput.png. Not a unit test: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from yarnkit.bench.training_cases import child_env
from yarnkit.recipe_files import accelerate_config
from yarnkit.train.metrics import read_metrics


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


def run_scaling(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"  # runs accumulate, so each process count can be its own command
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"recipe": args.recipe, "runs": {}}
    summary["overrides"] = args.set
    for processes in (int(n) for n in args.gpus.split(",")):
        name = f"{processes}proc" + (f"-zero{args.zero}" if processes > 1 and args.zero else "")
        run_dir = out / name
        command = [*launch_command(processes, args.zero), "-m", "yarnkit.cli", "train", f"recipe={args.recipe}",
                   f"run_dir={run_dir}", "resume=none", f"train.max_steps={args.steps}", "checkpoint.every=0",
                   *args.set]
        print(" ".join(command), flush=True)
        if (run_dir / "checkpoints").exists():
            raise FileExistsError(f"{run_dir} exists from an earlier benchmark; pick a new --out")
        subprocess.run(command, env=child_env(), check=True)
        summary["runs"][name] = summarize(run_dir, args.warmup)
        summary_path.write_text(json.dumps(summary, indent=2))
    plot(summary, out / "throughput.png")
    for name, run in summary["runs"].items():
        print(f"{name}: {run['tokens_per_s_per_device']:,.0f} tokens/s/device, step {run['step_seconds']:.2f} s, "
              f"MFU {run['mfu']:.1%}, peak {run['peak_memory_gb']:.1f} GB")
    print(f"wrote {out / 'summary.json'} and {out / 'throughput.png'}")
    return 0
