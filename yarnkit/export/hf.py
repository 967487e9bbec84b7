"""Load the model to export (full weights, LoRA merged into its base, or a raw DeepSpeed ZeRO folder) and write it
as a plain Hugging Face folder: safetensors shards, a config with static RoPE keys for every loader, the
tokenizer, `generation_config.json` and the resolved recipe.

Not here: finding the checkpoint (`source.py`), checking the written folder (`verify.py`), GGUF (`gguf.py`).
Tested by tests/test_export.py (`python -m pytest tests/test_export.py -q`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from yarnkit.export import rope_keys
from yarnkit.export.source import ExportSource
from yarnkit.errors import ExportError
from yarnkit.patch import apply_yarn, rebuild_rotary_modules, register_rope_types

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _torch_dtype(name: str | None, config) -> torch.dtype:
    from yarnkit.models import to_dtype

    if name in (None, "auto"):
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return to_dtype(str(saved).replace("torch.", "")) if saved else torch.float32
    return to_dtype(name)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def check_rope_config(source: ExportSource) -> None:
    """Refuse, before any weight is loaded, a RoPE setting in the source's config.json that stock loaders would
    read differently (`rope_keys.export_rope_parameters` raises with the key and the fix). The raw JSON is read,
    as a stock loader would see it: a legacy `rope_scaling` block replaces `rope_parameters`."""
    path = source.model_dir / "config.json"
    if not path.is_file():
        return  # a LoRA adapter without config.json: its recipe's scaling is checked once applied
    raw = json.loads(path.read_text())
    rope = raw.get("rope_scaling") or raw.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        rope = dict(rope)
        if not rope_keys.is_per_layer_type(rope):
            rope.setdefault("rope_type", rope.get("type", "default"))
        rope_keys.export_rope_parameters(rope)


def load_for_export(source: ExportSource, dtype: str | None = "auto", merge_lora: bool = True):
    """`(model, tokenizer, notes)` in eval mode on CPU; LoRA adapters are merged (`merge_and_unload`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from yarnkit.model_files import local_hf_dir

    register_rope_types()  # checkpoints trained with dynamic_yarn load (prepare_for_inference makes it static)
    notes: list[str] = []
    if source.is_lora:
        if not merge_lora:
            raise ExportError(f"{source.model_dir} is a LoRA adapter: pass --merge-lora to export a standalone model "
                              "(stock loaders and GGUF need merged weights)")
        base_dir = local_hf_dir(source.base_model)
        config = _lora_config(source, base_dir, notes)
        trained_vocab, base_vocab = config.vocab_size, AutoConfig.from_pretrained(base_dir).vocab_size
        config.vocab_size = base_vocab  # a sink-token run grew the vocabulary: load the base, then resize
        model = AutoModelForCausalLM.from_pretrained(base_dir, config=config, dtype=torch.float32, use_safetensors=True)
        if trained_vocab != base_vocab:
            from yarnkit.sink_token import grow_vocabulary

            grow_vocabulary(model, trained_vocab)  # the rows the trainer started from; the adapter holds trained ones
            notes.append(f"vocabulary resized {base_vocab} -> {trained_vocab} (sink token) before merging")
        from peft import PeftModel

        # merged in float32, then cast: merging in bf16 would round the sum W + BA once more
        model = PeftModel.from_pretrained(model, str(source.model_dir)).merge_and_unload()
        model = cast_weights(model, _torch_dtype(dtype, config))
        notes.append(f"LoRA adapter merged into base model {source.base_model}")
        tokenizer_dir = source.model_dir if _has_tokenizer(source.model_dir) else Path(base_dir)
    elif source.deepspeed_dir is not None:
        model = _gather_deepspeed(source, dtype)
        notes.append(f"gathered from the DeepSpeed ZeRO checkpoint {source.deepspeed_dir}")
        tokenizer_dir = source.model_dir
    else:
        config = AutoConfig.from_pretrained(source.model_dir)
        model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype=_torch_dtype(dtype, config),
                                                     use_safetensors=True)
        tokenizer_dir = source.model_dir
    if not _has_tokenizer(tokenizer_dir):
        raise ExportError(f"no tokenizer files in {tokenizer_dir} (looked for {', '.join(TOKENIZER_FILES)}); save the "
                          "tokenizer there with `tokenizer.save_pretrained(...)`")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model.eval(), tokenizer, notes


