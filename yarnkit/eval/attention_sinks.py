"""Attention sinks, measured directly: how much attention each layer puts on the first key positions, per
checkpoint of a training run, and the streaming-perplexity table (k initial tokens kept + a rolling window).

- `attention_mass(model, sequences, first=4)`: for each layer, the attention probability on key positions
  0..first-1, averaged over heads, sequences and the query positions i >= first (the same queries for every key
  position, so the numbers are comparable); also, per layer, the share of heads whose mean attention on position
  0 exceeds 0.3: Gu et al. 2024's Sink^0.3_1 metric (they measure it at T = 64; here T is the sequences' length).
  A head with no sink spreads its attention over the context, so its mass on position 0 is ~ln(T)/T (0.7% at
  T = 1024); a sink head puts most of it there. Probabilities come from eager attention (`output_attentions`),
  so the model must be loaded with `attn_implementation="eager"` (`load_checkpoint_model` does).
- `measure_run(run_dir, sequences_for, done)`: `attention_mass` of every complete checkpoint of a run not in
  `done` (its steps), oldest first: the curve of sink formation over training.
- `stream_table(model, tokenizer, documents, window, sinks, tokens, chunk)`: streaming perplexity with `k` initial
  tokens kept and the last `window - k` tokens, for each `k` (StreamingLLM Table 3), through the eval suite's
  `evaluate_stream` and the runtime's `SinkPolicy` (positions counted inside the cache).
- `plot_attention_mass(curves, path, uniform)`: one panel per run, mass on position 0 per layer over training steps
  beside the no-sink level `uniform_mass(T)`;
  `plot_stream_table(tables, paper, window, path)`: the perplexities by k as bars beside the paper's.

Tested by `python -m pytest tests/test_sink_eval.py -q` against a float64 softmax of the model's own q/k.
"""

from __future__ import annotations

from pathlib import Path

import torch

from yarnkit.eval.ppl import bos_token_id
from yarnkit.eval.stream import SinkPolicy, evaluate_stream, token_stream

SINK_THRESHOLD = 0.3  # Gu et al. 2024's epsilon for Sink^eps_1


@torch.no_grad()
def attention_mass(model, sequences: torch.Tensor, first: int = 4) -> dict:
    """`{"mass": [layer][k] (k < first), "sink_heads": [layer]}` over `sequences` [B, T] (T > first)."""
    if sequences.dim() != 2 or sequences.shape[1] <= first:
        raise ValueError(f"attention_mass needs sequences [B, T] with T > {first}, got {tuple(sequences.shape)}")
    device = next(model.parameters()).device
    totals = None
    for row in sequences:  # one at a time: [layers, heads, T, T] probabilities per sequence
        out = model(input_ids=row[None].to(device), output_attentions=True, use_cache=False)
        if not out.attentions or out.attentions[0] is None:
            raise ValueError("the model returned no attention probabilities; load it with attn_implementation='eager'")
        # [layers, heads, first]: mean over queries i >= first of p(i -> k)
        per_head = torch.stack([a[0, :, first:, :first].float().mean(1) for a in out.attentions])
        totals = per_head if totals is None else totals + per_head
    per_head = (totals / len(sequences)).cpu()
    return {"mass": per_head.mean(1).tolist(),
            "sink_heads": (per_head[:, :, 0] > SINK_THRESHOLD).float().mean(1).tolist()}


def load_checkpoint_model(location: str, device: str):
    """A checkpoint's model (HF dir) with eager attention, for `attention_mass`; bf16 on CUDA, float32 elsewhere."""
    from yarnkit.models import load_model

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tokenizer = load_model(location, dtype=dtype, device=device, attn_implementation="eager")
    return model.eval(), tokenizer


def measure_run(run_dir: str | Path, sequences_for, device: str, done: set[int] = frozenset()) -> list[dict]:
    """`[{"step", "mass", "sink_heads"}]` for the run's complete checkpoints whose step is not in `done`.
    `sequences_for(model)` returns the [B, T] token ids to measure that model on (a sink-token model's rows
    start with its sink, as in its training)."""
    from yarnkit.runs import MODEL_DIR, list_checkpoints

    rows = []
    for step, path in list_checkpoints(run_dir):
        if step in done:
            continue
        model, _ = load_checkpoint_model(str(path / MODEL_DIR), device)
        rows.append({"step": step, **attention_mass(model, sequences_for(model))})
        del model
    return rows


