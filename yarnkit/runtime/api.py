"""The OpenAI API surface of `yarnkit serve`: pydantic request models, validation, errors and usage.

What it is: `Service` turns a validated request body into scheduler `Job`s (model name, sampling limits, stop
strings, `n`, refused parameters, the prompt pre-check), `ApiError` / `error_body` give OpenAI-style errors
(`{"error": {"message", "type", "param", "code"}}`) that name the field, and `usage` counts tokens the OpenAI
way. What it is not: HTTP (serve.py) or scheduling (scheduler.py).

Test: `python -m pytest tests/test_runtime_serve.py -q`.
"""

from typing import Literal

from yarnkit.runtime.admission import Job
from yarnkit.runtime.conversation import Sampling, normalize_messages
from yarnkit.runtime.scheduler import Scheduler

MAX_BYTES_PER_TOKEN = 64  # bodies beyond 64 bytes per allowed token are refused before tokenizing


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status}}


def request_models():
    """pydantic request models (built on first use so `yarnkit --help` stays fast)."""
    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart] | None = None

    class IncludeUsage(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0.0, le=2.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        n: int = Field(1, ge=1)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: IncludeUsage | None = None
        seed: int | None = None
        user: str | None = None
        session_id: str | None = None
        # accepted only at their no-op values (anything else is refused, never silently ignored)
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: dict | None = None
        logprobs: bool | int | None = None
        tools: list | None = None
        functions: list | None = None
        response_format: dict | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    class CompletionRequest(Common):
        prompt: str | list[str]
        echo: bool = False
        suffix: str | None = None
        best_of: int | None = None

    return ChatRequest, CompletionRequest


UNSUPPORTED = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "logprobs": None, "tools": None,
               "functions": None, "echo": False, "suffix": None}


def check_unsupported(body) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = getattr(body, name, neutral)
        if not (value is None or value == neutral or value in ({}, [])):
            raise ApiError(400, f"{name}: not supported by this server", name, "unsupported_parameter")
    if getattr(body, "best_of", None) not in (None, 1):
        raise ApiError(400, "best_of: not supported by this server (use n)", "best_of", "unsupported_parameter")
    if body.response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only {'type': 'text'} is supported", "response_format",
                       "unsupported_parameter")


class Service:
    """The request logic between HTTP and the scheduler: validation, limits, jobs, OpenAI-shaped answers."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str, defaults: Sampling,
                 max_prompt_tokens: int = 65536, max_tokens_limit: int = 4096):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.defaults, self.max_prompt_tokens, self.max_tokens_limit = defaults, max_prompt_tokens, max_tokens_limit

    def render(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"

    def sampling(self, body, max_tokens: int | None) -> Sampling:
        if body.model != self.model_name:
            raise ApiError(404, f"model: unknown model {body.model!r}; this server serves {self.model_name!r} "
                                "(GET /v1/models)", "model", "model_not_found")
        check_unsupported(body)
        limit = max_tokens or self.defaults.max_new_tokens
        if limit > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens: {limit} is above this server's limit of {self.max_tokens_limit}",
                           "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: give at most 4 non-empty strings", "stop")
        if body.n > self.scheduler.rows:
            raise ApiError(400, f"n: at most {self.scheduler.rows} choices (--max-sessions)", "n")
        temperature = self.defaults.temperature if body.temperature is None else body.temperature
        top_p = self.defaults.top_p if body.top_p is None else body.top_p
        return Sampling(limit, temperature, top_p, body.seed, tuple(stop))

    def check_prompt(self, text: str, field: str) -> None:
        """A cheap pre-check; the exact token count is checked once, when the scheduler tokenizes the prompt."""
        if len(text.encode()) > MAX_BYTES_PER_TOKEN * self.max_prompt_tokens:
            raise ApiError(400, f"{field}: the prompt has {len(text.encode())} bytes, far more than this server's "
                                f"limit of {self.max_prompt_tokens} tokens (--max-prompt-tokens)", field,
                           "context_length_exceeded")

    def chat_jobs(self, body, session: str | None) -> list[Job]:
        sampling = self.sampling(body, body.max_completion_tokens or body.max_tokens)
        try:
            messages = normalize_messages([m.model_dump() for m in body.messages])
        except ValueError as error:
            raise ApiError(400, str(error), str(error).split(":")[0].split(" ")[0]) from None
        rendered = self.render(messages)
        self.check_prompt(rendered, "messages")
        if session is not None and body.n > 1:
            raise ApiError(400, "n: more than one choice needs a request without a session id", "n")
        return [Job(messages, None, sampling, body.n, session, rendered=rendered)]

    def completion_jobs(self, body, session: str | None) -> list[Job]:
        sampling = self.sampling(body, body.max_tokens or 16)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise ApiError(400, "prompt: give a non-empty string (or a list of them)", "prompt")
        if session is not None and (body.n > 1 or len(prompts) > 1):
            raise ApiError(400, "n: more than one choice needs a request without a session id", "n")
        if len(prompts) * body.n > self.scheduler.rows:
            raise ApiError(400, f"n: prompts x n must be at most {self.scheduler.rows} (--max-sessions)", "n")
        for prompt in prompts:
            self.check_prompt(prompt, "prompt")
        return [Job(None, prompt, sampling, body.n, session) for prompt in prompts]


def usage(done: dict, jobs: list[Job]) -> dict:
    """OpenAI usage: each prompt counted once (however many choices), completion tokens of every choice."""
    prompt, cached, index = 0, 0, 0
    for job in jobs:
        first = done.get(index, {})
        prompt += first.get("prompt_tokens", 0)
        cached += first.get("cached_tokens", 0)
        index += job.choices
    completion = sum(payload.get("completion_tokens", 0) for payload in done.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
