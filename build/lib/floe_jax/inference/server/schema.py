"""Typed request bodies of the OpenAI schema as `serve_cloud` accepts them (pydantic).

Every field of OpenAI's completions and chat completions requests is either implemented or
refused with a 400 that names it: unknown fields are refused (`extra="forbid"`), and known fields
this server does not implement are refused unless they hold their neutral value (`refused`).
vLLM's extensions that `HTTPCloud` uses are implemented: `return_tokens_as_token_ids`,
`prompt_logprobs` (as is OpenAI's legacy `echo` with `logprobs`: the prompt's log-probs from
the request's one prefill, so a drafted continuation is scored in one request), and for chat
`add_generation_prompt` / `continue_final_message` (continue the last assistant message, so the
top log-probs are those of the next token of a partial reply).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None  # metadata: accepted, not used
    return_tokens_as_token_ids: bool = False
    # known, not implemented: refused unless neutral (see `refused`)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and set(v) - {"include_usage", "continuous_usage_stats"}:
            raise ValueError(f"unsupported stream_options keys {sorted(set(v))}")
        return v

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False  # the prompt, with its log-probs when `logprobs` is set (OpenAI legacy)
    prompt_logprobs: int | None = Field(default=None, ge=0)  # vLLM's
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # known, not implemented: refused unless neutral
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


_NEUTRAL = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
}


def refused(req: _Request) -> str | None:
    """The first known-but-unimplemented field set to a non-neutral value, with why."""
    for name, neutral in _NEUTRAL.items():
        if name in type(req).model_fields:
            v = getattr(req, name)
            if v != neutral and not (name == "logit_bias" and v == {}):
                return f"{name} is not supported by this server"
    if isinstance(req, CompletionRequest) and req.best_of not in (None, req.n):
        return "best_of is not supported by this server (only best_of = n)"
    if (
        isinstance(req, CompletionRequest)
        and req.stream
        and (req.echo or req.prompt_logprobs is not None)
    ):
        return "echo and prompt_logprobs are not supported with stream=true by this server"
    if isinstance(req, ChatCompletionRequest):
        rf = req.response_format
        if rf is not None and rf.get("type") != "text":
            return "response_format is not supported by this server (only type 'text')"
        if req.continue_final_message and req.add_generation_prompt:
            return "continue_final_message needs add_generation_prompt=false"
        if req.continue_final_message and req.messages[-1].role != "assistant":
            return "continue_final_message needs an assistant message last"
    return None


def describe(err: ValidationError) -> tuple[str, str | None]:
    """(message naming the field, the field) of a pydantic validation error."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e.get("loc", ()) if not str(x).startswith("function-"))
    param = str(e["loc"][0]) if e.get("loc") else None
    if e.get("type") == "extra_forbidden":
        return f"{loc}: unknown field (not part of the API this server implements)", param
    if e.get("type") == "missing":
        return f"{loc}: field required", param
    return f"{loc}: {e.get('msg', 'invalid')}", param
