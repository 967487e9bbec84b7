"""The static-shape decode path (fixed K/V buffers + slot mask; the function a CUDA graph captures) on CPU.

Run: `python -m pytest tests/test_runtime_static.py -q`

What is proven (tiny random models, float32; the cache tests in tests/test_runtime_cache.py also run on this path):
- static and eager engines give the same logits (atol 1e-5) and keep the same tokens over a stream that evicts,
  with SirLLM retention on, and the static cache's filled slots equal the eager cache's keys/values;
- a forward that fails half-way leaves the static cache consistent, and the next tokens get exactly the logits
  of an engine that never saw the failure; `reset()` keeps the buffers (a captured graph stays valid);
- a failing graph capture falls back loudly (logged reason, reported in stats) and still returns right logits;
- bad decode choices are refused with a clear error;
- the decode step traces as one graph for torch.compile (no graph break) and keeps the eager logits;
- compiled by Inductor (CPU), the step writes only its new K/V slots: the generated code allocates no buffer of a
  cache row's size (a write into a view of the buffers made Inductor copy every layer's rows and both whole
  buffers, every step), and its logits and buffers equal the eager pool's;
- compiled, a lone session's step and the batched widths 2..8 compile twice in all (the batch dimension of the
  batched step is symbolic), with the uncompiled pool's logits and cache writes;
- warming up (what serve does on CUDA before it listens) runs one step per batch width with every row idle:
  no session's slots or length change;
- the step builds its additive slot mask once (one `where` for all layers; SDPA would convert a boolean mask in
  every layer) and its logits are bitwise those of the boolean mask;
- slow: the real SmolLM2 on the static path matches HF greedy generation and the eager path through eviction.
CUDA-graph capture and compilation need a GPU: tests/test_runtime_gpu.py (gpu marker) and scripts/bench_runtime.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import CountOps, compiled_step_code, tiny_model

from yarnkit.runtime.engine import StreamingEngine


def tokens(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def feed_stream(engine, stream, step_sizes):
    """Feed `stream` in chunks of the given sizes (cycled), returning all logits."""
    out, start, i = [], 0, 0
    while start < stream.shape[1]:
        size = step_sizes[i % len(step_sizes)]
        out.append(engine.feed(stream[:, start:start + size]))
        start, i = start + size, i + 1
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("sirllm_keep", [0, 6])
def test_static_equals_eager_through_eviction(sirllm_keep):
    model = tiny_model("llama", num_hidden_layers=2)
    stream = tokens(90, seed=3)
    engines = [StreamingEngine(model, sinks=4, window=28, evict_batch=5, prefill_chunk=8, sirllm_keep=sirllm_keep,
                               decode=decode) for decode in ("eager", "static")]
    eager, static = (feed_stream(engine, stream, [9, 1, 1, 4]) for engine in engines)
    assert engines[1].decode_path == "static" and engines[1].cache.rerotations > 3
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=0)
    assert engines[0].cache_ids.tolist() == engines[1].cache_ids.tolist()
    for dense, fixed in zip(engines[0].cache.layers, engines[1].cache.layers):
        torch.testing.assert_close(fixed.keys, dense.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(fixed.values, dense.values, atol=1e-6, rtol=0)


def test_failed_forward_leaves_static_cache_consistent_and_reset_keeps_buffers():
    model = tiny_model("llama", num_hidden_layers=2)
    engine = StreamingEngine(model, sinks=4, window=24, evict_batch=4, decode="static")
    clean = StreamingEngine(model, sinks=4, window=24, evict_batch=4, decode="static")
    engine.feed(tokens(10))  # 10 + 3 fit: the failing chunk below evicts nothing
    clean.feed(tokens(10))

    def explode(*_):
        raise RuntimeError("boom")

    hook = model.model.layers[1].register_forward_pre_hook(explode)  # layer 0 has written its K/V already
    with pytest.raises(RuntimeError, match="boom"):
        engine.feed(tokens(3, seed=1))
    hook.remove()
    assert engine.is_consistent()
    after = tokens(30, seed=2)  # overwrites the half-written slots, then evicts
    torch.testing.assert_close(engine.feed(after), clean.feed(after), atol=0, rtol=0)

    buffer = engine.cache.pool.key_buffer.data_ptr()
    engine.reset()
    assert len(engine) == 0 and engine.cache.pool.key_buffer.data_ptr() == buffer
    fresh = StreamingEngine(model, sinks=4, window=24, evict_batch=4, decode="static")
    torch.testing.assert_close(engine.feed(tokens(30)), fresh.feed(tokens(30)), atol=0, rtol=0)


def test_a_capture_failure_is_one_line_whatever_the_errors_text(caplog, monkeypatch):
    """CUDA's capture errors carry advice lines (CUDA_LAUNCH_BLOCKING, TORCH_USE_CUDA_DSA, ...): the fallback names
    the error's first line only."""
    engine = StreamingEngine(tiny_model("llama", num_hidden_layers=2), sinks=4, window=24, decode="static")
    pool = engine.decoder.pool
    pool.use_graph = True

    def capture(*args):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors might "
                           "be asynchronously reported\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1")

    monkeypatch.setattr(pool, "_capture", capture)
    engine.feed(tokens(10))
    with caplog.at_level(logging.WARNING):
        engine.feed(tokens(1, seed=4))
    lines = [record.getMessage() for record in caplog.records if "falling back" in record.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].endswith("when stream is capturing"), lines
    assert engine.stats()["graph_fallback"] == ("RuntimeError: CUDA error: operation not permitted when stream is "
                                                "capturing")


