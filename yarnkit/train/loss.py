"""Next-token cross-entropy computed in chunks, so the [seq x vocab] logits never exist whole.

`CausalLMLoss` wraps a transformers causal LM (or its peft wrapper): it runs the model body for the final
hidden states, then applies the output head + cross-entropy to `chunk_tokens` positions at a time, each chunk
under activation checkpointing (its logits are recomputed in backward instead of kept). Peak logits memory is
chunk_tokens x vocab x 4 bytes instead of seq x vocab. The wrapper is what accelerate/DeepSpeed prepare, so
DDP and ZeRO hooks see every parameter use. Tested against the plain `model(labels=...)` loss:
`python -m pytest tests/test_trainer.py -k chunked`. `token_nll` is the evaluation form (per-token, no
gradients), tested in tests/test_eval_loss.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                reduction: str = "sum"):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=-100)


def chunked_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                          chunk_tokens: int, softcap: float | None = None,
                          labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of `hidden` [B, S, D] predicting `input_ids` shifted by one, chunk by chunk; or,
    with `labels` [B, S] already shifted (sequence parallelism), predicting `labels` at every position."""
    if labels is None:
        flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        flat_targets = input_ids[:, 1:].reshape(-1)
    else:
        flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = flat_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, flat_hidden[piece], flat_targets[piece], softcap,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(head, flat_hidden[piece], flat_targets[piece], softcap)
    return total / (flat_targets != -100).sum().clamp(min=1)


class CausalLMLoss(torch.nn.Module):
    """`forward(input_ids, position_ids=None, attention_mask=None, labels=None) -> mean loss`; `.model` is the
    wrapped model. `labels` are pre-shifted targets (-100 = ignore), as sequence-parallel shards need."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.config = model.config  # accelerate sizes DeepSpeed's "auto" ZeRO-3 buckets from config.hidden_size

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
        softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        return chunked_cross_entropy(lm.get_output_embeddings(), hidden, input_ids, self.chunk_tokens, softcap,
                                     labels)


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """NLL of tokens 1..L-1 of `input_ids` [1, L] given their prefixes: float32 [L-1] on the model's device."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"token_nll expects input_ids of shape [1, L], got {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError("token_nll needs at least 2 tokens (one context token and one target)")
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[0, :-1]
    targets = input_ids[0, 1:]
    head, softcap = model.get_output_embeddings(), getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.cat([_chunk_loss(head, hidden[start:start + chunk_size], targets[start:start + chunk_size], softcap,
                                  reduction="none") for start in range(0, hidden.shape[0], chunk_size)])
