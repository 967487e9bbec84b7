"""The RoPE keys an exported `config.json` carries, for every loader at once, and a check of vLLM's reading.

Stock loaders read YaRN from different places and with different names for the attention temperature:
- transformers v5 (5.25 checked): `rope_parameters = {rope_type, rope_theta, factor,
  original_max_position_embeddings, beta_fast?, beta_slow?, attention_factor?, mscale?, mscale_all_dim?,
  truncate?}`; when config.json also has `rope_scaling`, that block replaces `rope_parameters` on load.
- transformers v4 (4.57 checked): `rope_scaling` (same keys, `type` or `rope_type`) plus a top-level
  `rope_theta`.
- vLLM from PR #56446 (merged 2026-09-11): the same keys as transformers, through transformers' config.
- vLLM before it (0.26 and older): `rope_scaling` / `rope_parameters` with `factor`,
  `original_max_position_embeddings`, `beta_fast`, `beta_slow`, `truncate` (from PR #28244) and `attn_factor`,
  a multiplier on its own 0.1·ln(s)+1; `attention_factor`, `mscale` and `mscale_all_dim` are ignored there.

`export_rope_parameters` turns a checkpoint's rope dict into the static form all of them read alike (yarnkit's
`dynamic_yarn` becomes `yarn` at its trained factor; a beta of 0 becomes the value transformers trained with; an
`mscale` pair becomes the explicit `attention_factor` it stands for) and refuses, with the key and the fix, a
setting they would read differently. `legacy_rope_keys` derives the v4/vLLM block from it, adding
`attn_factor = attention_factor / (0.1·ln s + 1)` when the temperature is not YaRN's default, and
`check_vllm_rope` tests what both vLLM generations would compute, without vLLM.
Pure functions on dicts; tested in tests/test_export.py and tests/test_export_rope.py.
"""

from __future__ import annotations

import math

from yarnkit.errors import ExportError
from yarnkit.rope import yarn_attention_factor, yarn_get_mscale

YARN_OPTIONAL = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
YARN_NUMBERS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")
BETA_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0}  # YaRN's; transformers reads a 0 as these (`or 32`)
DROPPED_FOR_STATIC = ("finetuned",)  # dynamic_yarn only
STOCK_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_sequence_length", "max_seq_length", "seq_len")  # vLLM's `_get_and_verify_max_len`


def is_per_layer_type(rope_parameters: dict) -> bool:
    """Gemma-3 style `{layer_type: {rope_type, ...}}` instead of one flat dict."""
    return bool(rope_parameters) and all(isinstance(v, dict) for v in rope_parameters.values())


def _static(params: dict, notes: list[str]) -> dict:
    params = dict(params)
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic_yarn":
        if not params.get("finetuned"):
            raise ExportError(
                f"rope_type 'dynamic_yarn' with finetuned=false rescales RoPE with the prompt length (scale "
                f"max(1, length / original)); stock loaders only run static YaRN, which at factor {params['factor']} "
                "would change the model's output on every shorter prompt",
                "serve this checkpoint with yarnkit chat/serve/eval (they run dynamic_yarn), or fine-tune with "
                "yarn.rope_type=yarn for a model that exports")
        params = {k: v for k, v in params.items() if k not in DROPPED_FOR_STATIC}
        params["rope_type"] = "yarn"
        notes.append(f"dynamic_yarn exported as static yarn at its trained factor {params['factor']} "
                     "(stock transformers, vLLM and llama.cpp have no dynamic YaRN)")
    elif rope_type not in STOCK_TYPES:
        raise ExportError(f"rope_type {rope_type!r} has no stock-loader equivalent "
                          f"(stock types: {', '.join(STOCK_TYPES)})",
                          "fine-tune with yarn.rope_type=yarn, or serve the checkpoint with yarnkit")
    if params["rope_type"] == "yarn":
        _portable_yarn(params, notes)
    return params


