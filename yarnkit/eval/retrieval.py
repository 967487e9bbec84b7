"""Retrieval tasks on book haystacks, modelled on RULER (Hsieh et al. 2024): does the model *use* its context?

Tasks (each a depth x length grid; every prompt has exactly `length` tokens, the book text filling what the needles,
the intro and the question leave):
- `niah`: one needle; the evaluation templates take turns across a cell's trials (magic, archive, ...).
- `multikey`: the needle plus `distractors` needles of the same form for other keys; the asked one must be picked.
- `multivalue`: `values` needles for one key; every value must be given.
- `multiquery`: `queries` keys with one needle each, all asked at once.
- `vt`: variable tracking, a chain `VAR A = 1234567. VAR B = VAR A. ...` of `hops` copies; name every variable.
- `chat`: `niah` asked through the tokenizer's chat template (instruct models); the answer is the reply.
The cell's depth places the task's first needle (the asked one, the first value, the chain's start); the others go to
seeded random depths (a chain's links after its start, in order). Values are random 7-digit numbers and keys are
evaluation-only words (yarnkit/needles.py); a value or chain variable that occurs in its haystack window is drawn
again. Each cell draws from its own seeded generator, so every model sees the same prompts.

Scoring, both per trial and from one forward pass over prompt + reference answer:
- `correct` (exact match of the generated answer): greedy decoding (a completion stops at a line break after
  text, or a blank line for the list tasks); for one-answer tasks the first number of the answer must be the
  value; for several answers, the share of expected values that appear as whole words.
- `tf_correct` (teacher forcing): every token of every expected value is the argmax given the reference before it
  (for `chat` after the template's answer prefix). High teacher-forced accuracy with low exact match is a format
  failure; both low is a retrieval failure.
- `miss` (one-answer tasks, wrong answers only; `misses` counts them per kind): what the model gave instead,
  the first number of its answer being another needle's value (`neighbour`), a number printed in the prompt's
  book text (`book number`), the value mis-copied (`near value`: at most 2 digit edits), another number
  (`other number`), or no number at all (`no number`). It tells confusion among look-alike facts from a model
  that reads the haystack's own numbers as the answer.
Tests: tests/test_eval_retrieval.py.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from yarnkit import needles
from yarnkit.eval.haystack import Haystack, place_needles
from yarnkit.errors import RetrievalError
from yarnkit.eval.ppl import bos_token_id
from yarnkit.models import forward_with_cache

TASKS = ("niah", "multikey", "multivalue", "multiquery", "vt", "chat")
SINGLE_ANSWER = ("niah", "multikey", "chat")
COMPLETE_INTEGER = re.compile(r"\d\D")
NUMBER = re.compile(r"\d+")
MISS_KINDS = ("neighbour", "book number", "near value", "other number", "no number")
SENTINEL = "\u2063NEEDLE\u2063"


@dataclass
class TaskOptions:
    templates: tuple[str, ...] = ("magic", "archive")  # evaluation templates of niah, multikey and chat
    distractors: int = 3
    values: int = 4
    queries: int = 4
    hops: int = 4
    max_new_tokens: int = 0  # 0 = the task's own (12 for one value, 9 per value, 6 per chain name, 40 for chat)
    batch_tokens: int = 655_360  # prompt tokens scored in one forward (64k prompts: 10 at a time)


@dataclass
class Sample:
    template: str
    prompt_ids: list[int]  # what the model sees before it answers: exactly `length` tokens
    forced_ids: list[int]  # prompt (+ answer prefix for chat) + the reference answer
    spans: list[tuple[int, int]]  # where each expected value's tokens sit in `forced_ids`
    expected: list[str]
    needle_depths: list[float]
    plain: bool = True  # a completion prompt (stop at a newline), not a chat turn
    record: dict = field(default_factory=dict)
    neighbours: list[str] = field(default_factory=list)  # the other needles' values (multikey's distractors)
    book_numbers: frozenset[str] = frozenset()  # every number printed in the book text the prompt holds


def eval_template(name: str) -> needles.Template:
    chosen = {t.name: t for t in needles.EVAL_TEMPLATES}
    if name not in chosen:
        raise RetrievalError(f"unknown evaluation template {name!r}; choose from {', '.join(chosen)}")
    return chosen[name]


class Builder:
    """Token pieces for prompts: the tokenizer's encodings, BOS, and the chat template split around the content."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = bos_token_id(tokenizer)
        self._chat = None

    def enc(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def chat_parts(self) -> tuple[list[int], list[int]]:
        if self._chat is None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RetrievalError("task chat needs a tokenizer with a chat template (an instruct model); drop chat "
                                     "from --tasks")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                                      add_generation_prompt=True)
            before, after = text.split(SENTINEL)
            self._chat = (self.enc(before), self.enc(after))
        return self._chat

    def answer(self, values: list[str], start: int) -> tuple[list[int], list[tuple[int, int]]]:
        """' v1, v2, v3' as tokens and each value's span (from `start`), whitespace-only tokens left out."""
        ids, spans = [], []
        for index, value in enumerate(values):
            if index:
                ids += self.enc(",")
            piece = self.enc(" " + value)
            lead = 1 if piece and not self.tokenizer.decode([piece[0]]).strip() else 0  # a lone space token
            spans.append((start + len(ids) + lead, start + len(ids) + len(piece)))
            ids += piece
        return ids, spans


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(rng: random.Random, count: int) -> list[str]:
    pool = [f"{a}-{n}" for a in needles.EVAL_ADJECTIVES for n in needles.EVAL_NOUNS]
    return rng.sample(pool, count)


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _join(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def build_sample(task: str, builder: Builder, haystack: Haystack, length: int, depth: float, rng: random.Random,
                 book: int, options: TaskOptions, template_name: str) -> Sample:
    """One prompt of `task` with exactly `length` tokens; raises RetrievalError if the parts alone do not fit."""
    if task not in TASKS:
        raise RetrievalError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise RetrievalError(f"depth {depth} is outside [0, 1]; pass depths such as 0,0.25,0.5,0.75,1")
    if task == "vt":
        template = needles.EVAL_CHAINS[0]
        template_name = template.name
    else:
        template = eval_template(template_name)
    count = {"multikey": 1 + options.distractors, "multiquery": options.queries}.get(task, 1)
    keys = _keys(rng, count)
    n_values = options.values if task == "multivalue" else 1
    variables = [_variable(rng) for _ in range(options.hops + 1)] if task == "vt" else []
    needle_count = len(variables) if task == "vt" else count * n_values
    extra = [rng.random() for _ in range(needle_count - 1)]
    if task == "vt":
        depths = [depth] + sorted(depth + (1 - depth) * x for x in extra)
    else:
        depths = [depth] + extra
    # a first look at the window to draw values that do not occur in it (the window only shrinks later)
    ids, ends = haystack.window(book, length)
    text = builder.tokenizer.decode(ids.tolist())
    values = []
    while len(values) < (1 if task == "vt" else count * n_values):
        value = _value(rng)
        if value not in text and value not in values:
            values.append(value)
    while any(v in text for v in variables) or len(set(variables)) < len(variables):
        variables = [_variable(rng) for _ in variables]

    if task == "vt":
        facts = [template.assign.format(var=variables[0], value=values[0])] + [
            template.copy.format(var=variables[i + 1], source=variables[i]) for i in range(options.hops)]
        question = template.question.format(value=values[0])
        prefix = template.answer.format(count=len(variables), value=values[0])
        expected = variables
    elif task == "multivalue":
        facts = [template.fact.format(key=keys[0], value=v) for v in values]
        question, prefix = (t.format(keys=keys[0]) for t in (template.question_all, template.answer_all))
        expected = values
    elif task == "multiquery":
        facts = [template.fact.format(key=k, value=v) for k, v in zip(keys, values)]
        question, prefix = (t.format(keys=_join(keys)) for t in (template.question_all, template.answer_all))
        expected = values
    else:  # niah, chat, multikey: the first key is asked
        facts = [template.fact.format(key=k, value=v) for k, v in zip(keys, values)]
        question, prefix = (t.format(key=keys[0]) for t in (template.question, template.answer))
        expected = values[:1]
    pieces = [builder.enc(" " + fact) for fact in facts]
    intro = template.intro + "\n" if template.intro else ""
    if task == "chat":
        before, after = builder.chat_parts()
        head, tail = before + builder.enc(intro), builder.enc("\n" + question) + after
    else:
        head, tail = [builder.bos] + builder.enc(intro), builder.enc("\n" + question + " " + prefix)
    budget = length - len(head) - len(tail) - sum(map(len, pieces))
    if budget < 1:
        raise RetrievalError(f"length {length} is too short for task {task}: its intro, needles and question take "
                             f"{length - budget} tokens; use longer --lengths")
    body, placed = place_needles(ids[:budget], ends[:budget], list(zip(depths, pieces)))
    prompt = head + body + tail
    forced = prompt + (builder.enc(prefix) if task == "chat" else [])
    answer, spans = builder.answer(expected, len(forced))
    single = task in SINGLE_ANSWER
    kept_text = builder.tokenizer.decode(ids[:budget].tolist()) if single else ""  # the book text the prompt holds
    return Sample(template_name, prompt, forced + answer, spans, expected, [round(d, 4) for d in placed],
                  plain=task != "chat", record={"keys": keys if task != "vt" else variables, "book": book},
                  neighbours=values[1:] if single else [],  # what `miss_kind` tells a wrong answer by
                  book_numbers=frozenset(NUMBER.findall(kept_text)))


def miss_kind(answer: str, expected: str, neighbours: list[str], book_numbers: frozenset[str]) -> str:
    """What a wrong one-answer reply gave instead of `expected`, by its first number (one of `MISS_KINDS`)."""
    numbers = NUMBER.findall(answer)
    if not numbers:
        return "no number"
    given = numbers[0]
    if given in neighbours:
        return "neighbour"
    if given in book_numbers:
        return "book number"
    return "near value" if digit_edits(given, expected) <= 2 else "other number"


def digit_edits(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions that turn `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _found(expected: list[str], answer: str, single: bool) -> float:
    if single:
        numbers = NUMBER.findall(answer)
        return float(bool(numbers) and numbers[0] == expected[0])
    words = set(re.findall(r"[A-Za-z0-9]+", answer))
    return sum(value in words for value in expected) / len(expected)


@torch.no_grad()
def score_batch(model, tokenizer, samples: list[Sample], max_new_tokens: int, single: bool) -> list[dict]:
    """Teacher-forced accuracy and greedy answers for samples whose prompts have one length (one forward)."""
    device = next(model.parameters()).device
    prompt_len = len(samples[0].prompt_ids)
    total = max(len(s.forced_ids) for s in samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(samples), total), pad, dtype=torch.long)
    for row, sample in enumerate(samples):  # right padding: causal attention never looks ahead at it
        ids[row, : len(sample.forced_ids)] = torch.tensor(sample.forced_ids)
    out, cache = forward_with_cache(model, None, input_ids=ids.to(device), use_cache=True,
                                    logits_to_keep=total - prompt_len + 1)
    predicted = out.logits.argmax(-1).cpu()  # position p of forced_ids is predicted at index p - prompt_len
    results = []
    for row, sample in enumerate(samples):
        hits = [all(int(predicted[row, p - prompt_len]) == sample.forced_ids[p] for p in range(a, b))
                for a, b in sample.spans]
        results.append({"tf_score": sum(hits) / len(hits), "tf_correct": all(hits)})
    if total > prompt_len:  # back to the prompt: a negative count removes tokens (transformers 4.4x to 5.x)
        cache.crop(prompt_len - total)
    step = predicted[:, 0].clone()
    generated = [[] for _ in samples]
    done = [False] * len(samples)
    for _ in range(max_new_tokens):
        for row, token in enumerate(step.tolist()):
            if done[row]:
                continue
            if token == tokenizer.eos_token_id:
                done[row] = True
                continue
            generated[row].append(token)
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            ended = "\n" in text.strip() if single else "\n\n" in text.strip()  # a list may go one per line
            if (single and COMPLETE_INTEGER.search(text)) or (samples[row].plain and ended):
                done[row] = True
        if all(done):
            break
        out, cache = forward_with_cache(model, cache, input_ids=step[:, None].to(device), use_cache=True,
                                        logits_to_keep=1)
        step = out.logits[:, -1].argmax(-1).cpu()
    for row, sample in enumerate(samples):
        answer = tokenizer.decode(generated[row], skip_special_tokens=True)
        score = _found(sample.expected, answer, single)
        results[row].update(answer=answer, score=score, correct=score == 1.0)
    return results


def evaluate_retrieval(model, tokenizer, haystack: Haystack, task: str, lengths: list[int], depths: list[float],
                       trials: int, seed: int = 0, options: TaskOptions | None = None,
                       max_length: int | None = None) -> dict:
    """The task's grid: `cells` (length, depth, accuracy, tf_accuracy, trials), `skipped`, and summaries. All
    prompts of one length (every depth, every trial) have that length, so they are scored together in batches of
    up to `options.batch_tokens / length` prompts (halved on running out of GPU memory)."""
    options = options or TaskOptions()
    builder = Builder(tokenizer)
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise RetrievalError(f"depth {depth} is outside [0, 1]; pass depths such as 0,0.25,0.5,0.75,1")
    scored = [length for length in lengths if max_length is None or length <= max_length]
    if scored:
        haystack.require(max(scored), f"length {max(scored):,}")
    single = task in SINGLE_ANSWER
    per_value = {"vt": 6 * (options.hops + 1), "multivalue": 9 * options.values, "multiquery": 9 * options.queries}
    new_tokens = options.max_new_tokens or (40 if task == "chat" else per_value.get(task, 8) + 4)
    templates = ("vt",) if task == "vt" else options.templates
    cells, skipped = [], []
    for length in tqdm(lengths, desc=f"{task} lengths"):
        if max_length is not None and length > max_length:
            skipped += [{"length": length, "depth": d, "reason": f"length {length} > --max-length {max_length}"}
                        for d in depths]
            continue
        started, samples = time.perf_counter(), []
        for index, depth in enumerate(depths):
            rng = random.Random(f"{seed}:{task}:{length}:{depth}")
            cell = lengths.index(length) * len(depths) + index
            samples += [(depth, build_sample(task, builder, haystack, length, depth, rng, cell + t, options,
                                             templates[t % len(templates)])) for t in range(trials)]
        results = _score_all(model, tokenizer, [s for _, s in samples], new_tokens, single,
                             max(1, options.batch_tokens // length))
        if results is None:
            skipped += [{"length": length, "depth": d, "reason": f"out of GPU memory at length {length}"}
                        for d in depths]
            continue
        seconds = round((time.perf_counter() - started) / len(depths), 3)
        if single:
            for (_, sample), result in zip(samples, results):
                result["miss"] = None if result["correct"] else miss_kind(
                    result["answer"], sample.expected[0], sample.neighbours, sample.book_numbers)
        for depth in depths:
            records = [{"template": s.template, "expected": s.expected, **s.record, "needle_depths": s.needle_depths,
                        "prompt_tokens": len(s.prompt_ids), **r} for (d, s), r in zip(samples, results) if d == depth]
            cells.append({"length": length, "depth": depth, "accuracy": _mean(r["score"] for r in records),
                          "tf_accuracy": _mean(r["tf_score"] for r in records), "trials": records,
                          "seconds": seconds})
    return {"retrieval_task": task, "cells": cells, "skipped": skipped, **summarise(cells)}


def _score_all(model, tokenizer, samples: list[Sample], new_tokens: int, single: bool, batch: int):
    """`score_batch` over `samples` in batches of `batch`, halving the batch when GPU memory runs out; None if even
    one prompt does not fit."""
    results, first = [], 0
    while first < len(samples):
        try:
            results += score_batch(model, tokenizer, samples[first: first + batch], new_tokens, single)
            first += batch
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                return None
            batch = max(1, batch // 2)
    return results


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarise(cells: list[dict]) -> dict:
    """Overall accuracies, the depth curve (mean over lengths), per-length rows, per-template accuracy, and (for
    one-answer tasks) how many wrong answers were of each miss kind."""
    depth_curve = [{"depth": d, "accuracy": _mean(c["accuracy"] for c in cells if c["depth"] == d),
                    "tf_accuracy": _mean(c["tf_accuracy"] for c in cells if c["depth"] == d)}
                   for d in sorted({c["depth"] for c in cells})]
    by_length = [{"length": n, "accuracy": _mean(c["accuracy"] for c in cells if c["length"] == n),
                  "tf_accuracy": _mean(c["tf_accuracy"] for c in cells if c["length"] == n)}
                 for n in sorted({c["length"] for c in cells})]
    trials = [t for c in cells for t in c["trials"]]
    per_template = {name: _mean(t["score"] for t in trials if t["template"] == name)
                    for name in sorted({t["template"] for t in trials})}
    worst = min(cells, key=lambda c: c["accuracy"], default=None)
    kinds = [t["miss"] for t in trials if t.get("miss")]
    misses = {kind: kinds.count(kind) for kind in MISS_KINDS if kind in kinds}
    return {"accuracy": _mean(c["accuracy"] for c in cells), "tf_accuracy": _mean(c["tf_accuracy"] for c in cells),
            "worst_cell": worst and {key: worst[key] for key in ("length", "depth", "accuracy", "tf_accuracy")},
            "depth_curve": depth_curve, "by_length": by_length, "per_template": per_template,
            **({"misses": misses} if any("miss" in t for t in trials) else {})}
