"""Per-token negative log-likelihood without materialising [L x vocab] logits: the memory-safe loss for long windows.

The model body runs once to produce hidden states; the LM head and cross-entropy then run `chunk_size` positions
at a time, so peak extra memory is `chunk_size x vocab` floats instead of `L x vocab` (64k x 49k fp32 = 12.9 GB).
Not a training loss (no gradients are kept). Tested against the plain full-logits loss in tests/test_eval_loss.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def model_body(model) -> torch.nn.Module:
    """The decoder stack under the LM head (e.g. `LlamaForCausalLM.model`)."""
    body = getattr(model, model.base_model_prefix, None)
    if body is None:
        raise TypeError(f"{type(model).__name__} has no base model at .{model.base_model_prefix}; "
                        "chunked loss needs a *ForCausalLM model")
    return body


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM head (plus the final logit soft-capping some models use) in float32."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """NLL of tokens 1..L-1 of `input_ids` [1, L] given their prefixes: a float32 tensor [L-1] on the model's device."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"token_nll expects input_ids of shape [1, L], got {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError("token_nll needs at least 2 tokens (one context token and one target)")
    hidden = model_body(model)(input_ids=input_ids, use_cache=False).last_hidden_state[0, :-1]
    targets = input_ids[0, 1:]
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = logits_from_hidden(model, hidden[start:start + chunk_size])
        pieces.append(F.cross_entropy(logits, targets[start:start + chunk_size], reduction="none"))
    return torch.cat(pieces)
