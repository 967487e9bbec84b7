"""Synthetic retrieval rows for training: facts hidden in book text and asked for later, in train-only templates.

"Artificial needles" (Xiong et al. 2024) and information-intensive training (IN2, An et al. 2024): a row is a real
haystack (book chunks) with facts inserted at random depths, and questions whose answers are those facts. Each
row draws its own world from a seeded generator: 1-3 attribute nouns, a value format (7-digit numbers half the
time, else other digit counts, grouped digits, letter-digit codes or code words), keys (people, places, things,
projects, item ids), a fact phrasing per row or per fact, and question styles (single values, every value of a
key, the values of several keys, and, in some rows, a variable chain). Questions follow the text (a Q&A block at
the end) or sit in it right after their facts are stated. Chat rows wrap the same content in the tokenizer's chat
template, the questions and answers as user and assistant turns (so the chat form learns to answer from context).
Every phrasing comes from the train split of `yarnkit.needles`, and every template, including those a recipe adds
(`data.synthetic.templates`), passes `needles.check_train_template`: evaluation wording never reaches training.
A row has exactly the requested number of tokens (the haystack is cut to fit).

Three kinds of rows aim at what a short extension leaves weak (each a share of rows, all off by default):
- `far`: the facts sit in the first third of the text and the questions at the end, and the row marks where its
  question part starts (`Row.far_split`), where PoSE then puts a long skip (`yarnkit.train.pose.far_position_ids`),
  so facts are asked about from half to all of the PoSE target away: the distances an 8k row otherwise never
  trains (An et al. 2025, "effective context length"; the needle at the start of a 64k prompt).
- `lookalike`: every fact has one attribute, one phrasing and keys of one form (same first name, same project
  word): same-form distractors, as in multi-key retrieval (Xiong et al. 2024; NExtLong 2025).
- `preview`: the questions are also stated before the text (query before and after, Liu et al. 2024).
A fourth share, `restate` (also off by default), aims at the answer's form: every answer of the row, plain or chat,
names its key(s) and attribute before the values ("A: The PIN of Alice Abbott is 4837993.", from the train split's
restating prefixes, `needles.TRAIN_RESTATED`) where many answers are otherwise terse ("A:", "It is", "Found:" +
value). The guess it tests: terse answers teach a model to answer before it has named what it looks up, and so its
free chat replies open with a number of the book although, teacher-forced, it knows the value. A variable chain's
answer already names its value and is left as it is.
A fifth share, `numbers` (also off by default), aims at what the model answers in place of the needle: the number
of a book. Its rows' haystack carries the numbers of a scholarly book (years, "p. 323", "pp. 51-54", "[12]",
"(note 7)", "vol. ii, p. 88", "4,000"), 200-900 of 2-4 digits per 100k characters (NUMBERS_PER_100K; the test
book that drew the retrieval recipe's misses prints 594, the training novels 0-34), inserted where a word starts
or a sentence ends; in some of them (NUMBER_DECOYS), also 1-3 decoys of the values' own form (another 7-digit
number) tied to no key. The clutter takes its tokens from the haystack, never repeats a value's digits, and its
wording is generic, none of an evaluation template's ("magic number", "archive reference"): every form passes
`needles.check_train_template` like the other phrasings.
`Row.answers` marks the tokens of every answer's values (not a restated key), which `train.answer_loss_weight`
weighs in the loss (LongCE-style emphasis on the tokens that need the context). Tested by tests/test_synthetic.py.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field

import numpy as np

from yarnkit import needles
from yarnkit.errors import DataError

SENTINEL = "\u2063HAYSTACK\u2063"
VALUE_FORMATS = (("seven", 0.5), ("digits", 0.2), ("grouped", 0.1), ("code", 0.1), ("word", 0.1))


@dataclass
class SyntheticArgs:
    facts: int = 16  # facts per 8k tokens of row (scaled with the row's length, at least 2; each row 0.5x-1.5x)
    questions: int = 8  # questions per row (at most one per fact)
    interleave: float = 0.4  # share of plain rows whose questions sit in the text after their facts
    multi: float = 0.2  # share of questions that ask for several values (of one key, or of several keys)
    chains: float = 0.15  # share of rows that also hold a variable chain and a question about it
    far: float = 0.0  # share of rows laid out for a far question: facts in the first third, questions at the end,
    # and PoSE's skip between them (from pose.far_min of pose.target_len - seq_len up to all of it, by default half;
    # see pose.far_position_ids)
    lookalike: float = 0.0  # share of rows whose facts look alike: one kind of key, one attribute, one phrasing
    preview: float = 0.0  # share of plain rows that also ask their questions before the text (query before and after)
    restate: float = 0.0  # share of rows (plain and chat) whose answers restate key and attribute before the value
    numbers: float = 0.0  # share of rows (plain and chat) whose haystack carries a scholarly book's numbers (years,
    # pages, notes; NUMBERS_PER_100K), and in some of them (NUMBER_DECOYS) a few numbers of the values' own form
    templates: list[str] = field(default_factory=list)  # extra phrasings 'FACT | QUESTION | ANSWER' ({attr} ok)
    attributes: list[str] = field(default_factory=list)  # extra attribute nouns


FAR_FACT_SPAN = 0.35  # a far row's facts sit in the first 35% of its text

# Number clutter, the numbers a scholarly book prints between its words: years, page and footnote references, volumes
# and chapters, plain quantities. Slots: {year} {year2} {page} {page2} {note} {roman} {chapter} {count} {thousands}.
# Generic wording only: training_phrasings checks every form with needles.check_train_template.
NUMBER_FORMS = (
    " in {year},", " ({year})", " {year}", ", {year},", " ({year}-{year2})", " of {year}",
    " (p. {page})", " p. {page}", " pp. {page}-{page2}", " (pp. {page}-{page2})", ", p. {page},",
    "[{note}]", " (note {note})", " [note {note}]",
    " (vol. {roman}, p. {page})", " vol. {roman}, p. {page},", " (ch. {roman})", " chap. {chapter}",
    " {count}", " {thousands},000", ", {count},",
)
DECOY_FORMS = (" {value}", " ({value})", " no. {value}", ", {value},")  # a number of a value's form, of no key
NUMBER = re.compile(r"\b\d{2,4}\b")  # what the density counts: numbers of 2-4 digits
# A numbers row's density, drawn per row: numbers of 2-4 digits per 100k characters of its haystack. The test book whose
# numbers the retrieval recipe answered in place of the needle prints 594 (docs/results.md §4.8), the training novels
# 0-34: the range runs from a third of that book to 1.5 times it, lighter and denser scholarly texts alike.
NUMBERS_PER_100K = (200.0, 900.0)
NUMBER_DECOYS = 0.3  # share of numbers rows that also hold 1-3 decoys: numbers of the row's value form, of no key


@dataclass
class Row:
    """One training row: token `ids`; `answers`, True on the tokens of each answer's values (what the answer loss,
    `train.answer_loss_weight`, scores); `far_split` > 0: the token where a far row's question part starts, where
    PoSE puts its long skip."""

    ids: np.ndarray
    answers: np.ndarray
    far_split: int = 0

    @classmethod
    def plain(cls, ids: np.ndarray) -> "Row":
        return cls(ids, np.zeros(len(ids), dtype=bool))


def training_phrasings(args: SyntheticArgs) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(facts, (question, answer) pairs, attributes) for training; raises DataError on a collision with an
    evaluation template, naming both and the fix."""
    facts, questions = list(needles.TRAIN_FACTS), list(needles.TRAIN_QUESTIONS)
    attributes = list(needles.TRAIN_ATTRIBUTES) + list(args.attributes)
    try:
        needles.check_registry(attributes)  # the registry's own training phrasings, with every attribute
        for index, text in enumerate(args.templates):
            template = needles.parse_template(text, f"data.synthetic.templates[{index}]")
            needles.check_train_template(template, attributes)
            facts.append(template.fact)
            questions.append((template.question, template.answer))
        for form in NUMBER_FORMS + DECOY_FORMS:  # the number clutter's wording, too, stays train-only
            needles.check_train_template(needles.Template(f"number clutter {form!r}", "train", form, "", ""))
    except needles.TemplateError as error:
        raise DataError(str(error)) from None
    return facts, questions, attributes


