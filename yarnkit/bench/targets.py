"""The targets an extended model must meet, read from `yarnkit eval` results; pure functions, no model.

`context_targets(results, ...)` takes the result dicts by (task, role), role "base" (the unscaled model) or "tuned"
(the fine-tuned one), and returns one row per target: `target`, `measured` (the numbers, in words), `met` (True,
False, or None when a result it needs is missing). The targets:
- single needle (`niah`) >= 90% in every (length, depth) cell of the required grid, with >= 4 keys per cell and
  >= 2 evaluation templates (which training never sees, by yarnkit/needles.py);
- multi-key >= 80% at the longest length;
- chat-template needle >= 85% at the longest length, and at every length up to the native context no worse than
  the base model's;
- perplexity at the longest length <= the base model's at its native context;
- perplexity at the shortest length <= 1.03 x the base model's.
Used by scripts/e2e.py (summary.json `targets`); tested in tests/test_bench_targets.py.
"""

from __future__ import annotations


def _accuracy(result: dict | None, length: int) -> float | None:
    cells = [c for c in (result or {}).get("cells", []) if c["length"] == length]
    return sum(c["accuracy"] for c in cells) / len(cells) if cells else None


def _ppl(result: dict | None, length: int) -> float | None:
    return next((row.get("ppl") for row in (result or {}).get("rows", []) if row["length"] == length), None)


def _k(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def needle_target(niah: dict | None, lengths: list[int], depths: list[float], threshold: float = 0.9) -> dict:
    row = {"target": f"single needle >= {threshold:.0%} in every (length, depth) cell, {_k(min(lengths))}-"
                     f"{_k(max(lengths))}, depths {','.join(f'{d:g}' for d in depths)}, >= 4 keys per cell, "
                     ">= 2 templates never used in training", "measured": None, "met": None}
    if not niah:
        return row
    cells = {(c["length"], c["depth"]): c for c in niah["cells"]}
    missing = [(n, d) for n in lengths for d in depths if (n, d) not in cells]
    grid = [cells[(n, d)] for n in lengths for d in depths if (n, d) in cells]
    keys = min((len(c["trials"]) for c in grid), default=0)
    templates = {t["template"] for c in grid for t in c["trials"]}
    low = [c for c in grid if c["accuracy"] < threshold]
    worst = min(grid, key=lambda c: c["accuracy"], default=None)
    row["measured"] = (f"{len(grid) - len(low)} of {len(lengths) * len(depths)} cells >= {threshold:.0%}; worst "
                       f"{worst['accuracy']:.0%} at {_k(worst['length'])}, depth {worst['depth']:g} "
                       f"(teacher-forced {worst['tf_accuracy']:.0%}); {keys} keys per cell, templates "
                       f"{','.join(sorted(templates))}" if worst else "no cells")
    row["met"] = not missing and not low and keys >= 4 and len(templates) >= 2
    return row


def context_targets(results: dict[tuple[str, str], dict | None], lengths: list[int], depths: list[float],
                    native: int, ppl_lengths: list[int] | None = None) -> list[dict]:
    """The five rows described in the module docstring (`lengths`: the retrieval grid's; `ppl_lengths`: the
    perplexity lengths, default the same)."""
    longest = max(lengths)
    tuned = {task: results.get((task, "tuned")) for task in ("ppl", "niah", "multikey", "chat")}
    base = {task: results.get((task, "base")) for task in ("ppl", "chat")}
    rows = [needle_target(tuned["niah"], lengths, depths)]
    multikey = _accuracy(tuned["multikey"], longest)
    rows.append({"target": f"multi-key (>= 3 distractors) >= 80% at {_k(longest)}",
                 "measured": None if multikey is None else
                 f"{multikey:.0%} (distractors: {tuned['multikey']['settings'].get('distractors')})",
                 "met": None if multikey is None else multikey >= 0.8})
    chat_long = _accuracy(tuned["chat"], longest)
    short = [n for n in lengths if n <= native]
    pairs = [(n, _accuracy(tuned["chat"], n), _accuracy(base["chat"], n)) for n in short]
    known = chat_long is not None and all(t is not None and b is not None for _, t, b in pairs)
    rows.append({"target": f"chat-template needle >= 85% at {_k(longest)}, and at {_k(min(short))}-{_k(max(short))}"
                           " no worse than the base model" if short else "chat-template needle >= 85%",
                 "measured": None if not known else f"{_k(longest)}: {chat_long:.0%}; " + ", ".join(
                     f"{_k(n)}: {t:.0%} vs base {b:.0%}" for n, t, b in pairs),
                 "met": None if not known else chat_long >= 0.85 and all(t >= b for _, t, b in pairs)})
    ppl_lengths = ppl_lengths or lengths
    long_ppl, base_native = _ppl(tuned["ppl"], max(ppl_lengths)), _ppl(base["ppl"], native)
    shortest = min(ppl_lengths)
    rows.append({"target": f"perplexity at {_k(max(ppl_lengths))} <= the base model's at {_k(native)}",
                 "measured": None if None in (long_ppl, base_native) else f"{long_ppl:.2f} vs {base_native:.2f}",
                 "met": None if None in (long_ppl, base_native) else long_ppl <= base_native})
    short_ppl, base_short = _ppl(tuned["ppl"], shortest), _ppl(base["ppl"], shortest)
    rows.append({"target": f"perplexity at {_k(shortest)} <= 1.03 x the base model's",
                 "measured": None if None in (short_ppl, base_short) else
                 f"{short_ppl:.2f} vs {base_short:.2f} ({short_ppl / base_short - 1:+.1%})",
                 "met": None if None in (short_ppl, base_short) else short_ppl <= 1.03 * base_short})
    return rows


def targets_markdown(rows: list[dict]) -> str:
    return "| target | measured | met |\n|---|---|---|\n" + "".join(
        f"| {t['target']} | {t['measured'] or '-'} | {'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |\n"
        for t in rows)
