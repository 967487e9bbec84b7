"""RoPE math as pure functions: inverse frequencies and attention factors for every scaling yarnkit offers.

No nn.Module and no transformers import: numbers and tensors in, tensors out (float64 unless asked otherwise).
`yarnkit.patch` uses these to check what it installs; `yarnkit info` prints them; tests compare them with
`transformers.modeling_rope_utils` and with a float64 transcription of the YaRN paper.

Notation (YaRN paper, arXiv 2309.00071): rotary dim d, base b (`rope_theta`), pair i = 0..d/2-1 with
inv_freq θ_i = b^(-2i/d) and wavelength λ_i = 2π/θ_i; pretraining length L (`original_max_position_embeddings`),
scale s = L'/L.

Rope types (the names are the `rope_type` values of `config.rope_parameters`):
- `default`: θ_i.
- `linear` (Position Interpolation): θ_i / s.
- `ntk` (static NTK-aware): base b·s^(d/(d-2)). Stored in a checkpoint as `default` with the new `rope_theta`.
- `dynamic` (dynamic NTK, transformers' semantics): base b·(s·l/L - (s-1))^(d/(d-2)) at current length l > L.
- `yarn`: NTK-by-parts ramp between the pairs that rotate `beta_fast` and `beta_slow` times over L, blended
  linearly in frequency, plus the attention factor 0.1·ln s + 1 (or the `mscale`/`mscale_all_dim` ratio)
  applied to cos and sin.
- `dynamic_yarn`: YaRN with s = max(1, l/L) recomputed from the current length l (grow-only within a
  forward cache; `finetuned=True` floors s at `factor`). Not in transformers or vLLM: yarnkit registers it.
"""

from __future__ import annotations

import math

import torch

SCALING_TYPES = ("linear", "ntk", "dynamic", "yarn", "dynamic_yarn")  # what `yarnkit.patch` applies
ROPE_TYPES = ("default", *SCALING_TYPES)  # what `compute_inv_freq` computes
YARN_KEYS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


def head_dim(config) -> int:
    """Channels per attention head: `config.head_dim` when set, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """Number of rotated channels per head (transformers' `int(head_dim * partial_rotary_factor)`)."""
    return int(head_dim * partial_rotary_factor)


def default_inv_freq(dim: int, base: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """θ_i = base^(-2i/dim) for i = 0..dim/2-1."""
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=dtype) / dim)


def linear_inv_freq(dim: int, base: float, factor: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Position Interpolation: every frequency divided by `factor`."""
    return default_inv_freq(dim, base, dtype) / factor


def ntk_base(dim: int, base: float, factor: float) -> float:
    """Static NTK-aware base change b' = b·s^(d/(d-2)) (YaRN paper Eq. 16)."""
    return base * factor ** (dim / (dim - 2))


def dynamic_ntk_base(dim: int, base: float, factor: float, seq_len: int, max_position_embeddings: int) -> float:
    """Dynamic NTK base at length `seq_len`; unchanged up to `max_position_embeddings` (transformers' formula)."""
    seq_len = max(seq_len, max_position_embeddings)
    return base * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))


