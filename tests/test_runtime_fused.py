"""Fused q/k/v and gate/up projections (yarnkit/runtime/fused.py, `StreamOptions.fuse_projections`) on CPU.

Run: `python -m pytest tests/test_runtime_fused.py -q`

What is proven (tiny random Llamas, float32):
- through the SlotPool path (chunked prefill, single-token decode, a batched step of three sessions, evictions)
  the fused model's logits equal the unfused model's within 1e-5 (atol, rtol 0), and their caches hold the same
  keys and values;
- a pooled decode step runs 4 matmuls per layer fused (7 unfused), plus the head's;
- fusing keeps one copy of the weights (the original Linears become views of the fused weight) and `undo()`
  gives back the original modules with their own weights, the state dict bit for bit; `false` leaves the model
  untouched; a fused model traces as one graph for torch.compile;
- models that are not Llama-like (biases, a LoRA wrapper, already-fused or other projections) are left alone with
  one logged line, once per model;
- the setting resolves auto / true / false per decode path, and a bad value fails as one line.
The CUDA graph with fused projections: tests/test_runtime_gpu.py -k fused (gpu marker).
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from yarnkit.errors import BadValue
from yarnkit.runtime import fused
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions, resolve_fuse
from yarnkit.runtime.static import make_pool


def tokens(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def snapshot(model) -> dict:
    return {name: value.clone() for name, value in model.state_dict().items()}


def same_state(model, saved: dict) -> bool:
    state = model.state_dict()
    return list(state) == list(saved) and all(torch.equal(state[name], saved[name]) for name in saved)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def pooled_stream(model, fuse: bool) -> tuple[torch.Tensor, list[StreamingEngine]]:
    """Three sessions on one pool: chunked prompts, then decode steps batched across them, evicting as they go;
    every logit row in order."""
    options = StreamOptions(sinks=4, window=28, evict_batch=5, prefill_chunk=8, decode="static",
                            fuse_projections=fuse)
    pool = make_pool(model, options, rows=3)
    engines = [StreamingEngine(model, options, pool=pool) for _ in range(3)]
    rows = [engine.feed(tokens(19 + 4 * i, seed=i))[0] for i, engine in enumerate(engines)]
    stream = tokens(40, seed=9)[0].tolist()
    for step in range(0, 39, 3):
        rows.append(StreamingEngine.decode_together(engines, stream[step:step + 3]))
        rows.append(engines[step % 3].feed(torch.tensor([[stream[step + 1]]]))[0])  # a lone step too
    return torch.cat(rows), engines


def test_fused_pool_equals_unfused_through_prefill_decode_and_eviction():
    plain, ours = tiny_model("llama", num_hidden_layers=2), tiny_model("llama", num_hidden_layers=2)
    saved = snapshot(plain)
    expected, plain_engines = pooled_stream(plain, fuse=False)
    got, engines = pooled_stream(ours, fuse=True)
    assert fused.is_fused(ours) and not fused.is_fused(plain)
    assert all(engine.cache.rerotations >= 2 for engine in engines) and engines[0].stats()["fused_projections"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for a, b in zip(engines, plain_engines):
        assert a.cache_ids.tolist() == b.cache_ids.tolist()
        for mine, theirs in zip(a.cache.layers, b.cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=0)
    assert same_state(plain, saved)  # `false`: nothing on the model changed
    assert all(type(module) is not fused.ProjectionPart for module in plain.modules())


@pytest.mark.parametrize("fuse, per_layer", [(True, 4), (False, 7)])
def test_a_pooled_decode_step_runs_four_matmuls_per_layer(fuse, per_layer):
    layers = 3
    model = tiny_model("llama", num_hidden_layers=layers)
    engine = StreamingEngine(model, sinks=4, window=24, decode="static", fuse_projections=fuse)
    engine.feed(tokens(10))
    with torch.no_grad(), CountOps() as seen:
        engine.feed(tokens(1, seed=3))
    matmuls = [name for name in seen.names if name in ("mm", "addmm")]  # what an nn.Linear runs (the rotary
    # embedding's batched product, `bmm` in transformers 5.17, is no projection)
    assert len(matmuls) == per_layer * layers + 1  # + the output head


def test_fuse_keeps_one_copy_of_the_weights_and_undo_gives_the_model_back():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = tokens(12)
    with torch.no_grad():
        before = model(ids).logits
    saved = snapshot(model)
    attention = model.model.layers[0].self_attn
    originals = [attention.q_proj, attention.k_proj, attention.v_proj]

    def storage_bytes():
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())

    total = storage_bytes()
    handle = fused.fuse_projections(model)
    assert handle.describe() == {"qkv_proj": 2, "gate_up_proj": 2, "undone": False}
    assert fused.fuse_projections(model) is handle  # once per model
    assert storage_bytes() == total  # no second copy in the model ...
    shared = attention.qkv_proj.weight.untyped_storage().data_ptr()
    assert all(linear.weight.untyped_storage().data_ptr() == shared for linear in originals)  # ... nor outside it
    assert "model.layers.0.self_attn.qkv_proj.weight" in model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)

    handle.undo()
    assert not fused.is_fused(model) and same_state(model, saved)
    assert [attention.q_proj, attention.k_proj, attention.v_proj] == originals and not hasattr(attention, "qkv_proj")
    assert len({linear.weight.untyped_storage().data_ptr() for linear in originals}) == 3  # own copies again
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="already undone"):
        handle.undo()


def test_a_fused_step_traces_as_one_graph_for_torch_compile():
    """What `--compile` compiles: dynamo follows the shared product through the parts without a graph break (eager
    backend: no code generation on CPU), and leaves no product pending between steps."""
    model = tiny_model("llama", num_hidden_layers=2)
    options = StreamOptions(window=32, evict_batch=4, decode="static", fuse_projections=True)
    pool = make_pool(model, options, rows=2)
    engine = StreamingEngine(model, options, pool=pool)
    pool._step = torch.compile(pool.forward_rows, backend="eager", fullgraph=True, dynamic=False)
    reference = StreamingEngine(tiny_model("llama", num_hidden_layers=2), window=32, evict_batch=4, decode="eager")
    engine.feed(tokens(10))
    reference.feed(tokens(10))
    for token in tokens(30, seed=6)[0]:
        torch.testing.assert_close(engine.feed(token.view(1, 1), all_logits=False),
                                   reference.feed(token.view(1, 1), all_logits=False), atol=1e-5, rtol=0)
    assert engine.cache.rerotations >= 2 and fused.is_fused(model) and not fused.is_fused(reference.model)
    assert all(module._pending is None for module in model.modules() if isinstance(module, fused.FusedLinear))


def lora_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("build, reason", [
    (lambda: tiny_model("llama", attention_bias=True), "q_proj has a bias"),
    (lambda: tiny_model("llama", mlp_bias=True), "gate_proj has a bias"),
    (lambda: tiny_model("qwen2"), "q_proj has a bias"),
    (lambda: tiny_model("phi3"), "no q_proj/k_proj/v_proj modules"),
    (lora_model, "not a plain nn.Linear (LoRA"),
], ids=["llama-attention-bias", "llama-mlp-bias", "qwen2", "phi3", "lora"])
def test_models_that_are_not_llama_like_are_left_alone_with_one_line(caplog, build, reason):
    model = build().eval()
    saved = snapshot(model)
    modules = list(model.modules())
    with caplog.at_level(logging.WARNING, logger="yarnkit.runtime.fused"):
        assert fused.fuse_projections(model) is None
        for _ in range(2):  # the runtime asks again for every decoder it builds: still one line
            StreamingEngine(model, sinks=4, window=24, decode="static").feed(tokens(6))
    lines = [record.getMessage() for record in caplog.records if record.name == "yarnkit.runtime.fused"]
    assert len(lines) == 1 and reason in lines[0], lines
    assert list(model.modules()) == modules and same_state(model, saved) and not fused.is_fused(model)


def test_the_setting_resolves_per_decode_path_and_a_bad_value_is_one_line():
    assert resolve_fuse("auto", "static") and resolve_fuse("auto", "graph") and not resolve_fuse("auto", "eager")
    assert resolve_fuse("true", "eager") and not resolve_fuse("false", "graph") and resolve_fuse(True, "eager")
    model = tiny_model("llama", num_hidden_layers=1)
    assert StreamOptions(window=16).resolved(model.config, "cpu").fuse_projections is False  # one session: eager
    assert StreamOptions(window=16).resolved(model.config, "cpu", pooled=True).fuse_projections is True
    eager = StreamingEngine(model, window=16, decode="eager")
    assert not fused.is_fused(model)
    StreamingEngine(model, window=16, decode="eager", fuse_projections="true")
    assert fused.is_fused(model) and eager.decode_path == "eager"
    with pytest.raises(BadValue, match=r"fuse_projections='yes' \(--fuse-projections\) is not one of auto, true, "
                                       r"false") as error:
        StreamingEngine(model, window=16, fuse_projections="yes")
    assert "\n" not in str(error.value)


def test_the_cli_flag_reaches_the_options():
    import argparse

    from yarnkit.runtime.options import add_stream_arguments, stream_options

    parser = argparse.ArgumentParser()
    add_stream_arguments(parser)
    assert stream_options(parser.parse_args([])).fuse_projections == "auto"
    assert stream_options(parser.parse_args(["--fuse-projections", "false"])).fuse_projections == "false"
