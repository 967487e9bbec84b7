"""`yarnkit export` to HF format: round trips on a tiny YaRN Llama in the trainer's run layout, LoRA merging,
vLLM's reading of the config, the model card, and bad input (each error names the problem and the fix).

    python -m pytest tests/test_export.py -q          # add -m "not slow" to skip the real SmolLM2 round trip

Tolerances: logits are compared as max |Δ| / max |logit|: fp32 ≤ 1e-4 (only summation order may differ), bf16 ≤
2e-2. The in-memory reference is the model the trainer saved; the exported folder is loaded by plain
transformers in a fresh process that asserts yarnkit was never imported.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from export_fixtures import YARN, make_run, tiny_bpe_tokenizer, tiny_yarn_model  # noqa: E402

from yarnkit.export import rope_keys, verify  # noqa: E402
from yarnkit.export.cli import export  # noqa: E402
from yarnkit.export.source import find_export_source  # noqa: E402
from yarnkit.errors import ExportError
from yarnkit.model_files import user_umask  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """One full export of a fake run (fp32, verification on); shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("hf")
    model = tiny_yarn_model()
    model.config.yarnkit_sink_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.config.use_cache = False  # as the trainer saves it
    run = make_run(root, model, tokenizer)
    out = root / "export"
    report = export(run, out)
    return model, out, report


def test_round_trip_matches_in_a_fresh_plain_transformers_process(exported):
    _, out, report = exported
    check = report["hf_check"]
    assert check["passed"] and check["max_relative_difference"] <= 1e-4
    assert check["prompt_tokens"] == 256 + 64  # longer than the original context, so YaRN's scaling is exercised
    assert "yarnkit not imported" in check["loader"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "recipe.yaml",
            "README.md", "export_report.json"} <= names
    assert not any(p.name.startswith(".export.tmp-") for p in out.parent.iterdir())


