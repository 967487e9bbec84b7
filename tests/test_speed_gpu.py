"""The fused paths on a GPU (`pytest -m gpu tests/test_speed_gpu.py`; skipped without CUDA or Liger-Kernel).

Each fused path is compared with the plain one on the same random SmolLM2-shaped model (2 layers, hidden 576,
9 heads / 3 KV heads, vocab 49152), fp32 weights under bf16 autocast as the trainer runs it. The paths round
differently in bf16, so they are compared with bf16-level tolerances: loss within 2e-3 relative, every gradient
within 3e-2 of the plain gradient's norm (relative L2 distance). A wrong kernel (a missing scale, a transposed
head, a dropped term) is off by far more.

- `model.kernels=liger` (Liger RMSNorm/SwiGLU/RoPE) against transformers' modules;
- `fused_cross_entropy` (Liger's fused linear cross-entropy) against `chunked_cross_entropy`;
- keep-attention checkpointing inside compiled layers with the cuDNN kernel against no checkpointing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")


def _model(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                                  max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.train()


def _ids(length=2048):
    return torch.randint(0, 49152, (2, length), generator=torch.Generator().manual_seed(1)).cuda()


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(loss_a, grads_a, loss_b, grads_b):
    assert abs(loss_b - loss_a) / abs(loss_a) < 2e-3, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        distance = (grads_b[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert distance < 3e-2, (name, float(distance))


@needs_liger
def test_liger_kernels_match_transformers_modules():
    from yarnkit.train.speed import apply_liger

    ids = _ids()
    plain = _model()
    reference = _loss_and_grads(plain, lambda m: m(input_ids=ids, labels=ids).loss)
    fused = _model()
    apply_liger(fused)
    assert fused.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    _assert_close(*reference, *_loss_and_grads(fused, lambda m: m(input_ids=ids, labels=ids).loss))


@needs_liger
def test_fused_cross_entropy_matches_the_chunked_loss():
    from yarnkit.train.loss import CausalLMLoss

    ids = _ids()
    reference = _loss_and_grads(_model(), lambda m: CausalLMLoss(m, 1024, fused=False)(ids))
    _assert_close(*reference, *_loss_and_grads(_model(), lambda m: CausalLMLoss(m, 1024, fused=True)(ids)))


def test_keep_attention_inside_compiled_layers_with_cudnn():
    from yarnkit.sdpa import use_sdpa_kernel
    from yarnkit.train.speed import compile_layers, keep_attention_checkpointing

    ids = _ids(4096)
    try:
        use_sdpa_kernel("cudnn")
        reference = _loss_and_grads(_model(), lambda m: m(input_ids=ids, labels=ids).loss)
        model = _model()
        keep_attention_checkpointing(model)
        compile_layers(model)
        _assert_close(*reference, *_loss_and_grads(model, lambda m: m(input_ids=ids, labels=ids).loss))
    finally:
        use_sdpa_kernel("auto")
