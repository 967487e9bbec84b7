"""Recipes: every file under recipes/ loads strictly; precedence, typo and type errors; launcher configs;
estimates.

Run: python -m pytest tests/test_recipe.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from yarnkit.errors import RecipeError
from yarnkit.recipe_files import ACCELERATE_DIR, RECIPES_DIR, deepspeed_json, recipe_files
from yarnkit.train.recipe import Recipe, load_recipe, recipe_from_file, save_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE_FILES = recipe_files()
LAUNCHER_FILES = sorted(ACCELERATE_DIR.glob("*.yaml"))


def test_recipe_files_found():
    assert len(RECIPE_FILES) >= 4 and len(LAUNCHER_FILES) >= 4


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_recipe_file_loads_and_documents_itself(path):
    recipe = load_recipe([f"recipe={path}"])
    assert isinstance(recipe, Recipe)
    header = path.read_text().splitlines()[:8]
    assert header[0].startswith(f"# {path.stem}:"), "first line: '# name: purpose'"
    assert any("Launch:" in line for line in header) and any("Override:" in line for line in header)
    assert "/work/shared" not in path.read_text()


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_points_at_existing_deepspeed_json(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")
    if config["distributed_type"] == "DEEPSPEED":
        ds_file = Path(config["deepspeed_config"]["deepspeed_config_file"])
        ds = json.loads((REPO / ds_file).read_text())  # relative to the repository root, where one launches
        assert ds["zero_optimization"]["stage"] == int(path.stem.removeprefix("zero")[0])  # zero3_offload: 3
        assert ds_file.stem == path.stem  # zero3_offload.yaml -> zero3_offload.json


def test_deepspeed_json_is_found_from_any_folder(tmp_path, monkeypatch):
    """A launch outside the checkout's root (or from a wheel) gets the shipped JSON; other paths stay as given."""
    monkeypatch.chdir(tmp_path)
    assert Path(deepspeed_json("recipes/accelerate/zero2.json")) == ACCELERATE_DIR / "zero2.json"
    assert deepspeed_json("recipes/accelerate/nonexistent.json") == "recipes/accelerate/nonexistent.json"
    (tmp_path / "mine.json").write_text("{}")
    assert deepspeed_json("mine.json") == "mine.json"
    (tmp_path / "recipes" / "accelerate").mkdir(parents=True)
    (tmp_path / "recipes" / "accelerate" / "zero2.json").write_text("{}")  # the user's own file wins
    assert deepspeed_json("recipes/accelerate/zero2.json") == "recipes/accelerate/zero2.json"


def test_paper_recipe_values():
    recipe = load_recipe(["recipe=yarn-64k"])
    assert (recipe.optim.lr, recipe.optim.betas, recipe.optim.weight_decay, recipe.optim.warmup_steps) == \
        (2e-5, [0.9, 0.95], 0.0, 20)
    assert (recipe.train.max_steps, recipe.train.global_batch, recipe.data.seq_len) == (400, 64, 65536)
    assert (recipe.yarn.factor, recipe.yarn.original_max_position_embeddings) == (16.0, 4096)
    assert recipe.model.gradient_checkpointing and recipe.train.mixed_precision == "bf16"
    follow = load_recipe(["recipe=yarn-128k"])
    assert (follow.yarn.factor, follow.train.max_steps, follow.train.seed) == (32.0, 200, 31337)


def test_precedence_defaults_then_yaml_then_cli():
    assert load_recipe([]).optim.lr == Recipe().optim.lr
    assert load_recipe(["recipe=tiny"]).train.max_steps == 10  # from the YAML
    recipe = load_recipe(["recipe=tiny", "train.max_steps=3", "optim.betas=[0.8,0.9]"])
    assert recipe.train.max_steps == 3 and recipe.optim.betas == [0.8, 0.9]
    assert recipe.data.source == "bundled:train"  # untouched YAML value survives


