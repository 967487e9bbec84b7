"""GPU path checks for the streaming runtime (run on the GPU machine; skipped without CUDA).

Run: `python -m pytest tests/test_runtime_gpu.py -q -m gpu`

A SmolLM2-135M-shaped Llama (random init, on CUDA) is fed the same 4,192 tokens (a 4,096-token cache, then 96
decode steps evicting 16 tokens at a time: 6 evictions). Exactness is asserted in float32, where the paths differ
only in summation order (max |log-prob difference| within 1e-3, the same greedy token in every row whose best token
leads by more than 2e-3; a random model's near-ties may round either way):
- the CUDA-graph decode vs the same step run eagerly (`static`) and vs the eager growing cache (`SinkCache`);
- the graph with `torch.compile` inside vs the eager cache;
- 4 sessions decoded as one batch (the graph path, and the graph compiled with a symbolic batch dimension) vs
  each session's solo run: every token equal;
- the server's loop queuing each step before reading the last one's ids (its CUDA default) vs reading them first:
  the same replies and caches (a tiny model, SmolLM2's tokenizer);
- `--decode-attention split|flex` in the graph (and the compiled graph) vs the SDPA graph;
- `--fuse`: the graph with fused q/k/v and gate/up projections and `torch.rms_norm` norms vs the unfused graph
  (within 1e-4: only the matmuls' summation order and one float32 rounding per norm differ), the fuse adding no
  weight memory, and `undo()` giving the state back bit for bit; one static (graph-less) bf16 step launches fewer
  CUDA kernels fused than unfused: at least 4 fewer per norm (61) and 3 per layer (30), with one
  `aten::_fused_rms_norm` per norm (`-k fused`). The other tests run fused too: `auto` fuses the shared fixtures'
  models on their first pool.
- `--compile`: Inductor's Triton code for the bf16 step (sdpa and split) allocates no buffer of a cache row's size
  (the step writes its new K/V slots in place; tests/test_runtime_static.py checks the same on CPU).
bf16 is a guard against gross errors only (max |log-prob difference| within 0.1, greedy agreement >= 0.95): a
graph replays the kernels picked at capture and masked vs unmasked attention rounds differently, so bf16 paths are
not bitwise equal (graph vs eager 0.0283 on an H100, 2026-12-06); a decode reading wrong cache rows or positions
moves whole nats. Teacher-forced (both paths see the same tokens), so a difference never compounds.
"""

from __future__ import annotations

import pytest
import torch

from yarnkit.bench import streaming as bench

CACHE = 4096  # the benchmark's shape: its compiled step is reused from the inductor cache
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model():
    return bench.random_model("smollm2-135m", "cuda", torch.bfloat16)


@pytest.fixture(scope="module")
def model32():
    return bench.random_model("smollm2-135m", "cuda", torch.float32)


def logprobs(model, decode, **options):
    from yarnkit.runtime.engine import StreamingEngine

    ids = bench.random_ids(CACHE + 96, model.config.vocab_size, seed=5)
    engine = StreamingEngine(model, sinks=4, window=CACHE, evict_batch=16, decode=decode, **options)
    rows = [engine.feed(ids[:CACHE][None], all_logits=False)[0, -1]]
    rows += [engine.feed(token.view(1, 1), all_logits=False)[0, -1] for token in ids[CACHE:]]
    assert engine.cache.rerotations >= 4 and engine.decoder.fallback_reason is None
    path = engine.decode_path
    engine.close()
    return path, torch.log_softmax(torch.stack(rows).float(), dim=-1)


def close(a, b, worst=0.1, agreement=0.95):
    assert (a - b).abs().max().item() <= worst
    assert bench.share(a.argmax(-1) == b.argmax(-1)) >= agreement


