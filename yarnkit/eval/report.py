"""Turn `yarnkit eval` result JSONs into markdown tables (for docs/results.md); pure functions, no model.

One table per task: `ppl` (rows: labels, columns: lengths, cells: mean ppl with last-quarter ppl in
parentheses), `passkey`/`needle` (accuracy per length, averaged over depths), `stream` (ppl, latency, memory,
stop reason), and for the retrieval tasks (niah, multikey, ...) exact match with teacher-forced accuracy in
parentheses, by length and by depth (the depth curve), and for one-answer tasks what the wrong answers gave (miss
kinds, `yarnkit.eval.retrieval.miss_kind`). Skipped lengths show as "skipped".
CLI: `yarnkit eval report RESULTS... --markdown`.
"""

from __future__ import annotations

import json
from pathlib import Path

from yarnkit.errors import BadValue, NotFound


def load_results(paths) -> list[dict]:
    """Result JSONs written by `yarnkit eval`; a missing, unreadable or foreign file fails naming it."""
    results = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"result file not found: {path}", "pass JSON files written by yarnkit eval (OUT/TASK-LABEL.json)")
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadValue(f"{path} is not JSON ({error})", "pass JSON files written by yarnkit eval") from error
        known = [*TABLES, *RETRIEVAL_CAPTIONS]
        if not isinstance(result, dict) or result.get("task") not in known:
            raise BadValue(f"{path} is not a yarnkit eval result (no 'task' field naming one of {', '.join(known)})",
                           "pass JSON files written by yarnkit eval")
        results.append(result)
    return results


def _fmt(value: float) -> str:
    return "inf" if value == float("inf") else (f"{value:.3g}" if value >= 100 else f"{value:.2f}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ppl_table(results: list[dict]) -> str:
    lengths = sorted({row["length"] for result in results for row in result["rows"]})
    rows = []
    for result in results:
        by_length = {row["length"]: row for row in result["rows"]}
        cells = []
        for length in lengths:
            row = by_length.get(length)
            cells.append("" if row is None else "skipped" if "ppl" not in row
                         else f"{_fmt(row['ppl'])} ({_fmt(row['tail_ppl'])})")
        rows.append([result["label"], *cells])
    return _table(["model", *[f"{length // 1024}k" if length % 1024 == 0 else str(length) for length in lengths]],
                  rows)


def passkey_table(results: list[dict]) -> str:
    lengths = sorted({cell["length"] for result in results for cell in result["cells"] + result["skipped"]})
    rows = []
    for result in results:
        cells = []
        for length in lengths:
            scored = [cell["accuracy"] for cell in result["cells"] if cell["length"] == length]
            cells.append(f"{100 * sum(scored) / len(scored):.0f}%" if scored else "skipped")
        rows.append([result["label"], *cells])
    return _table(["model", *[str(length) for length in lengths]], rows)


def stream_table(results: list[dict]) -> str:
    rows = [[r["label"], r["policy"], str(r["tokens_processed"]), _fmt(r["ppl"]) if r["ppl"] else "-",
             f"{r['ms_per_token']:.2f}" if r["ms_per_token"] else "-",
             f"{r['peak_memory_bytes'] / 2**30:.2f} GiB", r["stop_reason"]] for r in results]
    return _table(["model", "policy", "tokens", "ppl", "ms/token", "peak memory", "stopped because"], rows)


def _pair(cells: list[dict]) -> str:
    if not cells:
        return "skipped"
    exact = sum(c["accuracy"] for c in cells) / len(cells)
    forced = sum(c["tf_accuracy"] for c in cells) / len(cells)
    return f"{100 * exact:.0f}% ({100 * forced:.0f}%)"


def retrieval_table(results: list[dict], by: str = "length") -> str:
    """Exact match (teacher-forced) of one retrieval task per result, by length or by depth."""
    keys = sorted({cell[by] for result in results for cell in result["cells"] + result["skipped"]})
    rows = [[result["label"], *[_pair([c for c in result["cells"] if c[by] == key]) for key in keys],
             _pair(result["cells"])] for result in results]
    names = [f"{key // 1024}k" if by == "length" and key % 1024 == 0 else str(key) for key in keys]
    return _table(["model", *[f"{by} {name}" if by == "depth" else name for name in names], "all"], rows)


def misses_table(results: list[dict]) -> str:
    """What the wrong answers of a one-answer retrieval task gave, per model: counts per miss kind."""
    kinds = list(dict.fromkeys(kind for result in results for kind in result.get("misses", {})))  # as recorded
    rows = [[result["label"], str(sum(result.get("misses", {}).values())),
             *[str(result.get("misses", {}).get(kind, 0)) for kind in kinds]] for result in results]
    return _table(["model", "misses", *kinds], rows)


TABLES = {"ppl": ppl_table, "passkey": passkey_table, "needle": passkey_table, "stream": stream_table}
CAPTIONS = {"ppl": "Perplexity vs context length: mean (last quarter), token-weighted",
            "passkey": "Passkey retrieval accuracy (mean over depths)",
            "needle": "Needle-in-a-book retrieval accuracy (mean over depths)",
            "stream": "Streaming perplexity"}
RETRIEVAL_CAPTIONS = {"niah": "single needle", "multikey": "multi-key (distractors of the same form)",
                      "multivalue": "multi-value", "multiquery": "multi-query", "vt": "variable tracking",
                      "chat": "single needle through the chat template"}


def markdown_report(results: list[dict]) -> str:
    sections = []
    for task, make_table in TABLES.items():
        chosen = [result for result in results if result["task"] == task]
        if chosen:
            sections.append(f"**{CAPTIONS[task]}**\n\n{make_table(chosen)}\n")
    for task, caption in RETRIEVAL_CAPTIONS.items():
        chosen = [result for result in results if result["task"] == task]
        if chosen:
            sections.append(f"**Retrieval, {caption} ({task}): exact match (teacher-forced), by length**\n\n"
                            f"{retrieval_table(chosen)}\n\n*by depth (0 = start of the context)*\n\n"
                            f"{retrieval_table(chosen, 'depth')}\n")
            if any("misses" in result for result in chosen):
                sections.append(f"*what the wrong answers gave (their first number)*\n\n{misses_table(chosen)}\n")
    return "\n".join(sections)
