"""End to end on a real model: train (YaRN) -> evaluate before/after -> export (HF + GGUF) -> stream a long book.

One command does the whole sequence and writes everything under OUT:

    OUT/run/                    the training run (recipe.yaml, metrics.jsonl, checkpoints/)
    OUT/eval/                   for every model (base, dynamic NTK xS, zero-shot YaRN xS, fine-tuned): ppl-*.json|png
                                and the retrieval tasks niah-, multikey-, multivalue-, multiquery-, vt-, chat-*.json|png
                                (RULER-style, book haystacks); ppl-compare.png
    OUT/export/                 the HF export (verified in a fresh process) and model.gguf
    OUT/eval/stream-*.json|png  the exported model streamed through the runtime (sinks + rolling cache)
    OUT/summary.json            timings, training throughput, `targets` (each with its measured value, met or not)
    OUT/results.md              the tables (`yarnkit eval report`) and the targets

GPU (1 to 4 GPUs; training is data-parallel (DDP) over `--gpus` GPUs, default all visible, keeping the recipe's
global batch: micro-batch / N per GPU, the same samples per step and the same targets as on one GPU; about 7
minutes on one H200):
    python scripts/e2e.py --train-data '/data/books/train_*.txt.gz' --books /data/books --out runs/e2e
Scaling: train on 1 GPU, then on N with `--reference` naming the 1-GPU summary and `--serial` (the
baselines then run after training, not beside it on the same GPUs); summary.json's train.scaling holds the
speed-up and efficiency (throughput and wall time) against the reference:
    python scripts/e2e.py --stages train --gpus 1 --out runs/e2e-1gpu --train-data ...
    python scripts/e2e.py --gpus 4 --serial --reference runs/e2e-1gpu/summary.json --out runs/e2e-4gpu --train-data ...
CPU smoke of the same path (the `tiny` recipe, tiny lengths; CI runs it, a few minutes):
    python scripts/e2e.py --smoke --out /tmp/e2e
On a GPU the baselines are evaluated in a second process while the model trains. Stages can be picked
(`--stages train,eval` skips the baselines); extra `key=value` arguments after `--` override the recipe (e.g.
`-- train.max_steps=100`). Resumable: run the same command again and training continues from its last checkpoint
(or is skipped once finished) and evaluations whose result JSON exists are kept (`--fresh` redoes them). The
fine-tuned model gets `--trials` keys per cell for niah, multikey and chat and `--side-trials` for the other
tasks; the baselines get `--side-trials` for every task, and the unscaled model stops at its native context.
Nothing here asserts numbers: the targets are checked and reported, met or not (docs/results.md).
Run from a checkout with yarnkit installed (`pip install -e .`) or on PYTHONPATH.
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

from yarnkit.cli import main as _yarnkit_cli
from yarnkit.bench.baselines import baseline_configs, selected_books
from yarnkit.eval.tasks import result_path
from yarnkit.eval.report import load_results, markdown_report
from yarnkit.eval.retrieval import TASKS as RETRIEVAL_TASKS
from yarnkit.bench.targets import context_targets, targets_markdown
from yarnkit.recipe_files import accelerate_config
from yarnkit.runs import latest_checkpoint
from yarnkit.train.metrics import METRICS_FILE, read_metrics, scaling
from yarnkit.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("train", "baselines", "eval", "export", "stream", "report")  # report: only rewrite summary and tables
TARGET_TASKS = ("niah", "multikey", "chat")  # the tasks with targets: --trials keys per cell


def yarnkit(argv: list[str]) -> None:
    """`yarnkit ARGS` in this process; a failing step stops the sequence (later steps need its output)."""
    code = _yarnkit_cli(argv)
    if code:
        raise SystemExit(f"`yarnkit {' '.join(argv[:2])} ...` failed with exit code {code}; see the error above")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_gpus(args) -> int:
    visible = gpu_count()
    if args.gpus and args.gpus > max(visible, 1):
        raise SystemExit(f"--gpus {args.gpus} but this machine has {visible} visible GPU(s)")
    return args.gpus or visible


def same_global_batch(args, gpus: int) -> list[str]:
    """Overrides that keep the recipe's chunks per optimizer step on `gpus` processes (micro-batch / gpus)."""
    if gpus <= 1:
        return []
    recipe = load_recipe([f"recipe={args.recipe}", *args.overrides]).train
    chunks = recipe.global_batch or recipe.micro_batch_size * recipe.grad_accum
    return [f"train.global_batch={chunks}", f"train.micro_batch_size={max(1, recipe.micro_batch_size // gpus)}"]


