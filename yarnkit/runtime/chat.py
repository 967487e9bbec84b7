"""Chat in the terminal with a streaming (attention sinks + rolling window) cache: the conversation never runs out
of context, and memory stays flat however long it goes.

  yarnkit chat                                  # the bundled SmolLM2-135M-Instruct
  yarnkit chat runs/yarn-64k --window 4092      # newest checkpoints/step_*/model of a run dir
  yarnkit chat model.gguf --prompt "Hi!"        # one reply, then exit (for scripts)
  printf 'Hi\\nAnd you?\\n' | yarnkit chat       # piped stdin: one user turn per line

CKPT is a run dir, an HF model dir, a .gguf file, or `smollm2-135m`. `--window` is the whole cache, sinks
included (the same meaning in `chat`, `serve` and `eval stream`). Interactive commands (handled here, never
sent to the model): /help, /reset (forget everything), /stats (tokens seen, cache size, memory), /quit.
Ctrl-C stops the current reply; Ctrl-C or Ctrl-D at the prompt exits, and so does Ctrl-C while the model loads.
`--prompt -` reads one (multi-line) message from stdin.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from yarnkit.errors import BadValue
from yarnkit.runtime.conversation import Conversation, load_chat_model
from yarnkit.runtime.engine import StreamOptions

COMMANDS = {"/help": "show these commands", "/reset": "forget the conversation (cache and history)",
            "/stats": "tokens seen, cache size and memory (JSON)", "/quit": "leave (also /exit, Ctrl-D)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", nargs="?", default="smollm2-135m", help="run dir, HF dir, .gguf, or smollm2-135m")
    parser.add_argument("--prompt", help="answer this one message and exit ('-' reads it from stdin)")
    parser.add_argument("--system", help="system prompt (pinned in the cache, never evicted)")
    add_stream_arguments(parser)


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `chat` and `serve`."""
    parser.add_argument("--window", type=int, default=1024,
                        help="tokens the cache holds in all, sinks and a pinned system prompt included (default 1024)")
    parser.add_argument("--sinks", type=int, default=None, help="sink tokens (default: 1 with a sink token, else 4)")
    parser.add_argument("--evict-batch", type=int, default=None, help="tokens dropped per eviction (window//16)")
    parser.add_argument("--decode", default="auto", choices=["auto", "eager", "static", "graph"],
                        help="decode path: auto = CUDA graph on a GPU (falls back loudly), eager growing cache on CPU "
                             "(serve: the batched static cache on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="graph path: torch.compile the decode step inside the CUDA graph (fused kernels; "
                             "a minute of compiling at start)")
    parser.add_argument("--string", metavar="SHIFT[,WINDOW]",
                        help="STRING attention: cache distances >= SHIFT are read as distance - SHIFT + WINDOW "
                             "(default window 128; SHIFT below --window; eager/static decode paths)")
    parser.add_argument("--sirllm-keep", type=int, default=0, help="SirLLM: window slots for high-information tokens")
    parser.add_argument("--sirllm-decay", type=float, default=0.9, help="SirLLM: score decay per dialogue round")
    parser.add_argument("--compress-rate", type=float, default=None,
                        help="LLMLingua-style: keep this fraction of long user messages' tokens (e.g. 0.5)")
    parser.add_argument("--compress-over", type=int, default=512, help="compress user messages above this many tokens")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable replies")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")


def stream_options(args) -> StreamOptions:
    return StreamOptions(sinks=args.sinks, window=args.window, evict_batch=args.evict_batch,
                         sirllm_keep=args.sirllm_keep, sirllm_decay=args.sirllm_decay, decode=args.decode,
                         compile=args.compile)


def load_for_cli(args):
    """`(model, tokenizer)` with `--string` applied, or None when Ctrl-C interrupted the loading (a clean exit)."""
    string = check_string(args)
    try:
        model, tokenizer = load_chat_model(args.ckpt, dtype=args.dtype, device=args.device)
    except KeyboardInterrupt:
        print("\ninterrupted while loading the model", file=sys.stderr)
        return None
    if string is not None:
        apply_string_option(model, args, *string)
    return model, tokenizer


def check_string(args) -> tuple[int, int] | None:
    """`--string S[,W]` before the model loads: its syntax, S > W, S below `--window` (cache distances stay below
    the window, so a larger S would change nothing), and a decode path that runs it."""
    if getattr(args, "string", None) is None:
        return None
    from yarnkit.runtime.engine import string_decode
    from yarnkit.string_attention import check_setting, parse_setting

    shift, window = parse_setting(args.string)
    check_setting(shift, window, args.window, "--window")
    string_decode(args.decode, args.compile, "cuda" if str(args.device).startswith("cuda") else "cpu")
    return shift, window


def apply_string_option(model, args, shift: int, window: int) -> None:
    """STRING on the loaded model; the decode path it runs on is checked now (a forced `graph` or `--compile`
    fails with the fix) and `auto` that moves to `static` says so in one line."""
    from yarnkit.runtime.engine import string_options
    from yarnkit.string_attention import apply_string

    context = min(args.window, getattr(model.config, "max_position_embeddings", None) or args.window)
    apply_string(model, shift, window, context=context, context_name="--window" if context == args.window else
                 "the model's context")
    options = string_options(model, stream_options(args))
    if options.decode != args.decode:
        print(f"yarnkit: STRING S={shift} W={window} runs on the {options.decode} decode path (its attention is not "
              "checked inside a CUDA graph)", file=sys.stderr)


def build_conversation_factory(model, tokenizer, args):
    """`new_conversation()` over an already loaded model."""
    options = stream_options(args)
    options.resolved(model.config)  # bad options fail now, not at serve's first request

    def new_conversation() -> Conversation:
        return Conversation(model, tokenizer, options, compress_rate=args.compress_rate,
                            compress_over=args.compress_over)

    return new_conversation


def reply(conversation: Conversation, history: list[dict], text: str, args, out=sys.stdout) -> None:
    """Stream one reply to `out`. Ctrl-C stops it between two tokens (never inside a forward, so the cache stays
    whole); the partial reply stays in the history."""
    messages = history + [{"role": "user", "content": text}]
    pieces = conversation.respond(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if in_main else None
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
            if stop.is_set():
                out.write(" [stopped]")
                break
    except ValueError as error:  # bad input (e.g. a system prompt that cannot fit): say so, keep chatting
        print(f"error: {error}", file=sys.stderr)
    finally:
        pieces.close()
        if in_main:
            signal.signal(signal.SIGINT, previous)
    out.write("\n")
    out.flush()
    if "warning" in conversation.last_info:
        print(f"[note] {conversation.last_info['warning']}", file=sys.stderr)
    if "ratio" in conversation.last_info:
        print(f"[compressed the message {conversation.last_info['ratio']}x]", file=sys.stderr)
    history[:] = conversation.messages


def run(args) -> int:
    text = None
    if args.prompt is not None:
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not text.strip():
            raise BadValue("empty prompt", "pass some text with --prompt (or on stdin with --prompt -)")
    loaded = load_for_cli(args)
    if loaded is None:
        return 130
    conversation = build_conversation_factory(*loaded, args)()  # bad options raise BadValue: yarnkit/cli.py prints it
    history = [{"role": "system", "content": args.system}] if args.system else []
    if text is not None:
        reply(conversation, history, text, args)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("yarnkit chat: /help for commands; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
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
