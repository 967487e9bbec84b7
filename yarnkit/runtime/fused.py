"""Fused projections for the runtime: q/k/v in one `nn.Linear` and gate/up in one, so a decode step runs 4
matmuls per Llama layer instead of 7 (q, k, v, o, gate, up, down).

    handle = fuse_projections(model)      # None (one logged line says why) for a model that is not Llama-like
    handle.describe()                     # {"qkv_proj": 30, "gate_up_proj": 30, "undone": False}
    handle.undo()                         # the original modules back, with their own weights again

What it is: the `fuse_projections` setting of `StreamOptions` (auto: on for the pooled static/graph paths), applied
by the runtime to the model it is given, in place and once, when it builds its first decoder (`static.make_pool`,
`decoders.EagerDecoder`), so before any step runs or a CUDA graph is captured; a decoder built with the setting
off leaves the model as it is (it does not undo a fuse another decoder made). The design, chosen to patch the
smallest surface: transformers' attention and MLP forwards stay as they are (no modeling file is forked, no
forward replaced). They call `self.q_proj(x)`, `self.k_proj(x)`, `self.v_proj(x)` (and `self.gate_proj(x)`,
`self.up_proj(x)`) on one input; each of those names becomes a small `ProjectionPart`, and the parent module gets
ONE `FusedLinear` (`qkv_proj` / `gate_up_proj`) whose weight is the parts' weights concatenated. The first part
called with a new input computes the whole product once; it and the others hand out their column slices
(views: no copy); the last part of the group drops the product. A part called with another input (any other
caller) computes the product of that input, so every call returns `x @ W_part.T` whatever the order: in float32
the fused model's logits equal the unfused model's within 1e-5 (only the matmul's summation order may differ).
The pending product is one tuple (input, product, parts left), read and replaced whole: every call sees one
consistent state, and a product left by a forward interrupted between two parts matches only that very input
tensor. Runs unchanged inside a CUDA graph and under torch.compile (no graph break).

Memory: the concatenated weight is the only copy. While fused, the original `nn.Linear`s are kept (for `undo`)
with their weights as views into it; `undo()` puts them back with a copy each of their rows of the fused weight
(taken from the fused weight as it is then: moved or cast with the model, they follow), so the model's state
dict is bit for bit what it was. Undo only when no decoder built on the fused model runs any more: a captured
graph reads the fused weight's memory.

Left alone, with one logged line (once per model) saying why: a model without q_proj/k_proj/v_proj or
gate_proj/up_proj modules (already fused, other attention), or whose projections are not plain bias-free
`nn.Linear`s on one device and dtype (biases, LoRA/peft wrappers, quantized layers, hooks).

Test: `python -m pytest tests/test_runtime_fused.py -q` (CPU); `python -m pytest tests/test_runtime_gpu.py -q -m gpu
-k fused` (the CUDA graph).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_DECISIONS: "weakref.WeakKeyDictionary[nn.Module, FuseHandle | str]" = weakref.WeakKeyDictionary()


class FusedLinear(nn.Linear):
    """One bias-free Linear over the concatenated weights of projections of the same input; `take` hands out the
    projections' slices of one shared product."""

    def __init__(self, linears: list[nn.Linear]):
        first = linears[0].weight
        super().__init__(first.shape[1], sum(linear.out_features for linear in linears), bias=False,
                         device="meta", dtype=first.dtype)
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([linear.weight for linear in linears]),
                                       requires_grad=first.requires_grad)
        sizes = [linear.out_features for linear in linears]
        self.bounds = [(end - size, end) for size, end in zip(sizes, itertools.accumulate(sizes))]
        self._pending: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (input, product, parts still to take)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Projection `index` of `x`: a slice of the product of `x`, computed by the first part that asks."""
        pending = self._pending
        if pending is None or pending[0] is not x:
            pending = (x, super().forward(x), len(self.bounds))
        source, product, left = pending
        self._pending = (source, product, left - 1) if left > 1 else None
        start, end = self.bounds[index]
        return product[..., start:end]


class ProjectionPart(nn.Module):
    """Stands where `q_proj` (`k_proj`, ...) stood: returns its slice of the parent's `FusedLinear` product."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the parent holds it once (one state-dict entry)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.take(self.index, x)

    def extra_repr(self) -> str:
        start, end = self.fused.bounds[self.index]
        return f"columns {start}:{end} of the fused projection"


