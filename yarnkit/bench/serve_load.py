"""`yarnkit serve` under load, as a client sees it (`python -m yarnkit.bench.serve_load`).

What it measures: a `yarnkit serve` process (started here on 127.0.0.1, a free port) answering N concurrent
streaming chat requests of the official `openai` client (stream=True, greedy, a fixed `--max-tokens`), for each
N in `--streams`. Per stream: the time to first token (TTFT: request sent -> first chunk with text; the empty role
chunk the server sends once the prompt is accepted does not count) and every gap between chunks with text (a
chunk is one token as a rule; one that held back a stop prefix or half a character carries more:
`completion_tokens` against `chunks` says how many). Each N runs twice: alone, and with one long prompt
(`--long-tokens` of the bundled book, default 30,000) sent once every short stream has its first token.

The long prompt is a real prefill: it is longer than the window, so the server runs with `--over-window truncate`,
which feeds ALL of it through the cache a chunk at a time between decode steps (128 tokens while others decode,
512 when none does), evicting as it goes, and answers from its end. Its `prompt_tokens`, `cached_tokens` (0:
nothing reused) and the server's truncation notice are recorded. A `--window` at least as long as the prompt
makes it one context instead, at a price every stream pays: each cache row of the pool has `--window` slots.

Reported per case: TTFT p50 / p90 / p99, gap p50 / p99 / max, the short streams' aggregate tokens/s (completion
tokens over the time from the first request sent to the last stream's end); with the long prompt, its own TTFT and
the short streams' gaps that overlap its prefill (from its request to its first token): count, p50, p99, max.
Percentiles interpolate linearly (numpy). Each case starts from an empty pool: its requests use named sessions
(`X-Session-Id`), deleted after the case, so rows are handed out lowest first. An untimed warm-up runs N and N+1
streams for each N first (a GPU captures its CUDA graphs there). Output: OUT/serve_load.json (rewritten atomically
after each case), OUT/serve_load.md (the table), OUT/serve.log (the server's stderr: one access-log line per
request). Timing only: nothing here asserts speed.

  python -m yarnkit.bench.serve_load --out runs/serve-load                   # CPU, bundled SmolLM2-135M, float32
  python -m yarnkit.bench.serve_load --streams 1 4 --long-tokens 0 --max-tokens 32      # quick, no long prompt
  python -m yarnkit.bench.serve_load --device cuda --dtype bfloat16 --window 4096 --max-tokens 256 \\
      --out runs/serve-load-gpu                                                # one GPU (CUDA-graph decode)

Test: `python -m pytest tests/test_runtime_load.py -q` (a tiny model, end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import yarnkit
from yarnkit.outputs import write_json_atomic

READY_LINE = "serving "  # what `yarnkit serve` prints once it listens: "serving NAME on http://HOST:PORT/v1"


@contextmanager
def serve_process(ckpt, flags=(), env: dict | None = None, log: Path | None = None, timeout: float = 600.0):
    """`yarnkit serve CKPT --port 0 FLAGS` on 127.0.0.1, running this checkout's yarnkit; yields `(process,
    base_url)` once `/health` answers, and stops the server on exit. `env` is added to this process's environment;
    `log` gets the server's stderr (None: discarded). A server that exits or stays silent past `timeout` seconds
    raises RuntimeError with the last line it wrote to `log`."""
    root = str(Path(yarnkit.__file__).resolve().parents[1])
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    stderr = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "yarnkit.cli", "serve", str(ckpt), "--host", "127.0.0.1",
                                "--port", "0", *flags], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        yield process, wait_ready(process, timeout, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log is not None:
            stderr.close()


def wait_ready(process, timeout: float, log: Path | None) -> str:
    """The server's base URL (`http://127.0.0.1:PORT/v1`) once its ready line is printed and `/health` says ok."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    base = None
    while time.monotonic() < deadline:
        if process.poll() is not None and lines.empty():
            break
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line.startswith(READY_LINE) and " on http" in line:
            base = line.strip().split(" on ")[-1]
            break
    while base is not None and time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=5) as response:
                if json.load(response).get("status") == "ok":
                    return base
        except OSError:
            time.sleep(0.2)
    said = [line for line in log.read_text().splitlines() if line.strip()] if log is not None and log.exists() else []
    state = f"exit status {process.returncode}" if process.poll() is not None else f"no answer in {timeout:.0f} s"
    raise RuntimeError(f"yarnkit serve did not come up ({state}): {said[-1] if said else 'no output'}")


