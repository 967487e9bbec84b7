"""Ablation of the retrieval recipe: variants trained (400 steps by default) and evaluated the same way.

Each variant is `scripts/e2e.py --stages train,eval` (no baselines, no export) with the variant's recipe overrides,
then one grid: perplexity at `--lengths`, and the single-needle (niah), multi-key (3 same-form distractors) and
chat-template needle tasks at `--retrieval-lengths` x `--depths` with `--trials` keys per cell (evaluation templates
only: training never sees their wording, `yarnkit.needles`). `--parallel` variants run side by side on one GPU. A
variant whose summary exists is not run again (the command is resumable), and no new variant starts once
`--budget-s` is spent. Writes:

    OUT/<variant>/...          each variant's e2e output (run/, eval/, summary.json)
    OUT/ablation.json, .md     per variant: ppl by length; per task accuracy by length, at 64k depths 0 and 0.05,
                               and the worst (length, depth) cell; the score; what the misses answered
                               (a neighbour's value, a number of the book, ...: `yarnkit.eval.retrieval.miss_kind`)
    OUT/base/ppl-base.json     the base model's perplexity at the `--lengths` within its own context (run first)
    OUT/winner.txt, .json      the best variant (its overrides one per line; .json: name, overrides, score): the
                               highest score (mean accuracy of niah, multi-key and chat over the grid) among the
                               variants that keep perplexity: at the longest length no worse than the base model's
                               at its own context, at the shortest no worse than 1.03x the base model's

GPU (one H100; the recipe's 400 steps take ~2 minutes per variant, its evaluation ~2 more):
    python scripts/ablate.py --train-data '/data/books/train_*.txt.gz' --books /data/books --out runs/ablate
CPU smoke (two variants, 2 steps each, tiny lengths):
    python scripts/ablate.py --smoke --out /tmp/ablate --variants shipped,before
Run from a checkout with yarnkit installed (`pip install -e .`) or on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yarnkit
from yarnkit.bench.baselines import selected_books
from yarnkit.eval.report import load_results
from yarnkit.models import load_config, load_tokenizer
from yarnkit.train.data import build_dataset
from yarnkit.train.recipe import load_recipe

S8 = "yarn.factor=8"
TERSE = "data.synthetic.restate=0"
LR_BEFORE = "optim.lr=5e-5"  # the peak learning rate of the recipe until the third ablation (docs/results.md §4.7)
DATA_OFF = ["data.synthetic.far=0", "data.synthetic.lookalike=0", TERSE, "train.answer_loss_weight=0"]
NUMBERS_OFF = "data.synthetic.numbers=0"  # the variants run before the recipe took `numbers: 0.25` (§4.11) keep it
VARIANTS = {  # name -> overrides of the shipped recipe (YaRN x12, far rows, look-alike facts, restated answers,
    # answer loss, peak learning rate 2e-4, number clutter in a quarter of the haystacks); each variant measured
    # before a lever shipped keeps that lever off (LR_BEFORE, NUMBERS_OFF), as it was run
    "shipped": [],  # the recipe as it ships (chosen by the ablations, docs/results.md §4.5-4.11)
    "shipped-s11": ["train.seed=11", "data.seed=11"],  # the shipped recipe under the second seed of §4.10-4.11
    "shipped-s7": ["train.seed=7", "data.seed=7"],  # ... and a third: is a cell at 7 of 8 the seed or the recipe?
    "shipped-s3": ["train.seed=3", "data.seed=3"],  # ... and a fourth
    "bf16w-s7": ["train.seed=7", "data.seed=7", "train.mixed_precision=bf16-weights"],  # `shipped-s7`, bf16 weights
    "bf16w-s3": ["train.seed=3", "data.seed=3", "train.mixed_precision=bf16-weights"],  # `shipped-s3`, bf16 weights
    # far rows from ~13k on, not 32k: 64k's needle at depth 0.75 (~16k before the question) missed under seeds 11
    # and 3 and with bf16 weights (§4.12-4.14): a distance below the 32k where far rows start at a 64k target
    "far-wide": ["pose.far_min=0.15"],
    "far-wide-s3": ["pose.far_min=0.15", "train.seed=3", "data.seed=3"],
    "before": [LR_BEFORE, S8, *DATA_OFF, NUMBERS_OFF],  # the recipe before: YaRN x8, plain rows, no answer loss
    "data-x8": [LR_BEFORE, S8, TERSE, NUMBERS_OFF],  # the new rows and the answer loss at YaRN x8: facts ~32-64k back
    "data-x8-rcd": [LR_BEFORE, S8, TERSE, "yarn.beta_slow=4", NUMBERS_OFF],  # full interpolation from pair 17, not 20
    "dense": [LR_BEFORE, TERSE, "data.synthetic.far=0.75", "data.synthetic.lookalike=0.75", NUMBERS_OFF],
    "terse": [LR_BEFORE, TERSE, NUMBERS_OFF],  # answers as terse as the question asks (37% name their key, not all)
    "lr-before": [LR_BEFORE, NUMBERS_OFF],  # the restated answers at the old peak learning rate (§4.6's winner)
    "lr2x": ["optim.lr=1e-4", NUMBERS_OFF],  # half the shipped peak learning rate (twice the old one)
    "lr8x": ["optim.lr=4e-4", NUMBERS_OFF],  # twice the shipped peak learning rate
    "questions": ["data.synthetic.questions=16", NUMBERS_OFF],  # every fact of a row asked (16 questions, not 8)
    "seed7": ["train.seed=7", "data.seed=7", NUMBERS_OFF],  # §4.8's recipe under another data order: the noise
    "numbers-off": [NUMBERS_OFF],  # the recipe as shipped from §4.7 to §4.10, without number clutter
    "numbers-off-s11": [NUMBERS_OFF, "train.seed=11", "data.seed=11"],  # §4.10's `shipped-s11`
    "numbers": ["data.synthetic.numbers=0.5"],  # half the synthetic haystacks carry a scholarly book's numbers
    "numbers-s11": ["data.synthetic.numbers=0.5", "train.seed=11", "data.seed=11"],  # `numbers` under seed 11
    "long-half": ["data.long_share=0.5", NUMBERS_OFF],  # one true 32k row in half the steps, not a quarter
    "rcd": ["yarn.beta_slow=4", NUMBERS_OFF],  # the lower critical dimension at YaRN x12
    "preview": ["data.synthetic.preview=0.3", NUMBERS_OFF],  # questions before and after the text in 30% of the rows
    "temperature": ["yarn.attention_factor=1.1", NUMBERS_OFF],  # logits x1.21 instead of YaRN's (0.1 ln 12 + 1)^2
    "x16": ["yarn.factor=16", NUMBERS_OFF],  # 60k looks like 3.75k to the interpolated dimensions
}
TASKS = ("niah", "multikey", "chat")
SMOKE_OVERRIDES = ["data.seq_len=1024", "train.micro_batch_size=2", "train.mixed_precision=fp32", "data.num_proc=1",
                   "train.loss_chunk_tokens=256", "train.memory_check=false", "pose.target_len=4096",
                   f"data.code_source={Path(yarnkit.__file__).parent / 'train'}"]  # a few .py files, not the stdlib


def e2e_command(args, name: str) -> list[str]:
    script = Path(__file__).resolve().with_name("e2e.py")
    return [sys.executable, str(script), "--stages", "train,eval", "--out", str(Path(args.out) / name),
            "--recipe", args.recipe, "--books", args.books, "--pattern", args.pattern, "--lengths", args.lengths,
            "--retrieval-lengths", args.retrieval_lengths, "--depths", args.depths, "--trials", str(args.trials),
            "--retrieval-tasks", ",".join(TASKS), "--docs", str(args.docs), "--sdpa-kernel", args.sdpa_kernel,
            *(["--train-data", args.train_data] if args.train_data else []),
            "--", *VARIANTS[name], f"train.max_steps={args.steps}", f"optim.warmup_steps={max(1, args.steps // 10)}",
            "checkpoint.every=0", *args.extra]


def evaluated(out: Path, name: str) -> bool:
    """The variant's training and every task's evaluation are done (its e2e summary exists after training)."""
    return (out / name / "summary.json").is_file() and all(
        any((out / name / "eval").glob(f"{task}-*.json")) for task in ("ppl", *TASKS))


def variant_row(out: Path, name: str) -> dict | None:
    summary_file = out / name / "summary.json"
    if not evaluated(out, name):
        return None
    summary = json.loads(summary_file.read_text())
    results = {r["task"]: r for r in load_results(sorted((out / name / "eval").glob("*.json")))}
    row = {"variant": name, "overrides": VARIANTS[name], "train_seconds": summary.get("train", {}).get("seconds"),
           "tokens_per_s": summary.get("train", {}).get("tokens_per_s"),
           "ppl": {r["length"]: r.get("ppl") for r in results.get("ppl", {}).get("rows", [])}}
    for task in TASKS:
        result = results.get(task) or {"by_length": [], "cells": [], "accuracy": None, "tf_accuracy": None}
        cells = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
        longest = max((length for length, _ in cells), default=None)
        row[task] = {"accuracy": result["accuracy"], "tf_accuracy": result["tf_accuracy"],
                     "by_length": {b["length"]: (b["accuracy"], b["tf_accuracy"]) for b in result["by_length"]},
                     "far": {depth: cells.get((longest, depth)) for depth in (0.0, 0.05)},
                     "worst": result.get("worst_cell"), "misses": result.get("misses")}
    scores = [row[t]["accuracy"] for t in TASKS if row[t]["accuracy"] is not None]
    row["score"] = sum(scores) / len(scores) if scores else None
    return row


def _k(n) -> str:
    return f"{int(n) // 1024}k" if int(n) % 1024 == 0 else str(n)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown(rows: list[dict]) -> str:
    """One table: ppl by length, each task by length, the far cells (longest length, depths 0 and 0.05), worst;
    then what each task's wrong answers gave (miss kinds), where the results record them."""
    ppl_lengths = sorted({n for r in rows for n in r["ppl"]})
    task_lengths = sorted({n for r in rows for t in TASKS for n in r[t]["by_length"]})
    header = ["variant", *[f"ppl {_k(n)}" for n in ppl_lengths]]
    for task in TASKS:
        header += [f"{task} {_k(n)}" for n in task_lengths] + [f"{task} far d0 / d.05", f"{task} worst cell"]
    header += ["score", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{r['ppl'][n]:.2f}" if r["ppl"].get(n) else "-" for n in ppl_lengths]
        for task in TASKS:
            cells += [_pct(r[task]["by_length"].get(n, (None,))[0]) for n in task_lengths]
            cells.append(f"{_pct(r[task]['far'][0.0])} / {_pct(r[task]['far'][0.05])}")
            worst = r[task]["worst"]
            cells.append(f"{_pct(worst['accuracy'])} ({_k(worst['length'])}, {worst['depth']:g})" if worst else "-")
        cells += [f"{r['score']:.3f}" if r["score"] is not None else "-", str(r["train_seconds"])]
        lines.append("| " + " | ".join([r["variant"], *cells]) + " |")
    if any(r[task].get("misses") is not None for r in rows for task in TASKS):
        lines += ["", "What the wrong answers gave (`yarnkit.eval.retrieval.miss_kind`, by the answer's first number):",
                  "", "| variant | " + " | ".join(f"{task} misses" for task in TASKS) + " |",
                  "|---|" + "---|" * len(TASKS)]
        lines += ["| " + " | ".join([r["variant"], *[_misses(r[task].get("misses")) for task in TASKS]]) + " |"
                  for r in rows]
    return "\n".join(lines) + "\n"


def _misses(counts: dict | None) -> str:
    if counts is None:
        return "-"
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts.items())
    return f"{sum(counts.values())}" + (f" ({kinds})" if kinds else "")


