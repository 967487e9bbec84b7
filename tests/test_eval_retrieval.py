"""Retrieval tasks (yarnkit/eval/retrieval.py, haystack.py): prompt construction with the real SmolLM2 tokenizer on
the bundled PG-19 test book, scoring checked with an oracle model that knows the answers, and a CPU smoke of every
task through `yarnkit eval retrieval` on a tiny random model. Run: python -m pytest tests/test_eval_retrieval.py -q
"""

import json
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_model

from yarnkit.assets import sample_path
from yarnkit.cli import main
from yarnkit.eval.haystack import Haystack, place_needles
from yarnkit.errors import RetrievalError
from yarnkit.needles import SNAP
from yarnkit.eval.retrieval import (MISS_KINDS, TASKS, Builder, TaskOptions, build_sample, evaluate_retrieval,
                                    NUMBER, miss_kind)
from yarnkit.models import cache_argument


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return Haystack.from_books(sample_path("eval"), tokenizer, 4096)


@pytest.mark.parametrize("task", TASKS)
def test_prompts_have_the_exact_length_and_the_first_needle_sits_at_its_depth(task, tokenizer, haystack):
    builder = Builder(tokenizer)
    for length, depth in [(700, 0.0), (700, 0.5), (1500, 0.25), (1500, 1.0)]:
        sample = build_sample(task, builder, haystack, length, depth, random.Random(3), 0, TaskOptions(), "magic")
        assert len(sample.prompt_ids) == length
        budget = length - 300  # the haystack part is the prompt minus at most ~300 tokens of needles and question
        assert abs(sample.needle_depths[0] - depth) <= (SNAP + 1) / budget
        if depth in (0.0, 1.0):
            assert sample.needle_depths[0] == depth
        window = tokenizer.decode(haystack.window(0, length)[0].tolist())
        prompt = tokenizer.decode(sample.prompt_ids)
        for value in sample.expected:
            assert value not in window
            assert tokenizer.decode(sample.forced_ids[slice(*sample.spans[sample.expected.index(value)])]).strip() \
                == value
        if task == "vt":  # the chain is in order: VAR A = value, then VAR B = VAR A, ...
            assert sample.needle_depths == sorted(sample.needle_depths)
            starts = [prompt.index(f"VAR {name} =") for name in sample.expected]
            assert starts == sorted(starts)
        else:
            assert all(len(value) == 7 and value in prompt for value in sample.expected)
        assert prompt.rstrip().endswith(("is", "are", "they are:", "provided text?<|im_end|>\n<|im_start|>assistant"))


def test_placement_snaps_to_sentence_ends_and_keeps_equal_points_in_order():
    ids = np.arange(100)
    ends = np.zeros(100, dtype=bool)
    ends[[9, 59]] = True  # tokens 9 and 59 end sentences: insertion points 10 and 60
    out, depths = place_needles(ids, ends, [(0.5, [-1]), (0.55, [-2]), (0.0, [-3]), (1.0, [-4])])
    assert depths == [0.6, 0.6, 0.0, 1.0]
    assert out[:1] == [-3] and out[-1] == -4 and out[61:63] == [-1, -2] and len(out) == 104
    with pytest.raises(RetrievalError, match="depth 1.5 is outside"):
        place_needles(ids, ends, [(1.5, [-1])])


