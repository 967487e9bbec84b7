"""The training-speed comparison: yarnkit's recipe defaults against the peers a user would pick, case by case, on
the same data and the same initial weights; and the process-count scaling of one recipe.

    python -m yarnkit.bench.training --out out/speed --steps 5 --warmup 2 --cases smollm2-135m@65536@hf-liger \
        smollm2-135m@65536@yarnkit                                  # (scripts/bench_train.py is the same command)
    python -m yarnkit.bench.training --out /tmp/speed --cpu --steps 2 --warmup 1 --cases tiny@128@hf tiny@128@yarnkit
    python -m yarnkit.bench.training --dry-run --out /tmp/sp-estimate --cases llama-1b@1048576@alst-sp4
    python -m yarnkit.bench.training --out out/train-bench --gpus 1,2,4 --zero 2 --steps 10   # yarnkit.bench.scaling

Cases (`MODEL@SHAPE@VARIANT`, `yarnkit.bench.training_cases`) share one process per group (peers, peers with
Liger, yarnkit: startup is paid once; each case's peak memory is its own): `python -m yarnkit.bench.training
--plan PLAN.json` is a yarnkit group's process, `python -m yarnkit.bench.hf_peer --plan PLAN.json` a peers' one;
a sequence-parallel case (`-spN`) is an `accelerate launch` of its own. Groups run in order until `--budget-s`
is spent. The first steps' losses must agree to bf16 noise (`loss_vs_ref`: largest relative difference to the
shape's reference peer). Each row records the case's exact configuration (peer flags; yarnkit's resolved speed
keys and RUN/speed.json, what ran after fallbacks), tokens/s, peak memory and causal MFU
(`yarnkit.train.estimate.model_flops`) against `--peak-tflops` and against a bf16 matmul peak measured at the
start of the same run. `-spN` rows add their largest relative loss and grad-norm differences to `-sp1` and the
scaling efficiency (tokens/s/GPU against `-sp1`'s). Out-of-memory is a result (`oom`); a group process that
dies gives each of its unfinished rows its exit code and its last error line. `--dry-run` writes each yarnkit
case's `yarnkit.train.estimate` for its launch instead, without a GPU. Writes OUT/compare.json and OUT/compare.md
(`yarnkit.bench.training_table`) and prints the table. Not a test: the numbers depend on the machine;
tests/test_bench_train.py runs one CPU case per group.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from yarnkit.bench.training_cases import (HF_PEER, case_command, child_env, model_source, parse_shape, read_run,
                                          run_plan, write_model_dir)
from yarnkit.bench.training_table import PEERS, VARIANTS, add_ratios, markdown, parse_variant
from yarnkit.train.estimate import model_flops

def _launch(command: list[str], log: Path, timeout: float) -> int | None:
    """Run `command` (output to `log`) in its own process group; None if it ran past `timeout` and was stopped."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:  # own process group: a timeout also stops accelerate's worker processes
        process = subprocess.Popen(command, env=child_env(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"),
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # torchrun's agent passes SIGTERM on to its workers
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return None


def matmul_peak_tflops(cpu: bool) -> float:
    """bf16 (CPU: fp32) square matmul throughput, measured now on this device."""
    size, dtype, device = (1024, torch.float32, "cpu") if cpu else (8192, torch.bfloat16, "cuda")
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    iterations = 5 if cpu else 50
    if not cpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        a @ b
    if not cpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del a, b
    if not cpu:
        torch.cuda.empty_cache()  # leave the GPU's memory to the cases
    return 2 * size**3 * iterations / seconds / 1e12


def new_row(model: str, shape: str, variant: str) -> dict:
    batch, seq, pose = parse_shape(shape)
    return {"case": f"{model}@{shape}@{variant}", "model": model, "shape": shape, "batch": batch, "seq_len": seq,
            "pose_target": pose, "variant": variant, "gpus": max(parse_variant(variant)[1], 1), "status": "pending"}


def group_of(row: dict) -> str:
    """Cases of one group share a process: peers with / without Liger, yarnkit with / without it (Liger swaps
    transformers' Llama classes and RoPE function process-wide), yarnkit's bf16-weights cases on their own
    (accelerate keeps one mixed-precision setting per process: theirs is "no", the recipes' is bf16).
    Sequence-parallel runs get their own launch."""
    base, sp = parse_variant(row["variant"])
    if base in PEERS:
        return "peers-liger" if "--liger" in PEERS[base] else "peers"
    if sp:
        return row["case"]
    if VARIANTS[base].get("train.mixed_precision") == "bf16-weights":
        return "yarnkit-bf16w"
    return "yarnkit-torch-kernels" if VARIANTS[base].get("model.kernels") == "torch" else "yarnkit"


def run_group(args, out: Path, rows: list[dict], deadline: float) -> None:
    """Run `rows` (prepared by `new_row`, each with `argv` and `command`) in one child process, or one launch
    for a sequence-parallel case; fills in each row's status from its status file."""
    name = group_of(rows[0])
    log = out / "logs" / f"{name}.log"
    if len(rows) == 1 and name == rows[0]["case"]:  # a launch of its own (accelerate, several processes)
        code = _launch(rows[0]["command"], log, deadline - time.time())
        failed = "oom" if "out of memory" in log.read_text().lower() else "error"
        statuses = {rows[0]["case"]: {"status": "ok" if code == 0 else "timeout" if code is None else failed}}
    else:
        plan = out / "plans" / f"{name}.json"
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_text(json.dumps({"deadline": deadline, "cases": [
            {"name": r["case"], "argv": r["argv"], "status": str(out / "runs" / f"{r['case']}.status.json")}
            for r in rows]}))
        runner = [*(HF_PEER if name.startswith("peers") else [sys.executable, "-m", "yarnkit.bench.training"]),
                  "--plan", str(plan)]
        print(f"[{name}] {len(rows)} cases in one process: {' '.join(runner)}", flush=True)
        code = _launch(runner, log, deadline - time.time())
        died = "ran past the budget and was stopped" if code is None else f"exited {code}"
        statuses = {}
        for r in rows:
            path = out / "runs" / f"{r['case']}.status.json"
            statuses[r["case"]] = json.loads(path.read_text()) if path.is_file() else {
                "status": "error", "error": f"the group's process {died} before this case ended: "
                                            f"{last_error(log.read_text() if log.is_file() else '')}"}
    text = log.read_text() if log.is_file() else ""
    for row in rows:
        row.update(statuses[row["case"]])
        if row["status"] != "ok":
            row.setdefault("error", last_error(text))
            row["log_tail"] = _case_log(text, row["case"])[-1500:]
            print(f"[{row['case']}] {row['status']}: {row.get('error', '')}", flush=True)
            continue
        collect(args, out, row, _case_log(text, row["case"]))


def last_error(log_text: str) -> str:
    """The line of a log that says why it stopped: the last exception line (`Name: message` or
    `yarnkit: error: ...`), else the last line; "no output" for an empty log."""
    lines = [line.strip() for line in log_text.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^([A-Za-z_.]+(Error|Exception)|yarnkit: error)\b", line)]
    return (raised or lines or ["no output"])[-1][-300:]


def _case_log(text: str, case: str) -> str:
    marker = f"=== case {case}\n"
    return text.split(marker, 1)[1].split("=== case ", 1)[0] if marker in text else text


def collect(args, out: Path, row: dict, log_text: str) -> None:
    """Medians over the timed steps, peak memory, losses and causal FLOPs of a case that ran."""
    base = parse_variant(row["variant"])[0]
    steps_done, row["config"] = read_run(out, row["case"], base)
    profiled = row["case"] in args.profile
    timed = steps_done[args.warmup:len(steps_done) - (1 if profiled else 0)] or steps_done  # a profiled step is slower
    from yarnkit.models import load_config

    source, _ = model_source(out, row["model"], max(row["seq_len"], row["pose_target"]), args.model_dir)
    flops, n_params = model_flops(load_config(source), row["seq_len"])
    tokens = statistics.median(s["tokens_per_s"] for s in timed)
    row.update(tokens_per_s_per_gpu=tokens, step_seconds=statistics.median(s["step_seconds"] for s in timed),
               peak_memory_gb=max(s["peak_memory_gb"] for s in steps_done), losses=[s["loss"] for s in steps_done],
               grad_norms=[s.get("grad_norm") for s in steps_done],
               n_params=n_params, flops_per_token=flops, achieved_tflops=tokens * flops / 1e12,
               first_step_seconds=steps_done[0]["step_seconds"],
               fallbacks=[line for line in log_text.splitlines() if line.startswith("yarnkit:")])
    profile = out / "runs" / (f"{row['case']}.profile.md" if base in PEERS else f"{row['case']}/profile.md")
    if profile.is_file():
        row["profile"] = profile.read_text()


def run_dry(args) -> int:
    """`--dry-run`: each yarnkit case's memory and time estimate (`yarnkit.train.estimate.dry_run`) for the launch
    it would run (GPUs, ZeRO-2 under `-spN`), without a GPU; a length search lists each length. Peers are skipped."""
    from yarnkit.train.estimate import ASSUMED_MFU, dry_run
    from yarnkit.train.recipe import load_recipe

    out = Path(args.out)
    rows, saved = [], {key: os.environ.get(key) for key in ("WORLD_SIZE", "ACCELERATE_DEEPSPEED_ZERO_STAGE")}
    for spec in args.cases:
        model, shapes, variant = spec.split("@")
        base, sp = parse_variant(variant)
        if base in PEERS:
            continue
        for shape in shapes.split(","):
            row = new_row(model, shape, variant)
            _, argv = case_command(args, out, row["case"], model, shape, variant, args.steps)
            os.environ.update(WORLD_SIZE=str(row["gpus"]), ACCELERATE_DEEPSPEED_ZERO_STAGE="2" if sp else "0")
            try:
                recipe = load_recipe(argv)
                report = dry_run(recipe, row["gpus"])
            finally:
                for key, value in saved.items():
                    os.environ.pop(key) if value is None else os.environ.update({key: value})
            memory = report["memory_gib_per_device"]
            rows.append({**row, "status": "estimate", "estimate": report, "tokens_per_s_per_gpu":
                         recipe.train.peak_tflops * 1e12 * ASSUMED_MFU / report["flops_per_token"]})
            print(f"{row['case']}: {memory['total']:.1f} GiB/GPU (states {memory['model_states']:.1f}, activations "
                  f"{memory['activations']:.1f}, loss {memory['loss']:.1f}; host {memory['host_offload']:.1f}), "
                  f"{report['seconds_per_step']:.2f} s/step, {rows[-1]['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU "
                  f"at {report['assumption']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dry-run.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                  "command": " ".join(sys.argv), "cases": rows}, indent=1))
    print(f"wrote {out / 'dry-run.json'}")
    return 0


def run_compare(args) -> int:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    summary = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(sys.argv), "peak_tflops": args.peak_tflops,
               "matmul_peak_tflops": matmul_peak_tflops(args.cpu), "steps": args.steps, "warmup": args.warmup,
               "cases": [], "max_len": []}

    def save():
        add_ratios(summary["cases"], args.peak_tflops, summary["matmul_peak_tflops"])
        (out / "compare.json").write_text(json.dumps(summary, indent=1))
        (out / "compare.md").write_text(markdown(summary))
        profiles = [f"## {r['case']}\n\n{r['profile']}" for r in summary["cases"] if r.get("profile")]
        if profiles:
            (out / "profiles.md").write_text("\n".join(profiles))

    def prepared(model, shape, variant, steps):
        row = new_row(model, shape, variant)
        row["command"], row["argv"] = case_command(args, out, row["case"], model, shape, variant, steps)
        return row

    groups: dict[str, list[dict]] = {}
    for spec in args.cases:  # one group per process; groups run in the order of their first case
        model, shape, variant = spec.split("@")
        if "," in shape:
            continue
        row = prepared(model, shape, variant, args.steps)
        summary["cases"].append(row)
        groups.setdefault(group_of(row), []).append(row)
    for rows in groups.values():
        if time.time() > deadline - 20:
            for row in rows:
                row["status"] = "skipped (budget)"
            continue
        run_group(args, out, rows, deadline)
        save()
    for spec in (spec for spec in args.cases if "," in spec.split("@")[1]):  # longest-sequence searches
        model, lengths, variant = spec.split("@")
        found = {"model": model, "variant": variant, "tried": [], "longest_ok": 0}
        summary["max_len"].append(found)
        for seq in sorted(int(x) for x in lengths.split(",") if x):
            row = prepared(model, str(seq), variant, 2)  # step 2 runs with Adam states allocated: the real peak
            summary["cases"].append(row)
            if time.time() > deadline - 20:
                row["status"] = "skipped (budget)"
            else:  # each length in a process of its own: an OOM leaves nothing behind
                run_group(args, out, [row], deadline)
            found["tried"].append([seq, row["status"]])
            save()
            if row["status"] != "ok":
                break
            found["longest_ok"] = seq
    for row in summary["cases"]:
        row.pop("argv", None)
    save()
    print(markdown(summary))
    print(f"wrote {out / 'compare.json'} and {out / 'compare.md'}")
    return 0


def parse_arguments(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m yarnkit.bench.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--recipe", default="smollm2-yarn-64k", help="scaling mode: the recipe to launch")
    parser.add_argument("--gpus", default="1", help="scaling mode: comma-separated process counts, e.g. 1,2,4")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 2, 3), help="ZeRO stage for >1 process; 0=DDP")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra recipe overrides")
    parser.add_argument("--cases", nargs="*", default=[], metavar="MODEL@SHAPE@VARIANT",
                        help="compare mode: e.g. smollm2-135m@65536@hf-liger smollm2-135m@4x8192:65536@yarnkit "
                             "llama-1b@65536@keep-attention; MODEL@L1,L2@VARIANT searches the longest length. "
                             f"Variants: peers {', '.join(PEERS)}; yarnkit {', '.join(VARIANTS)} (-spN: ZeRO-2 on "
                             "N GPUs)")
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
    parser.add_argument("--plan", help="a yarnkit group's process: run the cases of this JSON plan, then stop")
    args = parser.parse_args(argv)
    if not (args.out or args.write_model_dir or args.plan):
        parser.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.plan:  # a yarnkit group's process: each case is `yarnkit train ARGV`
        from yarnkit.cli import main as yarnkit_main

        return run_plan(args.plan, lambda case_argv: yarnkit_main(["train", *case_argv]))
    if args.write_model_dir:
        write_model_dir(Path(args.write_model_dir))
        print(f"wrote SmolLM2-135M's config and tokenizer to {args.write_model_dir}")
        return 0
    if args.cases:
        return run_dry(args) if args.dry_run else run_compare(args)
    from yarnkit.bench.scaling import run_scaling

    return run_scaling(args)


if __name__ == "__main__":
    sys.exit(main())
