"""Show a model's architecture, native context and RoPE parameters; with --factor, the YaRN table per pair.

    yarnkit info smollm2-135m
    yarnkit info smollm2-135m --factor 8 --plot yarn.png
    yarnkit info ./my-model --factor 16 --beta-fast 32 --beta-slow 1 --json

The table lists every frequency pair: wavelength in tokens, rotations over the native context, and whether
YaRN keeps it (extrapolated), divides it by the factor (interpolated), or mixes the two (blended).
Only the config is read; no weights are loaded (a GGUF is converted once and cached). A model without RoPE
(GPT-2's learned positions, say) is shown as such, and --factor on it fails: YaRN rescales rotary frequencies.
"""

from __future__ import annotations

import json
import math

from yarnkit import rope
from yarnkit.errors import BadValue
from yarnkit.outputs import PLOT_SUFFIXES, check_output_file


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", default="smollm2-135m",
                        help="HF directory or hub id, a .gguf file, or 'smollm2-135m' (default)")
    parser.add_argument("--factor", type=float, help="YaRN scale factor s: show the per-pair table for it")
    parser.add_argument("--original", type=int, help="native context L in tokens (default: the config's)")
    parser.add_argument("--beta-fast", type=float, default=32.0, help="pairs with more rotations keep θ (default 32)")
    parser.add_argument("--beta-slow", type=float, default=1.0, help="pairs with fewer rotations get θ/s (default 1)")
    parser.add_argument("--no-truncate", action="store_true", help="do not floor/ceil the correction range")
    parser.add_argument("--plot", metavar="FILE.png", help="draw wavelengths before/after YaRN")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code (off by default)")


def summarize(config) -> dict:
    """Architecture facts and the RoPE parameters as stored in the config."""
    text = config.get_text_config()
    head_dim = rope.head_dim(text)
    params = getattr(text, "rope_parameters", None) or {}
    flat = params if "rope_theta" in params else next((v for v in params.values() if isinstance(v, dict)), {})
    uses_rope = flat.get("rope_theta") is not None
    return dict(model_type=text.model_type, layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                heads=text.num_attention_heads, kv_heads=getattr(text, "num_key_value_heads", None),
                head_dim=head_dim, uses_rope=uses_rope,
                rotary_dim=rope.rotary_dim(head_dim, flat.get("partial_rotary_factor", 1.0)) if uses_rope else None,
                vocab_size=text.vocab_size, max_position_embeddings=text.max_position_embeddings,
                native_context=int(flat.get("original_max_position_embeddings") or text.max_position_embeddings),
                rope_parameters=params)


def check_arguments(args) -> None:
    """What can be wrong before the config is read."""
    if args.factor is not None and not args.factor > 1:
        raise BadValue(f"--factor {args.factor:g} does not extend the context", "pass a factor > 1, e.g. --factor 4")
    if args.factor is not None and not math.isfinite(args.factor):
        raise BadValue(f"--factor {args.factor:g} is not a finite number", "pass a factor such as --factor 4")
    if args.plot and args.factor is None:
        raise BadValue("--plot needs --factor (the plot compares wavelengths before and after YaRN)",
                       f"add --factor, e.g. --factor 4 --plot {args.plot}")
    if args.plot:
        check_output_file(args.plot, "--plot", PLOT_SUFFIXES, create_parent=False)
    if args.original is not None and args.original < 1:
        raise BadValue(f"--original {args.original} is not a context length", "pass the native context in tokens")
    if not (math.isfinite(args.beta_fast) and args.beta_fast > args.beta_slow > 0):
        raise BadValue(f"--beta-fast {args.beta_fast:g} / --beta-slow {args.beta_slow:g}: need beta_fast > "
                       "beta_slow > 0", "leave them out for the paper's 32 and 1")