class Oracle(torch.nn.Module):
    """A stand-in causal LM that predicts the next token of whichever reference sequence the row's prompt starts
    (EOS past its end). `newline_first`: at the answer's first position it says "\\n" instead (a format failure)."""

    def __init__(self, samples, tokenizer, newline_first=False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.references = [(s.prompt_ids, s.forced_ids) for s in samples]
        self.vocab, self.eos = len(tokenizer), tokenizer.eos_token_id
        self.newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
        self.newline_first = newline_first

    def forward(self, input_ids, use_cache=True, logits_to_keep=1, **given):  # the cache under this transformers' name
        cache = given.get(cache_argument()) or SimpleNamespace(rows=[[] for _ in input_ids])
        cache.crop = lambda n: [row.__delitem__(slice(n, None)) for row in cache.rows]
        for row, ids in zip(cache.rows, input_ids.tolist()):
            row.extend(ids)
        logits = torch.zeros(len(cache.rows), logits_to_keep, self.vocab)
        for b, row in enumerate(cache.rows):
            prompt, reference = next((p, f) for p, f in self.references if row[: len(p)] == p)
            for k, position in enumerate(range(len(row) - logits_to_keep, len(row))):
                follows = position + 1 < len(reference) and row[: position + 1] == reference[: position + 1]
                token = reference[position + 1] if follows else self.eos
                if self.newline_first and position == len(prompt) - 1:
                    token = self.newline
                logits[b, k, token] = 1.0
        return SimpleNamespace(logits=logits, **{cache_argument(): cache})


@pytest.mark.parametrize("newline_first", [False, True])
def test_oracle_scores_perfectly_and_a_format_failure_keeps_teacher_forced_accuracy(tokenizer, haystack,
                                                                                    newline_first):
    builder, options = Builder(tokenizer), TaskOptions(batch_tokens=1000)  # batches of 1-3
    lengths, depths, trials = [300, 600], [0.0, 1.0], 3
    for task in TASKS:  # the oracle is given the prompts the grid will build (same seeds)
        samples = []
        for index, (n, d) in enumerate((n, d) for n in lengths for d in depths):
            rng = random.Random(f"0:{task}:{n}:{d}")
            samples += [build_sample(task, builder, haystack, n, d, rng, index + t, options,
                                     options.templates[t % 2] if task != "vt" else "vt") for t in range(trials)]
        oracle = Oracle(samples, tokenizer, newline_first)
        result = evaluate_retrieval(oracle, tokenizer, haystack, task, lengths, depths, trials, 0, options)
        # vt's first answer token is a name with its space (" SZ"): the oracle's newline lands on a key token there
        assert result["tf_accuracy"] == pytest.approx(0.8 if newline_first and task == "vt" else 1.0), task
        # after the wrong first token the answer never holds the value (a completion also stops at the newline)
        assert result["accuracy"] == (0.0 if newline_first else 1.0), task
        assert [c["depth"] for c in result["depth_curve"]] == depths and len(result["cells"]) == 4
        assert set(result["per_template"]) == ({"vt"} if task == "vt" else {"magic", "archive"})


def test_miss_kind_names_what_a_wrong_answer_gave():
    book = frozenset({"1774", "572", "8"})
    assert miss_kind(" 3893670.", "4543246", ["3893670", "1111111"], book) == "neighbour"
    assert miss_kind(" 1774.", "4543246", ["3893670"], book) == "book number"
    assert miss_kind(" 8vo", "4543246", [], book) == "book number"  # the first number decides
    assert miss_kind(" 7233350.", "7233500", [], book) == "near value"  # two digits changed
    assert miss_kind(" 454324.", "4543246", [], book) == "near value"  # one dropped
    assert miss_kind(" 4500000.", "4543246", [], book) == "other number"
    assert miss_kind(" Argham.", "4543246", ["3893670"], book) == "no number"


@pytest.mark.parametrize("task, wrong", [("multikey", "neighbour"), ("niah", "book number")])
def test_every_wrong_answer_is_counted_by_what_it_gave(tokenizer, haystack, task, wrong):
    """An oracle that answers a distractor's value (multikey) or a number of the prompt's book text (niah) instead
    of the asked value: every trial is a miss of that kind, and the grid counts them."""
    builder, options = Builder(tokenizer), TaskOptions(batch_tokens=1000)
    lengths, depths, trials = [400], [0.0, 1.0], 3
    samples = []
    for index, depth in enumerate(depths):
        rng = random.Random(f"0:{task}:400:{depth}")
        for t in range(trials):
            sample = build_sample(task, builder, haystack, 400, depth, rng, index + t, options,
                                  options.templates[t % 2])
            given = sample.neighbours[0] if wrong == "neighbour" else min(sample.book_numbers, key=len)
            assert given not in sample.expected
            answer, _ = builder.answer([given], len(sample.prompt_ids))
            samples.append(SimpleNamespace(prompt_ids=sample.prompt_ids, forced_ids=sample.prompt_ids + answer))
    result = evaluate_retrieval(Oracle(samples, tokenizer), tokenizer, haystack, task, lengths, depths, trials, 0,
                                options)
    assert result["accuracy"] == 0.0 and result["misses"] == {wrong: 6}
    assert all(trial["miss"] == wrong for cell in result["cells"] for trial in cell["trials"])
    assert set(result["misses"]) <= set(MISS_KINDS)


def test_book_numbers_are_those_the_prompt_prints(tokenizer, tmp_path):
    """A book with a number in every sentence: the numbers a miss may be "book number" for are those of the book text
    the prompt keeps, not of the window's text past it."""
    (tmp_path / "dense.txt").write_text(" ".join(f"The ledger of year {1000 + i} was closed." for i in range(600)))
    dense = Haystack.from_books(tmp_path / "dense.txt", tokenizer, 4096)
    sample = build_sample("niah", Builder(tokenizer), dense, 400, 0.5, random.Random(0), 0, TaskOptions(), "magic")
    printed = set(NUMBER.findall(tokenizer.decode(sample.prompt_ids)))
    assert len(sample.book_numbers) > 10 and sample.book_numbers <= printed
    assert printed - sample.book_numbers <= set(sample.expected)  # the rest is the needle's value


def test_same_seed_same_prompts_for_every_model(tokenizer, haystack):
    builder = Builder(tokenizer)
    first, second = (build_sample("multikey", builder, haystack, 500, 0.25, random.Random("0:multikey:500:0.25"), 1,
                                  TaskOptions(), "archive") for _ in range(2))
    assert first.prompt_ids == second.prompt_ids and len(set(first.record["keys"])) == 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-retrieval")
    tiny_model("llama", seed=5, vocab_size=49152, max_position_embeddings=1024).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_smoke_of_every_task_writes_results_plots_and_report(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "retrieval", str(model_dir), "--lengths", "256,2048", "--max-length", "1024",
                 "--depths", "0.5", "--trials", "1", "--max-new-tokens", "2", "--out", str(out),
                 "--label", "tiny"]) == 0
    files = []
    for task in TASKS:
        result = json.loads((out / f"{task}-tiny.json").read_text())
        assert {"task", "label", "rope", "context", "haystack_books", "cells", "skipped", "accuracy", "tf_accuracy",
                "depth_curve", "by_length", "per_template", "worst_cell", "plot"} <= set(result)
        assert result["task"] == task and result["context"] == 1024 and len(result["cells"]) == 1
        assert result["skipped"] == [{"length": 2048, "depth": 0.5, "reason": "length 2048 > --max-length 1024"}]
        trial = result["cells"][0]["trials"][0]
        assert {"expected", "answer", "correct", "tf_correct", "needle_depths", "prompt_tokens"} <= set(trial)
        assert trial["prompt_tokens"] == 256
        assert (out / f"{task}-tiny.png").read_bytes()[:4] == b"\x89PNG"
        files.append(str(out / f"{task}-tiny.json"))
    capsys.readouterr()
    assert main(["eval", "report", *files, "--markdown"]) == 0
    report = capsys.readouterr().out
    assert "(niah): exact match (teacher-forced), by length" in report and "| model | 256 | 2k | all |" in report
    assert re.search(r"\| tiny \| \d+% \(\d+%\) \| skipped \| \d+% \(\d+%\) \|", report)
    assert "| model | depth 0.5 | all |" in report
    misses = {task: json.loads((out / f"{task}-tiny.json").read_text()).get("misses") for task in TASKS}
    assert [task for task in TASKS if misses[task] is not None] == ["niah", "multikey", "chat"]
    assert report.count("*what the wrong answers gave (their first number)*") == 3
    wrong = sum(misses["niah"].values())
    assert re.search(rf"\| tiny \| {wrong} \|", report.split("(niah)")[1].split("(multikey)")[0])


@pytest.mark.parametrize("argv, message", [
    (["--depths", "0,1.5"], "depth 1.5 is outside \\[0, 1\\]"),
    (["--lengths", "2048"], "length 2048 is above the model's context 1024 .*--max-length 1024"),
    (["--lengths", "1024", "--haystack", "SHORT"], "needs 1,024 tokens and .* gives [0-9]+ .*more or longer books"),
    (["--templates", "magic,nope"], "unknown evaluation template 'nope'"),
    (["--tasks", "niah,ruler"], "unknown task 'ruler'"),
])
def test_bad_input_fails_with_one_clear_line(model_dir, tmp_path, argv, message, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A short book. It ends here.\n" * 20)
    argv = [str(short) if a == "SHORT" else a for a in argv]
    capsys.readouterr()
    assert main(["eval", "retrieval", str(model_dir), "--trials", "1", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]  # progress bar
    assert "Traceback" not in err and len(lines) == 1, lines
    assert lines[0].startswith("yarnkit: error: ") and re.search(message, lines[0]), lines
