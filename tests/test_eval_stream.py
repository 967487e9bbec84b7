"""Streaming policies against independent references on a tiny model. Run: python -m pytest tests/test_eval_stream.py -q

References: a dense full-sequence forward (policies while not full), a dense forward with an explicit banded
causal mask at the original positions (window), and fresh forwards over each token's last W tokens (recompute).
Tolerance 1e-4 in float32 (different kernel orderings of the same sums).
"""

import pytest
import torch
from conftest import tiny_model

from yarnkit.nll import token_nll
from yarnkit.eval.stream import (POLICIES, DensePolicy, RecomputePolicy, SinkPolicy, StreamPolicy, WindowPolicy,
                                 evaluate_stream, make_policy)

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(2, 128, (1, 48))


def stream_logits(model, policy, ids, chunk):
    policy.reset()
    with torch.no_grad():
        return torch.cat([policy.step(model, ids[:, start:start + chunk]) for start in range(0, ids.shape[1], chunk)],
                         dim=1)


@pytest.mark.parametrize("chunk", [1, 5])
@pytest.mark.parametrize("name", list(POLICIES))
def test_policies_match_dense_forward_while_cache_not_full(model, ids, name, chunk):
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    policy = make_policy(name, window=64, sinks=4)  # 48 tokens < 64: never evicts
    torch.testing.assert_close(stream_logits(model, policy, ids, chunk), dense, **TOL)
    assert policy.cache_tokens() in (0, 47, 48)  # recompute keeps W-1 tokens of context; KV policies keep all


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_window_after_fill_equals_banded_attention_at_original_positions(model, ids, chunk):
    window = 10
    length = ids.shape[1]
    allowed = torch.ones(length, length).tril() - torch.ones(length, length).tril(-window)
    mask = torch.zeros(length, length).masked_fill(allowed == 0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        dense = model(input_ids=ids).logits
    policy = WindowPolicy(window)
    got = stream_logits(model, policy, ids, chunk)
    torch.testing.assert_close(got, reference, **TOL)
    assert policy.cache_tokens() == window
    assert not torch.allclose(got[:, -1], dense[:, -1], atol=1e-3)  # eviction really changed the result


@pytest.fixture(scope="module")
def fresh_window_logits(model, ids):
    with torch.no_grad():
        return torch.stack([model(input_ids=ids[:, max(0, t + 1 - 12):t + 1]).logits[0, -1]
                            for t in range(ids.shape[1])])[None]


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_recompute_scores_each_token_with_a_fresh_window(model, ids, chunk, fresh_window_logits):
    window, reference = 12, fresh_window_logits
    policy = RecomputePolicy(window)
    torch.testing.assert_close(stream_logits(model, policy, ids, chunk), reference, **TOL)
    assert policy.cache_tokens() == window - 1


def test_dense_stream_ppl_equals_full_sequence_ppl_and_stops_at_max_cache(model, ids):
    bos = 1
    tokens = [bos] + ids[0].tolist()
    full = token_nll(model, torch.tensor([tokens])).double().mean().exp().item()
    result = evaluate_stream(model, DensePolicy(), tokens, bos, max_tokens=1000, chunk=7, segment=16)
    assert result["tokens_processed"] == len(tokens) and result["tokens_scored"] == len(tokens) - 1
    assert result["stop_reason"] == "end of data"
    assert result["ppl"] == pytest.approx(full, rel=1e-4)
    assert [segment["end"] for segment in result["segments"]][-1] == len(tokens)
    stopped = evaluate_stream(model, DensePolicy(max_cache=20), tokens, bos, max_tokens=1000, chunk=1)
    assert stopped["tokens_processed"] == 20 and "--max-cache 20" in stopped["stop_reason"]


def test_stream_respects_max_tokens_and_skips_bos_targets(model, ids):
    bos = 1
    tokens = [bos] + ids[0, :20].tolist() + [bos] + ids[0, 20:].tolist()
    result = evaluate_stream(model, WindowPolicy(8), tokens, bos, max_tokens=30, chunk=4, segment=10)
    assert result["tokens_processed"] == 30 and result["tokens_scored"] == 28  # 29 targets minus one BOS
    assert result["stop_reason"] == "reached --max-tokens 30"
    assert result["peak_memory_bytes"] > 0 and result["ms_per_token"] > 0


def test_unknown_policy_fails_clearly():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")


def test_sink_policy_follows_the_protocol_and_its_window_counts_the_sinks():
    """One meaning of W everywhere: the whole cache, sinks included (4 sinks + 16 recent = 20 here)."""
    model = tiny_model("llama")
    policy = make_policy("sink", window=20, sinks=4, evict_batch=1)
    assert isinstance(policy, SinkPolicy) and policy.name == "sinks4+W20"
    for method in ("reset", "step", "cache_tokens"):
        assert callable(getattr(policy, method)) and method in StreamPolicy.__dict__
    policy.reset()
    assert policy.cache_tokens() == 0
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    outs = [policy.step(model, ids[:, i:i + 1]) for i in range(60)]
    assert all(o.shape == (1, 1, 128) for o in outs)
    assert policy.cache_tokens() == 20  # evict_batch=1: exactly StreamingLLM's 4 + 16
    assert policy.engine.cache_ids[:4].tolist() == ids[0, :4].tolist()
    policy.reset()
    assert policy.cache_tokens() == 0


def test_sink_default_comes_from_the_runtime():
    """`sinks=None`: 1 for a model with a dedicated sink token, else 4 (written once, in the runtime)."""
    model = tiny_model("llama")
    policy = SinkPolicy(window=32)
    policy.step(model, torch.tensor([[5, 6]]))
    assert policy.engine.options.sinks == 4
    model.config.yarnkit_sink_token_id = 1
    try:
        policy = SinkPolicy(window=32)
        policy.step(model, torch.tensor([[5, 6]]))
        assert policy.engine.options.sinks == 1 and policy.engine.cache_ids[0] == 1
    finally:
        del model.config.yarnkit_sink_token_id
