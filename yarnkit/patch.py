"""Apply a RoPE scaling (YaRN and friends) to a transformers config or a loaded model, reversibly.

    handle = apply_rope_scaling(model, "yarn", factor=4)   # or a config; returns a PatchHandle
    handle.describe(); handle.undo()
    apply_yarn(config, YarnArgs(factor=8))                 # a recipe's `yarn` section (train and export)

The patch touches the smallest surface: it writes transformers v5 `config.rope_parameters` (so
`save_pretrained` produces a checkpoint that stock transformers loads with the scaling active) and, for a loaded
model, rebuilds each rotary module from that config in place. Nothing in the attention code is replaced.
The supported architectures sit in `ARCHS`, keyed by exact `model_type`, saying which rope parameters get
scaled (Gemma 3 scales only its global `full_attention` layers) and how the scaling is written down (Phi-3's
config only accepts `longrope`, which expresses static YaRN and PI exactly through per-pair factors).

`YarnArgs` is the recipe's `yarn` section and `apply_yarn(config, yarn)` the one place it is applied: the trainer
builds its model from the patched config, and export re-applies a LoRA run's saved section to the base config
(`read_yarn_args` reads it back typed). `factor` 1 means off; below 1 is refused (`check_yarn`).

`dynamic_yarn` is not a transformers rope type; `register_rope_types()` adds it to transformers' registry, so
transformers' own dynamic-RoPE hook recomputes the YaRN scale from the current length. Importing this module
changes nothing: `apply_rope_scaling` and every yarnkit loader (`yarnkit.models`, export) call it, so a checkpoint
saved with `dynamic_yarn` loads in any fresh process through yarnkit (`yarnkit export` writes static YaRN for
stock loaders).
"""

from __future__ import annotations

import copy
import math
import difflib
from dataclasses import dataclass, field, fields

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from yarnkit import rope
from yarnkit.errors import AlreadyScaled, RecipeError, RopeScalingError

DYNAMIC_TYPES = ("dynamic", "dynamic_yarn")


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture stores RoPE. `scaled_layer_types`: keys of a per-layer-type rope_parameters dict
    to scale (None: the dict is flat). `encoding`: "native" writes the rope type as is; "longrope" writes
    static types as per-pair LongRoPE factors (the only scaled form Phi-3's config accepts)."""

    scaled_layer_types: tuple[str, ...] | None = None
    encoding: str = "native"


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(),
    "gemma3_text": ArchSpec(scaled_layer_types=("full_attention",)),  # local sliding layers keep their RoPE
    "phi3": ArchSpec(encoding="longrope"),
}


@dataclass
class YarnArgs:
    rope_type: str = "yarn"  # one of yarnkit.rope.SCALING_TYPES (yarn, dynamic_yarn, linear, ntk, dynamic)
    factor: float = 1.0  # context multiplier s; 1 = no scaling
    original_max_position_embeddings: int = 0  # 0 = the checkpoint's native context
    replace: bool = False  # re-scale a checkpoint that already has a scaling (e.g. 64k -> 128k continuation)
    beta_fast: float | None = None  # None = the YaRN paper's 32
    beta_slow: float | None = None  # None = the YaRN paper's 1
    attention_factor: float | None = None  # None = 0.1 ln(s) + 1


def check_yarn(yarn: YarnArgs) -> None:
    """The section can be applied to any model: a known rope type and a factor of 1 (off) or more."""
    if yarn.factor < 1.0:
        raise RecipeError(f"yarn.factor={yarn.factor} < 1 would shrink the context; use 1 (off) or more")
    if not math.isfinite(yarn.factor):
        raise RecipeError(f"yarn.factor={yarn.factor} is not a finite number",
                          "use 1 (off) or more, e.g. yarn.factor=4")
    if yarn.rope_type not in rope.SCALING_TYPES:
        close = difflib.get_close_matches(yarn.rope_type, rope.SCALING_TYPES, n=1)
        raise RecipeError(f"yarn.rope_type={yarn.rope_type!r} is unknown" + (f"; did you mean {close[0]!r}?" if close else ""),
                          f"choose one of {', '.join(rope.SCALING_TYPES)}")


def yarn_context(yarn: YarnArgs) -> int | None:
    """The extended context `factor x original_max_position_embeddings`, when the section names the original."""
    return int(yarn.factor * yarn.original_max_position_embeddings) if yarn.original_max_position_embeddings else None


