"""Real-model check: zero-shot YaRN x4 on SmolLM2-135M (native 8k) over a 12k-token window of a PG-19 test book.

    python -m pytest tests/test_smollm2_yarn.py -s     # -s prints the perplexity table

SmolLM2 (RoPE theta 1e5) extrapolates a little past its native 8k, so at 12k the unpatched model degrades
gradually rather than collapsing: measured here (fp32, CPU) its perplexity is 18.4 on the first 8k tokens,
26.6 on 8k-12k and 37.4 on the last 2k, while YaRN x4 gives 21.0 / 20.6 / 19.2. The assertions check that
shape with margins: the unpatched model degrades with distance, YaRN x4 does not, and on the far end YaRN is
roughly twice better. (At 16k+ the unpatched model collapses: perplexity 63.9 vs 37.0 for YaRN x8 at 16k and
436 vs 40.3 at 32k on ten PG-19 test books, docs/results.md §1; a 16k window would cost CI minutes more.)

The negative log-likelihood is computed here independently of yarnkit's evaluation code: hidden states once,
then lm_head + cross-entropy in 2k-token chunks (never a 12k x 49k logits tensor).
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
FAR = 10240


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

    def ppl(nll):
        return {"all": math.exp(nll.mean()), "0-8k": math.exp(nll[:NATIVE].mean()),
                "8k-12k": math.exp(nll[NATIVE:].mean()), "10k-12k": math.exp(nll[FAR:].mean())}

    base, yarn = ppl(base_nll), ppl(yarn_nll)
    print(f"\nSmolLM2-135M perplexity, {WINDOW}-token window of {sample_path('eval').name}:")
    print("             " + "".join(f"{region:>10}" for region in base))
    for name, row in (("unpatched", base), ("YaRN x4", yarn)):
        print(f"  {name:<10} " + "".join(f"{value:>10.2f}" for value in row.values()))
    assert base["10k-12k"] > 1.5 * base["0-8k"], "unpatched: the far end should be much worse than the native part"
    assert yarn["10k-12k"] < 1.2 * yarn["0-8k"], "YaRN x4: the far end should stay near the native part"
    assert yarn["10k-12k"] < base["10k-12k"] / 1.5, "YaRN x4 should be far better than unpatched past 10k"
    assert yarn["8k-12k"] < 0.9 * base["8k-12k"], "YaRN x4 should be better over everything past 8k"

    with torch.no_grad():
        assert torch.equal(model(probe).logits, probe_before), "patch then undo must leave the model unchanged"
