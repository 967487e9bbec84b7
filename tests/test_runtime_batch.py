"""Continuous batching: sessions that share a `SlotPool` decode in one batched step, each with its own cache.

Run: `python -m pytest tests/test_runtime_batch.py -q`

What is proven (tiny random Llama, float32, CPU; the same code runs as a CUDA graph on a GPU):
- three sessions with different prompts, lengths and SirLLM settings, decoded together through evictions,
  produce exactly the greedy tokens and kept tokens of each one decoded alone (fresh engine, eager cache),
  logits within 1e-5, SirLLM scores (computed for the whole step at once) within 1e-4;
- sessions in non-adjacent rows (a freed row in between) are unaffected by the idle row;
- a lone session's step runs its own row only (batch 1 in the last row of a pool, not rows 0..3), with exactly the
  logits of the same session in row 0; two sessions step the span of their rows (a graph: rows 0..B-1);
- rows are handed out and given back; the pool refuses a session it has no room for;
- a step on token ids still on the device (`decode_on_device`, the server's step queued ahead) equals the step
  on host ints in any row order; the bookkeeping follows on `confirm`, and `take_back` frees the slot; only a
  pooled row with room and no SirLLM takes such a step (`fit_one_more`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.static import make_pool
from yarnkit.runtime.options import StreamOptions


def prompt(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def alone(model, ids, steps, keep: list | None = None, **options):
    engine = StreamingEngine(model, decode="eager", **options)
    if keep is not None:
        keep.append(engine)
    tokens, rows = [], []
    logits = engine.feed(ids, all_logits=False)[0, -1]
    for _ in range(steps):
        token = int(logits.argmax())
        tokens.append(token)
        logits = engine.feed(torch.tensor([[token]]), all_logits=False)[0, -1]
        rows.append(logits)
    return tokens, torch.stack(rows)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=2)


def test_batched_decode_equals_each_session_alone(model):
    options = StreamOptions(sinks=4, window=32, evict_batch=5, decode="static")
    pool = make_pool(model, options, rows=4)
    setups = [(prompt(10, 1), {}), (prompt(27, 2), {}), (prompt(3, 3), {"sirllm_keep": 6})]
    engines = [StreamingEngine(model, options, pool=pool, **extra) for _, extra in setups]
    steps = 40  # every session evicts several times while decoding
    logits = [engine.feed(ids, all_logits=False)[0, -1] for engine, (ids, _) in zip(engines, setups)]
    tokens, rows = [[] for _ in engines], [[] for _ in engines]
    for _ in range(steps):
        chosen = [int(row.argmax()) for row in logits]
        logits = StreamingEngine.decode_together(engines, chosen)
        for i, (token, row) in enumerate(zip(chosen, logits)):
            tokens[i].append(token)
            rows[i].append(row)
    assert all(engine.cache.rerotations >= 3 for engine in engines)
    for i, (ids, extra) in enumerate(setups):
        solo = []
        solo_tokens, solo_rows = alone(model, ids, steps, solo, sinks=4, window=32, evict_batch=5, **extra)
        assert tokens[i] == solo_tokens
        torch.testing.assert_close(torch.stack(rows[i]), solo_rows, atol=1e-5, rtol=0)
        assert engines[i].cache_ids.tolist() == solo[0].cache_ids.tolist()
        torch.testing.assert_close(engines[i].scores, solo[0].scores, atol=1e-4, rtol=0)  # SirLLM: batched -log p
        assert engines[i].cache_ids.tolist()[:4] == (ids[0].tolist() + tokens[i])[:4]  # sinks kept


def test_idle_row_between_sessions_changes_nothing(model):
    options = StreamOptions(sinks=2, window=24, decode="static")
    pool = make_pool(model, options, rows=4)
    first, middle, last = (StreamingEngine(model, options, pool=pool) for _ in range(3))
    assert [e.cache.row for e in (first, middle, last)] == [0, 1, 2]
    middle.feed(prompt(20, 9))
    middle.close()  # row 1 holds stale tokens now; row 2 decodes in a batch of width 4
    logits = [engine.feed(prompt(6, seed), all_logits=False)[0, -1] for engine, seed in ((first, 4), (last, 5))]
    got = [[], []]
    for _ in range(12):
        chosen = [int(row.argmax()) for row in logits]
        logits = StreamingEngine.decode_together([first, last], chosen)
        for i, token in enumerate(chosen):
            got[i].append(token)
    assert got[0] == alone(model, prompt(6, 4), 12, sinks=2, window=24)[0]
    assert got[1] == alone(model, prompt(6, 5), 12, sinks=2, window=24)[0]
    again = StreamingEngine(model, options, pool=pool)
    assert again.cache.row == 1 and len(again) == 0
    StreamingEngine(model, options, pool=pool)
    with pytest.raises(RuntimeError, match="all 4 cache rows are in use"):
        StreamingEngine(model, options, pool=pool)
    with pytest.raises(ValueError, match="decode='static'"):
        make_pool(model, StreamOptions(window=24, decode="eager"))


def test_a_lone_session_steps_its_own_row_wherever_it_sits(model):
    """The step of a lone session in the last row runs one row (not rows 0..3) and gives exactly the logits of
    the same session decoded in row 0; two sessions step the span of their rows."""
    options = StreamOptions(sinks=2, window=24, evict_batch=4, decode="static")
    pool = make_pool(model, options, rows=4)
    engines = [StreamingEngine(model, options, pool=pool) for _ in range(4)]
    for engine, seed in zip(engines, (7, 8, 9, 7)):  # rows 0 and 3 read the same prompt
        engine.feed(prompt(6, seed))
    shapes = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        decoded = {}
        for row in (3, 0):
            logits, token, shapes[:] = [], int(engines[row].last_logits.argmax()), []
            for _ in range(30):  # through evictions
                logits.append(StreamingEngine.decode_together([engines[row]], [token])[0])
                token = int(logits[-1].argmax())
            assert shapes == [(1, 1)] * 30, f"row {row}: the model saw batches {sorted(set(shapes))}"
            decoded[row] = torch.stack(logits)
        assert engines[3].cache.rerotations >= 2
        assert torch.equal(decoded[3], decoded[0])
        shapes[:] = []
        StreamingEngine.decode_together([engines[1], engines[3]], [5, 6])
        assert shapes == [(3, 1)]  # rows 1..3; row 2 writes to its scratch slot
    finally:
        hook.remove()
    assert (pool.step_rows([3]), pool.step_rows([1, 3]), pool.step_rows([0])) == ((3, 1), (1, 3), (0, 1))
    pool.use_graph = True  # a captured graph has one shape per width: rows 0..B-1, B a power of two
    assert (pool.step_rows([3]), pool.step_rows([1]), pool.step_rows([0])) == ((0, 4), (0, 2), (0, 1))


def test_a_step_on_ids_still_on_the_device_equals_the_step_on_host_ids(model):
    """`decode_on_device` (the server's step queued before the last one's ids are read) gives the logits of
    `decode_together` on the same ids as host ints, in the usual row order and in another (rows given 2, 0: the
    ids are placed by index); `confirm` records what `decode_together` records, and `take_back` frees the slot
    the next token writes."""
    options = StreamOptions(sinks=2, window=40, decode="static")
    pools = [make_pool(model, options, rows=3) for _ in range(2)]
    pairs = [[StreamingEngine(model, options, pool=pool) for _ in range(3)] for pool in pools]
    for engines in pairs:
        for engine, seed in zip(engines, (1, 2, 3)):
            engine.feed(prompt(6 + seed, seed))
    host, device = pairs
    for order in ([0, 1, 2], [2, 0]):
        tokens = [int(host[i].last_logits.argmax()) for i in order]
        expected = StreamingEngine.decode_together([host[i] for i in order], tokens)
        got = StreamingEngine.decode_on_device([device[i] for i in order], torch.tensor(tokens))
        assert torch.equal(got, expected)
        for i, token, row in zip(order, tokens, got):
            assert not device[i].is_consistent()  # fed, not yet recorded
            device[i].confirm(token, row)
    for a, b in zip(host, device):
        assert b.is_consistent() and b.cache_ids.tolist() == a.cache_ids.tolist() and len(b) == len(a)
        assert torch.equal(b.last_logits, a.last_logits)
    length = len(device[1])
    StreamingEngine.decode_on_device([device[1]], torch.tensor([7]))
    device[1].take_back()
    assert len(device[1]) == length and device[1].is_consistent()
    expected = StreamingEngine.decode_together([host[1]], [9])
    assert torch.equal(StreamingEngine.decode_together([device[1]], [9]), expected)  # slot 7 overwritten by 9


def test_only_a_pooled_row_with_room_and_no_sirllm_takes_a_token_on_the_device(model):
    options = StreamOptions(sinks=2, window=16, evict_batch=4, decode="static")
    pool = make_pool(model, options, rows=3)
    plain, retaining = StreamingEngine(model, options, pool=pool), StreamingEngine(model, options, pool=pool,
                                                                                sirllm_keep=2)
    assert not plain.fit_one_more()  # no prompt yet
    plain.feed(prompt(15, 1))
    retaining.feed(prompt(5, 2))
    assert plain.fit_one_more() and not retaining.fit_one_more()  # SirLLM needs the token's id for its score
    StreamingEngine.decode_together([plain], [3])
    assert len(plain) == 16 and not plain.fit_one_more()  # full: the next token evicts first
    eager = StreamingEngine(model, StreamOptions(sinks=2, window=16, decode="eager"))
    eager.feed(prompt(5, 3))
    assert not eager.fit_one_more()
    with pytest.raises(ValueError, match="holds no token"):
        StreamingEngine(model, options, pool=pool).cache.drop_last()
