"""Typed training recipes: dataclass defaults < a shipped recipe (`recipes/<name>.yaml`) or any YAML file
< command-line `key=value` overrides.

`load_recipe(["recipe=tiny", "optim.lr=1e-4"])` returns a `Recipe` whose sections are the `*Args` dataclasses
owned by each subsystem (model, pose, data, optim, loop, checkpoint). Loading is strict: an unknown
key fails and names the closest valid key, a wrong type fails naming the key, and `validate_recipe` rejects
settings that cannot work together (e.g. a sequence longer than the YaRN context) before any model is loaded.
It is not the trainer: it only reads, checks and writes recipes. Tested by `python -m pytest tests/test_recipe.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from yarnkit.errors import NotFound, RecipeError
from yarnkit.patch import YarnArgs, check_yarn, yarn_context
from yarnkit.recipe_files import recipe_file
from yarnkit.train.checkpoint import CheckpointArgs
from yarnkit.runs import RECIPE_FILE
from yarnkit.train.data import DataArgs, check_mix
from yarnkit.train.loop import TrainArgs
from yarnkit.train.model_setup import LoraArgs, ModelArgs
from yarnkit.train.optim import OptimArgs, check_optim
from yarnkit.train.pose import PoseArgs
from yarnkit.train.speed import check_attention, check_speed_keys


@dataclass
class Recipe:
    run_dir: str = "runs/default"  # outputs: recipe.yaml, metrics.jsonl, checkpoints/
    resume: str = "auto"  # auto: continue the last complete checkpoint in run_dir; none; or a checkpoint dir
    dry_run: bool = False  # print the resolved recipe, parameter count and memory/time estimates, then stop
    model: ModelArgs = field(default_factory=ModelArgs)
    yarn: YarnArgs = field(default_factory=YarnArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    pose: PoseArgs = field(default_factory=PoseArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)


def recipe_path(name: str) -> Path:
    """`tiny` -> the shipped recipes/tiny.yaml (`yarnkit.recipe_files`); a path to a .yaml file is used as is."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise NotFound(f"recipe file not found: {path}", "check the path, or name a bundled recipe (recipe=tiny)")
        return path
    return recipe_file(name)


