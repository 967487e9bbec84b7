"""Needle templates for retrieval, in one registry split into what evaluation asks and what training may teach;
and where needles go in a token haystack (shared by the evaluation and the synthetic training data).

A `Template` is one way of stating a fact about a key ("One of the special magic numbers for {key} is: {value}.")
and of asking for it (question, answer prefix, and the plural forms for several values or keys). A `ChainTemplate`
states variable assignments and asks which variables hold a value (RULER's variable tracking). Every template has a
`split`: "eval" templates are what `yarnkit eval retrieval` asks and must never be trained on; "train" templates
are what the synthetic training data (yarnkit/train/synthetic.py) draws from, together with the train-only
attribute nouns, key names, intros and answer prefixes that restate the key below. The key-name vocabularies are
split the same way.

`check_train_template` is the one rule that keeps the splits apart, and training calls it on every template it
would use (the registry's and any from a recipe): a training template collides with an evaluation template when
one of its sentences, once normalised (lower case, punctuation dropped, slots blanked), equals one of the
evaluation template's, or when it contains one of the evaluation template's marker phrases (its attribute noun
and its distinctive wording, e.g. "special magic" or "mentioned in the provided text").

Placement: `insertion_point(depth, n, cuts)` puts a needle at depth d of an n-token haystack right after the
sentence end (see `sentence_ends`) nearest to `round(d x n)` within `SNAP` tokens, else exactly there; depth 0 is
the first token and 1 the end. `splice` inserts token pieces at such points, keeping the given order for equal
points. Tests: tests/test_needles.py, tests/test_eval_retrieval.py.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import numpy as np

from yarnkit.errors import TemplateCollision, TemplateError

SNAP = 48  # tokens a needle may move to sit right after a sentence end


@dataclass(frozen=True)
class Template:
    name: str
    split: str  # "eval" or "train"
    fact: str  # {key}, {value}; train templates may also use {attr} (filled from TRAIN_ATTRIBUTES)
    question: str  # asks for one key's value: {key}
    answer: str  # answer prefix, the value follows: {key}
    question_all: str = ""  # asks for every value of {keys} (several values or several keys)
    answer_all: str = ""
    intro: str = ""  # the line before the haystack
    markers: tuple[str, ...] = field(default=())  # eval: phrases no training text may contain


@dataclass(frozen=True)
class ChainTemplate:
    name: str
    split: str
    assign: str  # {var} = {value}
    copy: str  # {var} takes {source}'s value
    question: str  # {value}
    answer: str  # {count}, {value}
    intro: str = ""
    markers: tuple[str, ...] = field(default=())


EVAL_TEMPLATES = (
    Template("magic", "eval", "One of the special magic numbers for {key} is: {value}.",
             "What is the special magic number for {key} mentioned in the provided text?",
             "The special magic number for {key} mentioned in the provided text is",
             "What are all the special magic numbers for {keys} mentioned in the provided text?",
             "The special magic numbers for {keys} mentioned in the provided text are",
             "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.",
             ("special magic", "magic number", "mentioned in the provided text", "hidden within the following text")),
    Template("archive", "eval", "Remember this: the archive reference of {key} is {value}.",
             "What is the archive reference of {key}?", "The archive reference of {key} is",
             "What are the archive references of {keys}?", "The archive references of {keys} are",
             "A long document follows. Somewhere inside it are archive references; you will be asked about them.",
             ("archive reference", "remember this", "a long document follows")),
    Template("passkey", "eval", "The pass key is {value}. Remember it. {value} is the pass key.",
             "What is the pass key?", "The pass key is",
             intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                   "I will quiz you about the important information there.",
             markers=("pass key", "passkey", "important info hidden")),
)

EVAL_CHAINS = (
    ChainTemplate("vt", "eval", "VAR {var} = {value}.", "VAR {var} = VAR {source}.",
                  "Question: Find all variables that are assigned the value {value} in the text above.",
                  "Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
                  "assigned the value {value}, they are:",
                  "Memorize and track the chain(s) of variable assignment hidden in the following text.",
                  ("var ", "chain(s) of variable assignment", "find all variables")),
)

# Training phrasings. Facts and question/answer pairs combine freely; {attr} takes a TRAIN_ATTRIBUTES noun.
TRAIN_FACTS = (
    "The {attr} of {key} is {value}.", "{key}'s {attr}: {value}.", "Note that {key} has the {attr} {value}.",
    "For the record, the {attr} assigned to {key} reads {value}.", "{key} -- {attr} {value}.",
    "It was agreed that the {attr} for {key} would be {value}.", "Write down the {attr} of {key}: {value}.",
    "The clerk entered {value} as the {attr} of {key}.", "({key}, {attr}: {value})",
    "According to the register, {key} is filed under the {attr} {value}.", "{key} was given the {attr} {value}.",
    "Do not forget: {value} is the {attr} of {key}.", "Among the notes: {attr} for {key} = {value}.",
    "The {attr} that belongs to {key} is {value}.", "Everyone knew the {attr} of {key}; it was {value}.",
    "{key} keeps the {attr} {value}.", "Memo -- {key}, {attr} {value}.",
    "A small card read: \"{key}: {value}\" (the {attr}).", "The {attr} listed next to {key} was {value}.",
    "Here is a detail worth keeping: {key} uses the {attr} {value}.",
)
TRAIN_QUESTIONS = (  # (question about {key}, answer prefix)
    ("What is the {attr} of {key}?", "The {attr} of {key} is"),
    ("Which {attr} does {key} have?", "{key} has the {attr}"),
    ("Q: What {attr} was assigned to {key}?", "A:"),
    ("Recall the {attr} of {key}.", "The {attr} of {key} was"),
    ("Question: what was {key}'s {attr}?", "Answer:"),
    ("Look up the {attr} for {key}.", "The {attr} for {key} is"),
    ("Tell me the {attr} that belongs to {key}.", "It is"),
    ("What did the text give as the {attr} of {key}?", "The text gave"),
    ("{key}'s {attr} -- what was it?", "It was"),
    ("Find the {attr} of {key} in the passage above.", "Found:"),
    ("What number is the {attr} of {key}?", "The {attr} of {key} is"),
    ("Earlier the text named the {attr} of {key}. What was it?", "It named"),
)
TRAIN_QUESTIONS_ALL = (  # (question about {keys}, answer prefix); several values or several keys
    ("List every {attr} given for {keys}.", "The {attr}s given for {keys} are"),
    ("What were the {attr}s of {keys}?", "They were"),
    ("Q: Name all {attr}s that belong to {keys}.", "A:"),
    ("Collect the {attr}s of {keys} from the text.", "Collected:"),
)
# Answer prefixes that restate the key and the attribute before the value (`data.synthetic.restate`): the answer
# names what it looks up, then gives the value, instead of a bare "A:". Like every phrasing above they are train-only:
# `train_templates()` carries them, so `check_registry` holds them to the evaluation templates' sentences and markers
# (no evaluation answer, e.g. "The archive reference of {key} is", may ever be one of them).
TRAIN_RESTATED = (  # answer prefix about one {key}
    "The {attr} of {key} is", "{key}'s {attr} is", "The {attr} for {key} is", "The {attr} given for {key} is",
    "For {key}, the {attr} is", "The {attr} that belongs to {key} is", "The {attr} listed for {key} is",
    "{key} has the {attr}", "The text gives {key} the {attr}",
)
TRAIN_RESTATED_ALL = (  # answer prefix about {keys}: several values of one key, or one value of each of several keys
    "The {attr}s given for {keys} are", "The {attr}s of {keys} are", "For {keys}, the {attr}s are",
    "The {attr}s listed for {keys} are",
)
TRAIN_ATTRIBUTES = (
    "access code", "locker combination", "serial number", "PIN", "tracking number", "account number",
    "room number", "ticket number", "badge number", "order number", "membership number", "parcel code",
    "safe combination", "licence number", "invoice number", "claim number", "seat number", "phone extension",
    "lot number", "batch code", "catalogue number", "registration number", "vault code", "door code",
    "customer number", "file number", "case number", "permit number", "policy number", "shipment code",
    "lucky number", "favourite number", "secret code", "password", "security code", "voucher code",
    "booking code", "confirmation code", "patient number", "student number", "employee number", "box number",
)
TRAIN_CHAINS = (
    ChainTemplate("let", "train", "let {var} = {value};", "let {var} = {source};",
                  "Which variables end up holding {value}?", "The {count} variables holding {value} are"),
    ChainTemplate("assign", "train", "{var} := {value}", "{var} := {source}",
                  "Q: which names are equal to {value}?", "A: {count} names:"),
    ChainTemplate("prose", "train", "The box {var} contains {value}.", "The box {var} contains what box {source} "
                  "contains.", "Which boxes contain {value}?", "Boxes containing {value} ({count}):"),
    ChainTemplate("set", "train", "set {var} to {value}", "set {var} to {source}",
                  "After these commands, which registers hold {value}?", "Registers holding {value}:"),
)
TRAIN_INTROS = (
    "", "Read the following text carefully.", "Some facts are scattered through the passage below.",
    "Below is a long text with a few records inside it.", "Pay attention to the details in this document.",
    "The following pages contain notes that will matter later.", "Text:",
)

# Key names. Evaluation keys are adjective-noun words (as RULER's); training keys are people, places and projects.
EVAL_ADJECTIVES = ("amber", "brisk", "candid", "dusty", "eager", "fabled", "gilded", "hollow", "ivory", "jagged",
                   "lunar", "mellow", "nimble", "opaque", "placid", "quaint", "rustic", "somber", "tidal", "umber",
                   "vivid", "wistful", "zesty", "frosty")
EVAL_NOUNS = ("anchor", "beacon", "canyon", "dynamo", "ember", "falcon", "glacier", "harbor", "island", "jasmine",
              "kettle", "lantern", "meadow", "nectar", "orchard", "pebble", "quiver", "riddle", "saddle", "thimble",
              "urchin", "valley", "walrus", "zephyr")
TRAIN_FIRST = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Keiko",
               "Luca", "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Stefan", "Tara", "Umar", "Vera",
               "Wendell", "Yusuf", "Zoe", "Arthur", "Beatrix", "Cyril", "Dolores", "Edmund")
TRAIN_LAST = ("Abbott", "Brennan", "Castillo", "Dalton", "Eriksen", "Fairbanks", "Gallagher", "Holm", "Iyer",
              "Jansen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quint", "Ramirez",
              "Sorensen", "Tanaka", "Ulrich", "Vance", "Whitlock", "Yates", "Zeller")
TRAIN_PLACES = ("Oslo", "Lisbon", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Perth", "Montreal", "Cork", "Leipzig",
                "Valparaiso", "Tromso", "Marrakesh", "Kyoto", "Bergen", "Sapporo", "Cusco", "Gdansk")
TRAIN_THINGS = ("the blue warehouse", "the north gate", "the old mill", "the night train", "the third locker",
                "the red notebook", "the garden shed", "the east wing", "the river ferry", "the top drawer")
TRAIN_CODENAMES = ("Osprey", "Bramble", "Cobalt", "Driftwood", "Foxglove", "Granite", "Hemlock", "Juniper",
                   "Kestrel", "Larkspur", "Mistral", "Nettle", "Obsidian", "Parsnip", "Quartz", "Rook")


def _normalise(text: str) -> str:
    text = re.sub(r"\{[a-z_]+\}", " _ ", text.lower())
    return " ".join(re.sub(r"[^a-z0-9_ ]+", " ", text).split())


def _stems(text: str) -> str:
    """Normalised, with a plural -s dropped from each word (marker phrases match singular and plural)."""
    return " ".join(word[:-1] if len(word) > 3 and word.endswith("s") else word for word in _normalise(text).split())


def _sentences(template) -> list[tuple[str, str]]:
    if isinstance(template, ChainTemplate):
        parts = ("assign", "copy", "question", "answer", "intro")
    else:
        parts = ("fact", "question", "answer", "question_all", "answer_all", "intro")
    return [(part, getattr(template, part)) for part in parts if getattr(template, part)]


def eval_templates() -> tuple:
    return EVAL_TEMPLATES + EVAL_CHAINS


def train_templates() -> list[Template]:
    """Every training fact x question pair as a Template ({attr} left as a slot), and each restating answer."""
    first_question, first_answer = TRAIN_QUESTIONS[0]
    return [Template(f"train-{f}-{q}", "train", fact, question, answer)
            for f, fact in enumerate(TRAIN_FACTS) for q, (question, answer) in enumerate(TRAIN_QUESTIONS)] + \
        [Template(f"train-all-{q}", "train", TRAIN_FACTS[0], first_question, first_answer, question, answer)
         for q, (question, answer) in enumerate(TRAIN_QUESTIONS_ALL)] + \
        [Template(f"train-restated-{r}", "train", TRAIN_FACTS[0], first_question, answer)
         for r, answer in enumerate(TRAIN_RESTATED)] + \
        [Template(f"train-restated-all-{r}", "train", TRAIN_FACTS[0], first_question, first_answer,
                  TRAIN_QUESTIONS_ALL[0][0], answer) for r, answer in enumerate(TRAIN_RESTATED_ALL)]


@functools.lru_cache(maxsize=1)
def _eval_signatures() -> tuple:
    """(evaluation template, its normalised sentences, its marker stems), computed once."""
    return tuple((t, {_normalise(text) for _, text in _sentences(t)}, tuple((m, f" {_stems(m)} ") for m in t.markers))
                 for t in eval_templates())


def check_train_template(template, attributes=TRAIN_ATTRIBUTES) -> None:
    """Raise `TemplateCollision` if `template` (a training Template/ChainTemplate, {attr} filled from `attributes`)
    matches an evaluation template's sentence or contains one of its marker phrases."""
    for part, text in _sentences(template):
        for filled in ([text.replace("{attr}", attr) for attr in attributes] if "{attr}" in text else [text]):
            plain, stems = _normalise(filled), f" {_stems(filled)} "
            for evaluation, own, markers in _eval_signatures():
                clash = next((marker for marker, stem in markers if stem in stems), None)
                if plain in own or clash:
                    why = f"contains the phrase {clash!r}" if clash else "is the same sentence"
                    raise TemplateCollision(
                        f"training template {template.name!r} collides with evaluation template {evaluation.name!r}: "
                        f"its {part} {filled!r} {why}; rephrase it or leave it out of training (evaluation templates "
                        "stay unseen)")