def test_unknown_key_names_the_closest_key():
    with pytest.raises(RecipeError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_recipe(["recipe=tiny", "optim.lrr=1e-4"])
    with pytest.raises(RecipeError, match=r"did you mean 'train'"):
        load_recipe(["trian.max_steps=3"])


def test_unknown_key_in_a_yaml_file_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  seq_length: 128\n")
    with pytest.raises(RecipeError, match=r"data\.seq_length.*did you mean 'data\.seq_len'"):
        load_recipe([f"recipe={path}"])


def test_wrong_type_names_the_key():
    with pytest.raises(RecipeError, match=r"train\.max_steps"):
        load_recipe(["train.max_steps=many"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(["recipe=tiny", "--lr"])


def test_unknown_recipe_name_suggests():
    with pytest.raises(FileNotFoundError, match="did you mean 'tiny'"):
        load_recipe(["recipe=tiyn"])


@pytest.mark.parametrize("overrides, message", [
    (["yarn.original_max_position_embeddings=4096", "yarn.factor=2", "data.seq_len=9000"], "exceeds the YaRN"),
    (["pose.enabled=true", "pose.target_len=512", "data.seq_len=1024"], "must exceed data.seq_len"),
    (["pose.enabled=true", "data.packing=true"], "cannot be combined"),
    (["train.mixed_precision=fp8"], "mixed_precision"),
    (["yarn.factor=0.5"], "shrink"),
    (["data.synthetic.far=0.5"], "needs pose.enabled=true"),
    (["pose.enabled=true", "pose.far_min=1.5"], r"pose\.far_min=1\.5 must lie in \[0, 1\]"),
    (["train.answer_loss_weight=-1"], "answer_loss_weight=-1.0 is negative"),
    (["train.answer_loss_weight=1", "train.sp_size=2"], "cannot be combined with train.sp_size"),
])
def test_impossible_settings_fail_before_loading(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(overrides)


def test_saved_recipe_round_trips(tmp_path):
    recipe = load_recipe(["recipe=tiny", "train.max_steps=7"])
    save_recipe(recipe, tmp_path)
    assert recipe_from_file(tmp_path / "recipe.yaml") == recipe


def test_flops_formula_and_dry_run_estimate():
    from yarnkit.train.estimate import dry_run, flops_per_token
    from yarnkit.models import load_config

    # Llama-2-7B at 64k, causal convention (reference/training.md table: 92.0 GFLOP/token with N = 6.74e9)
    assert flops_per_token(6.74e9, 32, 32, 128, 65536) / 1e9 == pytest.approx(92.0, abs=0.2)
    recipe = load_recipe(["recipe=smollm2-yarn-64k"])
    report = dry_run(recipe, world=1)
    config = load_config("smollm2-135m")
    assert report["parameters"] == 134_515_008  # SmolLM2-135M with tied embeddings
    assert report["context"] == 65536 and report["rope_parameters"]["rope_type"] == "yarn"
    expected = 6 * 134_515_008 + 6 * config.num_hidden_layers * 9 * 64 * 65536
    assert report["flops_per_token"] == expected
    assert report["memory_gib_per_device"]["model_states"] == pytest.approx(16 * 134_515_008 / 2**30, abs=0.01)
    assert 0 < report["seconds_per_step"] < 60


def test_dry_run_rejects_seq_len_beyond_scaled_context():
    from yarnkit.train.estimate import dry_run

    with pytest.raises(RecipeError, match="exceeds the model context 16384"):
        dry_run(load_recipe(["recipe=tiny", "data.seq_len=20000"]), world=1)


def test_memory_check_fails_before_loading_with_advice():
    from yarnkit.train.estimate import check_memory
    from yarnkit.train.model_setup import scaled_config

    recipe = load_recipe(["recipe=smollm2-yarn-64k", "model.gradient_checkpointing=false"])
    config = scaled_config(recipe.model, recipe.yarn)
    with pytest.raises(MemoryError, match="ZeRO-3.*gradient_checkpointing=true.*memory_check=false"):
        check_memory(recipe, config, world=1, zero=0, device_bytes=24 * 2**30)
    check_memory(load_recipe(["recipe=smollm2-yarn-64k"]), config, world=1, zero=0, device_bytes=80 * 2**30)
