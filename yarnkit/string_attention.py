"""STRING (An et al., "Why Does the Effective Context Length of LLMs Fall Short?", ICLR 2025) as an attention mode.

STRING changes RoPE's relative positions at inference, with no training. A query at position i and a key at
position j <= i are d = i - j apart; with a shift S and a local window W (0 <= W < S):

    d' = d              if d <  S      (near keys: unchanged)
    d' = d - S + W      if d >= S      (far keys: the largest, under-trained distances become well-trained ones)

so the distances the model sees stay below L - S + W for a context of L tokens. S is about a third of the trained
context, W = 128 (the paper's defaults). The score of a far key needs the query at position i - (S - W), and RoPE
rotations compose (R(i) R(-delta) = R(i - delta)), so the already-rotated query is turned back by delta = S - W
positions with the model's own frequencies and a *pure* rotation (cos/sin without YaRN's attention factor, which
the query already carries once). Attention then runs over the two key sets, merged exactly:

    out = (Z_near * out_near + Z_far * out_far) / (Z_near + Z_far),   Z = exp(log-sum-exp of the set's scores)

Kernels (`StringSetting.kernel`):
- `flex`: two block-masked FlexAttention passes (near: causal & d < S; far: d >= S) that return their LSE,
  merged in float32 (torch.compile'd on CUDA: the 64k-prompt path; eager elsewhere, which materialises scores);
- `dense`: one float32 score matrix, near or far score per (query, key), in query chunks of bounded memory: the
  decode path (a few query rows against the cache) and CPU's path;
- `auto`: flex on CUDA for large prefills (query x key > 2**24), dense otherwise;
- `reference`: float64, each pair rotated by its remapped distance from un-rotated q/k (tests, small sizes only).

Positions: query positions come from the `position_ids` the model passes (else the last rows of the keys);
the key in cache slot j sits at position j (dense caches, `yarnkit.runtime` sink caches and slot pools). A
boolean or additive `attention_mask` (padding, slot masks) is honoured on top of causality.

    handle = apply_string(model, shift=21845, window=128)   # the model's attention now runs STRING
    handle.describe(); handle.undo()

The patch is the smallest surface: the model's attention implementation becomes `yarnkit_string` (registered
once in transformers' `AttentionInterface`, with SDPA's mask builder), and each attention layer carries its
`StringSetting`; undo puts the previous implementation back. No modeling file is touched.
Test: `python -m pytest tests/test_string_attention.py -q`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch

from yarnkit.errors import BadValue
from yarnkit.patch import rotary_module

IMPLEMENTATION = "yarnkit_string"
DEFAULT_WINDOW = 128
KERNELS = ("auto", "flex", "dense", "reference")
SETTING_ATTRIBUTE = "string_setting"  # on each attention layer while STRING is applied
FLEX_MIN_SCORES = 2 ** 24             # auto: query x key rows above this take flex on CUDA
DENSE_CHUNK_SCORES = 2 ** 25          # dense: float32 scores held at once (batch x heads x rows x keys)


class StringError(BadValue):
    """A STRING setting that cannot work (S <= W, S at or beyond the context, an unsupported model)."""


def remapped_distance(distance, shift: int, window: int):
    """STRING's relative distance: d below `shift` unchanged, d >= shift mapped to d - shift + window."""
    if isinstance(distance, torch.Tensor):
        return torch.where(distance >= shift, distance - shift + window, distance)
    return distance - shift + window if distance >= shift else distance


