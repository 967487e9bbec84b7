"""`Conversation` and `Turn`: messages (or raw text) -> chat template -> incremental feeding -> text pieces.

What it is: the layer shared by `yarnkit chat` and `yarnkit serve`. A conversation owns one streaming engine (a
cache); `start(messages)` renders the whole history with the tokenizer's chat template and returns a `Turn`
that feeds only the text that is new since the last turn (the cache carries the rest). When the history does
not extend what was fed (an edited history, a client's own truncation) the turn starts over and re-feeds it in
chunks. The system prompt (everything before the first user message) is pinned so it is never evicted. A `Turn`
is driven step by step (`prefill_step`, `next_token`, `accept`, `take_text`, `close`), so the server's
scheduler can interleave many of them and decode them in one batched step; `respond()` drives one turn alone
(chat); a batched step hands each turn its next token already sampled (`accept(logits, chosen)`). The reply's
text grows through the tokenizer's incremental decoder (`ReplyText`). `stop` strings, OpenAI roles
(`developer` is rendered as `system`, `tool` as itself) and list-of-parts content are handled here, and so is
the no-template fallback.
What it is not: a terminal UI or an HTTP server.

Test: `python -m pytest tests/test_runtime_chat.py -q`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from tokenizers.decoders import DecodeStream

from yarnkit.errors import PromptTooLong
from yarnkit.runtime.compress import compress_prompt
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.sampling import sample

log = logging.getLogger(__name__)
ROLES = ("system", "developer", "user", "assistant", "tool")
_MARKER = "\u2063yarnkit-first-user\u2063"


def normalize_messages(messages) -> list[dict]:
    """OpenAI chat messages -> `{"role", "content": str}`; errors name the offending field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: send a non-empty list of messages, the last one from the user")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: each message must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: unknown chat role {role!r}; use one of {', '.join(ROLES)}")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                 "are supported")
            content = "\n".join(part["text"] for part in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if out[-1]["role"] not in ("user", "tool") or not out[-1]["content"].strip():
        raise ValueError("messages: the last message must be a non-empty user (or tool) message")
    return out


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Conversation:
    """One session: engine (cache) + what was fed so far. Not thread-safe: one thread drives its turns."""

    def __init__(self, model, tokenizer, options: StreamOptions | None = None, pin_system: bool = True,
                 compress_rate: float | None = None, compress_over: int = 512, pool=None):
        self.tokenizer = tokenizer
        self.engine = StreamingEngine(model, options, pool=pool)
        self.pin_system = pin_system
        self.compress_rate, self.compress_over = compress_rate, compress_over
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if not self.has_template:
            log.warning("the tokenizer has no chat template; falling back to a plain 'User:/Assistant:' format")
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.last_info: dict = {}
        self.reset()

    def reset(self) -> None:
        self.engine.reset()
        self.mode = None                    # "chat" (messages) or "text" (completions) once something was fed
        self.messages: list[dict] = []      # the history as the caller sent it (plus our replies)
        self.fed_messages: list[dict] = []  # the same history as fed (long user messages maybe compressed)
        self.fed_text = ""
        self.fed_tokens = 0                 # tokens fed since the reset (prompts and replies)

    def close(self) -> None:
        self.engine.close()

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.has_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if generation_prompt else "")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _maybe_compress(self, messages: list[dict], info: dict) -> list[dict]:
        last = messages[-1]["content"]
        if self.compress_rate is None or len(last.encode()) <= self.compress_over:  # tokens <= bytes
            return messages
        count = self.count_tokens(last)
        if count <= self.compress_over:
            return messages
        squeezed = compress_prompt(self.engine.model, self.tokenizer, last, rate=self.compress_rate)
        info.update(compressed_tokens=squeezed.compressed_tokens, ratio=round(squeezed.ratio, 2))
        return messages[:-1] + [{"role": "user", "content": squeezed.text}]

    def _plan(self, messages: list[dict] | None, text: str | None, info: dict | None = None,
              rendered: str | None = None):
        """`(history, to_feed, full, reuse)`: what the cache must hold and whether it extends what was fed.
        `rendered` is `messages` already rendered with the generation prompt (used when nothing is compressed)."""
        if messages is None:
            return None, None, text, self.mode == "text" and bool(self.fed_text) and text.startswith(self.fed_text)
        known = len(self.messages)
        to_feed = self.fed_messages[:known] + messages[known:] if self.messages == messages[:known] else messages
        if info is not None:
            to_feed = self._maybe_compress(to_feed, info)
        same = rendered is not None and (self.compress_rate is None or to_feed == messages)
        full = rendered if same else self.render(to_feed, generation_prompt=True)
        reuse = (self.mode == "chat" and bool(self.fed_text) and full.startswith(self.fed_text)
                 and self.fed_messages == to_feed[:len(self.fed_messages)])
        return messages, to_feed, full, reuse

    def reusable(self, messages: list[dict] | None = None, text: str | None = None,
                 rendered: str | None = None) -> int:
        """How many characters of the request this idle cache already holds (-1: none, it would start over)."""
        if not self.fed_text:
            return -1
        return len(self.fed_text) if self._plan(messages, text, rendered=rendered)[3] else -1

    def start(self, messages: list[dict] | None = None, text: str | None = None,
              sampling: Sampling | None = None, rendered: str | None = None,
              max_prompt_tokens: int | None = None, over_window: str | None = None) -> "Turn":
        """A turn answering `messages` (normalized, see `normalize_messages`) or continuing raw `text`; raises
        `PromptTooLong` (feeding nothing) when the whole prompt has more than `max_prompt_tokens` tokens.

        A prompt longer than the window keeps only its end in context. `over_window="refuse"` raises
        `PromptTooLong` for it instead; "truncate" (and None) serve it, with `info["truncated"]` saying so."""
        info: dict = {}
        history, to_feed, full, reuse = self._plan(messages, text, info, rendered)
        pieces = []
        if not reuse:
            self.reset()
            prefix = ""
            if messages is not None and self.pin_system:
                first_user = next(i for i, m in enumerate(to_feed) if m["role"] == "user")
                marked = to_feed[:first_user] + [{"role": "user", "content": _MARKER}]
                prefix = self.render(marked, generation_prompt=False).split(_MARKER)[0]
                prefix = prefix if prefix and full.startswith(prefix) else ""
            if prefix:
                pieces.append((prefix, True))
            pieces.append((full[len(prefix):], False))
        elif len(full) > len(self.fed_text):
            pieces.append((full[len(self.fed_text):], False))
        turn = Turn(self, history, to_feed, full, pieces, sampling or Sampling(), info)
        if max_prompt_tokens is not None and turn.prompt_tokens > max_prompt_tokens:
            field = "messages" if messages is not None else "prompt"
            raise PromptTooLong(f"{field}: the prompt has {turn.prompt_tokens} tokens, more than this server's limit "
                                f"of {max_prompt_tokens} (--max-prompt-tokens)")
        if turn.prompt_tokens > self.engine.window:
            if over_window == "refuse":
                field = "messages" if messages is not None else "prompt"
                raise PromptTooLong(f"{field}: the prompt has {turn.prompt_tokens} tokens, more than the "
                                    f"{self.engine.window}-token window (--window): its start would be cut off; "
                                    "shorten it, raise --window, or start the server with --over-window truncate "
                                    "to answer from its end")
            turn.info["truncated"] = {"prompt_tokens": turn.prompt_tokens, "window": self.engine.window}
        self.mode = "chat" if messages is not None else "text"
        return turn

    def respond(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None, stop: tuple[str, ...] = ()) -> Iterator[str]:
        """Stream the assistant's reply to `messages` (the whole history, last one from the user) as text pieces.

        If the consumer stops early (Ctrl-C, a closed connection), what was generated so far is kept as the
        assistant's message, so the cache and the history stay consistent.
        """
        turn = self.start(normalize_messages(messages), sampling=Sampling(max_new_tokens, temperature, top_p,
                                                                          seed, tuple(stop)))
        self.last_info = turn.info  # what the turn did to the input, readable before the reply (chat's notes)
        try:
            while turn.prefilling:
                turn.prefill_step()
            while (token := turn.next_token()) is not None:
                piece = turn.take_text()
                if piece:
                    yield piece
                turn.accept(self.engine.feed(torch.tensor([[token]]), all_logits=False)[0, -1])
            rest = turn.take_text()
            if rest:
                yield rest
        finally:
            turn.close()

    def stats(self) -> dict:
        return {**self.engine.stats(), "messages": len(self.messages), **self.last_info}


