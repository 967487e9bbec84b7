"""Find what to export: a training RUN dir, one checkpoint dir, or a plain HF model dir, checked for damage.

`find_export_source(path)` returns an `ExportSource` naming the weights folder, the recipe (if any), the run folder
(for its eval results) and, for LoRA runs, the base model. It only reads small files (JSON/YAML headers and
safetensors headers); it never loads weights. Bad input (no finished checkpoint, missing or truncated
safetensors, LoRA without a base model, a raw DeepSpeed folder) raises `ExportError` naming the path and the fix.
`zero_shards=True` (`yarnkit export --zero-shards`) names the DeepSpeed ZeRO shards of a yarnkit checkpoint
(`step_N/state/`, where `accelerator.save_state` puts them) as the weights to gather instead of `model/`: under
bf16 ZeRO the trainer's `model/` holds 16-bit copies, the shards the fp32 master weights.

Tested by tests/test_export.py (`python -m pytest tests/test_export.py -q`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from yarnkit import model_files
from yarnkit.errors import BadModel, ExportError
from yarnkit.patch import YarnArgs, read_yarn_args
from yarnkit.runs import find_checkpoint


@dataclass(frozen=True)
class ExportSource:
    model_dir: Path                 # HF weights (or a LoRA adapter) + config + tokenizer
    recipe_path: Path | None        # the resolved recipe.yaml, when the source is a run or checkpoint
    run_dir: Path | None            # the RUN dir (eval/ results live there), when known
    base_model: str | None          # for LoRA adapters: the base model from recipe `model.name_or_path`
    deepspeed_dir: Path | None = None  # a raw ZeRO checkpoint folder to gather (only when no safetensors)

    @property
    def is_lora(self) -> bool:
        return (self.model_dir / "adapter_config.json").is_file()

    def recipe(self) -> dict:
        if self.recipe_path is None:
            return {}
        return yaml.safe_load(self.recipe_path.read_text()) or {}

    def yarn_args(self) -> YarnArgs:
        """The recipe's `yarn` section, typed (defaults when there is no recipe): what the trainer applied."""
        return read_yarn_args(self.recipe().get("yarn"), str(self.recipe_path))


def check_safetensors(model_dir: Path) -> None:
    """Every weight file the folder promises exists and has a complete safetensors header."""
    if not any(model_dir.glob("*.safetensors")) and not (model_dir / "model.safetensors.index.json").is_file():
        raise ExportError(f"no *.safetensors weights in {model_dir}; export reads safetensors only "
                          "(re-save the model with `save_pretrained(..., safe_serialization=True)`)")
    _as_export_error(model_files.check_safetensors, model_dir)


def check_safetensors_file(path: Path) -> None:
    _as_export_error(model_files.check_safetensors_file, path)


def _as_export_error(check, path: Path) -> None:
    try:
        check(path)
    except BadModel as error:
        raise ExportError(str(error)) from error


def _find_recipe(*folders: Path) -> Path | None:
    for folder in folders:
        if folder is not None and (folder / "recipe.yaml").is_file():
            return folder / "recipe.yaml"
    return None


def _deepspeed_dir(folder: Path) -> Path | None:
    """A raw DeepSpeed ZeRO checkpoint: a `latest` tag file or `global_step*` folders with model states."""
    if (folder / "latest").is_file() or any(folder.glob("global_step*/*model_states.pt")):
        return folder
    return None


def _zero_shards_source(path: Path, checkpoint: Path | None, model_dir: Path, recipe_path: Path | None,
                        run_dir: Path | None) -> ExportSource:
    """The checkpoint's own ZeRO shards (`step_N/state/`, a DeepSpeed folder with a `latest` tag) as the source."""
    shards = _deepspeed_dir(checkpoint / "state") if checkpoint is not None else None
    if shards is None:
        raise ExportError(f"--zero-shards needs a yarnkit checkpoint of a DeepSpeed ZeRO run; {path} has no "
                          "checkpoints/step_N/state/latest", "drop --zero-shards to export its model/ folder")
    if (model_dir / "adapter_config.json").is_file():
        raise ExportError(f"--zero-shards: {checkpoint} holds a LoRA adapter, whose shards are not a full model",
                          "drop --zero-shards and export with --merge-lora")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"--zero-shards: no config.json in {model_dir} to rebuild the model from; the checkpoint "
                          "is partial")
    return ExportSource(model_dir, recipe_path, run_dir, None, deepspeed_dir=shards)


def find_export_source(path: str | Path, zero_shards: bool = False) -> ExportSource:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ExportError(f"export source not found: {path} (pass a RUN dir, a checkpoint dir or an HF model dir)")
    run_dir = None
    checkpoint = find_checkpoint(path)  # a RUN dir: its newest complete checkpoint
    if checkpoint is not None:
        run_dir, path = checkpoint.parent.parent, checkpoint
    model_dir = path / "model" if (path / "model").is_dir() else path
    recipe_path = _find_recipe(path, run_dir)
    if (model_dir / "config.json").is_file():
        model_files.check_config_file(model_dir / "config.json")
    if zero_shards:
        return _zero_shards_source(path, checkpoint, model_dir, recipe_path, run_dir)
    has_weights = any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").is_file()
    if not has_weights and not (model_dir / "adapter_config.json").is_file():
        ds_dir = _deepspeed_dir(model_dir) or _deepspeed_dir(path) or _deepspeed_dir(path / "state")
        if ds_dir is not None:
            if not (model_dir / "config.json").is_file():
                raise ExportError(f"raw DeepSpeed checkpoint {ds_dir} has no config.json beside it in {model_dir}")
            return ExportSource(model_dir, recipe_path, run_dir, None, deepspeed_dir=ds_dir)
        raise ExportError(f"no model weights in {model_dir}: expected *.safetensors (full model) or "
                          "adapter_config.json + adapter_model.safetensors (LoRA)",
                          "the checkpoint may be partial: export an earlier complete one, or copy the weights "
                          "beside config.json")
    if (model_dir / "adapter_config.json").is_file():
        if not (model_dir / "adapter_model.safetensors").is_file():
            raise ExportError(f"LoRA adapter weights missing: {model_dir / 'adapter_model.safetensors'}")
        check_safetensors_file(model_dir / "adapter_model.safetensors")
        source = ExportSource(model_dir, recipe_path, run_dir, None)
        base = ((source.recipe().get("model") or {}).get("name_or_path")
                or json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path"))
        if not base:
            raise ExportError(f"{model_dir} holds a LoRA adapter but no base model is named: set "
                              "`model.name_or_path` in recipe.yaml (or base_model_name_or_path in adapter_config.json)")
        return ExportSource(model_dir, recipe_path, run_dir, str(base))
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} has weights but no config.json; the checkpoint is partial")
    check_safetensors(model_dir)
    return ExportSource(model_dir, recipe_path, run_dir, None)
