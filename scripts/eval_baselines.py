"""Zero-shot long-context baselines for SmolLM2-135M: no scaling, dynamic NTK x8, YaRN x8 (GPU run for the lead).

For each configuration (yarnkit.bench.baselines) it runs `yarnkit eval ppl` (PG-19 test books, one window per
book per length) and `yarnkit eval passkey` (lengths x depths x trials), then writes a merged ppl plot and the
markdown tables:

    OUT/ppl-<label>.json|png, OUT/passkey-<label>.json|png, OUT/ppl-compare.png, OUT/results.md

GPU command (one H100/H200, bf16; about 4 minutes, see docs/eval.md):
    python scripts/eval_baselines.py /path/to/books --pattern 'test_*' --out runs/eval-baselines
CPU smoke run (tiny sizes, a few minutes):
    python scripts/eval_baselines.py yarnkit/assets --pattern 'test_*' --out /tmp/baselines \
        --lengths 256,512 --docs 1 --trials 1 --depths 0.5
The retrieval tasks run in scripts/e2e.py. Run from a checkout with yarnkit installed
(`pip install -e .`) or on PYTHONPATH. Not a test: nothing here asserts numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from yarnkit.cli import main as yarnkit
from yarnkit.bench.baselines import baseline_configs, selected_books


def run(args) -> int:
    out = Path(args.out)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as links:
        data = selected_books(Path(args.books), args.pattern, Path(links))
        for suffix, extra, _ in baseline_configs(args.factor):
            label = f"{args.label} {suffix}"
            for command in (["ppl", args.model, "--data", data, "--lengths", args.lengths, "--docs", args.docs],
                            ["passkey", args.model, "--lengths", args.lengths, "--depths", args.depths,
                             "--trials", args.trials]):
                print(f"[{time.perf_counter() - started:7.1f}s] {command[0]}: {label}", flush=True)
                yarnkit(["eval", *map(str, command), *extra, "--label", label, "--out", str(out)])
    ppl_files = sorted(str(path) for path in out.glob("ppl-*.json"))
    yarnkit(["eval", "plot", *ppl_files, "--out", str(out / "ppl-compare.png")])
    yarnkit(["eval", "report", *ppl_files, *sorted(str(p) for p in out.glob("passkey-*.json")),
             "--markdown", "--output", str(out / "results.md")])
    print(f"done in {time.perf_counter() - started:.0f}s; tables in {out / 'results.md'}")
    return 0


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("books", help="a folder of books (e.g. PG-19 test) or one book file")
    parser.add_argument("--pattern", default="test_*", help="which files of the folder to use (default test_*)")
    parser.add_argument("--out", default="runs/eval-baselines")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--label", default="SmolLM2-135M")
    parser.add_argument("--factor", type=float, default=8.0, help="scale of the dynamic NTK and YaRN baselines")
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
    parser.add_argument("--docs", type=int, default=10, help="books per length (default 10, as in the YaRN paper)")
    parser.add_argument("--trials", type=int, default=4, help="passkeys per (length, depth) cell (default 4)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse()))
