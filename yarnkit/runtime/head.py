"""`forward_logits`: one forward of the model, with the output head computed to float32 logits.

    head = float32_head(model)           # once: None keeps the model's own forward
    logits = forward_logits(model, head, logits_to_keep=1, input_ids=ids, use_cache=True, **cache_kwargs(cache))

What it is: the forward both decode paths run (the eager `SinkCache` and the pooled static step), so they share
the head's arithmetic. A bf16 model's own head rounds every logit to bf16: 0.125 apart at |logit| 16..32, which
ties tokens that differ by less, so two decodes that differ by rounding noise pick different greedy tokens on
those ties. Here the decoder runs as usual and the head's matmul writes float32 (the same bf16 weights, float32
accumulation kept instead of rounded). It is on by default where it is free: on CUDA, `torch.mm(...,
out_dtype=torch.float32)` reads the same bf16 weights. Where that is missing (CPU) it runs only when asked
(`StreamOptions.float32_logits=True`), multiplying float32 copies of the weights (converted every call). A
float32 model, a head that is not a plain `nn.Linear`, or a config that scales or caps its logits
(`logit_scale`, `logits_scaling`, `final_logit_softcapping`) keeps the model's own forward (`.logits.float()`),
so float32 results are exactly those of the model.

Test: `python -m pytest tests/test_runtime_static.py -q -k float32_head`.
"""

from __future__ import annotations

import torch

LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "final_logit_softcapping")


class Float32Head:
    """A low-precision model's plain output `nn.Linear`, computed to float32 logits; `float32_head` builds it."""

    def __init__(self, linear: torch.nn.Linear, out_dtype: bool):
        self.linear, self.out_dtype = linear, out_dtype

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """`linear(hidden)` as float32: low-precision operands with a float32 result, or float32 copies."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        weight = self.linear.weight
        if self.out_dtype:
            logits = torch.mm(flat, weight.t(), out_dtype=torch.float32)
        else:
            logits = flat.float() @ weight.float().t()
        if self.linear.bias is not None:
            logits = logits + self.linear.bias.float()
        return logits.view(*hidden.shape[:-1], -1)


def float32_head(model, wanted: bool | None = None) -> Float32Head | None:
    """The float32 head for `model`, or None where the model's own forward is kept: `wanted=False`; a float32
    model, a head that is not a plain `nn.Linear`, a config that scales or caps its logits; and with
    `wanted=None` (auto) a device without `mm(..., out_dtype)`, where float32 copies would cost (CPU: the head
    ~18x, a SmolLM2-135M bf16 step ~2.5x). Resolve it once, outside any captured or compiled step (it probes
    the device)."""
    linear = model.get_output_embeddings()
    low = linear is not None and linear.weight.dtype in (torch.bfloat16, torch.float16)
    transforms = any(getattr(model.config, name, None) is not None for name in LOGIT_TRANSFORMS)
    if wanted is False or not low or type(linear) is not torch.nn.Linear or transforms:
        return None
    out_dtype = mm_writes_float32(linear.weight.device)
    return Float32Head(linear, out_dtype) if out_dtype or wanted else None


def mm_writes_float32(device: torch.device) -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` runs for bf16 inputs on this device."""
    probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (NotImplementedError, RuntimeError, TypeError):
        return False


def forward_logits(model, head: Float32Head | None, logits_to_keep: int = 0, **inputs) -> torch.Tensor:
    """float32 logits `[batch, n or logits_to_keep, vocab]` of `model(**inputs)`: through `head` (from
    `float32_head(model)`) when there is one, else the model's own logits as float32."""
    if head is None:
        return model(logits_to_keep=logits_to_keep, **inputs).logits.float()
    hidden = model.get_decoder()(**inputs).last_hidden_state
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    return head(hidden)