def check_setting(shift: int, window: int, context: int | None = None, context_name: str = "the model's context"
                  ) -> None:
    """One line for a setting outside 0 <= W < S < context (`context_name` says what bounds the distances)."""
    example_shift = max(context // 3, 2) if context else 21845  # the paper's S: a third of the context
    example_window = DEFAULT_WINDOW if example_shift > DEFAULT_WINDOW else example_shift // 8
    example = f"e.g. --string {example_shift},{example_window}"
    if window < 0:
        raise StringError(f"STRING window W={window} is negative", f"pass W >= 0, {example}")
    if shift <= window:
        raise StringError(f"STRING shift S={shift} must exceed the local window W={window}",
                          f"pass S > W (S about a third of the trained context), {example}")
    if context is not None and shift >= context:
        raise StringError(f"STRING shift S={shift} is not below {context_name} {context}, so no distance would "
                          "change", f"pass S < {context}, {example}")


def parse_setting(text: str) -> tuple[int, int]:
    """`"S"` or `"S,W"` (the `--string` flag) -> (S, W); W defaults to 128. Range checks: `check_setting`."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        shift = int(parts[0])
        window = int(parts[1]) if len(parts) == 2 else DEFAULT_WINDOW
    except ValueError:
        raise StringError(f"--string {text!r}: expected SHIFT or SHIFT,WINDOW in tokens",
                          f"e.g. --string 21845,{DEFAULT_WINDOW}") from None
    check_setting(shift, window)
    return shift, window


# ---- rotations ---------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, inv_freq: torch.Tensor, positions) -> torch.Tensor:
    """Rotate `x [..., n, d]` by RoPE angle `positions * inv_freq` (pure: no attention factor), transformers'
    half-split pairing; channels past 2 * len(inv_freq) (partial rotary) pass through. Math in float32 or wider."""
    compute = torch.promote_types(x.dtype, torch.float32)
    inv_freq = inv_freq.to(device=x.device, dtype=torch.float64)
    if isinstance(positions, torch.Tensor):
        angles = positions.to(torch.float64)[..., None] * inv_freq
    else:  # one offset for every row: no host-to-device copy (CUDA-graph safe)
        angles = inv_freq * float(positions)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(compute), angles.sin().to(compute)
    rot_dim = cos.shape[-1]
    turned = x[..., :rot_dim].to(compute) * cos + _rotate_half(x[..., :rot_dim].to(compute)) * sin
    return torch.cat((turned, x[..., rot_dim:].to(compute)), dim=-1).to(x.dtype)


def shifted_query(query: torch.Tensor, inv_freq: torch.Tensor, shift: int, window: int) -> torch.Tensor:
    """The rotated query turned back by S - W positions: R(i) q -> R(i - S + W) q (the far keys' query)."""
    return rotate(query, inv_freq, -(shift - window))


# ---- the setting and its attention function -----------------------------------------------------------------------
@dataclass
class StringSetting:
    """One model's STRING: shift S, window W, kernel, and its rotary module (read for the current `inv_freq`)."""

    shift: int
    window: int
    kernel: str = "auto"
    rotary: torch.nn.Module = field(default=None, repr=False)


def string_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (`AttentionInterface`): q [b, h, q, d] and k/v [b, h_kv, k, d] arrive
    rotated; returns ([b, q, h, d], None)."""
    setting = getattr(module, SETTING_ATTRIBUTE, None)
    if setting is None:
        raise RuntimeError(f"{type(module).__name__} runs '{IMPLEMENTATION}' attention but apply_string did not "
                           "patch it")
    if module.training:
        raise StringError("STRING is an inference mode; the model is in training mode", "call model.eval() first")
    if kwargs.get("sliding_window"):
        raise StringError("STRING needs full attention; this layer has a sliding window", "use a full-attention model")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    positions = query_positions(kwargs.get("position_ids"), query.shape[2], key.shape[2], query.device)
    allowed = allowed_keys(attention_mask, key.shape[2])
    inv_freq = setting.rotary.inv_freq
    kernel = setting.kernel
    if kernel == "auto":
        large = query.shape[2] * key.shape[2] > FLEX_MIN_SCORES
        kernel = "flex" if query.is_cuda and large else "dense"
    run = {"flex": flex_attention_string, "dense": dense_attention, "reference": reference_attention}[kernel]
    out = run(query, key, value, positions, allowed, inv_freq, setting.shift, setting.window, scaling)
    return out.transpose(1, 2).contiguous(), None


def query_positions(position_ids, q_len: int, k_len: int, device) -> torch.Tensor:
    """[1 or b, q] integer positions: the model's `position_ids`, else the keys' last q positions."""
    if position_ids is None:
        return torch.arange(k_len - q_len, k_len, device=device)[None]
    positions = position_ids.to(device=device, dtype=torch.long)
    return positions if positions.dim() == 2 else positions.reshape(-1, q_len)


def allowed_keys(attention_mask, k_len: int) -> torch.Tensor | None:
    """A boolean [b, 1 or h, q, k] mask from transformers' mask (bool, or additive 0 / large negative), or None."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor):
        return None
    mask = attention_mask[..., :k_len]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, h, q, d] -> [b, h_kv, g * q, d] so each KV head meets its query group without copying the keys."""
    b, h, q, d = query.shape
    return query.reshape(b, kv_heads, (h // kv_heads) * q, d)


def _visibility(positions, allowed, rows: slice, k_len: int, device):
    """(visible, far) booleans [b or 1, 1 or h, rows, k]: causal (and the mask), and d >= S membership inputs."""
    distance = positions[:, None, rows, None] - torch.arange(k_len, device=device)
    visible = distance >= 0
    if allowed is not None:
        visible = visible & allowed[:, :, rows]
    return visible, distance


def dense_attention(query, key, value, positions, allowed, inv_freq, shift, window, scaling):
    """STRING with materialised float32 scores, in query chunks of at most DENSE_CHUNK_SCORES; [b, h, q, d]."""
    b, h, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    near_query = query.float() * scaling
    far_query = shifted_query(query, inv_freq, shift, window).float() * scaling
    keys, values = key.float().transpose(-1, -2), value.float()
    step = max(1, DENSE_CHUNK_SCORES // max(1, b * h * k_len))
    outputs = []
    for first in range(0, q_len, step):
        rows = slice(first, min(first + step, q_len))
        n = rows.stop - rows.start
        near_scores = (_grouped(near_query[:, :, rows], kv_heads) @ keys).view(b, h, n, k_len)
        far_scores = (_grouped(far_query[:, :, rows], kv_heads) @ keys).view(b, h, n, k_len)
        visible, distance = _visibility(positions, allowed, rows, k_len, query.device)
        scores = torch.where(distance >= shift, far_scores, near_scores).masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if allowed is not None:  # a padded row may see no key at all: zeros, not NaN
            probs = probs.nan_to_num_(0.0)
        out = probs.view(b, kv_heads, -1, k_len) @ values
        outputs.append(out.view(b, h, n, d))
    return torch.cat(outputs, dim=2).to(query.dtype)


def reference_attention(query, key, value, positions, allowed, inv_freq, shift, window, scaling):
    """Float64 STRING from the definition: un-rotate q and k to their raw vectors, then score each pair with RoPE at
    its remapped distance. Materialises [b, h, q, k, pairs]: small sizes only."""
    b, h, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    inv = inv_freq.to(device=query.device, dtype=torch.float64)
    pairs = inv.numel()
    key_positions = torch.arange(k_len, device=query.device)
    raw_q = rotate(query.double(), inv, -positions[:, None, :].expand(b, 1, q_len))
    raw_k = rotate(key.double(), inv, -key_positions)
    raw_k = raw_k.repeat_interleave(h // kv_heads, dim=1)
    values = value.double().repeat_interleave(h // kv_heads, dim=1)
    distance = positions[:, None, :, None] - key_positions               # [b|1, 1, q, k]
    angle = remapped_distance(distance, shift, window).double()[..., None] * inv   # [b|1, 1, q, k, pairs]
    qa, qb = raw_q[..., :pairs], raw_q[..., pairs:2 * pairs]
    ka, kb = raw_k[..., :pairs], raw_k[..., pairs:2 * pairs]
    # pairs as complex numbers z = a + ib; RoPE multiplies by e^(i pos θ), so
    # <R(i) q, R(j) k> = Re(z_q conj(z_k) e^(i d θ)) = (qa ka + qb kb) cos(d θ) - (qb ka - qa kb) sin(d θ);
    # STRING puts d' in place of d
    dot = torch.einsum("bhqp,bhkp->bhqkp", qa, ka) + torch.einsum("bhqp,bhkp->bhqkp", qb, kb)
    cross = torch.einsum("bhqp,bhkp->bhqkp", qb, ka) - torch.einsum("bhqp,bhkp->bhqkp", qa, kb)
    scores = (dot * angle.cos() - cross * angle.sin()).sum(-1)
    scores = scores + raw_q[..., 2 * pairs:] @ raw_k[..., 2 * pairs:].transpose(-1, -2)  # unrotated channels
    visible = distance >= 0
    if allowed is not None:
        visible = visible & allowed
    scores = (scores * scaling).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ values).to(query.dtype)


# ---- FlexAttention ----------------------------------------------------------------------------------------------
def _string_mask(positions, shift: int, far: torch.Tensor, allowed):
    """One mask_mod for both passes (one compiled kernel): causal, the mask, and (d >= S) == far."""
    def mask_mod(b, h, q_idx, kv_idx):
        distance = positions[b, q_idx] - kv_idx
        keep = (distance >= 0) & ((distance >= shift) == far)
        if allowed is not None:
            keep = keep & allowed[b, 0, q_idx, kv_idx]
        return keep
    return mask_mod


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(query, key, value, block_mask, scaling):
    """FlexAttention's (output, natural-log LSE [b, h, q]) on any torch >= 2.5 (return_lse or AuxRequest)."""
    from torch.nn.attention import flex_attention as flex_module

    compiled = query.is_cuda and not torch.compiler.is_compiling()
    run = _compiled_flex() if compiled else flex_module.flex_attention
    aux = getattr(flex_module, "AuxRequest", None)
    options = {"return_aux": aux(lse=True)} if aux is not None else {"return_lse": True}
    gqa = query.shape[1] != key.shape[1]
    with warnings.catch_warnings():  # eager flex (CPU, small tests) warns that it materialises the scores
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out, extra = run(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa, **options)
    return out, (extra.lse if aux is not None else extra)


def flex_attention_string(query, key, value, positions, allowed, inv_freq, shift, window, scaling):
    """STRING as two block-masked FlexAttention passes merged by their log-sum-exp; [b, h, q, d]."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        raise StringError(f"the flex kernel needs FlexAttention (torch >= 2.5; this is {torch.__version__})",
                          "upgrade torch, or use kernel='dense'") from None
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    positions = positions.expand(batch, q_len)  # eager flex calls mask_mod with every query batch index
    if allowed is not None:
        allowed = allowed.expand(batch, 1, q_len, k_len)  # transformers' masks have one head row
    outputs = []
    for far, pass_query in ((False, query), (True, shifted_query(query, inv_freq, shift, window))):
        flag = torch.tensor(far, device=query.device)
        block_mask = create_block_mask(_string_mask(positions, shift, flag, allowed), batch, None, q_len, k_len,
                                       device=query.device, _compile=query.is_cuda)
        outputs.append(_flex(pass_query, key, value, block_mask, scaling))
    (near, near_lse), (far, far_lse) = outputs
    top = torch.maximum(near_lse, far_lse)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    near_weight, far_weight = (near_lse - top).exp()[..., None], (far_lse - top).exp()[..., None]
    total = (near_weight + far_weight).clamp_min(torch.finfo(torch.float32).tiny)
    merged = (near.float() * near_weight + far.float() * far_weight) / total
    return merged.to(query.dtype)


# ---- applying it to a model ---------------------------------------------------------------------------------------
def register() -> None:
    """Register `yarnkit_string` with transformers (idempotent): the attention function and SDPA's mask builder
    (a boolean mask only where padding or a cache needs one; None for a plain causal prefill)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, string_attention)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that call transformers' attention interface (`*Attention` modules with a `layer_idx`)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


