"""Compare mode of scripts/bench_train.py: yarnkit's trainer vs plain transformers, case by case, one process each.

A case is `MODEL@SEQ@VARIANT`. MODELS: `smollm2-135m` (the bundled checkpoint, YaRN factor seq/8192), `llama-1b`
(random init, 1.17B parameters: hidden 2048, 16 layers, 32 heads / 8 KV heads, head_dim 64, intermediate 8192,
vocab 49152 untied), `tiny` (random, for the CPU smoke test). VARIANTS: `hf` / `hf-bf16w`
(scripts/bench_hf_baseline.py: fp32 weights under bf16 autocast / bf16 weights) or a
set of yarnkit recipe overrides; a `-spN` suffix runs the trainer under DeepSpeed ZeRO-2 on N GPUs with
`train.sp_size=N`. Every case writes its log to OUT/logs/, yarnkit runs to OUT/runs/; an out-of-memory exit is
recorded as `oom`, not an error of the benchmark. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NATIVE_SMOLLM2 = 8192
RANDOM_MODELS = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=49152, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=49152, tie_word_embeddings=True),
}
HF_VARIANTS = {"hf": "bf16", "hf-bf16w": "bf16-weights"}  # plain transformers: autocast / bf16 weights
CUDNN = {"model.sdpa_kernel": "cudnn"}
VARIANTS = {
    "yarnkit": {},  # the trainer's defaults: sdpa (torch picks the kernel), every layer checkpointed, chunked loss
    "cudnn": CUDNN,
    "flash": {"model.sdpa_kernel": "flash"},
    "fast": {**CUDNN, "model.gradient_checkpointing": False},
    "fast-flash": {"model.sdpa_kernel": "flash", "model.gradient_checkpointing": False},
    "fast-compile": {**CUDNN, "model.gradient_checkpointing": False, "model.compile_layers": True},
    "ckpt8": {**CUDNN, "model.checkpoint_layers": 8},  # only the first 8 layers recomputed
    "ckpt-compile": {**CUDNN, "model.compile_layers": True},
    "offload": {**CUDNN, "train.offload_activations": True, "model.tiled_mlp": True},
}


def parse_variant(name: str) -> tuple[str, int]:
    base, _, sp = name.partition("-sp")
    if base not in HF_VARIANTS and base not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose one of {sorted(HF_VARIANTS) + sorted(VARIANTS)} "
                         f"(yarnkit variants optionally with -sp2, -sp4)")
    return base, int(sp) if sp else 1


def model_source(out: Path, model: str, max_len: int) -> tuple[str, bool]:
    """`(name_or_path, random_init)`; random models get OUT/models/NAME (config.json + SmolLM2's tokenizer)."""
    if model not in RANDOM_MODELS:
        return model, False
    from transformers import LlamaConfig

    from yarnkit.models import load_tokenizer

    folder = out / "models" / model
    tokenizer = load_tokenizer("smollm2-135m")
    LlamaConfig(**RANDOM_MODELS[model], max_position_embeddings=max(max_len, 4096), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), True


def bench_text(out: Path, max_len: int) -> str:
    """The bundled novel (~330k SmolLM2 tokens), repeated so that one sequence of `max_len` tokens fits."""
    from yarnkit.assets import sample_path
    from yarnkit.train.corpus import read_text

    repeats = math.ceil(max_len * 1.1 / 300_000)
    if repeats <= 1:
        return "bundled:train"
    path = out / "data" / f"novel-x{repeats}.txt.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write("\n\n".join([read_text(sample_path("train"))] * repeats))
    return str(path)


def flops_per_token(source: str, seq_len: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    from yarnkit.train.estimate import flops_per_token as causal_flops
    from yarnkit.models import load_config

    config = load_config(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return causal_flops(n_params, text.num_hidden_layers, text.num_attention_heads, head_dim, seq_len), n_params


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


def case_command(args, out: Path, name: str, model: str, seq: int, variant: str, steps: int) -> list[str]:
    base, sp = parse_variant(variant)
    source, random_init = model_source(out, model, seq)
    factor = max(1.0, seq / NATIVE_SMOLLM2) if model == "smollm2-135m" else 1.0
    if base in HF_VARIANTS:
        return [sys.executable, str(REPO / "scripts/bench_hf_baseline.py"), "--model-dir" if random_init else "--model",
                source, *(["--random-init"] if random_init else []), "--yarn-factor", str(factor), "--seq-len",
                str(seq), "--steps", str(steps), "--precision", "fp32" if args.cpu else HF_VARIANTS[base],
                "--out", str(out / "runs" / f"{name}.json")]
    overrides = {"run_dir": out / "runs" / name, "resume": "none", "model.name_or_path": source,
                 "model.random_init": random_init, "yarn.factor": factor,
                 "data.source": args.data or bench_text(out, seq), "data.seq_len": seq,
                 "data.cache_dir": out / "cache", "optim.warmup_steps": 0, "train.max_steps": steps,
                 "train.micro_batch_size": 1, "train.grad_accum": 1, "train.loss_chunk_tokens": 8192,
                 "train.mixed_precision": "fp32" if args.cpu else "bf16", "train.memory_check": False,
                 "train.sp_size": sp, "checkpoint.every": 0, "checkpoint.save_final": False, **VARIANTS[base]}
    launch = [sys.executable, str(REPO / "scripts/train.py")]
    if sp > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "recipes/accelerate/zero2.yaml"), "--num_processes", str(sp), str(REPO / "scripts/train.py")]
    return launch + [f"{key}={value}" for key, value in overrides.items()]


def read_steps(out: Path, name: str, variant: str) -> list[dict]:
    if variant in HF_VARIANTS:
        return json.loads((out / "runs" / f"{name}.json").read_text())["steps"]
    rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines() if line]
    return [{"loss": r["loss"], "step_seconds": r["step_seconds"], "tokens_per_s": r["tokens_per_s_per_device"],
             "peak_memory_gb": r["peak_memory_gb"]} for r in rows]


