"""End to end on a real model: train (YaRN) -> evaluate before/after -> export (HF + GGUF) -> stream a long book.

One command does the whole sequence and writes everything under OUT:

    OUT/run/                    the training run (recipe.yaml, metrics.jsonl, checkpoints/)
    OUT/eval/                   ppl-*.json|png and passkey-*.json|png for every model, ppl-compare.png
    OUT/export/                 the HF export (verified in a fresh process) and model.gguf
    OUT/eval/stream-*.json|png  the exported model streamed through the runtime (sinks + rolling cache)
    OUT/summary.json            timings, training throughput, the targets and whether each was met
    OUT/results.md              the tables (`yarnkit eval report`) and the targets

GPU (1 to 4 GPUs; training is data-parallel over all visible GPUs; about 9 minutes on one H200):
    python scripts/e2e.py --train-data '/data/books/train_*.txt.gz' --books /data/books --out runs/e2e
CPU smoke of the same path (the `tiny` recipe, tiny lengths; CI runs it, a few minutes):
    python scripts/e2e.py --smoke --out /tmp/e2e
On a GPU the baselines (base, dynamic NTK x8, YaRN x8 zero-shot) are evaluated in a second process while the
model trains. Stages can be picked (`--stages train,eval` skips the baselines); extra `key=value`
arguments after `--` override the recipe (e.g. `-- train.max_steps=100`). Nothing here asserts numbers: the
targets are checked and reported, met or not (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's yarnkit, even if another is installed
from yarnkit.cli import main as _yarnkit_cli  # noqa: E402
from yarnkit.eval.cli import result_path  # noqa: E402
from yarnkit.eval.report import load_results, markdown_report  # noqa: E402
from eval_baselines import CONFIGS as BASELINES, selected_books  # noqa: E402  (scripts/eval_baselines.py)

STAGES = ("train", "baselines", "eval", "export", "stream")


def yarnkit(argv: list[str]) -> None:
    """`yarnkit ARGS` in this process; a failing step stops the sequence (later steps need its output)."""
    code = _yarnkit_cli(argv)
    if code:
        raise SystemExit(f"`yarnkit {' '.join(argv[:2])} ...` failed with exit code {code}; see the error above")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train(args, out: Path) -> dict:
    """`accelerate launch scripts/train.py` over every visible GPU (DDP when several), or one CPU process."""
    gpus = gpu_count()
    config = "ddp.yaml" if gpus > 1 else "single.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / config), "--num_processes", str(max(gpus, 1)),
               str(ROOT / "scripts" / "train.py"), f"recipe={args.recipe}", f"run_dir={out / 'run'}",
               *([f"data.source={args.train_data}"] if args.train_data else []), *args.overrides]
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    steps = [m for m in metrics if "loss" in m]
    return {"seconds": round(time.perf_counter() - started, 1), "gpus": gpus, "steps": len(steps),
            "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "tokens_per_s": _mean_after_warmup(steps, "tokens_per_s"),
            "tokens_per_s_per_gpu": _mean_after_warmup(steps, "tokens_per_s_per_device"),
            "mfu": _mean_after_warmup(steps, "mfu"),
            "peak_memory_gb": max((m.get("peak_memory_gb") or 0 for m in steps), default=None)}


def _mean_after_warmup(steps: list[dict], key: str) -> float | None:
    values = [m[key] for m in steps[1:] if m.get(key)] or [m[key] for m in steps if m.get(key)]
    return round(sum(values) / len(values), 4) if values else None


def evaluate(args, out: Path, books: str, models: list[tuple[str, str, list[str]]]) -> None:
    """`yarnkit eval ppl` and `yarnkit eval passkey` for each (label, model, extra arguments)."""
    for label, model, extra in models:
        for task in (["ppl", model, "--data", books, "--lengths", args.lengths, "--docs", args.docs],
                     ["passkey", model, "--lengths", args.lengths, "--depths", args.depths, "--trials", args.trials]):
            _stamp(f"{task[0]}: {label}")
            yarnkit(["eval", *map(str, task), *extra, "--label", label, "--out", str(out / "eval")])


def export(args, out: Path) -> float:
    started = time.perf_counter()
    yarnkit(["export", str(out / "run"), "--out", str(out / "export"), "--gguf", "--overwrite",
             "--device", "cuda" if gpu_count() else "cpu",
             *(["--verify-tokens", str(args.verify_tokens)] if args.verify_tokens else [])])
    return round(time.perf_counter() - started, 1)


def stream(args, out: Path, books: str, label: str) -> dict:
    """The exported checkpoint (no training code involved) through the runtime's sinks + rolling cache."""
    label = f"{label} stream"
    yarnkit(["eval", "stream", str(out / "export"), "--data", books, "--policy", "sink", "--window",
             str(args.stream_window), "--chunk", str(args.stream_chunk), "--max-tokens", str(args.stream_tokens),
             "--segment", str(args.stream_segment), "--label", label, "--out", str(out / "eval")])
    return _result(out, "stream", label)


