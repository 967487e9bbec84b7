"""Every RoPE setting a recipe can train, exported and read back alike by the stock loaders: transformers in a
fresh process (no yarnkit import), both vLLM readings of the keys, and refusals for what they would misread.

    python -m pytest tests/test_export_rope.py -q

Per setting (SETTINGS: factor 8, 10 and 12, a non-integer factor and a non-integer factor × original, another
original context, betas, attention factor 1.0 and 1.3, an untruncated ramp, an mscale pair), a tiny random Llama
with the scaling applied by `apply_rope_scaling` (as in training) goes through `yarnkit export` with verification
on. Its fresh `python -I` process loads the folder with plain transformers; the test then asserts what that stock
reading returned: original_max_position_embeddings, factor, betas and truncate equal to the trained config's, the
attention scaling equal to the YaRN formula computed here (explicit value, else (0.1·m·ln s + 1) / (0.1·m_all·ln
s + 1), else 0.1·ln s + 1; float64, 1e-12), `inv_freq` float32 and equal to the trained model's (1e-6, in the
export's check), and logits within fp32 1e-4 on a prompt past the original context. From the written config.json:
vLLM before PR #56446 (`attn_factor` × (0.1·ln s + 1)) and from it (`attention_factor`) get that same factor, and
both derive max_model_len = max_position_embeddings = ⌊factor × original⌋.

transformers v4 (optional, `YARNKIT_TRANSFORMERS_V4=DIR` with transformers 4.x installed there): the same export,
`attn_factor` included, reads back with the same attention scaling and logits (4.57.6: difference 0.0).

bf16: `from_pretrained(dtype=bfloat16)` keeps inv_freq in float32 and a model-wide `.to(bfloat16)` rounds it
(transformers 5.25, checked here); the export's own casts (LoRA merge, ZeRO gather: `hf.cast_weights`) keep it
float32, and a bf16 LoRA export reloads within the bf16 tolerance with float32 inv_freq on both sides.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from export_fixtures import YARN, make_run, tiny_bpe_tokenizer, tiny_yarn_model  # noqa: E402

from yarnkit.export import hf, rope_keys  # noqa: E402
from yarnkit.export.cli import export  # noqa: E402
from yarnkit.errors import ExportError  # noqa: E402

SETTINGS = {  # on top of YaRN from the tiny model's native 256 tokens
    "x8": {"factor": 8.0},
    "x10-beta_slow2-attention1.3": {"factor": 10.0, "beta_slow": 2.0, "attention_factor": 1.3},
    "x12-betas16-2": {"factor": 12.0, "beta_fast": 16.0, "beta_slow": 2.0},
    "x2.5-original128": {"factor": 2.5, "original_max_position_embeddings": 128},
    "x3.3-non-integer-context": {"factor": 3.3},  # 256 × 3.3 = 844.8 tokens
    "x4-attention1.0-untruncated": {"factor": 4.0, "attention_factor": 1.0, "truncate": False},
    "x4-mscale-pair": {"factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0},
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


def yarn_attention(setting: dict) -> float:
    """The YaRN paper's temperature with transformers' overrides, written out here as an independent reference."""
    s = setting["factor"]
    if "attention_factor" in setting:
        return setting["attention_factor"]
    if setting.get("mscale") and setting.get("mscale_all_dim"):
        return (0.1 * setting["mscale"] * math.log(s) + 1) / (0.1 * setting["mscale_all_dim"] * math.log(s) + 1)
    return 0.1 * math.log(s) + 1


@pytest.mark.parametrize("name", list(SETTINGS))
def test_stock_transformers_and_vllm_read_the_trained_rope(tmp_path, tokenizer, name):
    setting = {**YARN, **SETTINGS[name]}
    model = tiny_yarn_model(rope=setting)
    trained = dict(model.config.rope_parameters)
    report = export(make_run(tmp_path, model, tokenizer, with_eval=False), tmp_path / "out")

    check = report["hf_check"]  # the export's own fresh plain-transformers process
    assert check["passed"] and check["max_relative_difference"] <= 1e-4 and check["inv_freq_dtype"] == "float32"
    assert check["prompt_tokens"] == setting["original_max_position_embeddings"] + 64
    stock = check["stock_rope_parameters"]
    for key in ("rope_type", "original_max_position_embeddings", "factor", "beta_fast", "beta_slow", "truncate"):
        assert stock.get(key) == trained.get(key), key
    attention = yarn_attention(setting)
    assert check["stock_attention_scaling"]["0.attention_scaling"] == pytest.approx(attention, rel=1e-12)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    context = math.floor(setting["factor"] * setting["original_max_position_embeddings"] + 1e-9)
    assert config["max_position_embeddings"] == context
    legacy, v5 = config["rope_scaling"], config["rope_parameters"]
    before_56446 = (0.1 * math.log(legacy["factor"]) + 1) * legacy.get("attn_factor", 1.0)
    assert before_56446 == pytest.approx(attention, rel=1e-12)
    assert ("attn_factor" in legacy) == (not math.isclose(attention, 0.1 * math.log(setting["factor"]) + 1))
    assert "attn_factor" not in v5  # vLLM's legacy key stays out of transformers' v5 block
    from_56446 = v5.get("attention_factor", 0.1 * math.log(v5["factor"]) + 1)  # mscale pairs are made explicit
    assert from_56446 == pytest.approx(attention, rel=1e-12)
    errors, warnings = rope_keys.check_vllm_rope(config)
    assert errors == [] and report["config_check"]["vllm_max_model_len"] == context
    assert [rope_keys.vllm_max_model_len(config, aligned) for aligned in (False, True)] == [context, context]
    assert any("not an integer" in w for w in warnings) == (name == "x3.3-non-integer-context")


def test_check_vllm_rope_catches_what_either_vllm_would_read_differently():
    custom = {**YARN, "attention_factor": 1.3}
    config = {"max_position_embeddings": 1024, "rope_parameters": custom, **rope_keys.legacy_rope_keys(custom)}
    assert config["rope_scaling"]["attn_factor"] == pytest.approx(1.3 / (0.1 * math.log(4) + 1), rel=1e-12)
    assert rope_keys.check_vllm_rope(config) == ([], [])
    without = {**config, "rope_scaling": {k: v for k, v in config["rope_scaling"].items() if k != "attn_factor"}}
    errors, _ = rope_keys.check_vllm_rope(without)
    assert errors and "vLLM before PR #56446 would scale cos/sin by 1.13863" in errors[0]
    assert "attn_factor must be 1.14172" in errors[0]
    errors, _ = rope_keys.check_vllm_rope(config, tokenizer_max_length=256)  # tokenizer_config.json caps new vLLM
    assert errors == ["vLLM from PR #56446 would derive max_model_len=256, not 1024 (the tokenizer's "
                      "model_max_length caps it)"]
    assert rope_keys.legacy_rope_keys(YARN)["rope_scaling"].get("attn_factor") is None  # default: key left out


def test_settings_loaders_read_differently_are_refused_or_written_as_trained():
    for bad, named, fix in (
            ({"rope_type": "dynamic_yarn"}, "rope_type 'dynamic_yarn' with finetuned=false", "yarn.rope_type=yarn"),
            ({"beta_slow": -1.0}, "yarn.beta_slow=-1 is negative", "a positive number of rotations"),
            ({"truncate": "false"}, "truncate='false' is not true/false", "JSON boolean"),
            ({"attention_factor": "1.3"}, "attention_factor='1.3' is not a number", "as a number"),
            ({"rope_type": "longrope_v2"}, "'longrope_v2' has no stock-loader equivalent", "yarn.rope_type=yarn")):
        with pytest.raises(ExportError, match=f"{named}.* — .*{fix}"):
            rope_keys.export_rope_parameters({**YARN, **bad})
    params, notes = rope_keys.export_rope_parameters({**YARN, "beta_fast": 0, "beta_slow": 2})
    assert params["beta_fast"] == 32.0 and params["beta_slow"] == 2.0 and "beta_fast=0 written as 32.0" in notes[0]
    params, notes = rope_keys.export_rope_parameters({**YARN, "mscale": 0.707, "mscale_all_dim": 1.0})
    assert params["attention_factor"] == pytest.approx((0.0707 * math.log(4) + 1) / (0.1 * math.log(4) + 1))


def test_a_misread_setting_is_refused_before_any_weight_is_loaded(tmp_path, tokenizer):
    run = make_run(tmp_path, tiny_yarn_model(), tokenizer, with_eval=False)
    config_path = run / "checkpoints/step_000400/model/config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"]["truncate"] = "false"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="rope_parameters.truncate='false'"):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bf16_inv_freq_stays_float32_in_transformers_load_and_in_the_export_casts(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_yarn_model(rope={**YARN, "factor": 8.0})
    exact = model.model.rotary_emb.inv_freq.clone()
    model.save_pretrained(tmp_path / "fp32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32  # transformers keeps it...
    rounded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").to(torch.bfloat16).model.rotary_emb.inv_freq
    assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded.float(), exact)  # ...a model-wide cast not
    cast = hf.cast_weights(loaded.float(), torch.bfloat16)
    assert cast.model.norm.weight.dtype == torch.bfloat16
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32 and torch.equal(cast.model.rotary_emb.inv_freq, exact)


def test_bf16_lora_export_keeps_inv_freq_float32(tmp_path, tokenizer):
    """The LoRA path merges in float32 and casts with `cast_weights`: the in-memory reference and the stock
    reload both hold float32 inv_freq (the export's check fails otherwise)."""
    base = tiny_yarn_model(seed=5, rope={**YARN, "factor": 8.0})
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    run = make_run(tmp_path, base, tokenizer, lora=True, base_dir=tmp_path / "base", with_eval=False)
    report = export(run, tmp_path / "merged", merge_lora=True, dtype="bfloat16")
    check = report["hf_check"]
    assert check["dtype"] == "bfloat16" and check["inv_freq_dtype"] == "float32"
    assert check["max_relative_difference"] <= 2e-2


V4_CHILD = r"""
import sys, torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
folder, ids_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(load_file(ids_path)["ids"]).logits[0]
scaling = torch.tensor([model.model.rotary_emb.attention_scaling], dtype=torch.float64)
save_file({"logits": logits.contiguous(), "scaling": scaling}, out_path)
"""


@pytest.mark.skipif(not os.environ.get("YARNKIT_TRANSFORMERS_V4"),
                    reason="set YARNKIT_TRANSFORMERS_V4=DIR after `pip install --target DIR --no-deps "
                           "transformers==4.57.6 'huggingface_hub<1.0' 'tokenizers<0.23'`")
def test_transformers_v4_reads_the_same_rope(tmp_path, tokenizer):
    """transformers v4 reads `rope_scaling` (where `attn_factor` sits, unknown to it): same temperature, logits."""
    from safetensors.torch import load_file, save_file

    from yarnkit.export import verify

    setting = {**YARN, **SETTINGS["x10-beta_slow2-attention1.3"], "truncate": False}
    model = tiny_yarn_model(rope=setting)
    export(make_run(tmp_path, model, tokenizer, with_eval=False), tmp_path / "out", run_checks=False)
    ids = verify.prompt_ids(tokenizer, 320, 384)
    save_file({"ids": ids.contiguous()}, tmp_path / "ids.safetensors")
    env = {**os.environ, "PYTHONPATH": os.environ["YARNKIT_TRANSFORMERS_V4"]}
    done = subprocess.run([sys.executable, "-c", V4_CHILD, str(tmp_path / "out"), str(tmp_path / "ids.safetensors"),
                           str(tmp_path / "v4.safetensors")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "{'attn_factor'}" in done.stderr  # v4 names the key it does not know, and ignores it
    v4 = load_file(tmp_path / "v4.safetensors")
    assert float(v4["scaling"]) == pytest.approx(1.3, rel=1e-12)
    with torch.no_grad():
        assert verify.max_relative_difference(model(ids).logits[0], v4["logits"]) <= 1e-4
