"""The training benchmark's vocabulary and its tables: the peers (`yarnkit.bench.hf_peer` flags), yarnkit's
variants (recipe overrides), and what the measured rows become: MFU, speed-ups against each peer of the same shape,
loss agreement with the reference peer, `-spN` against `-sp1`, and the markdown table. Cases are run by
`yarnkit.bench.training`; this module runs nothing. Tested by `python -m pytest tests/test_multigpu_reports.py`.
"""

from __future__ import annotations

PEERS = {  # name -> yarnkit.bench.hf_peer flags
    "hf": ["--gradient-checkpointing"],
    "hf-nockpt": [],
    "hf-liger": ["--liger"],
    "hf-liger-ckpt": ["--liger", "--gradient-checkpointing"],
    "hf-bf16w": ["--gradient-checkpointing", "--precision", "bf16-weights"],
}
REFERENCE_PEERS = ("hf-nockpt", "hf", "hf-liger", "hf-liger-ckpt")  # first one that ran: the loss reference
KEEP_ATTENTION = {"model.gradient_checkpointing": True, "model.checkpoint_policy": "keep_attention"}
VARIANTS = {
    "yarnkit": {},  # the recipe's own speed keys
    "capped": {**KEEP_ATTENTION, "model.keep_attention_layers": 16},  # SmolLM2 64k in <= 10 GB
    "keep-attention": KEEP_ATTENTION,  # every layer keeps its attention output
    "full-ckpt": {"model.gradient_checkpointing": True, "model.checkpoint_policy": "full"},
    "eager": {"model.compile_layers": "false"},
    "compiled": {"model.compile_layers": "true"},
    "compile-torch": {"model.compile_layers": "true", "model.kernels": "torch"},
    "no-liger": {"model.kernels": "torch", "train.loss_impl": "chunked"},
    "chunked-loss": {"train.loss_impl": "chunked"},
    "foreach-adamw": {"optim.fused": "false"},
    "yarnkit-bf16w": {"train.mixed_precision": "bf16-weights"},  # bf16 module weights, fp32 masters: no casts
    "compiled-bf16w": {"model.compile_layers": "true", "train.mixed_precision": "bf16-weights"},  # both levers
    "before": {"model.kernels": "torch", "model.compile_layers": "false", "train.loss_impl": "chunked",
               "optim.fused": "false"},  # the recipe's speed keys before the speed work (kernels, compile, fused loss)
    "alst": {"model.gradient_checkpointing": True, "model.checkpoint_policy": "full", "model.tiled_mlp": True,
             "train.offload_activations": True},  # + the tiled (chunked or Liger-fused) loss: longest sequences
}
SP_LOSS_TOL, SP_GRAD_TOL = 2**-8, 1e-2  # -spN vs -sp1: relative; 2^-8 is one bf16 rounding step

def parse_variant(name: str) -> tuple[str, int]:
    """`(base, sp)`: `keep-attention-sp2` -> ('keep-attention', 2); without `-spN` sp is 0 (one plain process)."""
    base, _, sp = name.partition("-sp")
    if base not in PEERS and base not in VARIANTS or (sp and (base in PEERS or not sp.isdigit() or int(sp) < 1)):
        raise SystemExit(f"unknown variant {name!r}; choose one of {sorted(PEERS) + sorted(VARIANTS)} "
                         f"(yarnkit variants optionally with -sp1, -sp2, -sp4)")
    return base, int(sp) if sp else 0


def add_ratios(rows: list[dict], peak: float, measured: float) -> None:
    """MFU, speed-up vs each peer of the same model and shape, and the loss difference to the reference peer."""
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        r["mfu"] = r["achieved_tflops"] / peak
        r["mfu_vs_measured_peak"] = r["achieved_tflops"] / measured
        group = {p["variant"]: p for p in ok if (p["model"], p["shape"]) == (r["model"], r["shape"])}
        r["speedup"] = {peer: r["tokens_per_s_per_gpu"] / group[peer]["tokens_per_s_per_gpu"]
                        for peer in PEERS if peer in group}
        reference = next((group[peer] for peer in REFERENCE_PEERS if peer in group), None)
        if reference is not None:
            pairs = list(zip(r["losses"], reference["losses"]))
            r["loss_reference"] = reference["variant"]
            r["loss_vs_ref"] = max(abs(a - b) / abs(b) for a, b in pairs) if pairs else None
        base, sp = parse_variant(r["variant"])
        if sp > 1 and f"{base}-sp1" in group:
            r["vs_sp1"] = compare_sp(r, group[f"{base}-sp1"])


