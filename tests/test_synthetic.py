"""Synthetic retrieval rows (yarnkit/train/synthetic.py) and the data mix (data.mix, data.long_share in
yarnkit/train/data.py), with the real SmolLM2 tokenizer on the bundled training novel.
Run: python -m pytest tests/test_synthetic.py -q
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from yarnkit import needles
from yarnkit.train.data import DataArgs, SampleOrder, build_dataset, micro_batch
from yarnkit.errors import DataError
from yarnkit.train.recipe import load_recipe
from yarnkit.train.synthetic import RowMaker, SyntheticArgs


@pytest.fixture(scope="module")
def tokenizer():
    from yarnkit.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def book(tokenizer):
    from yarnkit.assets import sample_path
    from yarnkit.corpus import read_text

    return np.asarray(tokenizer(read_text(sample_path("train"))[:300_000], add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def maker(tokenizer):
    return RowMaker(tokenizer, SyntheticArgs())


def test_rows_have_the_exact_length_and_every_question_follows_its_facts(maker, tokenizer, book):
    for seed in range(12):
        rng = random.Random(seed)
        chat = seed % 3 == 2
        length = 4096 if seed % 2 else 2048
        state = rng.getstate()
        facts, questions = maker._world(random.Random(seed), length)  # the world make() will draw first
        rng.setstate(state)
        row = maker.make(book[seed * 1000:], rng, length, chat=chat)
        assert row.shape == (length,) and row.dtype == np.int64
        text = tokenizer.decode(row.tolist())
        for question, answer, asked in questions:
            if question not in text:  # a chat row keeps a random number of the later turns
                assert chat
                continue
            where = text.index(question)
            assert text.index(answer, where) > where
            for index in asked:
                assert text.index(facts[index][3]) < where
        if chat:
            assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text


def test_rows_are_deterministic_and_never_use_evaluation_wording(maker, tokenizer, book):
    first = maker.make(book, random.Random(5), 2048)
    assert np.array_equal(first, maker.make(book, random.Random(5), 2048))
    markers = [m for t in needles.eval_templates() for m in t.markers]
    for seed in range(40):
        text = tokenizer.decode(maker.make(book[seed * 500:], random.Random(seed), 2048, chat=seed % 4 == 0).tolist())
        stems = needles._stems(text)
        assert not [m for m in markers if f" {needles._stems(m)} " in f" {stems} "], seed
        assert not re.search(r"(?i)special magic|archive reference|pass key|VAR [A-Z]{5} =", text)


def test_a_row_too_short_for_its_facts_fails_clearly(tokenizer, book):
    with pytest.raises(DataError, match="raise data.seq_len or lower data.synthetic.facts"):
        RowMaker(tokenizer, SyntheticArgs(facts=2000)).make(book, random.Random(0), 300)  # ~70 facts


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer):
    cache = tmp_path_factory.mktemp("cache")
    code = str(Path(__file__).resolve().parents[1] / "yarnkit" / "train")  # a small code corpus
    args = DataArgs(source="bundled:train", seq_len=1024, cache_dir=str(cache), code_source=code,
                    mix={"books": 0.4, "code": 0.2, "retrieval": 0.3, "chat": 0.1}, long_share=0.25)
    return args, build_dataset(args, tokenizer)


def test_the_mix_follows_its_weights_and_long_micro_batches_are_contiguous(mixed, tokenizer):
    args, data = mixed
    order = SampleOrder(len(data), args.seed, args.shuffle)
    counts = Counter(data.source(k) for k in range(4000))
    for name, weight in args.mix.items():
        assert abs(counts[name] / 4000 - weight) < 0.03, name
    shapes = Counter()
    for first in range(0, 160, 4):
        batch = micro_batch(data, order, first, 0, 1, 4, pose_target=8192, pose_seed=1)
        shapes[tuple(batch["input_ids"].shape)] += 1
        if batch["input_ids"].shape[0] == 1:  # true positions: no PoSE ids, no mask
            assert batch["position_ids"] is None and batch["attention_mask"] is None
        else:
            assert batch["position_ids"].max() < 8192 and batch["attention_mask"] is not None
    assert set(shapes) == {(1, 4096), (4, 1024)} and 5 <= shapes[(1, 4096)] <= 16  # ~25% of 40
    again = micro_batch(data, SampleOrder(len(data), args.seed, args.shuffle), 40, 0, 1, 4, 8192, 1)
    assert (again["input_ids"] == micro_batch(data, order, 40, 0, 1, 4, 8192, 1)["input_ids"]).all()  # resumable
    book_row = next(k for k in range(100) if data.source(k) == "books")
    assert np.array_equal(data.row(book_row, order, 1), data.books[order[book_row]]["input_ids"])


@pytest.mark.parametrize("override, message", [
    ("data.mix={books: 1, novels: 1}", "unknown source\\(s\\) \\['novels'\\]"),
    ("data.mix={books: 0}", "not all 0"),
    ("data.long_share=1.5", "outside \\[0, 1\\]"),
    ("data.synthetic.templates=['Remember this: {key} holds {value}. | What does {key} hold? | It holds']",
     "collides with evaluation template 'archive'.*rephrase it"),
    ("data.synthetic.attributes=['special magic number']", "collides with evaluation template 'magic'"),
])
def test_recipes_with_a_bad_mix_or_a_colliding_template_are_refused(override, message):
    with pytest.raises(DataError, match=message):
        load_recipe(["recipe=tiny", override])
