"""The runtime's fuse (yarnkit/runtime/fused.py, `StreamOptions.fuse`) on CPU: q/k/v and gate/up projections as one
matmul each, Llama-form RMSNorms as one `torch.rms_norm` each.

Run: `python -m pytest tests/test_runtime_fused.py -q`

What is proven (tiny random Llamas, float32):
- through the SlotPool path (chunked prefill, single-token decode, a batched step of three sessions, evictions)
  the fused model (projections and norms) gives the unfused model's logits within 1e-5 (atol, rtol 0), and their
  caches hold the same keys and values; against the unfused eager engine too, norms alone fused, within 1e-5;
- one fused norm equals transformers' LlamaRMSNorm within 1e-6 in float32; in bf16 it differs by at most one bf16
  ulp (2^-7 relative; transformers rounds twice, torch.rms_norm once) and is the nearer to the exact value (half
  an ulp), with the share of elements that differ measured (about a quarter);
- a pooled decode step runs 4 matmuls per layer fused (7 unfused), plus the head's;
- fusing keeps one copy of the weights (the original Linears become views of the fused weight, the norms share
  their very Parameter) and `undo()` gives back the original modules with their own weights, the state dict bit
  for bit; `false` leaves the model untouched; a fused model (projections and norms) traces as one graph for
  torch.compile;
- projections that are not Llama-like (biases, a LoRA wrapper, already-fused or other projections) are left alone
  with one logged line, once per model, while the model's Llama-form norms are fused; norms that are not of the
  Llama form (Gemma's 1 + weight, a bias) are left alone with one line, while the projections are fused;
- the setting resolves auto / true / false per decode path, and a bad value fails as one line.
The CUDA graph fused, and its kernel count: tests/test_runtime_gpu.py -k fused (gpu marker).
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import CountOps, tiny_model
from torch import nn

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


@torch.no_grad()
def pooled_stream(model, fuse: bool) -> tuple[torch.Tensor, list[StreamingEngine]]:
    """Three sessions on one pool: chunked prompts, then decode steps batched across them, evicting as they go;
    every logit row in order."""
    options = StreamOptions(sinks=4, window=28, evict_batch=5, prefill_chunk=8, decode="static",
                            fuse=fuse)
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
    assert fused.fused_parts(ours) == {"fused_projections": True, "fused_norms": True}
    assert sum(isinstance(module, fused.FusedRMSNorm) for module in ours.modules()) == 2 * 2 + 1
    assert all(engine.cache.rerotations >= 2 for engine in engines) and engines[0].stats()["fused_norms"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for a, b in zip(engines, plain_engines):
        assert a.cache_ids.tolist() == b.cache_ids.tolist()
        for mine, theirs in zip(a.cache.layers, b.cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=0)
    assert same_state(plain, saved)  # `false`: nothing on the model changed
    assert all(type(module) not in (fused.ProjectionPart, fused.FusedRMSNorm) for module in plain.modules())


def test_fused_norms_pool_equals_the_unfused_eager_engine():
    """Norms alone fused (a model whose projections stay: attention bias), the pool's static path against the
    unfused eager engine (stock transformers' norms), through prefill, decode and evictions."""
    plain, ours = (tiny_model("llama", num_hidden_layers=2, attention_bias=True) for _ in range(2))
    engine = StreamingEngine(ours, sinks=4, window=24, evict_batch=4, prefill_chunk=8, decode="static", fuse=True)
    reference = StreamingEngine(plain, sinks=4, window=24, evict_batch=4, prefill_chunk=8, decode="eager")
    assert fused.fused_parts(ours) == {"fused_projections": False, "fused_norms": True}
    with torch.no_grad():
        torch.testing.assert_close(engine.feed(tokens(19)), reference.feed(tokens(19)), atol=1e-5, rtol=0)
        for token in tokens(30, seed=4)[0]:
            torch.testing.assert_close(engine.feed(token.view(1, 1)), reference.feed(token.view(1, 1)), atol=1e-5,
                                       rtol=0)
    assert engine.cache.rerotations >= 2 and not fused.is_fused(plain)


def norm_pair(dtype):
    """transformers' LlamaRMSNorm of SmolLM2-135M's width with a trained-looking weight, and its fused twin."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    norm = norm.to(dtype)
    x = (torch.randn(256, 576) * torch.logspace(-2, 1, 256)[:, None]).to(dtype)  # rows over three decades of scale
    return norm, fused.FusedRMSNorm(norm), x


def test_a_fused_norm_equals_transformers_norm_in_float32():
    norm, ours, x = norm_pair(torch.float32)
    assert ours.weight is norm.weight
    with torch.no_grad():
        torch.testing.assert_close(ours(x), norm(x), atol=1e-6, rtol=0)


def test_a_fused_norm_in_bf16_is_one_rounding_from_transformers_and_the_nearer_to_exact():
    """transformers: bf16(weight * bf16(x / rms)), two roundings; torch.rms_norm: bf16(weight * x / rms), one. Both
    round to nearest (error <= half an ulp, 2^-8 relative), so transformers' value before its last rounding is
    within half an ulp of the exact one and the two outputs are at most one ulp apart (2^-7 relative to the
    larger), and the fused one is within half an ulp of the exact value."""
    norm, ours, x = norm_pair(torch.bfloat16)
    with torch.no_grad():
        theirs, mine = norm(x).float(), ours(x).float()
        xf = x.float()
        exact = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()
    larger = torch.maximum(theirs.abs(), mine.abs())
    assert ((mine - theirs).abs() <= 2**-7 * larger).all()
    assert ((mine - exact).abs() <= 2**-8 * exact.abs() * (1 + 1e-5)).all()  # + float32's own rounding of `exact`
    assert (theirs - exact).abs().max() > (mine - exact).abs().max()
    differ = (mine != theirs).float().mean().item()
    assert 0.05 < differ < 0.5, differ  # measured: 0.26 of the elements differ by that one ulp


@pytest.mark.parametrize("fuse, per_layer", [(True, 4), (False, 7)])
def test_a_pooled_decode_step_runs_four_matmuls_per_layer(fuse, per_layer):
    layers = 3
    model = tiny_model("llama", num_hidden_layers=layers)
    engine = StreamingEngine(model, sinks=4, window=24, decode="static", fuse=fuse)
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
    norms = [model.model.layers[1].post_attention_layernorm, model.model.norm]

    def storage_bytes():
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())

    total = storage_bytes()
    handle = fused.fuse(model)
    assert handle.describe() == {"qkv_proj": 2, "gate_up_proj": 2, "rms_norm": 5, "undone": False}
    assert fused.fuse(model) is handle  # once per model
    assert isinstance(model.model.norm, fused.FusedRMSNorm) and model.model.norm.weight is norms[1].weight
    assert storage_bytes() == total  # no second copy in the model ...
    shared = attention.qkv_proj.weight.untyped_storage().data_ptr()
    assert all(linear.weight.untyped_storage().data_ptr() == shared for linear in originals)  # ... nor outside it
    assert "model.layers.0.self_attn.qkv_proj.weight" in model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)

    handle.undo()
    assert not fused.is_fused(model) and same_state(model, saved)
    assert [attention.q_proj, attention.k_proj, attention.v_proj] == originals and not hasattr(attention, "qkv_proj")
    assert [model.model.layers[1].post_attention_layernorm, model.model.norm] == norms
    assert len({linear.weight.untyped_storage().data_ptr() for linear in originals}) == 3  # own copies again
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="already undone"):
        handle.undo()


def test_a_fused_step_traces_as_one_graph_for_torch_compile():
    """What `--compile` compiles: dynamo follows the shared product through the parts and torch.rms_norm without a
    graph break (eager backend: no code generation on CPU), and leaves no product pending between steps."""
    model = tiny_model("llama", num_hidden_layers=2)
    options = StreamOptions(window=32, evict_batch=4, decode="static", fuse=True)
    pool = make_pool(model, options, rows=2)
    engine = StreamingEngine(model, options, pool=pool)
    pool._step = torch.compile(pool.forward_rows, backend="eager", fullgraph=True, dynamic=False)
    reference = StreamingEngine(tiny_model("llama", num_hidden_layers=2), window=32, evict_batch=4, decode="eager")
    engine.feed(tokens(10))
    reference.feed(tokens(10))
    for token in tokens(30, seed=6)[0]:
        torch.testing.assert_close(engine.feed(token.view(1, 1), all_logits=False),
                                   reference.feed(token.view(1, 1), all_logits=False), atol=1e-5, rtol=0)
    assert engine.cache.rerotations >= 2 and not fused.is_fused(reference.model)
    assert fused.fused_parts(model) == {"fused_projections": True, "fused_norms": True}
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
def test_projections_that_are_not_llama_like_are_left_alone_with_one_line(caplog, build, reason):
    """The projections stay as they are (one line); the Llama-form norms of the same model are fused."""
    model = build().eval()
    saved = snapshot(model)
    projections = [module for module in model.modules() if isinstance(module, nn.Linear)]
    with caplog.at_level(logging.WARNING, logger="yarnkit.runtime.fused"):
        handle = fused.fuse(model)
        for _ in range(2):  # the runtime asks again for every decoder it builds: still one line
            StreamingEngine(model, sinks=4, window=24, decode="static").feed(tokens(6))
    lines = [record.getMessage() for record in caplog.records if record.name == "yarnkit.runtime.fused"]
    assert len(lines) == 1 and lines[0].startswith("projections left unfused") and reason in lines[0], lines
    assert [module for module in model.modules() if isinstance(module, nn.Linear)] == projections
    assert handle.describe()["qkv_proj"] == handle.describe()["gate_up_proj"] == 0 and handle.describe()["rms_norm"]
    assert fused.fused_parts(model) == {"fused_projections": False, "fused_norms": True}
    handle.undo()
    assert same_state(model, saved) and not fused.is_fused(model)


class BiasedRMSNorm(nn.Module):
    """Llama's norm plus a bias: not the Llama form."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon
        self.bias = nn.Parameter(torch.zeros_like(norm.weight))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) + self.bias


