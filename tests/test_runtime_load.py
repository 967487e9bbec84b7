"""Load and fault test of `yarnkit serve` with the official `openai` client (CPU, tiny model, 127.0.0.1 only).

Run: `python -m pytest tests/test_runtime_load.py -q` (about 50 s on 2 cores).

A `yarnkit serve` process (a tiny random Llama saved with SmolLM2's tokenizer; 8 cache rows, window 512, and
`--over-window truncate`, since the long prompts are meant to stream through the window) takes:
1. memory: the server's peak RSS after a 50,000-token prompt is within 1.2x its peak after a 1,000-token prompt
   (the cache and one chunk bound memory, not the prompt; what remains is the tokenizer's transient);
2. 10 concurrent streaming clients x 5 rounds (50 requests, 3 of them cancelled after a few chunks), alongside
   one 50,000-token prompt. Expected: no 5xx, and every completed answer equals the same request answered
   alone on the idle server afterwards (greedy);
3. a short request sent while a 50,000-token prompt is being prefilled: it must not wait for the prefill.
   Bound: at most 3x its latency on the idle server + 0.5 s, and less than half the long request's time.
4. the serve-load benchmark (`python -m yarnkit.bench.serve_load`, its own server) end to end at a tiny shape:
   structure only (every stream decoded, gaps counted, the long prompt fed whole after the streams started).
Traffic goes only to the server on 127.0.0.1; every loop is bounded; the server is stopped at the end.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import tiny_config

STREAMS, ROUNDS, CANCELLED = 10, 5, {(1, 2), (4, 0), (8, 3)}
LONG = "hello " * 50_000  # 50,001 tokens with SmolLM2's tokenizer


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@pytest.fixture(scope="module")
def tiny_serve_model(tmp_path_factory):
    """A tiny random Llama saved with SmolLM2's tokenizer (what `yarnkit serve` loads in these tests)."""
    import torch
    from transformers import AutoModelForCausalLM

    from yarnkit.models import load_tokenizer

    model_dir = tmp_path_factory.mktemp("tiny-serve")
    torch.manual_seed(0)  # the same weights whichever test runs first
    config = tiny_config("llama", vocab_size=49152, max_position_embeddings=2048)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    load_tokenizer("smollm2-135m").save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def server(tiny_serve_model):
    from yarnkit.bench.serve_load import serve_process

    # one intra-op thread: a tiny model on 2 shared cores only loses time to OpenMP spinning
    env = {"YARNKIT_API_KEY": "load-test", "OMP_NUM_THREADS": "1"}
    flags = ["--window", "512", "--max-sessions", "8", "--max-prompt-tokens", "60000", "--model-name", "tiny",
             "--over-window", "truncate"]
    with serve_process(tiny_serve_model, flags, env, timeout=120) as (process, base_url):
        yield process, openai.OpenAI(base_url=base_url, api_key="load-test", max_retries=0, timeout=120)


def prompt(stream: int, round_: int) -> list[dict]:
    return [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": f"Client {stream}, question {round_}: what comes next?"}]


def ask(client, messages, max_tokens=16, cancel_after=None):
    """Stream one answer; `cancel_after` chunks: hang up early (returns None)."""
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, stream=True)
    text = ""
    for count, chunk in enumerate(stream):
        if cancel_after is not None and count >= cancel_after:
            stream.close()
            return None
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text


def test_load_faults_latency_and_memory(server):
    process, client = server
    ask(client, [{"role": "user", "content": "hello " * 1000}], max_tokens=4)
    baseline_rss = peak_rss_mib(process.pid)
    ask(client, [{"role": "user", "content": LONG}], max_tokens=4)
    assert peak_rss_mib(process.pid) <= 1.2 * baseline_rss, (peak_rss_mib(process.pid), baseline_rss)

    answers, failures = {}, []

    def client_thread(stream):
        for round_ in range(ROUNDS):
            try:
                cancel = 3 if (stream, round_) in CANCELLED else None
                answers[stream, round_] = ask(client, prompt(stream, round_), cancel_after=cancel)
            except openai.APIStatusError as error:
                failures.append((stream, round_, error.status_code))

    def long_thread():
        try:
            answers["long"] = client.chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": LONG}]).choices[0].message.content
        except openai.APIStatusError as error:
            failures.append(("long", 0, error.status_code))

    threads = [threading.Thread(target=client_thread, args=(s,)) for s in range(STREAMS)]
    threads.append(threading.Thread(target=long_thread))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == [] and process.poll() is None  # no 5xx (nor any other error), server alive
    assert "long" in answers and all(answers[key] is None for key in CANCELLED)
    for (stream, round_), text in [(k, v) for k, v in answers.items() if k != "long"]:
        if text is not None:
            assert text == ask(client, prompt(stream, round_)), (stream, round_)  # same answer, asked alone

    short = [{"role": "user", "content": "Quick one?"}]
    start = time.perf_counter()
    ask(client, short, max_tokens=8)
    idle = time.perf_counter() - start
    timing = {}

    def long_request():
        began = time.perf_counter()
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": LONG + "!"}])
        timing["long"] = time.perf_counter() - began

    long = threading.Thread(target=long_request)
    long.start()
    time.sleep(0.3)  # the long prompt is being tokenized / prefilled now
    start = time.perf_counter()
    ask(client, short, max_tokens=8)
    timing["short"] = time.perf_counter() - start
    long.join(timeout=120)
    assert timing["short"] <= 3 * idle + 0.5, (timing, idle)
    assert timing["short"] < timing["long"] / 2, (timing, idle)


