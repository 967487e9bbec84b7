"""RoPE math against two references: transformers' `modeling_rope_utils` and the YaRN paper's formulas.

    python -m pytest tests/test_rope.py

Tolerances: against transformers (which computes in float32) the relative difference must be ≤ 1e-6;
against the float64 transcription of the paper below, ≤ 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from yarnkit import rope

HF_RTOL = 1e-6
PAPER_RTOL = 1e-12

# (head_dim, theta, native context L, factor, partial_rotary_factor, extra yarn keys)
CASES = [
    (64, 1e5, 8192, 4.0, 1.0, {}),                                       # SmolLM2
    (128, 1e4, 4096, 16.0, 1.0, {}),                                     # Llama-2 64k (the paper's run)
    (128, 1e6, 32768, 4.0, 1.0, {"beta_fast": 64, "beta_slow": 2}),      # Qwen-style, tuned betas
    (64, 150000.0, 4096, 32.0, 1.0, {"truncate": False}),                # gpt-oss style
    (128, 1e4, 4096, 40.0, 1.0, {"mscale": 1.0, "mscale_all_dim": 0.707}),  # DeepSeek-style mscale ratio
    (96, 1e4, 4096, 8.0, 0.5, {"attention_factor": 1.3}),                # partial rotary, explicit attention factor
    (64, 1e4, 2048, 2.0, 0.75, {}),                                      # partial rotary, small factor
]


def hf_config(head_dim, theta, native, rope_parameters, partial):
    params = {"rope_theta": theta, **rope_parameters}
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=native, rope_parameters=params)


def assert_rel_close(ours, theirs, rtol):
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    assert ours.shape == theirs.shape
    rel = ((ours - theirs).abs() / theirs.abs().clamp_min(1e-30)).max().item()
    assert rel <= rtol, f"max relative difference {rel:.3e} > {rtol:.0e}"


@pytest.mark.parametrize("head_dim,theta,native,factor,partial,extra", CASES)
def test_yarn_matches_transformers(head_dim, theta, native, factor, partial, extra):
    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": native, **extra}
    config = hf_config(head_dim, theta, int(native * factor), params, partial)
    hf_inv_freq, hf_attention = ROPE_INIT_FUNCTIONS["yarn"](config)
    ours, attention = rope.compute_inv_freq({**params, "rope_theta": theta, "partial_rotary_factor": partial},
                                            head_dim, config.max_position_embeddings)
    assert_rel_close(ours, hf_inv_freq, HF_RTOL)
    assert attention == pytest.approx(hf_attention, rel=HF_RTOL)


@pytest.mark.parametrize("head_dim,theta,native,factor,partial,_", CASES)
def test_linear_matches_transformers(head_dim, theta, native, factor, partial, _):
    params = {"rope_type": "linear", "factor": factor}
    config = hf_config(head_dim, theta, native, params, partial)
    hf_inv_freq, hf_attention = ROPE_INIT_FUNCTIONS["linear"](config)
    ours, attention = rope.compute_inv_freq({**params, "rope_theta": theta, "partial_rotary_factor": partial},
                                            head_dim, native)
    assert_rel_close(ours, hf_inv_freq, HF_RTOL)
    assert attention == hf_attention == 1.0


@pytest.mark.parametrize("seq_len", [None, 100, 8192, 8193, 20000, 65536])
@pytest.mark.parametrize("head_dim,theta,native,factor,partial,_", CASES[:3] + CASES[5:6])
def test_dynamic_ntk_matches_transformers(head_dim, theta, native, factor, partial, _, seq_len):
    params = {"rope_type": "dynamic", "factor": factor}
    config = hf_config(head_dim, theta, native, params, partial)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=seq_len)
    ours, _ = rope.compute_inv_freq({**params, "rope_theta": theta, "partial_rotary_factor": partial},
                                    head_dim, native, seq_len=seq_len)
    assert_rel_close(ours, hf_inv_freq, HF_RTOL)


def test_default_matches_transformers():
    config = hf_config(64, 1e5, 8192, {"rope_type": "default"}, 1.0)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    assert_rel_close(rope.default_inv_freq(64, 1e5), hf_inv_freq, HF_RTOL)


# ---- an independent float64 transcription of the YaRN paper (arXiv 2309.00071 v2, §3) ----

def paper_yarn(d, b, L, s, alpha=1.0, beta=32.0):
    """Eq. 17-18 and 22, written pair by pair. r(i) = L/λ_i rotations; the ramp is linear in the pair index
    between the indices where r = beta and r = alpha (as every implementation does), with floor/ceil."""
    theta = [b ** (-2 * i / d) for i in range(d // 2)]

    def index_where_rotations(r):  # solve L / (2π b^(2i/d)) = r for i
        return (d / 2) * math.log(L / (2 * math.pi * r)) / math.log(b)

    low = max(math.floor(index_where_rotations(beta)), 0)
    high = min(math.ceil(index_where_rotations(alpha)), d - 1)
    out = []
    for i, t in enumerate(theta):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep θ (many rotations), 1: θ/s
        gamma = 1.0 - ramp
        out.append((1 - gamma) * t / s + gamma * t)
    sqrt_inv_t = 0.1 * math.log(s) + 1
    return out, sqrt_inv_t


@pytest.mark.parametrize("d,b,L,s", [(64, 1e5, 8192, 4.0), (128, 1e4, 4096, 16.0), (128, 1e4, 4096, 32.0),
                                     (64, 1e4, 2048, 2.0)])
def test_yarn_matches_paper_float64(d, b, L, s):
    expected, mscale = paper_yarn(d, b, L, s)
    ours = rope.yarn_inv_freq(d, b, s, L)
    assert_rel_close(ours, expected, PAPER_RTOL)
    assert rope.yarn_attention_factor(s) == pytest.approx(mscale, rel=PAPER_RTOL)


def test_yarn_ramp_semantics_per_pair():
    """Pairs turning more than beta_fast=32 times over L keep θ; fewer than beta_slow=1 times get θ/s."""
    d, b, L, s = 128, 1e4, 4096, 16.0
    theta = rope.default_inv_freq(d, b).tolist()
    scaled = rope.yarn_inv_freq(d, b, s, L).tolist()
    rotations = [L * t / (2 * math.pi) for t in theta]
    low, high = rope.yarn_correction_range(d, b, L)
    assert (low, high) == (20, 46)  # the worked Llama-2 example in ../shared/reference/yarn.md §1.1
    for i in range(d // 2):
        if i <= low:
            assert rotations[i] > 32 and scaled[i] == pytest.approx(theta[i], rel=1e-15)
        elif i >= high:
            assert rotations[i] < 1 and scaled[i] == pytest.approx(theta[i] / s, rel=1e-15)
        else:
            assert theta[i] / s < scaled[i] < theta[i]


@pytest.mark.parametrize("s,expected", [(2, 1.069), (4, 1.139), (8, 1.208), (16, 1.277), (32, 1.347)])
def test_mscale_table(s, expected):
    assert rope.yarn_get_mscale(s) == pytest.approx(expected, abs=5e-4)


def test_ntk_and_linear_paper_formulas():
    d, b, s = 64, 1e4, 8.0
    ntk = rope.compute_inv_freq({"rope_type": "ntk", "rope_theta": b, "factor": s}, d, 2048)[0]
    expected = [(b * s ** (d / (d - 2))) ** (-2 * i / d) for i in range(d // 2)]  # paper Eq. 16
    assert_rel_close(ntk, expected, PAPER_RTOL)
    # NTK-aware keeps the highest frequency and scales the lowest by exactly s (its design goal)
    assert ntk[0] == pytest.approx(1.0)
    assert (rope.default_inv_freq(d, b)[-1] / ntk[-1]).item() == pytest.approx(s ** ((d - 2) / (d - 2)), rel=1e-12)
    pi = rope.compute_inv_freq({"rope_type": "linear", "rope_theta": b, "factor": s}, d, 2048)[0]
    assert_rel_close(pi, [b ** (-2 * i / d) / s for i in range(d // 2)], PAPER_RTOL)


def test_dynamic_yarn_scale_follows_length():
    params = {"rope_type": "dynamic_yarn", "rope_theta": 1e5, "factor": 4.0, "original_max_position_embeddings": 8192}
    short, short_attention = rope.compute_inv_freq(params, 64, 8192, seq_len=4000)
    assert_rel_close(short, rope.default_inv_freq(64, 1e5), PAPER_RTOL)  # within the native context: plain RoPE
    assert short_attention == 1.0
    for length in (12288, 16384, 50000):
        inv_freq, attention = rope.compute_inv_freq(params, 64, 8192, seq_len=length)
        s = length / 8192
        assert_rel_close(inv_freq, rope.yarn_inv_freq(64, 1e5, s, 8192), PAPER_RTOL)
        assert attention == pytest.approx(0.1 * math.log(s) + 1)
    finetuned = rope.compute_inv_freq({**params, "finetuned": True}, 64, 8192, seq_len=100)[0]
    assert_rel_close(finetuned, rope.yarn_inv_freq(64, 1e5, 4.0, 8192), PAPER_RTOL)


def test_partial_rotary_dimension():
    inv_freq, _ = rope.compute_inv_freq({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                         "original_max_position_embeddings": 2048, "partial_rotary_factor": 0.5},
                                        head_dim=96, max_position_embeddings=8192)
    assert inv_freq.shape == (24,)  # rotary dim 48 -> 24 pairs


def test_cos_sin_layout_matches_transformers_rotary():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 1e4}
    config = hf_config(16, 1e4, 1024, params, 1.0)
    positions = torch.arange(0, 1000, 7)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    inv_freq, attention = rope.compute_inv_freq(params, 16, 1024)
    cos, sin = rope.cos_sin(inv_freq, positions, attention)
    torch.testing.assert_close(cos.float(), hf_cos, atol=2e-4, rtol=0)  # float32 angles up to ~1000 rad
    torch.testing.assert_close(sin.float(), hf_sin, atol=2e-4, rtol=0)


def test_unknown_rope_type_is_named():
    with pytest.raises(ValueError, match="unknown rope_type 'yarnn'"):
        rope.compute_inv_freq({"rope_type": "yarnn", "rope_theta": 1e4, "factor": 2.0}, 64, 2048)


def test_yarn_table_modes():
    rows = rope.yarn_table(64, 1e5, 4.0, 8192)
    modes = [row["mode"] for row in rows]
    assert modes[0] == "extrapolated" and modes[-1] == "interpolated" and "blended" in modes
    assert modes == sorted(modes, key=["extrapolated", "blended", "interpolated"].index)  # monotone in i
