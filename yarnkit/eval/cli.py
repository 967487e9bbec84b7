"""yarnkit eval: long-context evaluation. Each task writes OUT/<task>-<label>.json and a PNG next to it.

  yarnkit eval ppl MODEL --data BOOKS [--lengths 2048,4096,...] [--docs N] [--stride S]
  yarnkit eval passkey MODEL [--lengths ...] [--depths 0,0.25,...] [--trials N]
  yarnkit eval needle MODEL [--haystack BOOK]        (passkey with real book text as filler)
  yarnkit eval stream MODEL --data BOOKS --policy dense|window|recompute|sink [--window W] [--max-tokens N]
  yarnkit eval retrieval MODEL --haystack BOOKS [--tasks niah,multikey,multivalue,multiquery,vt,chat]
                                  (RULER-style tasks: one JSON + PNG per task, e.g. OUT/niah-LABEL.json)
  yarnkit eval plot RESULTS... --out PNG             (several results of one task on one chart)
  yarnkit eval report RESULTS... --markdown          (tables for docs/results.md)

MODEL is anything `yarnkit.models.load_model` accepts, or a training run directory (its latest checkpoint).
Scale RoPE at load time with --rope-type yarn|dynamic|linear|ntk|dynamic_yarn --factor S. See docs/eval.md.
Flags that cannot work (a depth outside [0, 1], lengths longer than every document, a device this machine lacks)
fail before the model loads; a run that would evaluate nothing fails instead of writing an empty result.
`yarnkit eval TASK --help` describes each task with an example.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import textwrap
import time
from pathlib import Path

import torch

from yarnkit.errors import BadValue, UserError
from yarnkit.outputs import PLOT_SUFFIXES, check_output_dir, check_output_file
from yarnkit.rope import SCALING_TYPES
from yarnkit.train.checkpoint import model_location

TASKS = {  # task -> (description, example)
    "ppl": ("perplexity vs context length: one window of L tokens per document (YaRN paper protocol), or sliding "
            "windows with --stride; writes OUT/ppl-LABEL.json and a PNG",
            "yarnkit eval ppl smollm2-135m --data books/ --lengths 2048,4096,8192 --rope-type yarn --factor 4"),
    "passkey": ("passkey retrieval: a number (1..50000) hidden at each depth of each prompt length in the paper's "
                "repeated filler; accuracy per (length, depth) cell",
                "yarnkit eval passkey runs/tiny --lengths 4096,16384 --depths 0,0.5,1 --trials 5"),
    "needle": ("needle in a book: passkey with real book text as filler (--haystack, default the bundled eval "
               "book)", "yarnkit eval needle smollm2-135m --lengths 8192 --haystack books/moby-dick.txt"),
    "stream": ("streaming perplexity through a KV-cache policy (dense, window, recompute, sink) over one long token "
               "stream: ppl, latency and memory per segment",
               "yarnkit eval stream smollm2-135m --data books/ --policy sink --window 1024 --max-tokens 65536"),
    "retrieval": ("RULER-style use of context on book haystacks: niah, multikey, multivalue, multiquery, vt (variable "
                  "tracking) and chat, scored by exact match and teacher-forced; one JSON + heatmap PNG per task "
                  "(e.g. OUT/niah-LABEL.json)",
                  "yarnkit eval retrieval smollm2-135m --rope-type yarn --factor 8 --haystack books/test "
                  "--tasks niah,multikey --lengths 2048,65536 --depths 0,0.5,1 --trials 2"),
}
STREAM_POLICIES = ("dense", "window", "recompute", "sink")

def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item]


def _task_parser(sub, task: str, description: str, example: str):
    return sub.add_parser(task, help=description.split(":")[0], description=textwrap.fill(description, 100),
                          epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, (description, example) in TASKS.items():
        p = _task_parser(sub, task, description, example)
        p.add_argument("model", help="model name/dir/.gguf, or a training run directory")
        p.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
        p.add_argument("--label", help="name in plots and tables (default: model + rope setting)")
        p.add_argument("--rope-type", choices=SCALING_TYPES,
                       help="apply this RoPE scaling to the loaded model (needs --factor)")
        p.add_argument("--factor", type=float, help="RoPE scaling factor s")
        p.add_argument("--attention-factor", type=float,
                       help="YaRN attention temperature (cos/sin scale; logits scale by its square) in place of the "
                            "model's own (0.1 ln s + 1 unless its config sets one): a sweep without retraining")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        p.add_argument("--dtype", default="auto", help="float32/bfloat16/float16 (default: bf16 on GPU, fp32 on CPU)")
        if task != "stream":
            p.add_argument("--max-length", type=int, help="skip (and record) lengths above this")
            p.add_argument("--sdpa-kernel", default="auto", choices=["auto", "cudnn", "flash", "efficient", "math"],
                           help="attention kernel tried first (cudnn is the fastest prefill on an H200; auto: torch's)")
        if task in ("ppl", "stream"):
            p.add_argument("--data", required=True, help="text/.gz file, folder, .jsonl, or hf:NAME[:CONFIG]")
            p.add_argument("--field", default="text", help="text field of .jsonl / datasets records")
            p.add_argument("--split", default="test", help="split of a datasets dataset")
        if task == "ppl":
            p.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192, 16384, 32768, 65536],
                           help="comma-separated context lengths L in tokens (default 2048,...,65536)")
            p.add_argument("--docs", type=int, default=10, help="documents per length (default 10)")
            p.add_argument("--stride", type=int, help="slide windows over whole documents with this stride")
            p.add_argument("--chunk-size", type=int, default=1024, help="positions per LM-head/loss chunk")
            p.add_argument("--compare", nargs="*", default=[], help="other ppl result JSONs to draw on the plot")
        if task in ("passkey", "needle"):
            p.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192, 16384, 32768, 65536],
                           help="comma-separated prompt lengths in tokens (default 2048,...,65536)")
            p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                           help="comma-separated key positions as fractions of the filler, in [0, 1] "
                                "(default 0,0.25,0.5,0.75,1)")
            p.add_argument("--trials", type=int, default=5, help="keys per (length, depth) cell (default 5)")
            p.add_argument("--seed", type=int, default=0, help="seed of the random keys (default 0)")
            p.add_argument("--max-new-tokens", type=int, default=10, help="answer tokens generated (default 10)")
        if task == "needle":
            p.add_argument("--haystack", help="filler book (default: the bundled eval sample)")
        if task == "retrieval":
            from yarnkit.eval.retrieval import TASKS as RETRIEVAL_TASKS
            from yarnkit.eval.retrieval import TaskOptions

            defaults = TaskOptions()
            p.add_argument("--tasks", default=",".join(RETRIEVAL_TASKS),
                           help=f"comma list of {', '.join(RETRIEVAL_TASKS)} (default all)")
            p.add_argument("--haystack", help="a book or a folder of books (default: the bundled eval sample)")
            p.add_argument("--haystack-books", type=int, default=10, help="books of the folder to use (default 10)")
            p.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192, 16384, 32768, 65536],
                           help="comma-separated prompt lengths in tokens (default 2048,...,65536)")
            p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                           help="comma-separated needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
            p.add_argument("--trials", type=int, default=4, help="prompts per (length, depth) cell (default 4)")
            p.add_argument("--seed", type=int, default=0, help="seed of the values and the haystack windows (default 0)")
            p.add_argument("--templates", default=",".join(defaults.templates),
                           help="evaluation templates that take turns in niah, multikey and chat (default "
                                f"{','.join(defaults.templates)}; all: magic,archive,passkey)")
            for name, what in (("distractors", "multikey: needles of the same form under other keys"),
                               ("values", "multivalue: values stored under the one key"),
                               ("queries", "multiquery: keys asked for at once"),
                               ("hops", "vt: assignments in the variable chain")):
                p.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                               help=f"{what} (default {getattr(defaults, name)})")
            p.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens,
                           help="prompt tokens per forward (default 655360: ten 64k prompts at once)")
            p.add_argument("--max-new-tokens", type=int, default=0,
                           help="0: the task's own (12 for one value, 9 per value, 40 for chat)")
            p.add_argument("--beyond-context", action="store_true",
                           help="evaluate lengths above the model's context instead of refusing them")
        if task == "stream":
            p.add_argument("--policy", default="sink", choices=STREAM_POLICIES, help="KV-cache policy (default sink)")
            p.add_argument("--window", type=int, default=1024, help="KV entries kept (sinks included) (default 1024)")
            p.add_argument("--sinks", type=int, help="attention sinks for the sink policy (default: 1 for a model "
                           "trained with a sink token, config.yarnkit_sink_token_id; else 4)")
            p.add_argument("--max-cache", type=int, help="dense policy: stop once the cache would exceed this")
            p.add_argument("--max-tokens", type=int, default=65536, help="tokens to stream (default 65536)")
            p.add_argument("--chunk", type=int, default=1, help="tokens per step (default 1: token by token)")
            p.add_argument("--segment", type=int, default=1024, help="tokens per reported segment")
    plot = _task_parser(sub, "plot", "draw several result JSONs of one task on one chart: ppl and stream one line "
                        "each, passkey/needle one heatmap",
                        "yarnkit eval plot runs/eval/ppl-base.json runs/eval/ppl-yarn_x4.json --out ppl.png")
    plot.add_argument("results", nargs="+", help="result JSONs written by yarnkit eval")
    plot.add_argument("--out", required=True, help="PNG path")
    report = _task_parser(sub, "report", "markdown tables from result JSONs: one per task, for docs/results.md", "yarnkit eval report runs/eval/*.json --markdown --output results.md")
    report.add_argument("results", nargs="+", help="result JSONs written by yarnkit eval")
    report.add_argument("--markdown", action="store_true", help="print markdown (the only format; kept explicit)")
    report.add_argument("--output", help="also write the markdown to this file")


MAX_COUNT = 2**31 - 1  # lengths and counts beyond this are no evaluation this tool can run (nor index)


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        if value is not None and (not values or any(not 1 <= item <= MAX_COUNT for item in values)):
            flag = "--" + name.replace("_", "-")
            raise BadValue(f"{flag} {','.join(map(str, values)) or '(empty)'}: needs positive whole numbers"
                           + (f" up to {MAX_COUNT}" if values and max(values) > MAX_COUNT else ""),
                           f"e.g. {flag} {'2048,4096' if name == 'lengths' else 8}")


def check_arguments(args) -> None:
    """Everything about the flags that can be wrong, checked before a model loads."""
    from yarnkit.models import check_device, to_dtype

    if (args.rope_type is None) != (args.factor is None):
        raise BadValue("--rope-type and --factor go together", "e.g. --rope-type yarn --factor 8")
    if args.factor is not None and not (args.factor > 1 and math.isfinite(args.factor)):
        raise BadValue(f"--factor {args.factor:g} does not extend the context" if not args.factor > 1 else
                       f"--factor {args.factor:g} is not a finite number", "pass a factor > 1, e.g. --factor 4")
    if args.attention_factor is not None and not 0 < args.attention_factor < 10:
        raise BadValue(f"--attention-factor {args.attention_factor:g} is not a temperature scale",
                       "pass a value near YaRN's 0.1 ln s + 1, e.g. --attention-factor 1.2")
    _positive(args, "lengths", "trials", "docs", "stride", "chunk_size", "max_new_tokens", "max_length", "window",
              "max_tokens", "chunk", "segment", "max_cache")
    if any(length < 2 for length in getattr(args, "lengths", None) or [2]):
        raise BadValue(f"--lengths {','.join(map(str, args.lengths))}: a window needs at least 2 tokens",
                       "e.g. --lengths 2048,4096")
    depths = getattr(args, "depths", None)
    if depths is not None and (not depths or any(not 0.0 <= depth <= 1.0 for depth in depths)):
        raise BadValue(f"--depths {','.join(f'{d:g}' for d in depths) or '(empty)'}: a depth is where the key sits, "
                       "as a fraction of the filler in [0, 1]", "e.g. --depths 0,0.25,0.5,0.75,1")
    if getattr(args, "sinks", None) is not None and not 0 <= args.sinks < args.window:
        raise BadValue(f"--sinks {args.sinks} must be in [0, --window {args.window})", "e.g. --sinks 4")
    if args.device != "auto":
        check_device(args.device)
    if args.dtype != "auto":
        to_dtype(args.dtype)
    check_output_dir(args.out, "--out")  # results are written after the evaluation: fail now, not then


def check_scaling(args, location: str) -> None:
    """--rope-type/--factor tried on the model's config before its weights load (a model that already has a
    scaling would be scaled twice: that is refused here, with the eval flags to use instead)."""
    from yarnkit.models import load_config
    from yarnkit.patch import AlreadyScaled, apply_rope_scaling

    try:
        apply_rope_scaling(load_config(location), rope_type=args.rope_type, factor=args.factor)
    except AlreadyScaled as error:
        raise BadValue(f"{args.model} already uses {error.scaling}, so --rope-type {args.rope_type} "
                       f"--factor {args.factor:g} would scale it twice", "leave out --rope-type/--factor to evaluate it "
                       "as trained (--attention-factor changes only its temperature), or evaluate the unscaled base "
                       "model") from None


def load_for_eval(args):
    """`(model, tokenizer, meta)` with the requested device, dtype and RoPE scaling applied."""
    from yarnkit.models import load_model
    from yarnkit.patch import apply_rope_scaling

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    location = model_location(args.model)  # a training run: its newest complete checkpoint's model/
    if args.rope_type:
        check_scaling(args, location)
    model, tokenizer = load_model(location, dtype=dtype, device=device)
    if hasattr(args, "sdpa_kernel"):  # process-wide: "auto" restores transformers' own sdpa
        from yarnkit.train.speed import use_sdpa_kernel

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


def result_path(result: dict, out: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", result["label"]).strip("_") or "model"
    return Path(out) / f"{result['task']}-{slug}.json"


def save_result(result: dict, out: str) -> Path:
    path = result_path(result, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def _plot(results: list[dict], path) -> Path:
    from yarnkit.eval import plots
    from yarnkit.eval.retrieval import TASKS as RETRIEVAL_TASKS

    task = results[0]["task"]
    if any(result["task"] != task for result in results):
        raise BadValue(f"cannot draw different tasks on one chart: {sorted({r['task'] for r in results})}",
                       "plot each task's results separately")
    if task == "ppl":
        if not any("ppl" in row for result in results for row in result["rows"]):
            raise BadValue("none of these ppl results has a measured length (every row was skipped)",
                           "plot results that evaluated something")
        return plots.plot_ppl(results, path)
    if task == "stream":
        return plots.plot_stream(results, path)
    if task in RETRIEVAL_TASKS:
        if len(results) != 1:
            raise BadValue("a retrieval heatmap shows one result", "plot them one at a time")
        return plots.plot_retrieval(results[0], path)
    if len(results) != 1:
        raise BadValue("a passkey/needle heatmap shows one result", "plot them one at a time")
    return plots.plot_passkey(results[0], path)


def ppl_documents(args) -> tuple[list, list]:
    """The tokenised documents for `ppl`, read before the model loads; fails when no length can be evaluated."""
    from yarnkit.eval.data import iter_eval_documents, tokenize_documents
    from yarnkit.models import load_tokenizer

    limit = None if args.stride else max(args.lengths)
    documents, empty = tokenize_documents(iter_eval_documents(args.data, args.field, args.split),
                                          load_tokenizer(model_location(args.model)), max_tokens=limit)
    if not documents:
        raise BadValue(f"--data {args.data} holds no text ({len(empty)} empty document(s))",
                       "point --data at text files, a folder of them, or a .jsonl with --field")
    longest = max(len(ids) for _, ids in documents)
    wanted = [length for length in args.lengths if args.max_length is None or length <= args.max_length]
    if not wanted:
        raise BadValue(f"--max-length {args.max_length} skips every length in --lengths "
                       f"{','.join(map(str, args.lengths))}", "raise --max-length or pass shorter --lengths")
    if not any(length - 1 <= longest for length in wanted):
        raise BadValue(f"--lengths {','.join(map(str, wanted))}: the longest document in {args.data} has {longest} "
                       "tokens and a length L needs L-1", f"pass lengths up to {longest + 1}, or longer documents")
    return documents, empty


def check_evaluated(result: dict) -> None:
    """A run whose every length or cell was skipped is an error, not an empty result."""
    reasons = ([row.get("skipped") for row in result["rows"] if "ppl" not in row] if result["task"] == "ppl" else
               [cell["reason"] for cell in result.get("skipped", [])])
    measured = (any("ppl" in row for row in result["rows"]) if result["task"] == "ppl" else
                result.get("tokens_scored", 0) > 0 if result["task"] == "stream" else bool(result.get("cells")))
    if not measured:
        why = reasons[0] if reasons else result.get("stop_reason", "no tokens")
        raise UserError(f"yarnkit eval {result['task']} evaluated nothing ({why}; {len(reasons)} skipped)",
                        "change the lengths, depths or data so that at least one can run")


def run_task(args) -> dict:
    from yarnkit.eval.data import iter_eval_documents
    from yarnkit.eval.ppl import bos_token_id

    check_arguments(args)
    documents, empty = ppl_documents(args) if args.task == "ppl" else ([], [])
    model, tokenizer, meta = load_for_eval(args)
    settings = {key: value for key, value in vars(args).items() if key not in ("model", "label", "out", "compare")}
    result = {"task": args.task, **meta, "settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}
    bos = bos_token_id(tokenizer)
    if args.task == "ppl":
        from yarnkit.eval.ppl import evaluate_perplexity

        result.update(bos_token_id=bos, skipped_documents=empty, rows=evaluate_perplexity(
            model, documents, args.lengths, bos, args.docs, args.stride, args.max_length, args.chunk_size))
    elif args.task in ("passkey", "needle"):
        from yarnkit.eval.passkey import evaluate_passkey

        filler = None
        if args.task == "needle":
            from yarnkit.assets import sample_path
            from yarnkit.train.corpus import read_text

            filler = read_text(args.haystack or sample_path("eval"))
        result.update(evaluate_passkey(model, tokenizer, args.lengths, args.depths, args.trials, args.seed, filler,
                                       args.max_length, args.max_new_tokens))
    else:
        from yarnkit.eval.stream import evaluate_stream, make_policy, token_stream
        from yarnkit.sink import streaming_sinks

        sink = getattr(model.config, "yarnkit_sink_token_id", None)  # a sink-token model sees it first, as trained
        sinks = streaming_sinks(model.config, args.sinks)
        policy = make_policy(args.policy, window=args.window, sinks=sinks, max_cache=args.max_cache)
        if not args.label:  # several policies of one model must not overwrite each other's files
            result["label"] += f" {args.policy}" + ("" if args.policy == "dense" else f" W{args.window}")
        result.update(bos_token_id=bos, skipped_documents=[])
        documents = _lazy_tokenized(iter_eval_documents(args.data, args.field, args.split), tokenizer,
                                    result["skipped_documents"])
        result.update(sink_token_id=sink, sinks=sinks if args.policy == "sink" else None)
        result.update(evaluate_stream(model, policy, token_stream(documents, bos, sink), bos, args.max_tokens,
                                      args.chunk, args.segment))
    check_evaluated(result)
    return result


def _lazy_tokenized(documents, tokenizer, skipped: list):
    """Tokenise one document at a time (a 1M-token stream never holds all books' ids at once)."""
    from yarnkit.eval.data import tokenize_documents

    for name, text in documents:
        kept, empty = tokenize_documents([(name, text)], tokenizer)
        skipped.extend(empty)
        yield from kept


def model_context(meta: dict) -> int | None:
    """Tokens the model is meant to handle: a dynamic scaling's factor x original, else max_position_embeddings."""
    rope = meta.get("rope") or {}
    if "dynamic" in str(rope.get("rope_type", "")) and rope.get("factor"):
        return int(rope["factor"] * (rope.get("original_max_position_embeddings") or meta["native_context"]))
    return meta.get("max_position_embeddings")


def check_retrieval_args(args) -> None:
    from yarnkit.eval.retrieval import TASKS as RETRIEVAL_TASKS
    from yarnkit.eval.retrieval import eval_template

    check_output_dir(args.out, "--out")
    bad = [depth for depth in args.depths if not 0.0 <= depth <= 1.0]
    if bad:
        raise BadValue(f"depth {bad[0]} is outside [0, 1]", "pass depths such as --depths 0,0.25,0.5,0.75,1")
    unknown = [task for task in args.tasks.split(",") if task not in RETRIEVAL_TASKS]
    if unknown:
        raise BadValue(f"unknown task {unknown[0]!r}", f"choose from {', '.join(RETRIEVAL_TASKS)}")
    for name in args.templates.split(","):
        try:
            eval_template(name)
        except ValueError as error:
            raise BadValue(str(error)) from None
    if args.trials < 1 or min(args.lengths, default=0) < 1:
        raise BadValue(f"--trials {args.trials} / --lengths {args.lengths}: both must be positive",
                       "e.g. --trials 4 --lengths 2048,8192")


def run_retrieval(args) -> list[dict]:
    """Every task of `--tasks` on one loaded model: a result per task."""
    from yarnkit.assets import sample_path
    from yarnkit.eval.haystack import Haystack
    from yarnkit.eval.retrieval import TaskOptions, evaluate_retrieval

    check_retrieval_args(args)
    model, tokenizer, meta = load_for_eval(args)
    context = model_context(meta)
    scored = [n for n in args.lengths if args.max_length is None or n <= args.max_length]
    too_long = [n for n in scored if context and n > context]
    if too_long and not args.beyond_context:
        raise BadValue(f"length {too_long[0]} is above the model's context {context}",
                       f"lower --lengths, skip it with --max-length {context}, scale the model (--rope-type yarn "
                       "--factor S), or pass --beyond-context to measure it anyway")
    options = TaskOptions(templates=tuple(args.templates.split(",")), distractors=args.distractors,
                          values=args.values, queries=args.queries, hops=args.hops, batch_tokens=args.batch_tokens,
                          max_new_tokens=args.max_new_tokens)
    settings = {key: value for key, value in vars(args).items() if key not in ("model", "label", "out")}
    results = []
    haystack = Haystack.from_books(args.haystack or sample_path("eval"), tokenizer, max(scored, default=1),
                                   args.haystack_books)
    for task in args.tasks.split(","):
        result = {"task": task, **meta, "settings": settings, "haystack": haystack.source,
                  "haystack_books": haystack.names, "context": context,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        result.update(evaluate_retrieval(model, tokenizer, haystack, task, args.lengths, args.depths,
                                         args.trials, args.seed, options, args.max_length))
        results.append(result)
        _finish(result, args.out)
    return results


def _finish(result: dict, out: str, compare: list[dict] = ()) -> Path:
    """Draw the result's PNG (with `compare` results on the same chart) and save its JSON beside it."""
    result["plot"] = str(result_path(result, out).with_suffix(".png"))
    _plot([result, *compare], result["plot"])
    path = save_result(result, out)
    print(json.dumps({key: result[key] for key in ("task", "label", "plot")} | {"result": str(path)}))
    return path


def run(args) -> int:
    if args.task == "retrieval":
        run_retrieval(args)
        return 0
    if args.task == "report":
        from yarnkit.eval.report import load_results, markdown_report

        if args.output:
            check_output_file(args.output, "--output", create_parent=False)
        text = markdown_report(load_results(args.results))
        print(text)
        if args.output:
            Path(args.output).write_text(text)
        return 0
    if args.task == "plot":
        from yarnkit.eval.report import load_results

        check_output_file(args.out, "--out", PLOT_SUFFIXES)
        print(_plot(load_results(args.results), args.out))
        return 0
    from yarnkit.eval.report import load_results

    compare = load_results(args.compare) if args.task == "ppl" else []  # a bad file fails before the evaluation
    result = run_task(args)
    _finish(result, args.out, compare)
    return 0
