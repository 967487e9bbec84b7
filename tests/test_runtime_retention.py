"""SirLLM retention and LLMLingua-style compression, on tiny random models (`SinkPolicy`: test_eval_stream.py).

Run: `python -m pytest tests/test_runtime_retention.py -q`
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from yarnkit.runtime.compress import compress_context, compress_prompt, split_prompt, token_self_information
from yarnkit.runtime.engine import StreamingEngine


def stream(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_sirllm_keeps_highest_self_information_tokens_and_decays():
    model = tiny_model("llama")
    engine = StreamingEngine(model, sinks=2, window=32, evict_batch=10, sirllm_keep=8, prefill_chunk=1)
    ids = stream(33)
    for i in range(33):  # one token at a time; the self-information is recomputed independently below
        engine.feed(ids[:, i:i + 1])
    logp = torch.log_softmax(model(ids[:, :32]).logits[0].float(), -1)
    info = -logp[torch.arange(31), ids[0, 1:32]]  # info[i - 1] = -log p(token i | tokens < i)
    # 32 slots full, token 33 forces 10 evictions: sinks 0..1, top-8 of slots 2..19, the 12 recent 20..31
    older = torch.arange(2, 20)
    expected = older[info[older - 1].topk(8).indices].sort().values
    assert len(engine) == 23
    assert engine.cache_ids[2:10].tolist() == ids[0, expected].tolist()
    assert engine.cache_ids[10:].tolist() == ids[0, 20:].tolist()
    before = engine.scores.clone()
    engine.end_round()
    torch.testing.assert_close(engine.scores, before * 0.9)


class CharTokenizer:
    """One token per character (ids 3..127), enough for the compressor on a tiny model."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 125) for c in text]}

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)


def test_compression_hits_the_budget_and_keeps_most_surprising_tokens():
    model = tiny_model("llama")
    tok = CharTokenizer()
    context = "abcdefghij" * 30
    result = compress_context(model, tok, context, rate=0.25, segment=100)
    assert result.original_tokens == 300 and result.compressed_tokens == 75 and result.ratio == 4.0
    piece = tok(context[:100])["input_ids"]
    info = token_self_information(model, [], piece)
    top = sorted(info.topk(25).indices.tolist())
    assert result.text[:25] == "".join(context[i] for i in top)


def test_compress_prompt_keeps_instruction_and_question():
    model = tiny_model("llama")
    text = "Summarise the notes.\n" + "xyz " * 50 + "\nWhat is the key point?"
    assert split_prompt(text)[0] == "Summarise the notes." and split_prompt(text)[2] == "What is the key point?"
    result = compress_prompt(model, CharTokenizer(), text, rate=0.3)
    assert result.text.startswith("Summarise the notes.\n") and result.text.endswith("\nWhat is the key point?")
    assert result.ratio == pytest.approx(200 / 60)
    with pytest.raises(ValueError, match="rate"):
        compress_context(model, CharTokenizer(), "abc", rate=0.0)
