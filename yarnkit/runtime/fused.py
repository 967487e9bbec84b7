"""The runtime's fuse: q/k/v in one `nn.Linear` and gate/up in one, so a decode step runs 4 matmuls per Llama
layer instead of 7 (q, k, v, o, gate, up, down), and every Llama-form RMSNorm as one `torch.rms_norm` (one fused
kernel on CUDA instead of ~7 elementwise/reduction kernels: 61 norms per step in a 30-layer model).

    handle = fuse(model)                  # None (one logged line per part says why) when nothing can be fused
    handle.describe()                     # {"qkv_proj": 30, "gate_up_proj": 30, "rms_norm": 61, "undone": False}
    fused_parts(model)                    # {"fused_projections": True, "fused_norms": True}
    handle.undo()                         # the original modules back, with their own weights again

What it is: the `fuse` setting of `StreamOptions` (`--fuse auto|true|false`; auto: on for the pooled static/graph
paths), applied by the runtime to the model it is given, in place and once, when it builds its first decoder
(`static.make_pool`, `decoders.EagerDecoder`), so before any step runs or a CUDA graph is captured; a decoder built
with the setting off leaves the model as it is (it does not undo a fuse another decoder made). One setting covers
projections and norms: both are the same kind of change (the model's modules swapped in place at load, the same
function up to rounding, one undo), made for the same reason (fewer kernels per decode step), and each part that
a model cannot take is left alone on its own, in one logged line; a second flag would only multiply the bench
matrix. The projections and the norms are reported apart (`fused_parts`, each bench row's `fused_projections` /
`fused_norms`).

Projections, chosen to patch the smallest surface: transformers' attention and MLP forwards stay as they are (no
modeling file is forked, no forward replaced). They call `self.q_proj(x)`, `self.k_proj(x)`, `self.v_proj(x)` (and
`self.gate_proj(x)`, `self.up_proj(x)`) on one input; each of those names becomes a small `ProjectionPart`, and the
parent module gets ONE `FusedLinear` (`qkv_proj` / `gate_up_proj`) whose weight is the parts' weights
concatenated. The first part called with a new input computes the whole product once; it and the others hand out
their column slices (views: no copy); the last part of the group drops the product. A part called with another
input (any other caller) computes the product of that input, so every call returns `x @ W_part.T` whatever the
order: in float32 the fused model's logits equal the unfused model's within 1e-5 (only the matmul's summation order
may differ). The pending product is one tuple (input, product, parts left), read and replaced whole: every call
sees one consistent state, and a product left by a forward interrupted between two parts matches only that very
input tensor. Runs unchanged inside a CUDA graph and under torch.compile (no graph break).

Norms: each module whose class name ends with "RMSNorm", with a 1-D `weight` and a float `variance_epsilon` (or
`eps`), whose forward is transformers' Llama one (the same bytecode: `llama_form`), becomes a `FusedRMSNorm`
holding THE SAME weight Parameter and calling `torch.rms_norm(x, weight.shape, weight, eps)`. Numerics: both
compute the variance in float32; transformers rounds the normalized value to the input dtype and then multiplies
by the weight (a second rounding), torch.rms_norm multiplies in float32 and rounds once. In float32 that is one
float32 rounding apart (logits within 1e-5 through the pool); in bf16 an output differs by at most one bf16 ulp
(2^-7 relative) and is the nearer one to the exact value (within half an ulp, where transformers' is within one):
about a quarter of the elements differ by that ulp (tests/test_runtime_fused.py measures it).

Memory: the concatenated weight is the only copy. While fused, the original `nn.Linear`s are kept (for `undo`)
with their weights as views into it; `undo()` puts them back with a copy each of their rows of the fused weight
(taken from the fused weight as it is then: moved or cast with the model, they follow), so the model's state
dict is bit for bit what it was. Undo only when no decoder built on the fused model runs any more: a captured
graph reads the fused weight's memory.

Memory of the norms: none added (the same Parameter); `undo()` puts the original norm objects back, holding the
Parameter they always shared (or the one a conversion put on the `FusedRMSNorm`).

Left alone, with one logged line (once per model) saying why: projections of a model without q_proj/k_proj/v_proj
or gate_proj/up_proj modules (already fused, other attention), or not plain bias-free `nn.Linear`s on one device
and dtype (biases, LoRA/peft wrappers, quantized layers, hooks); norms of a model with no RMSNorm, or with any
RMSNorm not of the Llama form (Gemma's `1 + weight`, offsets, biases, a hub kernel's forward, hooks): all of its
norms stay as they are. A norm's input must be in the model's dtype (the runtime's hidden states are).

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
TRANSFORMERS_CODE = ("transformers.", "transformers_modules.")  # norms' code: the library, a model's remote code
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


class FusedRMSNorm(nn.Module):
    """Stands where a Llama-form RMSNorm stood: THE SAME weight Parameter, one `torch.rms_norm` call (CUDA: one
    fused kernel; float32 inside, rounded once to the input dtype)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight  # the very Parameter: the state dict entry and its storage stay as they were
        self.eps = norm_eps(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps} (torch.rms_norm)"


