"""The OpenAI API surface of `yarnkit serve`: pydantic request models, validation, errors and usage.

What it is: `Service` turns a validated request body into scheduler `Job`s (model name, sampling limits, stop
strings, `n`, refused parameters, the prompt pre-check), `ApiError` / `error_body` give OpenAI-style errors
(`{"error": {"message", "type", "param", "code"}}`) that name the field, and `usage` counts tokens the OpenAI
way. What it is not: HTTP (serve.py) or scheduling (scheduler.py).

Test: `python -m pytest tests/test_runtime_serve.py -q`.
"""

import json
from typing import Literal

from yarnkit.runtime.admission import Job
from yarnkit.runtime.conversation import Sampling, normalize_messages
from yarnkit.runtime.options import SEED_RANGE
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
    """pydantic request models (built on first use so `yarnkit --help` stays fast). Unknown keys are refused (400
    naming the key), never ignored; parameters this server cannot honour are accepted only at their no-op values
    (`NO_OP`)."""
    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="forbid")
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart] | None = None
        name: str | None = None              # no-op only: the chat template has no place for it
        tool_calls: list | None = None       # no-op only: this server runs no tools
        tool_call_id: str | None = None      # a tool message's reference; its content is what the model reads
        refusal: str | None = None           # an assistant message's refusal text; no-op only

    class IncludeUsage(BaseModel):
        model_config = ConfigDict(extra="forbid")
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0.0, le=2.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        n: int = Field(1, ge=1)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: IncludeUsage | None = None
        seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
        user: str | None = None
        session_id: str | None = None
        # accepted only at their no-op values (anything else is refused, never silently ignored)
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        repetition_penalty: float | None = None
        top_k: int | None = None
        min_p: float | None = None
        logit_bias: dict | None = None
        logprobs: bool | int | None = None
        top_logprobs: int | None = None
        tools: list | None = None
        functions: list | None = None
        tool_choice: str | dict | None = None
        function_call: str | dict | None = None
        parallel_tool_calls: bool | None = None
        response_format: dict | None = None
        reasoning_effort: str | None = None
        store: bool | None = None
        metadata: dict | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    class CompletionRequest(Common):
        prompt: str | list[str]
        echo: bool = False
        suffix: str | None = None
        best_of: int | None = None

    return ChatRequest, CompletionRequest


# parameter -> the values that ask for nothing this server would have to do (anything else gets a 400)
NO_OP = {"presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0), "repetition_penalty": (None, 1.0),
         "top_k": (None, 0, -1), "min_p": (None, 0.0), "logit_bias": (None, {}), "logprobs": (None, False, 0),
         "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
         "function_call": (None, "none"), "parallel_tool_calls": (None, True, False), "reasoning_effort": (None,),
         "store": (None, False), "metadata": (None, {}), "echo": (False,), "suffix": (None,), "best_of": (None, 1),
         "response_format": (None, {"type": "text"})}
MESSAGE_NO_OP = {"name": (None,), "tool_calls": (None, []), "refusal": (None,)}


def _is_no_op(value, allowed: tuple) -> bool:
    """`value` is one of `allowed` (False is not 0, as JSON has both)."""
    if value is None:
        return None in allowed
    return any(ok is not None and value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in allowed)


def check_unsupported(body) -> None:
    for name, allowed in NO_OP.items():
        if name not in type(body).model_fields:  # echo, suffix, best_of: completions only
            continue
        value = getattr(body, name)
        if not _is_no_op(value, allowed):
            shown = ", ".join("null" if ok is None else json.dumps(ok) for ok in allowed)
            raise ApiError(400, f"{name}: not supported by this server (accepted only as {shown}; it is refused, "
                                "not ignored)", name, "unsupported_parameter")
    for i, message in enumerate(getattr(body, "messages", None) or []):
        for name, allowed in MESSAGE_NO_OP.items():
            if not _is_no_op(getattr(message, name), allowed):
                raise ApiError(400, f"messages[{i}].{name}: not supported by this server", f"messages[{i}].{name}",
                               "unsupported_parameter")


def check_text(text: str, field: str) -> None:
    """JSON may carry lone UTF-16 surrogates (\\ud800), which are no text a tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ApiError(400, f"{field}: not valid Unicode text (a lone surrogate at character {error.start})",
                       field) from None


class Service:
    """The request logic between HTTP and the scheduler: validation, limits, jobs, OpenAI-shaped answers."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str | list[str], defaults: Sampling,
                 max_prompt_tokens: int = 65536, max_tokens_limit: int = 4096):
        """`model_name`: the id clients send, or several (the first is the one `GET /v1/models` lists first)."""
        self.model_names = [model_name] if isinstance(model_name, str) else list(dict.fromkeys(model_name))
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, self.model_names[0]
        self.defaults, self.max_prompt_tokens, self.max_tokens_limit = defaults, max_prompt_tokens, max_tokens_limit

    def render(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"

    def sampling(self, body, max_tokens: int | None, max_field: str = "max_tokens") -> Sampling:
        if body.model not in self.model_names:
            served = ", ".join(repr(name) for name in self.model_names)
            raise ApiError(404, f"model: unknown model {body.model!r}; this server serves {served} "
                                "(GET /v1/models)", "model", "model_not_found")
        check_unsupported(body)
        limit = max_tokens or self.defaults.max_new_tokens
        if limit > self.max_tokens_limit:
            raise ApiError(400, f"{max_field}: {limit} is above this server's limit of {self.max_tokens_limit} "
                                "(--max-tokens-limit)", max_field)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: give at most 4 non-empty strings", "stop")
        for text in stop:
            check_text(text, "stop")
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
        sampling = self.sampling(body, body.max_completion_tokens or body.max_tokens,
                                 "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        try:
            messages = normalize_messages([m.model_dump(include={"role", "content"}) for m in body.messages])
        except ValueError as error:
            raise ApiError(400, str(error), str(error).split(":")[0].split(" ")[0]) from None
        for i, message in enumerate(messages):
            check_text(message["content"], f"messages[{i}].content")
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
            check_text(prompt, "prompt")
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
