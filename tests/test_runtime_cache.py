"""Correctness of the streaming runtime's sink cache on tiny random models (plain RoPE, YaRN, partial rotary).

Run: `python -m pytest tests/test_runtime_cache.py -q`

What is proven:
- window larger than the text: greedy tokens identical to `model.generate`, logits within 1e-5 of a dense forward;
- after eviction (1-layer models, incl. ones YaRN-patched in place by `yarnkit.patch`, where a token's K/V depend only on its id and position): the streamed logits
  equal a from-scratch forward over the retained tokens at their cache positions, atol 1e-4 (float32);
  a negative control shows the attention factor applied twice (the classic YaRN re-rotation bug) is caught;
- multi-layer: re-rotated keys equal the stored keys turned by the delta with float64 angles (atol 1e-5);
- chunked prefill never runs a forward longer than the free window; eviction happens during generation;
- the eviction rule (`StartRecent`: sinks + the newest tokens within the window, streaming-llm's
  StartRecentKVCache) and the one resolver of `decode="auto"`.
Tests marked with `decode` run on both cache paths: `eager` (growing `SinkCache`) and `static` (fixed buffers +
slot mask, the function the CUDA graph captures; see tests/test_runtime_static.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from yarnkit.models import cache_argument
from yarnkit.patch import rotary_module
from yarnkit.rope import compute_inv_freq
from yarnkit.runtime.cache import StartRecent, model_rotary, rotate_back
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions, resolve_decode

DECODES = pytest.mark.parametrize("decode", ["eager", "static"])  # growing SinkCache / static buffers + mask
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}


def yarn_llama(layers=2):
    model = tiny_model("llama", num_hidden_layers=layers, rope_parameters=dict(YARN), max_position_embeddings=1024)
    assert abs(rotary_module(model).attention_scaling - 1.0) > 0.1  # the factor must matter in these tests
    return model


def patched(model_type, layers=2, **overrides):
    """A tiny model YaRN-patched in place by yarnkit.patch (rotary modules rebuilt; Phi-3 via LongRoPE factors)."""
    from yarnkit.patch import apply_rope_scaling

    model = tiny_model(model_type, num_hidden_layers=layers, **overrides)
    apply_rope_scaling(model, "yarn", factor=4.0)
    return model


MODELS = {
    "llama": lambda layers=2: tiny_model("llama", num_hidden_layers=layers),
    "llama-yarn": yarn_llama,
    "phi3-partial": lambda layers=2: tiny_model("phi3", num_hidden_layers=layers, partial_rotary_factor=0.5,
                                                pad_token_id=0),
    "llama-patched": lambda layers=2: patched("llama", layers),
    "phi3-partial-patched": lambda layers=2: patched("phi3", layers, partial_rotary_factor=0.5, pad_token_id=0),
}


def tokens(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@DECODES
@pytest.mark.parametrize("name", ["llama", "llama-yarn", "phi3-partial"])
def test_within_window_matches_plain_hf(name, decode):
    model = MODELS[name]()
    prompt = tokens(40)
    engine = StreamingEngine(model, sinks=4, window=204, prefill_chunk=16, decode=decode)  # chunked prefill, no eviction
    logits = engine.feed(prompt)
    dense = model(prompt).logits
    torch.testing.assert_close(logits, dense, atol=1e-5, rtol=0)
    engine.reset()
    ours = list(engine.generate(prompt, max_new_tokens=30))
    hf = model.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    assert ours == hf


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("evict_batch", [1, 7])
@DECODES
def test_after_eviction_equals_recompute_on_retained(name, evict_batch, decode):
    model = MODELS[name](layers=1)
    engine = StreamingEngine(model, sinks=4, window=32, evict_batch=evict_batch, prefill_chunk=5, decode=decode)
    stream = tokens(80, seed=1)
    logits = engine.feed(stream)
    assert engine.cache.rerotations > 0 and len(engine) <= engine.window
    assert engine.cache_ids[:4].tolist() == stream[0, :4].tolist()  # sinks kept
    # the last chunk (5 tokens) sits in the last slots; recompute over exactly what the cache retains
    reference = model(engine.cache_ids[None], use_cache=True)
    torch.testing.assert_close(logits[:, -5:], reference.logits[:, -5:], atol=1e-4, rtol=0)
    torch.testing.assert_close(engine.cache.layers[0].keys, getattr(reference, cache_argument()).layers[0].keys,
                               atol=1e-5, rtol=0)


@DECODES
def test_attention_factor_applied_twice_is_caught(decode):
    """Negative control: re-rotating with the module's raw cos/sin (which carry YaRN's mscale) must fail."""
    model = yarn_llama(layers=1)
    engine = StreamingEngine(model, sinks=4, window=32, evict_batch=4, prefill_chunk=5, decode=decode)
    module = rotary_module(model)
    engine.cache.rotary = lambda pos: tuple(t[0] for t in module(torch.zeros(1), pos[None]))
    engine.feed(tokens(80, seed=1))
    reference = getattr(model(engine.cache_ids[None], use_cache=True), cache_argument()).layers[0].keys
    relative = (engine.cache.layers[0].keys - reference).norm() / reference.norm()
    assert relative > 0.05  # mscale 1.14 applied twice on the moved keys


@DECODES
@pytest.mark.parametrize("name", ["llama-yarn", "phi3-partial"])
def test_rerotation_matches_float64_angles(name, decode):
    model = MODELS[name]()
    engine = StreamingEngine(model, sinks=2, window=32, evict_batch=10, prefill_chunk=32, decode=decode)
    engine.feed(tokens(32))
    before = [layer.keys.clone() for layer in engine.cache.layers]
    engine.feed(tokens(1, seed=5))  # 32 + 1 > 32: drop 10 slots after the 2 sinks, re-rotate 20 keys by 10
    config = model.config
    head_dim = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    inv_freq, _ = compute_inv_freq(dict(config.rope_parameters), head_dim, config.max_position_embeddings)
    rot = 2 * inv_freq.numel()
    assert rot == (8 if name == "phi3-partial" else 16)
    angle = 10.0 * inv_freq.double()
    cos, sin = torch.cat((angle, angle)).cos(), torch.cat((angle, angle)).sin()
    for old, layer in zip(before, engine.cache.layers):
        k = old[..., 12:32, :].double()
        k_rot = k[..., :rot]
        half = rot // 2
        turned = k_rot * cos - torch.cat((-k_rot[..., half:], k_rot[..., :half]), -1) * sin
        expected = torch.cat((turned, k[..., rot:]), -1)
        torch.testing.assert_close(layer.keys[..., 2:22, :].double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.keys[..., :2, :], old[..., :2, :])  # sinks untouched


def test_rotate_back_is_inverse_of_model_rotation():
    model = yarn_llama()
    rotary = model_rotary(model)
    keys = torch.randn(1, 2, 6, 16, dtype=torch.float64)
    cos, sin = rotary(torch.arange(6) * 3)
    forward = keys * cos.double() + torch.cat((-keys[..., 8:], keys[..., :8]), -1) * sin.double()
    torch.testing.assert_close(rotate_back(forward, cos, sin), keys, atol=1e-6, rtol=0)


@DECODES
def test_prefill_chunks_never_exceed_window_and_generation_evicts(decode):
    model = MODELS["llama"]()
    lengths = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)
    engine = StreamingEngine(model, sinks=4, window=24, evict_batch=5, prefill_chunk=64, decode=decode)
    engine.feed(tokens(100))
    assert max(lengths) <= 24 and lengths.count(24) == 1 and len(engine) <= 24  # one forward never exceeds sinks + window
    before = engine.cache.rerotations
    produced = list(engine.generate(tokens(3, seed=2), max_new_tokens=40))
    hook.remove()
    assert len(produced) == 40 and engine.cache.rerotations > before and len(engine) <= 24


@DECODES
def test_sink_token_from_config_is_prepended_and_never_evicted(decode):
    model = MODELS["llama"]()
    model.config.yarnkit_sink_token_id = 1
    engine = StreamingEngine(model, window=11, evict_batch=3, decode=decode)
    assert engine.options.sinks == 1
    logits = engine.feed(tokens(50))
    assert logits.shape[1] == 50 and engine.cache_ids[0] == 1 and len(engine) <= 11


@DECODES
def test_pinned_system_prompt_survives(decode):
    engine = StreamingEngine(MODELS["llama"](), sinks=4, window=44, evict_batch=8, decode=decode)
    system = tokens(12, seed=9)
    engine.feed(system)
    engine.pin()
    engine.feed(tokens(200))
    assert engine.cache_ids[:12].tolist() == system[0].tolist()


def test_bad_input_is_rejected_clearly():
    engine = StreamingEngine(MODELS["llama"](), sinks=4, window=20)
    with pytest.raises(ValueError, match="no tokens"):
        engine.feed(torch.empty(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="sirllm_keep"):
        StreamingEngine(MODELS["llama"](), window=20, sirllm_keep=16)
    engine.feed(tokens(20))
    with pytest.raises(ValueError, match="cannot pin"):
        engine.pin()
    with pytest.raises(ValueError, match="full-attention models only"):
        StreamingEngine(tiny_model("qwen2", layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                                   use_sliding_window=True))


class RecordedCache(StartRecent):
    """The eviction rule alone: a cache of `length` tokens that records what it was told to keep."""

    def __init__(self, sinks: int, window: int, evict_batch: int, length: int):
        self.sinks, self.window, self.evict_batch, self.length = sinks, window, evict_batch, length

    def get_seq_length(self) -> int:
        return self.length

    def keep(self, indices) -> None:
        self.length = len(indices)


def test_start_recent_keeps_the_sinks_and_the_newest_tokens_within_the_window():
    # streaming-llm's StartRecentKVCache(start_size=4, recent_size=12).evict_for_space(past, 1) on 16 tokens keeps
    # slots 0..3 and the last 12 - 1: here window = 4 + 12 and evict_batch 1
    cache = RecordedCache(sinks=4, window=16, evict_batch=1, length=16)
    assert cache.evict_for_space(0) is None
    assert cache.evict_for_space(1).tolist() == [0, 1, 2, 3] + list(range(5, 16))
    batched = RecordedCache(sinks=4, window=16, evict_batch=5, length=16)  # drops at least evict_batch at a time
    assert batched.evict_for_space(1).tolist() == [0, 1, 2, 3] + list(range(9, 16)) and batched.length == 11
    pinned = RecordedCache(sinks=4, window=16, evict_batch=1, length=16)  # a pinned prompt extends the sinks
    assert pinned.evict_for_space(2, protected=6).tolist() == list(range(6)) + list(range(8, 16))
    scored = RecordedCache(sinks=1, window=8, evict_batch=1, length=8)  # SirLLM: the top older score stays
    scores = torch.tensor([0.0, 0.1, 9.0, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert scored.evict_for_space(2, scores=scores, retain=1).tolist() == [0, 2, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="does not fit"):
        RecordedCache(sinks=4, window=16, evict_batch=1, length=16).evict_for_space(13)


def test_decode_auto_is_resolved_in_one_place_and_options_resolve_once():
    assert [resolve_decode("auto", d, pooled) for d, pooled in (("cpu", False), ("cpu", True), ("cuda:0", False))] \
        == ["eager", "static", "graph"]
    assert resolve_decode("static", "cuda") == "static"
    config = tiny_model("llama").config
    options = StreamOptions(window=64).resolved(config, "cpu", pooled=True)
    assert (options.sinks, options.evict_batch, options.decode) == (4, 3, "static") and options.is_resolved
    assert options.resolved(config, "cuda") is options  # resolved once: later calls change nothing

