"""The GPU check's paths, one per process: each runs what a user runs, at a small size, then checks what it wrote.

    python -m yarnkit.bench.gpu_paths NAME --out DIR [--recipe R] [--cpu-smoke] [--shared DIR] [--e2e-script FILE]
                                      [--tests DIR]

`yarnkit.bench.gpu_check` starts these; run one by hand to debug it. Each ends by writing DIR/result.json,
`{"passed": true, "summary": ..., "detail": {...}}` or `{"passed": false, "error": "<one line>"}`, and exits 0 or 1.

- `bundled-model`: the bundled SmolLM2-135M GGUF converted once to an HF folder (the cache every other path reads).
- `recipe --recipe NAME|FILE.yaml`: `yarnkit train` for 5 steps at the recipe's small shape
  (`yarnkit.bench.recipe_shapes`) with its own precision and speed keys; steps 1..5 are logged with finite losses
  and a CUDA peak memory; with Liger-Kernel installed, the Liger kernels and the fused loss the recipe asks for
  (`auto` or `liger`) really ran (RUN/speed.json), and compiled layers when it asks for them.
- `e2e`: the checkout's e2e script (`--e2e-script`, scripts/e2e.py, which scripts/gpu_check.py passes) with
  `--smoke --stages train,eval,export`: training through `accelerate launch`, perplexity and retrieval, the HF +
  GGUF export; both export checks passed and every stage wrote its files.
- `bench`: `python -m yarnkit.bench.training --cases`, one step of each group: yarnkit, HF, HF + Liger
  (SmolLM2-135M, one 16k-token sequence); every row ok.
- `runtime`: the bundled weights, 4,096 tokens of the bundled book then 96 decode steps through 6 evictions
  (`yarnkit.bench.streaming.path_check`): the CUDA-graph decode, and the graph with `torch.compile` inside,
  against the eager cache; then 4 sessions decoded as one batch against their solo runs
  (`batch_throughput`). Exactness is asserted in float32, where the paths differ only in summation order: max
  |dlog p| within 1e-3, the same greedy token in every row whose best token leads by more than 2e-3 (at least half
  the rows; a real-weights near-tie flipped once, H100, 2026-12-06), every batched token equal to its solo run.
  bf16 is measured and reported next to it, with a gross-error guard only (greedy agreement >= 0.9): real
  weights give large logits, so bf16 rounding moves tail log-probs by tenths to ~1.4 nats (1.36 compiled, H100,
  2026-12-06) while greedy tokens stay ~91-96% equal; a decode that reads wrong cache rows or positions agrees
  on few tokens. In bf16 each line also gives the agreement with the eager cache on the same fused model (the
  two paths then differ only in their cache and attention kernels) and each run's agreement with the same
  weights in float32 (docs/runtime.md, "bf16 drift: where it comes from").
- `retrieval`: `yarnkit eval retrieval` (niah, YaRN x2) at one length (4,096 tokens); a result with its cells.
- `export`: the bundled model with YaRN x2 saved as an HF folder, then `yarnkit export --gguf` in bf16 with its
  checks on the device: the reload by plain transformers in a fresh process, and the GGUF read back.
- `gpu-tests`: `pytest -m gpu` over the checkout's test files (`--tests`) that carry the mark. None may fail; on
  CUDA at least one must pass. On CUDA with pytest-xdist installed the tests run in `GPU_TEST_WORKERS` processes
  (one after another they outgrew the path's limit: stopped at 230 s beside the other paths and at 170 s alone,
  H100, 2026-12-07; `python -m pytest -m gpu tests/test_runtime_gpu.py` alone takes 87 s of it).

`--cpu-smoke` runs each on CPU at tiny sizes: recipes for 2 steps in fp32, the static decode (CUDA graphs need a
GPU) in fp32 on 64 + 48 tokens, a tiny random model in the bench without the Liger peer (CUDA only), retrieval at
512 tokens, a 256-token export check. The GPU-only tests skip there.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from yarnkit.bench.recipe_shapes import small_overrides
from yarnkit.errors import one_line

EXACT_LIMITS = {"worst_logprob_diff": 1e-3, "decided_agreement": 1.0}  # fp32: only summation order differs
BF16_GUARD = {"worst_logprob_diff": None, "greedy_agreement": 0.9}  # bf16: reported; gross errors only
RECIPE_STEPS = {"cuda": 5, "cpu": 2}
GPU_TEST_WORKERS = 4  # gpu-tests: pytest-xdist processes on CUDA (the tests compile on the CPU, one core each)
BENCH_SEQ = 16384  # SmolLM2's 8k x 2: YaRN factor 2 in every group


class PathFailed(Exception):
    """The path ran but what it wrote is wrong; the message is the table's one line."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise PathFailed(message)