# -- one stream ---------------------------------------------------------------------------------------------------
@dataclass
class Stream:
    """One streamed request as the client saw it; times are `time.perf_counter()` seconds."""

    name: str
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with text
    end: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    truncated: dict | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def stream_chat(client, model: str, stream: Stream, content: str, max_tokens: int, on_first=None) -> None:
    """Send one greedy streaming chat request on session `stream.name` and record what arrives; `on_first()` is
    called once: at its first text, or when it ends without any."""
    called = False
    try:
        stream.sent = time.perf_counter()
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_headers={"X-Session-Id": stream.name})
        for chunk in response:
            now = time.perf_counter()
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.delta.content:
                    stream.chunks.append(now)
                    if not called and on_first is not None:
                        called = True
                        on_first()
                stream.finish_reason = choice.finish_reason or stream.finish_reason
            if chunk.usage is not None:
                stream.completion_tokens = chunk.usage.completion_tokens
                stream.prompt_tokens = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                stream.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
            stream.truncated = ((chunk.model_extra or {}).get("yarnkit") or {}).get("truncated", stream.truncated)
    except Exception as error:  # noqa: BLE001 - a failed request is a result of the benchmark, recorded as such
        stream.error = f"{type(error).__name__}: {error}"
    finally:
        stream.end = time.perf_counter()
        if not called and on_first is not None:
            on_first()


def delete_sessions(client, names: list[str], wait: float = 10.0) -> None:
    """Drop the named sessions (`DELETE /v1/sessions/NAME`: their rows go back to the pool); a session still
    finishing its reply is retried for up to `wait` seconds."""
    for name in names:
        deadline = time.monotonic() + wait
        request = urllib.request.Request(f"{str(client.base_url).rstrip('/')}/sessions/{name}", method="DELETE",
                                         headers={"Authorization": f"Bearer {client.api_key}"})
        while True:
            try:
                urllib.request.urlopen(request, timeout=30).close()
                break
            except urllib.error.HTTPError as error:
                if error.code != 404 or time.monotonic() > deadline:
                    break  # never created (its request failed) or still busy: the case's errors say which
                time.sleep(0.05)


