"""Shared fixtures: tiny random HF models built in-process, the bundled SmolLM2-135M tokenizer, the real
SmolLM2-135M (slow, cached on disk), `CountOps` (every ATen op a block of code runs), `compiled_step_code` (the
code Inductor writes for a pool's decode step, with the buffers it allocates), and a guard that gives each `gpu`
test transformers' Llama modeling module as it was (Liger-Kernel patches it process-wide).

Run everything with `python -m pytest`; skip the real-model tests with `-m "not slow"`.
"""

from __future__ import annotations

import math
import re

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


def compiled_step_code(pool, cache, token: int) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Compile `pool`'s step with Inductor (as `--compile` does, no FX graph cache: the code is written afresh),
    decode `token` for `cache` -> (its logits, the shapes of the buffers of at least one layer's row of the K/V
    cache that the generated code allocates: a copy of a cache row, or of the whole buffers)."""
    from torch._inductor.utils import run_and_get_code

    pool._step = torch.compile(pool.forward_rows)
    with torch._inductor.config.patch(fx_graph_cache=False):
        logits, codes = run_and_get_code(pool.decode, [cache], [token])
    shapes = [tuple(int(n) for n in found.split(",") if n.strip())
              for code in codes for found in re.findall(r"empty_strided_\w+\(\(([\d, ]*)\)", code)]
    assert shapes, "no buffer allocation found in Inductor's code: its format changed, update this helper"
    row = pool.key_buffer[0, 0].numel()  # one layer's row: [kv_heads, slots, head_dim]
    return logits, [shape for shape in shapes if math.prod(shape) >= row]


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


@pytest.fixture(autouse=True)
def _llama_modeling_restored(request):
    """A GPU test that trains in its own process applies Liger-Kernel, which swaps transformers' Llama norm, MLP
    and RoPE function process-wide: every model built later in that pytest worker would get Liger's kernels. Each
    `gpu` test leaves `modeling_llama` as it found it, so what a test measures does not depend on which test ran
    before it in its worker."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    from transformers.models.llama import modeling_llama

    saved, forward = dict(vars(modeling_llama)), modeling_llama.LlamaForCausalLM.forward
    yield
    vars(modeling_llama).update(saved)
    modeling_llama.LlamaForCausalLM.forward = forward
