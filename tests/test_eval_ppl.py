"""Perplexity-vs-length protocol on a tiny model. Run: python -m pytest tests/test_eval_ppl.py -q

The reference is computed independently: one full-logits forward over `[BOS] + doc[:L-1]` and a float64 mean.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from yarnkit.eval.documents import iter_eval_documents, tokenize_documents
from yarnkit.eval.ppl import evaluate_perplexity, windows

BOS = 1


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


@pytest.fixture(scope="module")
def documents():
    generator = torch.Generator().manual_seed(0)
    return [("short", torch.randint(2, 128, (40,), generator=generator).tolist()),
            ("long-a", torch.randint(2, 128, (300,), generator=generator).tolist()),
            ("long-b", torch.randint(2, 128, (200,), generator=generator).tolist())]


def reference_nll(model, tokens):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].double()
    return F.cross_entropy(logits, torch.tensor(tokens[1:]), reduction="none")


def test_one_window_per_document_with_bos_token_weighted(model, documents):
    row, = evaluate_perplexity(model, documents, [128], BOS, num_docs=2)
    losses = [reference_nll(model, [BOS] + ids[:127]) for _, ids in documents[1:]]
    assert row["documents"] == ["long-a", "long-b"] and row["windows"] == 2
    assert row["too_short"] == [{"document": "short", "reason": "40 tokens < 127 needed"}]
    assert row["tokens"] == 2 * 127
    assert row["ppl"] == pytest.approx(math.exp(torch.cat(losses).mean().item()), rel=1e-5)
    tail = torch.cat([loss[95:] for loss in losses])  # targets at window positions 96..127: the last quarter
    assert row["tail_tokens"] == 64
    assert row["tail_ppl"] == pytest.approx(math.exp(tail.mean().item()), rel=1e-5)


def test_lengths_beyond_max_length_or_every_document_are_skipped_with_reasons(model, documents):
    rows = evaluate_perplexity(model, documents, [32, 512, 1024], BOS, num_docs=5, max_length=600)
    assert rows[0]["documents"] == ["short", "long-a", "long-b"]
    assert rows[1]["skipped"].startswith("no document has the 511 tokens")
    assert {entry["document"] for entry in rows[1]["too_short"]} == {"short", "long-a", "long-b"}
    assert rows[2] == {"length": 1024, "skipped": "length 1024 > --max-length 600"}


def test_sliding_windows_score_every_token_once(model, documents):
    spans = list(windows(300, 64, 16))
    assert spans[0] == (0, 63, 0) and spans[-1][1] == 300
    assert all(end - begin <= 63 for begin, end, _ in spans)
    assert spans[-1] == (240, 300, 287)  # by hand: begins step by 16; the first end >= 300 is 240 + 63; 224 + 63 = 287
    row, = evaluate_perplexity(model, documents[2:], [64], BOS, num_docs=1, stride=32)
    assert row["tokens"] == 200  # every document token is a target exactly once (the first after BOS too)
    ids = documents[2][1]
    spans = list(windows(200, 64, 32))
    scored = [reference_nll(model, [BOS] + ids[begin:end])[first - begin:] for begin, end, first in spans]
    assert row["ppl"] == pytest.approx(math.exp(torch.cat(scored).mean().item()), rel=1e-5)


def test_documents_from_files_skip_empty_ones(tmp_path, monkeypatch):
    import datasets

    from yarnkit.models import load_tokenizer

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the env var is read only at import
    (tmp_path / "a.txt").write_text("Call me Ishmael. " * 20)
    (tmp_path / "b.txt").write_text("  \n")
    kept, skipped = tokenize_documents(iter_eval_documents(str(tmp_path)), load_tokenizer(), max_tokens=30)
    assert [name for name, _ in kept] == ["a.txt"] and len(kept[0][1]) == 30
    assert skipped == [{"document": "b.txt", "reason": "empty document"}]
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        list(iter_eval_documents(str(tmp_path / "no-such-dir")))
    with pytest.raises(RuntimeError, match="offline"):
        list(iter_eval_documents("hf:yarnkit-no-such/dataset"))
