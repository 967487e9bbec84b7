"""Book haystacks for retrieval tasks: books as one token stream, windows cut from it, needles placed at depths.

`Haystack.from_books(PATH, tokenizer, max_tokens)` tokenises each book (only the first `max_tokens` + a margin of
it) and joins them, each book starting on a new line, into one stream; trial windows start at a book's first token
and run on into the next books when one is too short (the stream wraps around). Needles are token pieces placed by
`place_needles`: a needle at depth d goes after the sentence end (a token ending in . ! ? or holding a blank line)
nearest to `round(d x window)` within `yarnkit.needles.SNAP` tokens, else exactly there; depth 0 is the window's
first token and 1 its end. The placed depths are returned, so results record where each needle really sat. A
stream shorter than a requested window is a `RetrievalError` naming the tokens needed and available.
Tests: tests/test_eval_retrieval.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yarnkit.errors import RetrievalError
from yarnkit.needles import insertion_point, sentence_ends, splice
from yarnkit.corpus import iter_documents


@dataclass
class Haystack:
    ids: np.ndarray  # int64 [tokens]: the books joined
    starts: list[int]  # where each book starts in `ids`
    names: list[str]
    ends_sentence: np.ndarray  # bool [tokens]
    source: str

    @classmethod
    def from_books(cls, path, tokenizer, max_tokens: int, max_books: int = 10) -> Haystack:
        path = Path(path).expanduser()
        if not path.exists():
            raise RetrievalError(f"haystack not found: {path}; pass --haystack a book file or a folder of books")
        pieces, starts, names, total = [], [], [], 0
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        for name, text in iter_documents(path):
            if len(names) >= max_books:
                break
            if not text.strip():
                continue
            ids = tokenizer(text[: (max_tokens + 512) * 8], add_special_tokens=False)["input_ids"]
            ids = newline + ids[: max_tokens + 512]
            starts.append(total)
            names.append(name)
            pieces.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
        if not pieces:
            raise RetrievalError(f"no text in {path}; pass --haystack a book file or a folder of books")
        ids = np.concatenate(pieces)
        return cls(ids, starts, names, sentence_ends(tokenizer, ids), str(path))

    def require(self, tokens: int, what: str) -> None:
        if tokens > len(self.ids):
            raise RetrievalError(f"the haystack is too short for {what}: it needs {tokens:,} tokens and {self.source} "
                                 f"gives {len(self.ids):,} (from {len(self.names)} book(s)); pass --haystack a folder "
                                 "with more or longer books, or lower --lengths")

    def window(self, book: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, ends_sentence)` of `tokens` tokens starting at book `book % books` (wrapping around)."""
        self.require(tokens, f"a window of {tokens:,} tokens")
        start = self.starts[book % len(self.starts)]
        index = (start + np.arange(tokens)) % len(self.ids)
        return self.ids[index], self.ends_sentence[index]


def place_needles(ids: np.ndarray, ends_sentence: np.ndarray, needles: list[tuple[float, list[int]]]):
    """Insert each `(depth, token ids)` needle into the haystack window `ids` (see `yarnkit.needles.splice`);
    returns `(token ids, depths)` with the depth each needle was placed at (its insertion point / window
    length), in the order given. Needles with equal insertion points keep their order (chains stay in order)."""
    n = len(ids)
    cuts = np.flatnonzero(ends_sentence) + 1
    try:
        points = [insertion_point(depth, n, cuts) for depth, _ in needles]
    except ValueError as error:
        raise RetrievalError(str(error)) from None
    out = splice(ids.tolist(), points, [list(piece) for _, piece in needles])
    return out, [point / n if n else 0.0 for point in points]
