"""The runtime benchmark script runs end to end on CPU at tiny sizes (random-init tiny model, real tokenizer).

Run: `python -m pytest tests/test_runtime_bench.py -q`
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runtime_smoke(tmp_path, capsys):
    from yarnkit.models import load_tokenizer

    model_dir = tmp_path / "tiny"
    tiny_config("llama", vocab_size=49152, max_position_embeddings=1024).save_pretrained(model_dir)
    load_tokenizer("smollm2-135m").save_pretrained(model_dir)
    spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "scripts" / "bench_runtime.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    report = bench.main(["--random-init", "--model", str(model_dir), "--out", str(out), "--tokens", "256",
                         "--window", "60", "--chunk", "32", "--latency-caches", "32", "64", "--latency-steps", "4",
                         "--warmup", "1", "--stream-steps", "20", "--decode", "static", "eager", "--recall-trials", "1", "--recall-filler", "100",
                         "--sirllm-keep", "16"])
    saved = json.loads((out / "bench_runtime.json").read_text())
    assert saved["stream_tokens"] == 256 and (out / "bench_runtime.png").stat().st_size > 0
    assert all(math.isfinite(v) and v > 1 for v in report["perplexity"].values())
    assert set(saved["latency"]) == {"32", "64"} and saved["stream_latency"]["rerotations"] > 0
    row = saved["latency"]["64"]
    assert row["sinks"]["decode_path"] == "static" and row["sinks_eager"]["decode_path"] == "eager"
    assert row["speedup_vs_recompute"] > 0 and {"recompute", "dense"} <= set(row)
    check = saved["path_check"]
    assert check["decode_path"] == "static" and check["rerotations"] > 0 and check["max_abs_logprob_diff"] < 1e-3
    stream = saved["stream_latency"]
    assert stream["decode_path"] == "static" and stream["evicting_steps"] > 0 and stream["p99_over_p50"] >= 1
    assert "speed-up vs recompute" in capsys.readouterr().out and (out / "bench_runtime.log").stat().st_size > 0
    assert set(saved["recall"]) == {"sinks", "sirllm"}
