"""`Conversation`, `yarnkit chat` and `yarnkit serve`.

Run: `python -m pytest tests/test_runtime_chat.py -q` (the two `slow` tests start real SmolLM2 processes).

Fast tests use the real SmolLM2 tokenizer (chat template) with a tiny random model of the same vocabulary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_model

from yarnkit.runtime.conversation import Conversation
from yarnkit.runtime.options import StreamOptions


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=49152)


def collect(conversation, messages, **kwargs):
    return "".join(conversation.respond(messages, **kwargs))


@pytest.mark.parametrize("kind", ["text", "random", "special"])
def test_reply_text_equals_a_whole_decode_at_every_token(tokenizer, kind):
    """The turn's incremental detokenizer gives `decode(reply)` exactly after each token: multi-byte characters
    split over tokens, random ids, skipped special tokens (the stream holds those back: a whole decode then)."""
    import torch

    from yarnkit.runtime.conversation import ReplyText

    ids = tokenizer("Héllo wörld — naïve café 日本語のテキスト 🙂🙃! It was a bright cold day in April. " * 4,
                    add_special_tokens=False)["input_ids"]
    if kind == "random":
        ids = torch.randint(0, len(tokenizer), (400,), generator=torch.Generator().manual_seed(0)).tolist()
    if kind == "special":
        ids = ids[:20] + [tokenizer.eos_token_id, 0, 1] + ids[20:60] + [tokenizer.eos_token_id]
    reply = ReplyText(tokenizer)
    assert reply.stream is not None  # the bundled tokenizer streams
    held = 0
    for count in range(1, len(ids) + 1):
        streamed = len(reply.streamed)
        assert reply.extend(ids[:count]) == tokenizer.decode(ids[:count], skip_special_tokens=True)
        held += len(reply.streamed) == streamed
    assert held < len(ids) // 2  # most tokens came from the stream, not from a whole decode


def test_incremental_turns_equal_a_fresh_session(model, tokenizer):
    opts = StreamOptions(window=4000)
    chat = Conversation(model, tokenizer, opts)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    collect(chat, history, max_new_tokens=5)
    history = chat.messages + [{"role": "user", "content": "And then?"}]
    seen = chat.engine.tokens_seen
    second = collect(chat, history, max_new_tokens=5)
    assert chat.engine.tokens_seen - seen < 20  # only the new turn was fed, not the whole history again
    fresh = Conversation(model, tokenizer, opts)
    assert collect(fresh, history, max_new_tokens=5) == second  # same text as re-feeding everything
    assert fresh.engine.cache_ids.tolist()[:len(chat.engine.cache_ids) - 5] == \
        chat.engine.cache_ids.tolist()[:len(chat.engine.cache_ids) - 5]


def test_system_prompt_pinned_and_long_message_streams_through(model, tokenizer):
    chat = Conversation(model, tokenizer, StreamOptions(window=64, evict_batch=8))
    system = [{"role": "system", "content": "You are a pirate."}]
    long_text = "word " * 400
    collect(chat, system + [{"role": "user", "content": long_text}], max_new_tokens=3)
    assert "warning" in chat.last_info and len(chat.engine) <= chat.engine.window
    pinned = tokenizer(tokenizer.decode(chat.engine.cache_ids[:chat.engine.pinned]),
                       add_special_tokens=False)["input_ids"]
    assert "You are a pirate." in tokenizer.decode(pinned) and chat.engine.pinned > 4


def test_long_message_compressed_once_and_history_still_matches(model, tokenizer):
    chat = Conversation(model, tokenizer, StreamOptions(window=2000), compress_rate=0.5, compress_over=50)
    text = "Read this.\n" + " ".join(f"item{i}" for i in range(120)) + "\nWhich item came first?"
    history = [{"role": "user", "content": text}]
    collect(chat, history, max_new_tokens=3)
    assert 1.8 < chat.last_info["ratio"] < 2.2 and chat.messages[0]["content"] == text  # caller's view intact
    assert chat.fed_messages[0]["content"] != text and "Which item came first?" in chat.fed_messages[0]["content"]
    seen = chat.engine.tokens_seen
    collect(chat, chat.messages + [{"role": "user", "content": "Thanks"}], max_new_tokens=3)
    assert chat.engine.tokens_seen - seen < 20  # the original long message was recognised, not re-fed


def test_bad_messages_fail_clearly_and_leave_no_state(model, tokenizer):
    chat = Conversation(model, tokenizer, StreamOptions(window=64))
    for messages, match in [([], "non-empty list"), ([{"role": "robot", "content": "hi"}], r"messages\[0\].role"),
                            ([{"role": "user", "content": "  "}], "non-empty user"), (["hi"], r"messages\[0\]"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts")]:
        with pytest.raises(ValueError, match=match):
            collect(chat, messages)
        assert len(chat.engine) == 0 and chat.messages == []


def test_interrupted_reply_keeps_cache_and_history_consistent(model, tokenizer):
    chat = Conversation(model, tokenizer, StreamOptions(window=500))
    pieces = chat.respond([{"role": "user", "content": "Tell me a story"}], max_new_tokens=50)
    next(pieces)
    pieces.close()  # like Ctrl-C or a dropped HTTP client
    assert chat.messages[-1]["role"] == "assistant"
    assert tokenizer(chat.fed_text, add_special_tokens=False)["input_ids"] == chat.engine.cache_ids.tolist()


def test_failure_inside_a_forward_resets_instead_of_keeping_a_torn_cache(model, tokenizer):
    chat = Conversation(model, tokenizer, StreamOptions(window=500))
    calls = []

    def fail_on_third_decode(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C landed between layer 0 and layer 1
    hook = model.model.layers[1].register_forward_pre_hook(fail_on_third_decode)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect(chat, [{"role": "user", "content": "Tell me a story"}], max_new_tokens=10)
    finally:
        hook.remove()
    assert len(chat.engine) == 0 and chat.messages == []  # torn cache discarded
    assert collect(chat, [{"role": "user", "content": "Again"}], max_new_tokens=3) is not None
    assert chat.engine.is_consistent()


def test_no_chat_template_falls_back_with_warning(model, tokenizer, caplog):
    class Plain:
        chat_template = None
        eos_token_id = tokenizer.eos_token_id

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    chat = Conversation(model, Plain(), StreamOptions(window=200))
    assert "no chat template" in caplog.text
    collect(chat, [{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert chat.fed_text.startswith("User: hi\nAssistant:")


ROOT = Path(__file__).resolve().parents[1]


def cli(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "yarnkit.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240, **kwargs)


@pytest.mark.slow
def test_chat_prompt_mode_on_smollm2():
    result = cli("chat", "--prompt", "What is the capital of France? One word.", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout
    empty = cli("chat", "--prompt", "   ")
    assert empty.returncode == 2 and "empty prompt" in empty.stderr


def post(url, body, session="s1", timeout=120):
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Session-Id": session})
    return urllib.request.urlopen(request, timeout=timeout)


@pytest.mark.slow
def test_serve_openai_api_on_smollm2():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "yarnkit.cli", "serve", "--port", "0", "--window", "200"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()  # "serving NAME on http://127.0.0.1:PORT/v1" once the model is loaded
        assert "http://127.0.0.1:" in line, line
        base = line.strip().split(" on ")[-1]
        models = json.load(urllib.request.urlopen(base + "/models", timeout=30))
        assert models["object"] == "list" and models["data"][0]["object"] == "model"
        name = models["data"][0]["id"]

        question = [{"role": "user", "content": "What is the capital of France? One word."}]
        answer = json.load(post(base + "/chat/completions", {"model": name, "messages": question, "max_tokens": 8}))
        assert "Paris" in answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] >= 1

        history = question + [answer["choices"][0]["message"], {"role": "user", "content": "And of Italy?"}]
        with post(base + "/chat/completions", {"model": name, "messages": history, "max_tokens": 8,
                                                 "stream": True}) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = [l[6:] for l in response.read().decode().splitlines() if l.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert "Rome" in text

        # a client that disconnects mid-stream, then an immediate follow-up on the same session
        hang_up = post(base + "/chat/completions", {"model": name, "messages": question, "max_tokens": 200,
                                                  "stream": True}, "s2")
        hang_up.readline()
        hang_up.close()
        for attempt in range(50):  # 409 while the server still finishes the dropped stream, then 200
            try:
                again = json.load(post(base + "/chat/completions", {"model": name, "messages": question, "max_tokens": 3},
                                  "s2"))
                break
            except urllib.error.HTTPError as error:
                assert error.code == 409
                time.sleep(0.2)
        assert again["choices"][0]["message"]["role"] == "assistant"

        with pytest.raises(urllib.error.HTTPError) as bad:
            post(base + "/chat/completions", {"model": name, "messages": [{"role": "wizard", "content": "hi"}]})
        assert bad.value.code == 400 and "messages[0].role" in bad.value.read().decode()
        health = json.load(urllib.request.urlopen(base[:-3] + "/health", timeout=30))
        assert health["status"] == "ok" and server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_chat_cli_handles_commands_itself_and_prints_no_warning_mid_reply(tiny_dir):
    """Piped stdin: /help is answered locally (never sent to the model), a reply streams with no FutureWarning."""
    result = cli("chat", str(tiny_dir), "--max-new-tokens", "4", input="/help\nHello\n/stats\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "/reset" in result.stderr and "Warning" not in result.stderr, result.stderr[-2000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["messages"] == 2 and stats["completion_tokens"] == 4  # one user turn + one reply: /help was not fed


def test_ctrl_c_while_loading_exits_cleanly(monkeypatch, capsys):
    from yarnkit.runtime import chat, options

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(options, "load_chat_model", interrupted)
    parser = __import__("argparse").ArgumentParser()
    chat.add_arguments(parser)
    assert chat.run(parser.parse_args(["--prompt", "hi"])) == 130
    assert "interrupted while loading" in capsys.readouterr().err


class Terminal:
    """`yarnkit chat` on a pseudo-terminal in canonical mode, as a user's shell leaves it (4095-byte lines)."""

    def __init__(self, *args):
        import pty

        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "yarnkit.cli", "chat", *args], cwd=ROOT, env=env,
                                        stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen, self.cursor = b"", 0  # all output, and how much of it was already read

    def read_until(self, marker: bytes, timeout: float = 120) -> bytes:
        """The output from the cursor up to and including the next `marker`."""
        import select

        end = time.monotonic() + timeout
        while marker not in self.seen[self.cursor:]:
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            assert ready, f"no {marker!r} within {timeout} s; the terminal shows: {self.seen[-600:]!r}"
            self.seen += os.read(self.master, 65536)
        start, self.cursor = self.cursor, self.seen.index(marker, self.cursor) + len(marker)
        return self.seen[start:self.cursor]

    def prompt(self) -> None:
        self.read_until(b"> ")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def stats(self) -> dict:
        self.type(b"/stats\r")
        shown = self.read_until(b"}\r\n")
        self.prompt()
        return json.loads(shown[shown.index(b"{"):shown.rindex(b"}") + 1])

    def close(self) -> int:
        self.type(b"\x04")  # Ctrl-D at an empty prompt
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