def run_logged(command: list[str], log: Path, cwd: Path | None, what: str) -> None:
    """Run `command` with its output in `log`; a non-zero exit fails the path with the log's last error line."""
    from yarnkit.bench.training import last_error

    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT).returncode
    check(code == 0, f"{what} exited {code}: {last_error(log.read_text())}")


def given(path: str | None, what: str) -> Path:
    """A file or folder of the checkout, as scripts/gpu_check.py passed it (an installed wheel has none)."""
    check(bool(path) and Path(path).exists(),
          f"{what} not found: run the GPU check from a checkout (its script names both)")
    return Path(path)


def device(args) -> str:
    return "cpu" if args.cpu_smoke else "cuda"


# ---------------------------------------------------------------------------------------------------- the paths

def bundled_model(args) -> tuple[str, dict]:
    from yarnkit.models import local_hf_dir

    folder = local_hf_dir("smollm2-135m")
    return f"HF folder {folder}", {"folder": folder}


def recipe(args) -> tuple[str, dict]:
    import torch

    from yarnkit.cli import dispatch
    from yarnkit.train.metrics import read_metrics
    from yarnkit.train.recipe import recipe_from_file
    from yarnkit.train.speed import liger_missing

    steps = RECIPE_STEPS[device(args)]
    run_dir = args.out / "run"
    overrides = {**small_overrides(args.recipe, steps, cpu=args.cpu_smoke), "run_dir": run_dir, "resume": "none",
                 "data.cache_dir": args.shared / "data-cache"}
    code = dispatch(["train", f"recipe={args.recipe}", *(f"{key}={value}" for key, value in overrides.items())])
    check(code == 0, f"yarnkit train exited {code}")
    rows = read_metrics(run_dir)
    check([row["step"] for row in rows] == list(range(1, steps + 1)), f"logged steps {[r['step'] for r in rows]}, "
                                                                       f"expected 1..{steps}")
    losses = [row["loss"] for row in rows]
    check(all(math.isfinite(loss) and 0 < loss < 20 for loss in losses), f"losses {losses}")
    speed = json.loads((run_dir / "speed.json").read_text())
    resolved = recipe_from_file(run_dir / "recipe.yaml")
    if not args.cpu_smoke:
        check(max(row.get("peak_memory_gb") or 0 for row in rows) > 0, "no CUDA memory used: it trained on the CPU")
        if liger_missing() is None:  # what the recipe asks for must run where it can
            if resolved.model.kernels in ("auto", "liger"):
                check(speed["norm_swiglu_rope"] == "liger", f"model.kernels={resolved.model.kernels} with Liger "
                                                            f"installed, but {speed['norm_swiglu_rope']} ran")
            if resolved.train.loss_impl in ("auto", "liger"):
                check(speed["loss"].startswith("liger"), f"train.loss_impl={resolved.train.loss_impl} with Liger "
                                                         f"installed, but the {speed['loss']} loss ran")
        if resolved.model.compile_layers == "true":
            check(speed["decoder_layers"] == "compiled", "model.compile_layers=true, but the layers ran eagerly")
    rate = rows[-1].get("tokens_per_s_per_device") or 0
    summary = (f"{steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}, {rate:,.0f} tok/s, "
               f"{resolved.train.mixed_precision}; {speed['attention']}, norm/SwiGLU/RoPE {speed['norm_swiglu_rope']}, "
               f"layers {speed['decoder_layers']}, loss {speed['loss']}")
    return summary, {"losses": losses, "speed": speed, "precision": resolved.train.mixed_precision,
                     "peak_memory_gb": max(row.get("peak_memory_gb") or 0 for row in rows),
                     "cuda": torch.cuda.is_available()}


