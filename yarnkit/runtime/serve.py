"""Serve a model over an OpenAI-compatible HTTP API (FastAPI + uvicorn), streaming sink caches, batched decode.

  yarnkit serve                                   # bundled SmolLM2-135M on http://127.0.0.1:8000/v1
  yarnkit serve runs/yarn-64k --port 8080 --window 4096 --max-sessions 16
  YARNKIT_API_KEY=secret yarnkit serve --host 0.0.0.0     # clients send 'Authorization: Bearer secret'

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hi"}])

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as server-sent events),
`GET /v1/models`, `GET /health` (no key needed), `DELETE /v1/sessions/ID`. Requests are stateless as with
OpenAI: a request without a session id gets a cache of its own, or an idle one whose history is a prefix of it
(only the new text is fed); it never gets a 409. `X-Session-Id: NAME` (or the body's `session_id`) keeps one
conversation's cache between requests; a second concurrent request on a busy named session gets 409. At most
`--max-sessions` caches live (one cache row each; the least recently used idle one is dropped). All sessions
decode together in one batched step; a long prompt is prefilled a chunk at a time between decode steps. On CUDA
the step of every batch width is captured (and with `--compile` compiled) before the server listens.
Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`) naming the field. Binds
127.0.0.1 unless `--host` says otherwise; `--api-key` (or YARNKIT_API_KEY) is checked on every route but /health.
"""


import argparse
import asyncio
import hmac
import json
import logging
import os
import socket
import sys
import time
import uuid

from yarnkit.errors import BadValue, UserError
from yarnkit.runtime.admission import Job, SessionBusy
from yarnkit.runtime.api import ApiError, Service, error_body, request_models, usage
from yarnkit.runtime.conversation import Sampling
from yarnkit.runtime.options import add_stream_arguments, check_stream_arguments, load_for_cli, stream_options
from yarnkit.runtime.scheduler import Scheduler

log = logging.getLogger("yarnkit.serve")
API_KEY_ENV = "YARNKIT_API_KEY"
TRUNCATED_HEADER = "X-Yarnkit-Truncated"
DISCONNECT_POLL = 0.2  # seconds between checks that a waiting (non-streaming) client is still there
CLIENT_CLOSED = 499  # the access log's status for a client that hung up before its answer (nginx's code)


class ClientGone(Exception):
    """The client hung up before its answer was ready: its jobs are cancelled and nothing is sent."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", nargs="?", default="smollm2-135m", help="run dir, HF dir, .gguf, or smollm2-135m")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    parser.add_argument("--max-sessions", type=int, default=8, help="caches kept in memory = sessions decoded at once")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    parser.add_argument("--max-prompt-tokens", type=int, default=65536, help="longest prompt accepted (tokens)")
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--model-name", action="append", default=[], metavar="NAME",
                        help="another model id clients may send (repeatable); CKPT as given is always one")
    parser.add_argument("--over-window", default="refuse", choices=["refuse", "truncate"],
                        help="a prompt longer than --window: refuse it with a 400 (default), or answer from its end "
                             "and say so (header X-Yarnkit-Truncated, body field yarnkit.truncated, a log line)")

    add_stream_arguments(parser)


def create_app(service: Service, api_key: str | None = None):
    """The FastAPI application over a `Service` (tests run it in-process with uvicorn): its routes, each behind
    `api_key_check` but /health, with `add_error_handlers` and `add_access_log`."""
    from fastapi import Depends, FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    ChatRequest, CompletionRequest = request_models()
    app = FastAPI(title="yarnkit", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    add_access_log(app)
    authorized = [Depends(api_key_check(api_key))]

    @app.get("/health")
    async def health():
        return {"status": "ok", **service.scheduler.stats()}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "yarnkit"}
                                           for name in service.model_names]}

    @app.delete("/v1/sessions/{session}", dependencies=authorized)
    async def delete_session(session: str):
        if not service.scheduler.drop_session(session):
            raise ApiError(404, f"no idle session {session!r}", "session", "session_not_found")
        return {"id": session, "object": "session", "deleted": True}

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat(body: ChatRequest, request: Request):
        session = request.headers.get("x-session-id") or body.session_id
        jobs = await run_in_threadpool(service.chat_jobs, body, session)
        return await answer(service, request, jobs, body, "chat.completion")

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        session = request.headers.get("x-session-id") or body.session_id
        jobs = await run_in_threadpool(service.completion_jobs, body, session)
        return await answer(service, request, jobs, body, "text_completion")

    return app


def api_key_check(api_key: str | None):
    """The dependency every route but /health runs: `Authorization: Bearer KEY` must match (constant time)."""
    from fastapi import Request

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key")

    return authorize


def add_error_handlers(app) -> None:
    """Every error leaves as OpenAI-style JSON naming the field: ours, request validation, unknown routes, crashes."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error_body(error.status, error.message, error.param, error.code, error.kind),
                            status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        first = error.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, f"body is not valid JSON: {first.get('msg')}"), status_code=400)
        param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or "body"
        for union_tag in ("str", "list[TextPart]", "list[str]", "function-after", "int", "bool", "float",
                          "dict[any,any]", "list[any]"):
            param = param.replace(f".{union_tag}", "")
        if first.get("type") == "extra_forbidden":
            return JSONResponse(error_body(400, f"{param}: not a parameter this server supports (unknown parameters "
                                                "are refused, not ignored)", param, "unsupported_parameter"),
                                status_code=400)
        return JSONResponse(error_body(400, f"{param}: {first.get('msg')}", param), status_code=400)


    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else str(
            error.detail)
        return JSONResponse(error_body(error.status_code, message), status_code=error.status_code)

    @app.exception_handler(ClientGone)
    async def client_gone(request, error):
        return Response(status_code=CLIENT_CLOSED)  # no one reads it; the access log records who left

    @app.exception_handler(Exception)
    async def crashed(request, error):
        log.exception("unexpected error")
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}", kind="server_error"),
                            status_code=500)