def _portable_yarn(params: dict, notes: list[str]) -> None:
    """Normalise one yarn dict in place to values every loader reads as transformers does."""
    if not params.get("original_max_position_embeddings"):
        raise ExportError("this yarn rope dict has no original_max_position_embeddings (the pre-extension context); "
                          "transformers would fill in max_position_embeddings and move the YaRN ramp",
                          "set rope_parameters.original_max_position_embeddings in config.json to the base model's "
                          "context (the recipe's yarn.original_max_position_embeddings)")
    params["factor"] = float(params["factor"])
    params["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    for key in YARN_NUMBERS:
        if key in params and params[key] is None:
            del params[key]
        elif key in params and (isinstance(params[key], bool) or not isinstance(params[key], (int, float))):
            raise ExportError(f"rope_parameters.{key}={params[key]!r} is not a number", f"write {key} as a number")
        elif key in params:
            params[key] = float(params[key])
    for key, default in BETA_DEFAULTS.items():
        if params.get(key) == 0:
            params[key] = default
            notes.append(f"{key}=0 written as {default}: transformers, which ran this model, reads 0 as YaRN's "
                         f"default ({key} or {default:g}); vLLM and llama.cpp would use 0")
        elif params.get(key, 1) < 0:
            raise ExportError(f"yarn.{key}={params[key]:g} is negative: YaRN's ramp takes log(L / ({key}·2π)) of it",
                              f"set yarn.{key} to a positive number of rotations (YaRN's default {default:g})")
    if "truncate" in params and not isinstance(params["truncate"], bool):
        raise ExportError(f"rope_parameters.truncate={params['truncate']!r} is not true/false: loaders test it for "
                          "truthiness, so a string such as 'false' still truncates", "write truncate as a JSON boolean")
    if params.get("attention_factor") is None and params.get("mscale") and params.get("mscale_all_dim"):
        params["attention_factor"] = attention_factor(params)
        notes.append(f"attention_factor {params['attention_factor']:.6g} (the mscale / mscale_all_dim ratio) written "
                     "explicitly: loaders that ignore mscale read it")


def export_rope_parameters(rope_parameters: dict) -> tuple[dict, list[str]]:
    """`(static rope_parameters, notes)`: what stock loaders can run, with a note for every change made.
    Raises ExportError for a setting no stock loader can reproduce."""
    notes: list[str] = []
    if is_per_layer_type(rope_parameters):
        return {name: _static(params, notes) for name, params in rope_parameters.items()}, notes
    return _static(rope_parameters, notes), notes


def attention_factor(yarn: dict) -> float:
    """The factor transformers multiplies into cos and sin for a yarn dict: explicit, else the mscale ratio,
    else 0.1·ln(factor)+1."""
    return yarn_attention_factor(float(yarn["factor"]), yarn.get("attention_factor"), yarn.get("mscale"),
                                 yarn.get("mscale_all_dim"))


def legacy_attn_factor(yarn: dict) -> float | None:
    """vLLM's pre-PR-#56446 `attn_factor` (a multiplier on its 0.1·ln(s)+1) that gives transformers' attention
    factor; None when that is YaRN's default, so the key is only written where it changes something."""
    wanted, default = attention_factor(yarn), yarn_get_mscale(float(yarn["factor"]))
    return None if math.isclose(wanted, default, rel_tol=1e-12) else wanted / default


def scaled_max_positions(rope_parameters: dict) -> int | None:
    """factor × original for yarn, else None; a non-integer product is floored, the length vLLM before PR #56446
    derives (`int(original × factor)`), so every loader agrees on the context."""
    flat = main_rope_dict(rope_parameters)
    if flat.get("rope_type") != "yarn":
        return None
    product = float(flat["factor"]) * int(flat["original_max_position_embeddings"])
    nearest = round(product)
    return nearest if math.isclose(product, nearest, rel_tol=0, abs_tol=1e-6) else math.floor(product)


def main_rope_dict(rope_parameters: dict) -> dict:
    """The dict that carries the scaling: the flat one, or a per-layer config's `full_attention` entry."""
    if is_per_layer_type(rope_parameters):
        return rope_parameters.get("full_attention") or next(iter(rope_parameters.values()))
    return rope_parameters


def legacy_rope_keys(rope_parameters: dict) -> dict:
    """Top-level `rope_theta` and `rope_scaling` as transformers v4 and vLLM's older readers expect, with the
    `attn_factor` vLLM before PR #56446 needs for a non-default temperature."""
    flat = main_rope_dict(rope_parameters)
    keys = {"rope_theta": float(flat["rope_theta"])} if "rope_theta" in flat else {}
    if flat.get("rope_type", "default") == "default":
        keys["rope_scaling"] = None
        return keys
    block = {k: v for k, v in flat.items() if k not in ("rope_theta",)}
    block["type"] = block["rope_type"]
    if block["rope_type"] == "yarn" and (multiplier := legacy_attn_factor(block)) is not None:
        block["attn_factor"] = multiplier
    keys["rope_scaling"] = block
    return keys


def vllm_max_model_len(config: dict, aligned: bool = False, tokenizer_max_length: int | None = None) -> int:
    """The context vLLM derives from a config (its `_get_and_verify_max_len`): the smallest length key (and the
    tokenizer's `model_max_length`), times the factor of a scaling. Before PR #56446 (`aligned=False`) a yarn
    config restarts from `original_max_position_embeddings` first, so the tokenizer's limit does not count; from it
    (`aligned=True`), yarn's limit is the length key itself."""
    lengths = [config[k] for k in LENGTH_KEYS if isinstance(config.get(k), int)]
    derived = min(lengths + ([tokenizer_max_length] if tokenizer_max_length else []))
    rope = config.get("rope_scaling") or main_rope_dict(config.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if kind in ("default", "su", "longrope", "llama3") or "factor" not in rope:
        return int(derived)
    if kind == "yarn":
        return int(derived) if aligned else int(rope["original_max_position_embeddings"] * rope["factor"])
    return int(derived * rope["factor"])


def check_vllm_rope(config: dict, tokenizer_max_length: int | None = None) -> tuple[list[str], list[str]]:
    """`(errors, warnings)` for an exported config.json as both vLLM generations read YaRN. Empty errors =
    vLLM-ready: same frequencies, same attention factor and same context as transformers."""
    errors, warnings = [], []
    v5 = main_rope_dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling")
    if v5.get("rope_type") == "dynamic":
        warnings.append("rope_type dynamic (NTK): vLLM uses one base for its whole window, transformers recomputes "
                        "it per length; outputs differ below the extended context")
    if v5.get("rope_type") != "yarn":
        return errors, warnings
    if not isinstance(legacy, dict):
        errors.append("rope_scaling block missing: vLLM builds without transformers v5 read YaRN only from it")
        return errors, warnings
    if legacy.get("type") != "yarn" or legacy.get("rope_type") != "yarn":
        errors.append(f"rope_scaling type/rope_type must both be 'yarn', got {legacy.get('type')!r}/"
                      f"{legacy.get('rope_type')!r}")
    if not isinstance(legacy.get("factor"), float) or not legacy["factor"] > 1:
        errors.append(f"rope_scaling.factor must be a float > 1, got {legacy.get('factor')!r}")
    original = legacy.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
        errors.append(f"rope_scaling.original_max_position_embeddings must be a positive int, got {original!r}")
    for key in (*YARN_NUMBERS, "attn_factor"):
        if key in legacy and (isinstance(legacy[key], bool) or not isinstance(legacy[key], (int, float))):
            errors.append(f"rope_scaling.{key} must be a number, got {legacy[key]!r}")
    if "truncate" in legacy and not isinstance(legacy["truncate"], bool):
        errors.append(f"rope_scaling.truncate must be a bool, got {legacy['truncate']!r}")
    for key in ("factor", "original_max_position_embeddings", *YARN_OPTIONAL):
        if v5.get(key) != legacy.get(key):
            errors.append(f"rope_parameters.{key}={v5.get(key)!r} disagrees with rope_scaling.{key}={legacy.get(key)!r}")
    if errors:
        return errors, warnings
    wanted = attention_factor(v5)
    before = yarn_get_mscale(legacy["factor"]) * legacy.get("attn_factor", 1.0)
    if not math.isclose(before, wanted, rel_tol=1e-9):
        errors.append(f"vLLM before PR #56446 would scale cos/sin by {before:.6g} (attn_factor × (0.1·ln s + 1)), "
                      f"transformers by {wanted:.6g}: rope_scaling.attn_factor must be "
                      f"{wanted / yarn_get_mscale(legacy['factor']):.9g}")
    expected = scaled_max_positions(v5)
    if config.get("max_position_embeddings") != expected:
        errors.append(f"max_position_embeddings={config.get('max_position_embeddings')} should be factor × original "
                      f"= {expected}")
    for aligned, label in ((False, "before PR #56446"), (True, "from PR #56446")):
        derived = vllm_max_model_len(config, aligned, tokenizer_max_length)
        if derived != expected:
            errors.append(f"vLLM {label} would derive max_model_len={derived}, not {expected}"
                          + (" (the tokenizer's model_max_length caps it)" if aligned and tokenizer_max_length else ""))
    if legacy.get("truncate") is False:
        warnings.append("truncate=false: vLLM releases before PR #28244 (v0.11.0 and older) always truncate the "
                        "correction range")
    if not math.isclose(legacy["factor"] * original, expected, rel_tol=0, abs_tol=1e-6):
        warnings.append(f"factor × original = {legacy['factor'] * original:g} is not an integer: the context is "
                        f"{expected} tokens (floored) and transformers warns that the factor and the lengths disagree")
    return errors, warnings
