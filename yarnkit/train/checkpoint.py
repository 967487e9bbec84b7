"""Checkpoints of a run directory: `RUN/checkpoints/step_000400/{model,state,recipe.yaml}`, written atomically.

    model/   HF `save_pretrained` output with full weights (ZeRO-3 gathered) and the YaRN config, plus tokenizer
             files; for LoRA runs peft's `adapter_model.safetensors` + `adapter_config.json`
    state/   accelerate `save_state` (model, optimizer, scheduler, RNG of every process; DeepSpeed shards under
             ZeRO) and `trainer_state.json` (step, samples_seen = data position, tokens_seen)

Every process writes into `checkpoints/.tmp-step_NNNNNN`; once all are done, rank 0 renames it to `step_NNNNNN`
and prunes to the newest `keep_last`. `is_complete` is the one test of a finished checkpoint (a `step_N` name,
`model/` and `state/trainer_state.json`), so a checkpoint killed mid-write is never resumed, exported, evaluated
or served. `find_checkpoint` / `model_location` are the one resolver every entry point calls (train's
`resume`, export, eval, chat, serve, scripts): a RUN dir means its newest complete checkpoint, by step number.
Safety: accelerate loads optimizer/RNG files with `weights_only=True`
(DeepSpeed's own shard loader unpickles: resume only from your own runs). Tested by
`python -m pytest tests/test_trainer.py -k resume`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from yarnkit.errors import NotFound
from yarnkit.quiet import tied_weights_notice
from yarnkit.train.errors import CheckpointError

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
TMP_PREFIX = ".tmp-"
STEP_PATTERN = re.compile(r"^step_(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class CheckpointArgs:
    every: int = 100  # save every N optimizer steps (and always after the last); 0 = only after the last
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    save_final: bool = True  # false: no checkpoint after the last step either (throughput benchmarks)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:06d}"


def is_complete(path: str | Path) -> bool:
    """A finished checkpoint: named `step_N` (`.tmp-step_N` is renamed only after every process wrote its part)
    and holding `model/` and `state/trainer_state.json`."""
    path = Path(path)
    return (bool(STEP_PATTERN.match(path.name)) and (path / MODEL_DIR).is_dir()
            and (path / STATE_DIR / TRAINER_STATE).is_file())


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints `(step, path)`, oldest first: ordered by step number, not by name."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted((int(STEP_PATTERN.match(p.name).group(1)), p) for p in folder.iterdir() if is_complete(p))


def has_step_dirs(run_dir: str | Path) -> bool:
    """Any `step_N` folder, complete or not: a fresh run (resume=none) must not write over one."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    return folder.is_dir() and any(STEP_PATTERN.match(p.name) for p in folder.iterdir())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint `path` names: a RUN dir (it has `checkpoints/`) -> its newest complete checkpoint; a
    `checkpoints/step_N` dir -> itself; anything else (an HF dir, a .gguf, a bundled name, a hub id) -> None."""
    path = Path(path).expanduser()
    if (path / CHECKPOINTS_DIR).is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{path} is a run dir without a finished checkpoint: no complete "
                                  f"{path / CHECKPOINTS_DIR}/step_NNNNNN/ (with {MODEL_DIR}/ and "
                                  f"{STATE_DIR}/{TRAINER_STATE}) yet; train until the first save, or pass a "
                                  "checkpoint or model dir")
        return newest
    if STEP_PATTERN.match(path.name) and path.parent.name == CHECKPOINTS_DIR and path.is_dir():
        return path
    return None


def model_location(name_or_path: str) -> str:
    """What a model loader opens for `name_or_path`: a RUN or checkpoint dir -> that checkpoint's `model/` (full
    weights); anything else unchanged. A LoRA adapter is refused: loaders need merged weights."""
    checkpoint = find_checkpoint(name_or_path)
    location = checkpoint / MODEL_DIR if checkpoint is not None else Path(name_or_path).expanduser()
    if (location / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{location} holds a LoRA adapter, not full weights; merge it first: "
                              f"yarnkit export {name_or_path} --out DIR --merge-lora")
    return str(location) if checkpoint is not None else str(name_or_path)


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