class Turn:
    """One reply in the making: pending prompt pieces, sampling state, the text shown so far."""

    def __init__(self, conversation: Conversation, history, to_feed, full: str, pieces: list[tuple[str, bool]],
                 sampling: Sampling, info: dict):
        self.conversation, self.engine = conversation, conversation.engine
        self.history, self.to_feed, self.sampling, self.info = history, to_feed, sampling, info
        self.tokenizer = conversation.tokenizer
        self.pending = [(text, self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                         pin) for text, pin in pieces if text]
        self.offset = 0                      # ids of pending[0] already fed
        new = sum(len(ids) for _, ids, _ in self.pending)
        self.prompt_tokens = conversation.fed_tokens + new  # the whole prompt as the model sees it
        self.fed_prompt = 0
        if new > self.engine.window:
            info["warning"] = (f"the new text has {new} tokens, more than the {self.engine.window}-token cache: "
                               "it was streamed through and only its end stays in context")
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.produced: list[int] = []
        self.reply = ReplyText(self.tokenizer)
        self.fed = 0
        self.shown = ""
        self.visible = ""
        self.finish_reason: str | None = None
        self.cut_text: str | None = None
        self.logits = None if self.pending else self.engine.last_logits
        self.chosen: int | None = None       # the next token, when a batched step already sampled it
        self.closed = False
        self.job, self.index = None, 0       # set by the server's scheduler: the request and choice it answers
        info.update(prompt_tokens=self.prompt_tokens)

    @property
    def prefilling(self) -> bool:
        return bool(self.pending)

    def prefill_step(self, budget: int | None = None) -> None:
        """Feed at most `budget` (default: one prefill chunk) prompt tokens; pins the system prompt when done."""
        text, ids, pin = self.pending[0]
        budget = budget or self.engine.options.prefill_chunk
        chunk = ids[self.offset:self.offset + budget]
        try:
            if chunk:
                self.engine.feed(torch.tensor([chunk]), all_logits=False)
        except BaseException:
            self.conversation.reset()  # never leave a half-fed cache behind
            self.closed = True
            raise
        self.offset += len(chunk)
        self.fed_prompt += len(chunk)
        self.conversation.fed_tokens += len(chunk)
        if self.offset >= len(ids):
            self.conversation.fed_text += text
            self.pending.pop(0)
            self.offset = 0
            if pin:
                try:
                    self.engine.pin()
                except ValueError as error:  # a system prompt as long as the cache: stream it, do not pin it
                    self.info["warning"] = f"system prompt not pinned: {error}"
            if not self.pending:
                self.logits = self.engine.last_logits

    def next_token(self) -> int | None:
        """Sample the next token (None when the reply is finished: stop token, stop string or length)."""
        if self.finish_reason is not None:
            return None
        if len(self.produced) >= self.sampling.max_new_tokens:
            return self._finish("length")
        s = self.sampling
        token = self.chosen if self.chosen is not None else sample(self.logits, s.temperature, s.top_p, self.generator)
        self.chosen = None
        if token in self.conversation.stop_ids:
            return self._finish("stop")
        self.produced.append(token)
        text = self.reply.extend(self.produced)
        cut = min((i for i in (text.find(stop) for stop in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.cut_text = text[:cut]
            return self._finish("stop")
        hold = max((k for stop in s.stop for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])), default=0)
        visible = text[:len(text) - hold]
        if not visible.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            self.visible = visible
        return token

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.visible = self.reply_text()
        return None

    def reply_text(self) -> str:
        """The reply as the caller sees it: cut before a stop string that was hit."""
        if self.cut_text is not None:
            return self.cut_text
        return self.tokenizer.decode(self.produced, skip_special_tokens=True)

    def accept(self, logits: torch.Tensor, chosen: int | None = None) -> None:
        """The token from `next_token` was fed; `logits` predict the one after it. `chosen`: that next token,
        already sampled from `logits` with this turn's settings and generator (the scheduler samples a whole
        batched step at once, `sampling.choose_tokens`); None: `next_token` samples it."""
        self.fed += 1
        self.logits, self.chosen = logits, chosen

    def take_text(self) -> str:
        """Text that became visible since the last call (everything left once the reply is finished)."""
        piece = self.visible[len(self.shown):] if self.visible.startswith(self.shown) else ""
        self.shown += piece
        return piece

    @property
    def completion_tokens(self) -> int:
        return len(self.produced)

    def close(self) -> None:
        """After a reply (finished, interrupted or failed): make cache and history agree, or start over."""
        if self.closed:
            return
        self.closed = True
        conversation, engine = self.conversation, self.engine
        self.info.update(completion_tokens=len(self.produced), finish_reason=self.finish_reason or "length")
        conversation.last_info = self.info
        if self.pending or not engine.is_consistent():  # interrupted prefill or torn forward: start over
            conversation.reset()
            return
        if self.fed < len(self.produced):  # stopped between sampling and feeding
            engine.feed(torch.tensor([self.produced[self.fed:]]), all_logits=False)
        conversation.fed_tokens += len(self.produced)
        if self.history is not None:
            answer = {"role": "assistant", "content": self.reply_text()}
            conversation.messages, conversation.fed_messages = self.history + [answer], self.to_feed + [answer]
        conversation.fed_text += self.tokenizer.decode(self.produced, skip_special_tokens=False)
        engine.end_round()


class ReplyText:
    """`tokenizer.decode(ids, skip_special_tokens=True)` of a reply that grows one token at a time, without decoding
    the whole reply at every token: a fast tokenizer's own incremental decoder (`tokenizers.decoders.DecodeStream`)
    appends each token's text. Where the stream holds a token back (part of a character, a skipped special token),
    and for tokenizers without one (slow ones, or those that clean up spaces across tokens), the whole reply is
    decoded instead, so the text is always a whole decode's (tests/test_runtime_chat.py checks every step)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        streams = self.backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.stream = DecodeStream(skip_special_tokens=True) if streams else None
        self.streamed = ""

    def extend(self, ids: list[int]) -> str:
        """The text of `ids`: the reply so far, whose last id is new since the previous call."""
        if self.stream is not None:
            piece = self.stream.step(self.backend, ids[-1])
            if piece is not None:
                self.streamed += piece
                return self.streamed
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if token is not None:
            ids.add(token)
    return ids
