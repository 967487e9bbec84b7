"""A run directory's layout and the one resolver of "which checkpoint": shared by train, export, eval, chat and serve.

    RUN/recipe.yaml, RUN/metrics.jsonl
    RUN/checkpoints/step_000400/model/                 HF `save_pretrained` output (or a LoRA adapter) + tokenizer
    RUN/checkpoints/step_000400/state/trainer_state.json   (+ accelerate's optimizer/RNG state, ZeRO shards)
    RUN/checkpoints/step_000400/recipe.yaml
    RUN/checkpoints/.tmp-step_000400/                  a checkpoint being written (renamed when every process is done)

`is_complete` is the one test of a finished checkpoint (a `step_N` name, `model/` and `state/trainer_state.json`),
so a checkpoint killed mid-write is never resumed, exported, evaluated or served. `find_checkpoint` /
`model_location` are the one resolver every entry point calls (train's `resume`, export, eval, chat, serve,
scripts): a RUN dir means its newest complete checkpoint, by step number. Writing checkpoints is
`yarnkit.train.checkpoint`'s job, not this module's. Tested by `python -m pytest tests/test_checkpoint.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

from yarnkit.errors import CheckpointError

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
TMP_PREFIX = ".tmp-"
STEP_PATTERN = re.compile(r"^step_(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"


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