def exact(a, b, worst=1e-3):
    """Float32: every log-prob within `worst`, and the same greedy token wherever the reference `b`'s best token
    leads its runner-up by more than `bench.NEAR_TIE` (the rule of the GPU check's runtime path: random weights give
    near-ties, which a 1e-5 rounding may break either way; such a row is counted, never skipped silently: at least
    half the rows must be decided)."""
    assert (a - b).abs().max().item() <= worst
    agreement, rows = bench.decided_agreement(b, a)
    assert rows * 2 >= len(a), f"only {rows} of {len(a)} rows have a clear best token"
    assert agreement == 1.0


def test_float32_graph_equals_the_same_step_run_eagerly_and_the_eager_cache(model32):
    path, graph = logprobs(model32, "graph")
    assert path == "graph"
    _, static = logprobs(model32, "static")
    exact(graph, static)
    _, eager = logprobs(model32, "eager")
    exact(graph, eager)


def test_float32_compiled_graph_equals_the_eager_cache(model32):
    path, compiled = logprobs(model32, "graph", compile=True)
    assert path == "graph"
    _, eager = logprobs(model32, "eager")
    exact(compiled, eager)


@pytest.mark.parametrize("compile", [False, True])
def test_float32_batch_equals_each_sessions_solo_run(model32, compile):
    """With `compile` the batch runs the step compiled once for every width from 2 up (symbolic batch)."""
    result = bench.batch_throughput(model32, cache=CACHE, sessions=4, steps=32, warmup=2, check_tokens=32,
                                    evict_batch=16, decode="graph", compile=compile)
    assert result["decode_path"] == "graph" and result["all_identical"], result["identical_prefix_tokens"]


def test_float32_steps_queued_ahead_on_the_graph_give_the_same_replies(tokenizer):
    """The server's loop on the CUDA graph with each step queued before the last one's ids are read (the default
    on CUDA): the same replies, finish reasons and caches as reading them first (tests/test_runtime_scheduler.py's
    scenario: evictions, stop ids taken back, stop strings, token limits, a request joining, a cancelled one)."""
    from conftest import tiny_model
    from test_runtime_scheduler import check_ahead_matches_plain

    model = tiny_model("llama", vocab_size=49152, max_position_embeddings=4096).cuda()
    check_ahead_matches_plain(model, tokenizer, "graph")


def test_bf16_graph_and_compiled_stay_near_the_eager_cache(model):
    path, graph = logprobs(model, "graph")
    assert path == "graph"
    _, eager = logprobs(model, "eager")
    close(graph, eager)
    _, compiled = logprobs(model, "graph", compile=True)
    close(compiled, eager)


@pytest.mark.parametrize("kernel", ["split", "flex"])
def test_decode_attention_kernels_equal_sdpa_in_the_graph(model32, model, kernel):
    """`--decode-attention split|flex` in the captured (and compiled) step: float32 equals the SDPA graph through
    evictions; bf16 stays near the eager cache."""
    path, ours = logprobs(model32, "graph", decode_attention=kernel)
    assert path == "graph"
    _, sdpa = logprobs(model32, "graph", decode_attention="sdpa")  # named: `auto` is split on CUDA
    exact(ours, sdpa)
    _, compiled = logprobs(model32, "graph", compile=True, decode_attention=kernel)
    exact(compiled, sdpa)
    _, half = logprobs(model, "graph", decode_attention=kernel)
    _, eager = logprobs(model, "eager")
    close(half, eager)


def test_float32_fused_graph_equals_the_unfused_graph():
    """A model of its own (the fixtures' models are fused by the first pool built on them): its unfused graph,
    then the same weights fused (q/k/v and gate/up as one matmul each, norms as torch.rms_norm) in the graph,
    through 6 evictions."""
    import gc

    from yarnkit.runtime import fused

    model = bench.random_model("smollm2-135m", "cuda", torch.float32)
    saved = {name: value.cpu() for name, value in model.state_dict().items()}
    path, plain = logprobs(model, "graph", fuse=False)
    assert path == "graph" and not fused.is_fused(model)
    gc.collect()  # the unfused pool's buffers and graphs go now, not in the middle of the reading below
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    handle = fused.fuse(model)
    assert torch.cuda.memory_allocated() - allocated < 2**20  # the fused weights replace the originals (no copy)
    path, ours = logprobs(model, "graph", fuse=True)
    assert path == "graph"
    assert handle.describe() == {"qkv_proj": 30, "gate_up_proj": 30, "rms_norm": 61, "undone": False}
    exact(ours, plain, worst=1e-4)
    handle.undo()
    assert all(torch.equal(value.cpu(), saved[name]) for name, value in model.state_dict().items())