def test_serve_load_benchmark_runs_end_to_end(tiny_serve_model, tmp_path):
    """`python -m yarnkit.bench.serve_load` at a tiny shape: its own server, 1 and 3 streams, with and without a
    3,000-token prompt through a 256-token window. Structure only, no timings."""
    from yarnkit.bench import serve_load

    out = tmp_path / "bench"
    report = serve_load.main(["--model", str(tiny_serve_model), "--streams", "1", "3", "--max-tokens", "12",
                              "--prompt-tokens", "40", "--long-tokens", "3000", "--long-max-tokens", "3",
                              "--window", "256", "--threads", "1", "--timeout", "120", "--out", str(out)])
    assert json.loads((out / "serve_load.json").read_text()) == report and report["server_alive"]
    assert [(c["streams"], c["long_prompt"]) for c in report["cases"]] == [(1, False), (1, True), (3, False), (3, True)]
    assert "--over-window truncate" in " ".join(report["server"]["flags"])
    assert "fed through the window" in report["server"]["long_prompt_prefill"]
    for case in report["cases"]:
        assert case["errors"] == [] and len(case["per_stream"]) == case["streams"]
        for stream in case["per_stream"]:
            assert stream["completion_tokens"] == 12 and stream["finish_reason"] == "length"  # every stream decoded
            assert stream["cached_tokens"] == 0 and stream["prompt_tokens"] > 40  # a fresh row each case
            assert len(stream["gaps_ms"]) == len(stream["chunks_s"]) - 1 >= 1 and min(stream["gaps_ms"]) >= 0
            assert 0 <= stream["sent_s"] < stream["ttft_s"] + stream["sent_s"] <= stream["end_s"]
            assert stream["chunks_s"] == sorted(stream["chunks_s"])
        assert case["gap_ms"]["count"] == sum(len(s["gaps_ms"]) for s in case["per_stream"])
        assert case["completion_tokens"] == 12 * case["streams"] and case["tokens_per_s"] > 0
        if case["long_prompt"]:
            long = case["long"]
            # the whole long prompt was fed (nothing reused), through the window: a real, chunked prefill
            assert long["prompt_tokens"] >= 3000 and long["cached_tokens"] == 0 and long["completion_tokens"] == 3
            assert long["truncated"]["window"] == 256 and long["truncated"]["prompt_tokens"] == long["prompt_tokens"]
            # sent mid-stream: after every short stream's first text
            assert long["sent_s"] >= max(s["sent_s"] + s["ttft_s"] for s in case["per_stream"])
            first = long["sent_s"] + long["ttft_s"]
            overlapping = [g for s in case["per_stream"]
                           for a, b, g in zip(s["chunks_s"], s["chunks_s"][1:], s["gaps_ms"])
                           if b > long["sent_s"] and a < first]
            assert case["during_prefill_gap_ms"]["count"] == len(overlapping)
    table = (out / "serve_load.md").read_text()
    assert table.count("\n| 1 |") == 2 and table.count("\n| 3 |") == 2 and "3,0" in table


def test_serve_load_says_in_one_line_when_the_client_does_not_import(monkeypatch):
    """A client whose dependency is missing (the GPU image's openai 3.63 without httpx2) stops with the reason."""
    import builtins

    from yarnkit.bench import serve_load

    real_import = builtins.__import__

    def no_openai(name, *args, **kwargs):
        if name == "openai":
            raise ModuleNotFoundError("No module named 'httpx2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openai)
    with pytest.raises(SystemExit, match=r"^serve_load: the openai client does not import \(No module named "
                                         r"'httpx2'\); pip install openai$"):
        serve_load.main(["--out", "unused"])
