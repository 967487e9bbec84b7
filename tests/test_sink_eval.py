"""Attention-sink measurement (yarnkit/eval/attention_sinks.py): per-layer attention mass on the first positions checked
against a float64 softmax of the model's own queries and keys (RoPE written out here, not transformers'), a run's
checkpoints measured oldest first (skipping those already done), the streaming table by k and both PNGs.

Run: python -m pytest tests/test_sink_eval.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from yarnkit.eval.attention_sinks import attention_mass, plot_attention_mass, plot_stream_table


def reference_mass(model, ids: torch.Tensor, first: int) -> torch.Tensor:
    """[layers, heads, first] mean over queries i >= first of softmax(q_i k_j / sqrt(d)) at keys j < first, float64."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    positions = torch.arange(ids.shape[1], dtype=torch.float64)
    angles = positions[:, None] / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rotate(x):  # [heads, T, dim], Llama's half-split rotation
        half = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1)
        return x * cos + half * sin

    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        out = []
        for layer, hidden in zip(model.model.layers, states):
            x = layer.input_layernorm(hidden)[0].double()
            q = (x @ layer.self_attn.q_proj.weight.double().T).reshape(-1, heads, dim).transpose(0, 1)
            k = (x @ layer.self_attn.k_proj.weight.double().T).reshape(-1, kv_heads, dim).transpose(0, 1)
            k = k.repeat_interleave(heads // kv_heads, dim=0)
            scores = rotate(q) @ rotate(k).transpose(1, 2) / math.sqrt(dim)
            scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), -math.inf)
            probs = scores.softmax(-1)
            out.append(probs[:, first:, :first].mean(1))
    return torch.stack(out)


def test_attention_mass_matches_a_float64_softmax():
    model = tiny_model("llama", seed=3, num_hidden_layers=2)
    with torch.no_grad():  # sharper attention than the 0.02 init, so the probabilities are far from uniform
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(6.0)
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    result = attention_mass(model, ids, first=4)
    expected = torch.stack([reference_mass(model, row[None], 4) for row in ids]).mean(0)  # [layers, heads, 4]
    torch.testing.assert_close(torch.tensor(result["mass"]), expected.mean(1).float(), atol=1e-6, rtol=1e-5)
    share = (expected[:, :, 0] > 0.3).double().mean(1).float()
    assert result["sink_heads"] == share.tolist()
    assert all(0 < m[0] < 1 for m in result["mass"])


def test_attention_mass_needs_eager_probabilities_and_long_enough_rows():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="T > 4"):
        attention_mass(model, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attn_implementation='eager'"):  # sdpa returns no probabilities
        attention_mass(model, torch.ones(1, 8, dtype=torch.long))


def test_plots_are_written(tmp_path):
    rows = [{"step": s, "mass": [[0.01 * s, 0.01, 0.0, 0.0], [0.02 * s, 0.0, 0.0, 0.0]], "sink_heads": [0.0, 0.5]}
            for s in (10, 20)]
    path = plot_attention_mass({"vanilla": rows, "sink": rows}, tmp_path / "mass.png")
    tables = {"vanilla": {0: 30.0, 1: 20.0, 2: 19.0, 4: 18.0}, "sink": {0: 900.0, 1: 18.0, 2: 18.0, 4: 18.0}}
    bars = plot_stream_table(tables, tables, 1024, tmp_path / "stream.png")
    assert path.stat().st_size > 10_000 and bars.stat().st_size > 10_000