def step_kernels(model, fuse: bool) -> tuple[list[str], int]:
    """The CUDA kernels of one static (graph-less: each kernel launched and recorded) decode step, and how many
    `aten::_fused_rms_norm` ops launched them (the kernel's own name need not say rms_norm)."""
    from yarnkit.runtime.engine import StreamingEngine
    from yarnkit.train.profiling import _intervals, step_profile

    ids = bench.random_ids(130, model.config.vocab_size, seed=5)
    engine = StreamingEngine(model, sinks=4, window=256, decode="static", fuse=fuse)
    with torch.no_grad():
        engine.feed(ids[:128][None], all_logits=False)
        engine.feed(ids[128].view(1, 1), all_logits=False)  # warm: the first step's one-off kernels stay out
        torch.cuda.synchronize()
        with step_profile(True) as prof:
            engine.feed(ids[129].view(1, 1), all_logits=False)
            torch.cuda.synchronize()
    engine.close()
    intervals, on_gpu = _intervals(prof)
    assert on_gpu
    return [name for name, _, _ in intervals], sum(event.name == "aten::_fused_rms_norm" for event in prof.events())


def test_a_fused_bf16_step_launches_fewer_kernels():
    """Unfused, a Llama RMSNorm is ~8 kernels in bf16 (casts, pow, mean, add, rsqrt, mul, mul), torch.rms_norm one;
    q/k/v and gate/up are 2 matmuls instead of 5 per layer. The H100 profile of the graph (1,226 kernels per step)
    expects ~427 + 90 fewer; asserted: at least 4 per norm and 3 per layer fewer, one _fused_rms_norm per norm."""
    from yarnkit.runtime import fused

    model = bench.random_model("smollm2-135m", "cuda", torch.bfloat16)
    plain, plain_norms = step_kernels(model, fuse=False)
    assert not fused.is_fused(model)
    ours, norms = step_kernels(model, fuse=True)
    assert fused.fused_parts(model) == {"fused_projections": True, "fused_norms": True}
    print(f"kernels per static bf16 step: unfused {len(plain)}, fused {len(ours)} ({norms} _fused_rms_norm)")
    assert norms == 61 and plain_norms == 0
    assert len(plain) - len(ours) >= 61 * 4 + 30 * 3
    fused.unfuse(model)


@pytest.mark.parametrize("kernel", ["sdpa", "split"])
def test_compiled_bf16_step_copies_no_cache_row(kernel):
    """SmolLM2's layer shape, two layers of it (the write is per layer; 30 would add minutes of compiling to the gpu
    tests), cache 4096."""
    from conftest import compiled_step_code
    from transformers import AutoModelForCausalLM, LlamaConfig

    from yarnkit.runtime.options import StreamOptions
    from yarnkit.runtime.static import make_pool

    config = LlamaConfig(**{**bench.SHAPES["smollm2-135m"], "num_hidden_layers": 2}, max_position_embeddings=8192)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    pool = make_pool(model, StreamOptions(window=CACHE, decode="static", decode_attention=kernel), rows=1)
    cache = pool.acquire()
    with torch.no_grad():
        pool.prefill(cache, bench.random_ids(256, model.config.vocab_size, seed=5)[None])
        _, copies = compiled_step_code(pool, cache, 7)
    assert copies == [], f"the compiled step allocates cache-sized buffers {copies}"
