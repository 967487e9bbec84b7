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
Scale RoPE at load time with --rope-type yarn|dynamic|linear|ntk|dynamic_yarn --factor S; read far distances with
STRING (--string SHIFT[,WINDOW], yarnkit/string_attention.py). See docs/eval.md.
Flags that cannot work (a depth outside [0, 1], lengths longer than every document, a device this machine lacks)
fail before the model loads; a run that would evaluate nothing fails instead of writing an empty result.
`yarnkit eval TASK --help` describes each task with an example.

This module is the command: its flags, their checks before any model loads, and the dispatch to a task;
loading the model is `yarnkit.eval.loading`, running a task and saving its result `yarnkit.eval.tasks`.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

from yarnkit.errors import BadValue
from yarnkit.outputs import PLOT_SUFFIXES, check_output_dir, check_output_file
from yarnkit.eval.tasks import finish, plot_results, run_retrieval, run_task
from yarnkit.rope import SCALING_TYPES
from yarnkit.runtime.options import add_cache_arguments
from yarnkit.sdpa import SDPA_KERNELS

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
        p.add_argument("--string", metavar="SHIFT[,WINDOW]",
                       help="STRING attention: RoPE distances >= SHIFT are read as distance - SHIFT + WINDOW (default "
                            "window 128; SHIFT about a third of the trained context, e.g. 21845,128 at 64k)")
        if task != "stream":
            p.add_argument("--max-length", type=int, help="skip (and record) lengths above this")
            p.add_argument("--sdpa-kernel", default="auto", choices=SDPA_KERNELS,
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
            add_cache_arguments(p)  # --window, --sinks: the same flags as chat and serve
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
    check_string(args)
    if args.device != "auto":
        check_device(args.device)
    if args.dtype != "auto":
        to_dtype(args.dtype)
    check_output_dir(args.out, "--out")  # results are written after the evaluation: fail now, not then


def check_string(args) -> None:
    """`--string`: its syntax and S > W before the model loads (S below the context once the config is read)."""
    if args.string is None:
        return
    from yarnkit.string_attention import parse_setting

    parse_setting(args.string)
    if getattr(args, "policy", None) == "window":
        raise BadValue("--string with --policy window: that policy trims the cache while positions keep growing, and "
                       "STRING reads a key's position from its cache slot", "use --policy dense, sink or recompute")


def check_retrieval_args(args) -> None:
    from yarnkit.eval.retrieval import TASKS as RETRIEVAL_TASKS
    from yarnkit.eval.retrieval import eval_template

    check_output_dir(args.out, "--out")
    check_string(args)
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


def run(args) -> int:
    if args.task == "retrieval":
        check_retrieval_args(args)
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
        print(plot_results(load_results(args.results), args.out))
        return 0
    from yarnkit.eval.report import load_results

    check_arguments(args)
    compare = load_results(args.compare) if args.task == "ppl" else []  # a bad file fails before the evaluation
    result = run_task(args)
    finish(result, args.out, compare)
    return 0
