"""Where the shipped training recipes and accelerate launcher configs are, in a checkout or an installed wheel.

    recipe_names()              # ['sink-pretrain', 'smollm2-yarn-64k', 'smollm2-yarn-64k-pose', 'tiny', ...]
    recipe_file("tiny")         # CHECKOUT/recipes/tiny.yaml, or SITE/yarnkit/recipes/tiny.yaml from a wheel
    accelerate_config("zero2")  # .../recipes/accelerate/zero2.yaml

The recipes live in the repository's top-level `recipes/` folder; the wheel ships them as package data of
`yarnkit.recipes` (pyproject's `[tool.setuptools.package-dir]`). A recipe is every `NAME.yaml` there or in a
subfolder other than `accelerate/` (its first lines: purpose, launch, overrides; docs/recipes.md), and
`recipe=NAME` resolves through here from any working directory. `accelerate/` holds the launcher configs; the
DeepSpeed ones name their JSON as `recipes/accelerate/NAME.json`, which is found from a checkout's root, and
`deepspeed_json` finds the shipped copy from anywhere else (the trainer calls it before it builds its
Accelerator). Reading recipes is `yarnkit.train.recipe`'s job, not this module's.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from yarnkit.errors import NotFound

PACKAGE_DIR = Path(__file__).resolve().parent


def _recipes_dir() -> Path:
    """The wheel's package data `yarnkit/recipes/` when it holds recipes, else the checkout's `recipes/`."""
    installed = PACKAGE_DIR / "recipes"
    return installed if any(installed.glob("*.yaml")) else PACKAGE_DIR.parent / "recipes"


RECIPES_DIR = _recipes_dir()
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


def deepspeed_json(path: str) -> str:
    """A launcher config's `deepspeed_config_file` as this process can open it: `path` itself when it exists (a
    launch from a checkout's root, or the user's own file), else the shipped JSON that `recipes/accelerate/NAME.json`
    names (a launch from another folder, or from an installed wheel)."""
    given = Path(path).expanduser()
    shipped = ACCELERATE_DIR / given.name
    if given.is_file() or given.is_absolute() or given.parent.as_posix() != "recipes/accelerate" or not shipped.is_file():
        return path
    return str(shipped)
