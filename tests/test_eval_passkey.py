"""Passkey/needle prompts and grid on a tiny model with the real SmolLM2 tokenizer.
Run: python -m pytest tests/test_eval_passkey.py -q
"""

import pytest
import torch
from conftest import tiny_model

from yarnkit.assets import sample_path
from yarnkit.models import cache_argument
from yarnkit.corpus import read_text
from yarnkit.eval.passkey import (GARBAGE, INTRO, KEY_SENTENCE, QUESTION, build_prompt, evaluate_passkey, first_integer,
                                  garbage_filler)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=7, vocab_size=49152)


def filler_tokens_before_key(tokenizer, prompt):
    key_sentence = KEY_SENTENCE.format(key=prompt.key)
    assert prompt.text.startswith(INTRO + "\n") and prompt.text.endswith("\n" + QUESTION)
    where = prompt.text.index("\n" + key_sentence + "\n")
    prefix = prompt.text[len(INTRO) + 1:where]
    suffix = prompt.text[where + len(key_sentence) + 2:-len(QUESTION) - 1]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0  # noqa: E731
    return count(prefix), count(suffix)


@pytest.mark.parametrize("filler_kind", ["garbage", "book"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_sits_at_the_requested_depth_and_prompt_fits(tokenizer, filler_kind, depth):
    length = 2000
    filler = garbage_filler(length) if filler_kind == "garbage" else read_text(sample_path("eval"))
    prompt = build_prompt(tokenizer, filler, length, depth, key=31337)
    size = len(tokenizer(prompt.text)["input_ids"])
    assert prompt.token_ids == tokenizer(prompt.text)["input_ids"]
    assert length - 10 <= size <= length
    before, after = filler_tokens_before_key(tokenizer, prompt)
    # re-tokenising a cut piece can merge or split a token at the cut: allow 2 tokens
    assert abs(before / (before + after) - depth) <= 2 / (before + after)
    if filler_kind == "garbage":
        assert GARBAGE[:40] in prompt.text


def test_first_integer_and_bad_depths():
    assert first_integer(" 4213. Remember") == 4213
    assert first_integer("no digits at all") is None
    with pytest.raises(ValueError, match="depth"):
        build_prompt(None, "x", 100, 1.5, 1)


def test_grid_records_answers_and_skips_bad_cells(model, tokenizer):
    result = evaluate_passkey(model, tokenizer, [20, 200, 300], [0.0, 1.0], trials=2, seed=3, max_length=250)
    assert [(cell["length"], cell["depth"]) for cell in result["cells"]] == [(200, 0.0), (200, 1.0)]
    reasons = {(entry["length"], entry["depth"]): entry["reason"] for entry in result["skipped"]}
    assert "too short" in reasons[(20, 0.0)] and reasons[(300, 1.0)] == "length 300 > --max-length 250"
    for cell in result["cells"]:
        assert len(cell["trials"]) == 2 and 0.0 <= cell["accuracy"] <= 1.0
        for trial in cell["trials"]:
            assert set(trial) == {"key", "answer", "parsed", "correct", "prompt_tokens"}
            assert isinstance(trial["answer"], str) and trial["prompt_tokens"] <= 200
            assert trial["correct"] == (trial["parsed"] == trial["key"])
            if trial["parsed"] is None:
                assert not trial["correct"]  # an answer without digits is wrong and kept verbatim
    again = evaluate_passkey(model, tokenizer, [20, 200, 300], [0.0, 1.0], trials=2, seed=3, max_length=250)
    assert again["cells"] == [dict(cell, seconds=again_cell["seconds"]) for cell, again_cell
                              in zip(result["cells"], again["cells"])]  # seeded: same keys, same answers


def test_greedy_answer_is_parsed_for_the_key(tokenizer):
    """A model whose LM head always prefers the digit "4" answers "4444" in 4 greedy steps."""
    from yarnkit.eval.passkey import greedy_answer

    model = tiny_model("llama", seed=7, vocab_size=49152)
    four, = tokenizer("4", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(49152))  # nn.Linear uses .bias when set
        model.lm_head.bias[four] = 1.0
    answer = greedy_answer(model, tokenizer, tokenizer(QUESTION)["input_ids"], max_new_tokens=4)
    assert answer == "4444" and first_integer(answer) == 4444


def test_greedy_answer_stops_once_the_integer_is_complete(tokenizer):
    """A model that says "4" until the prompt holds 3 of them, then "." forever: decoding stops after the ".",
    long before max_new_tokens, and the parsed integer is what a full decode would give."""
    from yarnkit.eval.passkey import greedy_answer

    four, = tokenizer("4", add_special_tokens=False)["input_ids"]
    dot, = tokenizer(".", add_special_tokens=False)["input_ids"]

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, input_ids, use_cache=True, logits_to_keep=1, **cache):  # the cache under either name
            self.seen.extend(input_ids[0].tolist())
            logits = torch.zeros(1, 1, 49152)
            logits[0, -1, four if self.seen.count(four) < 3 else dot] = 1.0
            return type("Out", (), {"logits": logits, cache_argument(): None})()

    model = Scripted()
    answer = greedy_answer(model, tokenizer, tokenizer(QUESTION)["input_ids"], max_new_tokens=50)
    assert answer == "444." and first_integer(answer) == 444
