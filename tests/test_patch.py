"""`apply_rope_scaling` on tiny random models of every listed architecture.

    python -m pytest tests/test_patch.py

Checks: after patching, the cos/sin each attention layer receives equal `yarnkit.rope` (float64 reference,
absolute tolerance 1e-4: transformers forms the angles in float32, whose ulp at position 700 is ~6e-5 rad); `undo()` restores the logits bit for bit;
a patched model saved with `save_pretrained` reloads in a subprocess that never imports yarnkit with identical
logits (atol 1e-5); and bad requests fail with messages that name the value and the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, tiny_model

from yarnkit import rope
from yarnkit.errors import RecipeError, RopeScalingError
from yarnkit.patch import ARCHS, YarnArgs, apply_rope_scaling, apply_yarn, read_yarn_args

ARCH_KWARGS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma3_text": {},
    "phi3": {"partial_rotary_factor": 0.5, "original_max_position_embeddings": 256},
}
NATIVE = 256
# transformers computes angles position·θ in float32: at position ~700 one ulp of the angle is ~6e-5 rad
ANGLE_ATOL = 1e-4


def captured_position_embeddings(model, input_ids):
    """Run a forward and return, per decoder layer, the (cos, sin) its attention received."""
    seen = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        def hook(module, args, kwargs, index=index):
            seen[index] = kwargs["position_embeddings"]
        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        logits = model(input_ids).logits
    for hook in hooks:
        hook.remove()
    return seen, logits


def expected_cos_sin(rope_parameters, model, positions, seq_len=None):
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq, attention = rope.compute_inv_freq(rope_parameters, head_dim, config.max_position_embeddings, seq_len)
    return rope.cos_sin(inv_freq, positions, attention)


def reference_dict(handle, rope_type="yarn"):
    """The pure-math description of what was installed (Phi-3 stores YaRN as LongRoPE factors)."""
    installed = handle.rope_parameters
    if installed["rope_type"] == "longrope":
        return {"rope_type": rope_type, "rope_theta": installed["rope_theta"], "factor": handle.factor,
                "original_max_position_embeddings": handle.original_max_position_embeddings,
                "partial_rotary_factor": installed.get("partial_rotary_factor", 1.0)}
    return installed


@pytest.mark.parametrize("model_type", list(ARCH_KWARGS))
def test_arch_cos_sin_match_pure_math_and_undo_is_exact(model_type):
    assert model_type in ARCHS
    model = tiny_model(model_type, **ARCH_KWARGS[model_type])
    ids = torch.randint(3, 128, (1, 600))  # beyond the native 256 positions
    before_pe, before_logits = captured_position_embeddings(model, ids)

    handle = apply_rope_scaling(model, "yarn", factor=4)
    assert model.config.max_position_embeddings == 4 * NATIVE
    assert handle.original_max_position_embeddings == NATIVE
    after_pe, after_logits = captured_position_embeddings(model, ids)
    positions = torch.arange(600)[None]
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(after_pe)
    for index, (cos, sin) in after_pe.items():
        if ARCHS[model_type].scaled_layer_types and layer_types[index] not in ARCHS[model_type].scaled_layer_types:
            torch.testing.assert_close(cos, before_pe[index][0], rtol=0, atol=0)  # local layers untouched
            continue
        exp_cos, exp_sin = expected_cos_sin(reference_dict(handle), model, positions)
        torch.testing.assert_close(cos.double(), exp_cos, rtol=0, atol=ANGLE_ATOL)
        torch.testing.assert_close(sin.double(), exp_sin, rtol=0, atol=ANGLE_ATOL)
    assert not torch.allclose(after_logits, before_logits)

    handle.undo()
    _, restored = captured_position_embeddings(model, ids)
    assert torch.equal(restored, before_logits)
    assert model.config.max_position_embeddings == NATIVE


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "dynamic", "yarn", "dynamic_yarn"])
def test_every_rope_type_on_llama(rope_type):
    model = tiny_model("llama")
    original_params = dict(model.config.rope_parameters)
    handle = apply_rope_scaling(model, rope_type, factor=4)
    length = 700
    pe, _ = captured_position_embeddings(model, torch.randint(3, 128, (1, length)))
    if rope_type == "ntk":
        assert handle.rope_parameters["rope_type"] == "default"  # stored as a base change
    reference = {**original_params, **handle.rope_parameters, "rope_type": rope_type,
                 "rope_theta": original_params["rope_theta"], "factor": 4.0,
                 "original_max_position_embeddings": NATIVE}
    seq_len = length if rope_type in ("dynamic", "dynamic_yarn") else None
    exp_cos, exp_sin = expected_cos_sin(reference, model, torch.arange(length)[None], seq_len)
    torch.testing.assert_close(pe[0][0].double(), exp_cos, rtol=0, atol=ANGLE_ATOL)
    torch.testing.assert_close(pe[0][1].double(), exp_sin, rtol=0, atol=ANGLE_ATOL)
    expected_max = NATIVE if rope_type in ("dynamic", "dynamic_yarn") else 4 * NATIVE
    assert model.config.max_position_embeddings == expected_max


def test_dynamic_yarn_grows_with_length_then_resets():
    model = tiny_model("llama")
    apply_rope_scaling(model, "dynamic_yarn", factor=4)
    rotary = model.model.rotary_emb
    _ = captured_position_embeddings(model, torch.randint(3, 128, (1, 512)))
    assert rotary.attention_scaling == pytest.approx(rope.yarn_get_mscale(512 / NATIVE))
    _ = captured_position_embeddings(model, torch.randint(3, 128, (1, 100)))
    assert rotary.attention_scaling == pytest.approx(rope.yarn_get_mscale(512 / NATIVE))  # grow-only above native
    torch.testing.assert_close(rotary.inv_freq.double(), rope.default_inv_freq(16, 1e4), rtol=1e-6, atol=0)


def test_save_pretrained_reloads_in_plain_transformers(tmp_path):
    """Every arch: save the patched model, reload it in a fresh interpreter without yarnkit, same logits."""
    ids = torch.randint(3, 128, (1, 600))
    expected = {}
    for model_type, kwargs in ARCH_KWARGS.items():
        model = tiny_model(model_type, **kwargs)
        apply_rope_scaling(model, "yarn", factor=4)
        with torch.no_grad():
            expected[model_type] = model(ids).logits
        model.save_pretrained(tmp_path / model_type)
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
out = {{}}
for name in {list(ARCH_KWARGS)!r}:
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + name, attn_implementation='sdpa').eval()
    with torch.no_grad():
        out[name] = model(ids).logits
torch.save(out, {str(tmp_path / 'out.pt')!r})
assert 'yarnkit' not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    reloaded = torch.load(tmp_path / "out.pt", weights_only=True)
    for model_type, logits in expected.items():
        torch.testing.assert_close(reloaded[model_type], logits, rtol=0, atol=1e-5, msg=model_type)
    saved = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "yarn"
    assert saved["rope_parameters"]["original_max_position_embeddings"] == NATIVE
    assert saved["max_position_embeddings"] == 4 * NATIVE


def test_config_only_patch_then_load():
    config = tiny_config("llama")
    handle = apply_rope_scaling(config, "yarn", factor=8, beta_fast=16)
    assert config.rope_parameters["beta_fast"] == 16 and handle.describe()["rotary_modules_rebuilt"] == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(rope.yarn_get_mscale(8))


def test_apply_yarn_is_the_recipe_section_applied_once():
    """factor 1 is off (the config is untouched), below 1 is refused, above 1 is `apply_rope_scaling`'s result."""
    config = tiny_config("llama")
    before = dict(config.rope_parameters)
    assert apply_yarn(config, YarnArgs(factor=1.0)) is None and config.rope_parameters == before
    with pytest.raises(RecipeError, match=r"yarn\.factor=0\.5 < 1"):
        apply_yarn(config, YarnArgs(factor=0.5))
    handle = apply_yarn(config, YarnArgs(factor=8, beta_fast=16, original_max_position_embeddings=256))
    reference = apply_rope_scaling(tiny_config("llama"), "yarn", factor=8, beta_fast=16,
                                   original_max_position_embeddings=256)
    assert config.rope_parameters == reference.config.rope_parameters and handle.factor == 8.0


