"""Next-token negative log-likelihood through the output head a chunk of positions at a time: never the whole
[seq x vocab] logits. Shared by training (`yarnkit.train.loss`, under activation checkpointing) and evaluation
(`yarnkit.eval.ppl`, per token, no gradients).

`head_nll(head, hidden, targets, softcap)` is one chunk: logits in float32 (Gemma's final soft-capping applied
when the config has it), then cross-entropy (positions labelled -100 are ignored). `token_nll(model, ids)` is the
NLL of every token after the first given its prefix. Tested by `python -m pytest tests/test_eval_loss.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                reduction: str = "sum"):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=-100)


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
    return torch.cat([head_nll(head, hidden[start:start + chunk_size], targets[start:start + chunk_size], softcap,
                                  reduction="none") for start in range(0, hidden.shape[0], chunk_size)])
