"""bf16 module weights with float32 master weights kept for the optimizer (`train.mixed_precision=bf16-weights`).

What DeepSpeed's bf16 mode and Megatron do, for the single-process and DDP launches: the module computes in
bf16 with no autocast (no per-matmul casts of float32 weights, a bf16 residual stream), and the optimizer steps
float32 copies of the weights. `MasterWeights(params)` takes the float32 parameters of a model already on its
device and keeps:

    masters      the float32 weights themselves (each parameter's tensor until now, not copied): the optimizer's
                 parameters (`.masters`), each with `.grad` a slice of one flat float32 buffer
    master grads that flat float32 buffer: every micro-batch's bf16 gradients are added to it (`accumulate`), so
                 a step of `grad_accum` micro-batches never sums gradients in bf16; reduced over the processes,
                 clipped, zeroed after the step
    weights      bf16 copies, the module parameters' `.data`; `publish` rounds the masters into them
                 (`torch._foreach_copy_`: a few kernels for all of them)
    grads        one flat bf16 buffer: each module parameter's `.grad` is a slice, autograd adds one micro-batch
                 into it in place, `accumulate` moves it into the master grads and zeroes it (one kernel each)

Only parameters change dtype: buffers keep theirs, so the rotary `inv_freq` (YaRN's frequencies and their
attention factor) stays float32 and HF's rotary module computes cos/sin in float32, rounding them to the hidden
states' dtype at the end as in any bf16 model. A step is `accumulate()` after each micro-batch's backward, then
`reduce(world)` (one all-reduce of the float32 grads under DDP, whose own bf16 reduction is not used: the
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
        device = self.params[0].device
        self.master_grad_flat = torch.zeros(total, dtype=torch.float32, device=device)
        self.grad_flat = torch.zeros(total, dtype=dtype, device=device)
        self.masters, self.weights = [], []
        offset = 0
        for param in self.params:
            piece = slice(offset, offset + param.numel())
            master = torch.nn.Parameter(param.detach())  # the float32 tensor itself
            master.grad = self.master_grad_flat[piece].view_as(param)
            param.data = param.detach().to(dtype)
            param.grad = self.grad_flat[piece].view_as(param)  # autograd adds into it in place
            self.masters.append(master)
            self.weights.append(param.data)
            offset += param.numel()

    def accumulate(self) -> None:
        """After a micro-batch's backward: add its bf16 gradients to the float32 master grads, zero them."""
        self.master_grad_flat.add_(self.grad_flat)
        self.grad_flat.zero_()

    def reduce(self, world: int) -> None:
        """Average the master grads over `world` processes (one float32 all-reduce; nothing to do for one)."""
        if world > 1:
            torch.distributed.all_reduce(self.master_grad_flat)
            self.master_grad_flat.div_(world)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip the master grads to `max_norm` (math.inf: no clipping); returns their norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.masters, max_norm, foreach=True)

    def publish(self) -> None:
        """After the optimizer step: round the masters into the module's bf16 weights; zero the master grads."""
        torch._foreach_copy_(self.weights, self.masters)
        self.master_grad_flat.zero_()

    @contextmanager
    def float32_weights(self):
        """Inside, the module's parameters are the float32 masters (a load writes them); then bf16 again."""
        for param, master in zip(self.params, self.masters):
            param.data = master.data
        try:
            yield
        finally:
            for param, weight in zip(self.params, self.weights):
                param.data = weight
            torch._foreach_copy_(self.weights, self.masters)

    def release(self) -> None:
        """Leave the float32 masters in the module for good (training is over)."""
        for param, master in zip(self.params, self.masters):
            param.data, param.grad = master.data, None
