"""`Conversation`: chat messages -> chat template -> incremental feeding of a streaming engine -> text pieces.

What it is: the layer shared by `yarnkit chat` and `yarnkit serve`. It renders the whole message list with the
tokenizer's chat template and feeds only the text that is new since the last turn (the cache carries the rest);
when the incoming history does not extend what was fed (an edited history, a client's own truncation) it
starts over and re-feeds it in chunks. The system prompt (everything before the first user message) is pinned
so it is never evicted. Also: checkpoint resolution for run dirs, and the no-template fallback.
What it is not: a terminal UI or an HTTP server.

Test: `python -m pytest tests/test_runtime_chat.py -q`.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator

import torch

from yarnkit.runtime.compress import compress_prompt
from yarnkit.runtime.engine import StreamingEngine, StreamOptions, sample
from yarnkit.train.checkpoint import model_location

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
_MARKER = "\u2063yarnkit-first-user\u2063"


def resolve_checkpoint(ckpt: str) -> str:
    """A run dir -> its newest complete checkpoint's model/ (`yarnkit.train.checkpoint`); else unchanged."""
    return model_location(ckpt)


def load_chat_model(ckpt: str, dtype: str = "float32", device: str = "cpu"):
    from yarnkit.models import load_model

    return load_model(resolve_checkpoint(ckpt), dtype=dtype, device=device)


def check_messages(messages: list[dict]) -> None:
    if not messages:
        raise ValueError("no messages: send at least one user message")
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown chat role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError("the last message must be a non-empty user message")


class Conversation:
    """One chat session: engine (cache) + the messages and text fed so far. Not thread-safe: hold `lock`."""

    def __init__(self, model, tokenizer, options: StreamOptions | None = None, pin_system: bool = True,
                 compress_rate: float | None = None, compress_over: int = 512):
        self.tokenizer = tokenizer
        self.engine = StreamingEngine(model, options)
        self.pin_system = pin_system
        self.compress_rate, self.compress_over = compress_rate, compress_over
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if not self.has_template:
            log.warning("the tokenizer has no chat template; falling back to a plain 'User:/Assistant:' format")
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.lock = threading.Lock()
        self.last_info: dict = {}
        self.reset()

    def reset(self) -> None:
        self.engine.reset()
        self.messages: list[dict] = []      # the history as the caller sent it (plus our replies)
        self.fed_messages: list[dict] = []  # the same history as fed (long user messages maybe compressed)
        self.fed_text = ""

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.has_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if generation_prompt else "")

    def _feed_text(self, text: str) -> None:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            self.engine.feed(torch.tensor([ids]))
        self.fed_text += text

    def _maybe_compress(self, messages: list[dict]) -> list[dict]:
        last = messages[-1]["content"]
        count = len(self.tokenizer(last, add_special_tokens=False)["input_ids"])
        self.last_info.update(user_tokens=count)
        if count > self.engine.options.window:
            self.last_info["warning"] = (f"the message has {count} tokens, more than the {self.engine.options.window}"
                                         "-token window: it was streamed through and only its end stays in context")
        if self.compress_rate is None or count <= self.compress_over:
            return messages
        squeezed = compress_prompt(self.engine.model, self.tokenizer, last, rate=self.compress_rate)
        self.last_info.update(compressed_tokens=squeezed.compressed_tokens, ratio=round(squeezed.ratio, 2))
        return messages[:-1] + [{"role": "user", "content": squeezed.text}]

    def _prepare(self, messages: list[dict]) -> str:
        """Bring the cache to `messages`; returns the text fed for them (with the generation prompt)."""
        full = self.render(messages, generation_prompt=True)
        known = self.fed_messages == messages[:len(self.fed_messages)] and full.startswith(self.fed_text)
        if not known or not self.fed_text:
            self.reset()
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            marked = messages[:first_user] + [{"role": "user", "content": _MARKER}]
            prefix = self.render(marked, generation_prompt=False).split(_MARKER)[0]
            if self.pin_system and prefix and full.startswith(prefix):
                self._feed_text(prefix)
                try:
                    self.engine.pin()
                except ValueError as error:  # a system prompt as long as the cache: stream it, do not pin it
                    self.last_info["warning"] = f"system prompt not pinned: {error}"
        self._feed_text(full[len(self.fed_text):])
        return full

    def respond(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Stream the assistant's reply to `messages` (the whole history, last one from the user) as text pieces.

        If the consumer stops early (Ctrl-C, a closed connection), what was generated so far is kept as the
        assistant's message, so the cache and the history stay consistent.
        """
        check_messages(messages)
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        self.last_info = {}
        known = len(self.messages)
        if self.messages == messages[:known]:  # reuse the compressed versions of turns already fed
            to_feed = self.fed_messages[:known] + messages[known:]
        else:
            to_feed = messages
        to_feed = self._maybe_compress(to_feed)
        seen_before = self.engine.tokens_seen
        try:
            self._prepare(to_feed)
        except Exception:
            self.reset()  # never leave a half-fed cache behind
            raise
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        produced: list[int] = []
        fed = 0
        shown = ""
        logits = self.engine.last_logits
        self.last_info.update(prompt_tokens=self.engine.tokens_seen - seen_before, finish_reason="length")
        try:
            for _ in range(max_new_tokens):
                token = sample(logits, temperature, top_p, generator)
                if token in self.stop_ids:
                    self.last_info["finish_reason"] = "stop"
                    break
                produced.append(token)
                text = self.tokenizer.decode(produced, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(shown):
                    yield text[len(shown):]
                    shown = text
                logits = self.engine.feed(torch.tensor([[token]]))[0, -1]
                fed += 1
        finally:
            self._settle(messages, to_feed, produced, fed)

    def _settle(self, messages: list[dict], to_feed: list[dict], produced: list[int], fed: int) -> None:
        """After a reply (finished, interrupted or failed): make cache and history agree, or start over."""
        if not self.engine.is_consistent():  # a forward was interrupted half-way: the cache cannot be trusted
            self.reset()
            return
        if fed < len(produced):  # stopped between sampling and feeding
            self.engine.feed(torch.tensor([produced[fed:]]))
        answer = {"role": "assistant", "content": self.tokenizer.decode(produced, skip_special_tokens=True)}
        self.messages, self.fed_messages = messages + [answer], to_feed + [answer]
        self.fed_text += self.tokenizer.decode(produced, skip_special_tokens=False)
        self.engine.end_round()
        self.last_info["completion_tokens"] = len(produced)

    def stats(self) -> dict:
        return {**self.engine.stats(), "messages": len(self.messages), **self.last_info}


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if token is not None:
            ids.add(token)
    return ids
