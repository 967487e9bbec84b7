"""Read long documents from disk: text files (plain or .gz), folders of them, or a field of a .jsonl file; and
the local data sources' names: aliases, globs and comma-joined parts.

Shared by training data, evaluation and export checks; it yields `(name, text)` and knows nothing about tokens.
A source part is a file, a folder, a glob (`/data/books/train_*.txt.gz`) or an alias: `bundled:NAME` (a book
shipped in yarnkit.assets) or `python-stdlib` (this interpreter's standard-library .py sources, tests and
site-packages left out: an offline code corpus). Missing paths, a .jsonl line that is not JSON or lacks the text
field, text that is not UTF-8 and a `.gz` that is not gzip fail with the path (and line or byte offset) in the
message; nothing is decoded with replacement characters behind the user's back. Empty documents are skipped by
the callers, which name them.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from yarnkit.assets import sample_path
from yarnkit.errors import DataError, NotFound

TEXT_SUFFIXES = (".txt", ".txt.gz", ".tex", ".tex.gz", ".md", ".md.gz", ".py", ".gz")
PYTHON_STDLIB = "python-stdlib"
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


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


def expand_alias(source: str) -> str:
    """`bundled:NAME` -> the bundled book's path, `python-stdlib` -> the standard library folder; else unchanged."""
    if source == PYTHON_STDLIB:
        import sysconfig

        return sysconfig.get_paths()["stdlib"]
    if source.startswith("bundled:"):
        return str(sample_path(source.split(":", 1)[1]))
    return source


def source_parts(source: str) -> list[str]:
    """`a,b` -> [a, b]; an `hf:` source stays whole."""
    return [source] if source.startswith("hf:") else [part.strip() for part in source.split(",") if part.strip()]


def stdlib_files() -> list[Path]:
    """The standard library's .py files, without its tests, IDLE, lib2to3 and any installed packages."""
    root = Path(expand_alias(PYTHON_STDLIB))
    return sorted(f for f in root.rglob("*.py") if not STDLIB_SKIP & set(f.relative_to(root).parts[:-1]))


def local_files(part: str) -> list[Path]:
    """Every file one local source part reads (folders expanded), for fingerprints."""
    if part == PYTHON_STDLIB:
        return stdlib_files()
    return [f for path in local_paths(expand_alias(part))
            for f in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])]


def local_documents(part: str, field: str) -> list[str]:
    if part == PYTHON_STDLIB:
        return [read_text(f) for f in stdlib_files()]
    return [text for p in local_paths(expand_alias(part)) for _, text in iter_documents(p, field=field)]


def local_paths(source: str) -> list[Path]:
    """The file/folder named by `source`, or the sorted matches of a glob like `/data/books/train_*.txt.gz`."""
    if any(char in source for char in "*?["):
        base = Path(source).expanduser()
        anchor = Path(base.anchor) if base.is_absolute() else Path(".")
        matches = sorted(anchor.glob(str(base.relative_to(anchor)) if base.is_absolute() else source))
        if not matches:
            raise NotFound(f"no files match data.source={source}", "check the pattern, or name a file or folder")
        return matches
    path = Path(source).expanduser()
    if not path.exists():
        raise NotFound(f"data path not found: {path}", "set data.source to a file, folder, glob or hf:NAME")
    return [path]
