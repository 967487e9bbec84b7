"""`yarnkit serve` through the official `openai` client (and raw HTTP for malformed input), in-process on 127.0.0.1.

Run: `python -m pytest tests/test_runtime_serve.py -q`

A tiny random Llama with SmolLM2's real tokenizer and chat template serves on a free local port (uvicorn in a
thread, FastAPI app, the same `Service` and `Scheduler` as `yarnkit serve`). What is proven:
- the client's calls: models.list, chat (plain, streamed with usage, multi-turn with a system message,
  developer/tool roles, list-of-parts content), temperature+seed reproducible, n=2 honoured, stop strings,
  /v1/completions (plain and streamed); usage is never negative and counts the whole prompt;
- answers equal the same request answered by a lone in-process `Conversation` (greedy);
- a request that extends an idle cache's history reuses it (cached tokens reported, only new text fed);
- concurrent requests without a session id all succeed (no 409); a busy named session gets 409;
- a client that hangs up mid-stream leaves its session consistent and the server serving;
- bad input gets a 4xx OpenAI-style error naming the field, and the same keep-alive connection keeps working;
- the API key is required on every route but /health;
- every field of both bodies (and of a message) at its type's extreme values, raw NaN/Infinity/lone surrogates
  included, gets a 4xx naming it or a 200, never a 5xx; parameters the server cannot honour and unknown keys get
  a 400 naming them, their no-op values (logprobs false, top_k -1, ...) a 200; a seed outside int64 a 400;
- `GET /v1/models` lists the name the server was started with and its `--model-name` aliases, each usable;
- a prompt over the window is refused (400) or, with `--over-window truncate`, answered with the truncation in a
  header, the body and the log;
- a non-streaming request whose client hangs up stops within a second.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from conftest import tiny_model

from yarnkit.runtime.conversation import Conversation, Sampling
from yarnkit.runtime.options import StreamOptions
from yarnkit.runtime.scheduler import Scheduler
from yarnkit.runtime.api import Service
from yarnkit.runtime.serve import create_app

KEY = "test-key"
OPTIONS = StreamOptions(window=256, decode="static")


class LocalServer:
    """uvicorn serving `app` on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=49152, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def served(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, OPTIONS, rows=4, max_prompt_tokens=2000)
    service = Service(scheduler, tokenizer, "tiny", Sampling(max_new_tokens=16), max_prompt_tokens=2000,
                      max_tokens_limit=64)
    server = LocalServer(create_app(service, api_key=KEY))
    yield server, service
    server.stop()
    scheduler.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[0].port}/v1", api_key=KEY, max_retries=0, timeout=60)


def solo(model, tokenizer, messages, **sampling):
    conversation = Conversation(model, tokenizer, OPTIONS)
    return "".join(conversation.respond(messages, **sampling))


def raw(port, method, path, body=None, key=KEY, connection=None):
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


def test_client_calls_and_answers_equal_a_lone_conversation(client, model, tokenizer):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    text = answer.choices[0].message.content
    assert text == solo(model, tokenizer, messages, max_new_tokens=12)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert answer.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert answer.usage.completion_tokens == 12 and answer.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens > 0

    turn2 = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    again = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=5)
    assert again.usage.prompt_tokens > answer.usage.prompt_tokens  # the whole prompt, never negative
    assert again.usage.prompt_tokens_details.cached_tokens > 0     # the idle cache's history was a prefix

    roles = [{"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "Use the tool"}, {"role": "assistant", "content": None},
             {"role": "tool", "content": "42"}]
    out = client.chat.completions.create(model="tiny", messages=roles, max_tokens=4)
    normalized = [{"role": "system", "content": "Be\nbrief."}, {"role": "user", "content": "Use the tool"},
                  {"role": "assistant", "content": ""}, {"role": "tool", "content": "42"}]
    assert out.choices[0].message.content == solo(model, tokenizer, normalized, max_new_tokens=4)


def test_sampling_n_stop_and_completions(client, model, tokenizer):
    messages = [{"role": "user", "content": "Tell me a story"}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=7)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=7)
    assert first.choices[0].message.content == second.choices[0].message.content
    both = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=1.0, seed=7,
                                          n=2)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].message.content == first.choices[0].message.content
    assert both.usage.completion_tokens == 20 and both.usage.prompt_tokens == first.usage.prompt_tokens

    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2 and stop.strip()
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stop=[stop, "zzzq"])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.index(stop)]

    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8)
    assert done.object == "text_completion" and done.usage.completion_tokens == 8
    pieces = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text