def run_case(args, out: Path, model: str, seq: int, variant: str, steps: int, warmup: int, timeout: float) -> dict:
    name = f"{model}@{seq}@{variant}"
    base, sp = parse_variant(variant)
    row = {"case": name, "model": model, "seq_len": seq, "variant": variant, "gpus": sp, "status": "ok"}
    command = case_command(args, out, name, model, seq, variant, steps)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"[{name}] " + " ".join(command), flush=True)
    with open(log, "w") as handle:  # own process group: a timeout also stops accelerate's worker processes
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # torchrun's agent passes SIGTERM on to its workers
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            row["status"], returncode = "timeout", None
    tail = log.read_text()[-4000:]
    if returncode:
        row["status"] = "oom" if "out of memory" in tail.lower() else "error"
        row["error"] = tail.strip().splitlines()[-1][-300:] if tail.strip() else f"exit {returncode}"
    row["wall_seconds"] = round(time.monotonic() - started, 1)
    if row["status"] != "ok":
        print(f"[{name}] {row['status']}: {row.get('error', '')}", flush=True)
        return row
    steps_done = read_steps(out, name, base)
    timed = steps_done[warmup:] or steps_done
    source, _ = model_source(out, model, seq)
    flops, n_params = flops_per_token(source, seq)
    tokens = statistics.median(s["tokens_per_s"] for s in timed)
    row.update(tokens_per_s_per_gpu=tokens, step_seconds=statistics.median(s["step_seconds"] for s in timed),
               peak_memory_gb=max(s["peak_memory_gb"] for s in steps_done), losses=[s["loss"] for s in steps_done],
               n_params=n_params, flops_per_token=flops, achieved_tflops=tokens * flops / 1e12)
    return row


def add_ratios(rows: list[dict], peak: float, measured: float) -> None:
    baseline = {(r["model"], r["seq_len"]): r for r in rows if r["variant"] == "hf" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["mfu"] = r["achieved_tflops"] / peak
        r["mfu_vs_measured_peak"] = r["achieved_tflops"] / measured
        hf = baseline.get((r["model"], r["seq_len"]))
        if hf is not None:
            r["speedup_vs_hf"] = r["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"]


def markdown(summary: dict) -> str:
    lines = [f"matmul peak measured: {summary['matmul_peak_tflops']:.3g} TFLOP/s ({summary['device']}); "
             f"MFU columns: causal FLOPs vs {summary['peak_tflops']:.0f} TFLOP/s and vs the measured peak", "",
             "| case | GPUs | status | tokens/s/GPU | vs hf | step s | peak GB | MFU | MFU (measured peak) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["cases"]:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['gpus']} | {r['status']} | | | | | | |")
            continue
        ratio = f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else ""
        lines.append(f"| {r['case']} | {r['gpus']} | ok | {r['tokens_per_s_per_gpu']:,.0f} | {ratio} | "
                     f"{r['step_seconds']:.2f} | {r['peak_memory_gb']:.1f} | {r['mfu']:.1%} | "
                     f"{r['mfu_vs_measured_peak']:.1%} |")
    for m in summary["max_len"]:
        lines.append(f"\nlongest trained sequence, {m['model']} @ {m['variant']}: {m['longest_ok'] or 'none'} "
                     f"(tried {', '.join(f'{t[0]}: {t[1]}' for t in m['tried'])})")
    return "\n".join(lines) + "\n"


def run_compare(args) -> int:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    remaining = lambda: args.budget_s - (time.monotonic() - started)  # noqa: E731
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    summary = {"device": device, "peak_tflops": args.peak_tflops, "matmul_peak_tflops": matmul_peak_tflops(args.cpu),
               "steps": args.steps, "warmup": args.warmup, "cases": [], "max_len": []}

    def attempt(model, seq, variant, steps, warmup):
        if remaining() < 20:
            return {"case": f"{model}@{seq}@{variant}", "model": model, "seq_len": seq, "variant": variant,
                    "gpus": parse_variant(variant)[1], "status": "skipped (budget)"}
        return run_case(args, out, model, seq, variant, steps, warmup, min(args.case_timeout_s, remaining()))

    def save():
        add_ratios(summary["cases"], args.peak_tflops, summary["matmul_peak_tflops"])
        (out / "compare.json").write_text(json.dumps(summary, indent=2))
        (out / "compare.md").write_text(markdown(summary))

    for spec in args.cases:
        model, lengths, variant = spec.split("@")
        if "," not in lengths:
            summary["cases"].append(attempt(model, int(lengths), variant, args.steps, args.warmup))
            save()
            continue
        found = {"model": model, "variant": variant, "tried": [], "longest_ok": 0}  # longest-sequence search
        summary["max_len"].append(found)
        for seq in sorted(int(x) for x in lengths.split(",") if x):
            row = attempt(model, seq, variant, 2, 1)  # step 2 runs with Adam states allocated: the real peak
            summary["cases"].append(row)
            found["tried"].append([seq, row["status"]])
            save()
            if row["status"] != "ok":
                break
            found["longest_ok"] = seq
    save()
    print(markdown(summary))
    print(f"wrote {out / 'compare.json'} and {out / 'compare.md'}")
    return 0
