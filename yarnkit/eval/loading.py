"""The model an evaluation runs on: loaded from anything `yarnkit.models.load_model` accepts or a training run
(its newest complete checkpoint), on the asked device and dtype, with the asked RoPE scaling, attention
temperature or STRING attention applied, and described (`meta`: label, RoPE, native context) for every result it produces.

Tested by `python -m pytest tests/test_eval_cli.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from yarnkit.errors import BadValue
from yarnkit.runs import model_location


def check_scaling(args, location: str) -> None:
    """--rope-type/--factor tried on the model's config before its weights load (a model that already has a
    scaling would be scaled twice: that is refused here, with the eval flags to use instead)."""
    from yarnkit.models import load_config
    from yarnkit.errors import AlreadyScaled
    from yarnkit.patch import apply_rope_scaling

    try:
        apply_rope_scaling(load_config(location), rope_type=args.rope_type, factor=args.factor)
    except AlreadyScaled as error:
        raise BadValue(f"{args.model} already uses {error.scaling}, so --rope-type {args.rope_type} "
                       f"--factor {args.factor:g} would scale it twice",
                       "leave out --rope-type/--factor to evaluate it as trained (--attention-factor changes only "
                       "its temperature), or evaluate the unscaled base model") from None


def load_for_eval(args):
    """`(model, tokenizer, meta)` with the requested device, dtype and RoPE scaling applied."""
    from yarnkit.models import load_model
    from yarnkit.patch import apply_rope_scaling

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    location = model_location(args.model)  # a training run: its newest complete checkpoint's model/
    if getattr(args, "rope_type", None):  # before the weights load
        check_scaling(args, location)
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
    meta["string"] = None
    if args.string is not None:
        from yarnkit.string_attention import apply_string, parse_setting

        shift, window = parse_setting(args.string)
        meta["string"] = apply_string(model, shift, window, context=model_context(meta)).describe()
        if not args.label:  # a STRING run must not overwrite the plain run's files
            meta["label"] += f" STRING S{shift} W{window}"
    return model, tokenizer, meta


def model_context(meta: dict) -> int | None:
    """Tokens the model is meant to handle: a dynamic scaling's factor x original, else max_position_embeddings."""
    rope = meta.get("rope") or {}
    if "dynamic" in str(rope.get("rope_type", "")) and rope.get("factor"):
        return int(rope["factor"] * (rope.get("original_max_position_embeddings") or meta["native_context"]))
    return meta.get("max_position_embeddings")