def _check_keys(node: dict, cls, prefix: str = "") -> None:
    """Fail on a key that `cls` (a dataclass) does not have, naming the closest valid key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            valid = ", ".join(f"{prefix}{name}" for name in fields)
            raise RecipeError(f"unknown recipe key {dotted!r}"
                              + (f"; did you mean {prefix + close[0]!r}?" if close else "") + f" (valid: {valid})")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key {dotted!r} is a section; set its fields, e.g. {dotted}.<field>=...")
            _check_keys(value, sub, dotted + ".")


def _merge(base, layer, source: str):
    plain = OmegaConf.to_container(layer, resolve=True) if not isinstance(layer, dict) else layer
    _check_keys(plain or {}, Recipe)
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        message = str(getattr(err, "msg", err)).splitlines()[0]
        raise RecipeError(f"{source}: bad value for {key!r}: {message}",
                          "give a value of the key's type (`yarnkit train --help` lists each key's default)") from err


def _first_line(error: Exception) -> str:
    return " ".join(str(getattr(error, "problem", None) or error).split("\n")[0].split())


def _load_yaml(path: Path):
    try:
        layer = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RecipeError(f"{where} is not valid YAML ({_first_line(err)})",
                          "fix the file (compare it with recipes/tiny.yaml)") from err
    if not isinstance(layer, DictConfig):
        raise RecipeError(f"{path} holds a YAML {type(layer).__name__}, not a mapping of recipe sections",
                          "write `section:` blocks of `key: value` lines (see recipes/tiny.yaml)")
    return layer


def _parse_override(item: str):
    key, _, value = item.partition("=")
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise RecipeError(f"cannot parse the value of {key} ({value!r}: {_first_line(err)})",
                          f"close its brackets or quotes, e.g. {key}=[0.9,0.95] for a list") from err


def load_recipe(argv: list[str] | None = None) -> Recipe:
    """Defaults, then `recipe=NAME` (a YAML file), then the other `key=value` items in order."""
    argv = list(argv or [])
    for item in argv:
        if "=" not in item:
            raise RecipeError(f"expected key=value, got {item!r} (example: recipe=tiny optim.lr=1e-4)")
    names = [item.split("=", 1)[1] for item in argv if item.startswith("recipe=")]
    overrides = [item for item in argv if not item.startswith("recipe=")]
    config = OmegaConf.structured(Recipe)
    for name in names:
        path = recipe_path(name)
        config = _merge(config, _load_yaml(path), str(path))
    for item in overrides:
        config = _merge(config, _parse_override(item), "command line")
    recipe = OmegaConf.to_object(config)
    validate_recipe(recipe)
    return recipe


def _field_comments(cls) -> dict[str, str]:
    """`name -> inline comment` of a dataclass's fields, read from its source (the comments document the knobs)."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=#]+=.*?#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _default(spec: dataclasses.Field):
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def _shown(value) -> str:
    """A default as it would be typed on the command line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return "[" + ",".join(_shown(item) for item in value) + "]"
    return str(value) if value != "" else "''"


def recipe_keys_help(cls=Recipe, prefix: str = "") -> str:
    """Every recipe key with its default and comment, section by section, from the dataclasses themselves."""
    comments, lines, sections = _field_comments(cls), [], []
    for spec in dataclasses.fields(cls):
        value = _default(spec)
        if dataclasses.is_dataclass(value):
            module = inspect.getmodule(type(value)).__name__.replace(".", "/") + ".py"
            sections.append(f"\n{prefix}{spec.name} ({type(value).__name__} in {module}):\n"
                            + recipe_keys_help(type(value), f"{prefix}{spec.name}."))
            continue
        item = f"  {prefix}{spec.name}={_shown(value)}"
        lines.append(f"{item:<44} {comments.get(spec.name, '')}".rstrip())
    return "\n".join(lines) + "".join(sections)


def recipe_from_file(path: str | Path) -> Recipe:
    """Read a resolved recipe.yaml (a run directory's or a checkpoint's) strictly."""
    return load_recipe([f"recipe={Path(path).resolve()}"])


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def save_recipe(recipe: Recipe, folder: str | Path) -> Path:
    path = Path(folder) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(recipe_to_yaml(recipe))
    tmp.replace(path)
    return path


def validate_recipe(recipe: Recipe) -> None:
    """Cross-section checks that need no model: fail before any GPU time is spent."""
    data, yarn, pose, train = recipe.data, recipe.yarn, recipe.pose, recipe.train
    if data.seq_len < 2:
        raise RecipeError(f"data.seq_len={data.seq_len} is too short; use at least 2 tokens")
    check_mix(data)  # source names, weights, and training templates that must not collide with evaluation ones
    check_yarn(yarn)
    context = yarn_context(yarn)
    if context:
        check_lengths(recipe, context, f"the YaRN context {context} (yarn.factor={yarn.factor} x "
                                       f"yarn.original_max_position_embeddings={yarn.original_max_position_embeddings})")
    if data.synthetic.far and not pose.enabled:
        raise RecipeError(f"data.synthetic.far={data.synthetic.far} needs pose.enabled=true: a far row's question "
                          "part is moved away by PoSE's skip; enable PoSE or set data.synthetic.far=0")
    if train.answer_loss_weight < 0:
        raise RecipeError(f"train.answer_loss_weight={train.answer_loss_weight} is negative; use 0 (off) or more")
    if train.answer_loss_weight and train.sp_size > 1:
        raise RecipeError("train.answer_loss_weight cannot be combined with train.sp_size > 1 (the answer tokens "
                          "of a sequence-parallel shard are not gathered); set one of them off")
    if not 0.0 <= pose.far_min <= 1.0:
        raise RecipeError(f"pose.far_min={pose.far_min} must lie in [0, 1]: the share of PoSE's room where a far "
                          "row's skip starts (0.5 by default: half to all of pose.target_len away)")
    if pose.enabled:
        if pose.target_len and pose.target_len <= data.seq_len:
            raise RecipeError(f"pose.target_len={pose.target_len} must exceed data.seq_len={data.seq_len} "
                              f"(PoSE stretches short chunks over a longer position range)")
        if data.packing:
            raise RecipeError("pose.enabled and data.packing cannot be combined: both rewrite position_ids; "
                              "turn one off")
    model = recipe.model
    if model.init not in ("pretrained", "scratch"):
        raise RecipeError(f"model.init={model.init!r}; choose pretrained or scratch")
    if model.sink_token and data.packing:
        raise RecipeError("model.sink_token and data.packing cannot be combined: packing would put the sink token "
                          "mid-sequence at every document start; set data.packing=false")
    if model.sink_token and model.sink_token_init not in ("bos", "mean"):
        raise RecipeError(f"model.sink_token_init={model.sink_token_init!r}; choose bos or mean")
    if train.max_steps < 1:
        raise RecipeError(f"train.max_steps={train.max_steps}; use at least 1")
    if train.micro_batch_size < 1 or train.grad_accum < 1:
        raise RecipeError("train.micro_batch_size and train.grad_accum must be >= 1")
    for key, least in (("clip", 0), ("log_every", 1), ("loss_chunk_tokens", 1), ("global_batch", 0),
                       ("profile_step", 0)):
        value = getattr(train, key)
        if not (math.isfinite(value) and value >= least):
            raise RecipeError(f"train.{key}={value} must be at least {least}",
                              f"e.g. train.{key}={getattr(TrainArgs(), key)}")
    if not (math.isfinite(train.peak_tflops) and train.peak_tflops > 0):
        raise RecipeError(f"train.peak_tflops={train.peak_tflops} must be a positive number",
                          "e.g. train.peak_tflops=989")
    if recipe.lora.enabled and not 0.0 <= recipe.lora.dropout < 1.0:
        raise RecipeError(f"lora.dropout={recipe.lora.dropout} must be in [0, 1)", "e.g. lora.dropout=0.05")
    if train.mixed_precision not in ("fp32", "bf16", "fp16", "bf16-weights"):
        raise RecipeError(f"train.mixed_precision={train.mixed_precision!r}; choose fp32, bf16, fp16 or bf16-weights")
    if train.mixed_precision == "bf16-weights" and recipe.lora.enabled:
        raise RecipeError("train.mixed_precision=bf16-weights keeps float32 masters of fully trained weights, not "
                          "of LoRA adapters", "use train.mixed_precision=bf16 with lora.enabled")
    check_optim(recipe.optim)
    if recipe.checkpoint.keep_last < 1 or recipe.checkpoint.every < 0:
        raise RecipeError(f"checkpoint.keep_last={recipe.checkpoint.keep_last} / checkpoint.every="
                          f"{recipe.checkpoint.every}: keep_last counts the checkpoints kept (at least 1) and every "
                          "is a step interval (0: only the last)", "e.g. checkpoint.keep_last=2 checkpoint.every=100")
    if train.sp_size < 1:
        raise RecipeError(f"train.sp_size={train.sp_size}; use 1 (off) or the number of GPUs sharing one sequence")
    if train.offload_activations and not recipe.model.gradient_checkpointing:
        raise RecipeError("train.offload_activations offloads checkpointed layer inputs; set "
                          "model.gradient_checkpointing=true or train.offload_activations=false")
    check_attention(recipe.model.attn_implementation, recipe.model.sdpa_kernel)
    check_speed_keys(recipe.model, train, recipe.optim)
    if recipe.lora.enabled and recipe.lora.r < 1:
        raise RecipeError(f"lora.r={recipe.lora.r}; use a rank >= 1 when lora.enabled")


def check_lengths(recipe, context: int, what: str) -> None:
    """seq_len and the PoSE target must fit `context` (`what` names it in the message)."""
    if recipe.data.seq_len > context:
        raise RecipeError(f"data.seq_len={recipe.data.seq_len} exceeds {what}; raise yarn.factor or lower data.seq_len")
    if recipe.pose.enabled and recipe.pose.target_len > context:
        raise RecipeError(f"pose.target_len={recipe.pose.target_len} exceeds {what}; raise yarn.factor or lower "
                          "pose.target_len")


def check_context(recipe, config) -> None:
    """seq_len and PoSE targets must fit the (scaled) model context; raises before weights load."""
    context = config.max_position_embeddings
    check_lengths(recipe, context, f"the model context {context} (after yarn.factor={recipe.yarn.factor})")
    if recipe.pose.enabled and (recipe.pose.target_len or context) <= recipe.data.seq_len:
        raise RecipeError(f"PoSE needs a target longer than data.seq_len={recipe.data.seq_len} (context {context})")
