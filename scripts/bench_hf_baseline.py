"""Plain transformers baseline for the training benchmark: SDPA, gradient checkpointing, AdamW, HF's own loss.

    python scripts/bench_hf_baseline.py --model smollm2-135m --yarn-factor 8 --seq-len 65536 --steps 6 --out hf.json
    python scripts/bench_hf_baseline.py --model-dir OUT/models/llama-1b --random-init --seq-len 65536 --out hf.json

What a user without yarnkit would write: `model(input_ids, labels=input_ids).loss` (full [seq x vocab] logits),
non-reentrant gradient checkpointing on every layer, `torch.optim.AdamW` (torch's default foreach
implementation), fp32 weights under bf16 autocast (as yarnkit's trainer keeps fp32 masters; `--precision
bf16-weights` puts the model itself in bf16 instead, as many quick scripts do), gradient
clipping at 1.0, one sequence per step of uniformly random token ids (speed does not depend on the text).
Writes one JSON object: per-step seconds, tokens/s, peak CUDA memory (GB), losses. Called by
scripts/bench_train.py (`--cases ...@hf`); not a test, the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def build(args):
    from transformers import AutoModelForCausalLM

    from yarnkit.models import load_config, local_hf_dir
    from yarnkit.patch import apply_rope_scaling

    source = args.model_dir or args.model
    config = load_config(source)
    if args.yarn_factor != 1.0:
        apply_rope_scaling(config, rope_type="yarn", factor=args.yarn_factor)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.random_init:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(local_hf_dir(source), config=config, dtype=torch.float32,
                                                     attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a name/dir load_model accepts")
    parser.add_argument("--model-dir", default="", help="an HF dir (config.json) instead of --model")
    parser.add_argument("--random-init", action="store_true", help="random weights from the config")
    parser.add_argument("--yarn-factor", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", choices=("bf16", "bf16-weights", "fp32"), default="bf16",
                        help="bf16: fp32 weights under bf16 autocast; bf16-weights: the model itself in bf16")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    model, device = build(args)
    if args.precision == "bf16-weights":
        model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    steps = []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (1, args.seq_len), generator=generator).to(device)
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the step, as any logging loop does
        seconds = time.perf_counter() - started
        steps.append({"loss": value, "step_seconds": seconds, "tokens_per_s": args.seq_len / seconds,
                      "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0})
        print(json.dumps(steps[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"steps": steps, "seq_len": args.seq_len}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