def _result(out: Path, task: str, label: str) -> dict | None:
    """The saved result of `yarnkit eval TASK ... --label LABEL --out OUT/eval`, if that evaluation ran."""
    path = result_path({"task": task, "label": label}, str(out / "eval"))
    return json.loads(path.read_text()) if path.is_file() else None


def ppl_at(result: dict | None, length: int) -> float | None:
    rows = (result or {}).get("rows") or []
    return next((row["ppl"] for row in rows if row["length"] == length), None)


def check_targets(base_ppl: dict | None, tuned_ppl: dict | None, tuned_passkey: dict | None,
                  long_length: int, native: int, short_length: int) -> list[dict]:
    """The issue's three targets for the fine-tuned model, each with the measured values and met/not met."""
    targets = []
    cells = (tuned_passkey or {}).get("cells") or []
    worst = min(cells, key=lambda cell: cell["accuracy"]) if cells else None
    targets.append({"target": "passkey >= 95% at every length and depth",
                    "measured": None if worst is None else
                    f"worst cell {worst['accuracy']:.0%} at {worst['length']} tokens, depth {worst['depth']}",
                    "met": None if worst is None else all(cell["accuracy"] >= 0.95 for cell in cells)})
    long_ppl, base_native = ppl_at(tuned_ppl, long_length), ppl_at(base_ppl, native)
    targets.append({"target": f"ppl at {long_length} <= base ppl at {native}",
                    "measured": None if None in (long_ppl, base_native) else f"{long_ppl:.2f} vs {base_native:.2f}",
                    "met": None if None in (long_ppl, base_native) else long_ppl <= base_native})
    short_ppl, base_short = ppl_at(tuned_ppl, short_length), ppl_at(base_ppl, short_length)
    targets.append({"target": f"ppl at {short_length} <= 1.03 x base",
                    "measured": None if None in (short_ppl, base_short) else
                    f"{short_ppl:.2f} vs {base_short:.2f} ({short_ppl / base_short - 1:+.1%})",
                    "met": None if None in (short_ppl, base_short) else short_ppl <= 1.03 * base_short})
    return targets


def recipe_factor(args) -> float:
    from yarnkit.train.recipe import load_recipe

    return load_recipe([f"recipe={args.recipe}", *args.overrides]).yarn.factor