def check_registry(attributes=TRAIN_ATTRIBUTES) -> None:
    """Every training template and attribute of the registry against every evaluation template. A pair of
    (attributes, training templates) that passed is not checked again in this process (a training run asks three
    times); a changed template is a new pair, so it is checked."""
    _check_registry(tuple(attributes), tuple(train_templates()) + tuple(TRAIN_CHAINS))


@functools.lru_cache(maxsize=8)
def _check_registry(attributes: tuple, templates: tuple) -> None:
    check_attributes(attributes)  # a collision raises, and exceptions are not cached
    for template in templates:
        check_train_template(template, attributes)


def check_attributes(attributes) -> None:
    """Raise `TemplateCollision` for a training attribute noun that names an evaluation template's value."""
    for attr in attributes:
        check_train_template(Template(f"attribute {attr!r}", "train", "The {attr} of {key} is {value}.",
                                      "", ""), attributes=[attr])


def parse_template(text: str, name: str = "custom") -> Template:
    """A training template from a recipe: 'FACT | QUESTION | ANSWER' ({key}, {value}, optional {attr})."""
    parts = [part.strip() for part in text.split("|")]
    if len(parts) != 3 or "{key}" not in parts[0] or "{value}" not in parts[0] or "{key}" not in parts[1]:
        raise TemplateError(f"training template {text!r} must read 'FACT | QUESTION | ANSWER' with {{key}} and "
                                "{value} in the fact and {key} in the question")
    return Template(name, "train", *parts)


