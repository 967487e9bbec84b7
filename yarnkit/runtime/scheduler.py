"""`Scheduler`: the loop of `yarnkit serve`: one worker thread runs every forward; sessions are batched, prefill is
interleaved.

What it is: continuous batching for `yarnkit serve`, wired from three units: the session table (`sessions.py`:
which conversation, one cache row of a shared `SlotPool` each, serves a request), admission (`admission.py`: the
queue of `Job`s, one or more choices each, waiting for rows; turns are set up on a helper thread) and this loop.
Each iteration runs ONE batched decode step for every turn that is generating, then ONE prefill chunk of one turn
that is still reading its prompt (round robin; at most `prefill_budget` tokens while others are decoding), so a
long prompt never blocks other sessions' decoding: it only adds one small chunk per step. The decoding turns'
next tokens are chosen together on the model's device (`sampling.choose_on_device`: greedy or each turn's own
temperature, top-p and seeded generator); only their ids come to the host.

Ahead of the host (on by default on CUDA, `ahead=`): the loop does not wait for a step's ids before queuing the
next one. While the same turns go on decoding, each step is queued on the ids the previous one chose, still on the
device (`StreamingEngine.decode_on_device`), and only then are those ids read (a copy queued behind their choice,
`sampling.IdsInFlight`) and each turn's host work done (detokenization, stop ids and strings, events) while the
device runs the step. A turn whose token ended its reply takes that token back from its cache row if the reply
does not hold it (a stop id). A step that must evict, a turn at its token limit, SirLLM scores, a turn joining or
leaving, or a cancelled job first reads the ids in flight (`_settle`) and runs as a normal step. The tokens are the
same either way (tests/test_runtime_scheduler.py). Cancelled jobs (a
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
from dataclasses import dataclass

import torch

from yarnkit.runtime.admission import Admission, Job
from yarnkit.runtime.conversation import Conversation, Turn
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.sampling import IdsInFlight, choose_on_device
from yarnkit.runtime.sessions import SessionTable
from yarnkit.runtime.static import make_pool

log = logging.getLogger(__name__)
PREFILL_BUDGET = 128  # prompt tokens fed per step while other sessions decode (a full chunk when none does)


@dataclass
class Step:
    """A decode step whose chosen ids are still on their way to the host: `turns[i]` was fed a token, its
    `logits[rows[i]]` predict the next one, chosen as `ids` row `rows[i]` (not yet accepted by the turn)."""
    turns: list[Turn]
    rows: list[int]
    logits: torch.Tensor
    ids: IdsInFlight


class Scheduler:
    """Owns the pool, the session table, admission and the worker thread; `submit(job)` is safe from any thread."""

    def __init__(self, model, tokenizer, options: StreamOptions, rows: int = 8, make_conversation=None,
                 prefill_budget: int = PREFILL_BUDGET, max_prompt_tokens: int | None = None,
                 over_window: str = "refuse", ahead: bool | None = None):
        options = options.resolved(model.config, next(model.parameters()).device, pooled=True)  # no-op if resolved
        self.model, self.tokenizer, self.options, self.rows = model, tokenizer, options, rows
        self.prefill_budget = prefill_budget
        self.pool = None if options.decode == "eager" else make_pool(model, options, rows)
        new = make_conversation or (lambda pool: Conversation(model, tokenizer, options, pool=pool))
        self.sessions = SessionTable(rows, lambda: new(self.pool))
        self.admission = Admission(self.sessions, max_prompt_tokens, over_window)
        # queue each decode step before reading the last one's ids: on by default where the device runs ahead
        self.ahead = self.pool is not None and (self.pool.device.type == "cuda" if ahead is None else ahead)
        self.in_flight: Step | None = None
        self.steps = 0
        self.worker = threading.Thread(target=self._loop, name="yarnkit-scheduler", daemon=True)
        self.worker.start()

    # -- any thread -----------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.admission.submit(job)

    def drop_session(self, session: str) -> bool:
        return self.admission.drop_session(session)

    def stats(self) -> dict:
        return {**self.admission.stats(), "steps": self.steps, "decode_ahead": self.ahead,
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
        else:
            self._settle()
        if prefilling:
            cursor = (cursor + 1) % len(prefilling)
            budget = self.prefill_budget if decoding else None  # full chunks when nobody waits for a token
            self._guarded(prefilling[cursor], lambda turn: turn.prefill_step(budget))
        self.steps += 1
        if not decoding and not prefilling:
            time.sleep(0.001)  # only waiting / finishing jobs: let the admitting side catch up
        return cursor

    def _decode(self, turns: list[Turn]) -> None:
        """One batched step for the decoding `turns`: ahead of the host (`_decode_ahead`) when the previous step's
        turns go on unchanged and none needs an eviction, else the turns' next tokens are read first."""
        if self.in_flight is not None and self._may_run_ahead(turns):
            self._decode_ahead()
            return
        self._settle()
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
            chosen = self._choose(ready, logits)
        except Exception as error:  # noqa: BLE001 - one bad step fails these requests, not the server
            log.exception("batched decode step failed")
            for turn in ready:
                self._fail(turn, error)
            return
        step = Step(ready, list(range(len(ready))), logits, IdsInFlight(chosen))
        if self.ahead:
            self.in_flight = step  # accepted by the next step, once it is queued (or by `_settle`)
        else:
            self._accept(step)

    def _may_run_ahead(self, turns: list[Turn]) -> bool:
        """The step in flight fed exactly these turns, and each takes one more token without evicting or
        finishing on its token limit (those need the host's answer first: a normal step)."""
        previous = self.in_flight.turns
        return (len(turns) == len(previous) and all(a is b for a, b in zip(turns, previous))
                and all(turn.engine.decoder.pool is self.pool and turn.engine.fit_one_more()
                        and len(turn.produced) < turn.sampling.max_new_tokens for turn in turns))

    def _decode_ahead(self) -> None:
        """Queue the next step on the ids still on the device, then read them and do each turn's host work (its
        text, stop ids, stop strings) while the device runs it. A turn that ended on its token takes it back
        (a stop id: never part of the reply) or keeps it (a stop string: the reply holds it)."""
        step, self.in_flight = self.in_flight, None
        turns = step.turns
        try:
            ids = step.ids.device_ids
            if step.rows != list(range(ids.numel())):
                ids = ids[torch.tensor(step.rows, device=ids.device)]
            logits = StreamingEngine.decode_on_device([turn.engine for turn in turns], ids)
            chosen = IdsInFlight(self._choose(turns, logits))
        except Exception as error:  # noqa: BLE001 - as in `_decode`
            log.exception("batched decode step failed")
            self._accept(step)
            for turn in turns:
                self._fail(turn, error)
            return
        tokens = step.ids.tolist()  # waits for the previous step only
        going, rows = [], []
        for i, (turn, row) in enumerate(zip(turns, step.rows)):
            turn.accept(step.logits[row], tokens[row])
            before = len(turn.produced)
            token = self._guarded(turn, lambda t: t.next_token())
            took = len(turn.produced) > before
            if took:
                turn.engine.confirm(turn.produced[-1], logits[i])
            else:
                turn.engine.take_back()
            if token is not None:
                going.append(turn)
                rows.append(i)
            elif took:
                turn.accept(logits[i], None)  # the fed token counts: closing must not feed it again
            self._flush(turn)
        if going:
            self.in_flight = Step(going, rows, logits, chosen)

    @staticmethod
    def _choose(turns: list[Turn], logits: torch.Tensor) -> torch.Tensor:
        """Each turn's next token on the device, with its own sampling settings and generator."""
        return choose_on_device(logits, [turn.sampling.temperature for turn in turns],
                                [turn.sampling.top_p for turn in turns], [turn.generator for turn in turns])

    def _accept(self, step: Step) -> None:
        """The tail of a step: each turn gets its logits and its chosen token (read from the device now)."""
        tokens = step.ids.tolist()
        for turn, row in zip(step.turns, step.rows):
            turn.accept(step.logits[row], tokens[row])

    def _settle(self) -> None:
        """Accept the step in flight, if any: its turns are as after a step that read its ids at once."""
        step, self.in_flight = self.in_flight, None
        if step is not None:
            self._accept(step)

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
        if any(job.cancelled for job, _ in work):
            self._settle()
        for job, turns in work:
            if job.cancelled:
                for turn in turns:
                    if not turn.closed:
                        turn.finish_reason = turn.finish_reason or "cancelled"
                        self._close_turn(turn)