def test_concurrent_stateless_requests_never_conflict_and_named_sessions_do(served, client):
    def ask(i):
        return client.chat.completions.create(model="tiny", max_tokens=8,
                                              messages=[{"role": "user", "content": f"Question {i}"}])

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))  # 6 requests, 4 cache rows: two wait, none is refused
    assert all(a.choices[0].finish_reason in ("length", "stop") for a in answers)

    hold = client.chat.completions.create(model="tiny", max_tokens=60, stream=True, extra_headers={
        "X-Session-Id": "alice"}, messages=[{"role": "user", "content": "Talk for a while"}])
    next(iter(hold))
    with pytest.raises(openai.ConflictError) as busy:
        client.chat.completions.create(model="tiny", max_tokens=4, extra_headers={"X-Session-Id": "alice"},
                                       messages=[{"role": "user", "content": "Me too"}])
    assert busy.value.body["code"] == "session_busy"
    hold.close()  # hang up mid-stream: the session keeps what was generated and serves the next request
    for _ in range(100):
        try:
            after = client.chat.completions.create(model="tiny", max_tokens=4, extra_headers={"X-Session-Id": "alice"},
                                                   messages=[{"role": "user", "content": "Again"}])
            break
        except openai.ConflictError:
            time.sleep(0.05)  # the worker notices the hang-up at its next step
    assert after.choices[0].message.role == "assistant"
    conversation = served[1].scheduler.sessions.named["alice"]
    assert conversation.engine.is_consistent() and conversation.messages[-1]["role"] == "assistant"
    status, body = raw(served[0].port, "DELETE", "/v1/sessions/alice")
    assert status == 200 and body["deleted"] is True
    assert raw(served[0].port, "DELETE", "/v1/sessions/alice")[0] == 404


BAD = [  # body, status, the field the error must name
    (b'{"model": "tiny", "messages": [', 400, "JSON"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": ["hi"]}, 400, "messages[0]"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "abc"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 2500}]}, 400, "messages"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop"),
]


def test_bad_input_gets_a_4xx_naming_the_field_on_a_connection_that_stays_usable(served):
    port = served[0].port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # one keep-alive connection throughout
    for body, status, field in BAD:
        got, error = raw(port, "POST", "/v1/chat/completions", body, connection=connection)
        assert got == status, (body, error)
        assert field in error["error"]["message"] and error["error"]["type"] == "invalid_request_error", error
    assert raw(port, "POST", "/v1/nowhere", {"prompt": "x"}, connection=connection)[0] == 404
    ok, answer = raw(port, "POST", "/v1/chat/completions", {"model": "tiny", "max_tokens": 3, "messages": [
        {"role": "user", "content": "hi"}]}, connection=connection)
    assert ok == 200 and answer["usage"]["completion_tokens"] == 3


def test_api_key_on_every_route_but_health(served):
    port = served[0].port
    assert raw(port, "GET", "/health", key=None)[0] == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("DELETE", "/v1/sessions/x")):
        status, body = raw(port, method, path, {"model": "tiny", "prompt": "x"}, key="wrong")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert raw(port, "GET", "/v1/models", key=None)[0] == 401


# Every field of both request bodies at its type's extremes (and at other types' values), raw JSON included
# (NaN, Infinity, a lone UTF-16 surrogate, a NUL): never a 5xx; a 4xx names the field that made it.
EXTREMES = [None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 10**40, -10**40, 0.0, 1e-300,
            1e308, -1e308, "", "x" * 5000, "\u0000", "\U0001f680", [], [None], [[]], ["a"] * 300, {}, {"a": 1},
            {"type": "text"}]
