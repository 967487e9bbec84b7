"""The training recipes and accelerate launcher configs that ship inside the package, and their registry.

    recipe_names()              # ['sink-pretrain', 'smollm2-yarn-64k', 'smollm2-yarn-64k-pose', 'tiny', ...]
    recipe_file("tiny")         # .../yarnkit/recipes/tiny.yaml, in a checkout or an installed wheel
    accelerate_config("zero2")  # .../yarnkit/recipes/accelerate/zero2.yaml

A recipe is every `NAME.yaml` in this folder or a subfolder other than `accelerate/` (its first lines: purpose, launch, overrides; docs/recipes.md);
`recipe=NAME` resolves through here from any working directory. `accelerate/` holds the launcher configs; the
DeepSpeed ones name their JSON relative to the repository root (`yarnkit/recipes/accelerate/zero2.json`), so
launch them from the root of a checkout. Reading recipes is `yarnkit.train.recipe`'s job, not this module's.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from yarnkit.errors import NotFound

RECIPES_DIR = Path(__file__).resolve().parent
ACCELERATE_DIR = RECIPES_DIR / "accelerate"


def recipe_files() -> list[Path]:
    return sorted(path for path in RECIPES_DIR.rglob("*.yaml") if ACCELERATE_DIR not in path.parents)


def recipe_names() -> list[str]:
    return sorted(path.stem for path in recipe_files())


def recipe_file(name: str) -> Path:
    """The shipped recipe `name`; an unknown name fails with the closest match or the list of recipes."""
    matches = [path for path in recipe_files() if path.stem == name]
    if not matches:
        known = recipe_names()
        close = difflib.get_close_matches(name, known, n=1)
        raise NotFound(f"no recipe named {name!r} in {RECIPES_DIR}",
                       (f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(known)}")
                       + " (or pass recipe=path/to/file.yaml)")
    return matches[0]


def accelerate_config(name: str) -> Path:
    """The launcher config `name` (single, ddp, zero2, zero3, zero3_offload) for `accelerate launch --config_file`."""
    path = ACCELERATE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise NotFound(f"no launcher config {name!r} in {ACCELERATE_DIR}",
                       f"choose one of {', '.join(sorted(p.stem for p in ACCELERATE_DIR.glob('*.yaml')))}")
    return path