def apply_yarn(config, yarn: YarnArgs, model: str = "the model") -> "PatchHandle | None":
    """Apply the recipe's `yarn` section to `config` (in place, before any weights load); None when it is off
    (factor 1 and no `replace`). `model` names the checkpoint in the error when it already has a scaling."""
    check_yarn(yarn)
    if yarn.factor == 1.0 and not yarn.replace:
        return None
    params = {k: v for k in ("beta_fast", "beta_slow", "attention_factor") if (v := getattr(yarn, k)) is not None}
    try:
        return apply_rope_scaling(config, rope_type=yarn.rope_type, factor=yarn.factor,
                                  original_max_position_embeddings=yarn.original_max_position_embeddings or None,
                                  replace=yarn.replace, **params)
    except AlreadyScaled as error:
        raise RecipeError(f"{model} already uses {error.scaling}, so yarn.factor={yarn.factor} would scale it twice",
                          "set yarn.replace=true to re-scale it from its original context, or yarn.factor=1 to "
                          "train it with its own scaling") from None


def read_yarn_args(section: dict | None, source: str = "recipe") -> YarnArgs:
    """A saved recipe's `yarn` section as `YarnArgs`: unknown keys and wrong types fail naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    known = {spec.name for spec in fields(YarnArgs)}
    unknown = sorted(set(section or {}) - known)
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {', '.join('yarn.' + k for k in unknown)}",
                          f"the yarn section takes {', '.join(sorted(known))}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(YarnArgs), section or {}))
    except OmegaConfBaseException as error:
        raise RecipeError(f"{source}: bad value for yarn.{getattr(error, 'full_key', '') or '?'} "
                          f"({str(getattr(error, 'msg', error)).splitlines()[0]})", "fix the recipe's yarn section") from error


@dataclass
class PatchHandle:
    """What `apply_rope_scaling` changed, with `undo()` to put every value and module back."""

    config: object
    rope_type: str
    factor: float
    original_max_position_embeddings: int
    rope_parameters: dict
    attention_factor: float
    _saved: dict = field(repr=False, default_factory=dict)
    _modules: list = field(repr=False, default_factory=list)  # (parent, attribute, original module)
    undone: bool = False

    def describe(self) -> dict:
        return dict(model_type=self.config.model_type, rope_type=self.rope_type, factor=self.factor,
                    original_max_position_embeddings=self.original_max_position_embeddings,
                    max_position_embeddings=self.config.max_position_embeddings,
                    attention_factor=self.attention_factor, rope_parameters=copy.deepcopy(self.rope_parameters),
                    rotary_modules_rebuilt=len(self._modules), undone=self.undone)

    def undo(self) -> None:
        if self.undone:
            raise RopeScalingError("this patch was already undone")
        for name, value in self._saved.items():
            setattr(self.config, name, value)
        for parent, attribute, module in self._modules:
            setattr(parent, attribute, module)
        self.undone = True


def apply_rope_scaling(target, rope_type: str = "yarn", factor: float = 4.0,
                       original_max_position_embeddings: int | None = None, replace: bool = False,
                       allow_unlisted: bool = False, **params) -> PatchHandle:
    """Scale the RoPE of `target` (a `PreTrainedModel` or its config) by `factor` and return an undo handle.

    rope_type: one of `rope.SCALING_TYPES`. params: YaRN's `beta_fast`, `beta_slow`, `attention_factor`, `mscale`,
    `mscale_all_dim`, `truncate`, and `finetuned` (dynamic_yarn). `original_max_position_embeddings` defaults
    to the model's native context. `replace=True` re-scales a model that already has a scaling (e.g. going
    from a 64k YaRN checkpoint to 128k), relative to the original context recorded there.
    `allow_unlisted=True` patches a config whose model_type is not in `ARCHS` (the flat v5 layout is assumed).
    """
    register_rope_types()
    is_model = isinstance(target, torch.nn.Module)
    config = target.config.get_text_config() if is_model else target.get_text_config()
    spec = _arch_spec(config, allow_unlisted)
    rope_type = _check_request(rope_type, factor, params, spec)
    factor = float(factor)
    if not getattr(config, "rope_parameters", None):
        raise RopeScalingError(f"{config.model_type} has no `rope_parameters`: it does not use RoPE, so there is "
                               "nothing to scale")
    keys = spec.scaled_layer_types or (None,)
    current = [_rope_dict(config, key) for key in keys]
    original = _original_length(config, current[0], original_max_position_embeddings, replace)

    new_dicts = [_scaled_dict(old, rope_type, factor, original, params, config, spec) for old in current]
    saved = {"rope_parameters": copy.deepcopy(config.rope_parameters),
             "max_position_embeddings": config.max_position_embeddings}
    if hasattr(config, "original_max_position_embeddings"):  # Phi-3 keeps it top-level and prefers it
        saved["original_max_position_embeddings"] = config.original_max_position_embeddings
        config.original_max_position_embeddings = original
    for key, new in zip(keys, new_dicts):
        if key is None:
            config.rope_parameters = new
        else:
            config.rope_parameters[key] = new
    if rope_type not in DYNAMIC_TYPES:  # dynamic types read max_position_embeddings as the native length
        config.max_position_embeddings = int(round(original * factor))

    _, attention = rope.compute_inv_freq(_as_rope_math_dict(new_dicts[0], rope_type, factor, original),
                                         rope.head_dim(config), config.max_position_embeddings)
    handle = PatchHandle(config=config, rope_type=rope_type, factor=factor,
                         original_max_position_embeddings=original, rope_parameters=copy.deepcopy(new_dicts[0]),
                         attention_factor=attention, _saved=saved)
    if is_model:
        handle._modules = rebuild_rotary_modules(target)
        if not handle._modules:
            raise RopeScalingError(f"found no rotary embedding module in {type(target).__name__}; patch its config "
                                   "instead and load the model from it")
    return handle


def _arch_spec(config, allow_unlisted: bool) -> ArchSpec:
    model_type = config.model_type
    if model_type in ARCHS:
        return ARCHS[model_type]
    if allow_unlisted:
        return ArchSpec()
    close = difflib.get_close_matches(model_type, ARCHS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RopeScalingError(
        f"model_type {model_type!r} is not in yarnkit's architecture table{hint}; supported: {', '.join(ARCHS)}. "
        "Config-only fallback: if its modeling code builds RoPE from a flat `config.rope_parameters` (most "
        "transformers v5 models do), call apply_rope_scaling(config, ..., allow_unlisted=True) and load the model "
        "from that config; check the result with `yarnkit info`.")


def _check_request(rope_type: str, factor: float, params: dict, spec: ArchSpec) -> str:
    if rope_type not in rope.SCALING_TYPES:
        close = difflib.get_close_matches(rope_type, rope.SCALING_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RopeScalingError(f"unknown rope_type {rope_type!r}{hint}; choose one of {', '.join(rope.SCALING_TYPES)}")
    if not isinstance(factor, (int, float)) or factor <= 1:
        raise RopeScalingError(f"factor must be a number > 1 (the new context / the native one), got {factor!r}; "
                               "factor 4 turns an 8k model into a 32k one")
    allowed = set(rope.YARN_KEYS) | {"finetuned"} if "yarn" in rope_type else set()
    unknown = set(params) - allowed
    if unknown:
        raise RopeScalingError(f"parameters {sorted(unknown)} do not apply to rope_type {rope_type!r}"
                               + (f"; it takes {sorted(allowed)}" if allowed else "; it takes only factor"))
    if spec.encoding == "longrope" and rope_type not in ("yarn", "linear"):
        raise RopeScalingError(f"this architecture's config only stores static scalings; rope_type {rope_type!r} "
                               "is not expressible there: use 'yarn' or 'linear'")
    if spec.scaled_layer_types and rope_type == "dynamic_yarn":
        raise RopeScalingError("dynamic_yarn is not supported on per-layer-type RoPE configs (transformers' dynamic "
                               "hook would not update their attention factor); use 'yarn'")
    if spec.scaled_layer_types and params.get("truncate") is False:
        raise RopeScalingError("truncate=False is ignored by transformers for per-layer-type RoPE configs "
                               "(it reads `truncate` from the top level only); leave truncate at its default")
    return rope_type


def _rope_dict(config, key: str | None) -> dict:
    params = config.rope_parameters if key is None else config.rope_parameters.get(key)
    if params is None:
        raise RopeScalingError(f"{config.model_type} has no rope parameters for layer type {key!r}")
    return params


def _original_length(config, current: dict, explicit: int | None, replace: bool) -> int:
    current_type = current.get("rope_type", "default")
    if current_type != "default" and not replace:
        raise AlreadyScaled(config.model_type, current_type, current.get("factor"))
    if explicit is not None:
        return int(explicit)
    if current_type == "default":
        return int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    if "original_max_position_embeddings" not in current:
        raise RopeScalingError(
            f"the existing {current_type!r} scaling records no original_max_position_embeddings, so yarnkit cannot "
            "tell the native context; pass original_max_position_embeddings=<pretraining length>")
    return int(current["original_max_position_embeddings"])


def _scaled_dict(old: dict, rope_type: str, factor: float, original: int, params: dict, config, spec) -> dict:
    """The new rope_parameters dict for one layer type, in the form transformers reads back."""
    keep = {k: old[k] for k in ("rope_theta", "partial_rotary_factor") if k in old}
    if rope_type == "ntk":  # static NTK-aware is a base change: stored as default RoPE with the new theta
        dim = rope.rotary_dim(rope.head_dim(config), old.get("partial_rotary_factor", 1.0))
        return {**keep, "rope_type": "default", "rope_theta": rope.ntk_base(dim, float(old["rope_theta"]), factor)}
    new = {**keep, "rope_type": rope_type, "factor": factor}
    if "yarn" in rope_type:
        new["original_max_position_embeddings"] = original
        new.update({k: v for k, v in params.items() if v is not None})
    if spec.encoding == "longrope":
        return _as_longrope(new, config)
    return new


def _as_longrope(new: dict, config) -> dict:
    """Exact LongRoPE form of static YaRN/PI: per-pair factors θ_i / θ'_i (same for short and long) and the
    attention factor written out, so Phi-3's loader reproduces the frequencies at every length."""
    math_dict = {**new, "max_position_embeddings": config.max_position_embeddings}
    math_dict.setdefault("original_max_position_embeddings", config.original_max_position_embeddings)
    scaled, attention = rope.compute_inv_freq(math_dict, rope.head_dim(config), config.max_position_embeddings)
    dim = rope.rotary_dim(rope.head_dim(config), new.get("partial_rotary_factor", 1.0))
    factors = (rope.default_inv_freq(dim, float(new["rope_theta"])) / scaled).tolist()
    out = {k: new[k] for k in ("rope_theta", "partial_rotary_factor") if k in new}
    return {**out, "rope_type": "longrope", "short_factor": factors, "long_factor": list(factors),
            "factor": new["factor"], "original_max_position_embeddings": math_dict["original_max_position_embeddings"],
            "attention_factor": float(attention)}


