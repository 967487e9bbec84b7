"""Ablation of the training recipe for context use: variants trained and evaluated the same way.

Each variant is `scripts/e2e.py --stages train,eval` (no baselines, no export) with the variant's recipe overrides
and a shorter run (`--steps`), then a reduced grid: perplexity at `--lengths`, and the single-needle (niah) and
multi-key tasks at `--retrieval-lengths` x `--depths` with `--trials` keys per cell. Two variants run side by side
(`--parallel`) on one GPU. A variant whose summary exists is not run again (the command is resumable), and no new
variant starts once `--budget-s` is spent. Writes:

    OUT/<variant>/...          each variant's e2e output (run/, eval/, summary.json)
    OUT/ablation.json, .md     per variant: ppl by length, niah and multi-key accuracy (teacher-forced) by length
    OUT/winner.txt             the overrides of the best variant (highest mean of niah and multi-key accuracy over
                               the grid; ties go to the lower perplexity at the longest length), one per line

GPU (one H200, about 4 minutes for the first four variants):
    python scripts/ablate.py --train-data '/data/books/train_*.txt.gz' --books /data/books/test --out runs/ablate
CPU smoke (two variants, 2 steps each, tiny lengths):
    python scripts/ablate.py --smoke --out /tmp/ablate
Run from a checkout with yarnkit installed (`pip install -e .`) or on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from yarnkit.eval.report import load_results
from yarnkit.models import load_tokenizer
from yarnkit.train.data import build_dataset
from yarnkit.train.recipe import load_recipe

PLAIN = {"books": 1, "retrieval": 0, "chat": 0, "code": 0}
SYNTHETIC = {"books": 0.55, "retrieval": 0.3, "chat": 0.15, "code": 0}
WITH_CODE = {"books": 0.4, "retrieval": 0.3, "chat": 0.15, "code": 0.15}


def _mix(weights: dict) -> str:
    return "data.mix=" + json.dumps(weights, separators=(",", ":"))  # no spaces: one shell word


VARIANTS = {  # name -> recipe overrides on top of --recipe; every mix names all four sources (overrides merge)
    "books": [_mix(PLAIN), "data.long_share=0"],
    "synthetic": [_mix(SYNTHETIC), "data.long_share=0"],
    "synthetic+long": [_mix(SYNTHETIC), "data.long_share=0.25"],
    "synthetic+long+code": [_mix(WITH_CODE), "data.long_share=0.25"],
    "synthetic+long+temperature": [_mix(SYNTHETIC), "data.long_share=0.25",
                                   "yarn.attention_factor=1.3"],  # logits x1.69 instead of YaRN's 0.1 ln 8 + 1
}


def e2e_command(args, name: str) -> list[str]:
    script = Path(__file__).resolve().with_name("e2e.py")
    return [sys.executable, str(script), "--stages", "train,eval", "--out", str(Path(args.out) / name),
            "--recipe", args.recipe, "--books", args.books, "--pattern", args.pattern, "--lengths", args.lengths,
            "--retrieval-lengths", args.retrieval_lengths, "--depths", args.depths, "--trials", str(args.trials),
            "--retrieval-tasks", "niah,multikey", "--docs", str(args.docs), "--sdpa-kernel", args.sdpa_kernel,
            *(["--train-data", args.train_data] if args.train_data else []), *(["--smoke"] if args.smoke else []),
            "--", *VARIANTS[name], f"train.max_steps={args.steps}", f"optim.warmup_steps={max(1, args.steps // 10)}",
            "checkpoint.every=0", *args.extra]


def variant_row(out: Path, name: str) -> dict | None:
    summary_file = out / name / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    results = {r["task"]: r for r in load_results(sorted((out / name / "eval").glob("*.json")))}
    row = {"variant": name, "overrides": VARIANTS[name], "train_seconds": summary.get("train", {}).get("seconds"),
           "tokens_per_s": summary.get("train", {}).get("tokens_per_s"),
           "ppl": {r["length"]: r.get("ppl") for r in results.get("ppl", {}).get("rows", [])}}
    for task in ("niah", "multikey"):
        result = results.get(task) or {"by_length": [], "accuracy": None, "tf_accuracy": None}
        row[task] = {"accuracy": result["accuracy"], "tf_accuracy": result["tf_accuracy"],
                     "by_length": {b["length"]: (b["accuracy"], b["tf_accuracy"]) for b in result["by_length"]}}
    scores = [row[t]["accuracy"] for t in ("niah", "multikey") if row[t]["accuracy"] is not None]
    row["score"] = sum(scores) / len(scores) if scores else None
    return row


def markdown(rows: list[dict]) -> str:
    ppl_lengths = sorted({n for r in rows for n in r["ppl"]})
    task_lengths = sorted({n for r in rows for n in r["niah"]["by_length"]})
    k = lambda n: f"{int(n) // 1024}k" if int(n) % 1024 == 0 else str(n)  # noqa: E731
    header = ["variant", *[f"ppl {k(n)}" for n in ppl_lengths], *[f"niah {k(n)}" for n in task_lengths],
              *[f"multi-key {k(n)}" for n in task_lengths], "score", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{r['ppl'][n]:.2f}" if r["ppl"].get(n) else "-" for n in ppl_lengths]
        for task in ("niah", "multikey"):
            cells += [f"{100 * a:.0f}% ({100 * t:.0f}%)" if (a := r[task]["by_length"].get(n, (None,))[0]) is not None
                      and (t := r[task]["by_length"][n][1]) is not None else "-" for n in task_lengths]
        lines.append("| " + " | ".join([r["variant"], *cells, f"{r['score']:.3f}" if r["score"] is not None else "-",
                                        str(r["train_seconds"])]) + " |")
    return "\n".join(lines) + "\n"


def prepare_data(args) -> None:
    """Tokenise and cache every source once (books and code), before variants start side by side."""
    data = [f"data.source={args.train_data}"] if args.train_data else []
    recipe = load_recipe([f"recipe={args.recipe}", *data, *VARIANTS["synthetic+long+code"]])
    build_dataset(recipe.data, load_tokenizer(recipe.model.name_or_path))


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    started, running = time.perf_counter(), []
    pending = [n for n in names if variant_row(out, n) is None]
    if pending or args.prepare_only:
        prepare_data(args)
    if args.prepare_only:
        return 0
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
    rows = [row for n in names if (row := variant_row(out, n))]
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    (out / "ablation.md").write_text(markdown(rows))
    print(markdown(rows))
    if rows:
        scored = [r for r in rows if r["score"] is not None]
        longest = max(max(r["ppl"], default=0) for r in rows)
        best = max(scored, key=lambda r: (r["score"], -(r["ppl"].get(longest) or 1e9)))
        (out / "winner.txt").write_text("\n".join(best["overrides"]) + "\n")
        print(f"winner: {best['variant']} (score {best['score']:.3f}) -> {out / 'winner.txt'}")
    return 0


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablate")
    parser.add_argument("--recipe", default="smollm2-yarn-64k-retrieval")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--train-data", help="data.source for training (default: the recipe's)")
    parser.add_argument("--books", default=str(Path(__file__).resolve().parents[1] / "yarnkit" / "assets"))
    parser.add_argument("--pattern", default="test_*")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per variant (default 100)")
    parser.add_argument("--lengths", default="2048,8192,65536", help="perplexity lengths")
    parser.add_argument("--retrieval-lengths", default="2048,16384,65536")
    parser.add_argument("--depths", default="0,0.25,0.5,1")
    parser.add_argument("--trials", type=int, default=2, help="keys per cell (the templates take turns)")
    parser.add_argument("--docs", type=int, default=2, help="books per perplexity length")
    parser.add_argument("--parallel", type=int, default=2, help="variants running at once")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no variant after this many seconds")
    parser.add_argument("--sdpa-kernel", default="auto")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke: tiny recipe and lengths, 2 steps")
    parser.add_argument("--prepare-only", action="store_true", help="only tokenise and cache the training data")
    parser.add_argument("--extra", nargs="*", default=[], help="more recipe overrides for every variant")
    args = parser.parse_args(argv)
    if args.smoke:
        args.recipe, args.steps, args.lengths, args.retrieval_lengths = "tiny", 2, "256,512", "256,512"
        args.depths, args.trials, args.docs = "0.5", 1, 1
    return args


if __name__ == "__main__":
    sys.exit(run(parse()))