def with_a_biased_norm():
    model = tiny_model("llama")
    model.model.norm = BiasedRMSNorm(model.model.norm)
    return model


@pytest.mark.parametrize("build, reason", [
    (lambda: tiny_model("gemma"), "GemmaRMSNorm) does not compute Llama's"),
    (lambda: tiny_model("gemma3_text"), "Gemma3RMSNorm) does not compute Llama's"),
    (with_a_biased_norm, "BiasedRMSNorm) does not compute Llama's"),
], ids=["gemma", "gemma3", "bias"])
def test_norms_not_of_the_llama_form_are_left_alone_with_one_line(caplog, build, reason):
    """Every norm of the model stays as it is (one line), while its projections are fused."""
    model = build().eval()
    norms = [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")]
    with caplog.at_level(logging.WARNING, logger="yarnkit.runtime.fused"):
        handle = fused.fuse(model)
        assert fused.fuse(model) is handle
    lines = [record.getMessage() for record in caplog.records if record.name == "yarnkit.runtime.fused"]
    assert len(lines) == 1 and lines[0].startswith("norms left unfused") and reason in lines[0], lines
    assert [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")] == norms
    assert handle.describe()["rms_norm"] == 0 and handle.describe()["qkv_proj"] == 2
    assert fused.fused_parts(model) == {"fused_projections": True, "fused_norms": False}


def test_another_librarys_copy_of_the_llama_norm_is_left_alone(monkeypatch):
    """Liger-Kernel swaps `modeling_llama.LlamaRMSNorm` for its own class process-wide (its forward also runs
    Gemma's offset norm): a forward from another library is not the Llama form even with the same bytecode, and
    while the reference class itself is swapped no norm is taken for it."""
    import types

    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm.forward
    assert fused.llama_form(original)
    copy = types.FunctionType(original.__code__, original.__globals__, "forward")
    copy.__module__ = "liger_kernel.transformers.rms_norm"
    assert copy.__code__.co_code == original.__code__.co_code and not fused.llama_form(copy)
    model = tiny_model("llama").eval()  # built before the swap: transformers' own norms
    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", type("LigerRMSNorm", (nn.Module,), {"forward": copy}))
    assert not fused.llama_form(original)
    assert fused.fuse(model).describe()["rms_norm"] == 0


def test_a_model_with_nothing_to_fuse_is_left_alone_with_a_line_per_part(caplog):
    model = tiny_model("gemma", attention_bias=True)
    saved = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="yarnkit.runtime.fused"):
        assert fused.fuse(model) is None and fused.fuse(model) is None
    lines = [record.getMessage() for record in caplog.records if record.name == "yarnkit.runtime.fused"]
    assert [line.split(" left")[0] for line in lines] == ["projections", "norms"], lines
    assert same_state(model, saved) and not fused.is_fused(model)
    assert fused.parts_label(fused.fused_parts(model)) == "none"
    assert fused.parts_label({"fused_projections": False, "fused_norms": True}) == "norms"


def test_the_setting_resolves_per_decode_path_and_a_bad_value_is_one_line():
    assert resolve_fuse("auto", "static") and resolve_fuse("auto", "graph") and not resolve_fuse("auto", "eager")
    assert resolve_fuse("true", "eager") and not resolve_fuse("false", "graph") and resolve_fuse(True, "eager")
    model = tiny_model("llama", num_hidden_layers=1)
    assert StreamOptions(window=16).resolved(model.config, "cpu").fuse is False  # one session: eager
    assert StreamOptions(window=16).resolved(model.config, "cpu", pooled=True).fuse is True
    eager = StreamingEngine(model, window=16, decode="eager")
    assert not fused.is_fused(model)
    StreamingEngine(model, window=16, decode="eager", fuse="true")
    assert fused.is_fused(model) and eager.decode_path == "eager"
    with pytest.raises(BadValue, match=r"fuse='yes' \(--fuse\) is not one of auto, true, false") as error:
        StreamingEngine(model, window=16, fuse="yes")
    assert "\n" not in str(error.value)


def test_the_cli_flag_reaches_the_options():
    import argparse

    from yarnkit.runtime.options import add_stream_arguments, stream_options

    parser = argparse.ArgumentParser()
    add_stream_arguments(parser)
    assert stream_options(parser.parse_args([])).fuse == "auto"
    assert stream_options(parser.parse_args(["--fuse", "false"])).fuse == "false"
