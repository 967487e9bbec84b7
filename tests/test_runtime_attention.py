"""The pooled decode step's attention kernels (`--decode-attention split|flex`) against today's SDPA path, on CPU.

Run: `python -m pytest tests/test_runtime_attention.py -q`

What is proven (tiny random Llamas in float32: 4 heads on 4 key/value heads, and GQA with 4 on 2 or 6 on 2):
- the kernels alone equal a float64 reference (softmax(q k^T * scale + mask) v, K/V repeated per head) within
  1e-5, with rows at different lengths and, for `split`, several key chunks;
- one session through evictions (a window above one key chunk, so `split` runs on 2 chunks): every logit equals
  the SDPA static path's within 1e-5 and the greedy tokens are identical; the kernel really runs (called once per
  layer and decode step, never for a prefill chunk);
- a batch of three sessions at different lengths decoded together through evictions: the same tokens and logits
  (1e-5) as the SDPA pool;
- every other forward of the installed model is SDPA's, bit for bit; the split step traces as one graph for
  torch.compile (no graph break: capture-safe);
- an unknown kernel, a forced `--decode eager` and a STRING model are refused in one line; `auto` resolving to
  the eager path falls back to sdpa in one logged line;
- the kernel `auto` is `split` on CUDA with an SDPA model (one session or many), else `sdpa`, silently.
The GPU run (CUDA graph, compile, bf16, speed) is tests/test_runtime_gpu.py and `python -m yarnkit.bench.decode_step`.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model

from yarnkit.errors import BadValue
from yarnkit.runtime import attention
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.static import make_pool

KERNELS = ("split", "flex")
SHAPES = {"mha": dict(num_attention_heads=4, num_key_value_heads=4),
          "gqa": dict(num_attention_heads=4, num_key_value_heads=2)}


def ids(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def reference(query, key, value, mask, scaling):
    """Float64 attention with K/V repeated per query head (transformers' `repeat_kv` order)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (x.double().repeat_interleave(groups, dim=1) for x in (key, value))
    scores = query.double() @ key.transpose(-1, -2) * scaling + mask.double()
    return torch.softmax(scores, dim=-1) @ value


@pytest.mark.parametrize("kernel", (*KERNELS, "sdpa"))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_kernel_equals_a_float64_reference(kernel, heads, kv_heads):
    generator = torch.Generator().manual_seed(0)
    batch, slots, dim = 3, 3 * attention.KEY_CHUNK, 16
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, slots, dim, generator=generator) for _ in range(2))
    lengths = torch.tensor([5, 200, slots - 1])  # one row in the first chunk, one across two, one to the end
    mask = torch.where(torch.arange(slots) <= lengths[:, None], 0.0, -torch.inf)[:, None, None, :]
    run = {"split": attention.split_attention, "flex": attention.flex_attention, "sdpa": attention.packed_sdpa}[kernel]
    ours = run(query, key, value, mask, dim ** -0.5)
    assert ours.shape == (batch, heads, 1, dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference(query, key, value, mask, dim ** -0.5), atol=1e-5, rtol=0)


def greedy(engine, prompt, steps):
    """Feed `prompt`, then `steps` greedy tokens one at a time: (tokens, logits of every step)."""
    logits = engine.feed(prompt, all_logits=False)[0, -1]
    tokens, rows = [], []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = engine.feed(torch.tensor([[tokens[-1]]]), all_logits=False)[0, -1]
        rows.append(logits)
    return tokens, torch.stack(rows)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kernel", KERNELS)
