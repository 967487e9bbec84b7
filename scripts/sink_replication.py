"""Pretrain a vanilla and a sink-token Llama from scratch until attention sinks form, then compare them as in
StreamingLLM's Table 3 (docs/sink.md, docs/results.md §5). Rerunnable and resumable: run it again with the same
--out and both runs continue from their last complete checkpoints (a larger --steps trains them further).

  # CPU smoke (tiny model, bundled data; ~1 min on 2 cores):
  python scripts/sink_replication.py --smoke --out runs/sink-smoke
  # one H200: as many steps as fit 300 s of training for both models together (docs/results.md §5):
  python scripts/sink_replication.py --out runs/sink --device cuda --books 'BOOKS/test/*.txt.gz' \\
      --train-data BOOKS/train,python-stdlib,TORCH_SOURCES --train-seconds 300
  # the same runs, 1000 more steps each:
  python scripts/sink_replication.py --out runs/sink --device cuda ... --steps 4000

1. Vanilla (recipe sink-pretrain, model.sink_token=false: 1024 text tokens per sequence, documents joined with
   BOS/EOS before chunking, so position 0 holds an arbitrary token) trains through its warmup; its measured step
   time then fixes the step count that fits --train-seconds for both models (or --steps), kept in OUT/plan.json.
   The sink-token model (<|sink|> + 1023 text tokens) trains the same steps on the same data with the same seed.
2. Attention mass on key positions 0-3, per layer, at every checkpoint of both runs (yarnkit.eval.attention_sinks) on
   windows of the evaluation books: OUT/attention_mass.jsonl and attention_mass.png.
3. Streaming perplexity on the first --stream-tokens tokens of the sorted books with k = 0, 1, 2, 4 initial tokens
   kept + the last W - k (W = the training context), fed and evicted --chunk tokens at a time.
4. OUT/results.json, results.md (our tables beside the paper's, each target met or not), streaming.png.
It asserts nothing: tests/test_sink.py and tests/test_sink_eval.py test the mechanics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from yarnkit.eval.attention_sinks import load_checkpoint_model, measure_run, plot_attention_mass, plot_stream_table, \
    stream_documents, stream_table, uniform_mass
from yarnkit.runs import latest_checkpoint, model_location
from yarnkit.train.metrics import METRICS_FILE, read_metrics
from yarnkit.train.recipe import load_recipe
from yarnkit.train.trainer import train

PAPER = {"vanilla": {0: 27.87, 1: 18.49, 2: 18.05, 4: 18.05}, "sink": {0: 1235, 1: 18.01, 2: 18.01, 4: 18.02}}
SINKS = (0, 1, 2, 4)
RUNS = {"vanilla": False, "sink": True}  # run name -> model.sink_token
SMOKE = ["model.scratch.layers=2", "model.scratch.hidden=64", "model.scratch.heads=4", "model.scratch.kv_heads=2",
         "model.scratch.intermediate=128", "model.scratch.context=128", "model.compile_layers=false",
         "data.seq_len=128", "data.num_proc=1", "train.micro_batch_size=4", "train.mixed_precision=fp32",
         "train.loss_chunk_tokens=512", "optim.warmup_steps=4", "train.log_every=2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sink-replication", help="output folder (run dirs, results); reruns resume")
    p.add_argument("--device", default="auto", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--books", default="bundled:eval", help="evaluation books (folder/file/glob; default: the bundled "
                                                           "test book); never training data")
    p.add_argument("--train-data", default="bundled:train,python-stdlib", help="data.source of both runs")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="wall time for training both models (data, checkpoints included; default 300); sets the steps")
    p.add_argument("--steps", type=int, default=0, help="train both runs to this step instead (0: from the budget)")
    p.add_argument("--points", type=int, default=8, help="checkpoints (attention measurements) per run")
    p.add_argument("--stream-tokens", type=int, default=65536, help="tokens streamed per model and k")
    p.add_argument("--chunk", type=int, default=64, help="tokens fed (and evicted) per streaming step")
    p.add_argument("--attention-windows", type=int, default=8, help="windows of W tokens for the attention mass")
    p.add_argument("--num-proc", type=int, default=8, help="tokenizer processes (data.num_proc)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke: tiny model, bundled data, 12 steps, few tokens")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for both runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.books, args.train_data = "bundled:eval", "bundled:train"
        args.steps = args.steps or (0 if args.train_seconds else 12)
        args.points, args.stream_tokens, args.chunk, args.attention_windows = 3, 1200, 16, 2
        args.overrides = SMOKE + args.overrides
        args.num_proc = 1
    args.train_seconds = args.train_seconds or 300.0
    return args


def run_overrides(args, name: str, steps: int, every: int) -> list[str]:
    return ["recipe=sink-pretrain", f"run_dir={Path(args.out) / name}", "resume=auto",
            f"model.sink_token={str(RUNS[name]).lower()}", f"data.source={args.train_data}",
            f"data.num_proc={args.num_proc}", f"train.max_steps={steps}", f"checkpoint.every={every}",
            f"checkpoint.keep_last={args.points + 2}"] + list(args.overrides)


def train_to(args, name: str, steps: int, every: int) -> float:
    """Train (or continue) run `name` to `steps`; returns the wall seconds spent."""
    started = time.perf_counter()
    print(f"== train {name} to step {steps}", flush=True)
    train(load_recipe(run_overrides(args, name, steps, every)))
    return time.perf_counter() - started


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []


def make_plan(args, out: Path) -> dict:
    """The steps of both runs: --steps, or the warmup plus what the measured pace fits in --train-seconds."""
    path = out / "plan.json"
    plan = json.loads(path.read_text()) if path.is_file() else None
    if plan is not None and args.steps <= plan["steps"]:
        return plan
    warmup = load_recipe(run_overrides(args, "vanilla", 1, 0)).optim.warmup_steps
    if args.steps:
        plan = {"steps": args.steps, "how": "--steps", "seconds": plan["seconds"] if plan else {}}
    else:  # the warmup's steps (and the LR) do not depend on the total: train them, then size the rest
        first = train_to(args, "vanilla", warmup, 0)
        rows = metrics(out / "vanilla")
        pace = statistics.median(r["step_seconds"] for r in rows[len(rows) // 2:])  # after compilation
        checkpoint_cost, resume_cost = 2.0, 10.0  # seconds per checkpoint, per relaunch (estimates)
        room = args.train_seconds - 2 * first - resume_cost - 2 * args.points * checkpoint_cost
        steps = warmup + max(0, int(room / (2 * pace)))
        plan = {"steps": steps, "how": f"--train-seconds {args.train_seconds:g}: warmup {warmup} steps took "
                f"{first:.0f} s (build, data and first steps included), then {pace * 1000:.1f} ms/step",
                "seconds": {"vanilla": first}}
    plan["every"] = max(1, -(-plan["steps"] // args.points))  # the last checkpoint is the final step
    path.write_text(json.dumps(plan, indent=1))
    return plan


def summary(run_dir: Path, seconds: float) -> dict:
    recipe = load_recipe([f"recipe={latest_checkpoint(run_dir) / 'recipe.yaml'}"])
    rows, step = metrics(run_dir), json.loads((latest_checkpoint(run_dir) / "state" / "trainer_state.json")
                                              .read_text())["step"]
    late = rows[len(rows) // 2:]
    return {"steps": step, "tokens": step * recipe.train.micro_batch_size * recipe.train.grad_accum
            * recipe.data.seq_len, "seconds": round(seconds, 1), "seq_len": recipe.data.seq_len,
            "last_loss": rows[-1]["loss"] if rows else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in late) if late else None,
            "mfu": statistics.median(r["mfu"] for r in late) if late else None}


def windows_for(documents, bos: int, window: int, count: int):
    """`sequences_for(model)`: `count` windows of `window` tokens from the stream (vanilla: text from an arbitrary
    point, as in training; a sink-token model: its sink + window - 1 text tokens)."""
    import torch

    stream = [t for _, ids in documents for t in [bos] + ids]
    step = max(window, (len(stream) - window) // max(1, count))
    starts = [i * step for i in range(count) if i * step + window <= len(stream)]

    def sequences_for(model):
        sink = getattr(model.config, "yarnkit_sink_token_id", None)
        rows = [stream[s:s + window] if sink is None else [sink] + stream[s:s + window - 1] for s in starts]
        return torch.tensor(rows)

    return sequences_for


def targets(results: dict) -> list[dict]:
    """The replication's targets, each with the measured values and met or not."""
    v, s = (results["stream"][name] for name in ("vanilla", "sink"))
    mass = [layer[0] for layer in results["attention"]["vanilla"][-1]["mass"]][1:]  # layers above the first
    strong = sum(m >= 0.3 for m in mass)
    rows = [("sinks formed in vanilla: ppl(0) >= 1.2 x ppl(4)", v[0] / v[4], v[0] >= 1.2 * v[4]),
            ("sinks formed in vanilla: mass on position 0 >= 30% in most layers above the first",
             f"{strong}/{len(mass)} layers", strong > len(mass) / 2),
            ("one sink is enough with the sink token: ppl(1) <= 1.01 x ppl(4)", s[1] / s[4], s[1] <= 1.01 * s[4]),
            ("vanilla needs more than one: ppl(1) >= 1.02 x ppl(4) (paper 1.024)", v[1] / v[4], v[1] >= 1.02 * v[4]),
            ("no quality cost: sink ppl(4) <= 1.01 x vanilla ppl(4)", s[4] / v[4], s[4] <= 1.01 * v[4])]
    return [{"target": t, "measured": m if isinstance(m, str) else round(m, 4), "met": bool(ok)} for t, m, ok in rows]


