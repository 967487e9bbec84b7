"""Where the time of one batched decode step goes (`python -m yarnkit.bench.decode_step`).

What it measures: the decode step of `yarnkit serve`'s loop (`Scheduler._decode`, the very code the server runs)
for 1, 2, 4, 8, 16 sessions that share one `SlotPool`, each a real `Conversation` turn (chat template, prompt
from the bundled book, stop strings and detokenization as served). Stop ids are cleared so every session decodes
every step. Two passes per session count: a plain one (the step time and aggregate tokens/s, nothing wrapped)
and an instrumented one, where a few callables are wrapped to split the step into exclusive host time:

- forward: the pool's step (`SlotPool._step`, or `_replay` for a CUDA graph), device-synchronised;
- to_host: every `Tensor.cpu()` during the step (the logits or token ids going to the host);
- sampling: choosing the next tokens (greedy argmax, or temperature / top-p with a per-session seed), the copy
  of the chosen ids to the host included;
- eviction: `StreamingEngine._make_room` (the sink rule, the kept-slot plan, the in-place move);
- bookkeeping: `StreamingEngine._remember` (slot ids, SirLLM scores, the logits kept for the next token; both
  the batched step and a one-session feed record through it);
- text: the turn's own work (`Turn.next_token` / `accept` / `take_text` less sampling): detokenization, stop
  strings;
- rest: the step's total less all the above (the scheduler's Python, building the step's inputs).

With `--profile FILE`, one more pass per row records one decode step (after the warm-up) with torch.profiler and
FILE gets its kernels by kind (matmul, attention, elementwise, scatter, copies, Inductor), the top kernels, the
launch count and the host gaps (`yarnkit.train.profiling.summary`; on CPU: operators instead of kernels).

The plain pass times the loop as the server runs it: the device is synchronised before the first step and after
the last only, so where the loop queues each step before reading the last one's ids (`--ahead`, on for CUDA by
default as in the server, `scheduler.py`) the host's work overlaps the device's and the step time shows it.

Each phase is reported as its median over the timed steps (a step the OS preempted on a shared machine moves
no median; the phases' medians need not add up to the step's). The instrumented pass synchronises the device
around each forward, so its total is a little above the plain step's on a GPU. Timing only: nothing here
asserts speed.

  python -m yarnkit.bench.decode_step                                  # bundled SmolLM2-135M, CPU, float32
  python -m yarnkit.bench.decode_step --sessions 1 8 --steps 16 --modes greedy --threads 1
  python -m yarnkit.bench.decode_step --device cuda --dtype bfloat16 --window 4096 --prompt 4064 --out runs/ds.json
  python -m yarnkit.bench.decode_step --device cuda --dtype bfloat16 --window 4096 --prompt 4064 --modes greedy \
      --sessions 1 8 16 --decode-attention sdpa split flex          # the pooled step's attention kernels compared
  python -m yarnkit.bench.decode_step --device cuda --dtype bfloat16 --window 4096 --prompt 4064 --modes greedy \
      --sessions 1 8 16 --fuse false true       # unfused vs 4 matmuls per layer + torch.rms_norm (runtime/fused.py)
  python -m yarnkit.bench.decode_step --device cuda --dtype bfloat16 --window 4096 --prompt 4064 --modes greedy \
      --sessions 1 --decode static graph --profile runs/decode-profile.md   # kernels of one step, eager vs graph
  python -m yarnkit.bench.decode_step --device cuda --dtype bfloat16 --window 4096 --prompt 4064 --modes greedy \
      --sessions 1 --compile --profile runs/decode-profile-compiled.md      # what is left after Inductor's fusion
  python -m yarnkit.bench.decode_step --device cuda --dtype bfloat16 --window 4096 --prompt 4064 --modes greedy \
      --sessions 1 8 16 --ahead false true --compile    # the host's work hidden behind the queued step, or not

Each `--fuse` setting runs on the model as loaded: a fuse the runtime made is undone after its rows. Each row says
what ran fused (`fused_projections`, `fused_norms`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from yarnkit.bench.streaming import sync
from yarnkit.runtime import fused
from yarnkit.runtime.options import DECODE_ATTENTION, FUSE
from yarnkit.train.profiling import step_profile, summary

PHASES = ("forward", "to_host", "sampling", "eviction", "bookkeeping", "text", "rest")
MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_p=0.95)}
AHEAD = {"auto": None, "true": True, "false": False}


class PhaseClock:
    """Exclusive wall time per phase, from wrapped callables: a phase nested in another is not counted twice."""

    def __init__(self, device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []

    def wrap(self, phase: str, function, synchronise: bool = False):
        def timed(*args, **kwargs):
            if synchronise:
                sync(self.device)
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                if synchronise:
                    sync(self.device)
                elapsed = time.perf_counter() - start
                self.totals[phase] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed
        return timed

    @contextmanager
    def patched(self, owner, name: str, phase: str, synchronise: bool = False):
        own = vars(owner).get(name)  # None: inherited (a base class's, or the class's for an instance)
        setattr(owner, name, self.wrap(phase, getattr(owner, name), synchronise))
        try:
            yield
        finally:
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def instrument(stack: ExitStack, clock: PhaseClock, pool) -> None:
    """Wrap the callables each phase is made of (see the module docstring); undone when `stack` closes."""
    from yarnkit.runtime import conversation, scheduler
    from yarnkit.runtime.engine import StreamingEngine

    stack.enter_context(clock.patched(pool, "_step", "forward", synchronise=True))
    stack.enter_context(clock.patched(pool, "_replay", "forward", synchronise=True))
    stack.enter_context(clock.patched(torch.Tensor, "cpu", "to_host"))
    stack.enter_context(clock.patched(conversation, "sample", "sampling"))
    stack.enter_context(clock.patched(scheduler, "choose_on_device", "sampling"))
    stack.enter_context(clock.patched(StreamingEngine, "_make_room", "eviction"))
    stack.enter_context(clock.patched(StreamingEngine, "_remember", "bookkeeping"))
    for name in ("next_token", "accept", "take_text"):
        stack.enter_context(clock.patched(conversation.Turn, name, "text"))


def book_prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """`count` passages of about `tokens` tokens from the bundled book, each starting elsewhere (they overlap when
    the book is shorter than all of them together)."""
    from yarnkit.assets import sample_path
    from yarnkit.corpus import read_text

    ids = tokenizer(read_text(sample_path("eval")), add_special_tokens=False)["input_ids"]
    starts = [(i * tokens) % max(1, len(ids) - tokens) for i in range(count)]
    return [tokenizer.decode(ids[start:start + tokens]) for start in starts]


@torch.no_grad()
def measure(model, tokenizer, sessions: int, window: int, prompt_tokens: int, steps: int, warmup: int,
            mode: str, decode: str, decode_attention: str = "auto", fuse: str = "auto",
            profile: bool = False, compile: bool = False, ahead: bool | None = None) -> dict:
    """One session count in one sampling mode: a plain pass, then an instrumented one (fresh turns each), then with
    `profile` a profiled one (the warm-up steps, then one step under torch.profiler: the row's `profile_md`)."""
    from yarnkit.runtime.admission import Job
    from yarnkit.runtime.conversation import Sampling
    from yarnkit.runtime.options import StreamOptions
    from yarnkit.runtime.scheduler import Scheduler

    device = next(model.parameters()).device
    options = StreamOptions(window=window, decode=decode, decode_attention=decode_attention, fuse=fuse,
                            compile=compile)
    scheduler = Scheduler(model, tokenizer, options, rows=sessions, ahead=ahead)
    conversations = [scheduler.sessions.new_conversation() for _ in range(sessions)]
    prompts = book_prompts(tokenizer, sessions, prompt_tokens)

    def start_turns():
        turns = []
        for i, (conversation, text) in enumerate(zip(conversations, prompts)):
            conversation.stop_ids = set()  # every session decodes every step
            sampling = Sampling(max_new_tokens=warmup + steps + 1, seed=1000 + i, **MODES[mode])
            turn = conversation.start([{"role": "user", "content": text}], sampling=sampling)
            while turn.prefilling:
                turn.prefill_step()
            turn.job = Job(None, None, sampling)
            turns.append(turn)
        return turns

    def run(instrumented: bool) -> list[dict]:
        """The first step's row (this width's capture and compile), then one per timed step: its seconds (`total`)
        and, instrumented, each phase's. The plain pass times the loop as the server runs it, the device only
        synchronised before the first step and after the last (a step queued ahead overlaps the host's work)."""
        turns = start_turns()
        rows = []
        sync(device)
        for step in range(warmup + steps):
            clock = PhaseClock(device)
            with ExitStack() as stack:
                if instrumented:
                    instrument(stack, clock, scheduler.pool)
                    sync(device)
                start = time.perf_counter()
                scheduler._decode(turns)
                if instrumented or step == 0:
                    sync(device)
                total = time.perf_counter() - start
            rows.append({**clock.totals, "rest": total - sum(clock.totals.values()), "total": total})
        start = time.perf_counter()
        scheduler._settle()  # the last step's ids
        sync(device)
        rows[-1]["total"] += time.perf_counter() - start
        for turn in turns:
            turn.close()
        return rows[:1] + rows[warmup:]

    def profiled() -> str:
        turns = start_turns()
        for _ in range(warmup):
            scheduler._decode(turns)
        sync(device)
        with step_profile(True) as prof:
            start = time.perf_counter()
            scheduler._decode(turns)
            sync(device)
            wall = time.perf_counter() - start
        scheduler._settle()
        for turn in turns:
            turn.close()
        path = scheduler.stats()["decode_path"] + ("+compile" if scheduler.pool.compiled else "")
        title = (f"decode step: {sessions} session(s), {mode}, {path}, "
                 f"{scheduler.pool.attention}, fused: {fused.parts_label(fused.fused_parts(model))}")
        return summary(prof, wall, title=title)

    try:
        first, *plain = run(False)
        instrumented = run(True)[1:]
        profile_md = profiled() if profile else None
    finally:
        scheduler.close()
    # medians over the steps: a step the OS preempted (a shared machine) does not move them
    split = {phase: 1e3 * statistics.median(row.get(phase, 0.0) for row in instrumented) for phase in PHASES}
    step_ms = 1e3 * statistics.median(row["total"] for row in plain)
    return {"sessions": sessions, "mode": mode, "decode_attention": scheduler.pool.attention,
            **fused.fused_parts(model), "step_ms_p50": step_ms,
            "tokens_per_s": 1e3 * sessions / step_ms,
            "first_step_s": first["total"],  # this width's first step: its capture and compile (cold or cached)
            "instrumented_step_ms_p50": 1e3 * statistics.median(row["total"] for row in instrumented),
            "split_ms_per_step": split, "host_ms_per_step": sum(v for k, v in split.items() if k != "forward"),
            "rerotations": [c.engine.cache.rerotations for c in conversations],
            "decode_path": scheduler.stats()["decode_path"], "compiled": scheduler.pool.compiled,
            "ahead": scheduler.ahead,
            **({"profile_md": profile_md} if profile else {})}


def table(rows: list[dict]) -> str:
    head = f"{'mode':<8} {'attn':<5} {'fused':<17} {'ahead':<5} {'N':>3} {'step ms':>8} {'tok/s':>7} " + \
        " ".join(f"{p:>11}" for p in PHASES) + f" {'host/session':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        split = r["split_ms_per_step"]
        cells = " ".join(f"{split[p]:>11.3f}" for p in PHASES)
        lines.append(f"{r['mode']:<8} {r['decode_attention']:<5} {fused.parts_label(r):<17} {str(r['ahead']):<5} "
                     f"{r['sessions']:>3} {r['step_ms_p50']:>8.2f} "
                     f"{r['tokens_per_s']:>7.1f} {cells} {r['host_ms_per_step'] / r['sessions']:>12.3f}")
    note = "(phases: median ms per step, exclusive; host/session: ms of non-forward time per session)"
    return "\n".join(lines + [note])


def main(argv=None) -> int:
    from yarnkit.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--decode", nargs="+", default=["auto"], choices=["auto", "static", "graph"],
                   help="decode paths to compare (auto: graph on CUDA, static elsewhere)")
    p.add_argument("--decode-attention", nargs="+", default=["auto"], choices=DECODE_ATTENTION,
                   help="attention kernels of the pooled step to compare, each at every session count (auto: "
                        "the runtime's choice; each row names the kernel that ran)")
    p.add_argument("--fuse", nargs="+", default=["auto"], choices=FUSE,
                   help="the runtime's fuse (q/k/v and gate/up projections, RMSNorms as torch.rms_norm), each "
                        "setting at every session count (auto: on for the static/graph paths; each row says what "
                        "was fused)")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--window", type=int, default=256, help="cache tokens per session (sinks included)")
    p.add_argument("--prompt", type=int, default=232, help="prompt tokens per session (with the template the "
                   "cache is nearly full: decoding evicts)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per pass")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own); 1 on "
                   "a shared machine, where a parallel op waits for a busy core")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--compile", action="store_true", help="torch.compile the pooled step (CUDA: inside the graph; "
                   "ignored on CPU, where rows say compiled: false), as chat/serve --compile")
    p.add_argument("--ahead", nargs="+", default=["auto"], choices=["auto", "true", "false"],
                   help="the server's loop queuing each step before it reads the last one's ids, each setting at "
                        "every session count (auto: on for CUDA, as the server runs)")
    p.add_argument("--profile", default=None, help="also profile one step per row with torch.profiler and write the "
                   "kernel breakdowns to this markdown file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    rows = []
    for mode in args.modes:
        for decode in args.decode:
            for kernel in args.decode_attention:
                for fuse in args.fuse:
                    for ahead in args.ahead:
                        for sessions in args.sessions:
                            rows.append(measure(model, tokenizer, sessions, args.window, args.prompt, args.steps,
                                                args.warmup, mode, decode, kernel, fuse, profile=bool(args.profile),
                                                compile=args.compile, ahead=AHEAD[ahead]))
                            print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile_md"}), flush=True)
                    fused.unfuse(model)  # the next setting starts from the model as loaded
    if args.profile:
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
        Path(args.profile).write_text("\n".join(row.pop("profile_md") for row in rows))
    report = {"model": args.model, "device": args.device, "dtype": args.dtype, "window": args.window,
              "steps": args.steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
