"""The session table of `yarnkit serve` (`yarnkit/runtime/sessions.py`): which conversation serves a request.

Run: `python -m pytest tests/test_runtime_sessions.py -q`

The table only asks a conversation how much of a request it already holds (`reusable`) and to `close()`, so the
conversations here are plain records of the text they hold (the real `Conversation.reusable` is proven in
tests/test_runtime_serve.py through the server). What is proven:
- a named session keeps its conversation between requests and is busy from `claim` to `release`;
- an anonymous request takes the idle conversation holding the longest prefix of it, else a free row, else the
  least recently used idle anonymous one (which starts over); with every row busy it gets None (it waits);
- rows held by idle named sessions: the least recently used one is dropped (closed) for a new conversation;
- `drop` forgets an idle named session only; each choice of a request gets its own conversation.
"""

from __future__ import annotations

import itertools

from yarnkit.runtime.sessions import SessionTable


class Held:
    """A conversation as the table sees it: the text it holds, closed or not."""

    def __init__(self, name: int):
        self.name, self.fed, self.closed = name, "", False

    def reusable(self, messages, text, rendered) -> int:
        return len(self.fed) if self.fed and text.startswith(self.fed) else -1

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"Held({self.name}, {self.fed!r})"


def table(rows: int) -> SessionTable:
    names = itertools.count()
    return SessionTable(rows, lambda: Held(next(names)))


def serve(sessions: SessionTable, text: str, session: str | None = None, choices: int = 1) -> list[Held] | None:
    """Claim, 'feed' the request's text, release: what a finished request leaves behind."""
    claimed = sessions.claim(session, choices, None, text, None)
    for conversation in claimed or []:
        conversation.fed = text
        sessions.release(conversation)
    return claimed


def test_a_named_session_keeps_its_conversation_and_is_busy_while_claimed():
    sessions = table(rows=2)
    [alice] = sessions.claim("alice", 1, None, "Hi", None)
    assert sessions.is_busy("alice") and not sessions.is_busy("bob")
    sessions.release(alice)
    assert not sessions.is_busy("alice")
    assert sessions.claim("alice", 1, None, "something else entirely", None) == [alice]
    assert sessions.stats() == {"sessions": 1, "anonymous_caches": 0, "rows": 2}


def test_an_anonymous_request_reuses_the_longest_prefix_else_a_free_row_else_the_oldest_idle():
    sessions = table(rows=3)
    [long] = serve(sessions, "Once upon")
    [other] = serve(sessions, "Far away")
    [short] = serve(sessions, "Once")
    assert len({short.name, other.name, long.name}) == 3  # no history is a prefix: a free row each
    assert serve(sessions, "Once upon a time") == [long]  # the longest prefix wins over "Once"
    assert serve(sessions, "Far away, far") == [other]
    [restarted] = serve(sessions, "Something new")  # no row free: the least recently used idle one starts over
    assert restarted is short and not short.closed
    busy = [sessions.claim(None, 1, None, f"busy {i}", None) for i in range(3)]
    assert all(busy) and sessions.claim(None, 1, None, "one more", None) is None  # every row busy: wait


def test_idle_named_sessions_give_up_the_least_recently_used_row():
    sessions = table(rows=2)
    [alice] = serve(sessions, "Hi", session="alice")
    [bob] = serve(sessions, "Hi", session="bob")
    serve(sessions, "Hi again", session="alice")  # alice used after bob: bob is the least recently used
    [anonymous] = serve(sessions, "Hello")
    assert bob.closed and not alice.closed and anonymous not in (alice, bob)
    assert list(sessions.named) == ["alice"]
    [carol] = sessions.claim("carol", 1, None, "Hi", None)  # a new named session: the least recently used idle
    assert alice.closed and not anonymous.closed                # conversation of either kind gives up its row
    assert list(sessions.named) == ["carol"] and sessions.anonymous == [anonymous]
    [dave] = sessions.claim("dave", 1, None, "Hi", None)  # carol is busy: the idle anonymous one goes
    assert anonymous.closed and dave is not carol and sessions.anonymous == []
    assert sessions.claim("erin", 1, None, "Hi", None) is None  # both rows busy: wait


def test_drop_forgets_only_an_idle_named_session():
    sessions = table(rows=2)
    [alice] = sessions.claim("alice", 1, None, "Hi", None)
    assert sessions.drop("alice") is False and not alice.closed  # busy
    sessions.release(alice)
    assert sessions.drop("nobody") is False
    assert sessions.drop("alice") is True and alice.closed and "alice" not in sessions.named


def test_each_choice_gets_its_own_conversation():
    sessions = table(rows=3)
    pair = sessions.claim(None, 2, None, "Tell me", None)
    assert len(pair) == 2 and pair[0] is not pair[1]
    assert sessions.claim(None, 2, None, "Tell me", None) is None  # one row left for two choices: wait
