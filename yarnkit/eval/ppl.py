"""Perplexity vs context length, YaRN-paper protocol: one window of L tokens per document, BOS prepended.

For each length L, the first `num_docs` documents with at least L-1 tokens each give one window
`[BOS] + doc[:L-1]`; every target is scored. With `stride`, each document is instead covered by sliding windows
of L (each prefixed with BOS) that advance by `stride`, scoring only the tokens new to each window (the
paper's GovReport setting). Aggregation is token-weighted (the paper's script averages per-window means);
`tail_ppl` scores only targets in the last quarter of each window, where long-context failures show first.
Lengths above `max_length` and documents too short for a length are skipped with a recorded reason.
Run: `yarnkit eval ppl MODEL --data BOOKS`; tests: tests/test_eval_ppl.py.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from yarnkit.nll import token_nll


def bos_token_id(tokenizer) -> int:
    """BOS if the tokenizer has one, else EOS (the document separator such models were trained with)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to prepend to each window")


def windows(num_tokens: int, length: int, stride: int | None):
    """`(begin, end, first_scored)` spans over a document: inputs are `[BOS] + doc[begin:end]`, and targets
    `doc[first_scored:end]` are scored. Without stride: a single truncated window."""
    span = length - 1  # one slot is BOS
    if stride is None:
        yield 0, span, 0
        return
    begin, scored_until = 0, 0
    while True:
        end = min(begin + span, num_tokens)
        yield begin, end, scored_until
        scored_until = end
        if end >= num_tokens:
            return
        begin += stride


def score_document(model, ids: list[int], length: int, bos: int, stride: int | None, chunk_size: int):
    """Sums over one document: `(nll, tokens, tail_nll, tail_tokens, windows)`."""
    device = next(model.parameters()).device
    tail_from = length - length // 4  # window index where the last quarter starts
    nll = tail = 0.0
    count = tail_count = num_windows = 0
    for begin, end, first_scored in windows(len(ids), length, stride):
        window = torch.tensor([[bos] + ids[begin:end]], device=device)
        losses = token_nll(model, window, chunk_size).double().cpu()  # losses[j] predicts window[j + 1]
        target_index = torch.arange(1, window.shape[1])
        scored = target_index > first_scored - begin  # doc index begin + j - 1 >= first_scored
        tail_mask = scored & (target_index >= tail_from)
        nll += losses[scored].sum().item()
        count += int(scored.sum())
        tail += losses[tail_mask].sum().item()
        tail_count += int(tail_mask.sum())
        num_windows += 1
    return nll, count, tail, tail_count, num_windows


def safe_exp(value: float) -> float:
    return math.exp(value) if value < 700 else float("inf")


def perplexity_at_length(model, documents, length: int, bos: int, num_docs: int, stride: int | None = None,
                         chunk_size: int = 1024) -> dict:
    """One row of the result: token-weighted mean and tail perplexity at `length` over up to `num_docs` documents."""
    used, too_short = [], []
    for name, ids in documents:
        if len(used) >= num_docs:
            break
        if len(ids) < length - 1:
            too_short.append({"document": name, "reason": f"{len(ids)} tokens < {length - 1} needed"})
        else:
            used.append((name, ids))
    if not used:
        return {"length": length, "skipped": f"no document has the {length - 1} tokens this length needs",
                "too_short": too_short}
    start = time.perf_counter()
    nll = tail = 0.0
    count = tail_count = num_windows = 0
    per_document = []
    for name, ids in tqdm(used, desc=f"ppl@{length}", leave=False):
        d_nll, d_count, d_tail, d_tail_count, d_windows = score_document(model, ids, length, bos, stride, chunk_size)
        per_document.append({"document": name, "ppl": safe_exp(d_nll / d_count), "tokens": d_count})
        nll, count, tail, tail_count = nll + d_nll, count + d_count, tail + d_tail, tail_count + d_tail_count
        num_windows += d_windows
    return {"length": length, "ppl": safe_exp(nll / count), "tail_ppl": safe_exp(tail / tail_count),
            "nll": nll / count, "tokens": count, "tail_tokens": tail_count, "windows": num_windows,
            "documents": [name for name, _ in used], "per_document": per_document, "too_short": too_short,
            "seconds": round(time.perf_counter() - start, 3)}


def evaluate_perplexity(model, documents, lengths: list[int], bos: int, num_docs: int, stride: int | None = None,
                        max_length: int | None = None, chunk_size: int = 1024) -> list[dict]:
    """Rows for every length; a length above `max_length` is a row with a `skipped` reason, not an error."""
    rows = []
    for length in lengths:
        if max_length is not None and length > max_length:
            rows.append({"length": length, "skipped": f"length {length} > --max-length {max_length}"})
            continue
        try:
            rows.append(perplexity_at_length(model, documents, length, bos, num_docs, stride, chunk_size))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"length": length, "skipped": f"out of GPU memory at length {length}"})
    return rows