def markdown(results: dict) -> str:
    train_v, window = results["train"]["vanilla"], results["window"]
    lines = [f"### Streaming perplexity ({train_v['steps']} steps, {train_v['tokens'] / 1e6:.0f}M tokens per model, "
             f"W={window}, {results['args']['stream_tokens']:,} tokens)", "",
             "| model | " + " | ".join(f"{k}+{window - k}" for k in SINKS) + " |", "|---|" + "---|" * len(SINKS)]
    for name in RUNS:
        lines.append(f"| {name} (ours) | " + " | ".join(f"{results['stream'][name][k]:.2f}" for k in SINKS) + " |")
    for name in RUNS:
        lines.append(f"| {name} (paper, 160M, W=1024) | " + " | ".join(f"{PAPER[name][k]:g}" for k in SINKS) + " |")
    lines += ["", "### Attention on the first positions at the last step (mean over heads and queries)", "",
              "| layer | " + " | ".join(f"{n}: pos 0 | {n}: pos 1-3 | {n}: heads > 0.3" for n in RUNS) + " |",
              "|---|" + "---|" * 3 * len(RUNS)]
    finals = {name: results["attention"][name][-1] for name in RUNS}
    for layer in range(len(finals["vanilla"]["mass"])):
        cells = []
        for name in RUNS:
            mass = finals[name]["mass"][layer]
            cells += [f"{mass[0]:.3f}", f"{sum(mass[1:]):.3f}", f"{finals[name]['sink_heads'][layer]:.2f}"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "### Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {row['target']} | {row['measured']} | {'yes' if row['met'] else 'no'} |"
              for row in results["targets"]]
    return "\n".join(lines) + "\n"


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
    import torch

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, out / "log.txt")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    started = time.perf_counter()
    plan = make_plan(args, out)
    seconds = dict(plan.get("seconds", {}))
    for name in RUNS:
        seconds[name] = seconds.get(name, 0.0) + train_to(args, name, plan["steps"], plan["every"])
    plan["seconds"] = seconds
    (out / "plan.json").write_text(json.dumps(plan, indent=1))

    model, tokenizer = load_checkpoint_model(model_location(str(out / "vanilla")), device)
    window, parameters = model.config.max_position_embeddings, sum(p.numel() for p in model.parameters())
    documents = stream_documents(args.books, tokenizer, args.stream_tokens)
    sequences_for = windows_for(documents, tokenizer.bos_token_id, window, args.attention_windows)
    del model
    attention_path = out / "attention_mass.jsonl"
    rows = [json.loads(line) for line in attention_path.read_text().splitlines()] if attention_path.is_file() else []
    for name in RUNS:
        print(f"== attention mass {name}", flush=True)
        done = {row["step"] for row in rows if row["run"] == name}
        rows += [{"run": name, **row} for row in measure_run(out / name, sequences_for, device, done)]
    attention_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    curves = {name: sorted((r for r in rows if r["run"] == name), key=lambda r: r["step"]) for name in RUNS}
    plot_attention_mass(curves, out / "attention_mass.png", uniform_mass(window))

    stream = {}
    for name in RUNS:
        print(f"== stream {name} (W={window})", flush=True)
        model, tokenizer = load_checkpoint_model(model_location(str(out / name)), device)
        table = stream_table(model, tokenizer, documents, window, SINKS, args.stream_tokens, args.chunk)
        stream[name] = {k: row["ppl"] for k, row in table.items()}
        print("  " + ", ".join(f"{k}+{window - k}: {ppl:.3f}" for k, ppl in stream[name].items()), flush=True)
        del model
    results = {"args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "plan": plan,
               "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "window": window,
               "parameters": parameters, "train": {name: summary(out / name, seconds[name]) for name in RUNS},
               "stream": stream,
               "attention": curves, "paper": PAPER}
    results["targets"] = targets(results)
    results["seconds_this_call"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot_stream_table({name: stream[name] for name in RUNS}, PAPER, window, out / "streaming.png")
    print(f"\nwrote {out}/results.json, results.md, attention_mass.png, streaming.png "
          f"in {results['seconds_this_call']:.0f} s\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