def _value(rng: random.Random, kind: str) -> str:
    if kind == "seven":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "digits":
        size = rng.choice((4, 5, 6, 8, 9, 10))
        return str(rng.randint(10 ** (size - 1), 10 ** size - 1))
    if kind == "grouped":
        return f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    if kind == "code":
        return "".join(rng.choices(string.ascii_uppercase, k=2)) + str(rng.randint(1000, 999999))
    return f"{rng.choice(needles.TRAIN_CODENAMES).lower()}-{rng.randint(10, 99)}"


KEY_KINDS = (("person", 0.35), ("first name", 0.1), ("place", 0.15), ("thing", 0.1), ("project", 0.15),
             ("item", 0.15))


def _key(rng: random.Random, kind: str | None = None, prefix: str | None = None) -> str:
    """A key of `kind` (drawn by KEY_KINDS' weights when None); `prefix` fixes its first word where the kind
    has one (a look-alike row's shared surname-less first name, project word or item word)."""
    kind = kind or rng.choices([k for k, _ in KEY_KINDS], [w for _, w in KEY_KINDS])[0]
    if kind == "person":
        return f"{prefix or rng.choice(needles.TRAIN_FIRST)} {rng.choice(needles.TRAIN_LAST)}"
    if kind == "first name":
        return rng.choice(needles.TRAIN_FIRST)
    if kind == "place":
        return (prefix if prefix is not None else rng.choice(("the office in ", "the depot at ", ""))) + \
            rng.choice(needles.TRAIN_PLACES)
    if kind == "thing":
        return rng.choice(needles.TRAIN_THINGS)
    if kind == "project":
        return f"{prefix or rng.choice(('Project', 'Operation', 'Team'))} {rng.choice(needles.TRAIN_CODENAMES)}"
    return f"{prefix or rng.choice(('item', 'unit', 'crate', 'cabin'))} {rng.choice(string.ascii_uppercase)}" \
           f"{rng.randint(1, 99)}"


