"""`Scheduler`: the loop of `yarnkit serve`: one worker thread runs every forward; sessions are batched, prefill is
interleaved.

What it is: continuous batching for `yarnkit serve`, wired from three units: the session table (`sessions.py`:
which conversation, one cache row of a shared `SlotPool` each, serves a request), admission (`admission.py`: the
queue of `Job`s, one or more choices each, waiting for rows; turns are set up on a helper thread) and this loop.
Each iteration runs ONE batched decode step for every turn that is generating, then ONE prefill chunk of one turn
that is still reading its prompt (round robin; at most `prefill_budget` tokens while others are decoding), so a
long prompt never blocks other sessions' decoding: it only adds one small chunk per step. The decoding turns'
next tokens are chosen together on the model's device (`sampling.choose_tokens`: greedy or each turn's own
temperature, top-p and seeded generator); only their ids come to the host. Cancelled jobs (a
client that went away) are finished at the next step: the partial reply is kept, so cache and history stay
consistent. Events go back through `Job.emit`: `started` (the prompt was tokenized and fits), `text`, `done`,
`error` (payload: status, message, param).
What it is not: HTTP (see `serve.py`), the queue (`admission.py`) or the choice of a row (`sessions.py`).

Test: `python -m pytest tests/test_runtime_scheduler.py tests/test_runtime_serve.py -q`.
"""

from __future__ import annotations

import logging
import threading
import time

from yarnkit.runtime.admission import Admission, Job
from yarnkit.runtime.conversation import Conversation, Turn
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.sampling import choose_tokens
from yarnkit.runtime.sessions import SessionTable
from yarnkit.runtime.static import make_pool

log = logging.getLogger(__name__)
PREFILL_BUDGET = 128  # prompt tokens fed per step while other sessions decode (a full chunk when none does)


class Scheduler:
    """Owns the pool, the session table, admission and the worker thread; `submit(job)` is safe from any thread."""

    def __init__(self, model, tokenizer, options: StreamOptions, rows: int = 8, make_conversation=None,
                 prefill_budget: int = PREFILL_BUDGET, max_prompt_tokens: int | None = None,
                 over_window: str = "refuse"):
        options = options.resolved(model.config, next(model.parameters()).device, pooled=True)  # no-op if resolved
        self.model, self.tokenizer, self.options, self.rows = model, tokenizer, options, rows
        self.prefill_budget = prefill_budget
        self.pool = None if options.decode == "eager" else make_pool(model, options, rows)
        new = make_conversation or (lambda pool: Conversation(model, tokenizer, options, pool=pool))
        self.sessions = SessionTable(rows, lambda: new(self.pool))
        self.admission = Admission(self.sessions, max_prompt_tokens, over_window)
        self.steps = 0
        self.worker = threading.Thread(target=self._loop, name="yarnkit-scheduler", daemon=True)
        self.worker.start()

    # -- any thread -----------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.admission.submit(job)

    def drop_session(self, session: str) -> bool:
        return self.admission.drop_session(session)

    def stats(self) -> dict:
        return {**self.admission.stats(), "steps": self.steps,
                "decode_path": "eager" if self.pool is None else "graph" if self.pool.use_graph else "static"}

    def close(self) -> None:
        self.admission.stop()
        self.worker.join(timeout=10)

    # -- the worker ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        cursor = 0
        while (work := self.admission.next_work()) is not None:
            cursor = self._step(work, cursor)

    def _step(self, work: list[tuple[Job, list[Turn]]], cursor: int) -> int:
        """One iteration over the active jobs; returns the prefill round-robin cursor for the next one."""
        self._reap(work)
        live = [t for job, turns in work if not job.cancelled for t in turns if not t.closed]
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
        return cursor

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
            chosen = choose_tokens(logits, [turn.sampling.temperature for turn in ready],  # on the device: only
                                   [turn.sampling.top_p for turn in ready],               # the ids come back
                                   [turn.generator for turn in ready])
        except Exception as error:  # noqa: BLE001 - one bad step fails these requests, not the server
            log.exception("batched decode step failed")
            for turn in ready:
                self._fail(turn, error)
            return
        for turn, row, token in zip(ready, logits, chosen):
            turn.accept(row, token)
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
        job.emit("done", turn.index, {"finish_reason": turn.finish_reason or "length",
                                      "prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
                                      "cached_tokens": max(0, turn.prompt_tokens - turn.fed_prompt),
                                      "info": turn.info})
        self.admission.finish(job, turn.conversation)

    def _reap(self, work: list[tuple[Job, list[Turn]]]) -> None:
        """Finish the turns of cancelled jobs: keep what was generated (or start the cache over)."""
        for job, turns in work:
            if job.cancelled:
                for turn in turns:
                    if not turn.closed:
                        turn.finish_reason = turn.finish_reason or "cancelled"
                        self._close_turn(turn)