def _lora_config(source: ExportSource, base_dir: str, notes: list[str]):
    """The trained config: the adapter folder's config.json, else the base config with the recipe's `yarn`
    section applied again (what yarnkit's trainer does before loading the base weights)."""
    from transformers import AutoConfig

    if (source.model_dir / "config.json").is_file():
        return AutoConfig.from_pretrained(source.model_dir)
    config = AutoConfig.from_pretrained(base_dir)
    if apply_yarn(config, source.yarn_args()) is not None:  # the same function the trainer applied
        notes.append(f"RoPE scaling taken from the recipe's yarn section ({source.recipe_path})")
    return config


def _gather_deepspeed(source: ExportSource, dtype: str | None):
    """Full fp32 weights from ZeRO shards via deepspeed's zero_to_fp32 (DeepSpeed's format is pickled: only
    export your own checkpoints this way)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:
        raise ExportError(f"{source.deepspeed_dir} is a raw DeepSpeed ZeRO checkpoint and deepspeed is not importable "
                          f"({error}); install deepspeed, or export the trainer's gathered `model/` folder") from error
    config = AutoConfig.from_pretrained(source.model_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(str(source.deepspeed_dir))
    model = AutoModelForCausalLM.from_config(config)
    state = _without_wrapper_prefix(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", ())]
    if missing or unexpected:
        raise ExportError(f"DeepSpeed state in {source.deepspeed_dir} does not match config.json: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return cast_weights(model, _torch_dtype(dtype, config))


def cast_weights(model, dtype: torch.dtype):
    """`model.to(dtype)` with the rotary `inv_freq` kept in float32, as transformers' `from_pretrained(dtype=...)`
    keeps it: a model-wide cast would round it (bf16: up to 2^-9 relative, radians of error at 64k positions)."""
    model = model.to(dtype)
    if dtype != torch.float32:
        rebuild_rotary_modules(model)
    return model


def _without_wrapper_prefix(state: dict, expected: set[str], prefix: str = "model.") -> dict:
    """yarnkit's trainer hands DeepSpeed its loss wrapper (`yarnkit.train.loss.CausalLMLoss`, the LM under
    `.model`), so its shards name `model.model.layers...`, `model.lm_head...`: drop that one prefix when every key
    has it and the stripped names are the model's. Folders from other trainers pass through unchanged."""
    if set(state) <= expected or not all(key.startswith(prefix) for key in state):
        return state
    stripped = {key.removeprefix(prefix): value for key, value in state.items()}
    return stripped if set(stripped) <= expected else state


def prepare_for_inference(model, tokenizer=None) -> list[str]:
    """Rewrite `model.config` for serving: stock-loader RoPE (`rope_keys.export_rope_parameters`: dynamic_yarn →
    yarn, a setting loaders would read differently refused), max_position_embeddings = factor × original for yarn,
    the KV cache back on (trainers turn it off), the tokenizer's `model_max_length` at least that context (vLLM
    and transformers cap prompts by it); the rotary modules are rebuilt so the in-memory model computes what is
    exported."""
    config = model.config
    notes = []
    if getattr(config, "use_cache", True) is False:
        config.use_cache = True
        notes.append("use_cache set back to true (it was turned off for training)")
    exported, rope_notes = rope_keys.export_rope_parameters(dict(config.rope_parameters))
    notes += rope_notes
    if exported != config.rope_parameters:
        config.rope_parameters = exported
        rebuild_rotary_modules(model)
    scaled = rope_keys.scaled_max_positions(exported)
    if scaled is not None and config.max_position_embeddings != scaled:
        notes.append(f"max_position_embeddings set to factor × original = {scaled} "
                     f"(was {config.max_position_embeddings})")
        config.max_position_embeddings = scaled
    if tokenizer is not None and tokenizer.model_max_length < config.max_position_embeddings:
        notes.append(f"tokenizer model_max_length raised from {tokenizer.model_max_length} to "
                     f"{config.max_position_embeddings}, the extended context")
        tokenizer.model_max_length = config.max_position_embeddings
    return notes


def write_hf(model, tokenizer, out: Path, recipe_path: Path | None, max_shard_size: str = "2GB") -> None:
    """Write weights, config (with the legacy RoPE block added), tokenizer, generation config and recipe."""
    from transformers import GenerationConfig

    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.update(rope_keys.legacy_rope_keys(config["rope_parameters"]))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(out)
    if recipe_path is not None:
        shutil.copyfile(recipe_path, out / "recipe.yaml")