def stream_documents(books: str, tokenizer, limit: int) -> list[tuple[str, list[int]]]:
    """Tokenised books (a folder, file or glob; sorted) until `limit` tokens (BOS included) are collected."""
    from yarnkit.eval.documents import iter_eval_documents, tokenize_documents
    from yarnkit.corpus import expand_alias, local_paths

    documents, total = [], 0
    for path in local_paths(expand_alias(books)):
        for doc in iter_eval_documents(str(path)):
            kept, _ = tokenize_documents([doc], tokenizer, max_tokens=limit - total)
            documents += kept
            total += sum(len(ids) + 1 for _, ids in kept)
            if total >= limit:
                return documents
    return documents


def stream_table(model, tokenizer, documents, window: int, sinks: tuple[int, ...], tokens: int,
                 chunk: int) -> dict[int, dict]:
    """`{k: evaluate_stream result}` for caches of `k` initial tokens + the last `window - k` tokens. A model with a
    dedicated sink token gets it as the stream's first token (as in training); with k = 0 it is evicted like any
    other. Tokens are fed and evicted `chunk` at a time, so each one sees between `window - chunk` and `window`
    keys, identically for every k."""
    bos, sink = bos_token_id(tokenizer), getattr(model.config, "yarnkit_sink_token_id", None)
    table = {}
    for k in sinks:
        policy = SinkPolicy(sinks=k, window=window, evict_batch=chunk, prefill_chunk=chunk)  # window: whole cache
        result = evaluate_stream(model, policy, token_stream(documents, bos, sink), bos, tokens, chunk)
        table[k] = {key: result[key] for key in ("ppl", "tokens_scored", "ms_per_token", "stop_reason")}
    return table


def uniform_mass(length: int, first: int = 4) -> float:
    """Mass on position 0 of a head attending evenly to every earlier token (queries i >= first of `length`)."""
    return sum(1 / (i + 1) for i in range(first, length)) / (length - first)


def plot_attention_mass(curves: dict[str, list[dict]], path: str | Path, uniform: float | None = None) -> Path:
    """One panel per run name: attention mass on position 0 (solid, one colour per layer) and on positions 1-3
    (dotted, mean over layers) against the training step, log-scaled; `uniform` (see `uniform_mass`) is drawn as
    the no-sink level, 0.3 as the sink threshold."""
    from yarnkit.eval.plots import _save, plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves) + 2, 4.2), squeeze=False, sharey=True)
    for axis, (name, rows) in zip(axes[0], curves.items()):
        rows = sorted(rows, key=lambda row: row["step"])
        steps = [row["step"] for row in rows]
        layers = len(rows[0]["mass"]) if rows else 0
        colours = plt.cm.viridis([i / max(1, layers - 1) for i in range(layers)])
        for layer in range(layers):
            axis.plot(steps, [max(row["mass"][layer][0], 1e-4) for row in rows], marker="o", ms=3,
                      color=colours[layer], label=f"layer {layer}")
        if rows and len(rows[0]["mass"][0]) > 1:
            later = [sum(sum(m[1:]) for m in row["mass"]) / layers for row in rows]
            axis.plot(steps, later, ls=":", color="black", label="positions 1-3 (sum, mean of layers)")
        axis.axhline(SINK_THRESHOLD, color="red", lw=0.8, ls="--", label="0.3 (sink threshold)")
        if uniform is not None:
            axis.axhline(uniform, color="grey", lw=0.8, ls="-.", label="even attention (no sink)")
        axis.set_title(name)
        axis.set_xlabel("training step")
        axis.set_yscale("log")
        axis.set_ylim(1e-4, 1)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("attention mass on position 0")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(figure, path)


def plot_stream_table(tables: dict[str, dict[int, float]], paper: dict[str, dict[int, float]], window: int,
                      path: str | Path) -> Path:
    """Bars of streaming perplexity by k initial tokens (log scale): ours (left panel) and the paper's (right)."""
    from yarnkit.eval.plots import _save, plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)  # one scale: differences read the same
    for axis, (title, group) in zip(axes, (("ours", tables), ("StreamingLLM Table 3 (160M)", paper))):
        keys = sorted(next(iter(group.values())))
        width = 0.8 / len(group)
        for index, (name, row) in enumerate(group.items()):
            axis.bar([x + index * width for x in range(len(keys))], [row[k] for k in keys], width, label=name)
        axis.set_xticks([x + width * (len(group) - 1) / 2 for x in range(len(keys))],
                        [f"{k}+{window - k}" for k in keys])
        axis.set_yscale("log")
        axis.set_xlabel("initial tokens kept + recent tokens")
        axis.set_ylabel("streaming perplexity (log)")
        axis.set_title(title)
        axis.legend()
    return _save(figure, path)
