"""The model an evaluation runs on: loaded from anything `yarnkit.models.load_model` accepts or a training run
(its newest complete checkpoint), on the asked device and dtype, with the asked RoPE scaling or attention
temperature applied, and described (`meta`: label, RoPE, native context) for every result it produces.

Tested by `python -m pytest tests/test_eval_cli.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from yarnkit.errors import BadValue
from yarnkit.runs import model_location


def load_for_eval(args):
    """`(model, tokenizer, meta)` with the requested device, dtype and RoPE scaling applied."""
    from yarnkit.models import load_model
    from yarnkit.patch import apply_rope_scaling

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    location = model_location(args.model)  # a training run: its newest complete checkpoint's model/
    model, tokenizer = load_model(location, dtype=dtype, device=device)
    if hasattr(args, "sdpa_kernel"):  # process-wide: "auto" restores transformers' own sdpa
        from yarnkit.sdpa import use_sdpa_kernel

        use_sdpa_kernel(args.sdpa_kernel)
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    temperature = {} if args.attention_factor is None else {"attention_factor": args.attention_factor}
    if args.rope_type:
        rope = apply_rope_scaling(model, rope_type=args.rope_type, factor=args.factor, **temperature).describe()
    elif temperature:  # the model's own YaRN again, with another temperature
        if "yarn" not in rope.get("rope_type", ""):
            raise BadValue(f"--attention-factor needs a YaRN model; {args.model} has rope_type "
                           f"{rope.get('rope_type', 'default')!r}", "add --rope-type yarn --factor S")
        kept = {key: rope[key] for key in ("beta_fast", "beta_slow") if rope.get(key) is not None}
        rope = apply_rope_scaling(model, rope_type=rope["rope_type"], factor=rope["factor"], replace=True,
                                  original_max_position_embeddings=rope["original_max_position_embeddings"],
                                  **kept, **temperature).describe()
    native = (rope.get("original_max_position_embeddings") or getattr(model.config, "max_position_embeddings", None))
    label = args.label or (Path(args.model).name + (f" {args.rope_type} x{args.factor:g}" if args.rope_type else "")
                           + (f" attn {args.attention_factor:g}" if temperature else ""))
    meta = {"label": label, "model": str(location), "device": device, "dtype": dtype, "rope": rope,
            "native_context": native, "max_position_embeddings": getattr(model.config, "max_position_embeddings", None)}
    return model, tokenizer, meta


def model_context(meta: dict) -> int | None:
    """Tokens the model is meant to handle: a dynamic scaling's factor x original, else max_position_embeddings."""
    rope = meta.get("rope") or {}
    if "dynamic" in str(rope.get("rope_type", "")) and rope.get("factor"):
        return int(rope["factor"] * (rope.get("original_max_position_embeddings") or meta["native_context"]))
    return meta.get("max_position_embeddings")
