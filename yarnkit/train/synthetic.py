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
A row has exactly the requested number of tokens (the haystack is cut to fit). Tested by tests/test_synthetic.py.
"""

from __future__ import annotations

import random
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
    templates: list[str] = field(default_factory=list)  # extra phrasings 'FACT | QUESTION | ANSWER' ({attr} ok)
    attributes: list[str] = field(default_factory=list)  # extra attribute nouns


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


def _key(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return f"{rng.choice(needles.TRAIN_FIRST)} {rng.choice(needles.TRAIN_LAST)}"
    if kind < 0.45:
        return rng.choice(needles.TRAIN_FIRST)
    if kind < 0.6:
        return rng.choice(("the office in ", "the depot at ", "")) + rng.choice(needles.TRAIN_PLACES)
    if kind < 0.7:
        return rng.choice(needles.TRAIN_THINGS)
    if kind < 0.85:
        return f"{rng.choice(('Project', 'Operation', 'Team'))} {rng.choice(needles.TRAIN_CODENAMES)}"
    return f"{rng.choice(('item', 'unit', 'crate', 'cabin'))} {rng.choice(string.ascii_uppercase)}{rng.randint(1, 99)}"


def _variable(rng: random.Random, style: int) -> str:
    if style == 0:
        return "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 6)))
    if style == 1:
        return rng.choice("xyzuvw") + str(rng.randint(1, 999))
    return rng.choice(needles.TRAIN_CODENAMES).lower() + str(rng.randint(1, 9))


def _join(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + rng.choice((" and ", ", and ", ", ")) + items[-1]


class RowMaker:
    """Builds synthetic retrieval rows with one tokenizer; `make(haystack_ids, rng, length, chat)`."""

    def __init__(self, tokenizer, args: SyntheticArgs):
        self.tokenizer, self.args = tokenizer, args
        self.facts, self.questions, self.attributes = training_phrasings(args)
        self.ends = needles.sentence_ends(tokenizer, np.arange(len(tokenizer)))  # per vocabulary id
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _world(self, rng: random.Random, length: int):
        """Facts [(key, attribute, value, text)] and questions [(question, answer, fact indices)]."""
        attributes = rng.sample(self.attributes, rng.randint(1, 3))
        kind = rng.choices([k for k, _ in VALUE_FORMATS], [w for _, w in VALUE_FORMATS])[0]
        count = max(2, round(self.args.facts * length / 8192 * rng.uniform(0.5, 1.5)))
        one_frame = rng.choice(self.facts) if rng.random() < 0.5 else None
        keys, facts = [], []
        while len(facts) < count:
            repeat = keys and rng.random() < 0.15  # another value for a key already stated (multi-value)
            key, attribute = (facts[-1][0], facts[-1][1]) if repeat else (_key(rng), rng.choice(attributes))
            if not repeat and key in keys:
                continue
            keys.append(key)
            value = _value(rng, kind)
            frame = one_frame or rng.choice(self.facts)
            facts.append((key, attribute, value, frame.format(key=key, value=value, attr=attribute)))
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
                values = [facts[i][2] for i in chosen]
                question, answer = (t.format(keys=names, attr=attribute) for t in (question, answer))
            else:
                question, answer = rng.choice(self.questions)
                chosen, values = [index], [facts[index][2]]
                question, answer = (t.format(key=key, attr=attribute) for t in (question, answer))
            asked.update(chosen)
            questions.append((question, f"{answer} {_join(values, rng)}.", chosen))
        if rng.random() < self.args.chains:
            template = rng.choice(needles.TRAIN_CHAINS)
            style = rng.randrange(3)
            names = list(dict.fromkeys(_variable(rng, style) for _ in range(rng.randint(3, 6))))
            value = _value(rng, kind)
            start = len(facts)
            facts.append((names[0], "", value, template.assign.format(var=names[0], value=value)))
            facts += [(n, "", value, template.copy.format(var=n, source=p)) for p, n in zip(names, names[1:])]
            questions.append((template.question.format(value=value), template.answer.format(
                count=len(names), value=value) + " " + _join(names, rng) + ".", list(range(start, len(facts)))))
        return facts, questions

    def make(self, haystack: np.ndarray, rng: random.Random, length: int, chat: bool = False) -> np.ndarray:
        """One row of exactly `length` tokens: haystack text with facts inserted and questions answered."""
        facts, questions = self._world(rng, length)
        intro = rng.choice(needles.TRAIN_INTROS)
        fact_ids = self._encode([" " + fact[3] for fact in facts])
        if chat:
            head, tail = self._chat_parts(intro, questions, rng)
            inline = []
        else:
            interleave = rng.random() < self.args.interleave
            separator = rng.choice((" ", "\n"))
            qa = self._encode(["\n" + q + separator + a for q, a, _ in questions])
            head = ([self.bos] if self.bos is not None else []) + (self._encode([intro + "\n"])[0] if intro else [])
            inline = qa if interleave else []
            tail = ([] if interleave else [t for piece in qa for t in piece]) + ([self.eos] if self.eos is not None
                                                                                else [])
        budget = length - len(head) - len(tail) - sum(map(len, fact_ids)) - sum(map(len, inline))
        if budget < 16 or len(haystack) < budget:
            raise DataError(f"a synthetic retrieval row of {length} tokens cannot hold {len(facts)} facts and their "
                            f"questions; raise data.seq_len or lower data.synthetic.facts/questions")
        hay = haystack[:budget]
        cuts = np.flatnonzero(self.ends[hay]) + 1
        depths = [rng.random() for _ in facts]
        chain = [i for i, f in enumerate(facts) if not f[1]]  # a chain's links go in order
        for i, depth in zip(chain, sorted(depths[i] for i in chain)):
            depths[i] = depth
        points = [needles.insertion_point(d, budget, cuts) for d in depths]
        pieces = list(fact_ids)
        for (_, _, asked), ids in zip(questions, inline):  # after the last fact it asks about
            after = max(points[i] for i in asked)
            later = cuts[cuts > after]
            points.append(int(rng.choice(later)) if len(later) and rng.random() < 0.9 else budget)
            pieces.append(ids)
        body = needles.splice(hay.tolist(), points, pieces)
        return np.asarray(head + body + tail, dtype=np.int64)  # budget was set so that this is `length` tokens

    def _chat_parts(self, intro: str, questions, rng: random.Random) -> tuple[list[int], list[int]]:
        """Chat tokens before and after the haystack: the first user turn holds intro, text and first question."""
        first, *rest = questions
        content = (intro + "\n" if intro else "") + SENTINEL + "\n" + first[0]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": first[1]}]
        for question, answer, _ in rest[: rng.randint(0, len(rest))]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        before, after = text.split(SENTINEL)
        return self._encode([before, after])