def sentence_ends(tokenizer, ids: np.ndarray) -> np.ndarray:
    """bool per token of `ids`: it ends a sentence (its text ends in . ! ? before any closing quote, or holds a
    blank line, a paragraph break). Each distinct token is decoded once."""
    distinct, inverse = np.unique(np.asarray(ids), return_inverse=True)
    ends = np.array([ends_sentence(tokenizer.decode([token_id])) for token_id in distinct.tolist()], dtype=bool)
    return ends[inverse.reshape(-1)]


def ends_sentence(text: str) -> bool:
    """A token's text ends a sentence: it ends in . ! ? before any closing quote, or holds a blank line."""
    return "\n\n" in text or text.rstrip(" ").rstrip("\"'’”)").endswith((".", "!", "?"))


def insertion_point(depth: float, n: int, cuts: np.ndarray) -> int:
    """Where a needle at `depth` goes in an n-token haystack whose sentence ends are at `cuts` (the insertion
    points right after them, sorted)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]; pass depths such as 0,0.25,0.5,0.75,1")
    target = round(depth * n)
    if 0 < target < n and len(cuts):
        nearest = int(cuts[np.abs(cuts - target).argmin()])
        if abs(nearest - target) <= SNAP and nearest <= n:
            return nearest
    return target


def splice(ids, points: list[int], pieces: list[list[int]]) -> list[int]:
    """`ids` with `pieces[i]` inserted before token `points[i]`; equal points keep the order of `pieces`."""
    out, last = [], 0
    for i in sorted(range(len(pieces)), key=lambda i: (points[i], i)):
        out += list(ids[last:points[i]]) + list(pieces[i])
        last = points[i]
    return out + list(ids[last:])