@dataclass
class FuseHandle:
    """What `fuse` changed: per parent module, the fused projection name and the original Linears it replaced;
    per RMSNorm, its parent, its attribute name and the original module."""

    model: "weakref.ref[nn.Module]"  # weak: the handle is kept in a weak-keyed table under this very model
    groups: list[tuple[nn.Module, str, dict[str, nn.Linear]]] = field(repr=False)
    norms: list[tuple[nn.Module, str, nn.Module]] = field(repr=False)
    undone: bool = False

    def describe(self) -> dict:
        counts = {name: sum(1 for _, fused, _ in self.groups if fused == name) for name in GROUPS}
        return {**counts, "rms_norm": len(self.norms), "undone": self.undone}

    def parts(self) -> dict[str, bool]:
        """Whether the projections and the norms are fused now (a benchmark row's `fused_projections`,
        `fused_norms`)."""
        return {"fused_projections": bool(self.groups) and not self.undone,
                "fused_norms": bool(self.norms) and not self.undone}

    def undo(self) -> None:
        """The original modules back in place: Linears with their own copy of their rows of the (current) fused
        weight, norms with the (current) weight Parameter they always shared."""
        if self.undone:
            raise ValueError("this fuse was already undone")
        with torch.no_grad():
            for parent, name, originals in self.groups:
                fused = getattr(parent, name)
                for (part, linear), (start, end) in zip(originals.items(), fused.bounds):
                    linear.weight.data = fused.weight.data[start:end].clone()
                    setattr(parent, part, linear)
                delattr(parent, name)
        for parent, name, norm in self.norms:
            norm.weight = getattr(parent, name).weight  # the same object unless a conversion replaced it
            setattr(parent, name, norm)
        self.undone = True
        model = self.model()
        if model is not None:
            _DECISIONS.pop(model, None)


def fuse(model: nn.Module) -> FuseHandle | None:
    """Fuse `model` in place (idempotent: a fused model returns its handle): its q/k/v and gate/up projections
    when it is Llama-like (`refusal`), its RMSNorms when all are of the Llama form (`norm_refusal`). Each part
    left alone says why in one logged line (once per model); None when neither was fused."""
    decided = _DECISIONS.get(model)
    if isinstance(decided, FuseHandle):
        return decided
    groups = projection_groups(model)
    reasons = {"projections": refusal(groups), "norms": norm_refusal(model)}
    if decided is None:
        for what, reason in reasons.items():
            if reason is not None:
                log.warning("%s left unfused (--fuse): %s", what, reason)
    if all(reasons.values()):
        _DECISIONS[model] = "; ".join(reasons.values())
        return None
    fused_groups = [] if reasons["projections"] else [fuse_group(parent, name) for _, parent, name in groups]
    norms = [] if reasons["norms"] else [fuse_norm(parent, name) for parent, name, _ in rms_norms(model)]
    handle = FuseHandle(weakref.ref(model), fused_groups, norms)
    _DECISIONS[model] = handle
    return handle


def fuse_group(parent: nn.Module, name: str) -> tuple[nn.Module, str, dict[str, nn.Linear]]:
    """One `FusedLinear` `name` on `parent` in place of its parts' Linears (kept, as views, for `undo`)."""
    originals = {part: getattr(parent, part) for part in GROUPS[name]}
    fused = FusedLinear(list(originals.values()))
    with torch.no_grad():
        for linear, (start, end) in zip(originals.values(), fused.bounds):
            linear.weight.data = fused.weight.data[start:end]  # a view: the fused weight is the only copy
    setattr(parent, name, fused)
    for index, part in enumerate(originals):
        setattr(parent, part, ProjectionPart(fused, index))
    return parent, name, originals