def compare_sp(row: dict, sp1: dict) -> dict:
    """A `-spN` row against `-sp1` of the same model and shape: largest relative loss and grad-norm differences
    over the steps both ran, each against its bf16-noise target, and tokens/s/GPU against one GPU's."""
    def worst(key: str) -> float | None:
        pairs = [(a, b) for a, b in zip(row.get(key) or [], sp1.get(key) or []) if a is not None and b]
        return max(abs(a - b) / abs(b) for a, b in pairs) if pairs else None

    loss, grad = worst("losses"), worst("grad_norms")
    return {"loss": loss, "grad_norm": grad, "steps": min(len(row["losses"]), len(sp1["losses"])),
            "equal": None if loss is None or grad is None else loss <= SP_LOSS_TOL and grad <= SP_GRAD_TOL,
            "efficiency": row["tokens_per_s_per_gpu"] / sp1["tokens_per_s_per_gpu"]}


def markdown(summary: dict) -> str:
    lines = [f"matmul peak measured: {summary['matmul_peak_tflops']:.3g} TFLOP/s ({summary['device']}); MFU: causal "
             f"FLOPs vs {summary['peak_tflops']:.0f} TFLOP/s and vs the measured peak; loss diff: largest relative "
             f"difference of the per-step losses to the shape's reference peer", "",
             "| case | status | tokens/s/GPU | vs hf-liger | vs hf-liger-ckpt | step s | peak GB | MFU "
             "| MFU (measured) | loss diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["cases"]:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['status']}: {r.get('error', '').replace('|', '/')} | | | | | | | | |")
            continue
        ratio = {peer: f"{r['speedup'][peer]:.2f}x" if peer in r["speedup"] else "" for peer in PEERS}
        diff = f"{r['loss_vs_ref']:.1e} ({r['loss_reference']})" if r.get("loss_vs_ref") is not None else ""
        lines.append(f"| {r['case']} | ok | {r['tokens_per_s_per_gpu']:,.0f} | {ratio['hf-liger']} | "
                     f"{ratio['hf-liger-ckpt']} | {r['step_seconds']:.3f} | {r['peak_memory_gb']:.1f} | "
                     f"{r['mfu']:.1%} | {r['mfu_vs_measured_peak']:.1%} | {diff} |")
    sp_rows = [r for r in summary["cases"] if r.get("vs_sp1")]
    if sp_rows:
        lines += ["", f"sequence parallel vs `-sp1` (ZeRO-2, one GPU, same batches); equal = loss within "
                      f"{SP_LOSS_TOL:.1e} and grad norm within {SP_GRAD_TOL:.0e} relative at every step", "",
                  "| case | GPUs | tokens/s/GPU | efficiency vs 1 GPU | loss diff | grad-norm diff | equal | peak GB | MFU |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sp_rows:
            v = r["vs_sp1"]
            lines.append(f"| {r['case']} | {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} | {v['efficiency']:.1%} | "
                         f"{v['loss'] if v['loss'] is None else format(v['loss'], '.1e')} | "
                         f"{v['grad_norm'] if v['grad_norm'] is None else format(v['grad_norm'], '.1e')} | "
                         f"{'-' if v['equal'] is None else 'yes' if v['equal'] else 'no'} | "
                         f"{r['peak_memory_gb']:.1f} | {r['mfu']:.1%} |")
    failed = [r for r in summary["cases"] if r["status"] != "ok" and r.get("log_tail")]
    for r in failed:
        lines += ["", f"`{r['case']}` {r['status']}: the end of its log", "", "```", r["log_tail"].strip(), "```"]
    for m in summary["max_len"]:
        lines.append(f"\nlongest trained sequence, {m['model']} @ {m['variant']}: {m['longest_ok'] or 'none'} "
                     f"(tried {', '.join(f'{t[0]}: {t[1]}' for t in m['tried'])})")
    return "\n".join(lines) + "\n"