def train(args, out: Path) -> dict:
    """`accelerate launch -m yarnkit.cli train` over `--gpus` GPUs (DDP when several), or one CPU process; a run
    that already reached its last step is not launched again."""
    gpus = train_gpus(args)
    config = "ddp" if gpus > 1 else "single"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(accelerate_config(config)), "--num_processes", str(max(gpus, 1)),
               "-m", "yarnkit.cli", "train", f"recipe={args.recipe}", f"run_dir={out / 'run'}",
               *([f"data.source={args.train_data}"] if args.train_data else []), *same_global_batch(args, gpus),
               *args.overrides]
    started = time.perf_counter()
    run_dir = out / "run"
    steps_wanted = load_recipe([f"recipe={args.recipe}", *args.overrides]).train.max_steps
    done = _steps(run_dir)
    if not (done and done[-1]["step"] >= steps_wanted and latest_checkpoint(run_dir) is not None):
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    else:
        _stamp(f"train: {run_dir} already reached step {steps_wanted}; kept")
    steps = _steps(run_dir)
    return {"seconds": round(time.perf_counter() - started, 1), "gpus": gpus, "steps": len(steps),
            "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "tokens_per_s": _mean_after_warmup(steps, "tokens_per_s"),
            "tokens_per_s_per_gpu": _mean_after_warmup(steps, "tokens_per_s_per_device"),
            "mfu": _mean_after_warmup(steps, "mfu"),
            "peak_memory_gb": max((m.get("peak_memory_gb") or 0 for m in steps), default=None)}


def _steps(run_dir: Path) -> list[dict]:
    """The run's logged optimizer steps (none before its first log line)."""
    if not (run_dir / METRICS_FILE).is_file():
        return []
    return [m for m in read_metrics(run_dir) if "loss" in m]


def _mean_after_warmup(steps: list[dict], key: str) -> float | None:
    values = [m[key] for m in steps[1:] if m.get(key)] or [m[key] for m in steps if m.get(key)]
    return round(sum(values) / len(values), 4) if values else None


def evaluate(args, out: Path, books: str, models: list[tuple[str, str, list[str], bool]]) -> None:
    """For each (label, model, extra arguments, is a baseline): `yarnkit eval ppl` and the retrieval tasks; an
    evaluation whose result JSON exists is kept unless --fresh."""
    lengths = [int(n) for n in args.retrieval_lengths.split(",")]
    tasks = [t for t in args.retrieval_tasks.split(",") if t]
    for label, model, extra, baseline in models:
        kernel = ["--sdpa-kernel", args.sdpa_kernel] if args.sdpa_kernel != "auto" else []
        if args.fresh or not _result(out, "ppl", label):
            _stamp(f"ppl: {label}")
            yarnkit(["eval", "ppl", model, "--data", books, "--lengths", args.lengths, "--docs", str(args.docs),
                     *kernel, *extra, "--label", label, "--out", str(out / "eval")])
        native_only = extra == [] and baseline  # the unscaled model: its own context only
        limit = ["--max-length", str(args.native)] if native_only and max(lengths) > args.native else []
        groups = [([t for t in tasks if t in TARGET_TASKS], args.trials), ([t for t in tasks if t not in TARGET_TASKS],
                                                                            args.side_trials)]
        depths = args.depths
        if baseline:
            groups, depths = [(tasks, args.side_trials)], args.baseline_depths or args.depths
        for group, trials in groups:
            missing = [t for t in group if args.fresh or not _result(out, t, label)]
            if not missing:
                continue
            _stamp(f"retrieval {','.join(missing)}: {label}")
            yarnkit(["eval", "retrieval", model, "--haystack", books, "--tasks", ",".join(missing), "--lengths",
                     args.retrieval_lengths, "--depths", depths, "--trials", str(trials), *limit, *kernel, *extra,
                     "--max-new-tokens", str(args.max_new_tokens),
                     "--label", label, "--out", str(out / "eval")])


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


def recipe_factor(args) -> float:
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
    if stages != ["report"]:  # a report keeps the run's own date, command and device
        summary.update(date=time.strftime("%Y-%m-%d"), recipe=args.recipe, overrides=args.overrides,
                       command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), gpus=gpu_count(), device=_device())
    label, factor = args.label, recipe_factor(args)
    tuned = f"yarn x{factor:g} fine-tuned"
    with tempfile.TemporaryDirectory() as links:
        books = str(selected_books(Path(args.books), args.pattern, Path(links)))
        baselines = [(f"{label} {suffix}", args.model, extra, True) for suffix, extra, _ in baseline_configs(factor)]
        if stages == ["baselines"]:  # the child process started below
            evaluate(args, out, books, baselines)
            return 0
        overlap = "train" in stages and "baselines" in stages and gpu_count() > 0 and not args.serial
        if overlap:  # the base-model evals need no training: run them beside it on the same GPU(s)
            child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *_with_stages(sys.argv[1:])])
        if "train" in stages:
            _stamp(f"train: recipe {args.recipe}")
            summary["train"] = train(args, out)
            if args.reference:
                one = json.loads(Path(args.reference).read_text())["train"]
                summary["train"]["scaling"] = {"reference": args.reference, **scaling(one, summary["train"])}
            write_summary(args, out, summary, tuned)
        if overlap:
            if child.wait():
                raise SystemExit(f"the baseline evaluation failed (exit code {child.returncode})")
        elif "baselines" in stages:
            evaluate(args, out, books, baselines)
        write_summary(args, out, summary, tuned)
        if "eval" in stages:
            evaluate(args, out, books, [(f"{label} {tuned}", str(out / "run"), [], False)])
            write_summary(args, out, summary, tuned)
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
    if stages != ["report"]:
        summary["seconds"] = round(time.perf_counter() - STARTED, 1)
    write_summary(args, out, summary, tuned)
    print(json.dumps({key: summary.get(key) for key in ("train", "export_seconds", "export_checks", "stream",
                                                          "seconds")}, indent=1))
    for target in summary["targets"]:
        print(f"{'met' if target['met'] else 'NOT met' if target['met'] is False else '-':8s} {target['target']}: "
              f"{target['measured'] or '-'}")
    return 0


