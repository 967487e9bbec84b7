"""Shared fixtures: tiny random HF models built in-process, the bundled SmolLM2-135M tokenizer, the real
SmolLM2-135M (slow, cached on disk), and `CountOps`, which records every ATen op a block of code runs.

Run everything with `python -m pytest`; skip the real-model tests with `-m "not slow"`.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(model_type: str = "llama", **overrides):
    """A small random config of `model_type` (head_dim 16, native context 256 tokens)."""
    from transformers import AutoConfig

    kwargs = dict(TINY)
    if model_type in ("gemma3_text", "gemma3"):
        kwargs.update(head_dim=16, sliding_window=32, layer_types=["sliding_attention", "full_attention"])
    if model_type in ("qwen3",):
        kwargs.update(head_dim=16)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


class CountOps(TorchDispatchMode):
    """`with CountOps() as seen:` records the name of every ATen op run inside (`seen.names`, e.g. "mm")."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled SmolLM2-135M-Instruct tokenizer (a test file may define its own `tokenizer`, e.g. a tiny BPE)."""
    from yarnkit.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    """`(model, tokenizer)` of the bundled SmolLM2-135M-Instruct in float32 on CPU."""
    from yarnkit.models import load_model

    return load_model("smollm2-135m")