class AccessLog:
    """One JSON line per request on stderr (method, path, status, ms, a truncated prompt's size; never contents).
    Plain ASGI, not Starlette's BaseHTTPMiddleware, which hides a client's disconnect from the endpoint."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            line = {"time": round(time.time(), 3), "method": scope["method"], "path": scope["path"],
                    "status": status[0], "ms": round(1000 * (time.perf_counter() - start), 1)}
            truncated = (scope.get("state") or {}).get("truncated")
            if truncated:
                line["truncated_prompt_tokens"] = truncated
            print(json.dumps(line), file=sys.stderr, flush=True)


def add_access_log(app) -> None:
    """One JSON line per request on stderr (`AccessLog`)."""
    app.add_middleware(AccessLog)


async def answer(service: Service, request, jobs: list[Job], body, kind: str):
    """Submit the jobs, wait until every prompt was accepted (then 200, else the 4xx), and reply: one JSON body,
    or server-sent events with `stream: true`."""
    from fastapi.responses import JSONResponse, StreamingResponse

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    offsets = [i * body.n for i in range(len(jobs))]
    for job, offset in zip(jobs, offsets):
        job.emit = lambda what, index, payload, offset=offset: loop.call_soon_threadsafe(
            events.put_nowait, (what, offset + index, payload))
    try:
        for job in jobs:
            service.scheduler.submit(job)
    except SessionBusy as busy:
        raise ApiError(409, f"session {str(busy)!r} is busy with another request; retry when it finishes or "
                            "send no session id", "session_id", "session_busy") from None
    total = sum(job.choices for job in jobs)
    early, started, truncated, checked = [], 0, [], [loop.time()]
    try:
        while started < total:  # every prompt tokenized and within the limit: only then 200 (or a 4xx)
            what, index, payload = await next_event(events, request, checked)
            if what == "started":
                started += 1
                if payload and payload.get("truncated"):
                    truncated.append(payload["truncated"])
            elif what == "error":
                raise ApiError(payload["status"], payload["message"], payload.get("param"), payload.get("code"),
                               "invalid_request_error" if payload["status"] < 500 else "server_error")
            else:
                early.append((what, index, payload))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    for item in early:
        events.put_nowait(item)
    ident = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
    base = {"id": ident, "created": int(time.time()), "model": body.model}
    headers, notice = {}, None
    if truncated:  # --over-window truncate: said in a header, in the body and in the log, never silently
        worst = max(truncated, key=lambda cut: cut["prompt_tokens"])
        headers[TRUNCATED_HEADER] = f"{worst['prompt_tokens']} prompt tokens > {worst['window']}-token window"
        notice = {"truncated": {**worst, "note": "the prompt is longer than the window: only its end was in "
                                                 "context (--over-window truncate)"}}
        request.state.truncated = worst["prompt_tokens"]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_events(events, jobs, total, base, kind, include_usage, notice),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
    texts, done, error = [""] * total, {}, None
    try:
        while len(done) < total and error is None:
            what, index, payload = await next_event(events, request, checked)
            if what == "text":
                texts[index] += payload
            elif what == "done":
                done[index] = payload
            elif what == "error":
                error = payload["message"]
    finally:
        for job in jobs:
            job.cancel()  # no-op for finished jobs; a vanished client stops generating
    if error is not None:
        raise RuntimeError(error)
    choices = []
    for index in range(total):
        finish = done[index]["finish_reason"]
        if kind == "chat.completion":
            choices.append({"index": index, "message": {"role": "assistant", "content": texts[index]},
                            "finish_reason": finish, "logprobs": None})
        else:
            choices.append({"index": index, "text": texts[index], "finish_reason": finish, "logprobs": None})
    answer_body = {**base, "object": kind, "choices": choices, "usage": usage(done, jobs)}
    if notice:
        answer_body["yarnkit"] = notice
    return JSONResponse(answer_body, headers=headers)


async def next_event(events: asyncio.Queue, request, checked: list[float]):
    """The next scheduler event. Every `DISCONNECT_POLL` seconds (also while events keep coming) it checks that the
    client is still there; one that hung up raises `ClientGone`, and the caller's `finally` cancels its jobs.
    `checked` holds the time of the last check."""
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() - checked[0] >= DISCONNECT_POLL:
            checked[0] = loop.time()
            if await request.is_disconnected():
                raise ClientGone
        try:
            return await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL)
        except asyncio.TimeoutError:
            continue


async def stream_events(events, jobs, total, base, kind, include_usage, notice=None):
    """The events of `answer`'s jobs as OpenAI chunks (`data: {...}`), then `data: [DONE]`."""
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

    def event(payload: dict) -> str:
        return f"data: {json.dumps({**base, 'object': chunk_kind, **payload})}\n\n"

    def choice(index, text=None, finish=None, first=False):
        if kind == "chat.completion":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

    done = {}
    try:
        if kind == "chat.completion":
            for index in range(total):
                yield event({"choices": [choice(index, first=True)]})
        while len(done) < total:
            what, index, payload = await events.get()
            if what == "text":
                yield event({"choices": [choice(index, payload)]})
            elif what == "done":
                done[index] = payload
                yield event({"choices": [choice(index, finish=payload["finish_reason"])]})
            elif what == "error":
                yield f"data: {json.dumps(error_body(500, payload['message'], kind='server_error'))}\n\n"
                return
        if include_usage:
            yield event({"choices": [], "usage": usage(done, jobs), **({"yarnkit": notice} if notice else {})})
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()  # a client that left mid-stream: the scheduler keeps what was generated

