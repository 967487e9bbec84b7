"""Export a yarnkit run, checkpoint or HF model folder as files stock loaders read: transformers, vLLM, llama.cpp.

  yarnkit export RUN --out DIR                    # newest complete RUN/checkpoints/step_* -> DIR (HF safetensors)
  yarnkit export RUN --out DIR --gguf --gguf-type q8_0
  yarnkit export RUN --out DIR --zero-shards --dtype float32   # a ZeRO run's fp32 masters from state/ shards
  yarnkit export CKPT --out DIR --merge-lora --push-to-hub you/model --private
  yarnkit export DIR --push-only --push-to-hub you/model     # upload (or resume uploading) a finished export

DIR gets safetensors shards, a config.json whose RoPE keys make stock transformers (v5 `rope_parameters`, v4
and vLLM `rope_scaling`) apply YaRN, the tokenizer, generation_config.json, the recipe, README.md (model card with
the run's eval results) and export_report.json. `dynamic_yarn` is written as static `yarn` at its trained factor.
Before DIR appears, the export is reloaded by plain transformers in a fresh process and its logits compared with
the in-memory model on a prompt longer than the original context (fp32 tolerance 1e-4, bf16/fp16 2e-2); the GGUF
is read back and compared too. Everything is written to a temp dir beside DIR and renamed at the end, so a
failed export never leaves a DIR that looks complete; DIR gets the user's umask. Progress is one line per stage
on stderr.

Nothing is lost: DIR may not be, contain, or sit inside the source (RUN, its checkpoint or model folder), and
--overwrite only replaces a folder that is itself a yarnkit export (it holds export_report.json); anything else in
the way is named and left alone. Tested by tests/test_export*.py and tests/test_bad_input.py; docs in
docs/export.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from yarnkit.export import card, hf, verify
from yarnkit.export.source import ExportSource, find_export_source
from yarnkit.errors import ExportError
from yarnkit.models import check_device, load_config
from yarnkit.model_files import apply_umask, make_temp_dir
from yarnkit.outputs import check_output_dir

REPORT_FILE = "export_report.json"  # marks a folder as a yarnkit export: the only kind --overwrite replaces


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a RUN dir, a checkpoints/step_* dir or an HF model dir")
    parser.add_argument("--out", help="output folder: absent or empty, or an earlier export with --overwrite; never "
                                      "the source, inside it or around it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is an earlier yarnkit export (holds export_report.json)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype to write (auto: the checkpoint's)")
    parser.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base model")
    parser.add_argument("--zero-shards", action="store_true",
                        help="gather the weights from the checkpoint's DeepSpeed ZeRO shards (state/, deepspeed's "
                             "zero_to_fp32) instead of model/: the fp32 masters of a bf16 ZeRO run (with --dtype "
                             "float32); needs deepspeed")
    parser.add_argument("--gguf", action="store_true", help="also write a llama.cpp GGUF (Llama architecture)")
    parser.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                        help="GGUF weight type (default f16; q8_0 is ~half the size, slightly less exact)")
    parser.add_argument("--gguf-pre", default=None, help="llama.cpp pre-tokenizer name (default: detected or 'default')")
    parser.add_argument("--verify-tokens", type=int, default=None,
                        help="verification prompt length (default: original context + 64, so YaRN matters; the "
                             "whole context for a model without RoPE scaling)")
    parser.add_argument("--device", default="cpu", help="where the verification forwards run (cuda for big models)")
    parser.add_argument("--no-verify", action="store_true", help="skip the reload-and-compare checks (not advised)")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload DIR to this Hub repo (user/name)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--push-only", action="store_true",
                        help="RUN_OR_CHECKPOINT is a finished export folder: only upload it (e.g. after a failed push)")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_dir(out: Path, overwrite: bool, source: ExportSource | None = None, source_path: Path | None = None):
    """Refuse an --out whose writing or replacing could destroy something the export did not create."""
    out = out.resolve()
    itself = [p.resolve() for p in (source_path, source and source.model_dir) if p]  # what the user named first
    folders = list(dict.fromkeys(itself + ([source.run_dir.resolve()] if source and source.run_dir else [])))
    suggestion = folders[0].parent / f"{folders[0].name}-export" if folders else None
    if out in itself:
        raise ExportError(f"--out {out} is the export source itself (replacing it would delete it)",
                          f"write the export to a new folder, e.g. --out {suggestion}")
    for folder in folders:
        if folder in out.parents:
            raise ExportError(f"--out {out} is inside the export source {folder}",
                              f"write the export outside it, e.g. --out {suggestion}")
    for folder in folders:
        if _inside(folder, out):
            raise ExportError(f"--out {out} contains the export source {folder} (replacing it would delete the source)",
                              f"choose a folder outside it, e.g. --out {suggestion}")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder", "choose a folder path for the export")
    inside = sorted(p.name for p in out.iterdir())
    if not inside:
        return
    if not overwrite:
        raise ExportError(f"--out {out} exists and is not empty",
                          "pass --overwrite to replace an earlier export there, or choose another path")
    if REPORT_FILE not in inside:
        shown = ", ".join(inside[:3]) + (f" and {len(inside) - 3} more" if len(inside) > 3 else "")
        raise ExportError(f"--out {out} is not a yarnkit export (no {REPORT_FILE}); it holds {shown}",
                          "--overwrite only replaces an earlier export: move those files or choose another --out")


class Progress:
    """One line per export stage on stderr: `export [2/5] reloading ... (+12 s)`."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def __call__(self, stage: str) -> None:
        self.done += 1
        print(f"export [{self.done}/{self.total}] {stage} (+{time.perf_counter() - self.start:.0f} s)",
              file=sys.stderr, flush=True)


SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as huggingface_hub reads them


def shard_bytes(size: str | int) -> int:
    """`--max-shard-size` ("2GB", "500MB", or bytes) in bytes; anything else fails naming it."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", str(size), re.IGNORECASE)
    value = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()]) if match else 0
    if value < 1:
        raise ExportError(f"--max-shard-size {size!r} is not a size", "write it like 2GB, 500MB or a number of bytes")
    return value


def check_verify_tokens(n_tokens: int, config) -> None:
    if n_tokens > config.max_position_embeddings:
        raise ExportError(f"--verify-tokens {n_tokens} is beyond the model's context of "
                          f"{config.max_position_embeddings} tokens",
                          "leave it out (original context + 64 tokens) or pass a length within the context")


def default_verify_tokens(config) -> int:
    """64 tokens past the original context, where a scaling matters; a model without one, its whole context."""
    from yarnkit.export.rope_keys import main_rope_dict

    original = main_rope_dict(config.rope_parameters).get("original_max_position_embeddings")
    return min(int(original or config.max_position_embeddings) + 64, config.max_position_embeddings)


def export(source_path, out, *, overwrite=False, dtype="auto", merge_lora=False, gguf=False, gguf_type="f16",
           gguf_pre=None, verify_tokens=None, run_checks=True, max_shard_size="2GB", hub_repo=None,
           device="cpu", zero_shards=False) -> dict:
    """Write the export to `out` atomically and return the report (also saved as export_report.json)."""
    out = Path(out).expanduser().resolve()
    if gguf and importlib.util.find_spec("gguf") is None:
        raise ExportError("--gguf needs the `gguf` package (llama.cpp's writer)", "pip install gguf")
    if run_checks:
        check_device(device)
    source = find_export_source(source_path, zero_shards=zero_shards)
    check_out_dir(out, overwrite, source, Path(source_path).expanduser())
    check_output_dir(out, "--out")  # the export is written beside --out and renamed onto it at the end
    if merge_lora and not source.is_lora:
        raise ExportError(f"--merge-lora: {source.model_dir} holds full weights, no LoRA adapter to merge",
                          "leave out --merge-lora")
    max_shard_size = shard_bytes(max_shard_size)
    hf.check_rope_config(source)
    if run_checks and verify_tokens and (source.model_dir / "config.json").is_file():
        check_verify_tokens(verify_tokens, load_config(source.model_dir))  # before the weights load
    progress = Progress(3 + run_checks + gguf * (1 + run_checks))
    progress(f"loading {source.model_dir}")
    model, tokenizer, notes = hf.load_for_export(source, dtype=dtype, merge_lora=merge_lora)
    notes += hf.prepare_for_inference(model, tokenizer)
    tmp = make_temp_dir(out)
    try:
        progress("writing safetensors, config, tokenizer")
        hf.write_hf(model, tokenizer, tmp, source.recipe_path, max_shard_size)
        report = {"source": str(source.model_dir), "base_model": source.base_model, "notes": notes, "hub_repo": hub_repo,
                  "rope_parameters": model.config.rope_parameters,
                  "max_position_embeddings": model.config.max_position_embeddings}
        report["config_check"] = verify.verify_config(tmp, tokenizer)
        input_ids = None
        if run_checks:
            n_tokens = verify_tokens or default_verify_tokens(model.config)
            check_verify_tokens(n_tokens, model.config)
            input_ids = verify.prompt_ids(tokenizer, n_tokens, model.config.vocab_size)
            progress(f"reloading with plain transformers in a fresh process, comparing logits on {n_tokens} tokens")
            report["hf_check"] = verify.verify_hf(tmp, model.to(device), input_ids)
        if gguf:
            from yarnkit.export import gguf as gguf_export

            gguf_path = tmp / f"{out.name}-{gguf_type}.gguf"
            model.cpu()
            progress(f"writing {gguf_path.name}")
            report["gguf_notes"] = gguf_export.write_gguf(tmp, model, tokenizer, gguf_path, gguf_type, gguf_pre)
            report["gguf_file"] = gguf_path.name
            report["gguf_rope"] = gguf_export.llama_cpp_encoding(model.config.rope_parameters)
            if run_checks:
                progress("reading the GGUF back and comparing logits")
                report["gguf_check"] = verify.verify_gguf(gguf_path, model.to(device), input_ids, gguf_type)
        progress(f"model card, {REPORT_FILE}, moving into {out}")
        card.write_card(tmp, report, source, out.name)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        apply_umask(tmp)  # safetensors writes weights 0600; the export's files get the user's umask like the rest
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an old out (allowed by --overwrite) is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(args) -> int:
    if args.push_only:
        if not args.push_to_hub or not (Path(args.source) / REPORT_FILE).is_file():
            raise ExportError(f"--push-only needs --push-to-hub REPO and a finished export folder (with {REPORT_FILE}) "
                              "as the source", "e.g. yarnkit export exports/tiny --push-only --push-to-hub you/model")
        out = Path(args.source)
    else:
        if not args.out:
            raise ExportError("--out DIR is required (where the export is written)",
                              f"e.g. yarnkit export {args.source} --out exports/{Path(args.source).name}")
        if args.verify_tokens is not None and args.verify_tokens < 2:
            raise ExportError(f"--verify-tokens {args.verify_tokens} is too short to compare anything",
                              "leave it out (original context + 64 tokens) or pass at least 2")
        out = Path(args.out)
        report = export(args.source, out, overwrite=args.overwrite, dtype=args.dtype, merge_lora=args.merge_lora,
                        gguf=args.gguf, gguf_type=args.gguf_type, gguf_pre=args.gguf_pre,
                        verify_tokens=args.verify_tokens, run_checks=not args.no_verify,
                        max_shard_size=args.max_shard_size, hub_repo=args.push_to_hub, device=args.device,
                        zero_shards=args.zero_shards)
        print(json.dumps({k: report[k] for k in ("notes", "config_check", "hf_check", "gguf_check") if k in report},
                         indent=2, default=str))
        print(f"exported to {out.resolve()}")
    if args.push_to_hub:
        from yarnkit.export.hub import push_folder

        try:
            url = push_folder(out, args.push_to_hub, private=args.private)
        except ExportError as error:
            raise ExportError(str(error), f"the export in {out} is complete; upload it later with "
                              f"`yarnkit export {out} --push-only --push-to-hub {args.push_to_hub}`") from error
        print(f"uploaded to {url}")
    return 0