def test_graph_capture_failure_falls_back_loudly(caplog):
    """Force the graph path on CPU: capture cannot work there, so the decoder must log why and keep serving."""
    model = tiny_model("llama", num_hidden_layers=2)
    engine = StreamingEngine(model, sinks=4, window=24, decode="static")
    reference = StreamingEngine(model, sinks=4, window=24, decode="eager")
    engine.decoder.pool.use_graph = True
    prompt, token = tokens(10), tokens(1, seed=4)
    engine.feed(prompt)
    reference.feed(prompt)
    with caplog.at_level(logging.WARNING):
        logits = engine.feed(token)
    assert "falling back" in caplog.text and engine.decode_path == "static"
    assert engine.stats()["graph_fallback"] and engine.stats()["decode_path"] == "static"
    torch.testing.assert_close(logits, reference.feed(token), atol=1e-5, rtol=0)


def test_the_step_builds_one_additive_mask_with_the_boolean_masks_logits():
    model = tiny_model("llama", num_hidden_layers=3)
    engine = StreamingEngine(model, sinks=4, window=24, decode="static")
    engine.feed(tokens(10))
    pool = engine.decoder.pool
    ids, positions = torch.tensor([[5]]), torch.tensor([[len(engine)]])
    keys, values = pool.key_buffer.clone(), pool.value_buffer.clone()
    with torch.no_grad(), CountOps() as seen:
        ours = pool.forward_rows(0, ids, positions, 1)
    assert seen.names.count("where") == 1 and "scalar_tensor" not in seen.names
    pool.key_buffer.copy_(keys)
    pool.value_buffer.copy_(values)
    boolean = pool.slots[None, None, None, :] <= positions[:, None, :, None]
    with torch.no_grad():
        reference = model(input_ids=ids, position_ids=positions, attention_mask=boolean, use_cache=True,
                          logits_to_keep=1, **pool._forward_kwargs).logits.float()
    assert torch.equal(ours, reference)


def test_bad_decode_choice_is_refused():
    model = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="decode='fast'"):
        StreamingEngine(model, window=16, decode="fast")
    with pytest.raises(ValueError, match="needs a CUDA model"):
        StreamingEngine(model, window=16, decode="graph")
    assert StreamingEngine(model, window=16).decode_path == "eager"  # auto on CPU


@pytest.mark.slow
def test_real_model_static_path(smollm2):
    """SmolLM2-135M: greedy generation within the window equals HF's; through eviction static == eager logits."""
    model, tokenizer = smollm2
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    engine = StreamingEngine(model, sinks=4, window=64, decode="static")
    ours = list(engine.generate(prompt, max_new_tokens=6))
    hf = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert ours == hf
    stream = tokenizer("It was a bright cold day in April, and the clocks were striking thirteen. " * 8,
                       return_tensors="pt")["input_ids"][:, :40]
    engines = [StreamingEngine(model, sinks=4, window=24, evict_batch=6, prefill_chunk=16, decode=decode)
               for decode in ("eager", "static")]
    eager, static = (feed_stream(engine, stream, [16, 1]) for engine in engines)
    assert engines[1].cache.rerotations > 2
    torch.testing.assert_close(static, eager, atol=1e-4, rtol=0)


