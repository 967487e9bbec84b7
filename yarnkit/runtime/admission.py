"""`Admission`: the queue in front of the server's cache rows; `Job` (one request) and `SessionBusy`.

What it is: how requests of `yarnkit serve` reach the decode loop. `submit(job)` (any thread) queues a request;
a second request on a named session that is busy or already queued is refused (`SessionBusy`, the server's 409).
`next_work()` (the loop's thread) blocks until there is work, then admits what fits: each waiting job gets its
conversations from the session table (one cache row per choice; when every row is busy it keeps waiting, never
refused), and each choice's turn is started on a helper thread (chat template and tokenization, which release
the GIL), choice `i` sampling with seed `seed + i`. A started turn joins `job.turns` and so the loop; a turn that
cannot start (`PromptTooLong`: a 400 event; anything else: a 500) gives its row back at once; a prompt over the
window is refused (`PromptTooLong`) or, with `over_window="truncate"`, keeps its end and says so in its
`started` event and the log. A job cancelled
while it waits gets the `cancelled` event and never takes a row. `finish(job, conversation)` ends one choice:
its row goes back to the table, and a job whose choices all ended leaves `active`. One lock (`lock`) guards the
queue, the active jobs and the session table; the loop sleeps on it between requests.
What it is not: which row serves a request (`sessions.py`) or the decode loop (`scheduler.py`).

Test: `python -m pytest tests/test_runtime_admission.py tests/test_runtime_serve.py -q`.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from yarnkit.errors import PromptTooLong
from yarnkit.runtime.conversation import Conversation, Sampling
from yarnkit.runtime.sessions import SessionTable

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


class Admission:
    """Waiting and active jobs over a `SessionTable`; `submit`, `drop_session`, `stats` are safe from any thread."""

    def __init__(self, sessions: SessionTable, max_prompt_tokens: int | None = None, over_window: str = "refuse"):
        self.sessions, self.max_prompt_tokens, self.over_window = sessions, max_prompt_tokens, over_window
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.lock = threading.Condition()
        self.open = True
        self.starter = ThreadPoolExecutor(2, thread_name_prefix="yarnkit-start")

    # -- any thread -----------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.lock:
            if job.session is not None and (self.sessions.is_busy(job.session)
                                            or any(j.session == job.session for j in self.waiting)):
                raise SessionBusy(job.session)
            self.waiting.append(job)
            self.lock.notify()

    def drop_session(self, session: str) -> bool:
        with self.lock:
            return self.sessions.drop(session)

    def stats(self) -> dict:
        with self.lock:
            return {**self.sessions.stats(), "active_requests": len(self.active), "waiting_requests": len(self.waiting)}

    def stop(self) -> None:
        """`next_work()` returns None from now on; turns not yet started are not started."""
        with self.lock:
            self.open = False
            self.lock.notify_all()
        self.starter.shutdown(wait=False, cancel_futures=True)

    # -- the loop's thread ----------------------------------------------------------------------------------------
    def next_work(self) -> list[tuple[Job, list]] | None:
        """Wait for a waiting or active job, admit what fits; each active job with a snapshot of its started turns
        (None once stopped)."""
        with self.lock:
            while self.open and not self.active and not self.waiting:
                self.lock.wait()
            if not self.open:
                return None
            self._admit()
            return [(job, list(job.turns)) for job in self.active]

    def finish(self, job: Job, conversation: Conversation) -> None:
        """One choice of `job` ended (closed, failed or never started): its row goes back to the table."""
        with self.lock:
            job.finished += 1
            self.sessions.release(conversation)
            if job.finished == job.choices and job in self.active:
                self.active.remove(job)
                self.lock.notify_all()

    def _admit(self) -> None:
        """Holding the lock: every waiting job that gets its rows becomes active and its turns start."""
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
            turn = conversation.start(job.messages, job.text, sampling, job.rendered, self.max_prompt_tokens,
                                      self.over_window)
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
            self.finish(job, conversation)
            return
        turn.job, turn.index = job, index
        if "truncated" in turn.info:
            cut = turn.info["truncated"]
            log.warning("prompt of %d tokens is longer than the %d-token window: only its end is in context "
                        "(--over-window truncate)", cut["prompt_tokens"], cut["window"])
        job.emit("started", index, {"truncated": turn.info.get("truncated")})
        with self.lock:
            job.turns.append(turn)
            self.lock.notify()