# -- one case -----------------------------------------------------------------------------------------------------
def run_case(client, model: str, tag: str, prompts: list[str], max_tokens: int, long_prompt: str | None = None,
             long_max_tokens: int = 16, timeout: float = 1800.0) -> tuple[list[Stream], Stream | None, float]:
    """`len(prompts)` concurrent streams; with `long_prompt`, one more request sent once every stream has its first
    text. Returns the streams, the long request (or None) and the time the first request was sent."""
    streams = [Stream(f"{tag}-s{i}") for i in range(len(prompts))]
    started, lock, everyone = [0], threading.Lock(), threading.Event()

    def first_text():
        with lock:
            started[0] += 1
            if started[0] == len(streams):
                everyone.set()

    threads = [threading.Thread(target=stream_chat, args=(client, model, stream, text, max_tokens, first_text))
               for stream, text in zip(streams, prompts)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    long = None
    if long_prompt is not None:
        everyone.wait(timeout)
        long = Stream(f"{tag}-long")
        threads.append(threading.Thread(target=stream_chat, args=(client, model, long, long_prompt, long_max_tokens)))
        threads[-1].start()
    for thread in threads:
        thread.join(timeout)
    delete_sessions(client, [s.name for s in streams + ([long] if long else [])])
    return streams, long, began


def quantiles(values: list[float], scale: float = 1.0) -> dict:
    """p50 / p90 / p99 / max of `values` times `scale` (linear interpolation); None for no values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "count": 0}
    p50, p90, p99 = (float(v) * scale for v in np.percentile(values, [50, 90, 99]))
    return {"p50": p50, "p90": p90, "p99": p99, "max": max(values) * scale, "count": len(values)}


def overlapping_gaps(streams: list[Stream], start: float, end: float) -> list[float]:
    """The gaps (between two chunks of a stream) whose span overlaps [start, end]."""
    return [b - a for s in streams for a, b in zip(s.chunks, s.chunks[1:]) if b > start and a < end]


def summarize(streams: list[Stream], long: Stream | None, began: float) -> dict:
    """One case's numbers (module docstring); per-stream raw times relative to `began` (seconds, gaps in ms)."""
    ended = max(s.end for s in streams)
    tokens = sum(s.completion_tokens for s in streams)
    row = {"streams": len(streams), "long_prompt": long is not None,
           "ttft_s": quantiles([s.ttft for s in streams if s.ttft is not None]),
           "gap_ms": quantiles([g for s in streams for g in s.gaps], 1e3),
           "completion_tokens": tokens, "chunks": sum(len(s.chunks) for s in streams),
           "wall_s": ended - began, "tokens_per_s": tokens / (ended - began) if ended > began else None,
           "errors": [f"{s.name}: {s.error}" for s in streams + ([long] if long else []) if s.error],
           "per_stream": [stream_row(s, began) for s in streams]}
    if long is not None:
        first = long.chunks[0] if long.chunks else long.end
        row["long"] = stream_row(long, began)
        row["during_prefill_gap_ms"] = quantiles(overlapping_gaps(streams, long.sent, first), 1e3)
        row["short_streams_done_before_long_first_token"] = sum(s.end <= first for s in streams)
    return row


def stream_row(stream: Stream, began: float) -> dict:
    raw = asdict(stream)
    raw.update(sent_s=stream.sent - began, end_s=stream.end - began, ttft_s=stream.ttft,
               chunks_s=[round(t - began, 5) for t in stream.chunks], gaps_ms=[round(1e3 * g, 3) for g in stream.gaps])
    del raw["sent"], raw["end"], raw["chunks"]  # the client's own clock: chunks_s holds the same, from the case start
    return raw


# -- prompts, the table, the run ----------------------------------------------------------------------------------
def make_prompts(tokenizer, count: int, tokens: int) -> list[str]:
    from yarnkit.bench.decode_step import book_prompts

    return [f"Retell this passage in your own words, in detail:\n\n{text}" for text in
            book_prompts(tokenizer, count, tokens)]


def long_prompt_text(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of the bundled book (from its start) and a question after them."""
    from yarnkit.assets import sample_path
    from yarnkit.corpus import read_text

    ids = tokenizer(read_text(sample_path("eval")), add_special_tokens=False)["input_ids"]
    if tokens > len(ids):
        raise SystemExit(f"serve_load: --long-tokens {tokens}: the bundled book has {len(ids)} tokens; ask for at "
                         f"most that many")
    return tokenizer.decode(ids[:tokens]) + "\n\nWhat is this text about? Answer in one sentence."


def table(report: dict) -> str:
    """The markdown table: one row per case."""
    def cell(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| streams | long prompt | TTFT p50 / p90 / p99 (s) | gap p50 / p99 / max (ms) | tok/s | "
             "gaps during its prefill: n, p99 / max (ms) | long prompt tokens, TTFT (s) |", "|---" * 7 + "|"]
    for case in report["cases"]:
        ttft, gap = case["ttft_s"], case["gap_ms"]
        row = [str(case["streams"]), "yes" if case["long_prompt"] else "no",
               f"{cell(ttft['p50'], 2)} / {cell(ttft['p90'], 2)} / {cell(ttft['p99'], 2)}",
               f"{cell(gap['p50'])} / {cell(gap['p99'])} / {cell(gap['max'])}", cell(case["tokens_per_s"])]
        if case["long_prompt"]:
            during, long = case["during_prefill_gap_ms"], case["long"]
            row += [f"{during['count']}, {cell(during['p99'])} / {cell(during['max'])}",
                    f"{long['prompt_tokens']:,}, {cell(long['ttft_s'], 2)}"]
        else:
            row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
            "python": platform.python_version()}


def prefill_note(longer_than_window: bool) -> str:
    from yarnkit.runtime.scheduler import PREFILL_BUDGET

    if longer_than_window:
        return (f"the whole prompt is fed through the window, {PREFILL_BUDGET} tokens per step while streams "
                "decode; only its end stays in context (--over-window truncate)")
    return f"the prompt fits the window: one context, {PREFILL_BUDGET} tokens per step while streams decode"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m yarnkit.bench.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="what `yarnkit serve` serves (run dir, HF dir, .gguf, "
                   "or smollm2-135m)")
    p.add_argument("--device", default="cpu", help="the server's --device")
    p.add_argument("--dtype", default="float32", help="the server's --dtype")
    p.add_argument("--decode", default="auto", choices=["auto", "static", "graph"], help="the server's --decode")
    p.add_argument("--window", type=int, default=1024, help="the server's --window (cache tokens per session)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="concurrent streams per case")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each short stream")
    p.add_argument("--prompt-tokens", type=int, default=128, help="book tokens in each short stream's prompt")
    p.add_argument("--long-tokens", type=int, default=30_000, help="book tokens of the long prompt (0: no long cases)")
    p.add_argument("--long-max-tokens", type=int, default=16, help="max_tokens of the long request")
    p.add_argument("--warmup-tokens", type=int, default=4, help="max_tokens of the untimed warm-up streams (0: none)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: torch's own)")
    p.add_argument("--serve-args", default="", help="more flags for `yarnkit serve`, one string given with `=` (a "
                   "value that starts with - would be read as a flag): e.g. --serve-args=--compile")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one request (or the server start) may take")
    p.add_argument("--out", type=Path, default=Path("runs/serve-load"))
    args = p.parse_args(argv)
    if min(args.streams) < 1 or args.max_tokens < 2 or args.long_tokens < 0 or args.window < 2:
        p.error("--streams must be >= 1, --max-tokens >= 2 (a gap needs two tokens), --long-tokens >= 0, --window >= 2")
    return args


def server_flags(args) -> list[str]:
    """`yarnkit serve`'s flags for this run: rows for the most streams plus the long prompt, a prompt limit above
    it, and `--over-window truncate` so a prompt longer than the window streams through it."""
    return ["--device", args.device, "--dtype", args.dtype, "--decode", args.decode, "--window", str(args.window),
            "--max-sessions", str(max(args.streams) + 1),
            "--max-prompt-tokens", str(max(65536, args.long_tokens + 4096)),
            "--max-tokens-limit", str(max(4096, args.max_tokens, args.long_max_tokens)), "--over-window", "truncate",
            *shlex.split(args.serve_args)]


def import_openai():
    """The official client, or one line that says why it does not import and how to fix it."""
    try:
        import openai
    except ImportError as err:  # not installed, or a dependency of it missing (openai 3.x needs httpx2)
        raise SystemExit(f"serve_load: the openai client does not import ({err}); pip install openai") from None
    return openai


def main(argv=None) -> dict:
    openai = import_openai()

    from yarnkit.models import load_tokenizer
    from yarnkit.runtime.serve import API_KEY_ENV
    from yarnkit.runs import model_location

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_location(args.model))
    long_text = long_prompt_text(tokenizer, args.long_tokens) if args.long_tokens else None
    flags = server_flags(args)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": shlex.join(
        ["python", "-m", "yarnkit.bench.serve_load", *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine(), "openai": openai.__version__, "model": args.model,
              "server": {"flags": flags, "window": args.window, "over_window": "truncate",
                         "long_prompt_prefill": prefill_note(args.long_tokens > args.window)},
              "settings": {k: getattr(args, k) for k in ("streams", "max_tokens", "prompt_tokens", "long_tokens",
                                                         "long_max_tokens", "warmup_tokens", "threads")},
              "cases": []}
    if args.device.startswith("cuda"):
        import torch

        report["machine"]["gpu"] = torch.cuda.get_device_name(args.device)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    cases = [(n, long) for n in args.streams for long in ((False, True) if long_text else (False,))]
    try:
        with serve_process(args.model, flags, env, args.out / "serve.log", args.timeout) as (process, base):
            client = openai.OpenAI(base_url=base, api_key=os.environ.get(API_KEY_ENV) or "unused",
                                   max_retries=0, timeout=args.timeout)
            model = client.models.list().data[0].id
            if args.warmup_tokens:
                for n in sorted({c for n in args.streams for c in (n, n + 1)}):
                    run_case(client, model, f"warmup{n}", [f"Warm-up {i}: say hello." for i in range(n)],
                             args.warmup_tokens, timeout=args.timeout)
            for index, (n, long) in enumerate(cases, 1):
                print(f"[{index}/{len(cases)}] {n} stream(s){' + the long prompt' if long else ''} ...", flush=True)
                streams, long_stream, began = run_case(
                    client, model, f"case{index}", make_prompts(tokenizer, n, args.prompt_tokens), args.max_tokens,
                    long_text if long else None, args.long_max_tokens, args.timeout)
                report["cases"].append(summarize(streams, long_stream, began))
                if long_stream is not None:  # what the server did, from its own notice
                    report["server"]["long_prompt_prefill"] = prefill_note(long_stream.truncated is not None)
                write_json_atomic(args.out / "serve_load.json", report)
                print("    " + progress_line(report["cases"][-1]), flush=True)
            report["server_alive"] = process.poll() is None
    except RuntimeError as error:
        raise SystemExit(f"serve_load: {error}") from None
    write_json_atomic(args.out / "serve_load.json", report)
    where = report["machine"].get("gpu") or report["machine"]["cpu"]
    header = [f"`{report['command']}`", "", f"{report['date']}; {where} ({report['machine']['cpu_count']} CPUs); "
              f"model {args.model}, {args.device} {args.dtype}, window {args.window}, {args.max_tokens} tokens per "
              f"stream; long prompt: {report['server']['long_prompt_prefill']}", ""]
    (args.out / "serve_load.md").write_text("\n".join(header) + table(report) + "\n")
    print(table(report))
    return report


def progress_line(case: dict) -> str:
    ttft, gap = case["ttft_s"], case["gap_ms"]
    line = (f"TTFT p50 {ttft['p50'] or 0:.2f} s p99 {ttft['p99'] or 0:.2f} s; gap p50 {gap['p50'] or 0:.1f} ms p99 "
            f"{gap['p99'] or 0:.1f} ms max {gap['max'] or 0:.1f} ms; {case['tokens_per_s'] or 0:.1f} tok/s")
    if case["long_prompt"]:
        long, during = case["long"], case["during_prefill_gap_ms"]
        line += (f"; long prompt {long['prompt_tokens']:,} tokens, TTFT {long['ttft_s'] or 0:.2f} s, "
                 f"{during['count']} gaps during its prefill (max {during['max'] or 0:.1f} ms)")
    if case["errors"]:
        line += f"; {len(case['errors'])} ERRORS: {case['errors'][0]}"
    return line


if __name__ == "__main__":
    main()
