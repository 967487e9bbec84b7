"""The runtime benchmark script runs end to end on CPU at tiny sizes (random-init tiny shape, real tokenizer); the
lone-session benchmark times every row of a full pool, each stepping one row; the path check compares a fused
decode path with the stock eager cache and with the eager cache on the same fused model (bf16).

Run: `python -m pytest tests/test_bench_streaming.py -q`
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "scripts" / "bench_runtime.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_runtime_timing_parts(tmp_path, capsys):
    out = tmp_path / "out"
    load_script().main(["--model", "tiny", "--random-init", "--out", str(out), "--caches", "32", "64", "--steps", "8",
                        "--decode", "static", "--sessions", "2", "3", "--scale-shapes", "tiny",
                        "--parts", "latency", "peers", "batch", "scale", "compiled"])
    saved = json.loads((out / "bench_runtime.json").read_text())
    assert (out / "bench_runtime.png").stat().st_size > 0 and saved["skipped"] == []
    row = saved["latency"]["64"]
    assert row["sinks"]["decode_path"] == "static" and row["sinks"]["steps"] == 8 and row["speedup_vs_recompute"] > 0
    assert {"recompute", "dense"} <= set(row) and row["sinks"]["p99_over_p50"] >= 1 and "dense" not in saved["latency"]["32"]
    check = saved["path_check"]
    assert check["rerotations"] > 0 and check["max_abs_logprob_diff"] < 1e-4 and check["greedy_agreement"] == 1
    assert row["sinks"]["fused_projections"] and check["fused_projections"]  # auto on the static path; the path
    assert row["sinks"]["fused_norms"] and check["fused_norms"]  # check's eager cache ran the stock projections and
    # norms (the fuse undone), within 1e-4 of the fused static path
    assert set(saved["peers"]) == {"dynamic", "static"} and saved["peers"]["static"]["p50_ms"] > 0
    assert set(saved["batch"]) == {"2", "3"}
    batch = saved["batch"]["3"]
    assert batch["sessions"] == 3 and batch["all_identical"] and batch["tokens_per_s_together"] > 0
    assert saved["scale"]["tiny"]["speedup_vs_recompute"] > 0
    assert saved["compiled"]["latency"]["64"]["sinks"]["compiled"] is False  # torch.compile only on the CUDA graph
    assert "vs recompute" in capsys.readouterr().out


def test_bench_runtime_perplexity_uses_eval_policies(tmp_path):
    from yarnkit.models import load_tokenizer

    model_dir = tmp_path / "tiny"
    tiny_config("llama", vocab_size=49152, max_position_embeddings=1024).save_pretrained(model_dir)
    load_tokenizer("smollm2-135m").save_pretrained(model_dir)
    bench = load_script()
    original = bench.load
    bench.load = lambda args: (_random(model_dir), load_tokenizer(str(model_dir)))
    try:
        report = bench.main(["--model", str(model_dir), "--out", str(tmp_path / "out"), "--parts", "ppl", "recall",
                             "--tokens", "256", "--window", "48", "--chunk", "16", "--recall-trials", "1",
                             "--recall-filler", "60", "--sirllm-keep", "16"])
    finally:
        bench.load = original
    assert set(report["perplexity"]) == {"sink", "recompute", "window"}
    assert all(math.isfinite(v["ppl"]) and v["ppl"] > 1 and v["tokens_scored"] > 200
               for v in report["perplexity"].values())
    assert set(report["recall"]) == {"sinks", "sirllm"}


def _random(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation="sdpa").eval()


def test_lone_session_benchmark_times_every_row_stepping_one_row():
    from conftest import tiny_model

    from yarnkit.bench.lone_session import lone_session_by_row

    results = lone_session_by_row(tiny_model("llama"), rows=3, window=32, prompt=8, steps=3, rounds=1)
    assert [r["row"] for r in results] == [0, 1, 2] and all(r["steps"] == 3 for r in results)
    assert [(r["step_rows"], r["forward_batches"]) for r in results] == [(1, [1])] * 3  # one row each
    assert all(r["tokens_per_s"] > 0 for r in results)


def test_decode_step_split_covers_every_phase_on_cpu(tmp_path):
    """`python -m yarnkit.bench.decode_step` at a tiny shape: each (mode, sessions) row has every phase, bookkeeping
    (`StreamingEngine._remember`) and sampling were reached, and every decode step ran on the pool; each
    `--fuse` setting ran as asked (`false` after `true`: the fuse was undone between them)."""
    from yarnkit.bench import decode_step

    out = tmp_path / "split.json"
    assert decode_step.main(["--sessions", "1", "2", "--steps", "2", "--warmup", "1", "--window", "64",
                             "--prompt", "32", "--modes", "greedy", "sampled", "--fuse", "true", "false",
                             "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["mode"], row["fused_projections"], row["fused_norms"], row["sessions"]) for row in rows] == [
        (mode, fused, fused, sessions) for mode in ("greedy", "sampled") for fused in (True, False)
        for sessions in (1, 2)]
    for row in rows:
        split = row["split_ms_per_step"]
        assert set(split) == {"forward", "to_host", "sampling", "eviction", "bookkeeping", "text", "rest"}
        assert split["forward"] > 0 and split["bookkeeping"] > 0 and split["sampling"] > 0
        assert row["decode_path"] == "static" and row["tokens_per_s"] > 0 and row["first_step_s"] > 0


def test_decided_agreement_counts_only_rows_with_a_clear_best_token():
    import torch

    from yarnkit.bench.streaming import NEAR_TIE, decided_agreement

    reference = torch.tensor([[0.0, -1.0, -2.0],  # decided: token 0 leads by 1 nat
                              [0.0, -NEAR_TIE / 2, -3.0],  # near-tie: either token may win after a rounding
                              [-2.0, 0.0, -1.0]])  # decided: token 1
    flipped_tie = reference.clone()
    flipped_tie[1] = torch.tensor([-NEAR_TIE / 2, 0.0, -3.0])
    assert decided_agreement(reference, flipped_tie) == (1.0, 2)  # the near-tie's flip is not a disagreement
    flipped_decided = reference.clone()
    flipped_decided[2] = torch.tensor([0.0, -2.0, -1.0])
    assert decided_agreement(reference, flipped_decided) == (0.5, 2)  # a clear row that flips is caught
    assert decided_agreement(torch.zeros(2, 3), torch.zeros(2, 3)) == (0.0, 0)  # all ties: nothing decided


def test_agreement_is_an_exact_ratio_of_counts():
    """A float32 mean rounds: on CUDA 97 of 97 agreeing rows gave 0.99999994 and failed the bound of 1.0; 96 of 97
    in float32 is not 96 / 97 either."""
    import torch

    from yarnkit.bench.streaming import decided_agreement, share

    reference = torch.eye(97)  # every row decided (its best token leads by 1)
    assert decided_agreement(reference, reference.clone()) == (1.0, 97)
    other = reference.clone()
    other[0] = torch.roll(other[0], 1)
    assert decided_agreement(reference, other) == (96 / 97, 97)
    assert share(torch.arange(97) < 96) == 96 / 97


def test_decode_step_profile_lists_the_step_operators_on_cpu(tmp_path):
    """`--profile`: one section per row, each a profile of one pooled decode step whose operators include the
    step's matmuls and the cache's scatter (on CPU the profile lists operators, not kernels); the JSON rows stay
    free of the markdown."""
    from yarnkit.bench import decode_step

    out, profile = tmp_path / "rows.json", tmp_path / "profile.md"
    assert decode_step.main(["--sessions", "1", "2", "--steps", "1", "--warmup", "1", "--window", "64", "--prompt",
                             "32", "--modes", "greedy", "--out", str(out), "--profile", str(profile),
                             "--compile"]) == 0  # --compile: CUDA only, so the CPU rows say they ran uncompiled
    text = profile.read_text()
    sections = [line for line in text.splitlines() if line.startswith("# decode step")]
    assert sections == ["# decode step: 1 session(s), greedy, static, sdpa, fused: projections+norms",
                        "# decode step: 2 session(s), greedy, static, sdpa, fused: projections+norms"]
    assert "| matmul |" in text and "| scatter / gather / index |" in text
    rows = json.loads(out.read_text())["rows"]
    assert all("profile_md" not in row and row["compiled"] is False for row in rows)


def bf16_model_with_trained_norms():
    """A tiny Llama in bf16 whose RMSNorm weights are not all 1 (with weight 1 transformers' second rounding is
    exact, so its norms and torch.rms_norm would agree bit for bit)."""
    import torch
    from conftest import tiny_model

    model = tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(0))
    return model.to(torch.bfloat16)


def test_path_check_also_compares_the_eager_cache_with_the_same_fuse():
    """A fused decode path is compared with the stock eager cache (the headline numbers, as before) and with the
    eager cache on the same fused model (`same_fuse`): the fused eager path against itself differs by nothing,
    against stock transformers by the fused norms' rounding; the float32 reference rates all three runs."""
    from yarnkit.bench.streaming import path_check
    from yarnkit.runtime import fused

    model = bf16_model_with_trained_norms()
    reference = bf16_model_with_trained_norms().float()
    result = path_check(model, "eager", window=32, prompt=32, steps=24, evict_batch=8, fuse=True,
                        reference=reference)
    assert result["fused_projections"] and result["fused_norms"] and not fused.is_fused(model)
    assert result["rerotations"] >= 2
    assert result["same_fuse"]["max_abs_logprob_diff"] == 0.0 and result["same_fuse"]["greedy_agreement"] == 1.0
    assert result["max_abs_logprob_diff"] > 0  # stock transformers' norms round twice
    rated = result["vs_reference"]
    assert set(rated) == {"decode_path", "eager", "eager_same_fuse"}
    assert rated["decode_path"] == rated["eager_same_fuse"] != rated["eager"]
    unfused = path_check(model, "static", window=32, prompt=32, steps=24, evict_batch=8, fuse=False)
    assert "same_fuse" not in unfused and not unfused["fused_norms"]
