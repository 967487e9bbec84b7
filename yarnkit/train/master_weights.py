"""bf16 module weights with float32 master weights kept for the optimizer (`train.mixed_precision=bf16-weights`).

What DeepSpeed's bf16 mode and Megatron do, for the single-process and DDP launches: the module computes in
bf16 with no autocast (no per-matmul casts of float32 weights, a bf16 residual stream), and the optimizer steps
float32 copies of the weights. `MasterWeights(params)` takes the float32 parameters of a model already on its
device and keeps:

    masters      the float32 weights themselves (each parameter's tensor until now, not copied): the optimizer's
                 parameters (`.masters`), each with `.grad` a slice of one flat float32 buffer
    master grads that flat float32 buffer: a hook on each parameter (`register_post_accumulate_grad_hook`, as
                 Megatron's main grads) adds the bf16 gradient autograd just produced to its float32 slice and
                 drops it, so a step of `grad_accum` micro-batches never sums gradients in bf16 (and no bf16
                 gradient outlives its backward); reduced over the processes, clipped, zeroed after the step
    weights      bf16 copies, the module parameters' `.data`; `publish` rounds the masters into them
                 (`torch._foreach_copy_`, a few kernels for all of them) and zeroes the master grads

Only parameters change dtype: buffers keep theirs, so the rotary `inv_freq` (YaRN's frequencies and their
attention factor) stays float32 and HF's rotary module computes cos/sin in float32, rounding them to the hidden
states' dtype at the end as in any bf16 model. A step is the micro-batches' backwards, then `reduce(world)` (one all-reduce of the float32 grads under DDP, whose own bf16 reduction is not used: the
trainer runs every micro-batch under `no_sync`), `clip(max_norm)`, `optimizer.step()` and `publish()`.
`float32_weights()` swaps the masters into the module for a checkpoint's save or load, so its `model/` and
`state/` hold the float32 masters (export reads them as from a float32 run) and a resume continues exactly;
`release()` leaves them there for good (the trained model a run returns). Tested by
`python -m pytest tests/test_master_weights.py`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class MasterWeights:
    """Float32 masters of `params` (trainable float32 tensors on one device, no duplicates, each with its own
    storage), whose module copies become bf16."""

    def __init__(self, params, dtype: torch.dtype = torch.bfloat16):
        self.params = list(params)
        total = sum(p.numel() for p in self.params)
        self.master_grad_flat = torch.zeros(total, dtype=torch.float32, device=self.params[0].device)
        self.masters, self.hooks = [], []
        offset = 0
        for param in self.params:
            master = torch.nn.Parameter(param.detach())  # the float32 tensor itself
            master.grad = self.master_grad_flat[offset:offset + param.numel()].view_as(param)
            param.data = param.detach().to(dtype)
            self.hooks.append(param.register_post_accumulate_grad_hook(_add_into(master.grad)))
            self.masters.append(master)
            offset += param.numel()

    def reduce(self, world: int) -> None:
        """Average the master grads over `world` processes (one float32 all-reduce; nothing to do for one)."""
        if world > 1:
            torch.distributed.all_reduce(self.master_grad_flat)
            self.master_grad_flat.div_(world)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip the master grads to `max_norm` (math.inf: no clipping); returns their norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.masters, max_norm, foreach=True)

    @torch.no_grad()
    def publish(self) -> None:
        """After the optimizer step: round the masters into the module's bf16 weights; zero the master grads."""
        torch._foreach_copy_(self.params, self.masters)
        self.master_grad_flat.zero_()

    @contextmanager
    def float32_weights(self):
        """Inside, the module's parameters are the float32 masters (a load writes them); then bf16 again."""
        weights = [param.data for param in self.params]
        for param, master in zip(self.params, self.masters):
            param.data = master.data
        try:
            yield
        finally:
            for param, weight in zip(self.params, weights):
                param.data = weight
            self.publish()  # the masters a load wrote; the master grads are zero between steps anyway

    def release(self) -> None:
        """Leave the float32 masters in the module for good (training is over)."""
        for param, master, hook in zip(self.params, self.masters, self.hooks):
            param.data = master.data
            hook.remove()


def _add_into(master_grad: torch.Tensor):
    """The hook of one parameter: its new bf16 gradient goes into `master_grad` (float32) and is dropped."""
    def add(param: torch.Tensor) -> None:
        master_grad.add_(param.grad)
        param.grad = None
    return add