def keeps_perplexity(row: dict, base: dict) -> bool:
    """The perplexity targets against the base model's `{length: ppl}` (within its context): at the variant's longest
    length no worse than the base at its longest, at the shortest no worse than 1.03x the base there. True when
    either side has no numbers (nothing to hold it to)."""
    ppl = {int(n): v for n, v in row["ppl"].items() if v}
    base = {int(n): v for n, v in base.items() if v}
    if not ppl or not base:
        return True
    short = min(ppl)
    return ppl[max(ppl)] <= base[max(base)] and (short not in base or ppl[short] <= 1.03 * base[short])


def winner(rows: list[dict], base: dict) -> dict | None:
    """The highest score among variants that keep perplexity (`keeps_perplexity`); ties: the lower longest ppl."""
    fair = [r for r in rows if r["score"] is not None and keeps_perplexity(r, base)]
    if not fair:
        return None
    return max(fair, key=lambda r: (r["score"], -r["ppl"][max(r["ppl"], key=int)]))


def base_ppl(out: Path) -> dict:
    path = out / "base" / "ppl-base.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    return {row["length"]: row.get("ppl") for row in rows}


def evaluate_base(args, out: Path) -> None:
    """The base model's perplexity at the `--lengths` within its own context, once (the targets' reference)."""
    if (out / "base" / "ppl-base.json").is_file():
        return
    recipe = load_recipe([f"recipe={args.recipe}", *args.extra])
    model = recipe.model.name_or_path
    native = load_config(model).max_position_embeddings
    lengths = [n for n in args.lengths.split(",") if int(n) <= native]
    if not lengths:
        return
    with tempfile.TemporaryDirectory() as links:
        books = selected_books(Path(args.books), args.pattern, Path(links))
        subprocess.run([sys.executable, "-m", "yarnkit.cli", "eval", "ppl", model, "--data", str(books), "--lengths",
                        ",".join(lengths), "--docs", str(args.docs), "--sdpa-kernel", args.sdpa_kernel, "--label",
                        "base", "--out", str(out / "base")], check=True)


