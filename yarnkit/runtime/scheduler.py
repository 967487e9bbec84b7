"""`Scheduler`: one worker thread runs every forward of the server; sessions are batched, prefill is interleaved.

What it is: continuous batching for `yarnkit serve`. Requests (`Job`: one or more choices) are admitted onto
conversations (one cache row of a shared `SlotPool` each). Each loop iteration runs ONE batched decode step for
every turn that is generating, then ONE prefill chunk of one turn that is still reading its prompt (round
robin; at most `prefill_budget` tokens while others are decoding), so a long prompt never blocks other
sessions' decoding: it only adds one small chunk per step. Turns are
set up (template, tokenization: the tokenizer releases the GIL) on a helper thread, not in the worker. Which
conversation serves a request is the session table's choice (`sessions.py`: named sessions keep theirs,
anonymous requests reuse a cache whose history is a prefix of theirs); when every row is busy a request waits
(never a 409). Cancelled jobs (a client that went away) are finished at the next
step: the partial reply is kept, so cache and history stay consistent. Events go back through `Job.emit`:
`started` (the prompt was tokenized and fits), `text`, `done`, `error` (payload: status, message, param).
What it is not: HTTP (see `serve.py`).

Test: `python -m pytest tests/test_runtime_serve.py -q`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from dataclasses import dataclass, field
from typing import Callable

from yarnkit.errors import PromptTooLong
from yarnkit.runtime.conversation import Conversation, Sampling, Turn
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.sessions import SessionTable
from yarnkit.runtime.static import make_pool

log = logging.getLogger(__name__)


class SessionBusy(Exception):
    """A named session already has a request in flight."""


@dataclass
class Job:
    """One request: `choices` turns of the same prompt. `emit(kind, index, payload)` is called from the worker."""

    messages: list[dict] | None
    text: str | None
    sampling: Sampling
    choices: int = 1
    session: str | None = None
    rendered: str | None = None  # messages rendered with the chat template (saves rendering per cache)
    emit: Callable = lambda kind, index, payload: None
    cancelled: bool = False
    turns: list = field(default_factory=list)
    conversations: list = field(default_factory=list)
    finished: int = 0

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Owns the conversations (cache rows) and the worker thread; `submit(job)` is safe from any thread."""

    def __init__(self, model, tokenizer, options: StreamOptions, rows: int = 8, make_conversation=None,
                 prefill_budget: int = 128, max_prompt_tokens: int | None = None):
        options = options.resolved(model.config, next(model.parameters()).device, pooled=True)  # no-op if resolved
        self.model, self.tokenizer, self.options, self.rows = model, tokenizer, options, rows
        self.max_prompt_tokens = max_prompt_tokens
        self.prefill_budget = prefill_budget
        self.pool = None if options.decode == "eager" else make_pool(model, options, rows)
        new = make_conversation or (lambda pool: Conversation(model, tokenizer, options, pool=pool))
        self.sessions = SessionTable(rows, lambda: new(self.pool))
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.cond = threading.Condition()
        self.running = True
        self.steps = 0
        self.starter = ThreadPoolExecutor(2, thread_name_prefix="yarnkit-start")
        self.worker = threading.Thread(target=self._loop, name="yarnkit-scheduler", daemon=True)
        self.worker.start()

    # -- any thread -----------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            if job.session is not None and (self.sessions.is_busy(job.session)
                                            or any(j.session == job.session for j in self.waiting)):
                raise SessionBusy(job.session)
            self.waiting.append(job)
            self.cond.notify()

    def drop_session(self, session: str) -> bool:
        with self.cond:
            return self.sessions.drop(session)

    def stats(self) -> dict:
        with self.cond:
            return {**self.sessions.stats(), "active_requests": len(self.active), "waiting_requests": len(self.waiting),
                    "decode_path": "eager" if self.pool is None else "graph" if self.pool.use_graph else "static",
                    "steps": self.steps}

    def close(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        self.worker.join(timeout=10)
        self.starter.shutdown(wait=False, cancel_futures=True)

    # -- the worker ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        cursor = 0
        while True:
            with self.cond:
                while self.running and not self.active and not self.waiting:
                    self.cond.wait()
                if not self.running:
                    return
                self._admit()
                jobs = list(self.active)
                turns = {id(job): list(job.turns) for job in jobs}
            self._reap(jobs, turns)
            live = [t for job in jobs if not job.cancelled for t in turns[id(job)] if not t.closed]
            decoding = [t for t in live if not t.prefilling]
            prefilling = [t for t in live if t.prefilling]
            if decoding:
                self._decode(decoding)
            if prefilling:
                cursor = (cursor + 1) % len(prefilling)
                budget = self.prefill_budget if decoding else None  # full chunks when nobody waits for a token
                self._guarded(prefilling[cursor], lambda turn: turn.prefill_step(budget))
            self.steps += 1
            if not decoding and not prefilling:
                time.sleep(0.001)  # only waiting / finishing jobs: let the admitting side catch up

    def _decode(self, turns: list[Turn]) -> None:
        ready, tokens = [], []
        for turn in turns:
            token = self._guarded(turn, lambda t: t.next_token())
            self._flush(turn)
            if token is not None:
                ready.append(turn)
                tokens.append(token)
        if not ready:
            return
        try:
            logits = StreamingEngine.decode_together([turn.engine for turn in ready], tokens)
        except Exception as error:  # noqa: BLE001 - one bad step fails these requests, not the server
            log.exception("batched decode step failed")
            for turn in ready:
                self._fail(turn, error)
            return
        rows = torch.stack(logits).cpu()  # one device-to-host copy for the whole batch (sampling runs on the host)
        for turn, row in zip(ready, rows):
            turn.accept(row)
            self._flush(turn)

    def _guarded(self, turn: Turn, action):
        try:
            return action(turn)
        except Exception as error:  # noqa: BLE001
            log.exception("turn failed")
            self._fail(turn, error)
            return None

    def _fail(self, turn: Turn, error: Exception) -> None:
        job = turn.job
        job.emit("error", turn.index, {"status": 500, "message": f"{type(error).__name__}: {error}"})
        job.cancel()

    def _flush(self, turn: Turn) -> None:
        piece = turn.take_text()
        if piece:
            turn.job.emit("text", turn.index, piece)
        if turn.finish_reason is not None and not turn.closed:
            self._close_turn(turn)

    def _close_turn(self, turn: Turn) -> None:
        try:
            turn.close()
        except Exception:  # noqa: BLE001 - settling failed: the cache cannot be trusted
            log.exception("closing a turn failed")
            turn.conversation.reset()
        job = turn.job
        job.finished += 1
        job.emit("done", turn.index, {"finish_reason": turn.finish_reason or "length",
                                      "prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
                                      "cached_tokens": max(0, turn.prompt_tokens - turn.fed_prompt),
                                      "info": turn.info})
        self._release(job, turn.conversation)

    def _release(self, job: Job, conversation: Conversation) -> None:
        with self.cond:
            self.sessions.release(conversation)
            if job.finished == job.choices and job in self.active:
                self.active.remove(job)
                self.cond.notify_all()

    def _reap(self, jobs: list[Job], turns: dict) -> None:
        """Finish the turns of cancelled jobs: keep what was generated (or start the cache over)."""
        for job in jobs:
            if job.cancelled:
                for turn in turns[id(job)]:
                    if not turn.closed:
                        turn.finish_reason = turn.finish_reason or "cancelled"
                        self._close_turn(turn)

    # -- admission (holding the lock) ------------------------------------------------------------------------------
    def _admit(self) -> None:
        for job in list(self.waiting):
            if job.cancelled:
                self.waiting.remove(job)
                job.emit("cancelled", 0, None)
                continue
            conversations = self.sessions.claim(job.session, job.choices, job.messages, job.text, job.rendered)
            if conversations is None:
                continue  # every row is busy: wait for one
            self.waiting.remove(job)
            job.conversations = conversations
            self.active.append(job)
            for index, conversation in enumerate(conversations):
                sampling = job.sampling
                if sampling.seed is not None and index:
                    sampling = Sampling(**{**sampling.__dict__, "seed": sampling.seed + index})
                self.starter.submit(self._start, job, index, conversation, sampling)

    def _start(self, job: Job, index: int, conversation: Conversation, sampling: Sampling) -> None:
        """On a helper thread: template + tokenization of the new text; the turn then joins the loop."""
        try:
            turn = conversation.start(job.messages, job.text, sampling, job.rendered, self.max_prompt_tokens)
        except Exception as error:  # noqa: BLE001 - e.g. a template that rejects the roles
            if isinstance(error, PromptTooLong):
                payload = {"status": 400, "message": str(error), "param": str(error).split(":")[0],
                           "code": "context_length_exceeded"}
            else:
                log.exception("starting a turn failed")
                conversation.reset()
                payload = {"status": 500, "message": f"{type(error).__name__}: {error}"}
            job.emit("error", index, payload)
            job.cancel()
            with self.cond:
                job.finished += 1
            self._release(job, conversation)
            return
        turn.job, turn.index = job, index
        job.emit("started", index, None)
        with self.cond:
            job.turns.append(turn)
            self.cond.notify()
