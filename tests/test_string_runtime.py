"""STRING in the streaming runtime (`yarnkit chat/serve --string`): the paths it runs on, and the ones it refuses.

- eager and static engines with STRING, fed in uneven chunks with no eviction, give the logits of one float64
  reference forward over the whole stream (1e-5): positions come from the cache slots;
- through eviction (sinks + rolling window, re-rotated keys) static equals eager with STRING on (1e-5), and
  STRING changes the logits there (distances in the cache reach S);
- a batched decode step over two sessions at different lengths equals decoding each alone (per-row positions);
- `graph` and `--compile` are refused with the fix; `auto` takes `static` on CUDA and says so; `yarnkit chat
  --string` answers on CPU. Bad flags: tests/test_bad_input.py.

Run: python -m pytest tests/test_string_runtime.py -q   (~30 s on 2 cores)
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from yarnkit import string_attention as sa
from yarnkit.errors import BadValue
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions, resolve_decode
from yarnkit.runtime.static import make_pool

TOL = 1e-5


def _model():
    return tiny_model("llama", seed=5).float()


def _stream(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _feed(engine, stream, sizes):
    out, start, i = [], 0, 0
    while start < stream.shape[1]:
        out.append(engine.feed(stream[:, start:start + sizes[i % len(sizes)]]))
        start, i = start + sizes[i % len(sizes)], i + 1
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_engines_without_eviction_equal_the_reference_forward(decode):
    model, stream = _model(), _stream(60)
    handle = sa.apply_string(model, 20, 4, kernel="reference")
    with torch.no_grad():
        reference = model(input_ids=stream).logits
    handle.undo()
    handle = sa.apply_string(model, 20, 4)
    engine = StreamingEngine(model, sinks=4, window=100, prefill_chunk=16, decode=decode)
    got = _feed(engine, stream, [9, 1, 1, 4, 20])
    handle.undo()
    assert engine.decode_path == decode and len(engine) == 60
    assert (got - reference).abs().max() < TOL


def test_static_equals_eager_through_eviction():
    model, stream = _model(), _stream(90, seed=3)

    def run(decode, string):
        handle = sa.apply_string(model, 10, 2) if string else None
        engine = StreamingEngine(model, sinks=4, window=28, evict_batch=5, prefill_chunk=8, decode=decode)
        logits = _feed(engine, stream, [9, 1, 1, 4])
        if handle:
            handle.undo()
        return logits, engine

    (eager, first), (static, second) = run("eager", True), run("static", True)
    assert second.decode_path == "static" and second.cache.rerotations > 3
    assert (static - eager).abs().max() < TOL
    assert (run("eager", False)[0] - eager).abs().max() > 1e-4  # cache distances reach S=10: STRING acts


def test_batched_decode_of_two_sessions_equals_each_alone():
    model = _model()
    handle = sa.apply_string(model, 12, 2)
    options = StreamOptions(sinks=4, window=64, decode="static")
    pool = make_pool(model, options, rows=2)
    together = [StreamingEngine(model, options, pool=pool) for _ in range(2)]
    alone = [StreamingEngine(model, options) for _ in range(2)]
    prompts = [_stream(30, seed=1), _stream(21, seed=2)]  # different lengths: per-row positions
    for engines in (together, alone):
        for engine, prompt in zip(engines, prompts):
            engine.feed(prompt)
    tokens = [7, 9]
    for _ in range(5):
        batched = StreamingEngine.decode_together(together, tokens)
        single = [engine.feed(torch.tensor([[token]]), all_logits=False)[0, -1] for engine, token in zip(alone, tokens)]
        for a, b in zip(batched, single):
            assert (a - b).abs().max() < TOL
        tokens = [int(row.argmax()) for row in batched]
    handle.undo()


def test_decode_paths_that_string_does_not_run_are_refused_or_moved():
    assert resolve_decode("auto", "cuda", string=True) == "static" and resolve_decode("auto", "cuda") == "graph"
    assert resolve_decode("auto", "cpu", string=True) == "eager"
    assert resolve_decode("auto", "cpu", pooled=True, string=True) == "static"
    assert resolve_decode("eager", "cuda:1", string=True) == "eager"
    with pytest.raises(BadValue, match="--decode graph with --string.*--decode static"):
        resolve_decode("graph", "cuda", string=True)
    with pytest.raises(BadValue, match="--compile with --string"):
        resolve_decode("static", "cuda", string=True, compile=True)
    model = _model()
    assert StreamOptions(decode="graph").resolved(model.config, "cpu").decode == "graph"  # no STRING: unchanged
    handle = sa.apply_string(model, 20, 4)
    with pytest.raises(BadValue, match="--decode graph"):
        StreamingEngine(model, decode="graph")
    assert StreamingEngine(model, window=64).decode_path == "eager"
    handle.undo()


def test_chat_answers_with_string(tmp_path, capsys):
    from yarnkit.cli import main
    from yarnkit.models import load_tokenizer

    tiny_model("llama", vocab_size=49152).save_pretrained(tmp_path)
    load_tokenizer("smollm2-135m").save_pretrained(tmp_path)
    assert main(["chat", str(tmp_path), "--prompt", "Hello there", "--max-new-tokens", "4", "--window", "256",
                 "--string", "40,4"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "error" not in out.err
