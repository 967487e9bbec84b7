"""Serve a model over an OpenAI-compatible HTTP API, with one streaming (sinks + rolling window) cache per session.

  yarnkit serve                              # bundled SmolLM2-135M on http://127.0.0.1:8000
  yarnkit serve runs/yarn-64k --port 8080 --window 4092

Endpoints: `POST /v1/chat/completions` (OpenAI body; `stream: true` answers with server-sent events),
`GET /v1/models`, `GET /health`, `DELETE /v1/sessions/ID`. A session is named by the `X-Session-Id` header, the
body's `session_id`, or its `user` field (default: "default"). The client sends the whole history each time, as
with OpenAI; when it extends the session's history only the new text is fed, otherwise the session restarts.
A second request on a busy session gets 409; at most `--max-sessions` caches live (least recently used dropped).
Binds 127.0.0.1 unless `--host` says otherwise. Uses only the standard library's `http.server`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from yarnkit.runtime.chat import add_stream_arguments, build_conversation_factory

MAX_BODY = 16 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", nargs="?", default="smollm2-135m", help="run dir, HF dir, .gguf, or smollm2-135m")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    parser.add_argument("--max-sessions", type=int, default=8, help="conversation caches kept in memory")
    add_stream_arguments(parser)


class Sessions:
    """Session id -> Conversation, least recently used dropped beyond `limit` (idle sessions only)."""

    def __init__(self, new_conversation, limit: int):
        self.new_conversation, self.limit = new_conversation, limit
        self.items: OrderedDict = OrderedDict()
        self.guard = threading.Lock()

    def get(self, session_id: str):
        with self.guard:
            if session_id not in self.items:
                for old in [k for k, c in self.items.items() if not c.lock.locked()]:
                    if len(self.items) < self.limit:
                        break
                    del self.items[old]
                self.items[session_id] = self.new_conversation()
            self.items.move_to_end(session_id)
            return self.items[session_id]

    def drop(self, session_id: str) -> bool:
        with self.guard:
            return self.items.pop(session_id, None) is not None


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def make_server(new_conversation, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                max_sessions: int = 8, defaults: dict | None = None) -> ThreadingHTTPServer:
    sessions = Sessions(new_conversation, max_sessions)
    model_lock = threading.Lock()  # one forward at a time; streams of different sessions interleave per token
    defaults = defaults or {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one JSON line per request on stderr, no message contents
            print(json.dumps({"time": round(time.time(), 3), "request": fmt % args}), file=sys.stderr)

        def send_json(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_error_json(self, status: int, message: str) -> None:
            self.send_json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self):
            if self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "yarnkit"}]})
            elif self.path == "/health":
                self.send_json(200, {"status": "ok", "sessions": len(sessions.items)})
            else:
                self.send_error_json(404, f"no route GET {self.path}; try /v1/models")

        def do_DELETE(self):
            prefix = "/v1/sessions/"
            if self.path.startswith(prefix) and sessions.drop(self.path[len(prefix):]):
                self.send_json(200, {"deleted": self.path[len(prefix):]})
            else:
                self.send_error_json(404, f"no session at {self.path}")

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self.send_error_json(404, f"no route POST {self.path}; use /v1/chat/completions")
                return
            try:
                request = self.read_request()
                conversation = sessions.get(request["session"])
            except ApiError as error:
                self.send_error_json(error.status, str(error))
                return
            if not conversation.lock.acquire(blocking=False):
                self.send_error_json(409, f"session {request['session']!r} is busy with another request; retry "
                                          "when it finishes or use another session id")
                return
            try:
                self.answer(conversation, request)
            finally:
                conversation.lock.release()

        def read_request(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise ApiError(413, f"request body of {length} bytes exceeds {MAX_BODY}")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as error:
                raise ApiError(400, f"body is not valid JSON: {error}") from None
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ApiError(400, "body must be a JSON object with a 'messages' list")
            session = self.headers.get("X-Session-Id") or body.get("session_id") or body.get("user") or "default"
            return {"session": str(session), "messages": body["messages"], "stream": bool(body.get("stream")),
                    "max_new_tokens": int(body.get("max_completion_tokens") or body.get("max_tokens")
                                          or defaults.get("max_new_tokens", 256)),
                    "temperature": float(body.get("temperature", defaults.get("temperature", 0.0))),
                    "top_p": float(body.get("top_p", defaults.get("top_p", 1.0))), "seed": body.get("seed")}

        def answer(self, conversation, request: dict) -> None:
            pieces = conversation.respond(request["messages"], request["max_new_tokens"], request["temperature"],
                                          request["top_p"], request["seed"])
            ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            try:
                with model_lock:
                    first = next(pieces, None)  # validates the messages and prefills before any header
            except ValueError as error:
                self.send_error_json(400, str(error))
                return
            except Exception as error:  # noqa: BLE001 - answer 500 instead of dropping the connection
                self.send_error_json(500, f"{type(error).__name__}: {error}")
                return
            base = {"id": ident, "created": created, "model": model_name}
            if not request["stream"]:
                text = "" if first is None else first + "".join(self.locked(pieces, model_lock))
                info = conversation.last_info
                self.send_json(200, {**base, "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": text},
                    "finish_reason": info.get("finish_reason")}],
                    "usage": {"prompt_tokens": info.get("prompt_tokens"),
                              "completion_tokens": info.get("completion_tokens"),
                              "total_tokens": (info.get("prompt_tokens") or 0) + (info.get("completion_tokens") or 0)},
                    "yarnkit": conversation.stats()})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, finish=None) -> None:
                chunk = {**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            try:
                event({"role": "assistant", "content": ""})
                if first is not None:
                    event({"content": first})
                    for piece in self.locked(pieces, model_lock):
                        event({"content": piece})
                event({}, conversation.last_info.get("finish_reason"))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left: the generator's finally keeps the session's cache and history consistent
            finally:
                with model_lock:
                    pieces.close()

        @staticmethod
        def locked(pieces, lock):
            while True:
                with lock:
                    piece = next(pieces, None)
                if piece is None:
                    return
                yield piece

    return ThreadingHTTPServer((host, port), Handler)


def run(args) -> int:
    model, _, new_conversation = build_conversation_factory(args)
    name = str(getattr(model.config, "_name_or_path", "") or args.ckpt)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can use the model", file=sys.stderr)
    server = make_server(new_conversation, name, args.host, args.port, args.max_sessions,
                         {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p})
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