def run(args) -> int:
    from yarnkit.models import load_config

    check_arguments(args)
    info = summarize(load_config(args.model, trust_remote_code=args.trust_remote_code))
    params = info["rope_parameters"]
    flat = params if "rope_theta" in params else params.get("full_attention", {})
    table = None
    if args.factor is not None:
        if not info["uses_rope"]:
            raise BadValue(f"{args.model} ({info['model_type']}) does not use RoPE: its config has no rope_theta, so "
                           "there is no YaRN table for --factor", "leave out --factor to see its architecture; "
                           "YaRN extends RoPE models (llama, qwen2, mistral, gemma3, ...)")
        native = args.original or info["native_context"]
        table = rope.yarn_table(info["rotary_dim"], float(flat["rope_theta"]), args.factor, native,
                                args.beta_fast, args.beta_slow, not args.no_truncate)
        info["yarn"] = dict(factor=args.factor, original_max_position_embeddings=native,
                            new_context=int(native * args.factor), beta_fast=args.beta_fast, beta_slow=args.beta_slow,
                            attention_factor=rope.yarn_attention_factor(args.factor),
                            correction_range=rope.yarn_correction_range(info["rotary_dim"], float(flat["rope_theta"]),
                                                                        native, args.beta_fast, args.beta_slow,
                                                                        not args.no_truncate),
                            pairs=table)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_text(info, table)
    if args.plot:
        plot_table(table, info, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def print_text(info: dict, table: list[dict] | None) -> None:
    print(f"model_type          {info['model_type']}")
    print(f"layers / hidden     {info['layers']} / {info['hidden_size']}")
    rotary = f"rotary {info['rotary_dim']}" if info["uses_rope"] else "no RoPE"
    print(f"heads / kv / dim    {info['heads']} / {info['kv_heads']} / {info['head_dim']} ({rotary})")
    print(f"vocab               {info['vocab_size']}")
    print(f"native context      {info['native_context']}")
    print(f"max positions       {info['max_position_embeddings']}")
    print(f"rope_parameters     {json.dumps(info['rope_parameters'])}" if info["uses_rope"] else
          "rope_parameters     none: positions are not rotary (YaRN does not apply)")
    if table is None:
        return
    yarn = info["yarn"]
    low, high = yarn["correction_range"]
    print(f"\nYaRN x{yarn['factor']:g}: {yarn['original_max_position_embeddings']} -> {yarn['new_context']} tokens, "
          f"attention factor {yarn['attention_factor']:.4f}, ramp over pairs {low}..{high}")
    print(f"{'pair':>4} {'wavelength':>12} {'rotations':>10} {'keep θ':>7} {'new wavelength':>15}  mode")
    for row in table:
        print(f"{row['pair']:>4} {row['wavelength']:>12.1f} {row['rotations']:>10.2f} "
              f"{row['extrapolation_weight']:>7.3f} {row['scaled_wavelength']:>15.1f}  {row['mode']}")


def plot_table(table: list[dict], info: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yarn = info["yarn"]
    pairs = [row["pair"] for row in table]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 1.4])
    top.semilogy(pairs, [row["wavelength"] for row in table], "o-", ms=3, label="original")
    top.semilogy(pairs, [row["scaled_wavelength"] for row in table], "s-", ms=3, label=f"YaRN x{yarn['factor']:g}")
    top.axhline(yarn["original_max_position_embeddings"], color="gray", ls="--", lw=1, label="native context")
    top.axhline(yarn["new_context"], color="black", ls=":", lw=1, label="extended context")
    colors = {"extrapolated": "#dff0d8", "blended": "#fcf8e3", "interpolated": "#f2dede"}
    for axis in (top, bottom):
        for row in table:
            axis.axvspan(row["pair"] - 0.5, row["pair"] + 0.5, color=colors[row["mode"]], lw=0)
    top.set_ylabel("wavelength (tokens)")
    top.set_title(f"{info['model_type']}: YaRN x{yarn['factor']:g} per frequency pair "
                  "(green kept, yellow blended, red interpolated)", fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    bottom.plot(pairs, [row["extrapolation_weight"] for row in table], "k.-")
    bottom.set_ylabel("weight of θ")
    bottom.set_xlabel("frequency pair i")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