def _as_rope_math_dict(new: dict, rope_type: str, factor: float, original: int) -> dict:
    """The dict `rope.compute_inv_freq` reads, for the attention factor of what was installed."""
    if new.get("rope_type") == "longrope":
        return {"rope_type": "yarn", "rope_theta": new["rope_theta"], "factor": factor,
                "original_max_position_embeddings": original, "attention_factor": new["attention_factor"]}
    return new


def rotary_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Every rotary-embedding module as `(parent, attribute, module)`: transformers' `*RotaryEmbedding` classes,
    which build their frequencies from `module.config`. The one definition the patch, export and runtime use."""
    return [(parent, attribute, child) for parent in model.modules() for attribute, child in parent.named_children()
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "config")]


def rebuild_rotary_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace every rotary module with a fresh one built from its (edited) config, on the old one's device, as
    transformers would on load. Returns `(parent, attribute, old module)` for each, so the change can be undone."""
    replaced = rotary_modules(model)
    for parent, attribute, old in replaced:
        buffers = list(old.buffers())
        device = buffers[0].device if buffers else torch.device("cpu")
        setattr(parent, attribute, type(old)(config=old.config).to(device))
    return replaced


def rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    """The model's rotary module with one set of frequencies (`inv_freq`, `attention_scaling`), as the streaming
    runtime re-rotates keys with it; per-layer-type modules (Gemma 3) have none and are refused."""
    for _, _, module in rotary_modules(model):
        if hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            return module
    raise RopeScalingError(f"{type(model).__name__} has no rotary embedding module with one `inv_freq` and "
                           "`attention_scaling`; the sink cache only supports such RoPE models")


def _dynamic_yarn_init(config, device=None, seq_len=None, layer_type=None):
    """transformers rope-init signature for `dynamic_yarn` (called at init and when the sequence grows)."""
    params = config.rope_parameters
    length = None if seq_len is None else int(seq_len)
    inv_freq, attention = rope.compute_inv_freq(params, rope.head_dim(config), config.max_position_embeddings, length)
    return inv_freq.to(device=device, dtype=torch.float32), attention


def register_rope_types() -> None:
    """Add `dynamic_yarn` to transformers' rope registry (idempotent); call it before building a model from a
    config that may use it."""
    ROPE_INIT_FUNCTIONS.setdefault("dynamic_yarn", _dynamic_yarn_init)