def write_summary(args, out: Path, summary: dict, tuned: str) -> None:
    """summary.json (with the targets measured so far) and results.md, rewritten after every stage: a run cut
    short still leaves what it measured."""
    if "train" not in summary and _steps(out / "run"):  # trained by an earlier invocation
        steps = _steps(out / "run")
        summary["train"] = {"steps": len(steps), "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
                            "tokens_per_s": _mean_after_warmup(steps, "tokens_per_s"),
                            "step_seconds_sum": round(sum(m.get("step_seconds", 0) for m in steps), 1),
                            "peak_memory_gb": max(m.get("peak_memory_gb") or 0 for m in steps)}
    roles = {"base": f"{args.label} base", "tuned": f"{args.label} {tuned}"}
    results = {(task, role): _result(out, task, name) for task in ("ppl", *RETRIEVAL_TASKS)
               for role, name in roles.items()}
    summary["targets"] = context_targets(results, [int(n) for n in args.retrieval_lengths.split(",")],
                                         [float(d) for d in args.depths.split(",")], args.native,
                                         [int(n) for n in args.lengths.split(",")])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    files = sorted(str(p) for p in (out / "eval").glob("*.json"))
    tables = markdown_report(load_results(files)) if files else ""
    (out / "results.md").write_text(tables + "\n" + targets_markdown(summary["targets"]))


def _with_stages(argv: list[str], stages: str = "baselines") -> list[str]:
    """This command's arguments with `--stages` replaced (before any `--` that starts the recipe overrides)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return [*argv[:cut], "--stages", stages, *argv[cut:]]


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"


SMOKE = {"recipe": "tiny", "lengths": "256,512", "docs": 1, "trials": 1, "side_trials": 1, "depths": "0.5",
         "native": 256, "retrieval_tasks": "niah,multikey,chat", "max_new_tokens": 4, "stream_tokens": 1024,
         "verify_tokens": 512, "stream_window": 256, "stream_chunk": 64, "stream_segment": 256}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides (after --)")
    parser.add_argument("--out", default="runs/e2e")
    parser.add_argument("--recipe", default="smollm2-yarn-64k-retrieval")
    parser.add_argument("--train-data", help="data.source for training (default: the recipe's)")
    parser.add_argument("--books", default=str(ROOT / "yarnkit" / "assets"), help="evaluation books (PG-19 test)")
    parser.add_argument("--pattern", default="test_*", help="which files of --books to use (default test_*)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--gpus", type=int, default=0, help="training GPUs (default: all visible); N > 1 keeps the "
                                                           "recipe's global batch (micro-batch / N per GPU)")
    parser.add_argument("--reference", help="a 1-GPU run's summary.json: report the training stage's scaling against it")
    parser.add_argument("--serial", action="store_true",
                        help="evaluate the baselines after training instead of beside it (a clean training time)")
    parser.add_argument("--model", default="smollm2-135m", help="the base model (as the recipe's)")
    parser.add_argument("--label", default="SmolLM2-135M")
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
    parser.add_argument("--retrieval-lengths", help="lengths of the retrieval tasks (default: --lengths)")
    parser.add_argument("--native", type=int, default=8192, help="the base model's context (for the ppl target)")
    parser.add_argument("--docs", type=int, default=10, help="books per perplexity length")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=4, help="keys per cell: niah, multikey, chat of the fine-tuned")
    parser.add_argument("--side-trials", type=int, default=1, help="keys per cell: other tasks, and the baselines")
    parser.add_argument("--baseline-depths", help="depths of the baselines' retrieval tasks (default: --depths)")
    parser.add_argument("--retrieval-tasks", default=",".join(RETRIEVAL_TASKS), help="retrieval tasks to run")
    parser.add_argument("--sdpa-kernel", default="auto", help="evaluation attention kernel (cudnn is fastest on "
                        "an H200; auto: torch's choice)")
    parser.add_argument("--fresh", action="store_true", help="redo evaluations whose results exist")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="retrieval answers' length (0: each task's)")
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
    if args.smoke or not args.retrieval_lengths:
        args.retrieval_lengths = args.lengths
    return args


STARTED = time.perf_counter()

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run(parse()))