def e2e(args) -> tuple[str, dict]:
    from yarnkit.train.recipe import load_recipe

    script = given(args.e2e_script, "the e2e script")
    out = args.out / "e2e"
    extra = ["--", "train.max_steps=2"] if args.cpu_smoke else []
    run_logged([sys.executable, str(script), "--smoke", "--stages", "train,eval,export", "--out", str(out), *extra],
               args.out / "e2e.log", script.parent.parent, script.name)
    summary = json.loads((out / "summary.json").read_text())
    steps = load_recipe(["recipe=tiny", *extra[1:]]).train.max_steps  # --smoke trains the tiny recipe
    check(summary["train"]["steps"] == steps, f"trained {summary['train']['steps']} steps, expected {steps}")
    check(args.cpu_smoke or summary["device"] != "cpu", "e2e ran on the CPU")
    for pattern in ("ppl-*.json", "niah-*.json", "multikey-*.json", "chat-*.json"):
        check(any((out / "eval").glob(pattern)), f"no eval/{pattern} written")
    checks = summary.get("export_checks", {})
    for name in ("hf_check", "gguf_check"):
        check(checks.get(name, {}).get("passed") is True, f"export {name}: {checks.get(name) or 'did not run'}")
    return (f"{steps} steps on {summary['device']}, loss {summary['train']['first_loss']:.2f} -> "
            f"{summary['train']['last_loss']:.2f}; export HF {checks['hf_check']['max_relative_difference']:.2g}, "
            f"GGUF {checks['gguf_check']['max_relative_difference']:.2g}"), {"summary": summary}


def bench(args) -> tuple[str, dict]:
    cases = (["tiny@128@yarnkit", "tiny@128@hf"] if args.cpu_smoke
             else [f"smollm2-135m@{BENCH_SEQ}@{variant}" for variant in ("yarnkit", "hf", "hf-liger")])
    out = args.out / "bench"
    run_logged([sys.executable, "-m", "yarnkit.bench.training", "--out", str(out), "--steps", "1", "--warmup", "0",
                "--budget-s", str(args.budget_s), *(["--cpu"] if args.cpu_smoke else []), "--cases", *cases],
               args.out / "bench.log", None, "python -m yarnkit.bench.training")
    rows = json.loads((out / "compare.json").read_text())["cases"]
    check(sorted(row["case"] for row in rows) == sorted(cases), f"rows {[row['case'] for row in rows]}")
    for row in rows:
        check(row["status"] == "ok", f"{row['case']}: {row['status']}: {row.get('error', '')}")
    summary = "; ".join(f"{row['variant']} {row['tokens_per_s_per_gpu']:,.0f} tok/s" for row in rows)
    return summary, {"rows": [{key: row.get(key) for key in ("case", "status", "tokens_per_s_per_gpu",
                                                             "peak_memory_gb", "losses")} for row in rows]}


def runtime(args) -> tuple[str, dict]:
    import torch

    cpu = args.cpu_smoke
    dtypes = [torch.float32] if cpu else [torch.float32, torch.bfloat16]
    detail, lines = {"limits": {"float32": EXACT_LIMITS, "bfloat16": BF16_GUARD}}, []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        limits = EXACT_LIMITS if dtype == torch.float32 else BF16_GUARD
        for label, result in runtime_checks(device(args), dtype, cpu):
            label = f"{name} {label}"
            detail[label] = result
            if "all_identical" in result:
                prefixes = result["identical_prefix_tokens"]
                check(dtype != torch.float32 or result["all_identical"],
                      f"{label}: batched sessions left their solo runs after {prefixes} tokens")
                lines.append(f"{label}: identical tokens {prefixes} of {result['check_tokens']}")
                continue
            decode = result["asked"]
            check(result["decode_path"] == decode, f"{label}: asked for the {decode} decode, the "
                                                   f"{result['decode_path']} decode ran (a fallback)")
            check(not result["compile"] or result["compiled"], f"{label}: the decode step was not compiled")
            check(result["rerotations"] >= 2, f"{label}: {result['rerotations']} evictions, expected several")
            worst, bound = result["max_abs_logprob_diff"], limits["worst_logprob_diff"]
            kind = next(key for key in ("decided_agreement", "greedy_agreement") if key in limits)
            agreement, rows = result[kind], result["decided_rows"] if kind == "decided_agreement" else result["steps"]
            check(rows * 2 >= result["steps"],
                  f"{label}: only {rows} of {result['steps']} rows have a clear best token")
            check((bound is None or worst <= bound) and agreement >= limits[kind],
                  f"{label} vs the eager cache: max |dlogp| {worst:.3g} (limit {bound}), "
                  f"{kind.replace('_', ' ')} {agreement:.4f} over {rows} rows (limit {limits[kind]})")
            lines.append(f"{label}: max |dlogp| {worst:.3g}, greedy agreement {result['greedy_agreement']:.3f} "
                         f"({kind.replace('_', ' ')} {agreement:.4f} over {rows} rows), "
                         f"{result['rerotations']} evictions{drift_note(result)}")
    return "; ".join(lines), detail


