"""Checkpoints of a run directory: `RUN/checkpoints/step_000400/{model,state,recipe.yaml}`, written atomically.

    model/   HF `save_pretrained` output with full weights (ZeRO-3 gathered) and the YaRN config, plus tokenizer
             files; for LoRA runs peft's `adapter_model.safetensors` + `adapter_config.json`
    state/   accelerate `save_state` (model, optimizer, scheduler, RNG of every process; DeepSpeed shards under
             ZeRO) and `trainer_state.json` (step, samples_seen = data position, tokens_seen)

Under `train.mixed_precision=bf16-weights` the trainer swaps the float32 masters into the module around the save
and the load (`yarnkit.train.master_weights`), so `model/` and `state/` hold float32 weights as in any other run.

Every process writes into `checkpoints/.tmp-step_NNNNNN`; once all are done, rank 0 renames it to `step_NNNNNN`
and prunes to the newest `keep_last`. The layout and the resolver of "newest complete checkpoint" that every
entry point calls are `yarnkit.runs`.
Safety: accelerate loads optimizer/RNG files with `weights_only=True`
(DeepSpeed's own shard loader unpickles: resume only from your own runs). Tested by
`python -m pytest tests/test_trainer.py -k resume`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from yarnkit.errors import NotFound
from yarnkit.quiet import tied_weights_notice
from yarnkit.runs import MODEL_DIR, RECIPE_FILE, STATE_DIR, TMP_PREFIX, TRAINER_STATE, list_checkpoints, step_dir


@dataclass
class CheckpointArgs:
    every: int = 100  # save every N optimizer steps (and always after the last); 0 = only after the last
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    save_final: bool = True  # false: no checkpoint after the last step either (throughput benchmarks)


def save_checkpoint(accelerator, wrapper, tokenizer, run_dir: str | Path, step: int, trainer_state: dict,
                    recipe_yaml: str, keep_last: int) -> Path:
    """Collective: every process must call it. Returns the final checkpoint path."""
    final = step_dir(run_dir, step)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with tied_weights_notice(accelerator.unwrap_model(wrapper)):  # tied head + embedding: one copy is stored
        accelerator.save_state(str(tmp / STATE_DIR))
    accelerator.wait_for_everyone()  # every process's files (RNG state, ZeRO shard) are in tmp before the rename
    full_state = accelerator.get_state_dict(wrapper)  # gathers ZeRO-3 shards (collective)
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(wrapper).model
        weights = {k.removeprefix("model."): v for k, v in full_state.items()}
        inner.save_pretrained(tmp / MODEL_DIR, state_dict=weights, safe_serialization=True)
        if hasattr(inner, "get_base_model") and getattr(inner.config, "yarnkit_sink_token_id", None) is not None:
            inner.get_base_model().config.save_pretrained(tmp / MODEL_DIR)  # LoRA: resized vocab + sink id for export
        tokenizer.save_pretrained(tmp / MODEL_DIR)
        (tmp / STATE_DIR / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        (tmp / RECIPE_FILE).write_text(recipe_yaml)
        if final.exists():  # re-running a step after a resume from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore model/optimizer/scheduler/RNG into the prepared objects; returns the trainer state dict."""
    path = Path(path)
    state_file = path / STATE_DIR / TRAINER_STATE
    if not state_file.is_file():
        raise NotFound(f"{path} is not a complete checkpoint (missing {state_file})",
                       "resume from another checkpoints/step_* folder, or set resume=none with a new run_dir")
    accelerator.load_state(str(path / STATE_DIR))
    return json.loads(state_file.read_text())