def _stamp(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", flush=True)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [stage.strip() for stage in args.stages.split(",")]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    summary.update(date=time.strftime("%Y-%m-%d"), recipe=args.recipe, overrides=args.overrides,
                   command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), gpus=gpu_count(), device=_device())
    label = args.label
    tuned = f"yarn x{recipe_factor(args):g} fine-tuned"
    with tempfile.TemporaryDirectory() as links:
        books = str(selected_books(Path(args.books), args.pattern, Path(links)))
        baselines = [(f"{label} {suffix}", args.model, extra) for suffix, extra in BASELINES]
        if stages == ["baselines"]:  # the child process started below
            evaluate(args, out, books, baselines)
            return 0
        overlap = "train" in stages and "baselines" in stages and gpu_count() > 0
        if overlap:  # the base-model evals need no training: run them beside it on the same GPU(s)
            child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *_with_stages(sys.argv[1:])])
        if "train" in stages:
            _stamp(f"train: recipe {args.recipe}")
            summary["train"] = train(args, out)
        if overlap:
            if child.wait():
                raise SystemExit(f"the baseline evaluation failed (exit code {child.returncode})")
        elif "baselines" in stages:
            evaluate(args, out, books, baselines)
        if "eval" in stages:
            evaluate(args, out, books, [(f"{label} {tuned}", str(out / "run"), [])])
        if "export" in stages:
            _stamp("export: HF (verified) + GGUF")
            summary["export_seconds"] = export(args, out)
            report = json.loads((out / "export" / "export_report.json").read_text())
            summary["export_checks"] = {name: {key: report[name].get(key) for key in (
                "passed", "max_relative_difference", "prompt_tokens")} for name in ("hf_check", "gguf_check")
                if report.get(name)}
        if "stream" in stages:
            _stamp(f"stream: {args.stream_tokens} tokens through the runtime")
            result = stream(args, out, books, label)
            summary["stream"] = {key: result.get(key) for key in (
                "label", "policy", "tokens_processed", "ppl", "ms_per_token", "peak_memory_bytes", "memory_kind")}
            summary["stream"]["tokens_per_s"] = round(1000 / result["ms_per_token"], 1)
            summary["stream"]["cache_tokens_per_segment"] = [s["cache_tokens"] for s in result["segments"]]
    ppl_files = sorted(str(path) for path in (out / "eval").glob("ppl-*.json"))
    if ppl_files:
        yarnkit(["eval", "plot", *ppl_files, "--out", str(out / "eval" / "ppl-compare.png")])
    summary["seconds"] = round(time.perf_counter() - STARTED, 1)
    lengths = [int(x) for x in args.lengths.split(",")]
    summary["targets"] = check_targets(_result(out, "ppl", f"{label} base"), _result(out, "ppl", f"{label} {tuned}"),
                                       _result(out, "passkey", f"{label} {tuned}"), max(lengths), args.native,
                                       min(lengths))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    results = sorted(str(p) for p in (out / "eval").glob("*.json"))
    tables = markdown_report(load_results(results)) if results else ""
    (out / "results.md").write_text(tables + "\n| target | measured | met |\n|---|---|---|\n" + "".join(
        f"| {t['target']} | {t['measured']} | {'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |\n"
        for t in summary["targets"]))
    print(json.dumps({key: summary.get(key) for key in ("train", "export_seconds", "export_checks", "stream",
                                                          "seconds")}, indent=1))
    for target in summary["targets"]:
        print(f"{target['target']:45s} {target['measured'] or '-':45s} met={target['met']}")
    return 0


def _with_stages(argv: list[str], stages: str = "baselines") -> list[str]:
    """This command's arguments with `--stages` replaced (before any `--` that starts the recipe overrides)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return [*argv[:cut], "--stages", stages, *argv[cut:]]


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"


SMOKE = {"recipe": "tiny", "lengths": "256,512", "docs": 1, "trials": 1, "depths": "0.5", "native": 256,
         "stream_tokens": 1024, "verify_tokens": 512, "stream_window": 256, "stream_chunk": 64, "stream_segment": 256}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides (after --)")
    parser.add_argument("--out", default="runs/e2e")
    parser.add_argument("--recipe", default="smollm2-yarn-64k-pose")
    parser.add_argument("--train-data", help="data.source for training (default: the recipe's)")
    parser.add_argument("--books", default=str(ROOT / "yarnkit" / "assets"), help="evaluation books (PG-19 test)")
    parser.add_argument("--pattern", default="test_*", help="which files of --books to use (default test_*)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--model", default="smollm2-135m", help="the base model (as the recipe's)")
    parser.add_argument("--label", default="SmolLM2-135M")
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
    parser.add_argument("--native", type=int, default=8192, help="the base model's context (for the ppl target)")
    parser.add_argument("--docs", type=int, default=10, help="books per perplexity length")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=4, help="passkeys per (length, depth) cell")
    parser.add_argument("--stream-tokens", type=int, default=262144)
    parser.add_argument("--stream-window", type=int, default=32768)
    parser.add_argument("--stream-chunk", type=int, default=1024)
    parser.add_argument("--stream-segment", type=int, default=8192)
    parser.add_argument("--verify-tokens", type=int, help="export check prompt length (default: export's)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke sizes: " + json.dumps(SMOKE))
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


STARTED = time.perf_counter()

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run(parse()))
