"""STRING attention (yarnkit/string_attention.py), checked against independent references on a tiny random Llama
with grouped-query attention (4 heads / 2 KV heads), float32 on CPU.

- the remap against the paper's formula written out per distance;
- float64: turning a RoPE'd query back by S - W positions is RoPE at position i - S + W (YaRN's attention factor
  carried once), and agrees with the model's own rotary module at that position;
- the fast kernels (FlexAttention two-pass + LSE merge; dense float32) against the float64 reference, which
  scores every (query, key) pair with RoPE at its remapped distance from un-rotated q/k: prefill, step-by-step
  decode through a KV cache, chunked decode, and a padded batch. Tolerance 1e-5 on logits (observed ~2e-7);
- S at or above the sequence length: STRING is the model's own attention (1e-5);
- undo restores the model bit for bit; bad settings are one-line errors;
- `yarnkit eval ppl --string` moves perplexity only when a distance reaches S; (slow) `yarnkit eval retrieval
  --string` on SmolLM2 changes answers at a small S and reproduces the plain run at a large one.

Run: python -m pytest tests/test_string_attention.py -q   (~1 min on 2 cores; the slow SmolLM2 retrieval test ~2.5 min)
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from yarnkit import string_attention as sa
from yarnkit.errors import UserError
from yarnkit.models import forward_with_cache
from yarnkit.patch import apply_rope_scaling, rotary_module

TOL = 1e-5  # float32 logits of the fast kernels vs the float64 reference (observed ~2e-7)


def _model(yarn: bool = False):
    model = tiny_model("llama", seed=3).float()
    if yarn:  # 256 -> 1024 positions, attention factor 0.1 ln 4 + 1 on cos/sin
        apply_rope_scaling(model, "yarn", factor=4)
    return model


def _ids(batch=2, length=70, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, kernel=None, shift=20, window=4, **inputs):
    handle = sa.apply_string(model, shift, window, kernel=kernel) if kernel else None
    try:
        with torch.no_grad():
            return model(input_ids=ids, **inputs).logits
    finally:
        if handle:
            handle.undo()


def test_remap_follows_the_formula():
    shift, window = 50, 8
    for d in range(0, 200):
        expected = d if d < shift else d - shift + window  # the paper: distances >= S become d - S + W
        assert sa.remapped_distance(d, shift, window) == expected
    grid = torch.arange(0, 200)
    assert torch.equal(sa.remapped_distance(grid, shift, window),
                       torch.tensor([d if d < shift else d - shift + window for d in range(200)]))
    assert sa.remapped_distance(199, shift, window) == 157  # the largest distance seen: L - 1 - S + W


def test_shifted_query_is_rope_at_the_earlier_position_float64():
    model = _model(yarn=True)
    rotary = rotary_module(model)
    inv_freq, factor = rotary.inv_freq.double(), float(rotary.attention_scaling)
    assert factor > 1.1  # YaRN's attention factor is on cos/sin: the shift must not apply it again
    raw = torch.randn(1, 4, 30, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(100, 130)
    shift, window = 60, 5

    def rope(x, at):  # the model's RoPE in float64: a * (x cos + rotate_half(x) sin)
        angles = at.double()[:, None] * inv_freq
        angles = torch.cat((angles, angles), -1)
        return factor * (x * angles.cos() + sa._rotate_half(x) * angles.sin())

    shifted = sa.shifted_query(rope(raw, positions), inv_freq, shift, window)
    assert (shifted - rope(raw, positions - shift + window)).abs().max() < 1e-12
    cos, sin = rotary(raw.float(), (positions - shift + window)[None])  # the module itself (float32)
    own = raw.float() * cos[0] + sa._rotate_half(raw.float()) * sin[0]
    assert (shifted.float() - own).abs().max() < 1e-5


@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn-x4"])
def test_prefill_kernels_equal_the_float64_reference(yarn):
    model, ids = _model(yarn), _ids()
    reference = _logits(model, ids, "reference")
    assert (reference - _logits(model, ids)).abs().max() > 1e-3  # S=20 < 70 tokens: STRING changes the model
    for kernel in ("flex", "dense", "auto"):
        assert (_logits(model, ids, kernel) - reference).abs().max() < TOL, kernel


@pytest.mark.parametrize("kernel", ["flex", "dense"])
@pytest.mark.parametrize("chunk", [1, 7])
def test_decode_through_a_cache_equals_the_full_reference(kernel, chunk):
    """Prefill 50 tokens, then feed the rest `chunk` at a time: positions come from the cache, not the chunk."""
    model, ids = _model(), _ids(batch=2, length=72, seed=2)
    reference = _logits(model, ids, "reference")
    handle = sa.apply_string(model, 20, 4, kernel=kernel)
    steps, cache = [], None
    with torch.no_grad():
        for begin, end in [(0, 50)] + [(b, min(b + chunk, 72)) for b in range(50, 72, chunk)]:
            out, cache = forward_with_cache(model, cache, input_ids=ids[:, begin:end], use_cache=True)
            steps.append(out.logits)
    handle.undo()
    assert cache.get_seq_length() == 72
    assert (torch.cat(steps, dim=1) - reference).abs().max() < TOL


def test_padded_batch_honours_the_attention_mask():
    model, ids = _model(), _ids(batch=3, length=50, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: the mask, not only causality, decides what a row sees
    mask[2, :23] = 0
    reference = _logits(model, ids, "reference", attention_mask=mask)
    for kernel in ("flex", "dense"):
        got = _logits(model, ids, kernel, attention_mask=mask)
        assert (got - reference)[mask.bool()].abs().max() < TOL, kernel


@pytest.mark.parametrize("kernel", ["flex", "dense", "reference"])
def test_shift_beyond_the_sequence_is_the_models_own_attention(kernel):
    model, ids = _model(yarn=True), _ids(length=60)
    own = _logits(model, ids)
    assert (_logits(model, ids, kernel, shift=60, window=4) - own).abs().max() < TOL
    handle = sa.apply_string(model, 200, 16, kernel=kernel)  # decode with a cache too: no key is ever far
    with torch.no_grad():
        out, cache = forward_with_cache(model, None, input_ids=ids[:, :52], use_cache=True)
        steps = [out.logits] + [forward_with_cache(model, cache, input_ids=ids[:, i:i + 1], use_cache=True)[0].logits
                                for i in range(52, 60)]
    handle.undo()
    assert (torch.cat(steps, 1) - own).abs().max() < TOL


def test_undo_restores_the_model_and_describe_records_the_setting():
    model, ids = _model(), _ids()
    before = _logits(model, ids)
    handle = sa.apply_string(model, 100, 16)
    assert model.config._attn_implementation == sa.IMPLEMENTATION
    assert handle.describe() == {"shift": 100, "window": 16, "kernel": "auto", "context": 256,
                                 "attn_implementation": sa.IMPLEMENTATION, "replaced": "sdpa", "max_distance": 171,
                                 "undone": False}
    handle.undo()
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(layer, sa.SETTING_ATTRIBUTE) for layer in sa.attention_layers(model))
    assert torch.equal(_logits(model, ids), before)
    with pytest.raises(UserError, match="already undone"):
        handle.undo()


@pytest.mark.parametrize("shift,window,context,message", [
    (128, 128, 256, "must exceed the local window W=128"),
    (100, 200, 256, "must exceed the local window"),
    (256, 128, 256, "not below the model's context 256"),
    (300, 16, 256, "not below the model's context 256"),
    (100, -1, 256, "negative"),
])
def test_settings_outside_the_range_are_one_line(shift, window, context, message):
    with pytest.raises(sa.StringError, match=message) as error:
        sa.apply_string(_model(), shift, window, context=context)
    assert "\n" not in str(error.value) and "--string" in str(error.value)  # names the fix


def test_parse_and_other_refusals():
    assert sa.parse_setting("21845") == (21845, 128) and sa.parse_setting("100, 16") == (100, 16)
    for text in ("abc", "1,2,3", "100,x", ""):
        with pytest.raises(sa.StringError, match="SHIFT or SHIFT,WINDOW"):
            sa.parse_setting(text)
    with pytest.raises(sa.StringError, match="must exceed"):
        sa.parse_setting("64,128")
    model = _model()
    handle = sa.apply_string(model, 100, 16)
    with pytest.raises(sa.StringError, match="already applied"):
        sa.apply_string(model, 100, 16)
    handle.undo()
    with pytest.raises(sa.StringError, match="kernel 'fast' is unknown"):
        sa.apply_string(model, 100, 16, kernel="fast")
    with pytest.raises(sa.StringError, match="sliding-window"):
        sa.apply_string(tiny_model("gemma3_text"), 100, 16)
    model.train()
    handle = sa.apply_string(model, 100, 16)
    with pytest.raises(sa.StringError, match="inference mode"):
        model(input_ids=_ids())
    handle.undo()


# ---- yarnkit eval --string ----------------------------------------------------------------------------------------
def _eval(*argv):
    from yarnkit.cli import main

    assert main(["eval", *map(str, argv)]) == 0


def test_eval_ppl_string_changes_perplexity_only_when_distances_reach_the_shift(tmp_path):
    """Tiny YaRN Llama (context 1024, sharpened Q/K so positions matter): 256-token windows with S=32 change the
    perplexity; S=600 (no distance reaches it) reproduces the plain run. The JSON records the setting."""
    import json

    from export_fixtures import tiny_bpe_tokenizer, tiny_yarn_model

    from yarnkit.assets import sample_path

    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny_yarn_model().save_pretrained(model_dir)
    tiny_bpe_tokenizer().save_pretrained(model_dir)
    common = ["ppl", model_dir, "--data", sample_path("eval"), "--lengths", "256", "--docs", "1", "--out", out]
    _eval(*common)
    _eval(*common, "--string", "32,4")
    _eval(*common, "--string", "600")
    plain, near, far = (json.loads((out / f"ppl-model{suffix}.json").read_text())
                        for suffix in ("", "_STRING_S32_W4", "_STRING_S600_W128"))
    assert plain["string"] is None and near["settings"]["string"] == "32,4"
    assert near["string"] | {"replaced": None} == {"shift": 32, "window": 4, "kernel": "auto", "context": 1024,
                                                  "attn_implementation": "yarnkit_string", "replaced": None,
                                                  "max_distance": 995, "undone": False}
    ppl = [result["rows"][0]["ppl"] for result in (plain, near, far)]
    assert abs(ppl[1] / ppl[0] - 1) > 1e-4 and abs(ppl[2] / ppl[0] - 1) < 1e-6, ppl  # observed 7e-4 and 2e-8


@pytest.mark.slow
def test_eval_retrieval_with_string_on_smollm2(tmp_path):
    """SmolLM2-135M, niah at 512 tokens: with S=32, W=0 every distance from 32 on reads 32 tokens nearer and the
    answers change (observed: no key found); with S=8000 (context 8192, no distance reaches it) every answer and
    teacher-forced score equals the plain run's. (S=64, W=16 at this length leaves all four answers right.)"""
    import json

    common = ["retrieval", "smollm2-135m", "--tasks", "niah", "--lengths", "512", "--depths", "0,0.5", "--trials",
              "2", "--out", tmp_path]
    _eval(*common)
    _eval(*common, "--string", "32,0")
    _eval(*common, "--string", "8000")
    plain, near, far = (json.loads((tmp_path / f"niah-smollm2-135m{suffix}.json").read_text())
                        for suffix in ("", "_STRING_S32_W0", "_STRING_S8000_W128"))

    def outcome(result):
        return [(t["answer"], t["tf_score"]) for cell in result["cells"] for t in cell["trials"]]

    assert near["string"]["shift"] == 32 and far["string"]["window"] == 128 and plain["string"] is None
    assert outcome(far) == outcome(plain)
    assert outcome(near) != outcome(plain)
