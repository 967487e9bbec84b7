"""The RoPE keys an exported `config.json` carries, for every loader at once, and a check of vLLM's reading.

Stock loaders read YaRN from different places:
- transformers v5: `rope_parameters = {rope_type, rope_theta, factor, original_max_position_embeddings, ...}`;
- transformers v4 and vLLM (older releases; newer ones read `rope_parameters` through transformers):
  `rope_scaling = {type | rope_type: "yarn", factor, original_max_position_embeddings, beta_fast?, ...}` plus a
  top-level `rope_theta`.
`export_rope_parameters` turns a checkpoint's rope dict into the static form stock loaders know (yarnkit's
`dynamic_yarn` becomes `yarn` at its trained factor); `legacy_rope_keys` derives the v4/vLLM block from it, and
`check_vllm_rope` tests the keys and value types vLLM's `get_rope` and `max_model_len` logic read, without vLLM.
Pure functions on dicts; tested in tests/test_export.py.
"""

from __future__ import annotations

import math

YARN_OPTIONAL = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
DROPPED_FOR_STATIC = ("finetuned",)  # dynamic_yarn only
STOCK_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def is_per_layer_type(rope_parameters: dict) -> bool:
    """Gemma-3 style `{layer_type: {rope_type, ...}}` instead of one flat dict."""
    return bool(rope_parameters) and all(isinstance(v, dict) for v in rope_parameters.values())


def _static(params: dict, notes: list[str]) -> dict:
    params = dict(params)
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic_yarn":
        params = {k: v for k, v in params.items() if k not in DROPPED_FOR_STATIC}
        params["rope_type"] = "yarn"
        notes.append(f"dynamic_yarn exported as static yarn at its trained factor {params['factor']} "
                     "(stock transformers, vLLM and llama.cpp have no dynamic YaRN)")
    elif rope_type not in STOCK_TYPES:
        raise ValueError(f"rope_type {rope_type!r} has no stock-loader equivalent; stock types: {STOCK_TYPES}")
    if params["rope_type"] == "yarn":
        if "original_max_position_embeddings" not in params:
            raise ValueError("a yarn rope dict needs original_max_position_embeddings (the pre-extension context)")
        params["factor"] = float(params["factor"])
        params["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return params


def export_rope_parameters(rope_parameters: dict) -> tuple[dict, list[str]]:
    """`(static rope_parameters, notes)`: what stock loaders can run, with a note for every change made."""
    notes: list[str] = []
    if is_per_layer_type(rope_parameters):
        return {name: _static(params, notes) for name, params in rope_parameters.items()}, notes
    return _static(rope_parameters, notes), notes


def scaled_max_positions(rope_parameters: dict) -> int | None:
    """factor × original context for yarn (the length vLLM derives as max_model_len), else None."""
    flat = main_rope_dict(rope_parameters)
    if flat.get("rope_type") != "yarn":
        return None
    return int(round(flat["factor"] * flat["original_max_position_embeddings"]))


def main_rope_dict(rope_parameters: dict) -> dict:
    """The dict that carries the scaling: the flat one, or a per-layer config's `full_attention` entry."""
    if is_per_layer_type(rope_parameters):
        return rope_parameters.get("full_attention") or next(iter(rope_parameters.values()))
    return rope_parameters


def legacy_rope_keys(rope_parameters: dict) -> dict:
    """Top-level `rope_theta` and `rope_scaling` as transformers v4 and vLLM's older config readers expect."""
    flat = main_rope_dict(rope_parameters)
    keys = {"rope_theta": float(flat["rope_theta"])} if "rope_theta" in flat else {}
    if flat.get("rope_type", "default") == "default":
        keys["rope_scaling"] = None
        return keys
    block = {k: v for k, v in flat.items() if k not in ("rope_theta",)}
    block["type"] = block["rope_type"]
    keys["rope_scaling"] = block
    return keys


def vllm_max_model_len(config: dict) -> int:
    """The context vLLM derives from a config (its `_get_and_verify_max_len`): the smallest length key, replaced
    by `original_max_position_embeddings × factor` for yarn (other scalings multiply the length key)."""
    lengths = [config[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                                   "model_max_length", "max_sequence_length", "max_seq_length", "seq_len")
               if isinstance(config.get(k), int)]
    derived = min(lengths)
    rope = config.get("rope_scaling") or main_rope_dict(config.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if kind in ("default", "su", "longrope", "llama3") or "factor" not in rope:
        return derived
    if kind == "yarn":
        derived = rope["original_max_position_embeddings"]
    return int(derived * rope["factor"])


def check_vllm_rope(config: dict) -> tuple[list[str], list[str]]:
    """`(errors, warnings)` for an exported config.json as vLLM reads YaRN. Empty errors = vLLM-ready."""
    errors, warnings = [], []
    v5 = main_rope_dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling")
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
    for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
        if key in legacy and (isinstance(legacy[key], bool) or not isinstance(legacy[key], (int, float))):
            errors.append(f"rope_scaling.{key} must be a number, got {legacy[key]!r}")
    if "truncate" in legacy and not isinstance(legacy["truncate"], bool):
        errors.append(f"rope_scaling.truncate must be a bool, got {legacy['truncate']!r}")
    for key in ("factor", "original_max_position_embeddings", *YARN_OPTIONAL):
        if v5.get(key) != legacy.get(key):
            errors.append(f"rope_parameters.{key}={v5.get(key)!r} disagrees with rope_scaling.{key}={legacy.get(key)!r}")
    if errors:
        return errors, warnings
    expected = int(round(legacy["factor"] * original))
    if config.get("max_position_embeddings") != expected:
        errors.append(f"max_position_embeddings={config.get('max_position_embeddings')} should be factor × original "
                      f"= {expected}")
    if vllm_max_model_len(config) != expected:
        errors.append(f"vLLM would derive max_model_len={vllm_max_model_len(config)}, not {expected}")
    if "attention_factor" in legacy or "mscale" in legacy:
        warnings.append("attention_factor/mscale: vLLM releases before the transformers-alignment change (PR #56446) "
                        "ignore them and use 0.1·ln(factor)+1")
    if legacy.get("truncate") is False:
        warnings.append("truncate=false: vLLM releases before PR #28244 always truncate the correction range")
    if not math.isclose(legacy["factor"], expected / original):
        warnings.append("factor × original is not an integer; max_position_embeddings was rounded")
    return errors, warnings
