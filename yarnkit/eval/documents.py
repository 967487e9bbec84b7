"""Documents for evaluation: files/folders/.jsonl via `yarnkit.corpus.iter_documents`, or a local `datasets` dataset.

Yields `(name, text)`. A `datasets` name is loaded offline (HF_DATASETS_OFFLINE=1): machines have no hub access,
so a dataset that is not already in the local cache fails with a message saying so. Empty documents are named
and skipped by the callers (see `tokenize_documents`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from yarnkit.errors import BadValue, DatasetUnavailable, NotFound
from yarnkit.corpus import iter_documents


def iter_eval_documents(data: str, field: str = "text", split: str = "test") -> Iterator[tuple[str, str]]:
    """`data` is a path (text/.gz file, folder, .jsonl) or `hf:NAME[:CONFIG]` for a cached `datasets` dataset."""
    if not data.startswith("hf:"):
        if not Path(data).expanduser().exists():
            raise NotFound(f"data path not found: {data}", "pass a text/.gz file, a folder, a .jsonl file, or "
                           "hf:NAME[:CONFIG] for a locally cached `datasets` dataset")
        yield from iter_documents(data, field=field)
        return
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    name, _, config = data[3:].partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        raise DatasetUnavailable(f"could not load dataset {name!r} (config {config or None!r}, split {split!r}) "
                                 f"offline: {error}", "machines have no hub access: save it locally and pass its "
                                 "path (.jsonl with --field) instead") from error
    if field not in dataset.column_names:
        raise BadValue(f"dataset {name!r} has no field {field!r} (fields: {dataset.column_names})",
                       "name the text field with --field")
    for index, record in enumerate(dataset):
        yield f"{name}[{index}]", record[field]


def tokenize_documents(documents, tokenizer, max_tokens: int | None = None, max_docs: int | None = None):
    """`(kept, skipped)`: kept is a list of `(name, token_ids)` (ids without special tokens, cut at `max_tokens`);
    skipped lists `{"document", "reason"}` for empty documents. Stops after `max_docs` kept documents."""
    kept, skipped = [], []
    for name, text in documents:
        if max_docs is not None and len(kept) >= max_docs:
            break
        if not text or not text.strip():
            skipped.append({"document": name, "reason": "empty document"})
            continue
        if max_tokens is not None:
            text = text[: max_tokens * 16]  # skip tokenising a whole book: prose averages ~4-5 chars per token
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        kept.append((name, ids[:max_tokens] if max_tokens is not None else ids))
    return kept, skipped
