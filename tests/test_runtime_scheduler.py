"""The loop of `yarnkit serve` (`yarnkit/runtime/scheduler.py`): jobs in, batched steps, events out, no HTTP.

Run: `python -m pytest tests/test_runtime_scheduler.py -q`

A tiny random Llama with SmolLM2's real tokenizer and chat template; the model's forward is watched by a hook
that records the shape of every `input_ids` it gets. What is proven:
- a lone request whose session sits in the last cache row (the rows before it held by idle sessions) decodes
  in steps of ONE row, and answers what a lone `Conversation` answers (greedy);
- two requests decoding at the same time share one step (a forward of both rows), and each answers what it
  answers alone, greedy and sampled (temperature, top-p, a seed each: tokens chosen together on the device);
- a job cancelled mid-reply is finished at the next step (`done` with `cancelled`) and keeps its partial reply.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from conftest import tiny_model

from yarnkit.runtime.admission import Job
from yarnkit.runtime.conversation import Conversation, Sampling
from yarnkit.runtime.engine import StreamingEngine
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.scheduler import Scheduler

OPTIONS = StreamOptions(window=256, decode="static")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=49152, max_position_embeddings=4096)


@pytest.fixture
def scheduler(model, tokenizer):
    running = Scheduler(model, tokenizer, OPTIONS, rows=4)
    yield running
    running.close()


@pytest.fixture
def shapes(model):
    """The `input_ids` shape of every forward of the model while the test runs."""
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    yield seen
    hook.remove()


class Request(Job):
    """A job that records its events and says when all its choices are done."""

    def __init__(self, content: str, max_new_tokens: int = 12, session: str | None = None, **sampling):
        super().__init__([{"role": "user", "content": content}], None,
                         Sampling(max_new_tokens=max_new_tokens, **sampling), session=session)
        self.events, self.over = [], threading.Event()
        self.on_started, self.on_text = (lambda: None), (lambda: None)
        self.emit = self.record

    def record(self, kind, index, payload) -> None:
        self.events.append((kind, payload))
        if kind == "started":
            self.on_started()
        if kind == "text":
            self.on_text()
        if kind in ("done", "error", "cancelled"):
            self.over.set()

    def answer(self, scheduler: Scheduler | None = None) -> str:
        if scheduler is not None:
            scheduler.submit(self)
        assert self.over.wait(60), "the scheduler did not finish the request"
        assert [kind for kind, _ in self.events if kind in ("done", "error")] == ["done"], self.events
        return "".join(payload for kind, payload in self.events if kind == "text")


def alone(model, tokenizer, content: str, max_new_tokens: int = 12, **sampling) -> str:
    conversation = Conversation(model, tokenizer, OPTIONS)
    return "".join(conversation.respond([{"role": "user", "content": content}], max_new_tokens=max_new_tokens,
                                        **sampling))


def test_a_lone_request_in_the_last_row_decodes_one_row(scheduler, shapes, model, tokenizer):
    for name in ("a", "b", "c"):  # idle sessions now hold rows 0..2
        Request("Hello", max_new_tokens=2, session=name).answer(scheduler)
    shapes.clear()
    request = Request("Tell me about the sea", session="d")
    text = request.answer(scheduler)
    assert scheduler.sessions.named["d"].engine.cache.row == 3
    decode_steps = [shape for shape in shapes if shape[1] == 1]
    [done] = [payload for kind, payload in request.events if kind == "done"]
    assert len(decode_steps) == done["completion_tokens"] == 12 and set(decode_steps) == {(1, 1)}
    assert text == alone(model, tokenizer, "Tell me about the sea")


def test_requests_decoding_at_the_same_time_share_one_step(scheduler, shapes, model, tokenizer):
    first, second = Request("Tell me about the sea", max_new_tokens=16), Request("What is a river?")
    second_started = threading.Event()
    second.on_started = second_started.set
    first.on_text = lambda: second_started.wait(30)  # the first keeps decoding only once the second has started
    scheduler.submit(first)
    scheduler.submit(second)
    answers = first.answer(), second.answer()
    assert (2, 1) in shapes  # one forward decoded both rows
    assert answers == (alone(model, tokenizer, "Tell me about the sea", 16),
                       alone(model, tokenizer, "What is a river?"))


def test_sampled_requests_decoding_together_answer_what_each_answers_alone(scheduler, shapes, model, tokenizer):
    """Sampling runs batched on the model's device; each turn's seed still gives its solo reply, token for token."""
    settings = [dict(temperature=0.9, top_p=0.8, seed=7), dict(temperature=1.3, seed=-3)]
    first = Request("Tell me about the sea", max_new_tokens=16, **settings[0])
    second = Request("What is a river?", **settings[1])
    second_started = threading.Event()
    second.on_started = second_started.set
    first.on_text = lambda: second_started.wait(30)
    scheduler.submit(first)
    scheduler.submit(second)
    answers = first.answer(), second.answer()
    assert (2, 1) in shapes
    assert answers == (alone(model, tokenizer, "Tell me about the sea", 16, **settings[0]),
                       alone(model, tokenizer, "What is a river?", **settings[1]))
    assert answers[1] != alone(model, tokenizer, "What is a river?", **{**settings[1], "seed": 4})  # seeds matter


def test_a_cancelled_job_is_finished_at_the_next_step_with_its_partial_reply(scheduler):
    request = Request("Talk for a while", max_new_tokens=200, session="talker")
    pieces = []
    request.on_text = lambda: pieces.append(1) if len(pieces) < 3 else request.cancel()
    scheduler.submit(request)
    assert request.over.wait(60)
    [(kind, payload)] = [event for event in request.events if event[0] == "done"]
    assert payload["finish_reason"] == "cancelled" and 3 <= payload["completion_tokens"] < 200
    conversation = scheduler.sessions.named["talker"]
    assert conversation.engine.is_consistent() and conversation.messages[-1]["role"] == "assistant"
    assert conversation.messages[-1]["content"].startswith("".join(p for k, p in request.events if k == "text"))


def serve_scenario(model, tokenizer, ahead: bool, stop_id: int | None = None, stop_string: str | None = None,
                   decode: str = "static"):
    """Six requests over a 96-token window (every reply evicts): greedy and sampled, a stop id shared by all
    sessions, a stop string, replies ending on their token limit while others decode, one request joining
    mid-stream (its prefill interleaved), one cancelled mid-reply; then a follow-up in three sessions (what each
    cache kept). Returns each request's text and `done` payload, each session's `cache_state` before the
    follow-ups, the batch size of each step that ran ahead of the host with the count of tokens taken back, and
    the first five requests' token ids."""
    options = StreamOptions(window=96, decode=decode)

    def new(pool):
        conversation = Conversation(model, tokenizer, options, pool=pool)
        conversation.stop_ids |= {stop_id} if stop_id is not None else set()
        return conversation

    running = Scheduler(model, tokenizer, options, rows=6, make_conversation=new, ahead=ahead)
    ahead_steps, taken_back = [], []
    original = StreamingEngine.decode_on_device, StreamingEngine.take_back
    StreamingEngine.decode_on_device = staticmethod(lambda engines, ids: (ahead_steps.append(len(engines)),
                                                                          original[0](engines, ids))[1])
    StreamingEngine.take_back = lambda engine: (taken_back.append(1), original[1](engine))[1]
    try:
        joining = Request("And what about mountains?", max_new_tokens=30, session="e")
        first = [Request("Tell me about the sea", max_new_tokens=48, session="a"),
                 Request("What is a river?", max_new_tokens=40, session="b", temperature=0.9, top_p=0.9, seed=5),
                 Request("Describe a forest", max_new_tokens=44, session="c",
                         stop=(stop_string,) if stop_string else ()),
                 Request("Name a colour", max_new_tokens=9, session="d"),
                 Request("Talk for a while", max_new_tokens=60, session="f")]
        texts = []
        first[0].on_text = lambda: texts.append(1) if len(texts) != 4 else (texts.append(1), running.submit(joining))
        pieces = []
        first[4].on_text = lambda: pieces.append(1) if len(pieces) < 5 else first[4].cancel()
        for request in first:
            running.submit(request)
        replies = [request.answer() for request in first] + [joining.answer()]
        caches = {name: cache_state(running.sessions.named[name]) for name in "abcdef"}
        follow = [Request("Say more.", max_new_tokens=16, session=name) for name in ("a", "c", "f")]
        replies += [request.answer(running) for request in follow]
        done = [next(payload for kind, payload in request.events if kind == "done") for request in first + [joining]
                + follow]
    finally:
        StreamingEngine.decode_on_device, StreamingEngine.take_back = staticmethod(original[0]), original[1]
        running.close()
    produced = [request.turns[0].produced for request in first]
    done = [{key: d[key] for key in ("finish_reason", "completion_tokens")} for d in done]
    return replies, done, caches, (ahead_steps, len(taken_back)), produced