@dataclass
class StringHandle:
    """What `apply_string` changed, with `undo()` to restore the previous attention implementation."""

    model: torch.nn.Module = field(repr=False)
    setting: StringSetting
    previous: str
    context: int | None
    layers: list = field(repr=False, default_factory=list)
    undone: bool = False

    def describe(self) -> dict:
        return {"shift": self.setting.shift, "window": self.setting.window, "kernel": self.setting.kernel,
                "context": self.context, "attn_implementation": IMPLEMENTATION, "replaced": self.previous,
                "max_distance": (None if self.context is None else
                                 int(remapped_distance(self.context - 1, self.setting.shift, self.setting.window))),
                "undone": self.undone}

    def undo(self) -> None:
        if self.undone:
            raise StringError("this STRING patch was already undone")
        for layer in self.layers:
            delattr(layer, SETTING_ATTRIBUTE)
        self.model.set_attn_implementation(self.previous)
        self.undone = True


def applied_setting(model: torch.nn.Module) -> StringSetting | None:
    """The model's STRING setting while `apply_string` is in effect, else None."""
    if model.config.get_text_config()._attn_implementation != IMPLEMENTATION:
        return None
    return next((getattr(layer, SETTING_ATTRIBUTE) for layer in attention_layers(model)
                 if hasattr(layer, SETTING_ATTRIBUTE)), None)