def prompt_tokens(model, tokenizer, text):
    """What `Conversation` counts for `text` as the one user message of a fresh session."""
    return Conversation(model, tokenizer, StreamOptions(window=1024)).start(
        [{"role": "user", "content": text}]).prompt_tokens


def test_pasted_page_and_lines_arrive_whole_at_a_terminal(tiny_dir, model, tokenizer):
    """A 6 KB line (input() would keep 4095 bytes of it), a bracketed multi-line paste and a paste without
    markers each arrive as ONE message, whole: the model is fed exactly that message, as one user turn."""
    page = " ".join(f"fact{i} is {i * 7}." for i in range(600)) + " QUESTION: which fact was first?"
    assert len(page.encode()) > 6000
    lines = "first line\nsecond line\n\tthird line, indented"
    terminal = Terminal(str(tiny_dir), "--max-new-tokens", "2")
    try:
        terminal.prompt()
        for typed, message in ((page.encode() + b"\r", page),
                               (b"\x1b[200~" + lines.replace("\n", "\r").encode() + b"\x1b[201~\r", lines),
                               (lines.replace("\n", "\r").encode() + b"\r", lines)):  # a terminal without markers
            terminal.type(typed)
            terminal.prompt()
            stats = terminal.stats()
            assert stats["messages"] == 2, stats  # one user message + one reply, not one turn per line
            assert stats["prompt_tokens"] == prompt_tokens(model, tokenizer, message)
            terminal.type(b"/reset\r")
            terminal.prompt()
        terminal.type(b"abc\x7f\x7fx\x1b[D\r")  # Backspace twice and an arrow key: "ax" is sent
        terminal.prompt()
        assert terminal.stats()["prompt_tokens"] == prompt_tokens(model, tokenizer, "ax")
    finally:
        assert terminal.close() == 0


def test_over_window_note_comes_before_the_reply(tiny_dir, model, tokenizer):
    """stdout and stderr in one pipe, in the order they were written: the [note] line, then the reply."""
    text = "Remember PLUM. " + "filler words here " * 80 + "Which fruit?"
    merged = subprocess.run([sys.executable, "-m", "yarnkit.cli", "chat", str(tiny_dir), "--window", "64",
                             "--max-new-tokens", "4", "--prompt", text], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=240, env={**os.environ,
                                                                                   "PYTHONPATH": str(ROOT)})
    assert merged.returncode == 0, merged.stdout[-2000:]
    expected = "".join(Conversation(model, tokenizer, StreamOptions(window=64)).respond(
        [{"role": "user", "content": text}], max_new_tokens=4))
    note = next(line for line in merged.stdout.splitlines() if line.startswith("[note]"))
    assert "more than the 64-token cache" in note
    assert merged.stdout.endswith(note + "\n" + expected + "\n")  # the note, then the reply, in that order