def prepare_data(args) -> None:
    """Tokenise and cache every source once (books and code), before variants start side by side."""
    data = [f"data.source={args.train_data}"] if args.train_data else []
    recipe = load_recipe([f"recipe={args.recipe}", *data, *args.extra])
    build_dataset(recipe.data, load_tokenizer(recipe.model.name_or_path))


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    running = []
    pending = [n for n in names if not evaluated(out, n)]
    if pending or args.prepare_only:
        prepare_data(args)
    if args.prepare_only:
        return 0
    evaluate_base(args, out)
    started = time.perf_counter()  # the budget counts from the first variant, not from data preparation
    while pending or running:
        while pending and len(running) < args.parallel and time.perf_counter() - started < args.budget_s:
            name = pending.pop(0)
            log = open(out / f"{name}.log", "w")
            print(f"[{time.perf_counter() - started:6.0f}s] start {name}", flush=True)
            running.append((name, subprocess.Popen(e2e_command(args, name), stdout=log, stderr=subprocess.STDOUT)))
        if not running:
            print(f"budget of {args.budget_s}s spent; not started: {', '.join(pending)}", flush=True)
            break
        time.sleep(2)
        for name, process in list(running):
            if process.poll() is not None:
                running.remove((name, process))
                print(f"[{time.perf_counter() - started:6.0f}s] {name} exited {process.returncode}", flush=True)
                write_tables(out, names)  # what has finished so far, also if a later variant is cut off
    print(write_tables(out, names))
    return 0


