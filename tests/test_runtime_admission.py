"""Admission, the queue in front of the server's cache rows (`yarnkit/runtime/admission.py`), without the loop.

Run: `python -m pytest tests/test_runtime_admission.py -q`

A tiny random Llama with SmolLM2's real tokenizer and chat template, real conversations on a shared `SlotPool`,
a real `SessionTable`; nothing decodes (admission only starts turns). What is proven:
- a job waits while every row is busy (never refused), and gets the row that the finished job gave back; a job
  that cannot fit does not hold up a later one that can;
- a second request on a named session is refused while the first waits or runs, and accepted once it finished;
- a job cancelled while it waits gets the `cancelled` event and never takes a row;
- a prompt over the limit is a 400 event naming the field (`context_length_exceeded`) and its row goes back;
- each choice of a job gets its own row and seed `seed + i`; after `stop()` the loop gets no more work.
"""

from __future__ import annotations

import time

import pytest
from conftest import tiny_model

from yarnkit.runtime.admission import Admission, Job, SessionBusy
from yarnkit.runtime.conversation import Conversation, Sampling
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.sessions import SessionTable
from yarnkit.runtime.static import make_pool

OPTIONS = StreamOptions(window=64, decode="static")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=49152)


@pytest.fixture
def admit(model, tokenizer):
    """`admit(rows, max_prompt_tokens=None)` -> an `Admission` over `rows` fresh cache rows (stopped afterwards)."""
    made = []

    def build(rows: int, max_prompt_tokens: int | None = None) -> Admission:
        pool = make_pool(model, OPTIONS, rows)
        table = SessionTable(rows, lambda: Conversation(model, tokenizer, OPTIONS, pool=pool))
        made.append(Admission(table, max_prompt_tokens))
        return made[-1]

    yield build
    for admission in made:
        admission.stop()


def job(text: str, session: str | None = None, choices: int = 1, seed: int | None = None) -> Job:
    """A completion request whose events are recorded in `job.events`."""
    new = Job(None, text, Sampling(max_new_tokens=4, seed=seed), choices, session)
    new.events = []
    new.emit = lambda kind, index, payload: new.events.append((kind, index, payload))
    return new


def wait_for(condition, seconds: float = 10.0) -> None:
    """Turns start on admission's helper thread: wait until `condition()` holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "admission's helper thread did not get there"
        time.sleep(0.005)


def admitted(work) -> list[Job]:
    return [admitted_job for admitted_job, _ in work]


def test_a_job_waits_for_a_busy_row_and_gets_the_one_given_back(admit):
    admission = admit(rows=1)
    first, second = job("Once upon a time"), job("Far away")
    admission.submit(first)
    admission.submit(second)
    assert admitted(admission.next_work()) == [first]
    assert admission.waiting == [second] and second.events == []
    wait_for(lambda: first.turns)
    assert first.events == [("started", 0, {"truncated": None})]
    assert admission.stats() == {"sessions": 0, "anonymous_caches": 1, "rows": 1, "active_requests": 1,
                                 "waiting_requests": 1}
    assert admitted(admission.next_work()) == [first]  # still no row for the second one
    admission.finish(first, first.conversations[0])
    assert admission.active == [] and first.finished == 1
    assert admitted(admission.next_work()) == [second]
    assert second.conversations == first.conversations
    wait_for(lambda: second.turns)


def test_a_job_that_cannot_fit_does_not_hold_up_one_that_can(admit):
    admission = admit(rows=2)
    first, pair, single = job("Once upon a time"), job("Far away", choices=2), job("Hello")
    admission.submit(first)
    admission.next_work()
    admission.submit(pair)
    admission.submit(single)
    assert admitted(admission.next_work()) == [first, single]
    assert admission.waiting == [pair]


def test_a_busy_named_session_is_refused_until_its_request_finished(admit):
    admission = admit(rows=2)
    alice = job("Hello", session="alice")
    admission.submit(alice)
    with pytest.raises(SessionBusy):  # the first one is still waiting
        admission.submit(job("Hello again", session="alice"))
    admission.submit(job("Hello", session="bob"))  # another session is not held up
    admission.next_work()
    with pytest.raises(SessionBusy):  # the first one holds its row
        admission.submit(job("Hello again", session="alice"))
    wait_for(lambda: alice.turns)
    admission.finish(alice, alice.conversations[0])
    later = job("Hello again", session="alice")
    admission.submit(later)
    admission.next_work()
    assert later.conversations == alice.conversations  # the named session keeps its conversation


def test_a_job_cancelled_while_waiting_never_takes_a_row(admit):
    admission = admit(rows=1)
    first, second = job("Once upon a time"), job("Far away")
    admission.submit(first)
    admission.next_work()
    admission.submit(second)
    second.cancel()
    assert admitted(admission.next_work()) == [first]
    assert second.events == [("cancelled", 0, None)] and second.conversations == []
    assert admission.waiting == []


def test_a_prompt_over_the_limit_is_a_400_event_and_gives_its_row_back(admit):
    admission = admit(rows=1, max_prompt_tokens=3)
    long = job("This prompt has many more tokens than three")
    admission.submit(long)
    admission.next_work()
    wait_for(lambda: long.finished == 1)
    [(kind, index, payload)] = long.events
    assert (kind, index, payload["status"], payload["param"], payload["code"]) == \
        ("error", 0, 400, "prompt", "context_length_exceeded")
    assert "--max-prompt-tokens" in payload["message"]
    assert long.cancelled and long.turns == [] and admission.active == []
    assert admission.sessions.busy == set()
    short = job("Hi")
    admission.submit(short)
    assert admitted(admission.next_work()) == [short]  # the row is free again


def test_each_choice_gets_its_own_row_and_seed(admit):
    admission = admit(rows=3)
    pair = job("Tell me a story", choices=2, seed=7)
    admission.submit(pair)
    admission.next_work()
    wait_for(lambda: len(pair.turns) == 2)
    turns = sorted(pair.turns, key=lambda turn: turn.index)
    assert [turn.sampling.seed for turn in turns] == [7, 8]
    assert len({turn.engine.cache.row for turn in turns}) == 2
    assert {kind for kind, _, _ in pair.events} == {"started"}


def test_after_stop_the_loop_gets_no_more_work(admit):
    admission = admit(rows=1)
    admission.submit(job("Hello"))
    admission.stop()
    assert admission.next_work() is None
