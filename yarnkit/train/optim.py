"""Optimizer and learning-rate schedule: AdamW with linear warmup, then linear decay to 0 (or constant).

Defaults are the YaRN paper's (§4.1): lr 2e-5, AdamW betas (0.9, 0.95), no weight decay, 20 warmup steps,
linear decay over the run. `lr_multiplier` is a pure function so the schedule is testable without a model.
Tested by `python -m pytest tests/test_trainer.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OptimArgs:
    lr: float = 2.0e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "linear"  # linear: warmup then linear decay to 0 at schedule_steps; constant: warmup then flat
    schedule_steps: int = 0  # length of the decay; 0 = train.max_steps (set it to stop early on the same curve)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Factor applied to the base lr for optimizer step `step` (0-based), as in HF's linear warmup schedules."""
    if step < warmup_steps:
        return step / warmup_steps  # step 0 runs at lr 0, as in HF get_*_schedule_with_warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_optimizer(params, args: OptimArgs, total_steps: int):
    """`(optimizer, scheduler)`; only parameters that require grad are optimized."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: check lora.* / model settings")
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                                  weight_decay=args.weight_decay)
    steps = args.schedule_steps or total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, steps, args.schedule))
    return optimizer, scheduler