def test_one_session_equals_sdpa_through_evictions(kernel, shape, monkeypatch):
    model = tiny_model("llama", **SHAPES[shape])
    options = dict(sinks=4, window=attention.KEY_CHUNK + 20, evict_batch=16, prefill_chunk=64, decode="static")
    sdpa = StreamingEngine(model, **options)
    tokens, logits = greedy(sdpa, ids(100, 1), 120)
    calls = []
    original = getattr(attention, f"{kernel}_attention")
    monkeypatch.setattr(attention, f"{kernel}_attention", lambda *a: calls.append(a[0].shape) or original(*a))
    ours = StreamingEngine(model, decode_attention=kernel, **options)
    assert ours.decoder.pool.attention == kernel and ours.cache.rerotations == 0
    got_tokens, got = greedy(ours, ids(100, 1), 120)
    assert ours.cache.rerotations >= 4 and sdpa.cache.rerotations == ours.cache.rerotations
    assert got_tokens == tokens
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)
    layers = model.config.num_hidden_layers
    assert len(calls) == 120 * layers and set(calls) == {(1, model.config.num_attention_heads, 1, 16)}


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_batch_at_different_lengths_equals_sdpa_through_evictions(kernel):
    model = tiny_model("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)

    def run(decode_attention):
        options = StreamOptions(sinks=4, window=40, evict_batch=6, decode="static", decode_attention=decode_attention)
        pool = make_pool(model, options, rows=4)
        engines = [StreamingEngine(model, options, pool=pool) for _ in range(3)]
        logits = [engine.feed(ids(n, seed), all_logits=False)[0, -1] for engine, n, seed in
                  zip(engines, (7, 33, 20), (2, 3, 4))]
        tokens, rows = [], []
        for _ in range(60):
            tokens.append([int(row.argmax()) for row in logits])
            logits = StreamingEngine.decode_together(engines, tokens[-1])
            rows.append(logits)
        assert all(engine.cache.rerotations >= 3 for engine in engines)
        return tokens, torch.stack(rows)

    tokens, logits = run("sdpa")
    got_tokens, got = run(kernel)
    assert got_tokens == tokens
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)


def test_sdpa_packs_grouped_heads_and_equals_the_eager_cache_through_evictions(monkeypatch):
    """The pooled `sdpa` step of a GQA model reads each K/V head once for its group of query heads
    (`packed_sdpa`, no `repeat_kv` copy), and its logits equal the eager cache's (transformers' SDPA over repeated
    K/V) within 1e-5 in float32 through evictions, greedy tokens identical. A model without grouped heads keeps
    transformers' own SDPA call."""
    import transformers.integrations.sdpa_attention as hf_sdpa

    model = tiny_model("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    options = dict(sinks=4, window=48, evict_batch=8, prefill_chunk=32)
    tokens, logits = greedy(StreamingEngine(model, decode="eager", **options), ids(40, 7), 60)
    packed, repeated = [], []
    original_packed, original_repeat = attention.packed_sdpa, hf_sdpa.repeat_kv
    monkeypatch.setattr(attention, "packed_sdpa", lambda *a: packed.append(a[0].shape) or original_packed(*a))
    monkeypatch.setattr(hf_sdpa, "repeat_kv", lambda *a: repeated.append(a[0].shape) or original_repeat(*a))
    pooled = StreamingEngine(model, decode="static", **options)
    assert pooled.decoder.pool.attention == "sdpa"
    got_tokens, got = greedy(pooled, ids(40, 7), 60)
    assert pooled.cache.rerotations >= 3 and got_tokens == tokens
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)
    layers = model.config.num_hidden_layers
    assert len(packed) == 60 * layers and set(packed) == {(1, 6, 1, 16)}
    assert all(shape[2] > 1 for shape in repeated)  # only the prefill chunks' attention repeats K/V


def test_other_forwards_of_the_installed_model_stay_sdpa():
    model = tiny_model("llama")
    prompt = ids(30, 5)
    with torch.no_grad():
        before = model(prompt).logits
        generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    make_pool(model, StreamOptions(window=32, decode="static", decode_attention="split"))
    assert model.config._attn_implementation == attention.IMPLEMENTATION
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, before)
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), generated)


