"""The wheel ships the whole package, the top-level recipes/ included (as `yarnkit/recipes/`, package data of
`yarnkit.recipes`): build it offline, list it, install it elsewhere, resolve `recipe=tiny` and a launcher's DeepSpeed
JSON from an unrelated folder. The build runs on a copy of the sources, so the checkout gets no build/ or egg-info
folders.

Run: python -m pytest tests/test_packaging.py -q   (~15 s; needs setuptools, from the [dev] extra)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("yarnkit", "recipes"):
        shutil.copytree(REPO / folder, source / folder, ignore=SKIP)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(root / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (found,) = (root / "dist").glob("yarnkit-*.whl")
    return found


def test_the_wheel_holds_every_file_of_the_package(wheel):
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("yarnkit/")}
    in_checkout = {path.relative_to(REPO).as_posix() for path in (REPO / "yarnkit").rglob("*")
                   if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}
    in_checkout |= {f"yarnkit/{path.relative_to(REPO).as_posix()}" for path in (REPO / "recipes").rglob("*")
                    if path.is_file()}
    assert packaged == in_checkout
    assert {"yarnkit/recipes/tiny.yaml", "yarnkit/recipes/accelerate/zero2.yaml",
            "yarnkit/recipes/accelerate/zero2.json"} <= packaged


def test_installed_wheel_resolves_recipes_from_any_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import yarnkit; from yarnkit.recipe_files import accelerate_config, deepspeed_json; "
             "from yarnkit.train.recipe import load_recipe, recipe_path; "
             "print(yarnkit.__file__); print(recipe_path('tiny')); print(accelerate_config('zero3')); "
             "print(deepspeed_json('recipes/accelerate/zero3.json')); "
             "print(load_recipe(['recipe=tiny']).train.max_steps)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    package, recipe, launcher, deepspeed, steps = done.stdout.split()
    assert all(Path(p).is_relative_to(site) for p in (package, recipe, launcher, deepspeed)), done.stdout
    assert Path(recipe).name == "tiny.yaml" and steps == "10" and Path(deepspeed).is_file()
