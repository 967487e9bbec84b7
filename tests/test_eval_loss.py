"""Chunked loss equals the plain full-logits loss. Run: python -m pytest tests/test_eval_loss.py -q"""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model

from yarnkit.nll import token_nll


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_loss_equals_unchunked_loss(chunk_size):
    model = tiny_model("llama", seed=1)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 200))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    reference = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    chunked = token_nll(model, ids, chunk_size=chunk_size)
    assert chunked.shape == (199,)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)  # tolerance from the issue: 1e-5


def test_softcapped_logits_match_the_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    config = tiny_config("gemma2", head_dim=16, final_logit_softcapping=30.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (1, 50))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    reference = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    torch.testing.assert_close(token_nll(model, ids, chunk_size=16), reference, atol=1e-5, rtol=0)


def test_rejects_batches_and_single_tokens():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="shape"):
        token_nll(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        token_nll(model, torch.zeros(1, 1, dtype=torch.long))