def test_split_step_traces_as_one_graph_for_torch_compile():
    model = tiny_model("llama")
    options = StreamOptions(sinks=4, window=40, evict_batch=6, decode="static", decode_attention="split")
    pool = make_pool(model, options, rows=2)
    engine = StreamingEngine(model, options, pool=pool)
    pool._step = torch.compile(pool.forward_rows, backend="eager", fullgraph=True, dynamic=False)
    reference = StreamingEngine(model, window=40, sinks=4, evict_batch=6, decode="static")
    tokens, logits = greedy(reference, ids(10, 6), 40)
    got_tokens, got = greedy(engine, ids(10, 6), 40)
    assert got_tokens == tokens and engine.cache.rerotations >= 2
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)


def test_bad_choices_fail_in_one_line_and_auto_falls_back_loudly(caplog):
    model = tiny_model("llama")
    with pytest.raises(BadValue, match="decode_attention='fast'.*choose one of auto, sdpa, split, flex"):
        StreamingEngine(model, window=16, decode="static", decode_attention="fast")
    with pytest.raises(BadValue, match="not on --decode eager.*--decode static"):
        StreamingEngine(model, window=16, decode="eager", decode_attention="split")
    with caplog.at_level(logging.WARNING):
        engine = StreamingEngine(model, window=16, decode_attention="flex")  # auto: one session on CPU is eager
    assert engine.decode_path == "eager" and engine.options.decode_attention == "sdpa"
    assert len(caplog.records) == 1 and "which runs sdpa" in caplog.text and "--decode static" in caplog.text

    from yarnkit.string_attention import apply_string

    handle = apply_string(tiny_model("llama"), shift=12, window=4)
    with pytest.raises(BadValue, match="STRING's own attention.*--decode-attention sdpa"):
        StreamingEngine(handle.model, window=16, decode="static", decode_attention="split")


def test_auto_takes_split_on_cuda_for_one_session_and_for_a_pool():
    from yarnkit.runtime.options import resolve_decode_attention
    from yarnkit.string_attention import apply_string

    config = tiny_model("llama").config
    assert resolve_decode_attention("auto", config, "cuda", "graph") == "split"
    assert resolve_decode_attention("auto", config, "cuda:0", "static") == "split"
    assert StreamOptions(window=16).resolved(config, "cuda", pooled=False).decode_attention == "split"  # one session
    assert StreamOptions(window=16).resolved(config, "cuda", pooled=True).decode_attention == "split"  # serve
    assert resolve_decode_attention("auto", config, "cuda", "eager") == "sdpa"  # the eager path runs SDPA only
    assert resolve_decode_attention("auto", config, "cpu", "static") == "sdpa"  # CPU: unmeasured
    string_config = apply_string(tiny_model("llama"), shift=12, window=4).model.config
    assert resolve_decode_attention("auto", string_config, "cuda", "static") == "sdpa"


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_kernel_runs_under_the_float32_head(kernel, monkeypatch):
    """A bf16 model with the float32 logits head (`float32_logits=True`, the CUDA default) runs the decoder without
    the model's head: the kernel choice still reaches every layer's attention, and on the same tokens through
    evictions the logits stay near SDPA's (bf16: the kernels round differently; random weights' logits are ~0.3,
    so the bound is 0.02, not a greedy match)."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2).to(torch.bfloat16)
    options = dict(sinks=4, window=48, evict_batch=8, decode="static", float32_logits=True)
    fed = ids(90, 5)

    def logits(engine):
        rows = [engine.feed(fed[:, :30], all_logits=False)[0, -1]]
        rows += [engine.feed(fed[:, i:i + 1], all_logits=False)[0, -1] for i in range(30, 90)]
        assert engine.cache.rerotations >= 2
        return torch.stack(rows)

    reference = logits(StreamingEngine(model, **options))
    calls = []
    original = getattr(attention, f"{kernel}_attention")
    monkeypatch.setattr(attention, f"{kernel}_attention", lambda *a: calls.append(1) or original(*a))
    got = logits(StreamingEngine(model, decode_attention=kernel, **options))
    assert len(calls) == 60 * model.config.num_hidden_layers and got.dtype == torch.float32
    torch.testing.assert_close(got, reference, atol=0.02, rtol=0)