def _lookalike_keys(rng: random.Random):
    """A key maker whose keys share one form (and a first word where the kind has one): same-form distractors."""
    kind = rng.choice(("person", "place", "project", "item"))
    prefix = {"person": rng.choice(needles.TRAIN_FIRST), "place": rng.choice(("the office in ", "the depot at ")),
              "project": rng.choice(("Project", "Operation", "Team")),
              "item": rng.choice(("item", "unit", "crate", "cabin"))}[kind]
    return lambda: _key(rng, kind, prefix)


def _variable(rng: random.Random, style: int) -> str:
    if style == 0:
        return "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 6)))
    if style == 1:
        return rng.choice("xyzuvw") + str(rng.randint(1, 999))
    return rng.choice(needles.TRAIN_CODENAMES).lower() + str(rng.randint(1, 9))


def _restated(question: str, answer: str, restated: tuple[str, ...], slot: str, rng: random.Random) -> str:
    """An answer prefix that names the key(s) (`slot`: "{key}" or "{keys}") and the attribute before the value: the
    pair's own when it does already, else a label it opens with ("A:", "Found:") and a phrasing from `restated`
    (the registry's train split). A recipe's question without {attr} keeps its answer: the row never names an
    attribute there to restate."""
    if slot in answer or "{attr}" not in question:
        return answer
    label = answer if answer.endswith(":") else ""
    return " ".join(filter(None, (label, rng.choice(restated))))