def write_tables(out: Path, names: list[str]) -> str:
    """ablation.json, ablation.md and winner.txt from the variants evaluated so far; returns the table."""
    rows = [row for n in names if (row := variant_row(out, n))]
    base = base_ppl(out)
    for row in rows:
        row["keeps_perplexity"] = keeps_perplexity(row, base)
    table = markdown(rows) if rows else "no variant evaluated yet\n"
    if base:
        table += "\nbase model: " + ", ".join(f"ppl {_k(n)} {v:.2f}" for n, v in sorted(base.items()) if v) + "\n"
    (out / "ablation.json").write_text(json.dumps({"base_ppl": base, "variants": rows}, indent=1))
    (out / "ablation.md").write_text(table)
    best = winner(rows, base)
    if best:
        (out / "winner.txt").write_text("\n".join(best["overrides"]) + "\n")
        (out / "winner.json").write_text(json.dumps({key: best[key] for key in ("variant", "overrides", "score")}))
        table += f"\nwinner: {best['variant']} (score {best['score']:.3f}) -> {out / 'winner.txt'}\n"
    return table


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablate")
    parser.add_argument("--recipe", default="smollm2-yarn-64k-retrieval")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--train-data", help="data.source for training (default: the recipe's)")
    parser.add_argument("--books", default=str(Path(__file__).resolve().parents[1] / "yarnkit" / "assets"))
    parser.add_argument("--pattern", default="test_*")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per variant (default 400)")
    parser.add_argument("--lengths", default="2048,8192,65536", help="perplexity lengths")
    parser.add_argument("--retrieval-lengths", default="2048,4096,8192,16384,32768,65536")
    parser.add_argument("--depths", default="0,0.05,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=8, help="keys per cell (the templates take turns)")
    parser.add_argument("--docs", type=int, default=6, help="books per perplexity length")
    parser.add_argument("--parallel", type=int, default=2, help="variants running at once")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no variant this many seconds "
                        "after the first one started (data preparation and the base model's evaluation not counted)")
    parser.add_argument("--sdpa-kernel", default="auto")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke: 2 steps at a small shape, tiny lengths, "
                        "1 key per cell")
    parser.add_argument("--prepare-only", action="store_true", help="only tokenise and cache the training data")
    parser.add_argument("--extra", nargs="*", default=[], help="more recipe overrides for every variant")
    args = parser.parse_args(argv)
    if args.smoke:  # the recipe's own keys at a small shape, fp32 on CPU
        args.steps, args.lengths, args.retrieval_lengths = 2, "512,1024", "512,1024"
        args.depths, args.trials, args.docs, args.parallel = "0,0.5", 1, 1, 1
        args.extra += SMOKE_OVERRIDES
    return args


if __name__ == "__main__":
    sys.exit(run(parse()))
