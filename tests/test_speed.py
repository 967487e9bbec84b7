"""Speed/memory knobs on CPU (yarnkit/train/speed.py, yarnkit/train/model.py's checkpoint_layers), each against the plain path.

- `use_sdpa_kernel("cudnn" | "flash")`: transformers' `sdpa` re-registered to prefer a kernel. On CPU those
  kernels do not exist, so torch falls back to its next choice: what is checked here is that the wrapper
  (K/V expansion for cuDNN, `enable_gqa` otherwise, causal flag, output layout) gives transformers' own logits
  (1e-5, float32). Which kernel ran on a GPU is the benchmark's business (scripts/bench_train.py).
- `tile_mlps`: DeepSpeed's TiledMLP over 4 sequence shards gives the untiled loss and gradients (1e-5 / 1e-6).
- `activation_offload`: DeepSpeed's checkpoint-input offload context leaves loss and gradients unchanged (1e-6).
- `checkpoint_layers`: only the first N decoder layers keep transformers' checkpointing flag.
- A backend that is not installed or a knob that does not apply is a RecipeError naming the fix.

Run: python -m pytest tests/test_speed.py -q
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from yarnkit.train.speed import activation_offload, check_attention, tile_mlps, use_sdpa_kernel
from yarnkit.train.recipe import RecipeError, load_recipe


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _ids(length=256, seed=0):
    return torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", ["cudnn", "flash", "math"])
def test_kernel_sdpa_matches_transformers(kernel):
    model, ids = tiny_model("llama", seed=1), _ids(96)  # 4 query heads, 2 KV heads: the GQA path runs
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        try:
            use_sdpa_kernel(kernel)
            chosen = model(input_ids=ids).logits
        finally:
            use_sdpa_kernel("auto")
    torch.testing.assert_close(chosen, reference, atol=1e-5, rtol=1e-5)


def test_tiled_mlp_matches_plain_loss_and_grads():
    ids = _ids(256)  # hidden 64 -> ceil(256 / 64) = 4 shards
    plain, tiled = tiny_model("llama", seed=2).train(), tiny_model("llama", seed=2).train()
    assert tile_mlps(tiled) == 2
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(tiled, ids)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_activation_offload_keeps_loss_and_grads():
    model, ids = tiny_model("llama", seed=3).train(), _ids(128)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_a, grads_a = _loss_and_grads(model, ids)
    offload = activation_offload(True)
    with offload:
        loss_b, grads_b = _loss_and_grads(model, ids)
    assert offload.stats.marked_tensors == 2  # one checkpointed hidden state per decoder layer
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpoint_layers_keeps_the_first_n(tmp_path):
    from yarnkit.train.model import LoraArgs, ModelArgs, build_model, scaled_config, YarnArgs

    tiny_model("llama", seed=0).save_pretrained(tmp_path)
    from trainer_helpers import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path)
    args = ModelArgs(name_or_path=str(tmp_path), gradient_checkpointing=True, checkpoint_layers=1)
    model, _ = build_model(args, scaled_config(args, YarnArgs()), LoraArgs())
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]


def test_unavailable_or_mismatched_backends_are_clear_errors():
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        with pytest.raises(RecipeError, match="flash-attn package .* install it or use"):
            check_attention("flash_attention_2")
    with pytest.raises(RecipeError, match="unknown; choose one of sdpa"):
        load_recipe(["model.attn_implementation=fast"])
    with pytest.raises(RecipeError, match="only applies to attn_implementation=sdpa"):
        load_recipe(["model.attn_implementation=eager", "model.sdpa_kernel=cudnn"])
    with pytest.raises(RecipeError, match="model.sdpa_kernel='cudnn9' is unknown"):
        load_recipe(["model.sdpa_kernel=cudnn9"])
    with pytest.raises(RecipeError, match="set model.gradient_checkpointing=true"):
        load_recipe(["model.gradient_checkpointing=false", "train.offload_activations=true"])
