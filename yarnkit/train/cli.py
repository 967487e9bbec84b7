"""`yarnkit train recipe=NAME [key=value ...] [--dry-run]`: the training command (`scripts/train.py` enters here too,
through `yarnkit.cli`).

    yarnkit train recipe=tiny train.max_steps=3 run_dir=runs/tiny-3
    yarnkit train recipe=yarn-64k --dry-run          # the resolved recipe, parameters, memory and time estimates
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m yarnkit.cli train recipe=yarn-64k

Overrides are `key=value` (see docs/recipes.md); `resume=auto` (the default) continues the last checkpoint.
`--help` lists every recipe key with its default. The run itself is `yarnkit.train.trainer.train`.
"""

from __future__ import annotations

import json
import os

from yarnkit.train.estimate import dry_run
from yarnkit.train.recipe import load_recipe, recipe_keys_help, recipe_to_yaml
from yarnkit.train.trainer import train


def add_arguments(parser) -> None:
    """`recipe=NAME`, `key=value` overrides and `--dry-run`; the epilog lists every recipe key and its default."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe=NAME (recipes/NAME.yaml, or a path to a .yaml), then key=value overrides of the "
                             "keys listed below, applied in order")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe, parameter count and memory/time estimates, then stop "
                             "(no weights load; works offline)")
    parser.epilog = ("examples:\n  yarnkit train recipe=tiny train.max_steps=3 run_dir=runs/tiny-3\n"
                     "  yarnkit train recipe=yarn-64k --dry-run\n\n"
                     "recipe keys and their defaults (dataclass defaults < recipe=NAME < key=value):\n"
                     + recipe_keys_help())


def run(args) -> int:
    """Dry-run or train; bad recipes and data raise `yarnkit.errors.UserError`s (one line at the CLI boundary)."""
    recipe = load_recipe(list(args.overrides) + (["dry_run=true"] if args.dry_run else []))
    if recipe.dry_run:
        print(recipe_to_yaml(recipe))
        print(json.dumps(dry_run(recipe, int(os.environ.get("WORLD_SIZE", "1"))), indent=2))
        return 0
    result = train(recipe)
    if result.rank != 0:
        return 0
    if result.last_step >= result.first_step:
        print(f"trained steps {result.first_step}..{result.last_step}; last loss "
              f"{result.losses[result.last_step]:.4f}; outputs in {result.run_dir}")
    else:
        print(f"nothing to do: {result.run_dir} is already at step {result.last_step} (train.max_steps)")
    return 0
