"""The extended model's targets read from result dicts (yarnkit/bench/targets.py).
Run: python -m pytest tests/test_bench_targets.py
"""

from yarnkit.bench.targets import context_targets, targets_markdown

LENGTHS, DEPTHS = [2048, 8192, 65536], [0.0, 0.5, 1.0]


def grid(accuracy, keys=4, templates=("magic", "archive"), skip=()):
    cells = [{"length": n, "depth": d, "accuracy": accuracy(n, d), "tf_accuracy": 1.0,
              "trials": [{"template": templates[i % len(templates)]} for i in range(keys)]}
             for n in LENGTHS for d in DEPTHS if (n, d) not in skip]
    return {"cells": cells, "settings": {"distractors": 3}}


def ppl(values):
    return {"rows": [{"length": n, "ppl": v} for n, v in zip(LENGTHS, values)]}


def results(niah, multikey=0.9, chat=0.9, base_chat=0.8, tuned_ppl=(23.0, 22.5, 24.0), base_ppl=(23.3, 25.8, 900)):
    return {("niah", "tuned"): niah, ("multikey", "tuned"): grid(lambda n, d: multikey),
            ("chat", "tuned"): grid(lambda n, d: chat), ("chat", "base"): grid(lambda n, d: base_chat),
            ("ppl", "tuned"): ppl(tuned_ppl), ("ppl", "base"): ppl(base_ppl)}


def test_all_targets_met_and_each_one_failing_on_its_own():
    met = context_targets(results(grid(lambda n, d: 1.0)), LENGTHS, DEPTHS, 8192)
    assert [t["met"] for t in met] == [True] * 5
    assert met[0]["measured"].startswith("9 of 9 cells >= 90%") and "magic" in met[0]["measured"]
    checks = [
        (results(grid(lambda n, d: 0.75 if (n, d) == (65536, 0.5) else 1.0)), 0, "worst 75% at 64k, depth 0.5"),
        (results(grid(lambda n, d: 1.0, keys=3)), 0, "3 keys per cell"),
        (results(grid(lambda n, d: 1.0, templates=("magic",))), 0, "templates magic"),
        (results(grid(lambda n, d: 1.0, skip={(2048, 0.0)})), 0, "8 of 9 cells"),
        (results(grid(lambda n, d: 1.0), multikey=0.75), 1, "75%"),
        (results(grid(lambda n, d: 1.0), chat=0.7, base_chat=0.6), 2, "64k: 70%"),
        (results(grid(lambda n, d: 1.0), base_chat=0.95), 2, "2k: 90% vs base 95%"),
        (results(grid(lambda n, d: 1.0), tuned_ppl=(23.0, 22.5, 26.0)), 3, "26.00 vs 25.80"),
        (results(grid(lambda n, d: 1.0), tuned_ppl=(24.1, 22.5, 24.0)), 4, "+3.4%"),
    ]
    for rows, index, words in checks:
        row = context_targets(rows, LENGTHS, DEPTHS, 8192)[index]
        assert row["met"] is False and words in row["measured"], (index, row)


def test_missing_results_are_unmeasured_not_failed():
    rows = context_targets({}, LENGTHS, DEPTHS, 8192)
    assert [t["met"] for t in rows] == [None] * 5
    assert targets_markdown(rows).count("| - | - |") == 5
