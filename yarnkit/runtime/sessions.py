"""`SessionTable`: which conversation (one cache row each) serves a request of `yarnkit serve`.

Named sessions (`X-Session-Id`) keep their conversation between requests. A request without one gets, per
choice, an idle anonymous conversation whose history is the longest prefix of the request (only the new text is
fed), else a free row, else the least recently used idle anonymous conversation (it starts over), else the least
recently used idle named one is dropped for a new conversation; when every row is busy the request waits (None).
A conversation is busy from `claim` to `release`. Not thread-safe on its own: the scheduler calls it holding its
lock. What it is not: the admission queue or the decode loop (`scheduler.py`).

Test: `python -m pytest tests/test_runtime_serve.py -q`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable


class SessionTable:
    """Up to `rows` conversations, named or anonymous; `new_conversation()` makes one on a free row."""

    def __init__(self, rows: int, new_conversation: Callable):
        self.rows, self.new_conversation = rows, new_conversation
        self.named: OrderedDict = OrderedDict()  # session id -> conversation, least recently used first
        self.anonymous: list = []
        self.busy: set[int] = set()              # id() of conversations with a turn in flight
        self.last_used: dict[int, float] = {}

    def is_busy(self, session: str) -> bool:
        conversation = self.named.get(session)
        return conversation is not None and id(conversation) in self.busy

    def claim(self, session: str | None, choices: int, messages, text, rendered) -> list | None:
        """The conversations for one request (one per choice), now busy; None: every row is busy, wait."""
        chosen = self._named(session) if session is not None else self._anonymous(choices, messages, text, rendered)
        for conversation in chosen or []:
            self.busy.add(id(conversation))
        return chosen

    def release(self, conversation) -> None:
        self.busy.discard(id(conversation))
        self.last_used[id(conversation)] = time.monotonic()

    def drop(self, session: str) -> bool:
        """Forget an idle named session (False: no such session, or it is busy)."""
        conversation = self.named.get(session)
        if conversation is None or id(conversation) in self.busy:
            return False
        del self.named[session]
        conversation.close()
        return True

    def stats(self) -> dict:
        return {"sessions": len(self.named), "anonymous_caches": len(self.anonymous), "rows": self.rows}

    def _named(self, session: str) -> list | None:
        conversation = self.named.get(session)
        if conversation is None:
            conversation = self._on_a_row()
            if conversation is None:
                return None
            self.named[session] = conversation
        self.named.move_to_end(session)
        return [conversation]

    def _anonymous(self, choices: int, messages, text, rendered) -> list | None:
        chosen: list = []
        for _ in range(choices):
            idle = [c for c in self.anonymous if id(c) not in self.busy and c not in chosen]
            reuse = {id(c): c.reusable(messages, text, rendered) for c in idle}
            best = max(idle, key=lambda c: (reuse[id(c)], self.last_used.get(id(c), 0)), default=None)
            if best is not None and reuse[id(best)] >= 0:
                chosen.append(best)  # its history is a prefix of this request: only the rest is fed
                continue
            fresh = self._on_a_row(evict=False)
            if fresh is None and idle:  # no free row: the least recently used idle anonymous cache starts over
                chosen.append(min(idle, key=lambda c: self.last_used.get(id(c), 0)))
                continue
            fresh = fresh or self._on_a_row(protect=chosen)  # else drop the LRU idle named session
            if fresh is None:
                return None  # every row is busy: wait
            self.anonymous.append(fresh)
            chosen.append(fresh)
        return chosen

    def _on_a_row(self, protect=(), evict: bool = True):
        """A new conversation on a free row; with `evict`, drops the least recently used idle one if every row is
        taken (None: no row free, or all busy)."""
        if len(self.named) + len(self.anonymous) >= self.rows:
            idle = [c for c in list(self.named.values()) + self.anonymous
                    if id(c) not in self.busy and c not in protect]
            if not evict or not idle:
                return None
            victim = min(idle, key=lambda c: self.last_used.get(id(c), 0))
            self.named = OrderedDict((k, c) for k, c in self.named.items() if c is not victim)
            if victim in self.anonymous:
                self.anonymous.remove(victim)
            victim.close()
        return self.new_conversation()