def fuse_norm(parent: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """A `FusedRMSNorm` as `parent.name`, in place of the norm it returns (kept for `undo`)."""
    norm = getattr(parent, name)
    setattr(parent, name, FusedRMSNorm(norm))
    return parent, name, norm


def fused_parts(model: nn.Module) -> dict[str, bool]:
    """`{"fused_projections": bool, "fused_norms": bool}`: what of `model` is fused now."""
    decided = _DECISIONS.get(model)
    if isinstance(decided, FuseHandle):
        return decided.parts()
    return {"fused_projections": False, "fused_norms": False}


def parts_label(parts: dict) -> str:
    """What `parts` (`fused_parts`, or a bench row holding its keys) says ran fused, for tables and titles:
    "projections+norms", "projections", "norms" or "none"."""
    return "+".join(what for what in ("projections", "norms") if parts.get(f"fused_{what}")) or "none"


def is_fused(model: nn.Module) -> bool:
    """Whether anything of `model` (projections or norms) is fused now (by `fuse`, not undone)."""
    return isinstance(_DECISIONS.get(model), FuseHandle)


def unfuse(model: nn.Module) -> bool:
    """Undo `model`'s fuse, if any (a benchmark's stock-transformers peers); True if there was one."""
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


def rms_norms(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """`(parent, attribute name, norm)` for every module of `model` whose class name ends with "RMSNorm"."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child).__name__.endswith("RMSNorm")]


def norm_eps(norm: nn.Module) -> float | None:
    """The epsilon of an RMSNorm (`variance_epsilon`, Llama's name, or `eps`); None if it has no float one."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def llama_form(forward) -> bool:
    """Whether `forward` is transformers' Llama RMSNorm forward, compiled to the same bytecode (the classes copied
    from it, Mistral's, Qwen2's, SmolLM's ...): float32 variance, `weight * normalized.to(input dtype)`. Gemma's
    `(1 + weight)`, offsets, biases or a hub kernel's forward are other code. Both must be transformers' own code
    (or a model's remote code): Liger-Kernel swaps `modeling_llama.LlamaRMSNorm` for its own class process-wide (a
    CUDA training run in the same process applies it), whose forward also serves Gemma's offset norm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, theirs = getattr(forward, "__code__", None), LlamaRMSNorm.forward.__code__
    if ours is None or not all(getattr(f, "__module__", "").startswith(TRANSFORMERS_CODE)
                               for f in (forward, LlamaRMSNorm.forward)):
        return False
    names = tuple("variance_epsilon" if name == "eps" else name for name in ours.co_names)
    return (ours.co_code, ours.co_consts, names) == (theirs.co_code, theirs.co_consts, theirs.co_names)


def norm_refusal(model: nn.Module) -> str | None:
    """Why `model`'s RMSNorms cannot become `torch.rms_norm` (None: all of them can)."""
    norms = rms_norms(model)
    if not norms:
        return "the model has no RMSNorm modules"
    paths = {module: path for path, module in model.named_modules()}
    for _, _, norm in norms:
        at = paths[norm]
        kind = f"{type(norm).__module__}.{type(norm).__qualname__}"
        if isinstance(norm, FusedRMSNorm):
            return f"{at} is already a torch.rms_norm"
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or weight.is_meta:
            return f"{at} ({kind}) has no loaded 1-D weight"
        if norm_eps(norm) is None:
            return f"{at} ({kind}) has no float variance_epsilon / eps"
        if getattr(norm, "bias", None) is not None or "forward" in vars(norm) or not llama_form(type(norm).forward):
            return (f"{at} ({kind}) does not compute Llama's weight * x / rms(x) (e.g. Gemma's 1 + weight, an offset "
                    "or bias, a replaced forward)")
        if norm._forward_hooks or norm._forward_pre_hooks or hasattr(norm, "_hf_hook"):
            return f"{at} has forward hooks (e.g. accelerate offloading)"
    return None
