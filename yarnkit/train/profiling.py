"""Where one training step's time goes: a torch.profiler breakdown written as markdown (`train.profile_step=N`;
the runtime's decode step uses the same summary: `python -m yarnkit.bench.decode_step --profile`).

`step_profile(enabled)` is a context around one optimizer step (the trainer synchronizes the GPU before and
inside it); `summary(prof, wall_seconds)` turns what it recorded into: GPU kernels grouped by kind (attention,
matmul, Liger, Triton-fused, softmax / cross-entropy, optimizer, copies, scatter/index, elementwise and norms,
other ATen) and the top kernels by total time with their share of the GPU's busy time, then the host gaps: the
wall time of the step during which no kernel ran (the GPU waiting for the host: Python, launches, syncs, data). On
a machine without CUDA the same table lists CPU operators instead, which is how `python -m pytest
tests/test_speed.py -k profile` tests it. Not a benchmark: one step, one process.
"""

from __future__ import annotations

import contextlib
import re

import torch

KINDS = (  # first match wins; names as the profiler reports CUDA kernels
    ("attention", re.compile(r"cudnn|fmha|flash|attention|sdpa|dot_product", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|splitk|^aten::(linear|mm|addmm|bmm|matmul)$",
                          re.I)),
    # Liger's Triton kernels by their own names (`_rms_norm_forward_kernel`, ...): torch's fused RMSNorm is not Liger
    ("Liger-Kernel", re.compile(r"liger|^_(rms_norm|swiglu|triton_rope|geglu|layer_norm)|cross_entropy_kernel|"
                                r"element_mul", re.I)),
    ("Inductor (compiled layers)", re.compile(r"^triton_", re.I)),
    ("softmax / cross-entropy (ATen)", re.compile(r"nll|softmax", re.I)),  # the loss, or split decode attention
    ("copies / memset", re.compile(r"memcpy|memset|copy", re.I)),
    ("scatter / gather / index", re.compile(r"scatter|gather|index", re.I)),
    ("elementwise / reductions / norms", re.compile(r"elementwise|vectorized|unrolled|reduce|norm|^aten::(mul|add|"
                                                    r"neg|cat|pow|mean|rsqrt|silu|where)", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other ATen kernels")


@contextlib.contextmanager
def step_profile(enabled: bool):
    """Yields a torch.profiler.profile (CPU + CUDA activities when CUDA is there) or None when not enabled."""
    if not enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield prof


def _intervals(prof) -> tuple[list[tuple[str, float, float]], bool]:
    """(name, start_us, end_us) of every GPU kernel/copy, or of every top-level CPU op when there is no GPU."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    on_gpu = bool(events)
    if not on_gpu:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]
    return [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in events], on_gpu


def gaps(intervals: list[tuple[float, float]]) -> list[float]:
    """Idle stretches (same unit as the input) between the merged busy intervals."""
    merged = _merged(intervals)
    return [later[0] - earlier[1] for earlier, later in zip(merged, merged[1:])]


def summary(prof, wall_seconds: float, title: str = "", top: int = 15) -> str:
    """Markdown: kernel kinds, the `top` kernels, and host gaps of the profiled step."""
    events, on_gpu = _intervals(prof)
    unit = "GPU kernels" if on_gpu else "CPU operators (no GPU here)"
    if not events:
        return f"# {title}\n\nnothing was recorded\n"
    by_name: dict[str, list[float]] = {}
    for name, start, end in events:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += end - start
        entry[1] += 1
    busy_union = sum(end - start for start, end in _merged([(s, e) for _, s, e in events]))
    total = sum(t for t, _ in by_name.values()) or 1.0
    kinds: dict[str, float] = {}
    for name, (spent, _) in by_name.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + spent
    idle = gaps([(s, e) for _, s, e in events])
    span = max(e for _, _, e in events) - min(s for _, s, _ in events)
    wall_us = wall_seconds * 1e6
    lines = [f"# {title}".rstrip(), "", f"One step, {wall_seconds:.3f} s wall; {unit}: {len(events)} launches, busy "
             f"{busy_union / 1e6:.3f} s ({busy_union / wall_us:.1%} of the wall time).", "",
             "| kind | time s | share of kernel time |", "|---|---|---|"]
    lines += [f"| {kind} | {spent / 1e6:.3f} | {spent / total:.1%} |"
              for kind, spent in sorted(kinds.items(), key=lambda item: -item[1])]
    lines += ["", f"| top {top} kernels | calls | time s | share |", "|---|---|---|---|"]
    for name, (spent, calls) in sorted(by_name.items(), key=lambda item: -item[1][0])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {calls} | {spent / 1e6:.4f} | {spent / total:.1%} |")
    large = sorted(idle, reverse=True)
    lines += ["", f"Host gaps: {sum(idle) / 1e6:.3f} s idle between the first and last kernel (span "
              f"{span / 1e6:.3f} s) in {len(idle)} gaps, {sum(1 for g in idle if g > 100):d} over 100 us; "
              f"largest (ms): {', '.join(f'{g / 1e3:.2f}' for g in large[:5]) or 'none'}; before the first / after "
              f"the last kernel: {max(0.0, wall_us - span) / 1e6:.3f} s.", ""]
    return "\n".join(lines)


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, stop in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return [(a, b) for a, b in out]
