"""Which SDPA kernel transformers' `sdpa` attention prefers: shared by training (`model.sdpa_kernel`) and
evaluation (`yarnkit eval --sdpa-kernel`).

`use_sdpa_kernel("cudnn" | "flash" | "efficient" | "math")` re-registers transformers' `sdpa` attention with a
function that calls `F.scaled_dot_product_attention` under `torch.nn.attention.sdpa_kernel` with that kernel
first (the others stay as fall-backs). cuDNN gets grouped-query K/V expanded to all heads unless this torch's
cuDNN kernel takes `enable_gqa` (probed once on the GPU). Process-global, like every transformers attention
registration; "auto" restores transformers' own function (torch's own choice). DeepSpeed Ulysses wraps whatever
`sdpa` is registered when it is set up, so this composes with sequence parallelism. The first CUDA call says in
the log whether the asked-for kernel takes those inputs. Tested by `python -m pytest tests/test_speed.py -k sdpa`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SDPA_KERNELS = ("auto", "cudnn", "flash", "efficient", "math")


def _backend_order(kernel: str) -> list:
    from torch.nn.attention import SDPBackend

    named = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [named[kernel]] + [backend for name, backend in named.items() if name != kernel]


def kernel_sdpa(kernel: str):
    """An attention function for transformers' interface: causal SDPA with `kernel` tried first."""
    from torch.nn.attention import sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    order = _backend_order(kernel)
    expand_gqa = kernel == "cudnn" and not _cudnn_takes_gqa()

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        plain = (attention_mask is None and causal and query.shape[2] > 1 and not kwargs.get("sliding_window")
                 and kwargs.get("softcap") is None and kwargs.get("position_bias") is None)
        with sdpa_kernel(order, set_priority=True):
            if not plain:  # masks, decoding, windows: transformers' own path, same kernel preference
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
            groups = query.shape[1] // key.shape[1]
            extra = {}
            if groups > 1 and expand_gqa:
                key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            elif groups > 1:
                extra["enable_gqa"] = True
            if query.is_cuda and not checked and not torch.compiler.is_compiling():
                checked.append(_report_kernel(kernel, order[0], query, key, value, dropout, scaling, extra))
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout,
                                                 scale=scaling, is_causal=True, **extra)
        return out.transpose(1, 2).contiguous(), None

    checked = []  # the first CUDA call says (in the log) whether the asked-for kernel takes these inputs
    attention.yarnkit_kernel = kernel
    return attention


@functools.cache
def _cudnn_takes_gqa() -> bool:
    """Whether this torch's cuDNN SDPA runs grouped-query K/V itself (`enable_gqa`): then they are not expanded."""
    if not torch.cuda.is_available():
        return False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    except RuntimeError:
        return False
    return True


def _report_kernel(kernel: str, backend, query, key, value, dropout, scaling, extra) -> bool:
    from torch.nn.attention import sdpa_kernel

    try:
        with torch.no_grad(), sdpa_kernel([backend]):  # only this kernel: torch raises if it cannot run
            F.scaled_dot_product_attention(query[:, :, :128], key[:, :, :128], value[:, :, :128], dropout_p=dropout,
                                           scale=scaling, is_causal=True, **extra)
    except RuntimeError as err:
        print(f"yarnkit: SDPA kernel {kernel} cannot run these inputs ({str(err).splitlines()[0][:200]}); "
              f"torch uses the next of cudnn/flash/efficient/math", flush=True)
        return False
    print(f"yarnkit: SDPA kernel {kernel} runs (q {tuple(query.shape)} {query.dtype}, kv heads {key.shape[1]})",
          flush=True)
    return True


def use_sdpa_kernel(kernel: str) -> None:
    """Make transformers' `sdpa` attention prefer `kernel` ("auto" restores transformers' own function)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("sdpa", sdpa_attention_forward if kernel == "auto" else kernel_sdpa(kernel))
