"""Real-model check: zero-shot YaRN x4 on SmolLM2-135M (native 8k) over a 12k-token window of a PG-19 test book.

    python -m pytest tests/test_smollm2_yarn.py -s     # -s prints the two perplexities

Past its native context the unpatched model's perplexity explodes; with YaRN x4 it stays near its short-context
value. The negative log-likelihood is computed here independently of yarnkit's evaluation code: hidden states
once, then lm_head + cross-entropy in 2k-token chunks (never a 12k x 49k logits tensor).
"""

from __future__ import annotations

import math

import pytest
import torch

from yarnkit.assets import sample_path
from yarnkit.corpus import read_text
from yarnkit.patch import apply_rope_scaling

WINDOW = 12288
NATIVE = 8192


def chunked_nll(model, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token NLL of ids[1:] given the prefix, float32, shape [len-1]."""
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0, :-1]
        targets = ids[0, 1:]
        return torch.cat([torch.nn.functional.cross_entropy(model.lm_head(hidden[s:s + chunk]).float(),
                                                            targets[s:s + chunk], reduction="none")
                          for s in range(0, hidden.shape[0], chunk)])


@pytest.mark.slow
def test_yarn_x4_rescues_12k_window_and_undo_restores(smollm2):
    model, tokenizer = smollm2
    tokens = tokenizer(read_text(sample_path("eval")), return_tensors="pt").input_ids
    assert tokens.shape[1] > WINDOW + 2000
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), tokens[:, 1000:1000 + WINDOW - 1]], dim=1)
    probe = ids[:, :256]
    with torch.no_grad():
        probe_before = model(probe).logits

    base_nll = chunked_nll(model, ids)
    handle = apply_rope_scaling(model, "yarn", factor=4)
    try:
        yarn_nll = chunked_nll(model, ids)
    finally:
        handle.undo()

    base_ppl, yarn_ppl = math.exp(base_nll.mean()), math.exp(yarn_nll.mean())
    base_tail, yarn_tail = math.exp(base_nll[NATIVE:].mean()), math.exp(yarn_nll[NATIVE:].mean())
    print(f"\nSmolLM2-135M, {WINDOW}-token window of {sample_path('eval').name}:"
          f"\n  unpatched      ppl {base_ppl:10.2f}   (tokens past 8k: {base_tail:10.2f})"
          f"\n  YaRN x4        ppl {yarn_ppl:10.2f}   (tokens past 8k: {yarn_tail:10.2f})")
    assert yarn_ppl < base_ppl / 3, "YaRN x4 should cut the 12k-window perplexity by far more than 3x"
    assert yarn_tail < base_tail / 10, "past the native 8k the unpatched model should be far worse"
    assert yarn_tail < 3 * math.exp(yarn_nll[:NATIVE].mean()), "YaRN should keep the tail near the head"

    with torch.no_grad():
        assert torch.equal(model(probe).logits, probe_before), "patch then undo must leave the model unchanged"
