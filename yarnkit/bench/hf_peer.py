"""The peers of the training benchmark: plain transformers as a user writes it, optionally with Liger-Kernel.

    python -m yarnkit.bench.hf_peer --model smollm2-135m --yarn-factor 8 --seq-len 65536 --steps 6 --out hf.json
    python -m yarnkit.bench.hf_peer --model smollm2-135m --yarn-factor 8 --seq-len 65536 --liger --out liger.json
    python -m yarnkit.bench.hf_peer --model OUT/models/llama-1b --random-init --seq-len 65536 \
        --gradient-checkpointing --out hf.json
    python -m yarnkit.bench.hf_peer --model smollm2-135m --yarn-factor 8 --seq-len 8192 --batch 4 \
        --pose-target 65536 --liger --out pose.json       # the e2e recipe's shape: 4 x 8k PoSE chunks

What a user without yarnkit writes: `model(input_ids, labels=input_ids).loss` (HF's loss over full logits, or
Liger's fused linear cross-entropy with `--liger`, which also swaps in Liger's RMSNorm, SwiGLU and RoPE through
`liger_kernel.transformers.apply_liger_kernel_to_llama`), SDPA attention with torch's own kernel choice,
optional non-reentrant gradient checkpointing on every layer, `torch.optim.AdamW` (lr 1e-5, betas (0.9, 0.95),
torch's default foreach implementation), fp32 weights under bf16 autocast (`--precision bf16-weights`: the model
itself in bf16), gradient clipping at 1.0, and a `loss.item()` per step as any logging loop does. The batches are
the ones yarnkit's trainer would draw (same data, order and PoSE positions: `yarnkit.train.data`), and random
weights come from the same seed, so losses are comparable step by step. Writes one JSON object: the exact
configuration, per-step seconds, tokens/s, peak CUDA memory (GiB), losses; `--profile` also writes OUT.profile.md
(a torch.profiler summary of the last step). `--plan PLAN.json` runs several cases in this one process (the
benchmark's groups; each case's peak memory is its own). Liger-Kernel is optional: `pip install 'yarnkit[liger]'`
(CUDA). `scripts/bench_hf_baseline.py` is the same command. Run by `yarnkit.bench.training` (`--cases ...@hf-liger`);
not a test, the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from yarnkit.bench.training_cases import run_plan
from yarnkit.models import load_config
from yarnkit.model_files import local_hf_dir
from yarnkit.patch import YarnArgs, apply_yarn
from yarnkit.train.data import DataArgs, SampleOrder, build_dataset, micro_batch
from yarnkit.train.profiling import step_profile, summary
from yarnkit.train.speed import full_checkpointing

SEED = 42  # yarnkit's train.seed / data.seed defaults: the same weights and batches as the trainer


def build(args, device: str):
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.liger:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError as err:
            raise SystemExit(f"--liger needs Liger-Kernel on a CUDA machine: pip install 'yarnkit[liger]' ({err})")
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    config = load_config(args.model)
    apply_yarn(config, YarnArgs(factor=args.yarn_factor))  # as yarnkit's trainer applies the recipe's yarn section
    location = local_hf_dir(args.model)
    set_seed(SEED)
    options = dict(config=config, dtype=torch.float32, attn_implementation="sdpa")
    if args.random_init:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(**options)
    else:
        model = AutoModelForCausalLM.from_pretrained(location, use_safetensors=True, **options).to(device)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        full_checkpointing(model)
    if args.precision == "bf16-weights":
        model.to(torch.bfloat16)
    model.train()
    return model, AutoTokenizer.from_pretrained(location)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plan"]:
        return run_plan(argv[1], run_case)
    return run_case(argv)


def run_case(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m yarnkit.bench.hf_peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a bundled name or an HF dir (config.json)")
    parser.add_argument("--random-init", action="store_true", help="random weights from the config")
    parser.add_argument("--yarn-factor", type=float, default=1.0)
    parser.add_argument("--data", default="bundled:train", help="text source, as yarnkit's data.source")
    parser.add_argument("--cache-dir", default="", help="token cache (shared with the yarnkit cases)")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--pose-target", type=int, default=0, help="PoSE: spread position ids over this many")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", choices=("bf16", "bf16-weights", "fp32"), default="bf16",
                        help="bf16: fp32 weights under bf16 autocast; bf16-weights: the model itself in bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant, every layer")
    parser.add_argument("--liger", action="store_true", help="Liger-Kernel: RMSNorm, SwiGLU, RoPE, fused linear CE")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over the last step")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--plan", help="a JSON plan of several cases (first argument only)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer = build(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    data_args = DataArgs(source=args.data, seq_len=args.seq_len, cache_dir=args.cache_dir, seed=SEED)
    dataset = build_dataset(data_args, tokenizer, arrays=True)
    order = SampleOrder(len(dataset), data_args.seed, data_args.shuffle)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    config = {"model": args.model, "random_init": args.random_init, "attention": "sdpa (torch's kernel choice)",
              "gradient_checkpointing": args.gradient_checkpointing, "precision": args.precision,
              "kernels": "liger rms_norm+swiglu+rope" if args.liger else "transformers",
              "loss": "liger fused linear cross-entropy" if args.liger else "transformers (full logits)",
              "optimizer": "torch AdamW (foreach)", "shape": [args.batch, args.seq_len, args.pose_target]}
    steps = []
    for step in range(args.steps):
        batch = micro_batch(dataset, order, step * args.batch, 0, 1, args.batch, args.pose_target, data_args.seed)
        extra = {k: batch[k].to(device) for k in ("position_ids", "attention_mask") if batch[k] is not None}
        ids = batch["input_ids"].to(device)
        profiled = args.profile and step + 1 == args.steps
        if profiled and device == "cuda":
            torch.cuda.synchronize()
        with step_profile(profiled) as prof:
            started = time.perf_counter()
            with autocast:
                loss = model(input_ids=ids, labels=ids, **extra).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()  # waits for the step, as any logging loop does
            seconds = time.perf_counter() - started
        if profiled:
            Path(args.out).with_suffix(".profile.md").write_text(summary(prof, seconds, f"{Path(args.out).stem}: "
                                                                         f"step {step + 1}"))
        steps.append({"loss": value, "step_seconds": seconds, "tokens_per_s": ids.numel() / seconds,
                      "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0})
        print(json.dumps(steps[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"config": config, "steps": steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
