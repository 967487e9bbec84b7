"""Replicate StreamingLLM's learnable-sink-token result (Table 3) at small scale, then test it on SmolLM2-135M.

  # CPU smoke (tiny model, bundled data; ~2 min on 2 cores, ~1 min with --skip-continued):
  python scripts/sink_replication.py --smoke --out runs/sink-smoke
  # GPU (one H200, target <= 9 min; see docs/sink.md):
  python scripts/sink_replication.py --out runs/sink-replication --device cuda \
      --books '/data/books/test_*.txt.gz' --train-data '/data/books/train,python-stdlib'

1. Pretraining from scratch (recipe `sink-pretrain`): a vanilla and a sink-token model with the same data, steps and
   seed (the sink model's sequences are the sink + 1023 text tokens, the vanilla model's 1024 text tokens).
2. Streaming perplexity on PG-19 test books with caches 0+W, 1+(W-1), 2+(W-2), 4+(W-4), W = the training context,
   through the eval suite's streaming task (`yarnkit.eval.stream.evaluate_stream`, runtime `SinkPolicy`, position
   shift inside the cache). A sink-token model gets its sink as the stream's first token (as in training); with
   0 initial tokens it is evicted like any other. Tokens are fed `--chunk` at a time and evicted `--chunk` at a
   time, so each token sees between W-chunk and W keys, identically for every row.
3. Continued training: SmolLM2-135M + a sink token (BOS-initialised), and the same run without it as a control,
   `--cont-steps` steps at W; streamed with 0, 1 and 4 initial tokens, next to SmolLM2 itself.
Outputs in OUT/: results.json, results.md (our table next to the paper's), streaming.png, run dirs, log.txt.
It is not a unit test: it asserts nothing; tests/test_sink.py proves the mechanics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's yarnkit, not an installed one

PAPER = {"vanilla": {0: 27.87, 1: 18.49, 2: 18.05, 4: 18.05}, "sink": {0: 1235, 1: 18.01, 2: 18.01, 4: 18.02}}
SINKS = (0, 1, 2, 4)
CONT_SINKS = (0, 1, 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sink-replication", help="output folder")
    p.add_argument("--device", default="auto", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--books", default="bundled:eval",
                   help="PG-19 test books (folder/file/glob) for streaming (default: the bundled test book)")
    p.add_argument("--train-data", default="bundled:train,python-stdlib",
                   help="data.source for training (default: the bundled novel + the Python stdlib's sources)")
    p.add_argument("--steps", type=int, default=800, help="pretraining steps per model")
    p.add_argument("--cont-steps", type=int, default=200, help="continued-training steps on SmolLM2-135M")
    p.add_argument("--stream-tokens", type=int, default=65536, help="tokens streamed per pretrained model/policy")
    p.add_argument("--cont-stream-tokens", type=int, default=32768, help="tokens streamed per SmolLM2 policy")
    p.add_argument("--chunk", type=int, default=64, help="tokens fed (and evicted) per step")
    p.add_argument("--skip-continued", action="store_true", help="only the from-scratch pretraining comparison")
    p.add_argument("--smoke", action="store_true", help="CPU smoke: tiny model, bundled data, few tokens")
    args = p.parse_args(argv)
    if args.smoke:
        from yarnkit.assets import sample_path

        args.books, args.train_data = str(sample_path("eval")), "bundled:train"
        args.steps, args.cont_steps, args.stream_tokens, args.cont_stream_tokens, args.chunk = 12, 2, 1200, 128, 16
    return args


def pretrain_overrides(args, name: str, sink: bool) -> list[str]:
    items = ["recipe=sink-pretrain", f"run_dir={Path(args.out) / name}", "resume=none",
             f"model.sink_token={str(sink).lower()}", f"data.source={args.train_data}", f"train.max_steps={args.steps}"]
    if args.smoke:
        items += ["model.scratch.layers=2", "model.scratch.hidden=64", "model.scratch.heads=4",
                  "model.scratch.kv_heads=2", "model.scratch.intermediate=128", "model.scratch.context=128",
                  "data.seq_len=128", "data.num_proc=1", "train.micro_batch_size=4", "train.mixed_precision=fp32",
                  "train.loss_chunk_tokens=512", "optim.warmup_steps=3", "train.log_every=10"]
    return items


def continued_overrides(args, name: str, sink: bool) -> list[str]:
    seq = 64 if args.smoke else 1024
    return ["run_dir=" + str(Path(args.out) / name), "resume=none", "model.name_or_path=smollm2-135m",
            f"model.sink_token={str(sink).lower()}", "model.sink_token_init=bos", "model.gradient_checkpointing=false",
            f"data.source={args.train_data}", f"data.seq_len={seq}", f"data.num_proc={1 if args.smoke else 8}",
            "optim.lr=1e-4", "optim.warmup_steps=20" if not args.smoke else "optim.warmup_steps=0",
            f"train.max_steps={args.cont_steps}", f"train.micro_batch_size={2 if args.smoke else 16}",
            "train.grad_accum=1", f"train.mixed_precision={'fp32' if args.smoke else 'bf16'}",
            "train.loss_chunk_tokens=4096", "train.log_every=20", "train.memory_check=false",
            "checkpoint.every=0", "checkpoint.keep_last=1"]


def train_run(overrides: list[str]) -> tuple[str, dict]:
    """Train one recipe; returns (final checkpoint model dir, summary)."""
    from yarnkit.train.checkpoint import latest_checkpoint
    from yarnkit.train.recipe import load_recipe
    from yarnkit.train.trainer import train

    recipe = load_recipe(overrides)
    started = time.perf_counter()
    result = train(recipe)
    seconds = time.perf_counter() - started
    losses = result.losses
    return str(latest_checkpoint(recipe.run_dir) / "model"), {
        "seconds": round(seconds, 1), "steps": result.last_step, "seq_len": recipe.data.seq_len,
        "first_loss": losses.get(min(losses)) if losses else None, "last_loss": losses.get(max(losses)) if losses else None,
        "tokens": result.last_step * recipe.train.micro_batch_size * recipe.train.grad_accum * recipe.data.seq_len}


def load_stream_docs(books: str, tokenizer, limit: int) -> list[tuple[str, list[int]]]:
    """Tokenised test books in sorted order (a glob is allowed) until `limit` tokens are collected."""
    from yarnkit.train.data import local_paths, resolve_source
    from yarnkit.eval.data import iter_eval_documents, tokenize_documents

    documents, total = [], 0
    for path in local_paths(resolve_source(books)):
        for doc in iter_eval_documents(str(path)):
            kept, _ = tokenize_documents([doc], tokenizer, max_tokens=limit - total)
            documents += kept
            total += sum(len(ids) + 1 for _, ids in kept)  # + BOS
            if total >= limit:
                return documents
    return documents


def stream_ppl(model, tokenizer, books: str, sinks_list, window: int, tokens: int, chunk: int) -> dict:
    """{sinks: evaluate_stream result} for caches of `sinks` initial tokens + `window - sinks` recent ones."""
    from yarnkit.eval.ppl import bos_token_id
    from yarnkit.eval.stream import evaluate_stream, token_stream
    from yarnkit.runtime.policy import SinkPolicy

    bos, sink = bos_token_id(tokenizer), getattr(model.config, "yarnkit_sink_token_id", None)
    documents = load_stream_docs(books, tokenizer, tokens)
    out = {}
    for sinks in sinks_list:
        policy = SinkPolicy(sinks=sinks, window=window - sinks, evict_batch=chunk, prefill_chunk=chunk)
        result = evaluate_stream(model, policy, token_stream(documents, bos, sink), bos, tokens, chunk)
        out[sinks] = {k: result[k] for k in ("ppl", "tokens_scored", "ms_per_token", "stop_reason", "segments")}
        print(f"  {sinks}+{window - sinks}: ppl {result['ppl']:.3f}", flush=True)
    return out


def evaluate_model(location: str, args, sinks_list, window: int, tokens: int) -> dict:
    import torch

    from yarnkit.eval.cli import resolve_model
    from yarnkit.models import load_model

    location = resolve_model(location)  # a run dir -> its latest checkpoint's model/
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer = load_model(location, dtype="bfloat16" if device.startswith("cuda") else "float32",
                                  device=device)
    model.eval()
    started = time.perf_counter()
    rows = stream_ppl(model, tokenizer, args.books, sinks_list, window, tokens, args.chunk)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"model": location, "sink_token_id": None, "seconds": round(time.perf_counter() - started, 1),
            "rows": rows}


def markdown(results: dict) -> str:
    window = results["window"]
    lines = [f"### From-scratch pretraining ({results['pretrain']['vanilla']['train']['steps']} steps, "
             f"{results['pretrain']['vanilla']['train']['tokens']:,} tokens, W={window}); streaming PPL",
             "", "| model | " + " | ".join(f"{s}+{window - s}" for s in SINKS) + " |",
             "|---|" + "---|" * len(SINKS)]
    for name in ("vanilla", "sink"):
        rows = results["pretrain"][name]["rows"]
        lines.append(f"| {name} (ours) | " + " | ".join(f"{rows[s]['ppl']:.2f}" for s in SINKS) + " |")
    for name in ("vanilla", "sink"):
        lines.append(f"| {name} (paper, 160M, W=1024) | " + " | ".join(f"{PAPER[name][s]:g}" for s in SINKS) + " |")
    if "continued" in results:
        cont = results["continued"]
        window = cont["window"]
        lines += ["", f"### SmolLM2-135M, continued training ({cont['sink']['train']['steps']} steps, W={window}); "
                  "streaming PPL", "", "| model | " + " | ".join(f"{s}+{window - s}" for s in CONT_SINKS) + " |",
                  "|---|" + "---|" * len(CONT_SINKS)]
        for name, label in (("base", "SmolLM2-135M (no training)"), ("vanilla", "+ continued, no sink token"),
                            ("sink", "+ continued, sink token")):
            rows = cont[name]["rows"]
            lines.append(f"| {label} | " + " | ".join(f"{rows[s]['ppl']:.2f}" for s in CONT_SINKS) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pretrained from scratch", results["pretrain"], SINKS, ("vanilla", "sink"))]
    if "continued" in results:
        panels.append(("SmolLM2-135M continued", results["continued"], CONT_SINKS, ("base", "vanilla", "sink")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, group, sinks, names) in zip(axes[0], panels):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [group[name]["rows"][s]["ppl"] for s in sinks]
            ax.bar([x + i * width for x in range(len(sinks))], values, width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(sinks))],
                      [f"{s}+{group['window'] - s}" for s in sinks])
        ax.set_yscale("log")
        ax.set_xlabel("initial tokens + recent tokens")
        ax.set_ylabel("streaming perplexity (log)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Tee:
    """Print to the terminal and to OUT/log.txt (progress bars stay on stderr)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a", encoding="utf-8")

    def write(self, text):
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, out / "log.txt")
    started = time.perf_counter()
    results = {"args": vars(args), "paper": PAPER, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    pretrain, window = {}, None
    for name, sink in (("vanilla", False), ("sink", True)):
        print(f"== pretrain {name}", flush=True)
        location, summary = train_run(pretrain_overrides(args, f"pretrain-{name}", sink))
        window = summary["seq_len"]
        pretrain[name] = {"train": summary, "window": window}
    for name in ("vanilla", "sink"):
        print(f"== stream {name} (W={window})", flush=True)
        pretrain[name].update(evaluate_model(str(out / f"pretrain-{name}"), args, SINKS, window, args.stream_tokens))
    results["pretrain"] = {**pretrain, "window": window}
    results["window"] = window
    if not args.skip_continued:
        cont = {}
        for name, sink in (("sink", True), ("vanilla", False)):
            print(f"== continued {name}", flush=True)
            _, summary = train_run(continued_overrides(args, f"continued-{name}", sink))
            cont[name] = {"train": summary}
        cont_window = cont["sink"]["train"]["seq_len"]
        cont["base"] = {"train": None}
        for name in ("sink", "vanilla", "base"):
            print(f"== stream continued {name} (W={cont_window})", flush=True)
            location = "smollm2-135m" if name == "base" else str(out / f"continued-{name}")
            cont[name].update(evaluate_model(location, args, CONT_SINKS, cont_window, args.cont_stream_tokens))
        results["continued"] = {**cont, "window": cont_window}
    results["seconds_total"] = round(time.perf_counter() - started, 1)
    for group in (results["pretrain"], results.get("continued", {})):
        for entry in group.values():
            if isinstance(entry, dict) and "model" in entry:
                entry["sink_token_id"] = _sink_id(entry["model"])
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot(results, out / "streaming.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'streaming.png'} "
          f"in {results['seconds_total']:.0f} s\n")
    print(table)
    return 0


def _sink_id(location: str):
    from yarnkit.eval.cli import resolve_model
    from yarnkit.models import load_config

    return getattr(load_config(resolve_model(location)), "yarnkit_sink_token_id", None)


if __name__ == "__main__":
    sys.exit(main())