RAW_EXTREMES = ["NaN", "Infinity", "-Infinity", '"\\ud800"', '["\\udfff"]', "1e400", '{"include_usage": "\\ud800"}']
ENDPOINTS = {"/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2},
             "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2}}


def fuzz_fields(path):
    from yarnkit.runtime.api import request_models

    chat_model, completion_model = request_models()
    model = chat_model if "chat" in path else completion_model
    return sorted(model.model_fields) + ["top_k", "min_p", "repetition_penalty", "zzz_unknown"]


def post_raw(port, path, text):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=text.encode("utf-8", "surrogatepass"),
                           headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_every_field_at_extreme_values_never_gets_a_5xx(served, path):
    port = served[0].port
    failures = []
    for field in fuzz_fields(path):
        base = {k: v for k, v in ENDPOINTS[path].items() if k != field}
        for value in [json.dumps(v) for v in EXTREMES] + RAW_EXTREMES:
            text = json.dumps(base)[:-1] + f', "{field}": {value}}}'
            status, body = post_raw(port, path, text)
            if status >= 500:
                failures.append((field, value[:40], status, body[:200]))
            elif status >= 400:
                message = json.loads(body)["error"]
                named = field in (message.get("param") or "") + message["message"]
                if not named and field not in ("model",):
                    failures.append((field, value[:40], status, message["message"][:120]))
    assert not failures, f"{len(failures)} bad answers, e.g. " + "\n".join(map(str, failures[:40]))


def test_message_fields_at_extreme_values_never_get_a_5xx(served):
    port, failures = served[0].port, []
    for key in ("content", "role", "name", "tool_calls", "zzz_unknown"):
        for value in [json.dumps(v) for v in EXTREMES] + RAW_EXTREMES:
            message = {"role": "user", "content": "hi"}
            message.pop(key, None)
            text = json.dumps(message)[:-1] + f', "{key}": {value}}}'
            status, body = post_raw(port, "/v1/chat/completions",
                                    f'{{"model": "tiny", "max_tokens": 2, "messages": [{text}]}}')
            if status >= 500 or status >= 400 and "messages" not in json.loads(body)["error"]["message"]:
                failures.append((key, value[:40], status, body[:160]))
    assert not failures, f"{len(failures)} bad answers, e.g. " + "\n".join(map(str, failures[:20]))


UNSUPPORTED = [("top_k", 40), ("repetition_penalty", 1.3), ("min_p", 0.05), ("tool_choice", "auto"),
               ("reasoning_effort", "high"), ("frequency_penalty", 0.5), ("logprobs", True), ("top_logprobs", 3),
               ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
               ("an_unknown_key", 1), ("seed", 2**63), ("seed", -2**63 - 1)]


@pytest.mark.parametrize("key, value", UNSUPPORTED, ids=[f"{k}={v}"[:30] for k, v in UNSUPPORTED])
def test_every_parameter_works_or_is_refused_by_name(served, key, value):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, key: value}
    status, error = raw(served[0].port, "POST", "/v1/chat/completions", body)
    assert status == 400 and error["error"]["param"] == key and key in error["error"]["message"], error


def test_no_op_values_of_unsupported_parameters_are_accepted(served):
    """What clients send by default: logprobs false, top_k off, tool_choice none, penalties at their neutral value,
    and a seed at either end of the 64-bit range."""
    for extra in ({"logprobs": False}, {"top_k": -1}, {"tool_choice": "none"}, {"repetition_penalty": 1.0},
                  {"min_p": 0.0}, {"presence_penalty": 0}, {"seed": 2**63 - 1, "temperature": 0.5},
                  {"seed": -2**63, "temperature": 0.5}, {"parallel_tool_calls": False}, {"store": False}):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
        status, answer = raw(served[0].port, "POST", "/v1/chat/completions", body)
        assert status == 200, (extra, answer)


