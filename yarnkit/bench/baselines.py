"""The zero-shot baselines every extended model is compared with, and the evaluation-book selection.

`baseline_configs(factor)` lists `(label suffix, yarnkit eval arguments, native only)` for the unscaled model,
dynamic NTK xS and zero-shot YaRN xS (S = the fine-tuned model's factor, 8 for SmolLM2 8k -> 64k); "native only"
marks the unscaled model, whose retrieval tasks stop at its own context. `selected_books` links the books that
match a pattern into one folder (the shared books folder mixes PG-19 test and training books). Used by
scripts/e2e.py and scripts/eval_baselines.py; no model here.
"""

from __future__ import annotations

from pathlib import Path

from yarnkit.errors import NotFound


def baseline_configs(factor: float = 8.0) -> list[tuple[str, list[str], bool]]:
    return [("base", [], True),
            (f"dynamic-ntk x{factor:g}", ["--rope-type", "dynamic", "--factor", f"{factor:g}"], False),
            (f"yarn x{factor:g}", ["--rope-type", "yarn", "--factor", f"{factor:g}"], False)]


def selected_books(books: Path, pattern: str, folder: Path) -> Path:
    """`books` itself if it is a file, else `folder` filled with links to its files matching `pattern`."""
    books = Path(books)
    if books.is_file():
        return books
    if not books.is_dir():
        raise NotFound(f"no such book file or folder: {books}", "pass --books a folder of PG-19 test books")
    matches = sorted(books.glob(pattern))
    if not matches:
        raise NotFound(f"no files match {pattern!r} in {books}", "pass --pattern (e.g. 'test_*')")
    for book in matches:
        (folder / book.name).symlink_to(book.resolve())
    return folder
