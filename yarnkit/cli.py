"""The `yarnkit` command: one subcommand per pipeline stage, each living in its own module.

Every module named in `COMMANDS` exposes `add_arguments(parser)` and `run(args) -> int`; its docstring is the
subcommand's `--help` description. Only the chosen module is imported, so `yarnkit --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("yarnkit.info", "show a model's architecture, context and RoPE; with --factor, the YaRN table"),
    "train": ("yarnkit.train.trainer", "fine-tune with a recipe: yarnkit train recipe=tiny [key=value ...] [--dry-run]"),
    "export": ("yarnkit.export.cli", "export a run/checkpoint for transformers, vLLM, llama.cpp (GGUF) and the Hub"),
    "chat": ("yarnkit.runtime.chat", "chat in the terminal with a streaming sinks + rolling-window cache"),
    "serve": ("yarnkit.runtime.serve", "OpenAI-compatible HTTP server with one streaming cache per session"),
    "eval": ("yarnkit.eval.cli", "evaluate long context: ppl vs length, passkey/needle grids, streaming ppl, plots"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = argparse.ArgumentParser(prog="yarnkit", description="Extend, train, export and serve long-context LLMs.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    known, rest = top.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[known.command][0])
    parser = argparse.ArgumentParser(prog=f"yarnkit {known.command}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return module.run(parser.parse_args(rest)) or 0


if __name__ == "__main__":
    sys.exit(main())
