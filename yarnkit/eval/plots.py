"""PNG plots of evaluation results (matplotlib, Agg backend): ppl vs length, passkey and retrieval heatmaps with a
depth curve, streaming curves.

Each function takes result dicts as written by `yarnkit eval` (see docs/eval.md) and a path; nothing here runs a
model. Several results on one chart: pass several dicts (the CLI's `--compare` or `yarnkit eval plot`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_ppl(results: list[dict], path) -> Path:
    """Mean (solid) and tail (dashed) perplexity vs context length, one colour per result, log-scaled axes."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, result in enumerate(results):
        rows = [row for row in result["rows"] if "ppl" in row]
        lengths = [row["length"] for row in rows]
        color = f"C{index % 10}"
        axis.plot(lengths, [row["ppl"] for row in rows], "o-", color=color, label=result["label"])
        axis.plot(lengths, [row["tail_ppl"] for row in rows], "x--", color=color, alpha=0.6,
                  label=f"{result['label']} (last quarter)")
        native = result.get("native_context")
        if native and index == 0:
            axis.axvline(native, color="gray", linestyle=":", label=f"native context {native}")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("perplexity")
    axis.set_title("Perplexity vs context length")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _heatmap(axis, result: dict, key: str, title: str):
    """Accuracy heatmap of `cell[key]`: lengths on x, depths on y; skipped cells are blank."""
    lengths = sorted({cell["length"] for cell in result["cells"]} | {s["length"] for s in result["skipped"]})
    depths = sorted({cell["depth"] for cell in result["cells"]} | {s["depth"] for s in result["skipped"]})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for cell in result["cells"]:
        grid[depths.index(cell["depth"])][lengths.index(cell["length"])] = cell[key]
    image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for row, depth_row in enumerate(grid):
        for col, value in enumerate(depth_row):
            if value == value:  # not NaN
                axis.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axis.set_xticks(range(len(lengths)), [str(length) for length in lengths], rotation=45)
    axis.set_yticks(range(len(depths)), [f"{depth:.2f}" for depth in depths])
    axis.set_xlabel("prompt length (tokens)")
    axis.set_ylabel("needle depth")
    axis.set_title(title, fontsize=9)
    return image, lengths, depths


def plot_passkey(result: dict, path) -> Path:
    """Accuracy heatmap: lengths on x, depths on y; skipped cells are blank."""
    lengths = {cell["length"] for cell in result["cells"]} | {s["length"] for s in result["skipped"]}
    depths = {cell["depth"] for cell in result["cells"]} | {s["depth"] for s in result["skipped"]}
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image, _, _ = _heatmap(axis, result, "accuracy", f"{result['task']} accuracy: {result['label']}")
    figure.colorbar(image, ax=axis)
    return _save(figure, path)


def plot_retrieval(result: dict, path) -> Path:
    """A retrieval task: exact-match and teacher-forced heatmaps, and the depth curve (accuracy by depth, one line
    per length; the dashed black line is the teacher-forced mean over lengths)."""
    lengths = sorted({cell["length"] for cell in result["cells"]} | {s["length"] for s in result["skipped"]})
    width = 1.2 + 0.9 * len(lengths)
    figure, axes = plt.subplots(1, 3, figsize=(2 * width + 5, 1.6 + 0.5 * max(len(result["depth_curve"]), 4)))
    image, _, _ = _heatmap(axes[0], result, "accuracy", f"{result['task']}: exact match")
    _heatmap(axes[1], result, "tf_accuracy", "teacher-forced (every key token is the argmax)")
    figure.colorbar(image, ax=axes[1])
    curve = axes[2]
    for index, length in enumerate(sorted({cell["length"] for cell in result["cells"]})):
        cells = sorted((c for c in result["cells"] if c["length"] == length), key=lambda c: c["depth"])
        curve.plot([c["depth"] for c in cells], [c["accuracy"] for c in cells], "o-", color=f"C{index % 10}",
                   label=str(length), alpha=0.8)
    points = result["depth_curve"]
    curve.plot([p["depth"] for p in points], [p["tf_accuracy"] for p in points], "k--", label="teacher-forced mean")
    curve.set_ylim(-0.05, 1.05)
    curve.set_xlabel("needle depth (0 = start of the context)")
    curve.set_ylabel("accuracy")
    curve.set_title("depth curve", fontsize=9)
    curve.legend(fontsize=7)
    curve.grid(alpha=0.3)
    figure.suptitle(result["label"], fontsize=10)
    return _save(figure, path)


def plot_stream(results: list[dict], path) -> Path:
    """Segment perplexity (top) and latency per token (bottom) vs tokens processed, one line per result."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for index, result in enumerate(results):
        ends = [segment["end"] for segment in result["segments"]]
        color = f"C{index % 10}"
        top.plot(ends, [segment["ppl"] for segment in result["segments"]], color=color, label=result["label"])
        bottom.plot(ends, [segment["ms_per_token"] for segment in result["segments"]], color=color)
    top.set_yscale("log")
    top.set_ylabel("perplexity (segment)")
    top.legend(fontsize=7)
    top.grid(alpha=0.3)
    bottom.set_ylabel("ms / token")
    bottom.set_xlabel("tokens processed")
    bottom.grid(alpha=0.3)
    top.set_title("Streaming perplexity and latency")
    return _save(figure, path)
