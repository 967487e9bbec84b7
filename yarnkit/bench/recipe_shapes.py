"""The small shape of each shipped recipe: the overrides that train it in seconds and keep every other key its own.

    small_overrides("smollm2-yarn-64k-retrieval", steps=5, cpu=False)   # the GPU check: 5 steps, bf16, Liger...
    small_overrides("tiny", steps=2, cpu=True)                          # tests/test_recipes_train.py: fp32 on CPU

Only the shape (sequence 256, micro-batch 2), the step count, the paths and, on CPU, the precision (fp32) change;
the data mix, long rows, PoSE, YaRN settings, sink token, checkpointing and speed keys (SDPA kernel, Liger kernels,
fused loss) stay the recipe's, so a recipe whose combination of keys cannot train fails at this shape too. Recipes
that name a hub model or hub data (unreachable offline) train the bundled SmolLM2-135M on the bundled novel, and
`yarn-128k` continues from the checkpoint `yarn-64k` wrote (its header says so): the caller passes
`model.name_or_path`. `yarn-64k` and `yarn-128k` are 8-GPU ZeRO-3 recipes of a 7B model (`MULTI_GPU`): the CPU
test trains them at this shape, the single-GPU check leaves them out. A recipe file that is not shipped gets the
common shape only.
"""

from __future__ import annotations

from pathlib import Path

import yarnkit
from yarnkit.recipe_files import recipe_names

SHAPE = {"data.seq_len": 256, "data.num_proc": 1, "train.micro_batch_size": 2, "train.grad_accum": 1,
         "train.global_batch": 0, "train.loss_chunk_tokens": 128, "train.memory_check": False, "train.log_every": 1,
         "optim.warmup_steps": 1, "checkpoint.every": 0, "checkpoint.save_final": False}
CPU = {"train.mixed_precision": "fp32"}  # bf16 autocast on CPU is emulated and slow
OFFLINE = {"model.name_or_path": "smollm2-135m", "data.source": "bundled:train"}  # for hub models and hub data
SMALL_CODE = str(Path(yarnkit.__file__).parent / "train")  # a mix's `code` part: a few .py files, not the stdlib
PER_RECIPE = {
    "tiny": {},
    "smollm2-yarn-64k": {},
    "smollm2-yarn-64k-pose": {},
    "smollm2-yarn-64k-retrieval": {"data.code_source": SMALL_CODE, "data.seq_len": 1024},  # rows hold 2+ facts
    "sink-pretrain": {"data.source": "bundled:train", "model.scratch.layers": 2, "model.scratch.context": 256},
    "yarn-64k": {**OFFLINE, "checkpoint.save_final": True},
    "yarn-128k": {"data.source": "bundled:train"},  # model.name_or_path: yarn-64k's final checkpoint
}
MULTI_GPU = ("yarn-64k", "yarn-128k")


def small_overrides(recipe: str, steps: int, cpu: bool) -> dict:
    """`key: value` overrides that train `recipe` (a shipped name or a YAML path) `steps` steps at the small shape."""
    return {**SHAPE, "train.max_steps": steps, **(CPU if cpu else {}), **PER_RECIPE.get(recipe, {})}


def single_gpu_recipes() -> list[str]:
    """The shipped recipes one GPU trains (every one but the 8-GPU ZeRO-3 recipes)."""
    return [name for name in recipe_names() if name not in MULTI_GPU]