def test_decode_step_traces_as_one_graph_for_torch_compile():
    """What `--compile` compiles on CUDA: dynamo traces the pool's step without a graph break (eager backend
    here, so no code generation on CPU), and the traced step gives the eager engine's logits."""
    from yarnkit.runtime.static import make_pool
    from yarnkit.runtime.options import StreamOptions

    model = tiny_model("llama", num_hidden_layers=2)
    options = StreamOptions(window=32, evict_batch=4, decode="static")
    pool = make_pool(model, options, rows=2)
    engine = StreamingEngine(model, options, pool=pool)
    pool._step = torch.compile(pool.forward_rows, backend="eager", fullgraph=True, dynamic=False)
    reference = StreamingEngine(model, window=32, evict_batch=4, decode="eager")
    prompt = tokens(10)
    engine.feed(prompt)
    reference.feed(prompt)
    for token in tokens(30, seed=6)[0]:
        torch.testing.assert_close(engine.feed(token.view(1, 1), all_logits=False),
                                   reference.feed(token.view(1, 1), all_logits=False), atol=1e-5, rtol=0)
    assert engine.cache.rerotations >= 2


def test_compiled_step_writes_only_the_new_slots_of_the_cache():
    """`--compile` on CPU's Inductor (the same functionalization as on CUDA): the step's K/V writes stay in place
    in the pool's buffers. Before, `scatter_` into the view `key_buffer[layer, rows]` was turned into a copy of
    that layer's rows (read by attention) and of both whole buffers, copied back into them at the end of every
    step (on an H100 the compiled step became slower than the uncompiled one)."""
    from yarnkit.runtime.options import StreamOptions
    from yarnkit.runtime.static import make_pool

    model = tiny_model("llama", num_hidden_layers=2)
    options = StreamOptions(window=256, decode="static")
    pool, reference = make_pool(model, options, rows=2), make_pool(model, options, rows=2)
    caches = [pool.acquire(), reference.acquire()]
    prompt = tokens(40)
    with torch.no_grad():
        for p, cache in zip((pool, reference), caches):
            p.prefill(cache, prompt)
        logits, copies = compiled_step_code(pool, caches[0], 7)
        assert copies == [], f"the compiled step allocates cache-sized buffers {copies}"
        torch.testing.assert_close(logits, reference.decode([caches[1]], [7]), atol=1e-5, rtol=0)
        for token in tokens(3, seed=2)[0].tolist():
            torch.testing.assert_close(pool.decode([caches[0]], [token]), reference.decode([caches[1]], [token]),
                                       atol=1e-5, rtol=0)
    assert caches[0].length == 44
    torch.testing.assert_close(pool.key_buffer, reference.key_buffer, atol=1e-5, rtol=0)
    torch.testing.assert_close(pool.value_buffer, reference.value_buffer, atol=1e-5, rtol=0)