def _roman(n: int) -> str:
    out = ""
    for value, letters in ((10, "x"), (9, "ix"), (5, "v"), (4, "iv"), (1, "i")):
        out += letters * (n // value)
        n %= value
    return out


def number_text(rng: random.Random, avoid: set[str]) -> str:
    """One piece of number clutter (a NUMBER_FORMS form, its slots drawn), none of whose digit runs is in `avoid`."""
    while True:
        year, page = rng.randint(1500, 1950), rng.randint(1, 600)
        text = rng.choice(NUMBER_FORMS).format(
            year=year, year2=year + rng.randint(1, 80), page=page, page2=page + rng.randint(1, 12),
            note=rng.randint(1, 120), roman=_roman(rng.randint(1, 12)), chapter=rng.randint(1, 40),
            count=rng.randint(10, 999), thousands=rng.randint(1, 99))
        if avoid.isdisjoint(re.findall(r"\d+", text)):
            return text


def same_form(rng: random.Random, value: str) -> str:
    """Another value of `value`'s form: each digit (a run's first not 0) and capital letter drawn anew, the rest
    kept ("4837993" -> "1520648", "KD20417" -> "PA93105", "osprey-12" -> "osprey-57")."""
    out = []
    for i, char in enumerate(value):
        if char.isdigit():
            out.append(rng.choice(string.digits if i and value[i - 1].isdigit() else "123456789"))
        else:
            out.append(rng.choice(string.ascii_uppercase) if char.isupper() else char)
    return "".join(out)


def _join(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + rng.choice((" and ", ", and ", ", ")) + items[-1]


class RowMaker:
    """Builds synthetic retrieval rows with one tokenizer; `make(haystack_ids, rng, length, chat)`."""

    def __init__(self, tokenizer, args: SyntheticArgs):
        self.tokenizer, self.args = tokenizer, args
        self.facts, self.questions, self.attributes = training_phrasings(args)
        pieces = [tokenizer.decode([token_id]) for token_id in range(len(tokenizer))]  # per vocabulary id
        self.ends = np.array([needles.ends_sentence(piece) for piece in pieces], dtype=bool)
        self.word_starts = np.array([piece[:1].isspace() for piece in pieces])  # opens with a space or line break
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _world(self, rng: random.Random, length: int, lookalike: bool = False, restate: bool = False):
        """Facts [(key, attribute, value, text)] and questions [(question, answer, fact indices, the answer's
        values as text)]. A `lookalike` world states every fact with one attribute and one phrasing about keys of
        one form (same-form distractors); a `restate` world's answers name the key(s) and the attribute before the
        values (`_restated`)."""
        attributes = rng.sample(self.attributes, 1 if lookalike else rng.randint(1, 3))
        kind = rng.choices([k for k, _ in VALUE_FORMATS], [w for _, w in VALUE_FORMATS])[0]
        count = max(2, round(self.args.facts * length / 8192 * rng.uniform(0.5, 1.5)))
        one_frame = rng.choice(self.facts) if lookalike or rng.random() < 0.5 else None
        new_key = _lookalike_keys(rng) if lookalike else (lambda: _key(rng))
        keys, facts, tries = [], [], 0
        while len(facts) < count:
            repeat = keys and not lookalike and rng.random() < 0.15  # another value for a stated key (multi-value)
            key, attribute = (facts[-1][0], facts[-1][1]) if repeat else (new_key(), rng.choice(attributes))
            if not repeat and key in keys:
                tries += 1
                if tries > 20 * count:  # a look-alike form has run out of distinct keys: fewer facts
                    break
                continue
            keys.append(key)
            value = _value(rng, kind)
            frame = one_frame or rng.choice(self.facts)
            facts.append((key, attribute, value, frame.format(key=key, value=value, attr=attribute)))
        count = len(facts)
        questions, asked = [], set()
        for _ in range(min(self.args.questions, count)):
            open_facts = [i for i in range(count) if i not in asked]
            if not open_facts:
                break
            index = rng.choice(open_facts)  # each fact is asked about at most once
            key, attribute = facts[index][:2]
            same_key = [i for i, f in enumerate(facts) if f[:2] == (key, attribute)]
            if len(same_key) > 1 or rng.random() < self.args.multi:  # a key with several values is asked for all
                if len(same_key) > 1:
                    chosen, names = same_key, key
                else:  # several keys with this attribute, one value each
                    first_of_key = {f[0]: i for i, f in reversed(list(enumerate(facts)))
                                    if f[1] == attribute and i not in asked}
                    same_attr = sorted(first_of_key.values())
                    chosen = sorted(rng.sample(same_attr, min(len(same_attr), rng.randint(2, 4))))
                    names = _join([facts[i][0] for i in chosen], rng)
                question, answer = rng.choice(needles.TRAIN_QUESTIONS_ALL)
                if restate:
                    answer = _restated(question, answer, needles.TRAIN_RESTATED_ALL, "{keys}", rng)
                values = [facts[i][2] for i in chosen]
                question, answer = (t.format(keys=names, attr=attribute) for t in (question, answer))
            else:
                question, answer = rng.choice(self.questions)
                if restate:
                    answer = _restated(question, answer, needles.TRAIN_RESTATED, "{key}", rng)
                chosen, values = [index], [facts[index][2]]
                question, answer = (t.format(key=key, attr=attribute) for t in (question, answer))
            asked.update(chosen)
            values = _join(values, rng)
            questions.append((question, f"{answer} {values}.", chosen, values))
        if rng.random() < self.args.chains:
            template = rng.choice(needles.TRAIN_CHAINS)
            style = rng.randrange(3)
            names = list(dict.fromkeys(_variable(rng, style) for _ in range(rng.randint(3, 6))))
            value = _value(rng, kind)
            start = len(facts)
            facts.append((names[0], "", value, template.assign.format(var=names[0], value=value)))
            facts += [(n, "", value, template.copy.format(var=n, source=p)) for p, n in zip(names, names[1:])]
            listed = _join(names, rng)
            questions.append((template.question.format(value=value), template.answer.format(
                count=len(names), value=value) + f" {listed}.", list(range(start, len(facts))), listed))
        return facts, questions

    def make(self, haystack: np.ndarray, rng: random.Random, length: int, chat: bool = False) -> Row:
        """One row of exactly `length` tokens: haystack text with facts inserted and questions answered."""
        far = self.args.far > 0 and rng.random() < self.args.far
        lookalike = self.args.lookalike > 0 and rng.random() < self.args.lookalike
        restate = self.args.restate > 0 and rng.random() < self.args.restate  # no draw at 0: rows stay as they were
        facts, questions = self._world(rng, length, lookalike, restate)
        intro = rng.choice(needles.TRAIN_INTROS)
        fact_ids = self._encode([" " + fact[3] for fact in facts])
        if chat:
            head, tail, questions = self._chat_parts(intro, questions, rng)
            inline = []
        else:
            interleave = not far and rng.random() < self.args.interleave
            separator = rng.choice((" ", "\n"))
            qa = self._encode(["\n" + q + separator + a for q, a, _, _ in questions])
            if not interleave and self.args.preview > 0 and rng.random() < self.args.preview:  # asked before, too
                intro = "\n".join(filter(None, [intro, *(q for q, _, _, _ in questions)]))
            head = ([self.bos] if self.bos is not None else []) + (self._encode([intro + "\n"])[0] if intro else [])
            inline = qa if interleave else []
            tail = ([] if interleave else [t for piece in qa for t in piece]) + ([self.eos] if self.eos is not None
                                                                                else [])
        budget = length - len(head) - len(tail) - sum(map(len, fact_ids)) - sum(map(len, inline))
        numbers = self.args.numbers > 0 and rng.random() < self.args.numbers  # no draw at 0: rows stay as they were
        clutter = self._clutter(rng, haystack[:max(budget, 0)], [fact[2] for fact in facts]) if numbers else []
        budget -= sum(map(len, clutter))  # the clutter takes its tokens from the haystack
        if budget < 16 or len(haystack) < budget:
            raise DataError(f"a synthetic retrieval row of {length} tokens cannot hold {len(facts)} facts and their "
                            f"questions; raise data.seq_len or lower data.synthetic.facts/questions")
        hay = haystack[:budget]
        cuts = np.flatnonzero(self.ends[hay]) + 1
        clutter_points = self._clutter_points(rng, hay, cuts, len(clutter)) if clutter else []
        depths = [rng.random() * (FAR_FACT_SPAN if far else 1.0) for _ in facts]
        chain = [i for i, f in enumerate(facts) if not f[1]]  # a chain's links go in order
        for i, depth in zip(chain, sorted(depths[i] for i in chain)):
            depths[i] = depth
        points = [needles.insertion_point(d, budget, cuts) for d in depths]
        pieces = list(fact_ids)
        for (_, _, asked, _), ids in zip(questions, inline):  # after the last fact it asks about
            after = max(points[i] for i in asked)
            later = cuts[cuts > after]
            points.append(int(rng.choice(later)) if len(later) and rng.random() < 0.9 else budget)
            pieces.append(ids)
        far_split = 0
        if far:  # the skip goes at a sentence end between the last fact and the questions
            later = cuts[cuts > max(points)]
            split = int(rng.choice(later)) if len(later) else max(points)
            far_split = len(head) + split + sum(len(piece) for point, piece in
                                                zip(clutter_points + points, clutter + pieces) if point <= split)
        body = needles.splice(hay.tolist(), clutter_points + points, clutter + pieces)  # clutter before a fact there
        ids = np.asarray(head + body + tail, dtype=np.int64)  # budget was set so that this is `length` tokens
        # Only the values carry the answer loss, also where the answer restates its key first: the restated key and
        # attribute are copied from the question a few tokens back, so they need no context and keep the plain
        # loss; weighing them too would spread the answer loss's mean over easy tokens and dilute it on the values.
        return Row(ids, mark_last(ids, self._encode([f" {values}." for _, _, _, values in questions])), far_split)

    def _clutter(self, rng: random.Random, hay: np.ndarray, values: list[str]) -> list[list[int]]:
        """Token pieces of number clutter for a haystack of at most `hay`: numbers at a density drawn from
        NUMBERS_PER_100K, counted over the haystack text the row keeps (`hay` shortened by the clutter's tokens, and
        the clutter); and in NUMBER_DECOYS of the rows, 1-3 decoys of a value's form. No digit run of the row's
        `values` is ever a clutter number, and no decoy is a value, so an answer's values are only ever its facts'."""
        rate = rng.uniform(*NUMBERS_PER_100K)
        chars_per_token = len(self.tokenizer.decode(hay.tolist())) / max(1, len(hay))
        avoid = {run for value in values for run in re.findall(r"\d+", value)}
        texts, count = [], 0
        while count < rate * chars_per_token * len(hay) / 100_000:  # the rate on all of `hay`: trimmed below
            texts.append(number_text(rng, avoid))
            count += len(NUMBER.findall(texts[-1]))
        pieces = self._encode(texts)
        numbers = np.cumsum([len(NUMBER.findall(text)) for text in texts])
        kept_chars = chars_per_token * (len(hay) - np.cumsum([len(piece) for piece in pieces]))
        density = numbers * 100_000 / np.maximum(kept_chars + np.cumsum([len(text) for text in texts]), 1)
        pieces = pieces[: int(np.argmax(density > rate)) if (density > rate).any() else len(pieces)]
        if values and rng.random() < NUMBER_DECOYS:
            decoys, wanted = [], rng.randint(1, 3)
            for _ in range(100 * wanted):  # bounded: a form with few values besides the row's may give fewer
                decoy = same_form(rng, rng.choice(values))
                if decoy not in values:
                    decoys.append(rng.choice(DECOY_FORMS).format(value=decoy))
                if len(decoys) == wanted:
                    break
            pieces += self._encode(decoys)
        return pieces

    def _clutter_points(self, rng: random.Random, hay: np.ndarray, cuts: np.ndarray, count: int) -> list[int]:
        """`count` distinct random points of `hay` where a word starts (before a token that opens with a space or a
        line break) or a sentence has ended; with fewer such points than `count`, some repeat."""
        places = np.union1d(np.flatnonzero(self.word_starts[hay]), cuts)
        if not len(places):
            places = np.arange(len(hay) + 1)
        chosen = rng.sample(range(len(places)), count) if count <= len(places) else \
            rng.choices(range(len(places)), k=count)
        return [int(places[i]) for i in chosen]

    def _chat_parts(self, intro: str, questions, rng: random.Random) -> tuple[list[int], list[int], list]:
        """Chat tokens before and after the haystack (the first user turn holds intro, text and first question),
        and the questions the conversation asks (the first and a random number of the others)."""
        asked = questions[: 1 + rng.randint(0, len(questions) - 1)]
        content = (intro + "\n" if intro else "") + SENTINEL + "\n" + asked[0][0]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": asked[0][1]}]
        for question, answer, _, _ in asked[1:]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        before, after = text.split(SENTINEL)
        return *self._encode([before, after]), asked


def mark_last(ids: np.ndarray, pieces: list[list[int]]) -> np.ndarray:
    """bool per token of `ids`: True on the last occurrence of each token sequence in `pieces` (an answer's values
    come after the fact that states them, so their last occurrence is the answer's)."""
    marked = np.zeros(len(ids), dtype=bool)
    for piece in pieces:
        if not piece:
            continue
        starts = np.flatnonzero(ids[: len(ids) - len(piece) + 1] == piece[0])
        hits = [i for i in starts[::-1] if np.array_equal(ids[i: i + len(piece)], piece)][:1]
        for i in hits:
            marked[i: i + len(piece)] = True
    return marked
