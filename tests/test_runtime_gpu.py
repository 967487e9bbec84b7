"""GPU path checks for the streaming runtime (run on the GPU machine; skipped without CUDA).

Run: `python -m pytest tests/test_runtime_gpu.py -q -m gpu`

A SmolLM2-135M-shaped Llama (random init, bf16, on CUDA) is fed the same 4,192 tokens (a 4,096-token cache, then
96 decode steps evicting 16 tokens at a time: 6 evictions) by
- the CUDA-graph decode and the same step run eagerly (`static`): the same log-probs up to bf16 kernel choice
  (a graph replays what was captured; cuBLAS/SDPA may pick other kernels under capture: measured 2026-12-01, not
  bitwise equal), max |log-prob difference| within 0.02 and greedy agreement >= 0.97;
- the CUDA-graph decode and the eager growing cache (`SinkCache`, stock attention without a mask): max |log-prob
  difference| within 0.02 (bf16 attention kernels differ: masked vs unmasked) and greedy agreement >= 0.97;
- the graph with `torch.compile` inside (fused kernels keep fp32 between ops): max |log-prob difference| within
  0.1 and greedy agreement >= 0.95 against the eager cache (the benchmark reports the measured values).
Teacher-forced (both paths see the same tokens), so a difference never compounds.
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


def close(a, b, worst=0.02, agreement=0.97):
    assert (a - b).abs().max().item() <= worst
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= agreement


def test_graph_matches_the_same_step_run_eagerly_and_the_eager_cache(model):
    path, graph = logprobs(model, "graph")
    assert path == "graph"
    _, static = logprobs(model, "static")
    close(graph, static)
    _, eager = logprobs(model, "eager")
    close(graph, eager)


def test_compiled_graph_matches_the_eager_cache(model):
    path, compiled = logprobs(model, "graph", compile=True)
    assert path == "graph"
    _, eager = logprobs(model, "eager")
    close(compiled, eager, worst=0.1, agreement=0.95)  # fused kernels round differently (fp32 inside a kernel)
