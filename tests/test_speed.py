"""Speed/memory knobs on CPU (yarnkit/train/speed.py, model.py's checkpointing, optim.py, loop.py, profiling.py).

- `use_sdpa_kernel("cudnn" | "flash")`: transformers' `sdpa` re-registered to prefer a kernel. On CPU those
  kernels do not exist, so torch falls back to its next choice: what is checked here is that the wrapper
  (K/V expansion for cuDNN, `enable_gqa` otherwise, causal flag, output layout) gives transformers' own logits
  (1e-5, float32). Which kernel ran on a GPU is the benchmark's business (scripts/bench_train.py).
- `tile_mlps`: DeepSpeed's TiledMLP over 4 sequence shards gives the untiled loss and gradients (1e-5 / 1e-6).
- `activation_offload`: DeepSpeed's checkpoint-input offload context leaves loss and gradients unchanged (1e-6).
- `checkpoint_layers`: only the first N decoder layers keep transformers' checkpointing flag.
- A backend that is not installed or a knob that does not apply is a RecipeError naming the fix.
- Keep-attention checkpointing: loss and gradients of the uncheckpointed model (1e-6); the fused SDPA kernel runs
  once per keeping layer (its outputs are saved), twice per fully recomputed one (counted at the ATen level).
- Fallbacks: Liger-Kernel and compiled layers cannot run on this CPU machine; `auto` says so in one line and runs
  the plain path, an explicit request stops (also through the trainer's `main`, exit 2) naming the fix.
- Fused AdamW takes the foreach implementation's steps (1e-6); the batch prefetcher serves the batches asked for,
  in order or not; the profile summary groups operators and measures gaps.

Run: python -m pytest tests/test_speed.py -q
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from yarnkit.sdpa import use_sdpa_kernel
from yarnkit.train.speed import activation_offload, check_attention, full_checkpointing, tile_mlps
from yarnkit.train.recipe import load_recipe
from yarnkit.errors import RecipeError


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


def test_full_checkpointing_uses_the_current_transformers_name_without_a_warning():
    """transformers 5.25 warns that `gradient_checkpointing_enable` goes in v6; 5.17 has only that name."""
    import warnings

    model = tiny_model("llama", seed=3).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        full_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_activation_offload_keeps_loss_and_grads():
    model, ids = tiny_model("llama", seed=3).train(), _ids(128)
    full_checkpointing(model)
    loss_a, grads_a = _loss_and_grads(model, ids)
    offload = activation_offload(True)
    with offload:
        loss_b, grads_b = _loss_and_grads(model, ids)
    assert offload.stats.marked_tensors == 2  # one checkpointed hidden state per decoder layer
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpoint_layers_keeps_the_first_n(tmp_path):
    from yarnkit.patch import YarnArgs
    from yarnkit.train.model_setup import LoraArgs, ModelArgs, build_model, scaled_config

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


class _CountAttention(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the fused SDPA kernels that really run (a SAC cache hit does not reach this mode)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from yarnkit.train.speed import _attention_ops

        self.calls += func in _attention_ops()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep, expected_runs", [(0, 2), (1, 3), (None, 4)])
def test_keep_attention_checkpointing_saves_attention_and_keeps_grads(keep, expected_runs):
    """2 layers: keep_attention everywhere runs SDPA once per layer (forward only), keep=1 recomputes one layer's
    attention, full checkpointing (None) recomputes both; loss and gradients equal the uncheckpointed model's."""
    from yarnkit.train.speed import keep_attention_checkpointing

    ids = _ids(96)
    plain, checked = tiny_model("llama", seed=4).train(), tiny_model("llama", seed=4).train()
    if keep is None:
        full_checkpointing(checked)
    else:
        assert keep_attention_checkpointing(checked, keep=keep) == (keep or 2)
    loss_a, grads_a = _loss_and_grads(plain, ids)
    with _CountAttention() as counter:
        loss_b, grads_b = _loss_and_grads(checked, ids)
    assert counter.calls == expected_runs
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_unavailable_fusions_fall_back_loudly_or_fail_with_the_fix(capsys):
    """Liger-Kernel needs CUDA and compiled layers are CUDA-only: on this CPU machine `auto` prints one line naming
    what runs instead, an explicit request is a RecipeError naming the fix."""
    from yarnkit.train.loss import fused_loss_missing
    from yarnkit.train.speed import compile_missing, liger_missing, resolve_choice

    if torch.cuda.is_available():
        pytest.skip("checks the fallbacks of a machine without CUDA")
    model = tiny_model("llama")
    assert "CUDA" in liger_missing(model) and "CUDA" in fused_loss_missing(model)
    assert "CUDA" in compile_missing("cpu")
    assert resolve_choice("model.kernels", "auto", liger_missing(model), "liger", "torch") is False
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["yarnkit: model.kernels=auto: Liger-Kernel's Triton kernels need a CUDA GPU; torch runs instead"]
    with pytest.raises(RecipeError, match="model.kernels=liger cannot run here: .*CUDA.*set model.kernels=auto"):
        resolve_choice("model.kernels", "liger", liger_missing(model), "liger", "torch")
    with pytest.raises(RecipeError, match="model.compile_layers=true cannot run here"):
        resolve_choice("model.compile_layers", "True", compile_missing("cpu"), "true", "false")
    assert resolve_choice("train.loss_impl", "chunked", None, "liger", "chunked") is False  # asked for the plain path
    assert resolve_choice("train.loss_impl", "auto", None, "liger", "chunked") is True  # available: taken silently
    assert capsys.readouterr().out == ""


