"""Passkey retrieval (YaRN paper / landmark-attention prompt) and its `needle` variant with real book text.

Prompt: intro line, filler prefix, "The pass key is {K}. Remember it. {K} is the pass key.", filler suffix,
"What is the pass key? The pass key is" (joined by newlines). `passkey` filler is the repeated sentence block of
the paper; `needle` filler is a book. The filler is cut at token boundaries so the prompt has at most `length`
tokens, and the key goes after `round(depth * filler_tokens)` filler tokens. Keys are uniform in 1..50000 from a
seeded RNG. Greedy decoding of up to `max_new_tokens`, stopping early once the answer holds a complete integer
(digits followed by a non-digit: later tokens cannot change it); the first integer is compared with K; an answer
without digits is wrong and is kept verbatim in the result. Tests: tests/test_eval_passkey.py.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from yarnkit.eval.ppl import bos_token_id
from yarnkit.models import forward_with_cache

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
COMPLETE_INTEGER = re.compile(r"\d\D")


@dataclass(frozen=True)
class Prompt:
    text: str
    key: int
    depth: float          # requested depth in [0, 1]
    filler_tokens: int    # filler tokens around the key
    key_after: int        # filler tokens before the key (= round(depth * filler_tokens))
    token_ids: list[int]  # the tokenised prompt (with the tokenizer's special tokens), at most `length` long


def garbage_filler(approx_tokens: int) -> str:
    """The paper's sentence block repeated to comfortably more than `approx_tokens` tokens (~21 tokens/block)."""
    return " ".join([GARBAGE] * (approx_tokens // 10 + 2))


def filler_offsets(tokenizer, filler: str) -> list[tuple[int, int]]:
    """Character spans of the filler's tokens (needs a fast tokenizer); computed once per grid."""
    return tokenizer(filler, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def build_prompt(tokenizer, filler: str, length: int, depth: float, key: int, offsets=None) -> Prompt:
    """The longest prompt of at most `length` tokens (as tokenised with the tokenizer's special tokens)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    offsets = filler_offsets(tokenizer, filler) if offsets is None else offsets
    fixed = len(tokenizer("\n".join([INTRO, "", KEY_SENTENCE.format(key=key), "", QUESTION]))["input_ids"])
    budget = length - fixed
    if budget <= 0:
        raise ValueError(f"length {length} is too short: the fixed parts of the prompt take {fixed} tokens")
    if len(offsets) < budget:
        raise ValueError(f"the filler text has {len(offsets)} tokens but length {length} needs {budget}; "
                         "pass a longer haystack")
    filler_tokens = budget
    while filler_tokens > 0:
        key_after = round(depth * filler_tokens)
        cut = offsets[key_after][0] if key_after < filler_tokens else offsets[filler_tokens - 1][1]
        end = offsets[filler_tokens - 1][1]
        text = "\n".join([INTRO, filler[:cut].strip(), KEY_SENTENCE.format(key=key), filler[cut:end].strip(), QUESTION])
        token_ids = tokenizer(text)["input_ids"]
        excess = len(token_ids) - length
        if excess <= 0:
            return Prompt(text, key, depth, filler_tokens, key_after, token_ids)
        filler_tokens -= excess  # joins can merge or split a token or two; shrink by the excess and retry
    raise ValueError(f"cannot fit a prompt in {length} tokens")


def first_integer(answer: str) -> int | None:
    match = re.search(r"\d+", answer)
    return int(match.group()) if match else None


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 10) -> str:
    """Greedy continuation with a KV cache; only the last position's logits are computed at prefill. Stops at EOS
    or once the text holds a complete integer (what `first_integer` reads is then settled)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    cache, generated = None, []
    for _ in range(max_new_tokens):
        out, cache = forward_with_cache(model, cache, input_ids=input_ids, use_cache=True, logits_to_keep=1)
        next_id = int(out.logits[0, -1].argmax())
        if next_id == tokenizer.eos_token_id:
            break
        generated.append(next_id)
        if COMPLETE_INTEGER.search(tokenizer.decode(generated, skip_special_tokens=True)):
            break
        input_ids = torch.tensor([[next_id]], device=device)
    return tokenizer.decode(generated, skip_special_tokens=True)


def evaluate_passkey(model, tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int = 0,
                     filler: str | None = None, max_length: int | None = None, max_new_tokens: int = 10) -> dict:
    """Accuracy grid (rows per length x depth) and every trial's answer. `filler=None` is the paper's garbage."""
    rng = random.Random(seed)
    bos_token_id(tokenizer)  # fail early on tokenizers we cannot use
    cells, skipped = [], []
    needed = max(lengths)
    if filler is None:
        filler = garbage_filler(needed)
    offsets = filler_offsets(tokenizer, filler)
    grid = [(length, depth) for length in lengths for depth in depths]
    for length, depth in tqdm(grid, desc="passkey grid"):
        keys = [rng.randint(1, 50000) for _ in range(trials)]  # drawn even for skipped cells: seeds stay aligned
        if max_length is not None and length > max_length:
            skipped.append({"length": length, "depth": depth, "reason": f"length {length} > --max-length {max_length}"})
            continue
        start, results = time.perf_counter(), []
        try:
            for key in keys:
                prompt = build_prompt(tokenizer, filler, length, depth, key, offsets)
                answer = greedy_answer(model, tokenizer, prompt.token_ids, max_new_tokens)
                found = first_integer(answer)
                results.append({"key": key, "answer": answer, "parsed": found, "correct": found == key,
                                "prompt_tokens": len(prompt.token_ids)})
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            skipped.append({"length": length, "depth": depth, "reason": f"out of GPU memory at length {length}"})
            continue
        except ValueError as error:  # prompt cannot be built (too short a length or too little filler text)
            skipped.append({"length": length, "depth": depth, "reason": str(error)})
            continue
        cells.append({"length": length, "depth": depth, "accuracy": sum(r["correct"] for r in results) / trials,
                      "trials": results, "seconds": round(time.perf_counter() - start, 3)})
    overall = sum(c["accuracy"] for c in cells) / len(cells) if cells else None
    return {"cells": cells, "skipped": skipped, "accuracy": overall}
