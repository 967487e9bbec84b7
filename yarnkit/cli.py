"""The `yarnkit` command: one subcommand per pipeline stage, each in its own module, behind one error boundary.

Every module named in `COMMANDS` exposes `add_arguments(parser)` and `run(args) -> int`; its docstring (with
examples) is the subcommand's `--help`. Only the chosen module is imported, so `yarnkit --help` is instant. A
stage's command is its `cli.py` (train, export, eval); a command that is not a stage of its own is named after
itself (`info.py`, and the runtime's two, `runtime/chat.py` and `runtime/serve.py`).
`scripts/train.py` enters here too (`main(["train", ...])`).

Error boundary (`main`): a `yarnkit.errors.UserError` (the recipe, data, paths or flags are wrong; argparse's
usage errors become one too) prints one line, `yarnkit: error: <what> — <fix>` (on a line of its own: a progress
bar left open by the failed loop is closed first), and exits 2. `--debug`
anywhere on the command line, or YARNKIT_DEBUG=1, prints its traceback as well. Any other exception is a bug
and keeps its traceback. Ctrl-C exits 130 without one. Before a command runs, the known-harmless warnings of
the libraries below are silenced (`yarnkit.quiet`), and a command with a `--port` checks that it can bind
there before it loads a model.

    yarnkit info smollm2-135m --factor 4
    yarnkit --debug export runs/tiny --out exports/tiny
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import socket
import sys
import traceback

from yarnkit.errors import BadValue, UsageError, UserError

# name -> (module, one-line help)
COMMANDS = {
    "info": ("yarnkit.info", "show a model's architecture, context and RoPE; with --factor, the YaRN table"),
    "train": ("yarnkit.train.cli", "fine-tune with a recipe: yarnkit train recipe=tiny [key=value ...] [--dry-run]"),
    "export": ("yarnkit.export.cli", "export a run/checkpoint for transformers, vLLM, llama.cpp (GGUF) and the Hub"),
    "chat": ("yarnkit.runtime.chat", "chat in the terminal with a streaming sinks + rolling-window cache"),
    "serve": ("yarnkit.runtime.serve", "OpenAI-compatible HTTP server with one streaming cache per session"),
    "eval": ("yarnkit.eval.cli", "evaluate long context: ppl vs length, passkey/needle grids, streaming ppl, report"),
}
DEBUG_FLAG = "--debug"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises `UsageError` (one line at the boundary) instead of printing usage."""

    def error(self, message: str):
        where = "" if self.prog == "yarnkit" else f"{self.prog}: "  # the boundary's prefix already says yarnkit
        raise UsageError(f"{where}{message}", f"see `{self.prog} --help`")


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("YARNKIT_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return dispatch([arg for arg in argv if arg != DEBUG_FLAG])
    except UserError as error:
        if debug:
            traceback.print_exc()
        close_progress_bars()
        print(f"yarnkit: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("yarnkit: interrupted", file=sys.stderr)
        return 130


def close_progress_bars() -> None:
    """End any progress bar still drawn (an error met mid-loop), so the error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def dispatch(argv: list[str]) -> int:
    top = Parser(prog="yarnkit", description="Extend, train, export and serve long-context LLMs.",
                 epilog="Add --debug (or set YARNKIT_DEBUG=1) to see the traceback behind an error message.\n"
                        "Example: yarnkit info smollm2-135m --factor 4",
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    known, rest = top.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[known.command][0])
    parser = Parser(prog=f"yarnkit {known.command}", description=module.__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    try:  # flags may sit between positionals (`recipe=tiny --dry-run train.max_steps=3`)
        args = parser.parse_intermixed_args(rest)
    except TypeError:  # argparse cannot intermix around subcommands (`yarnkit eval TASK ...`)
        args = parser.parse_args(rest)
    from yarnkit import quiet

    quiet.silence_known_warnings()
    check_port(args)
    return module.run(args) or 0


def check_port(args) -> None:
    """A command serving on `--host/--port` fails now, not after loading a model, when it cannot bind there."""
    port, host = getattr(args, "port", None), getattr(args, "host", "127.0.0.1")
    if port is None:
        return
    if not 0 <= port <= 65535:
        raise BadValue(f"--port {port} is not a TCP port", "use 1..65535, or 0 to pick a free one")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
            probe.bind((host, port))
    except socket.gaierror as error:
        raise BadValue(f"--host {host} is not an address of this machine ({error})",
                       "use 127.0.0.1 (the default) or an interface address") from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise BadValue(f"port {port} on {host} is already in use",
                           "stop the other server or pick another with --port (0 picks a free one)") from None
        if error.errno in (errno.EACCES, errno.EADDRNOTAVAIL):
            raise BadValue(f"cannot listen on {host}:{port} ({error.strerror})",
                           "use a port above 1023 and an address of this machine") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