def test_exported_config_carries_yarn_for_v5_v4_and_vllm(exported):
    _, out, report = exported
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"] == YARN
    assert config["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 256}
    assert config["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 1024
    assert config["yarnkit_sink_token_id"] == 0 and config["use_cache"] is True
    assert report["config_check"]["vllm_max_model_len"] == 1024 and report["config_check"]["warnings"] == []
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(out)  # stock transformers reads both blocks into one consistent dict
    assert {k: loaded.rope_parameters[k] for k in YARN} == YARN


def test_verification_fails_when_the_config_loses_yarn_or_a_weight_changes(exported, tmp_path, tokenizer):
    """The check can fail on both sides: YaRN dropped from config.json is caught in the RoPE stock transformers
    builds (the rope keys it reads back, inv_freq, attention scaling); one changed weight, in the logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    model, out, _ = exported
    ids = verify.prompt_ids(tokenizer, 320, model.config.vocab_size)
    no_yarn = tmp_path / "no-yarn"
    shutil.copytree(out, no_yarn)
    config = json.loads((no_yarn / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config["rope_scaling"] = None
    (no_yarn / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="different RoPE.*rope_parameters.rope_type='default' .the model has 'yarn'"):
        verify.verify_hf(no_yarn, model, ids)
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    weights = load_file(edited / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"] *= 1.5
    save_file(weights, edited / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="max relative logit difference"):
        verify.verify_hf(edited, model, ids)


def test_model_card_has_recipe_yarn_eval_table_plot_and_load_commands(exported):
    _, out, _ = exported
    card = (out / "README.md").read_text()
    assert "x4, 256 -> 1024 tokens" in card
    assert "| length | ppl |" in card and "| 1024 | 39.8 |" in card
    assert "![perplexity](eval/perplexity.png)" in card and (out / "eval" / "perplexity.png").is_file()
    assert card.startswith("---\nlibrary_name: transformers\n") and "base_model" not in card.split("---")[1]
    assert "vllm serve" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "bundled:train" in card  # training data from the recipe


def test_bf16_export_within_bf16_tolerance(tmp_path, tokenizer):
    run = make_run(tmp_path, tiny_yarn_model(seed=1), tokenizer, with_eval=False)
    report = export(run, tmp_path / "bf16", dtype="bfloat16")
    assert report["hf_check"]["dtype"] == "bfloat16" and report["hf_check"]["max_relative_difference"] <= 2e-2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_an_unscaled_model_is_checked_within_its_context(tmp_path, tokenizer):
    """A model without RoPE scaling (the bundled SmolLM2 as shipped) exports with the default checks: they compare
    logits on its whole native context, not on 64 tokens past it (which the context check refuses)."""
    from conftest import tiny_model
    from export_fixtures import VOCAB

    model = tiny_model("llama", vocab_size=VOCAB)
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    report = export(tmp_path / "plain", tmp_path / "out")
    assert report["rope_parameters"]["rope_type"] == "default" and report["max_position_embeddings"] == 256
    assert report["hf_check"]["passed"] and report["hf_check"]["prompt_tokens"] == 256


def test_lora_run_is_merged_and_matches_the_unmerged_adapter(tmp_path, tokenizer):
    from peft import PeftModel

    base = tiny_yarn_model(seed=2)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    run = make_run(tmp_path, copy.deepcopy(base), tokenizer, lora=True, base_dir=base_dir, with_eval=False)
    with pytest.raises(ExportError, match="--merge-lora"):
        export(run, tmp_path / "no-merge")
    report = export(run, tmp_path / "merged", merge_lora=True)
    assert report["hf_check"]["passed"] and any("LoRA adapter merged" in n for n in report["notes"])
    adapter = PeftModel.from_pretrained(base, str(run / "checkpoints/step_000400/model")).eval()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 384, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = verify.max_relative_difference(adapter(ids).logits, merged(ids).logits)
    assert difference <= 1e-4  # merging is exact up to fp32 rounding


def test_lora_adapter_without_config_takes_yarn_from_the_recipe(tmp_path, tokenizer):
    """peft saves no config.json: the base model's config gets the recipe's `yarn` section, as in training."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = tiny_yarn_model(seed=3)
    base_dir = tmp_path / "base"
    plain = copy.deepcopy(trained)
    plain.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain.config.max_position_embeddings = 256
    plain.save_pretrained(base_dir)  # the base model on disk has no scaling; the recipe asks for YaRN x4
    tokenizer.save_pretrained(base_dir)
    run = make_run(tmp_path, copy.deepcopy(trained), tokenizer, lora=True, base_dir=base_dir, with_eval=False,
                   adapter_config_json=False)
    report = export(run, tmp_path / "merged", merge_lora=True, run_checks=False)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["rope_parameters"] == YARN
    assert any("recipe's yarn section" in n for n in report["notes"])
    adapter = PeftModel.from_pretrained(trained, str(run / "checkpoints/step_000400/model")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 384, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert verify.max_relative_difference(adapter(ids).logits, merged(ids).logits) <= 1e-4


def test_dynamic_yarn_checkpoint_exports_as_static_yarn_with_identical_logits(tmp_path, tokenizer):
    """Trained with yarnkit's dynamic_yarn (finetuned: the scale never drops below the factor): up to
    factor × original tokens it equals static YaRN, so the export must reproduce its logits."""
    from transformers import AutoModelForCausalLM

    model = tiny_yarn_model(seed=4, rope={**YARN, "rope_type": "dynamic_yarn", "finetuned": True})
    run = make_run(tmp_path, model, tokenizer, with_eval=False)
    report = export(run, tmp_path / "static", run_checks=False)  # compared below against the dynamic model itself
    assert report["rope_parameters"] == YARN and "dynamic_yarn exported as static yarn" in report["notes"][0]
    assert "dynamic_yarn" in (tmp_path / "static" / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "static").eval()
    ids = torch.randint(0, 384, (1, 600), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert verify.max_relative_difference(model(ids).logits, loaded(ids).logits) <= 1e-4


def test_lora_without_a_base_model_is_refused(tmp_path, tokenizer):
    run = make_run(tmp_path, tiny_yarn_model(), tokenizer, lora=True, base_dir=None, with_eval=False)
    (run / "checkpoints/step_000400/recipe.yaml").write_text("model: {}\n")
    adapter_config = run / "checkpoints/step_000400/model/adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(ExportError, match="no base model is named.*model.name_or_path"):
        find_export_source(run)


@pytest.fixture
def small_run(tmp_path, tokenizer):
    return make_run(tmp_path, tiny_yarn_model(), tokenizer, with_eval=False)


def test_newest_complete_checkpoint_is_chosen(small_run):
    newer = small_run / "checkpoints" / "step_000800"
    (small_run / "checkpoints" / ".step_000900.tmp").mkdir()  # a save in progress is ignored
    import shutil

    shutil.copytree(small_run / "checkpoints" / "step_000400", newer)
    assert find_export_source(small_run).model_dir == newer / "model"


def test_run_without_a_finished_checkpoint(tmp_path):
    from yarnkit.errors import CheckpointError

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="without a finished checkpoint"):
        find_export_source(tmp_path / "run")


def test_truncated_and_missing_weights_name_the_file(small_run):
    weights = small_run / "checkpoints/step_000400/model/model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=f"truncated weights {weights}"):
        find_export_source(small_run)
    weights.unlink()
    (weights.parent / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ExportError, match="missing weight shard .*model-00001-of-00002.safetensors"):
        find_export_source(small_run)


def test_existing_output_needs_overwrite_and_failures_leave_nothing(small_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty — pass --overwrite"):
        export(small_run, out, run_checks=False)
    with pytest.raises(ExportError, match="is not a yarnkit export .no export_report.json.; it holds keep.txt"):
        export(small_run, out, overwrite=True, run_checks=False)  # --overwrite never deletes a user's own files
    assert (out / "keep.txt").read_text() == "user data"

    def fail(*args, **kwargs):
        raise ExportError("simulated failure while verifying")

    monkeypatch.setattr(verify, "verify_hf", fail)
    with pytest.raises(ExportError, match="simulated"):
        export(small_run, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    (out / "keep.txt").unlink()
    export(small_run, out, run_checks=False)
    (out / "stale.txt").write_text("left by the earlier export")
    export(small_run, out, overwrite=True, run_checks=False)  # an earlier export is replaced whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~user_umask())  # mkdtemp's 0700 is not kept


def test_raw_deepspeed_checkpoint_without_deepspeed_fails_clearly(small_run, monkeypatch):
    model_dir = small_run / "checkpoints/step_000400/model"
    (model_dir / "model.safetensors").unlink()
    (model_dir / "global_step400").mkdir()
    (model_dir / "global_step400" / "mp_rank_00_model_states.pt").write_bytes(b"")
    source = find_export_source(small_run)
    assert source.deepspeed_dir == model_dir
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)  # import fails
    from yarnkit.export.hf import load_for_export

    with pytest.raises(ExportError, match="raw DeepSpeed ZeRO checkpoint and deepspeed is not importable"):
        load_for_export(source)


def test_zero_shards_need_a_deepspeed_checkpoint_and_strip_the_trainer_wrapper(small_run):
    from yarnkit.export.hf import _without_wrapper_prefix

    with pytest.raises(ExportError, match="--zero-shards needs a yarnkit checkpoint of a DeepSpeed ZeRO run"):
        find_export_source(small_run, zero_shards=True)
    state = small_run / "checkpoints/step_000400/state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "latest").write_text("pytorch_model")  # where accelerate.save_state puts DeepSpeed's shards
    assert find_export_source(small_run, zero_shards=True).deepspeed_dir == state
    expected = {"model.embed_tokens.weight", "lm_head.weight"}
    wrapped = {"model.model.embed_tokens.weight": 1, "model.lm_head.weight": 2}  # CausalLMLoss around the LM
    assert _without_wrapper_prefix(wrapped, expected) == {"model.embed_tokens.weight": 1, "lm_head.weight": 2}
    plain = {"model.embed_tokens.weight": 1, "lm_head.weight": 2}  # another trainer's folder: unchanged
    assert _without_wrapper_prefix(plain, expected) is plain


def test_dynamic_yarn_becomes_static_yarn_at_the_trained_factor():
    params, notes = rope_keys.export_rope_parameters({**YARN, "rope_type": "dynamic_yarn", "finetuned": True})
    assert params == YARN and "static yarn at its trained factor 4.0" in notes[0]
    with pytest.raises(ExportError, match="no original_max_position_embeddings .* — set rope_parameters"):
        rope_keys.export_rope_parameters({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})


def _vllm_config(**changes) -> dict:
    config = {"max_position_embeddings": 1024, "rope_parameters": dict(YARN),
              **rope_keys.legacy_rope_keys(YARN)}
    config.update(changes)
    return config


def test_vllm_key_check_accepts_the_export_and_rejects_what_vllm_misreads():
    assert rope_keys.check_vllm_rope(_vllm_config()) == ([], [])
    assert rope_keys.vllm_max_model_len(_vllm_config()) == 1024
    doubly_scaled = _vllm_config(max_position_embeddings=4096)
    assert any("should be factor × original = 1024" in e for e in rope_keys.check_vllm_rope(doubly_scaled)[0])
    int_factor = _vllm_config(rope_scaling={**rope_keys.legacy_rope_keys(YARN)["rope_scaling"], "factor": 4})
    assert any("factor must be a float" in e for e in rope_keys.check_vllm_rope(int_factor)[0])
    no_legacy = _vllm_config(rope_scaling=None)
    assert "rope_scaling block missing" in rope_keys.check_vllm_rope(no_legacy)[0][0]
    custom = {**YARN, "attention_factor": 1.2, "truncate": False}
    errors, warnings = rope_keys.check_vllm_rope(_vllm_config(rope_parameters=custom, **rope_keys.legacy_rope_keys(custom)))
    assert errors == [] and len(warnings) == 1 and "PR #28244" in warnings[0]


def test_cli_help_run_and_bad_input_exit_code(small_run, tmp_path, capsys):
    from yarnkit.cli import main

    assert main(["export", str(small_run), "--out", str(tmp_path / "cli"), "--no-verify", "--dtype", "float16"]) == 0
    assert "exported to" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["dtype"] == "float16"

    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0 and "--push-to-hub" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "export source not found" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_yarn_x4_round_trip(tmp_path, smollm2):
    """The real SmolLM2-135M with YaRN x4 set through its config, exported and reloaded by plain transformers.
    A 1024-token prompt keeps this near 30 s on 2 cores: YaRN changes the rotation of every position and the
    attention scale, so a lost or wrong YaRN config shows at any length (the tiny tests cover > original)."""
    from yarnkit.patch import apply_rope_scaling

    model, tokenizer = smollm2
    yarn_model = copy.deepcopy(model)
    apply_rope_scaling(yarn_model, "yarn", factor=4.0)  # 8192 -> 32768
    run = make_run(tmp_path, yarn_model, tokenizer, with_eval=False)
    report = export(run, tmp_path / "smollm2-yarn", verify_tokens=1024)
    assert report["hf_check"]["max_relative_difference"] <= 1e-4
    assert report["config_check"]["vllm_max_model_len"] == 32768