def drift_note(result: dict) -> str:
    """The path check's other comparisons, for the table's line: against the eager cache with the same fuse
    (`same_fuse`), and each path's greedy agreement with the float32 reference (`vs_reference`)."""
    note = ""
    if "same_fuse" in result:
        same = result["same_fuse"]
        note += (f"; vs the eager cache with the same fuse: max |dlogp| {same['max_abs_logprob_diff']:.3g}, greedy "
                 f"agreement {same['greedy_agreement']:.3f}")
    if "vs_reference" in result:
        note += "; greedy agreement with float32: " + ", ".join(
            f"{name} {row['greedy_agreement']:.3f}" for name, row in result["vs_reference"].items())
    return note


def runtime_checks(where: str, dtype, cpu: bool):
    """(label, result) for each decode path against the eager cache (and, below float32, each path against the
    same weights run in float32), then the batch against solo runs."""
    import torch

    from yarnkit.bench.streaming import batch_throughput, path_check
    from yarnkit.export.verify import prompt_ids
    from yarnkit.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype=dtype, device=where)
    reference = None if dtype == torch.float32 else copy.deepcopy(model).float()  # the same weights, in float32
    window, steps = (64, 48) if cpu else (4096, 96)
    ids = prompt_ids(tokenizer, window + steps, model.config.vocab_size)[0]
    paths = [("static", {})] if cpu else [("graph", {}), ("graph", {"compile": True})]
    for decode, options in paths:
        result = path_check(model, decode, window=window, prompt=window, steps=steps, evict_batch=16, ids=ids,
                            reference=reference, **options)
        yield decode + ("+compile" if options else ""), {**result, "asked": decode, "compile": bool(options)}
    batch = batch_throughput(model, cache=window, sessions=4 if not cpu else 2, steps=32 if not cpu else 8,
                             warmup=2, check_tokens=32 if not cpu else 8, evict_batch=16,
                             decode=paths[0][0])
    yield f"batch of {batch['sessions']} ({batch['decode_path']})", batch


def retrieval(args) -> tuple[str, dict]:
    from yarnkit.cli import dispatch

    length, trials = ("512", "1") if args.cpu_smoke else ("4096", "2")
    code = dispatch(["eval", "retrieval", "smollm2-135m", "--rope-type", "yarn", "--factor", "2", "--tasks", "niah",
                     "--lengths", length, "--depths", "0.5", "--trials", trials, "--device", device(args),
                     *(["--max-new-tokens", "4"] if args.cpu_smoke else []), "--label", "gpu-check",
                     "--out", str(args.out)])
    check(code == 0, f"yarnkit eval retrieval exited {code}")
    result = json.loads((args.out / "niah-gpu-check.json").read_text())
    check(bool(result.get("cells")), f"no cells in the result: {result.get('skipped')}")
    return f"niah at {length} tokens: accuracy {result['accuracy']:.2f}", {"cells": result["cells"]}


def export(args) -> tuple[str, dict]:
    from yarnkit.cli import dispatch
    from yarnkit.models import load_model
    from yarnkit.patch import apply_rope_scaling

    model, tokenizer = load_model("smollm2-135m")
    apply_rope_scaling(model, "yarn", factor=2)
    source = args.out / "smollm2-yarn-x2"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    del model
    code = dispatch(["export", str(source), "--out", str(args.out / "export"), "--gguf", "--device", device(args),
                     "--dtype", "float32" if args.cpu_smoke else "bfloat16",
                     *(["--verify-tokens", "256"] if args.cpu_smoke else [])])
    check(code == 0, f"yarnkit export exited {code}")
    report = json.loads((args.out / "export" / "export_report.json").read_text())
    for name in ("hf_check", "gguf_check"):
        check(report.get(name, {}).get("passed") is True, f"{name}: {report.get(name) or 'did not run'}")
    hf, gguf = report["hf_check"], report["gguf_check"]
    return (f"HF reload {hf['max_relative_difference']:.2g} (<= {hf['tolerance']:g}, {hf['dtype']}, "
            f"{hf['prompt_tokens']} tokens), GGUF {gguf['max_relative_difference']:.2g} (<= {gguf['tolerance']:g})"), \
        {"hf_check": hf, "gguf_check": gguf}


