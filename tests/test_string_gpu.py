"""STRING's compiled FlexAttention path on a GPU (`pytest -m gpu tests/test_string_gpu.py`; skipped without CUDA).

On a random SmolLM2-shaped model (2 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64), float32 weights:
- `auto` on CUDA takes torch.compile'd FlexAttention (two block-masked passes + LSE merge) for a 6000-token
  prefill; its logits must match the dense float32 kernel within 2e-3 (Triton may use TF32 for float32 dots,
  which rounds the scores at ~1e-3 relative; a wrong mask or merge is off by far more, as the S-sensitivity
  assertion shows);
- bfloat16 decode through a transformers cache (dense kernel, positions from the cache) agrees with one flex
  prefill of the same tokens;
- one 65536-token bfloat16 prefill runs (prints the compile and run seconds; nothing is timed in asserts).
"""

from __future__ import annotations

import time

import pytest
import torch

from yarnkit import string_attention as sa
from yarnkit.models import forward_with_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(dtype=torch.float32, layers=2, context=8192):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                  max_position_embeddings=context, tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _ids(length, batch=2):
    return torch.randint(0, 49152, (batch, length), generator=torch.Generator().manual_seed(1)).cuda()


@torch.no_grad()
def _logits(model, ids, kernel, shift=1000, window=128):
    handle = sa.apply_string(model, shift, window, kernel=kernel)
    try:
        return model(input_ids=ids).logits.float()
    finally:
        handle.undo()


def test_compiled_flex_prefill_matches_the_dense_kernel():
    model, ids = _model(), _ids(6000)
    dense = _logits(model, ids, "dense")
    flex = _logits(model, ids, "auto")
    error = (flex - dense).abs().max().item()
    print(f"max |flex - dense| = {error:.2e}")
    assert error < 2e-3
    assert (_logits(model, ids, "dense", shift=4000) - dense).abs().max() > 1e-2  # S matters at this length


@torch.no_grad()
def test_bf16_decode_through_a_cache_agrees_with_one_prefill():
    """6000 prompt tokens (flex prefill), then 16 tokens one at a time (dense decode against the cache): each step's
    logits point the same way as the one-shot flex prefill's at that position (cosine > 0.999 in bfloat16)."""
    model, ids = _model(torch.bfloat16), _ids(6016, batch=1)
    handle = sa.apply_string(model, 1000, 128)
    whole = model(input_ids=ids).logits[0, 5999:].float()
    out, cache = forward_with_cache(model, None, input_ids=ids[:, :6000], use_cache=True, logits_to_keep=1)
    steps = [out.logits[0, -1]]
    for i in range(6000, 6015):
        out, cache = forward_with_cache(model, cache, input_ids=ids[:, i:i + 1], use_cache=True)
        steps.append(out.logits[0, -1])
    handle.undo()
    similarity = torch.nn.functional.cosine_similarity(torch.stack(steps).float(), whole[:16], dim=-1)
    print(f"min cosine decode vs prefill = {similarity.min().item():.5f}")
    assert similarity.min() > 0.999


@torch.no_grad()
def test_a_64k_prefill_runs():
    model, ids = _model(torch.bfloat16, layers=1, context=65536), _ids(65536, batch=1)
    handle = sa.apply_string(model, 21845, 128)
    for attempt in ("first (compiles)", "second"):
        torch.cuda.synchronize()
        started = time.perf_counter()
        logits = model(input_ids=ids, logits_to_keep=1).logits
        torch.cuda.synchronize()
        print(f"64k prefill, 1 layer, {attempt}: {time.perf_counter() - started:.2f} s")
    handle.undo()
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_runtime_auto_takes_the_static_path_and_matches_eager():
    from yarnkit.runtime.engine import StreamingEngine

    model, stream = _model(), _ids(700, batch=1)
    handle = sa.apply_string(model, 300, 16)
    engines = [StreamingEngine(model, window=1024, decode=decode) for decode in ("auto", "eager")]
    logits = [torch.cat([engine.feed(stream[:, i:i + 100]) for i in range(0, 700, 100)], dim=1) for engine in engines]
    handle.undo()
    assert engines[0].decode_path == "static"
    assert (logits[0] - logits[1]).abs().max() < 2e-3
