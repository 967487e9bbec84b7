"""Read long documents from disk: text files (plain or .gz), folders of them, or a field of a .jsonl file.

Shared by training data and evaluation; it yields `(name, text)` and knows nothing about tokens.
Missing paths, a .jsonl line that is not JSON or lacks the text field, text that is not UTF-8 and a `.gz` that
is not gzip fail with the path (and line or byte offset) in the message; nothing is decoded with replacement
characters behind the user's back. Empty documents are skipped by the callers, which name them.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from yarnkit.errors import NotFound
from yarnkit.train.errors import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".tex", ".tex.gz", ".md", ".md.gz", ".py", ".gz")


@contextmanager
def binary_lines(path: Path) -> Iterator[Iterator[bytes]]:
    """The file's lines as bytes, gunzipped for `.gz`; a `.gz` that is not (whole) gzip fails naming the file."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            yield iter(handle)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a gzip file ({error})",
                        "rename it without .gz if it is plain text, or re-compress it with gzip") from None


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where} is not UTF-8 text (byte {error.start}: {data[error.start:error.start + 1]!r})",
                        "convert it to UTF-8 first, e.g. iconv -f latin1 -t utf-8 IN > OUT") from None


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"document not found: {path}", "check the path")
    with binary_lines(path) as lines:
        return decode_utf8(b"".join(lines), str(path))


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
        with binary_lines(path) as lines:
            for line_no, raw in enumerate(lines, 1):
                line = decode_utf8(raw, f"{path}:{line_no}")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_no} is not a JSON object ({error.msg})",
                                    "write one JSON object per line") from error
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{line_no} has no text field {field!r} (it has {fields})"
                                    if not isinstance(record, dict) or field not in record else
                                    f"{path}:{line_no}: field {field!r} holds a {type(record[field]).__name__}, "
                                    "not text",
                                    "name the field: data.text_field=NAME for training, --field NAME for "
                                    "yarnkit eval")
                yield f"{path.name}:{line_no}", record[field]
    else:
        yield path.name, read_text(path)
