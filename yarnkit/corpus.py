"""Read long documents from disk: text files (plain or .gz), folders of them, or a field of a .jsonl file.

Shared by training data and evaluation; it yields `(name, text)` and knows nothing about tokens.
Missing paths, a .jsonl line that is not JSON or lacks the text field fail with the path (and line) in the
message; empty documents are skipped by the callers, which name them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from yarnkit.errors import NotFound
from yarnkit.train.errors import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".tex", ".tex.gz", ".md", ".md.gz", ".py", ".gz")


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"document not found: {path}", "check the path")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        return handle.read()


def iter_documents(source: str | Path, field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield `(name, text)` from a text file, a folder (sorted, recursive), or a .jsonl file's `field`."""
    path = Path(source).expanduser()
    if not path.exists():
        raise NotFound(f"data path not found: {path}", "pass a text/.gz file, a folder of them or a .jsonl file")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise NotFound(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}",
                           "point at a folder holding such files, or at one file")
        for file in files:
            yield str(file.relative_to(path)), read_text(file)
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_no} is not a JSON object ({error.msg})",
                                    "write one JSON object per line") from error
                if not isinstance(record, dict) or field not in record:
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{line_no} has no text field {field!r} (it has {fields})",
                                    "name the field: data.text_field=NAME for training, --field NAME for "
                                    "yarnkit eval")
                yield f"{path.name}:{line_no}", record[field]
    else:
        yield path.name, read_text(path)