def test_a_saved_yarn_section_reads_back_typed():
    yarn = read_yarn_args({"factor": 8, "rope_type": "yarn", "beta_fast": 16})
    assert isinstance(yarn, YarnArgs) and yarn.factor == 8.0 and isinstance(yarn.factor, float)
    assert read_yarn_args(None) == YarnArgs()
    with pytest.raises(RecipeError, match=r"yarn\.facter"):
        read_yarn_args({"facter": 8})
    with pytest.raises(RecipeError, match=r"yarn\.factor"):
        read_yarn_args({"factor": "eight"})


def test_unlisted_architecture_config_fallback():
    config = tiny_config("gpt_neox", rotary_pct=0.5)
    with pytest.raises(RopeScalingError, match=r"'gpt_neox' is not in yarnkit's architecture table.*llama.*allow_unlisted"):
        apply_rope_scaling(config, "yarn", factor=4)
    apply_rope_scaling(config, "yarn", factor=4, allow_unlisted=True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    cos, _ = model.gpt_neox.rotary_emb(torch.zeros(1), torch.arange(500)[None])
    exp_cos, _ = rope.cos_sin(*rope.compute_inv_freq(config.rope_parameters, 16, config.max_position_embeddings)[:1],
                              torch.arange(500)[None], rope.yarn_get_mscale(4))
    assert cos.shape[-1] == 8  # half of head_dim 16 is rotated
    torch.testing.assert_close(cos.double(), exp_cos, rtol=0, atol=ANGLE_ATOL)


@pytest.mark.parametrize("factor", [1, 0.5, -2, "4"])
def test_factor_must_exceed_one(factor):
    with pytest.raises(RopeScalingError, match="factor must be a number > 1"):
        apply_rope_scaling(tiny_config("llama"), "yarn", factor=factor)


def test_patching_twice_is_refused_and_replace_rescales():
    model = tiny_model("llama")
    apply_rope_scaling(model, "yarn", factor=2)
    with pytest.raises(RopeScalingError, match="already uses rope_type 'yarn'.*replace=True"):
        apply_rope_scaling(model, "yarn", factor=4)
    handle = apply_rope_scaling(model, "yarn", factor=4, replace=True)
    assert handle.original_max_position_embeddings == NATIVE  # relative to the recorded native context
    assert model.config.max_position_embeddings == 4 * NATIVE


def test_missing_original_length_is_named():
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(RopeScalingError, match="records no original_max_position_embeddings"):
        apply_rope_scaling(config, "yarn", factor=4, replace=True)
    apply_rope_scaling(config, "yarn", factor=4, replace=True, original_max_position_embeddings=128)
    assert config.max_position_embeddings == 512


def test_non_rope_model_is_refused():
    config = tiny_config("gpt2", n_embd=64, n_layer=2, n_head=4)
    with pytest.raises(RopeScalingError, match="does not use RoPE"):
        apply_rope_scaling(config, "yarn", factor=4, allow_unlisted=True)


def test_unknown_rope_type_and_stray_parameters():
    with pytest.raises(RopeScalingError, match="did you mean 'yarn'"):
        apply_rope_scaling(tiny_config("llama"), "yarm", factor=4)
    with pytest.raises(RopeScalingError, match=r"\['beta_fast'\] do not apply to rope_type 'linear'"):
        apply_rope_scaling(tiny_config("llama"), "linear", factor=4, beta_fast=8)


def test_phi3_refuses_dynamic_types():
    with pytest.raises(RopeScalingError, match="only stores static scalings"):
        apply_rope_scaling(tiny_config("phi3", **ARCH_KWARGS["phi3"]), "dynamic", factor=4)