def build_service(args, model, tokenizer) -> Service:
    options = stream_options(args).resolved(model.config, args.device, pooled=True)  # checked once, before serving
    scheduler = Scheduler(model, tokenizer, options, rows=args.max_sessions, max_prompt_tokens=args.max_prompt_tokens,
                          over_window=args.over_window)
    if scheduler.pool is not None and (scheduler.pool.use_graph or scheduler.pool.compiled):
        start = time.perf_counter()
        print(f"yarnkit serve: preparing the decode step for up to {args.max_sessions} sessions "
              f"({'CUDA graphs, torch.compile' if scheduler.pool.compiled else 'CUDA graphs'})...", flush=True)
        widths = scheduler.pool.warm_up()
        print(f"yarnkit serve: decode step ready for batches of {', '.join(map(str, widths))} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    names = [str(args.ckpt).rstrip("/") or str(args.ckpt), *args.model_name]  # what the user typed, as clients send it
    defaults = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    return Service(scheduler, tokenizer, names, defaults, args.max_prompt_tokens, args.max_tokens_limit)


def server_libraries() -> None:
    """fastapi and uvicorn import, or one line before any model loads (a broken install: fastapi 0.165 also needs
    opentelemetry-api and annotated-doc, which a `--no-deps` install leaves out)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UserError(f"yarnkit serve cannot start: {error}", "pip install -U fastapi uvicorn (with their "
                        "dependencies)") from None


def run(args) -> int:
    server_libraries()
    import uvicorn

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.max_sessions < 1 or args.max_prompt_tokens < 1 or args.max_tokens_limit < 1:
        raise BadValue("--max-sessions, --max-prompt-tokens and --max-tokens-limit must be >= 1", "raise the one below 1")
    check_stream_arguments(args)
    loaded = load_for_cli(args)
    if loaded is None:
        return 130
    model, tokenizer = loaded
    service = build_service(args, model, tokenizer)  # bad options raise BadValue: yarnkit/cli.py prints it
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use the model "
              f"(pass --api-key or set {API_KEY_ENV})", file=sys.stderr)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        raise BadValue(f"cannot listen on {args.host}:{args.port}: {error.strerror}", "pick another --port") from None
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=2))
    print(f"serving {', '.join(service.model_names)} on http://{host}:{port}/v1", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        service.scheduler.close()
        sock.close()
    return 0