def test_model_ids_are_the_name_the_server_was_started_with_plus_aliases(model, tokenizer):
    from yarnkit.cli import Parser
    from yarnkit.runtime.serve import add_arguments, build_service

    parser = Parser(prog="yarnkit serve")
    add_arguments(parser)
    args = parser.parse_args(["smollm2-135m", "--model-name", "my-model", "--model-name", "gpt-4o-mini",
                              "--window", "256", "--max-sessions", "1"])
    service = build_service(args, model, tokenizer)
    server = LocalServer(create_app(service))
    try:
        status, listed = raw(server.port, "GET", "/v1/models", key=None)
        assert status == 200 and [m["id"] for m in listed["data"]] == ["smollm2-135m", "my-model", "gpt-4o-mini"]
        for name in ("smollm2-135m", "gpt-4o-mini"):
            status, answer = raw(server.port, "POST", "/v1/chat/completions", {
                "model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}, key=None)
            assert status == 200 and answer["model"] == name
        status, error = raw(server.port, "POST", "/v1/chat/completions", {
            "model": str(model.config._name_or_path) or "/cache/x", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}, key=None)
        assert status == 404 and "smollm2-135m" in error["error"]["message"]
    finally:
        server.stop()
        service.scheduler.close()


@pytest.mark.parametrize("policy", ["refuse", "truncate"])
def test_a_prompt_over_the_window_is_refused_or_answered_with_the_truncation_stated(model, tokenizer, policy,
                                                                                     capfd, caplog):
    scheduler = Scheduler(model, tokenizer, StreamOptions(window=64, decode="static"), rows=1, over_window=policy)
    service = Service(scheduler, tokenizer, "tiny", Sampling(max_new_tokens=4))
    server = LocalServer(create_app(service))
    messages = [{"role": "user", "content": "Remember the word PLUM. " + "filler text " * 60 + "What word?"}]
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for stream in (False, True):
            connection.request("POST", "/v1/chat/completions", body=json.dumps(
                {"model": "tiny", "messages": messages, "max_tokens": 3, "stream": stream,
                 "stream_options": {"include_usage": True} if stream else None}),
                headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read().decode()
            if policy == "refuse":
                error = json.loads(payload)["error"]
                assert response.status == 400 and error["code"] == "context_length_exceeded"
                assert "64-token window" in error["message"] and "--over-window truncate" in error["message"]
                continue
            assert response.status == 200
            prompt_tokens = int(response.headers["X-Yarnkit-Truncated"].split()[0])
            assert prompt_tokens > 64 and "64-token window" in response.headers["X-Yarnkit-Truncated"]
            body = json.loads(payload) if not stream else json.loads(
                [line for line in payload.splitlines() if '"usage"' in line][-1][len("data: "):])
            assert body["yarnkit"]["truncated"]["prompt_tokens"] == prompt_tokens == body["usage"]["prompt_tokens"]
        time.sleep(0.2)  # the access line is written once the response (the stream too) has ended
        access_log = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
        if policy == "truncate":
            assert [line["truncated_prompt_tokens"] > 64 for line in access_log] == [True, True]
            assert sum("longer than the 64-token window" in record.getMessage() for record in caplog.records) == 2
    finally:
        server.stop()
        scheduler.close()


def test_an_abandoned_request_stops_its_work_within_a_second(model, tokenizer, capfd):
    """A non-streaming request whose client hangs up: the scheduler is idle again within a second, long before the
    reply it was asked for (3000 tokens, ~10 s of decoding here) would be done; the access log says 499 (client
    closed the request), and no traceback is printed."""
    scheduler = Scheduler(model, tokenizer, StreamOptions(window=4096, decode="static"), rows=1)
    service = Service(scheduler, tokenizer, "tiny", Sampling(max_new_tokens=4), max_tokens_limit=3000)
    server = LocalServer(create_app(service))
    try:
        body = json.dumps({"model": "tiny", "max_tokens": 3000, "messages": [{"role": "user", "content": "Go on"}]})
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        for _ in range(200):
            if scheduler.stats()["active_requests"]:
                break
            time.sleep(0.01)
        time.sleep(0.5)
        steps = scheduler.steps
        assert scheduler.stats()["active_requests"] == 1 and steps > 0  # generating
        client.close()
        gone = time.perf_counter()
        while scheduler.stats()["active_requests"] and time.perf_counter() - gone < 10:
            time.sleep(0.01)
        assert time.perf_counter() - gone < 1.0, "the abandoned request kept the scheduler busy"
        produced = scheduler.steps - steps
        assert produced < 1000  # stopped long before its 3000 tokens
        time.sleep(0.5)  # the handler ends at its next disconnect poll; the access line follows
        err = capfd.readouterr().err
        assert "Traceback" not in err and "Exception in ASGI" not in err, err[-2000:]
        access = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert [line["status"] for line in access if line["path"] == "/v1/chat/completions"] == [499], access
    finally:
        server.stop()
        scheduler.close()