def pytest_command(files: list[str], junit: Path, workers: int) -> list[str]:
    """`pytest -m gpu` over `files`, verbose (a path stopped at its limit leaves the tests that ran in its log),
    in `workers` pytest-xdist processes when more than one (each test to the next free process)."""
    parallel = ["-n", str(workers), "--dist", "load"] if workers > 1 else []
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "--durations=10", "-p", "no:cacheprovider",
            *parallel, f"--junitxml={junit}", *files]


def gpu_tests(args) -> tuple[str, dict]:
    tests = given(args.tests, "the tests folder")
    files = sorted(str(path) for path in tests.glob("test_*.py") if "pytest.mark.gpu" in path.read_text())
    check(bool(files), f"no test file in {tests} carries the gpu mark")
    junit = args.out / "junit.xml"
    log = args.out / "pytest.log"
    workers = GPU_TEST_WORKERS if not args.cpu_smoke and importlib.util.find_spec("xdist") else 1
    with open(log, "w") as handle:
        code = subprocess.run(pytest_command(files, junit, workers), cwd=tests.parent, stdout=handle,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    check(junit.is_file(), f"pytest exited {code} before writing its report; see {log}")
    counts, failed = junit_counts(junit)
    check(code == 0 and not failed, f"pytest -m gpu exited {code}: {len(failed)} failed: " + "; ".join(failed[:3]))
    check(args.cpu_smoke or counts["passed"] > 0, "every gpu test was skipped on a CUDA machine")
    return (f"{counts['passed']} passed, {counts['skipped']} skipped ({len(files)} files, {workers} process"
            f"{'es' if workers > 1 else ''})", {**counts, "files": files, "workers": workers})


def junit_counts(path: Path) -> tuple[dict, list[str]]:
    """(`{"passed", "skipped", "failed"}`, ["file::test: message", ...] of the failed ones) from pytest's JUnit XML."""
    cases = ElementTree.parse(path).getroot().iter("testcase")
    counts, failed = {"passed": 0, "skipped": 0, "failed": 0}, []
    for case in cases:
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            counts["failed"] += 1
            message = (problem.get("message") or "").strip().splitlines()
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


PATHS = {"bundled-model": bundled_model, "recipe": recipe, "e2e": e2e, "bench": bench, "runtime": runtime,
         "retrieval": retrieval, "export": export, "gpu-tests": gpu_tests}


# ---------------------------------------------------------------------------------------------------- the process

def path_error(error: BaseException) -> str:
    """A failed path's one line: a `PathFailed` says what failed itself, any other error gets its type."""
    text = one_line(error)
    return (text.removeprefix("PathFailed: ") if isinstance(error, PathFailed) else text)[:400]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", choices=sorted(PATHS))
    parser.add_argument("--out", type=Path, required=True, help="this path's folder (result.json and its files)")
    parser.add_argument("--recipe", help="recipe: a shipped recipe name or a YAML file")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--e2e-script", help="e2e: the checkout's e2e script")
    parser.add_argument("--tests", help="gpu-tests: the checkout's tests folder")
    parser.add_argument("--shared", type=Path, help="a folder the paths share (the data cache); default OUT/..")
    parser.add_argument("--budget-s", type=int, default=180, help="bench: its own --budget-s")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.shared = (args.shared or args.out.parent).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.monotonic()
    try:
        summary, detail = PATHS[args.path](args)
        result = {"passed": True, "summary": summary, "detail": detail}
    except Exception as error:  # noqa: BLE001 -- every failure becomes the path's one line
        traceback.print_exc()
        result = {"passed": False, "error": path_error(error)}
    result["seconds"] = round(time.monotonic() - started, 1)
    (args.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"{'PASS' if result['passed'] else 'FAIL'} {args.path}: {result.get('summary') or result['error']}",
          flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
