"""What `yarnkit eval` runs once its flags are checked: one task on a loaded model (`run_task`: ppl, passkey,
needle, stream; `run_retrieval`: the RULER-style tasks), and where each result goes (OUT/<task>-<label>.json, a
PNG beside it, `finish`). A task that would evaluate nothing fails instead of writing an empty result.

Tested by `python -m pytest tests/test_eval_cli.py tests/test_eval_retrieval.py`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from yarnkit.errors import BadValue, UserError
from yarnkit.eval.loading import load_for_eval, model_context
from yarnkit.runs import model_location


def result_path(result: dict, out: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", result["label"]).strip("_") or "model"
    return Path(out) / f"{result['task']}-{slug}.json"


def save_result(result: dict, out: str) -> Path:
    path = result_path(result, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def plot_results(results: list[dict], path) -> Path:
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
    from yarnkit.eval.documents import iter_eval_documents, tokenize_documents
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
    """ppl, passkey, needle or stream on the model `args` names (flags checked by `yarnkit.eval.cli`)."""
    from yarnkit.eval.documents import iter_eval_documents
    from yarnkit.eval.ppl import bos_token_id

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
            from yarnkit.corpus import read_text

            filler = read_text(args.haystack or sample_path("eval"))
        result.update(evaluate_passkey(model, tokenizer, args.lengths, args.depths, args.trials, args.seed, filler,
                                       args.max_length, args.max_new_tokens))
    else:
        from yarnkit.eval.stream import evaluate_stream, make_policy, token_stream
        from yarnkit.sink_token import streaming_sinks

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
    from yarnkit.eval.documents import tokenize_documents

    for name, text in documents:
        kept, empty = tokenize_documents([(name, text)], tokenizer)
        skipped.extend(empty)
        yield from kept


def run_retrieval(args) -> list[dict]:
    """Every task of `--tasks` on one loaded model: a result per task."""
    from yarnkit.assets import sample_path
    from yarnkit.eval.haystack import Haystack
    from yarnkit.eval.retrieval import TaskOptions, evaluate_retrieval

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
        finish(result, args.out)
    return results


def finish(result: dict, out: str, compare: list[dict] = ()) -> Path:
    """Draw the result's PNG (with `compare` results on the same chart) and save its JSON beside it."""
    result["plot"] = str(result_path(result, out).with_suffix(".png"))
    plot_results([result, *compare], result["plot"])
    path = save_result(result, out)
    print(json.dumps({key: result[key] for key in ("task", "label", "plot")} | {"result": str(path)}))
    return path
