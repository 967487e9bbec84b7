"""Next-token cross-entropy without the whole [seq x vocab] logits: Liger-Kernel's fused linear cross-entropy, or
chunks of plain torch.

`CausalLMLoss` wraps a transformers causal LM (or its peft wrapper): it runs the model body for the final
hidden states, then applies the output head + cross-entropy. `fused=True` (`train.loss_impl`, resolved by the
trainer through `fused_loss_missing`) hands head weight and hidden states to Liger's fused kernel, which computes
the head's gradients chunk by chunk during the forward (no logits kept, no recomputation); otherwise the head +
cross-entropy run on `chunk_tokens` positions at a time, each chunk under activation checkpointing (its logits
are recomputed in backward instead of kept). Peak logits memory is chunk_tokens x vocab x 4 bytes instead of
seq x vocab. The wrapper is what accelerate/DeepSpeed prepare, so
DDP and ZeRO hooks see every parameter use. Tested against the plain `model(labels=...)` loss:
`python -m pytest tests/test_trainer.py -k chunked`; the fused path on a GPU by `pytest -m gpu
tests/test_speed_gpu.py`. The head + cross-entropy of one chunk, and its evaluation form `token_nll`, are
`yarnkit.nll`.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from yarnkit.nll import head_nll
from yarnkit.train.speed import liger_missing


def _flat_targets(hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None):
    if labels is None:
        return hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1)
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def chunked_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                          chunk_tokens: int, softcap: float | None = None,
                          labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of `hidden` [B, S, D] predicting `input_ids` shifted by one, chunk by chunk; or,
    with `labels` [B, S] already shifted (sequence parallelism), predicting `labels` at every position."""
    flat_hidden, flat_targets = _flat_targets(hidden, input_ids, labels)
    total = flat_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(head_nll, head, flat_hidden[piece], flat_targets[piece], softcap,
                                       use_reentrant=False)
        else:
            total = total + head_nll(head, flat_hidden[piece], flat_targets[piece], softcap)
    return total / (flat_targets != -100).sum().clamp(min=1)


def fused_cross_entropy(head: torch.nn.Linear, hidden: torch.Tensor, input_ids: torch.Tensor,
                        softcap: float | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """`chunked_cross_entropy`'s value through Liger-Kernel's fused linear cross-entropy (CUDA)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    flat_hidden, flat_targets = _flat_targets(hidden, input_ids, labels)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", softcap=softcap or None)
    total = loss(head.weight, flat_hidden, flat_targets, head.bias)
    return total / (flat_targets != -100).sum().clamp(min=1)


def fused_loss_missing(model: torch.nn.Module, zero_stage: int = 0) -> str | None:
    """Why the fused loss cannot run for `model` here (None: it can)."""
    missing = liger_missing()
    if missing:
        return missing
    if zero_stage >= 3:
        return "under ZeRO-3 the output head's weight is sharded (the chunked loss gathers it through the module)"
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(lm.get_output_embeddings()) is not torch.nn.Linear:
        return f"the output head is a {type(lm.get_output_embeddings()).__name__}, not a plain Linear"
    return None


class CausalLMLoss(torch.nn.Module):
    """`forward(input_ids, position_ids=None, attention_mask=None, labels=None, answer_positions=None) -> mean
    loss`; `.model` is the wrapped model. `labels` are pre-shifted targets (-100 = ignore), as sequence-parallel
    shards need. `fused`: Liger's fused linear cross-entropy instead of the chunked loss (see
    `fused_loss_missing`). `answer_weight` > 0 with `answer_positions` (the synthetic answers' value tokens, see
    `yarnkit.train.data.answer_positions`): the loss adds `answer_weight` x the mean loss of those tokens (`answer_loss`), so the few
    tokens that need the context weigh more than their share of the sequence."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 4096, fused: bool = False,
                 answer_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.fused = fused
        self.answer_weight = answer_weight
        self.config = model.config  # accelerate sizes DeepSpeed's "auto" ZeRO-3 buckets from config.hidden_size

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                answer_positions: torch.Tensor | None = None) -> torch.Tensor:
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
        head, softcap = lm.get_output_embeddings(), getattr(lm.config.get_text_config(), "final_logit_softcapping",
                                                            None)
        if self.fused:
            loss = fused_cross_entropy(head, hidden, input_ids, softcap, labels)
        else:
            loss = chunked_cross_entropy(head, hidden, input_ids, self.chunk_tokens, softcap, labels)
        if self.answer_weight and answer_positions is not None:
            loss = loss + self.answer_weight * answer_loss(head, hidden, input_ids, answer_positions, softcap)
        return loss


def answer_loss(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                softcap: float | None = None) -> torch.Tensor:
    """Mean next-token loss of the targets at flat `positions` (`yarnkit.train.data.answer_positions`); only
    those few hidden states go through the head."""
    flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return head_nll(head, flat_hidden, input_ids[:, 1:].reshape(-1).index_select(0, positions), softcap,
                    reduction="mean")
