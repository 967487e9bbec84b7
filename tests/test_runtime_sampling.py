"""Next-token choice on the model's device (`yarnkit/runtime/sampling.py`), checked on CPU.

Run: `python -m pytest tests/test_runtime_sampling.py -q`

What is proven:
- greedy rows give the previous host sampler's token exactly (`int(logits.float().cpu().argmax())`, ties to the
  lowest id), float32 and bfloat16, alone or in a batch with sampled rows;
- a sampled token is the inverse-CDF pick of an independent plain-Python reference (softmax at the temperature,
  nucleus by sorted mass, one float64 uniform per token from the row's seeded generator), for several
  temperatures and top-p values; over many draws the frequencies match the nucleus probabilities (within 0.03)
  and tokens outside the nucleus are never drawn;
- a batch of rows (greedy, temperature only, top-p) gives each row's solo tokens; a seed repeats its tokens and
  another seed does not; a tiny temperature stays finite (the argmax);
- on CPU the nucleus from the most likely `CANDIDATES` tokens equals the one from sorting the whole vocabulary
  (peaked and flat distributions);
- `StreamingEngine.generate` with a seed repeats its reply.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from yarnkit.runtime import sampling
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.sampling import choose_tokens, nucleus_floor, sample


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_pick(logits: list[float], temperature: float, top_p: float, uniform: float) -> int:
    """Plain-Python sampling by the documented rule (no torch): float64 softmax, nucleus, inverse CDF."""
    top = max(logits)
    weights = [math.exp((x - top) / temperature) for x in logits]
    probs = [w / sum(weights) for w in weights]
    if top_p < 1.0:
        mass, inside = 0.0, set()
        for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
            if mass <= top_p:
                inside.add(i)
            mass += probs[i]
        probs = [p if i in inside else 0.0 for i, p in enumerate(probs)]
    target, cumulative = uniform * sum(probs), 0.0
    for i, p in enumerate(probs):
        cumulative += p
        if cumulative > target:
            return i
    return len(probs) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_give_the_host_argmax(dtype):
    logits = torch.randn(6, 1000, generator=seeded(0)).to(dtype)
    logits[2, 10] = logits[2, 700] = 50.0  # a tie: the lowest id wins
    expected = [int(row.float().cpu().argmax()) for row in logits]
    assert expected[2] == 10
    assert choose_tokens(logits, [0.0] * 6, [1.0] * 6, [None] * 6) == expected
    mixed = choose_tokens(logits, [0.0, 0.7, 0.0, 1.0, 0.0, 0.5], [1.0, 0.9, 1.0, 1.0, 0.5, 1.0],
                          [None, seeded(1), None, seeded(2), None, seeded(3)])
    assert [mixed[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
    assert [sample(row) for row in logits] == expected


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.5, 0.9), (0.8, 0.5), (1.0, 0.05)])
def test_sampled_tokens_are_the_inverse_cdf_pick_of_a_plain_python_reference(temperature, top_p):
    logits = torch.randn(40, 12, generator=seeded(5)) * 2
    ours, draws = seeded(11), seeded(11)
    for row in logits:
        uniform = float(torch.rand((), dtype=torch.float64, generator=draws))
        assert sample(row, temperature, top_p, ours) == reference_pick(row.tolist(), temperature, top_p, uniform)


def test_frequencies_follow_the_nucleus_probabilities():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    probs = torch.softmax(logits.double(), -1)  # 0.563 0.207 0.126 0.028 0.076: top-p 0.8 keeps ids 0, 1, 2
    nucleus = probs * torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    generator = seeded(0)
    draws = choose_tokens(logits.expand(4000, 5), [1.0] * 4000, [0.8] * 4000, [generator] * 4000)
    frequencies = torch.bincount(torch.tensor(draws), minlength=5).double() / 4000
    assert frequencies[3] == 0 and frequencies[4] == 0
    assert (frequencies - nucleus / nucleus.sum()).abs().max() < 0.03


def test_a_batch_gives_each_row_its_solo_tokens_and_a_seed_repeats():
    settings = [(0.0, 1.0), (0.8, 1.0), (1.2, 0.9), (0.6, 0.3), (1.0, 1.0)]
    steps = [torch.randn(5, 300, generator=seeded(step)) * 3 for step in range(20)]

    def batched(seeds):
        generators = [seeded(seed) for seed in seeds]
        return [choose_tokens(logits, [t for t, _ in settings], [p for _, p in settings], generators)
                for logits in steps]

    together = batched(range(5))
    for i, (temperature, top_p) in enumerate(settings):
        generator = seeded(i)
        assert [row[i] for row in together] == [sample(logits[i], temperature, top_p, generator) for logits in steps]
    assert batched(range(5)) == together
    other = batched(range(100, 105))
    assert [row[0] for row in other] == [row[0] for row in together]  # greedy: no seed involved
    assert [row[1:] for row in other] != [row[1:] for row in together]


def test_a_tiny_temperature_stays_finite():
    logits = torch.randn(300, generator=seeded(3))
    assert sample(logits, 1e-30, 1.0, seeded(0)) == int(logits.argmax())
    assert sample(logits, 1e-30, 0.5, seeded(0)) == int(logits.argmax())


@pytest.mark.parametrize("spread", [8.0, 0.01])  # peaked: the nucleus is among the candidates; flat: it is not
def test_cpu_candidates_give_the_full_sort_nucleus(spread, monkeypatch):
    probs = torch.softmax(torch.randn(3, 5000, generator=seeded(4)).double() * spread, -1)
    top_p = torch.tensor([[0.9], [0.5], [0.99]], dtype=torch.float64)
    ordered = probs.sort(-1, descending=True).values
    count = ((ordered.cumsum(-1) - ordered) <= top_p).sum(-1, keepdim=True)
    assert (count < sampling.CANDIDATES).all() == (spread > 1)
    floor = nucleus_floor(probs, top_p)
    assert torch.equal(floor, ordered.gather(-1, count - 1))
    monkeypatch.setattr(sampling, "CANDIDATES", 10**9)  # the whole-vocabulary sort
    assert torch.equal(nucleus_floor(probs, top_p), floor)


def test_generate_with_a_seed_repeats_its_reply():
    model = tiny_model("llama", num_hidden_layers=2)
    prompt = torch.randint(3, 128, (1, 8), generator=seeded(2))

    def reply(seed):
        engine = StreamingEngine(model, sinks=2, window=24, evict_batch=4, decode="static")
        return list(engine.generate(prompt, max_new_tokens=30, temperature=1.0, top_p=0.9,
                                    generator=seeded(seed)))

    assert reply(1) == reply(1) != reply(2)
