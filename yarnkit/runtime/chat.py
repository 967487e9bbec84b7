"""Chat in the terminal with a streaming (attention sinks + rolling window) cache: the conversation never runs out
of context, and memory stays flat however long it goes.

  yarnkit chat                                  # the bundled SmolLM2-135M-Instruct
  yarnkit chat runs/yarn-64k --window 4092      # newest checkpoints/step_*/model of a run dir
  yarnkit chat model.gguf --prompt "Hi!"        # one reply, then exit (for scripts)
  printf 'Hi\\nAnd you?\\n' | yarnkit chat       # piped stdin: one user turn per line

CKPT is a run dir, an HF model dir, a .gguf file, or `smollm2-135m`. `--window` is the whole cache, sinks
included (the same meaning in `chat`, `serve` and `eval stream`; every streaming flag is declared in
yarnkit/runtime/options.py). Interactive commands (handled here, never
sent to the model): /help, /reset (forget everything), /stats (tokens seen, cache size, memory), /quit.
Ctrl-C stops the current reply; Ctrl-C or Ctrl-D at the prompt exits, and so does Ctrl-C while the model loads.
At a terminal a message may be long and span lines: a pasted page arrives whole as one message (bracketed paste,
`yarnkit.runtime.terminal`) and Enter sends it. `--prompt -` reads one (multi-line) message from stdin. When a
message does not fit the window, or is compressed, a `[note]` on stderr says so before the reply.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from yarnkit.errors import BadValue
from yarnkit.runtime.conversation import Conversation
from yarnkit.runtime.options import (add_stream_arguments, check_stream_arguments, load_for_cli,
                                     stream_options)
from yarnkit.runtime.terminal import can_read_messages, read_message

COMMANDS = {"/help": "show these commands", "/reset": "forget the conversation (cache and history)",
            "/stats": "tokens seen, cache size and memory (JSON)", "/quit": "leave (also /exit, Ctrl-D)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", nargs="?", default="smollm2-135m", help="run dir, HF dir, .gguf, or smollm2-135m")
    parser.add_argument("--prompt", help="answer this one message and exit ('-' reads it from stdin)")
    parser.add_argument("--system", help="system prompt (pinned in the cache, never evicted)")
    add_stream_arguments(parser)


def build_conversation_factory(model, tokenizer, args):
    """`new_conversation()` over an already loaded model; the options are resolved (and checked) here, once."""
    options = stream_options(args).resolved(model.config, args.device)

    def new_conversation() -> Conversation:
        return Conversation(model, tokenizer, options, compress_rate=args.compress_rate,
                            compress_over=args.compress_over)

    return new_conversation


def reply(conversation: Conversation, history: list[dict], text: str, args, out=None,
          keep_going: bool = True) -> None:
    """Stream one reply to `out`; what the turn had to do to the input (streamed past the window, compressed) is
    said on stderr before the reply's first word. Ctrl-C stops it between two tokens (never inside a forward, so
    the cache stays whole); the partial reply stays in the history. Bad input (a system prompt that cannot fit) is
    printed and the chat goes on; with `keep_going=False` (one --prompt) it is raised as a `BadValue`."""
    out = out or sys.stdout  # looked up now: a default bound at import would outlive a replaced stdout
    messages = history + [{"role": "user", "content": text}]
    pieces = conversation.respond(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if in_main else None
    announced = False
    try:
        for piece in pieces:
            if not announced:
                announced = announce(conversation.last_info)
            out.write(piece)
            out.flush()
            if stop.is_set():
                out.write(" [stopped]")
                break
    except ValueError as error:
        if not keep_going:
            raise BadValue(str(error)) from None
        print(f"error: {error}", file=sys.stderr)
    finally:
        pieces.close()
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if not announced:  # an empty reply: the notes still come before the (empty) line
        announce(conversation.last_info)
    out.write("\n")
    out.flush()
    history[:] = conversation.messages


def announce(info: dict) -> bool:
    """Print the notes of a turn (`Conversation.last_info`) on stderr; True once printed."""
    if "warning" in info:
        print(f"[note] {info['warning']}", file=sys.stderr, flush=True)
    if "ratio" in info:
        print(f"[compressed the message {info['ratio']}x]", file=sys.stderr, flush=True)
    return True


def checked_text(text: str, where: str, fix: str) -> str:
    """`text` from argv or stdin, which Python decodes with surrogate escapes: bytes that are not UTF-8 fail here,
    naming `where`, instead of inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadValue(f"{where} is not UTF-8 text (byte {error.start}: "
                       f"{text[error.start].encode('utf-8', 'surrogateescape')!r})", fix) from None
    return text


def read_prompt(prompt: str) -> str:
    """`--prompt TEXT`, or with `--prompt -` all of stdin; either must be UTF-8."""
    fix = "convert it first, e.g. iconv -f latin1 -t utf-8 FILE | yarnkit chat --prompt -"
    if prompt != "-":
        return checked_text(prompt, "--prompt", fix)
    return checked_text(sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "--prompt -: stdin", fix)


def read_turn(interactive: bool) -> str:
    """The next message: from the terminal whole (long lines, pastes), or one line of piped stdin."""
    if interactive and can_read_messages():
        return read_message("> ")
    return checked_text(input("> " if interactive else ""), "a line of stdin",
                        "convert it first, e.g. iconv -f latin1 -t utf-8 FILE | yarnkit chat")


def run(args) -> int:
    check_stream_arguments(args)
    if args.system is not None:
        checked_text(args.system, "--system", "pass the system prompt as UTF-8 text")
    text = None
    if args.prompt is not None:
        text = read_prompt(args.prompt)
        if not text.strip():
            raise BadValue("empty prompt", "pass some text with --prompt (or on stdin with --prompt -)")
    loaded = load_for_cli(args)
    if loaded is None:
        return 130
    conversation = build_conversation_factory(*loaded, args)()  # bad options raise BadValue: yarnkit/cli.py prints it
    history = [{"role": "system", "content": args.system}] if args.system else []
    if text is not None:
        reply(conversation, history, text, args, keep_going=False)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("yarnkit chat: /help for commands; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = read_turn(interactive)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text in ("/help", "/?"):
            print("\n".join(f"  {name:<7} {what}" for name, what in COMMANDS.items()), file=sys.stderr)
            continue
        if text == "/reset":
            conversation.reset()
            history = history[:1] if args.system else []
            print("[cache and history cleared]", file=sys.stderr)
            continue
        if text == "/stats":
            print(json.dumps(conversation.stats()), file=sys.stderr if interactive else sys.stdout)
            continue
        if text.startswith("/") and text.split()[0] not in COMMANDS and " " not in text:
            print(f"unknown command {text}; /help lists them (a message starting with '/' needs a space)",
                  file=sys.stderr)
            continue
        reply(conversation, history, line, args)
