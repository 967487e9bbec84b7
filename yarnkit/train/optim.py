"""Optimizer and learning-rate schedule: AdamW with linear warmup, then linear decay to 0 (or constant).

Defaults are the YaRN paper's (§4.1): lr 2e-5, AdamW betas (0.9, 0.95), no weight decay, 20 warmup steps,
linear decay over the run. `lr_multiplier` is a pure function so the schedule is testable without a model.
`optim.fused` picks torch's fused (single-kernel) AdamW, the same update as the multi-tensor (foreach) one up to
float rounding: `auto` takes it when training runs on CUDA (elsewhere foreach); `true` on a device without the
kernel fails naming the fix (`yarnkit.train.speed.resolve_choice`, the rule of every speed key).
Tested by `python -m pytest tests/test_trainer.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

from yarnkit.errors import RecipeError
from yarnkit.train.speed import resolve_choice

FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch (>= 2.4) has the fused AdamW kernel


@dataclass
class OptimArgs:
    lr: float = 2.0e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "linear"  # linear: warmup then linear decay to 0 at schedule_steps; constant: warmup then flat
    schedule_steps: int = 0  # length of the decay; 0 = train.max_steps (set it to stop early on the same curve)
    fused: str = "auto"  # torch's fused AdamW kernel: auto (on CUDA) | true | false (multi-tensor foreach)


def check_optim(args: OptimArgs) -> None:
    """Values AdamW or the schedule would reject (or silently misuse), refused before anything is written."""
    if not (math.isfinite(args.lr) and args.lr >= 0):
        raise RecipeError(f"optim.lr={args.lr} is not a learning rate", "use a positive number, e.g. optim.lr=2e-5")
    if len(args.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in args.betas):
        raise RecipeError(f"optim.betas={list(args.betas)}: AdamW needs two values in [0, 1)",
                          "e.g. optim.betas=[0.9,0.95]")
    if not (math.isfinite(args.eps) and args.eps >= 0) or not (math.isfinite(args.weight_decay)
                                                                 and args.weight_decay >= 0):
        raise RecipeError(f"optim.eps={args.eps} / optim.weight_decay={args.weight_decay}: both must be >= 0",
                          "e.g. optim.eps=1e-8 optim.weight_decay=0")
    if args.warmup_steps < 0 or args.schedule_steps < 0:
        raise RecipeError(f"optim.warmup_steps={args.warmup_steps} / optim.schedule_steps={args.schedule_steps}: "
                          "step counts cannot be negative", "e.g. optim.warmup_steps=20 optim.schedule_steps=0")
    if args.schedule not in ("linear", "constant"):
        raise RecipeError(f"optim.schedule={args.schedule!r}; choose linear or constant")
    if str(args.fused).lower() not in ("auto", "true", "false"):
        raise RecipeError(f"optim.fused={args.fused!r}; choose auto, true or false")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Factor applied to the base lr for optimizer step `step` (0-based), as in HF's linear warmup schedules."""
    if step < warmup_steps:
        return step / warmup_steps  # step 0 runs at lr 0, as in HF get_*_schedule_with_warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def fused_adamw_missing(device: torch.device) -> str | None:
    """Why torch's fused AdamW cannot run training on `device` (None: it can; trainable parameters are floats)."""
    if device.type not in FUSED_ADAMW_DEVICES:
        return f"torch has no fused AdamW kernel for {device.type} here"
    return None


def build_optimizer(params, args: OptimArgs, total_steps: int, device: str | torch.device | None = None):
    """`(optimizer, scheduler)`; only parameters that require grad are optimized. `device`: where training runs
    (the parameters may still be on the CPU until accelerate moves them); default CUDA if there is one."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: check lora.* / model settings")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    asked = str(args.fused).lower()
    fused = (asked != "auto" or device.type == "cuda") and resolve_choice(
        "optim.fused", asked, fused_adamw_missing(device), "true", "false")
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                                  weight_decay=args.weight_decay, fused=fused or None)
    steps = args.schedule_steps or total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, steps, args.schedule))
    return optimizer, scheduler