@dataclass
class FuseHandle:
    """What `fuse_projections` changed: per parent module, the fused name and the original Linears it replaced."""

    model: "weakref.ref[nn.Module]"  # weak: the handle is kept in a weak-keyed table under this very model
    groups: list[tuple[nn.Module, str, dict[str, nn.Linear]]] = field(repr=False)
    undone: bool = False

    def describe(self) -> dict:
        counts = {name: sum(1 for _, fused, _ in self.groups if fused == name) for name in GROUPS}
        return {**counts, "undone": self.undone}

    def undo(self) -> None:
        """The original Linears back in place, each with its own copy of its rows of the (current) fused weight."""
        if self.undone:
            raise ValueError("these fused projections were already undone")
        with torch.no_grad():
            for parent, name, originals in self.groups:
                fused = getattr(parent, name)
                for (part, linear), (start, end) in zip(originals.items(), fused.bounds):
                    linear.weight.data = fused.weight.data[start:end].clone()
                    setattr(parent, part, linear)
                delattr(parent, name)
        self.undone = True
        model = self.model()
        if model is not None:
            _DECISIONS.pop(model, None)


def fuse_projections(model: nn.Module) -> FuseHandle | None:
    """Fuse `model`'s q/k/v and gate/up projections in place (idempotent: a fused model returns its handle), or
    None with one logged line when the model is not Llama-like (`refusal`)."""
    decided = _DECISIONS.get(model)
    if isinstance(decided, FuseHandle):
        return decided
    groups = projection_groups(model)
    reason = refusal(groups)
    if reason is not None:
        if decided != reason:
            log.warning("projections left unfused (fuse_projections): %s", reason)
            _DECISIONS[model] = reason
        return None
    fused_groups = []
    for _, parent, name in groups:
        originals = {part: getattr(parent, part) for part in GROUPS[name]}
        fused = FusedLinear(list(originals.values()))
        with torch.no_grad():
            for linear, (start, end) in zip(originals.values(), fused.bounds):
                linear.weight.data = fused.weight.data[start:end]  # a view: the fused weight is the only copy
        setattr(parent, name, fused)
        for index, part in enumerate(originals):
            setattr(parent, part, ProjectionPart(fused, index))
        fused_groups.append((parent, name, originals))
    handle = FuseHandle(weakref.ref(model), fused_groups)
    _DECISIONS[model] = handle
    return handle


def is_fused(model: nn.Module) -> bool:
    """Whether `model`'s projections are fused now (by `fuse_projections`, not undone)."""
    return isinstance(_DECISIONS.get(model), FuseHandle)


def unfuse(model: nn.Module) -> bool:
    """Undo `model`'s fused projections, if any (a benchmark's stock-transformers peers); True if there were."""
    decided = _DECISIONS.get(model)
    if isinstance(decided, FuseHandle):
        decided.undo()
        return True
    return False


def projection_groups(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """`(path, parent, fused name)` for every module holding all of a group's projections (e.g. each
    `self_attn` with q_proj, k_proj and v_proj)."""
    return [(path, module, name) for path, module in model.named_modules() for name, parts in GROUPS.items()
            if all(isinstance(getattr(module, part, None), nn.Module) for part in parts)]


def refusal(groups: list[tuple[str, nn.Module, str]]) -> str | None:
    """Why these projection groups cannot be fused (None: they can, all of them)."""
    for name, parts in GROUPS.items():
        if not any(fused == name for _, _, fused in groups):
            return f"the model has no {'/'.join(parts)} modules to fuse"
    for path, parent, name in groups:
        linears = [getattr(parent, part) for part in GROUPS[name]]
        where = f"{path}.{GROUPS[name][0]}" if path else GROUPS[name][0]
        if hasattr(parent, name):
            return f"{path or 'the model'} already has a {name}"
        for part, linear in zip(GROUPS[name], linears):
            at = f"{path}.{part}" if path else part
            if type(linear) is not nn.Linear:
                return (f"{at} is a {type(linear).__module__}.{type(linear).__qualname__}, not a plain nn.Linear "
                        "(LoRA/peft, quantized or wrapped layers keep their own forward)")
            if linear.bias is not None:
                return f"{at} has a bias"
            if linear._forward_hooks or linear._forward_pre_hooks or hasattr(linear, "_hf_hook"):
                return f"{at} has forward hooks (e.g. accelerate offloading)"
        weights = [linear.weight for linear in linears]
        if len({(w.shape[1], w.dtype, w.device) for w in weights}) > 1 or weights[0].is_meta:
            return f"the projections at {where} differ in input size, dtype or device (or are not loaded)"
    return None