def cache_state(conversation) -> tuple:
    """What a session's cache holds: consistent or not, each slot's token id and, for comparison, its keys."""
    engine = conversation.engine
    keys = torch.stack([layer.keys for layer in engine.cache.layers])
    return engine.is_consistent(), engine.cache_ids.tolist(), len(engine), conversation.fed_text, keys


def test_steps_queued_ahead_of_the_host_give_the_same_replies(model, tokenizer):
    """The loop that queues each step on the device's ids before reading them (on CUDA by default) answers every
    request as the loop that reads them first: greedy and seeded sampling, evictions (normal steps between ahead
    ones), stop ids (the fed token taken back), stop strings (kept), token limits, a request joining mid-stream, a
    cancelled one; and the follow-ups show the caches hold the same tokens."""
    check_ahead_matches_plain(model, tokenizer, "static")


def check_ahead_matches_plain(model, tokenizer, decode: str) -> None:
    """`serve_scenario` with and without steps queued ahead: the same replies, finish reasons and caches (also
    run on the CUDA graph by tests/test_runtime_gpu.py)."""
    plain, _, _, (none, _), ids = serve_scenario(model, tokenizer, False, decode=decode)
    assert not none
    # a stop id that ends a greedy reply late (by then every request decodes and the steps run ahead)
    late = next(token for token in ids[0][24:] if all(token not in reply[:20] for reply in ids))
    stop_string = plain[2][len(plain[2]) // 2:len(plain[2]) // 2 + 3]
    plain, plain_done, plain_caches, (none, _), _ = serve_scenario(model, tokenizer, False, late, stop_string, decode)
    ahead, ahead_done, ahead_caches, (steps, taken_back), _ = serve_scenario(model, tokenizer, True, late,
                                                                             stop_string, decode)
    assert (ahead, ahead_done) == (plain, plain_done)
    for name, (consistent, slot_ids, length, fed_text, keys) in plain_caches.items():
        assert consistent and ahead_caches[name][:4] == (consistent, slot_ids, length, fed_text), name
        torch.testing.assert_close(ahead_caches[name][4], keys, rtol=0, atol=1e-5)  # batch shapes may differ
    reasons = [d["finish_reason"] for d in plain_done]
    assert reasons[0] == reasons[2] == "stop" and reasons[3] == "length" and reasons[4] == "cancelled", plain_done
    assert not none and len(steps) > 50 and max(steps) >= 4, steps  # most steps ran ahead, batched
    assert taken_back >= 1  # the stop id came in a step run ahead