def test_a_compiled_step_compiles_once_for_every_batch_width_from_two():
    """`--compile` (Inductor on CPU here, as on CUDA): a lone session's step compiles once, and the batched
    widths 2, 4 and 8 share ONE compilation (their batch dimension is symbolic); every width's logits and cache
    writes equal the uncompiled pool's."""
    from torch._dynamo.utils import counters

    from yarnkit.runtime.options import StreamOptions
    from yarnkit.runtime.static import make_pool

    model = tiny_model("llama", num_hidden_layers=2)
    options = StreamOptions(window=64, decode="static")
    pool, reference = make_pool(model, options, rows=8), make_pool(model, options, rows=8)
    pool.compiled, pool._step = True, torch.compile(pool.forward_rows)  # what a CUDA pool does with --compile
    caches = [[p.acquire() for _ in range(8)] for p in (pool, reference)]
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for row in range(8):
            for p, cache in zip((pool, reference), caches):
                p.prefill(cache[row], tokens(5 + row, seed=row))
        for width in (2, 4, 8, 3, 1, 2):  # 3 runs rows 0..3, as a graph would
            ids = tokens(width, seed=20 + width)[0].tolist()
            torch.testing.assert_close(pool.decode(caches[0][:width], ids), reference.decode(caches[1][:width], ids),
                                       atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 2
    window = options.window  # slot `window` is the scratch slot idle rows write to
    torch.testing.assert_close(pool.key_buffer[..., :window, :], reference.key_buffer[..., :window, :], atol=1e-5,
                               rtol=0)


def test_warming_up_runs_every_batch_width_and_changes_no_session():
    """What `yarnkit serve` does on CUDA before it listens: one step per batch width a pool of 6 rows can run
    (1, 2, 4, 6; compiled here with dynamo's eager backend, as no CUDA graph runs on CPU), every row idle: the
    sessions' slots and lengths are untouched (only the scratch slot is written), and their next steps give the
    logits of a pool that was never warmed. An eager pool has nothing to warm."""
    from yarnkit.runtime.options import StreamOptions
    from yarnkit.runtime.static import make_pool

    model = tiny_model("llama", num_hidden_layers=2)
    options = StreamOptions(window=32, decode="static")
    pool, reference = make_pool(model, options, rows=6), make_pool(model, options, rows=6)
    assert pool.warm_up() == []
    caches = [[p.acquire() for _ in range(3)] for p in (pool, reference)]
    with torch.no_grad():
        for row in range(3):
            for p, cache in zip((pool, reference), caches):
                p.prefill(cache[row], tokens(4 + row, seed=row))
        keys = pool.key_buffer[..., :32, :].clone()
        pool.compiled, pool._step = True, torch.compile(pool.forward_rows, backend="eager")
        seen = []
        step = pool._step
        pool._step = lambda first, ids, positions, keep: (seen.append(ids.shape[0]), step(first, ids, positions,
                                                                                          keep))[1]
        assert pool.warm_up() == [1, 2, 4, 6] and seen == [1, 2, 4, 6]
        assert torch.equal(pool.key_buffer[..., :32, :], keys) and [c.length for c in caches[0]] == [4, 5, 6]
        torch.testing.assert_close(pool.decode(caches[0], [5, 6, 7]), reference.decode(caches[1], [5, 6, 7]),
                                   atol=1e-5, rtol=0)


def test_float32_head_keeps_the_bf16_heads_float32_accumulation():
    """bf16 model, `float32_logits=True`: both decode paths return the head's logits computed to float32 from the
    bf16 hidden state their own forward produced (within 1e-6 of float64, relative to the largest logit), where the
    model's own head rounds them to bf16 (about 2e-3 relative: at |logit| 16..32 a bf16 step is 0.125, which ties
    tokens that differ by less and lets rounding noise flip the greedy token). Each path's hidden state is read
    from the decoder's output, not recomputed: in bf16 the paths' attention kernels round differently (CPUs with
    and without native bf16 differ too), which is the decoder's rounding, not the head's. Auto (None) leaves it off
    on CPU, where it costs; a float32 model never uses it."""
    from yarnkit.runtime.head import float32_head

    model = tiny_model("llama", num_hidden_layers=2).to(torch.bfloat16)
    prompt = tokens(12)
    weight = model.lm_head.weight.double()
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=prompt).last_hidden_state[0, -1]
        own = model(input_ids=prompt).logits[0, -1].double()
    exact = hidden.double() @ weight.t()
    assert (own - exact).abs().max() / exact.abs().max() > 1e-3  # what the float32 head removes
    seen = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state))
    try:
        for decode in ("eager", "static"):
            engine = StreamingEngine(model, sinks=4, window=32, decode=decode, float32_logits=True)
            seen.clear()
            logits = engine.feed(prompt, all_logits=False)[0, -1]
            assert logits.dtype == torch.float32
            exact = seen[-1][0, -1].double() @ weight.t()
            assert (logits.double() - exact).abs().max() / exact.abs().max() < 1e-6, decode
    finally:
        hook.remove()
    assert float32_head(model) is None and float32_head(model, True) is not None
    assert float32_head(tiny_model("llama", num_hidden_layers=1), True) is None