def test_forced_liger_in_a_recipe_stops_before_training(tmp_path, capsys):
    from trainer_helpers import make_text_file, make_tiny_model_dir, tiny_overrides
    from yarnkit.cli import main

    if torch.cuda.is_available():
        pytest.skip("checks the fallbacks of a machine without CUDA")
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = make_text_file(tmp_path / "data.txt.gz")
    common = tiny_overrides(model_dir, data, tmp_path / "run", tmp_path / "cache", **{"train.max_steps": 1,
                                                                                   "checkpoint.every": 0})
    assert main(["train", *common, "model.kernels=liger"]) == 2
    assert "model.kernels=liger cannot run here" in capsys.readouterr().err
    assert main(["train", *common, "train.loss_impl=liger", "run_dir=" + str(tmp_path / "run2")]) == 2
    assert "train.loss_impl=liger cannot run here" in capsys.readouterr().err


def test_speed_key_values_are_checked():
    with pytest.raises(RecipeError, match="model.kernels='triton' is unknown; choose one of auto, liger, torch"):
        load_recipe(["model.kernels=triton"])
    with pytest.raises(RecipeError, match="train.loss_impl='cce' is unknown"):
        load_recipe(["train.loss_impl=cce"])
    with pytest.raises(RecipeError, match="set model.gradient_checkpointing=true or model.checkpoint_policy=full"):
        load_recipe(["model.gradient_checkpointing=false", "model.checkpoint_policy=keep_attention"])
    with pytest.raises(RecipeError, match="offload_activations works with model.checkpoint_policy=full"):
        load_recipe(["model.checkpoint_policy=keep_attention", "train.offload_activations=true"])
    recipe = load_recipe(["model.compile_layers=true", "optim.fused=False"])  # YAML booleans are accepted
    assert (recipe.model.compile_layers, recipe.optim.fused) == ("true", "false")


def test_fused_adamw_takes_the_same_steps_as_foreach():
    from yarnkit.train.optim import OptimArgs, build_optimizer

    models = [tiny_model("llama", seed=5).train() for _ in range(2)]
    ids = _ids(64)
    for model, fused in zip(models, ("false", "true")):
        optimizer, _ = build_optimizer(model.parameters(), OptimArgs(lr=1e-3, warmup_steps=0, fused=fused), 10)
        assert optimizer.defaults["fused"] is (True if fused == "true" else None)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_fused_adamw_is_taken_on_cuda_and_fails_with_the_fix_when_forced_where_it_cannot_run(capsys):
    from yarnkit.train.optim import OptimArgs, build_optimizer

    weights = [torch.nn.Parameter(torch.ones(3))]
    assert build_optimizer(weights, OptimArgs(fused="auto"), 10, device="cuda")[0].defaults["fused"] is True
    assert build_optimizer(weights, OptimArgs(fused="auto"), 10, device="cpu")[0].defaults["fused"] is None
    assert build_optimizer(weights, OptimArgs(fused="true"), 10, device="cpu")[0].defaults["fused"] is True
    assert capsys.readouterr().out == ""  # auto means CUDA: on the CPU foreach is the choice, not a fallback
    with pytest.raises(RecipeError, match=r"optim.fused=true cannot run here: torch has no fused AdamW kernel for "
                                          r"meta here; fix that, or set optim.fused=auto"):
        build_optimizer(weights, OptimArgs(fused="true"), 10, device="meta")
    assert build_optimizer(weights, OptimArgs(fused="false"), 10, device="cuda")[0].defaults["fused"] is None


def test_prefetcher_serves_the_same_batches_in_order_or_out_of_it():
    from yarnkit.train.loop import Prefetcher

    built = []

    def build(first):
        built.append(first)
        return {"input_ids": torch.full((2, 4), first), "position_ids": None, "attention_mask": None}

    prefetch = Prefetcher(build, pin=False)
    assert prefetch(0, 2)["input_ids"][0, 0] == 0
    assert prefetch(2, 4)["input_ids"][0, 0] == 2  # the one built ahead
    assert prefetch(8, None)["input_ids"][0, 0] == 8  # not the one ahead (4): built on the spot
    prefetch.close()
    assert built == [0, 2, 4, 8]


def test_profile_summary_lists_operators_and_gaps():
    from yarnkit.train.profiling import gaps, kind_of, step_profile, summary

    assert gaps([(0, 2), (1, 3), (5, 6), (10, 11)]) == [2, 4]
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert kind_of("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "matmul"
    assert kind_of("triton_poi_fused_add_mul_0") == "Inductor (compiled layers)"
    assert kind_of("_rms_norm_forward_kernel") == "Liger-Kernel"
    assert kind_of("void at::native::(anonymous namespace)::rms_norm_kernel<c10::BFloat16>") != "Liger-Kernel"
    assert kind_of("void at::native::reduce_kernel<512, 1>") == "elementwise / reductions / norms"
    assert kind_of("void at::native::cunn_SoftMaxForwardReg<float, float>") == "softmax / cross-entropy (ATen)"
    model, ids = tiny_model("llama").train(), _ids(64)
    with step_profile(True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    with step_profile(False) as nothing:
        assert nothing is None
    text = summary(prof, 0.5, "tiny step")
    assert text.startswith("# tiny step") and "| top 15 kernels |" in text and "Host gaps:" in text
    assert ("aten::" in text) != torch.cuda.is_available()  # CPU operators stand in for kernels here
