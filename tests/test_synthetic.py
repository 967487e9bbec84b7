"""Synthetic retrieval rows (yarnkit/train/synthetic.py) and the data mix (data.mix, data.long_share in
yarnkit/train/data.py), with the real SmolLM2 tokenizer on the bundled training novel.
Run: python -m pytest tests/test_synthetic.py -q
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from yarnkit import needles
from yarnkit.train.data import DataArgs, SampleOrder, build_dataset, micro_batch
from yarnkit.errors import DataError
from yarnkit.train.recipe import load_recipe
from yarnkit.train.pose import far_position_ids
from yarnkit.train import synthetic
from yarnkit.train.synthetic import (FAR_FACT_SPAN, NUMBER, NUMBERS_PER_100K, RowMaker, SyntheticArgs, _restated,
                                     mark_last, same_form)


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
        row = maker.make(book[seed * 1000:], rng, length, chat=chat).ids
        assert row.shape == (length,) and row.dtype == np.int64
        text = tokenizer.decode(row.tolist())
        for question, answer, asked, _ in questions:
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
    first = maker.make(book, random.Random(5), 2048).ids
    assert np.array_equal(first, maker.make(book, random.Random(5), 2048).ids)
    markers = [m for t in needles.eval_templates() for m in t.markers]
    for seed in range(40):
        row = maker.make(book[seed * 500:], random.Random(seed), 2048, chat=seed % 4 == 0)
        text = tokenizer.decode(row.ids.tolist())
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
    assert np.array_equal(data.row(book_row, order, 1).ids, data.books[order[book_row]]["input_ids"])


@pytest.mark.parametrize("override, message", [
    ("data.mix={books: 1, novels: 1}", "unknown source\\(s\\) \\['novels'\\]"),
    ("data.mix={books: 0}", "not all 0"),
    ("data.long_share=1.5", "outside \\[0, 1\\]"),
    ("data.synthetic.lookalike=2", "lookalike=2.0 is outside \\[0, 1\\]"),
    ("data.synthetic.restate=-0.5", "restate=-0.5 is outside \\[0, 1\\]"),
    ("data.synthetic.numbers=1.5", "numbers=1.5 is outside \\[0, 1\\]"),
    ("data.synthetic.templates=['Remember this: {key} holds {value}. | What does {key} hold? | It holds']",
     "collides with evaluation template 'archive'.*rephrase it"),
    ("data.synthetic.attributes=['special magic number']", "collides with evaluation template 'magic'"),
])
def test_recipes_with_a_bad_mix_or_a_colliding_template_are_refused(override, message):
    with pytest.raises(DataError, match=message):
        load_recipe(["recipe=tiny", override])


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(int), [0]))))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("chat", [False, True])
def test_answer_mask_covers_each_answers_values_after_its_question_and_nothing_else(tokenizer, book, chat):
    maker = RowMaker(tokenizer, SyntheticArgs())
    for seed in range(10):
        rng = random.Random(seed)
        state = rng.getstate()
        facts, questions = maker._world(random.Random(seed), 2048)
        rng.setstate(state)
        row = maker.make(book[seed * 700:], rng, 2048, chat=chat)
        text = tokenizer.decode(row.ids.tolist())
        spans = _spans(row.answers)
        marked = [tokenizer.decode(row.ids[a:b].tolist()).strip() for a, b in spans]
        asked = [values for question, _, _, values in questions if question in text]
        assert marked and len(marked) == len(asked)  # one span per answer in the row, no fact's value
        for (a, _), shown in zip(spans, marked):
            assert shown.rstrip(".") in asked
            before = tokenizer.decode(row.ids[:a].tolist())
            question = next(q for q, _, _, values in questions if values == shown.rstrip("."))
            assert question in before  # the answer comes after its question


def test_mark_last_marks_only_the_last_occurrence():
    ids = np.array([5, 1, 2, 3, 9, 1, 2, 3, 7])
    assert mark_last(ids, [[1, 2, 3], [7]]).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert not mark_last(ids, [[4, 4]]).any()


def test_far_rows_keep_facts_first_and_questions_after_the_split(tokenizer, book):
    maker = RowMaker(tokenizer, SyntheticArgs(far=1.0))
    for seed in range(8):
        rng = random.Random(seed)
        state = rng.getstate()
        rng.random()  # make() draws "is it far" first
        facts, questions = maker._world(rng, 4096)
        rng.setstate(state)
        row = maker.make(book[seed * 900:], rng, 4096, chat=seed % 2 == 1)
        assert 0 < row.far_split < 4096
        before = tokenizer.decode(row.ids[:row.far_split].tolist())
        after = tokenizer.decode(row.ids[row.far_split:].tolist())
        assert all(fact[3] in before for fact in facts), seed  # every fact before the skip
        assert any(question in after for question, _, _, _ in questions)
        assert not any(question in before for question, _, _, _ in questions)
        assert np.flatnonzero(row.answers)[0] > row.far_split
        last_fact = max(text.index(fact[3]) for fact in facts if (text := before))
        assert last_fact / len(tokenizer.decode(row.ids.tolist())) < FAR_FACT_SPAN + 0.15  # facts come first


def test_far_positions_put_the_skip_at_the_split():
    for seed in range(50):
        positions = far_position_ids(1024, 300, 8192, torch.Generator().manual_seed(seed))
        assert positions[:300].tolist() == list(range(300))
        skip = int(positions[300] - 300)
        assert (8192 - 1024) // 2 <= skip <= 8192 - 1024
        assert (positions.diff() > 0).all() and positions.max() < 8192
    with pytest.raises(ValueError):
        far_position_ids(1024, 0, 8192, torch.Generator())


def test_far_min_widens_the_skip_down_to_its_share_of_the_room():
    """`pose.far_min`: the skip is drawn from [far_min x room, room]; 0.5 (the default) draws exactly what the
    recipe always drew (the same positions from the same generator), a lower share reaches shorter distances."""
    room = 8192 - 1024
    default = [far_position_ids(1024, 300, 8192, torch.Generator().manual_seed(seed)) for seed in range(200)]
    half = [far_position_ids(1024, 300, 8192, torch.Generator().manual_seed(seed), 0.5) for seed in range(200)]
    assert all(torch.equal(a, b) for a, b in zip(default, half))
    skips = [int(far_position_ids(1024, 300, 8192, torch.Generator().manual_seed(seed), 0.1)[300] - 300)
             for seed in range(200)]
    assert int(room * 0.1) <= min(skips) < room // 2 <= max(skips) <= room
    for far_min in (-0.1, 1.5):
        with pytest.raises(ValueError, match="far_min"):
            far_position_ids(1024, 300, 8192, torch.Generator(), far_min)


def test_lookalike_rows_share_one_attribute_phrasing_and_key_form(tokenizer, book):
    maker = RowMaker(tokenizer, SyntheticArgs())
    for seed in range(20):
        facts, _ = maker._world(random.Random(seed), 8192, lookalike=True)
        facts = [fact for fact in facts if fact[1]]  # a variable chain's links have no attribute
        assert len(facts) >= 2
        assert len({attribute for _, attribute, _, _ in facts}) == 1
        assert len({key for key, _, _, _ in facts}) == len(facts)  # distinct keys, no repeated key
        first_words = {key.split()[0] for key, _, _, _ in facts}
        assert len(first_words) == 1, facts  # one form: the same first word ("Team", "Alice", "crate", "the")


def test_preview_rows_ask_each_question_before_and_after_the_text(tokenizer, book):
    maker = RowMaker(tokenizer, SyntheticArgs(preview=1.0, interleave=0.0))
    rng = random.Random(3)
    state = rng.getstate()
    _, questions = maker._world(random.Random(3), 2048)
    rng.setstate(state)
    text = tokenizer.decode(maker.make(book, rng, 2048).ids.tolist())
    for question, _, _, _ in questions:
        assert text.count(question) == 2


def test_micro_batches_carry_answer_masks_and_far_positions(tmp_path, tokenizer):
    args = DataArgs(source="bundled:train", seq_len=2048, cache_dir=str(tmp_path),
                    mix={"books": 0.2, "retrieval": 0.8}, synthetic=SyntheticArgs(far=1.0))
    data = build_dataset(args, tokenizer, arrays=True)
    order = SampleOrder(len(data), args.seed, args.shuffle)
    batch = micro_batch(data, order, 0, 0, 1, 4, pose_target=16384, pose_seed=1)
    assert batch["answer_positions"] is not None and batch["answer_positions"].max() < 4 * 2047
    for k, positions in zip(batch["samples"], batch["position_ids"]):
        row = data.row(k, order, 1)
        if row.far_split:
            gap = int(positions[row.far_split] - positions[row.far_split - 1])
            assert gap - 1 >= (16384 - 2048) // 2  # the question part is >= 7k positions after the facts
        assert not row.answers.any() or data.source(k) == "retrieval"
    gaps = []  # `pose.far_min` reaches the far rows through the micro-batch
    for first in range(0, 64, 4):
        batch = micro_batch(data, order, first, 0, 1, 4, pose_target=16384, pose_seed=1, far_min=0.0)
        for k, positions in zip(batch["samples"], batch["position_ids"]):
            split = data.row(k, order, 1).far_split
            if split:
                gaps.append(int(positions[split] - positions[split - 1]) - 1)
    assert gaps and min(gaps) < (16384 - 2048) // 2


# sha256 of (ids, answers, far_split) of 8 rows (seeds 0-7, 2048 tokens, odd seeds chat) per SyntheticArgs below, made
# by the code before data.synthetic.restate existed (commit e678f1e). Rows are meant to change only with intent: when
# they do, recompute these from the new code and say why in the commit.
ROWS_BEFORE_RESTATE = {
    "default": "ca3f0ce4c0a7dded0abaa4a4536b766c691145611d52819c5010825a23e599ae",
    "far, lookalike, preview": "b59b0c950d25fe878fdd8e294e717acc2607d673f55951c19eea87e11cb1912f",
}


@pytest.mark.parametrize("name, args", [("default", SyntheticArgs(restate=0.0)),
                                        ("far, lookalike, preview", SyntheticArgs(far=0.5, lookalike=0.5, preview=0.3,
                                                                                  restate=0.0))])
def test_restate_zero_leaves_rows_byte_identical_to_before(tokenizer, book, name, args):
    maker, digest = RowMaker(tokenizer, args), hashlib.sha256()
    for seed in range(8):
        row = maker.make(book[seed * 1000:], random.Random(seed), 2048, chat=seed % 2 == 1)
        digest.update(row.ids.tobytes())
        digest.update(row.answers.tobytes())
        digest.update(str(row.far_split).encode())
    assert digest.hexdigest() == ROWS_BEFORE_RESTATE[name]


@pytest.mark.parametrize("chat", [False, True])
def test_restated_answers_name_key_and_attribute_before_the_value_and_only_the_values_are_marked(tokenizer, book,
                                                                                                   chat):
    maker = RowMaker(tokenizer, SyntheticArgs(restate=1.0))
    checked = 0
    for seed in range(10):
        rng = random.Random(seed)
        state = rng.getstate()
        assert rng.random() < 1.0  # make() draws "does this row restate" first (far and lookalike are off)
        facts, questions = maker._world(rng, 2048, restate=True)
        rng.setstate(state)
        row = maker.make(book[seed * 700:], rng, 2048, chat=chat)
        assert row.ids.shape == (2048,) and row.answers.shape == (2048,)
        text = tokenizer.decode(row.ids.tolist())
        shown = [(question, answer, asked, values) for question, answer, asked, values in questions
                 if question in text]
        for question, answer, asked, values in shown:
            if not facts[asked[0]][1]:  # a variable chain's answer names its value already; it is not restated
                continue
            where = text.index(answer, text.index(question))  # the answer follows its question
            prefix = answer[: answer.rindex(f" {values}.")]
            for index in asked:  # every key asked about, and the attribute, come before the values
                assert facts[index][0] in prefix and facts[index][1] in prefix, (seed, answer)
            assert text.index(values, where) > where + len(prefix) - 1
            checked += 1
        spans = _spans(row.answers)
        marked = [tokenizer.decode(row.ids[a:b].tolist()) for a, b in spans]
        assert sorted(marked) == sorted(f" {values}." for _, _, _, values in shown)  # the values, nothing else
        for (a, _), (question, answer, _, values) in zip(spans, sorted(shown, key=lambda q: text.index(q[1]))):
            prefix = answer[: answer.rindex(f" {values}.")]
            assert tokenizer.decode(row.ids[:a].tolist()).endswith(prefix)  # the restated key stays unmarked
    assert checked >= 20


def test_restated_rows_keep_their_length_and_never_use_evaluation_wording(tokenizer, book):
    maker = RowMaker(tokenizer, SyntheticArgs(restate=1.0, far=0.5, lookalike=0.5, preview=0.3))
    markers = [f" {needles._stems(m)} " for t in needles.eval_templates() for m in t.markers]
    for seed in range(24):
        length = 4096 if seed % 3 == 0 else 2048
        row = maker.make(book[seed * 500:], random.Random(seed), length, chat=seed % 2 == 1)
        assert row.ids.shape == (length,) and row.ids.dtype == np.int64
        text = tokenizer.decode(row.ids.tolist())
        assert not [m for m in markers if m in f" {needles._stems(text)} "], seed
        assert not re.search(r"(?i)special magic|archive reference|pass key|provided text|VAR [A-Z]{5} =", text)


def test_restated_keeps_an_answer_that_already_restates_and_keeps_its_label():
    rng = random.Random(0)
    assert _restated("What is the {attr} of {key}?", "The {attr} of {key} is", ("X {key} {attr}",), "{key}", rng) \
        == "The {attr} of {key} is"
    assert _restated("Q: What {attr} was assigned to {key}?", "A:", ("The {attr} of {key} is",), "{key}", rng) \
        == "A: The {attr} of {key} is"
    assert _restated("Tell me the {attr} of {key}.", "It is", ("{key}'s {attr} is",), "{key}", rng) \
        == "{key}'s {attr} is"
    assert _restated("What does {key} keep?", "It keeps", ("The {attr} of {key} is",), "{key}", rng) == "It keeps"


# sha256 as above of rows with the retrieval recipe's shares (far, lookalike, restate) and preview, made by the code
# before data.synthetic.numbers existed (commit d3b7a36).
ROWS_BEFORE_NUMBERS = "1c7f830daae4c5f164f1414995e3e187671f57249bee2ba5e79544352aaaf1b0"


def _digest(maker, book) -> str:
    digest = hashlib.sha256()
    for seed in range(8):
        row = maker.make(book[seed * 1000:], random.Random(seed), 2048, chat=seed % 2 == 1)
        digest.update(row.ids.tobytes())
        digest.update(row.answers.tobytes())
        digest.update(str(row.far_split).encode())
    return digest.hexdigest()


def test_numbers_zero_leaves_rows_byte_identical_to_before(tokenizer, book):
    assert _digest(RowMaker(tokenizer, SyntheticArgs()), book) == ROWS_BEFORE_RESTATE["default"]
    assert _digest(RowMaker(tokenizer, SyntheticArgs(numbers=0.0)), book) == ROWS_BEFORE_RESTATE["default"]
    shares = dict(far=0.5, lookalike=0.5, restate=1.0, preview=0.3)
    assert _digest(RowMaker(tokenizer, SyntheticArgs(**shares)), book) == ROWS_BEFORE_NUMBERS
    assert _digest(RowMaker(tokenizer, SyntheticArgs(**shares, numbers=0.0)), book) == ROWS_BEFORE_NUMBERS


def _without(text: str, parts: list[str]) -> str:
    for part in parts:
        text = text.replace(part, "")
    return text


@pytest.mark.parametrize("chat", [False, True])
def test_numbers_rows_keep_length_facts_and_answer_mask_and_carry_numbers_at_the_drawn_density(tokenizer, book, chat):
    maker = RowMaker(tokenizer, SyntheticArgs(numbers=1.0))
    plain = RowMaker(tokenizer, SyntheticArgs())
    markers = [f" {needles._stems(m)} " for t in needles.eval_templates() for m in t.markers]
    for seed in range(10):
        length = 4096 if seed % 3 == 0 else 2048
        facts, questions = maker._world(random.Random(seed), length)  # make() draws the world first
        row = maker.make(book[seed * 700:], random.Random(seed), length, chat=chat)
        assert row.ids.shape == (length,) and row.answers.shape == (length,) and row.ids.dtype == np.int64
        text = tokenizer.decode(row.ids.tolist())
        for fact in facts:
            assert fact[3] in text, (seed, fact)
        shown = [q for q in questions if q[0] in text]
        assert shown
        for question, answer, asked, _ in shown:  # the answer follows its question, which follows its facts
            where = text.index(question)
            assert text.index(answer, where) > where
            assert all(text.index(facts[index][3]) < where for index in asked)
        marked = sorted(tokenizer.decode(row.ids[a:b].tolist()) for a, b in _spans(row.answers))
        assert marked == sorted(f" {values}." for _, _, _, values in shown)  # the values, no clutter
        stated = [fact[3] for fact in facts] + [part for q in questions for part in q[:2]]
        without = tokenizer.decode(plain.make(book[seed * 700:], random.Random(seed), length, chat=chat).ids.tolist())
        density, book_density = ((len(NUMBER.findall(t)) * 100_000 / len(t)) for t in (_without(text, stated),
                                                                                       _without(without, stated)))
        added = density - book_density  # the same world and book text, less the clutter's tokens at its end
        assert 0.8 * NUMBERS_PER_100K[0] < added < 1.1 * NUMBERS_PER_100K[1], (seed, density, book_density)
        assert not [m for m in markers if m in f" {needles._stems(text)} "], seed
        assert not re.search(r"(?i)special magic|archive reference|pass key|provided text|VAR [A-Z]{5} =", text)


def test_clutter_follows_the_drawn_density_and_never_shows_a_values_digits(tokenizer, book):
    maker = RowMaker(tokenizer, SyntheticArgs(numbers=1.0))
    values = ["4837993", "KD20417", "osprey-12", "365-2210"]
    avoid = {"4837993", "20417", "12", "365", "2210"}
    for seed in range(12):
        rng = random.Random(seed)
        rate = random.Random(seed).uniform(*NUMBERS_PER_100K)  # _clutter draws its rate first
        hay = book[seed * 900: seed * 900 + 6000]
        pieces = maker._clutter(rng, hay, values)
        texts = [tokenizer.decode(piece) for piece in pieces]
        kept = tokenizer.decode(hay[: len(hay) - sum(map(len, pieces))].tolist())
        density = sum(len(NUMBER.findall(t)) for t in texts) * 100_000 / (len(kept) + sum(map(len, texts)))
        assert abs(density - rate) < 0.05 * rate, (seed, density, rate)
        assert not avoid & {run for text in texts for run in re.findall(r"\d+", text)}


def test_decoys_have_a_values_form_and_are_never_a_value(tokenizer):
    maker = RowMaker(tokenizer, SyntheticArgs(numbers=1.0))
    values = [str(digit) for digit in range(1, 9)]  # one-digit values: the only other value of their form is 9
    hay = np.asarray(tokenizer("Some words of a book. " * 200, add_special_tokens=False)["input_ids"])
    with_decoys = 0
    for seed in range(40):
        texts = [tokenizer.decode(piece) for piece in maker._clutter(random.Random(seed), hay, values)]
        decoys = [text for text in texts if re.fullmatch(r"\D*\b\d\b\D*", text) and re.search(r"\d", text)]
        assert all("9" in decoy for decoy in decoys), decoys  # the one value of the form that is not a value
        assert len(decoys) <= 3
        with_decoys += bool(decoys)
    assert 6 <= with_decoys <= 20  # NUMBER_DECOYS = 0.3 of 40 rows
    rng = random.Random(0)
    for value in ("4837993", "KD20417", "osprey-12", "365-2210"):
        other = same_form(rng, value)
        assert re.sub(r"\d", "0", re.sub(r"[A-Z]", "A", other)) == re.sub(r"\d", "0", re.sub(r"[A-Z]", "A", value))
        assert not other.startswith("0") and other != value


def test_decoys_sit_only_in_some_numbers_rows_and_are_never_marked(tokenizer, book):
    maker = RowMaker(tokenizer, SyntheticArgs(numbers=1.0))
    plain = RowMaker(tokenizer, SyntheticArgs())
    rows_seven, with_decoys = 0, 0
    for seed in range(60):
        facts, _ = maker._world(random.Random(seed), 2048)
        values = {fact[2] for fact in facts}
        if not all(re.fullmatch(r"\d{7}", value) for value in values):
            continue  # the 7-digit rows: a decoy there is any other 7-digit number (the novel prints none)
        rows_seven += 1
        for made, row_maker in (("numbers", maker), ("plain", plain)):
            row = row_maker.make(book[seed * 600:], random.Random(seed), 2048)
            text = tokenizer.decode(row.ids.tolist())
            decoys = set(re.findall(r"(?<!\d)\d{7}(?!\d)", text)) - values
            marked = tokenizer.decode(row.ids[row.answers].tolist())
            assert not [decoy for decoy in decoys if decoy in marked]
            if made == "plain":
                assert not decoys
            else:
                assert len(decoys) <= 3
                with_decoys += bool(decoys)
    assert rows_seven >= 20 and 0.1 * rows_seven <= with_decoys <= 0.55 * rows_seven, (rows_seven, with_decoys)


def test_far_numbers_rows_split_right_after_a_sentence_or_a_clutter_piece(tokenizer, book, monkeypatch):
    maker = RowMaker(tokenizer, SyntheticArgs(far=1.0, numbers=1.0))
    made = []
    clutter = maker._clutter
    monkeypatch.setattr(maker, "_clutter", lambda *a: made.append(clutter(*a)) or made[-1])
    for seed in range(8):
        rng = random.Random(seed)
        rng.random()  # make() draws "is it far" first
        facts, questions = maker._world(rng, 4096)
        row = maker.make(book[seed * 900:], random.Random(seed), 4096, chat=seed % 2 == 1)
        assert row.ids.shape == (4096,) and 0 < row.far_split < 4096
        ids, split = row.ids.tolist(), row.far_split
        before, after = tokenizer.decode(ids[:split]), tokenizer.decode(ids[split:])
        assert all(fact[3] in before for fact in facts), seed
        assert any(q in after for q, _, _, _ in questions) and not any(q in before for q, _, _, _ in questions)
        assert np.flatnonzero(row.answers)[0] > split
        # PoSE's skip goes where the haystack's question part starts: after a sentence end, or after a clutter piece
        # inserted there; a split that miscounted the clutter before it would fall mid-sentence
        assert maker.ends[ids[split - 1]] or any(ids[split - len(p): split] == p for p in made[-1]), seed


def test_clutter_wording_is_checked_against_the_evaluation_templates(monkeypatch):
    synthetic.training_phrasings(SyntheticArgs(numbers=1.0))  # every form passes
    monkeypatch.setattr(synthetic, "NUMBER_FORMS", synthetic.NUMBER_FORMS + (" (the magic number {page})",))
    with pytest.raises(DataError, match="number clutter.*collides with evaluation template 'magic'"):
        synthetic.training_phrasings(SyntheticArgs(numbers=1.0))