def yarn_find_correction_dim(num_rotations: float, dim: int, base: float, original_max_position_embeddings: int) -> float:
    """Fractional pair index whose wavelength turns `num_rotations` times over the original context."""
    return dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(dim: int, base: float, original_max_position_embeddings: int, beta_fast: float = 32,
                          beta_slow: float = 1, truncate: bool = True) -> tuple[float, float]:
    """Pair indices (low, high) where the ramp starts and ends; floor/ceil unless `truncate=False` (gpt-oss)."""
    low = yarn_find_correction_dim(beta_fast, dim, base, original_max_position_embeddings)
    high = yarn_find_correction_dim(beta_slow, dim, base, original_max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, n_pairs: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """γ_i = clamp((i - low)/(high - low), 0, 1): 0 keeps a pair's frequency, 1 interpolates it fully."""
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    return ((torch.arange(n_pairs, dtype=dtype) - low) / (high - low)).clamp(0, 1)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """0.1·mscale·ln(scale) + 1 for scale > 1, else 1 (YaRN Eq. 22 with DeepSeek's multiplier)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, attention_factor: float | None = None, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
    """The factor multiplied into cos and sin: explicit value, else the mscale ratio, else 0.1·ln s + 1."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return yarn_get_mscale(factor)


def yarn_extrapolation_weight(dim: int, base: float, original_max_position_embeddings: int, beta_fast: float = 32,
                              beta_slow: float = 1, truncate: bool = True,
                              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per pair, the weight of the original frequency (1 = extrapolated, 0 = interpolated by s)."""
    low, high = yarn_correction_range(dim, base, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    return 1 - yarn_ramp(low, high, dim // 2, dtype)


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_position_embeddings: int, beta_fast: float = 32,
                  beta_slow: float = 1, truncate: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """NTK-by-parts frequencies: θ_i·w_i + (θ_i/s)·(1 - w_i), w the extrapolation weight."""
    extrapolated = default_inv_freq(dim, base, dtype)
    weight = yarn_extrapolation_weight(dim, base, original_max_position_embeddings, beta_fast, beta_slow, truncate, dtype)
    return extrapolated / factor * (1 - weight) + extrapolated * weight


def dynamic_yarn_scale(seq_len: int | None, original_max_position_embeddings: int, factor: float,
                       finetuned: bool = False) -> float:
    """The scale dynamic YaRN uses at length `seq_len`: l/L past the original context, floored at 1 (or `factor`)."""
    floor = factor if finetuned else 1.0
    if seq_len is None:
        return floor
    return max(floor, seq_len / original_max_position_embeddings)


def compute_inv_freq(rope_parameters: dict, head_dim: int, max_position_embeddings: int, seq_len: int | None = None,
                     dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """`(inv_freq, attention_factor)` for one `rope_parameters` dict (the flat v5 layout).

    `max_position_embeddings` is the config's value: `dynamic` reads it as the pretraining length, as
    transformers does. `seq_len` matters only for the dynamic types.
    """
    params = dict(rope_parameters)
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = float(params["rope_theta"])
    dim = rotary_dim(head_dim, params.get("partial_rotary_factor", 1.0))
    if rope_type == "default":
        return default_inv_freq(dim, base, dtype), 1.0
    factor = float(params["factor"])
    if rope_type == "linear":
        return linear_inv_freq(dim, base, factor, dtype), 1.0
    if rope_type == "ntk":
        return default_inv_freq(dim, ntk_base(dim, base, factor), dtype), 1.0
    if rope_type == "dynamic":
        length = max_position_embeddings if seq_len is None else seq_len
        return default_inv_freq(dim, dynamic_ntk_base(dim, base, factor, length, max_position_embeddings), dtype), 1.0
    if rope_type in ("yarn", "dynamic_yarn"):
        original = int(params["original_max_position_embeddings"])
        if rope_type == "dynamic_yarn":
            factor = dynamic_yarn_scale(seq_len, original, factor, bool(params.get("finetuned", False)))
        inv_freq = yarn_inv_freq(dim, base, factor, original, params.get("beta_fast") or 32,
                                 params.get("beta_slow") or 1, params.get("truncate", True), dtype)
        attention = yarn_attention_factor(factor, params.get("attention_factor"), params.get("mscale"),
                                          params.get("mscale_all_dim"))
        return inv_freq, attention
    raise ValueError(f"unknown rope_type {rope_type!r}; yarnkit computes {', '.join(ROPE_TYPES)}")


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin in transformers' layout: angles `positions ⊗ inv_freq` repeated twice along the last dim."""
    angles = positions[..., None].to(inv_freq.dtype) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def yarn_table(dim: int, base: float, factor: float, original_max_position_embeddings: int, beta_fast: float = 32,
               beta_slow: float = 1, truncate: bool = True) -> list[dict]:
    """One row per frequency pair: wavelength, rotations over L, extrapolation weight, and how YaRN treats it."""
    theta = default_inv_freq(dim, base)
    weight = yarn_extrapolation_weight(dim, base, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    scaled = yarn_inv_freq(dim, base, factor, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    rows = []
    for i in range(dim // 2):
        w = float(weight[i])
        mode = "extrapolated" if w >= 1.0 else "interpolated" if w <= 0.0 else "blended"
        wavelength = 2 * math.pi / float(theta[i])
        rows.append(dict(pair=i, wavelength=wavelength, rotations=original_max_position_embeddings / wavelength,
                         extrapolation_weight=w, mode=mode, inv_freq=float(theta[i]), scaled_inv_freq=float(scaled[i]),
                         scaled_wavelength=2 * math.pi / float(scaled[i])))
    return rows