def apply_string(model: torch.nn.Module, shift: int, window: int = DEFAULT_WINDOW, kernel: str = "auto",
                 context: int | None = None, context_name: str = "the model's context") -> StringHandle:
    """Make `model`'s attention run STRING with shift S and window W; returns a handle with `undo()`.

    context: the longest distance + 1 the model will see (default `config.max_position_embeddings`; the runtime
    passes its cache window, named by `context_name`); S must lie below it. kernel: one of KERNELS (see above).
    """
    config = model.config.get_text_config()
    context = context if context is not None else getattr(config, "max_position_embeddings", None)
    check_setting(int(shift), int(window), context, context_name)
    if kernel not in KERNELS:
        raise StringError(f"STRING kernel {kernel!r} is unknown", f"choose one of {', '.join(KERNELS)}")
    layer_types = getattr(config, "layer_types", None)
    sliding = (any(kind != "full_attention" for kind in layer_types) if layer_types
               else getattr(config, "sliding_window", None) is not None and config.model_type == "mistral")
    if sliding:
        raise StringError(f"{config.model_type} has sliding-window attention layers; STRING remaps distances of full "
                          "attention only", "use a model whose layers all attend fully (llama, qwen2/3 without "
                          "sliding windows, phi3)")
    try:
        rotary = rotary_module(model)
    except ValueError as error:
        raise StringError(str(error).replace("the sink cache", "STRING")) from None
    previous = config._attn_implementation
    if previous == IMPLEMENTATION:
        raise StringError("STRING is already applied to this model", "undo the first handle before applying again")
    layers = attention_layers(model)
    if not layers:
        raise StringError(f"{type(model).__name__} has no attention layers that STRING can patch")
    register()
    setting = StringSetting(int(shift), int(window), kernel, rotary)
    for layer in layers:
        setattr(layer, SETTING_ATTRIBUTE, setting)
    model.set_attn_implementation(IMPLEMENTATION)
    return StringHandle(model, setting, previous, context, layers)
