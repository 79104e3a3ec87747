"""The ASGI app of `serve_cloud` (Starlette): routes, limits, and the OpenAI response schema.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or server-sent events with
`stream=true`), `GET /v1/models`, `GET /health` (the same without `/v1` too). Errors use OpenAI's
body, `{"error": {"message", "type", "param", "code"}}`: 400 for a field this server refuses or
cannot satisfy (the message names it), 401 for a missing or wrong API key, 404 for an unknown
route or model, 408 for a body not received in time or a request over its time limit, 413 for a
body over the limit, 503 when the queue is full.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from floe_jax.config import ConfigError
from floe_jax.inference.server.choice import Choice, Sampling, Tokens
from floe_jax.inference.server.engine import Engine
from floe_jax.inference.server.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    describe,
    refused,
)

_DRAIN_LIMIT = 64 << 20  # bodies up to this are read to the end before a 413 (no reset)
_LONG_TEXT = 16384  # prompts longer than this (characters) are tokenized off the event loop


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What `serve_cloud` serves and its limits.

    Attributes:
      model_name: the one `model` accepted (others are a 404).
      max_logprobs: the most top log-probs a request may ask for.
      max_tokens_limit: the most new tokens a request may ask for.
      default_max_tokens: new tokens when a request names none (capped by the context).
      api_key: when set, every route but `/health` needs `Authorization: Bearer <api_key>`.
      max_body_bytes: larger request bodies are a 413.
      header_timeout_s: a connection that has not sent a request's headers by then is closed.
      body_timeout_s: a body not received by then is a 408.
      request_timeout_s: a request not finished by then is cancelled (a 408).
      keep_alive_s: idle keep-alive connections are closed after this.
      max_connections: concurrent connections and requests (more get a 503).
      backlog: the listen backlog.
      max_batch: rows the engine prefills or decodes in one call.
      max_queue: requests waiting for the engine before new ones get a 503.
    """

    model_name: str = "floe-cloud"
    max_logprobs: int = 20
    max_tokens_limit: int = 1024
    default_max_tokens: int = 16
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    request_timeout_s: float = 120.0
    keep_alive_s: float = 5.0
    max_connections: int = 1024
    backlog: int = 2048
    max_batch: int = 32
    max_queue: int = 4096

    def __post_init__(self):
        for name in ("max_logprobs",):
            if getattr(self, name) < 0:
                raise ConfigError(f"ServeConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_tokens_limit", "default_max_tokens", "max_body_bytes",
                     "max_connections", "backlog", "max_batch", "max_queue"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "request_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ServeConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.model_name:
            raise ConfigError("ServeConfig.model_name must not be empty")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> Response:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status)
        kind = kind or ("server_error" if self.status >= 500 else "invalid_request_error")
        body = {"message": self.message, "type": kind, "param": self.param,
                "code": self.code or self.status}  # fmt: skip
        headers = dict(self.headers)
        if self.status in (408, 413):
            headers["Connection"] = "close"
        return _json({"error": body}, self.status, headers)


def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj), status, headers, media_type="application/json")


class _Waiter:
    """Collects the choices of one request on the event loop: `changed` is set whenever a
    choice has news, `left` counts the choices still running."""

    def __init__(self, n: int):
        self.changed, self.left = asyncio.Event(), n

    def notify(self, choice: Choice) -> None:
        if choice.finish is not None and not choice.counted:
            choice.counted = True
            self.left -= 1
        self.changed.set()


class CloudApp:
    """The request logic: validation, the engine, and OpenAI-shaped answers."""

    def __init__(self, engine: Engine, tokens: Tokens, config: ServeConfig):
        self.engine, self.tok, self.cfg = engine, tokens, config
        self.created = int(time.time())

    # ------------------------------------------------------------------ request parsing
    def _auth(self, request: Request) -> None:
        key = self.cfg.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "missing or incorrect API key (Authorization: Bearer <key>)",
                           code="invalid_api_key")  # fmt: skip

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > _DRAIN_LIMIT:
            raise ApiError(413, f"request body of {declared} bytes is over {limit} bytes")
        chunks, size = [], 0

        async def pull():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > _DRAIN_LIMIT:
                    break

        try:
            await asyncio.wait_for(pull(), self.cfg.body_timeout_s)
        except TimeoutError:
            raise ApiError(
                408, f"request body not received within {self.cfg.body_timeout_s}s"
            ) from None
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes is over {limit} bytes")
        return b"".join(chunks)

    async def _parse(self, request: Request, model):
        self._auth(request)
        raw = await self._body(request)
        try:
            req = model.model_validate_json(raw or b"null")
        except ValidationError as e:
            msg, param = describe(e)
            raise ApiError(400, msg, param=param) from None
        if req.model != self.cfg.model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist (this server serves "
                           f"`{self.cfg.model_name}`)", param="model",
                           code="model_not_found")  # fmt: skip
        why = refused(req)
        if why:
            raise ApiError(400, why, param=why.split()[0])
        return req

    async def _encode(self, text: str) -> list[int]:
        if len(text) > _LONG_TEXT:
            return await asyncio.to_thread(self.tok.encode, text)
        return self.tok.encode(text)

    def _sampling(self, req, prompts: list[list[int]], top_logprobs: int | None) -> Sampling:
        ctx = self.engine.context
        longest = max(len(p) for p in prompts)
        max_tokens = req.max_tokens
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        if max_tokens is not None and max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be <= {self.cfg.max_tokens_limit}, got "
                           f"{max_tokens}", param="max_tokens")  # fmt: skip
        if max_tokens is None:
            max_tokens = max(1, min(self.cfg.default_max_tokens, ctx - longest))
        if longest + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the "
                           f"prompt has {longest} tokens and max_tokens is {max_tokens}",
                           param="prompt", code="context_length_exceeded")  # fmt: skip
        if top_logprobs is not None and top_logprobs > self.cfg.max_logprobs:
            name = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
            raise ApiError(400, f"{name} must be <= {self.cfg.max_logprobs}, got {top_logprobs}",
                           param=name)  # fmt: skip
        return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                        seed=req.seed, top_logprobs=top_logprobs,
                        stops=tuple(req.stops))  # fmt: skip

    async def _prompt_ids(self, prompts) -> list[list[int]]:
        out = []
        V = self.engine.cfg.vocab_size
        for i, p in enumerate(prompts):
            ids = list(p) if isinstance(p, list) else await self._encode(p)
            if not ids:
                raise ApiError(400, f"prompt {i} is empty (no tokens)", param="prompt")
            if min(ids) < 0 or max(ids) >= V:
                raise ApiError(400, f"prompt {i} has a token id outside [0, {V})", param="prompt")
            out.append(ids)
        return out

    def _start(self, prompts: list[list[int]], n: int, sampling: Sampling, stream: bool):
        loop = asyncio.get_running_loop()
        waiter = _Waiter(len(prompts) * n)
        choices = [
            Choice(
                p,
                sampling,
                self.tok,
                index=i * n + j,
                loop=loop,
                notify=waiter.notify,
                stream=stream,
            )  # fmt: skip
            for i, p in enumerate(prompts)
            for j in range(n)
        ]
        for k, c in enumerate(choices):
            if not self.engine.submit(c):
                for c2 in choices[:k]:
                    c2.cancelled = True
                raise ApiError(503, "the server is busy; retry later", headers={"Retry-After": "1"})
        return choices, waiter

    async def _finish(self, choices: list[Choice], waiter: _Waiter, deadline: float) -> None:
        try:
            while waiter.left:
                waiter.changed.clear()
                await asyncio.wait_for(waiter.changed.wait(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            raise ApiError(
                408, f"request not finished within {self.cfg.request_timeout_s}s"
            ) from None
        finally:
            for c in choices:
                c.cancelled = c.finish is None
        for c in choices:
            if c.finish == "error":
                raise ApiError(500, f"model error: {c.error}")

    # ------------------------------------------------------------------ answers
    def _token(self, i: int, as_ids: bool) -> str:
        return f"token_id:{i}" if as_ids else self.tok.text(i)

    def _completion_logprobs(self, c: Choice, lo: int, hi: int, as_ids: bool, offset: int):
        toks = [self._token(t, as_ids) for t in c.ids[lo:hi]]
        offs, pos = [], offset
        for t in c.ids[lo:hi]:
            offs.append(pos)
            pos += len(self.tok.text(t))
        tops = None
        if c.s.top_logprobs:
            tops = []
            for ids, lps in zip(c.tops[lo:hi], c.top_lps[lo:hi], strict=True):
                d: dict[str, float] = {}
                for i, lp in zip(ids, lps, strict=True):
                    d.setdefault(self._token(i, as_ids), lp)  # a repeated string keeps the likelier
                tops.append(d)
        return {"tokens": toks, "token_logprobs": c.logprobs[lo:hi], "top_logprobs": tops,
                "text_offset": offs}  # fmt: skip

    def _chat_logprobs(self, c: Choice, lo: int, hi: int, as_ids: bool):
        def entry(i, lp):
            return {"token": self._token(i, as_ids), "logprob": lp, "bytes": self.tok.bytes(i)}

        content = []
        for j in range(lo, hi):
            e = entry(c.ids[j], c.logprobs[j])
            e["top_logprobs"] = [entry(i, lp) for i, lp in zip(c.tops[j], c.top_lps[j],
                                                                strict=True)]  # fmt: skip
            content.append(e)
        return {"content": content}

    @staticmethod
    def _usage(prompts, choices) -> dict:
        p = sum(len(x) for x in prompts)
        n = sum(len(c.ids) for c in choices)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def _head(self, kind: str) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self.cfg.model_name}  # fmt: skip

    def _events(self, c: Choice, chat: bool, as_ids: bool):
        """The stream rows of `c` since the last call (engine thread writes, this reads)."""
        if c.closed:
            return
        done = c.finish is not None  # once finished, nothing changes any more
        hi = min(len(c.top_lps) if c.s.top_logprobs else len(c.ids), len(c.logprobs), len(c.ids))
        text = c.stream_text()
        if hi == c.sent and not text and not done:
            return
        if done and c.finish == "error":
            c.closed = True
            yield {"error": {"message": f"model error: {c.error}", "type": "server_error",
                             "code": 500}}  # fmt: skip
            return
        lo, c.sent = c.sent, hi
        lp = None
        if c.s.top_logprobs is not None:
            if chat:
                lp = self._chat_logprobs(c, lo, hi, as_ids)
            else:
                lp = self._completion_logprobs(c, lo, hi, as_ids, c.offset)
                c.offset = (
                    lp["text_offset"][-1] + len(self.tok.text(c.ids[hi - 1]))
                    if hi > lo
                    else c.offset
                )
        finish = None
        if done:
            c.closed = True
            finish = "stop" if c.finish in ("stop", "abort") else c.finish
        row = {"index": c.index, "logprobs": lp, "finish_reason": finish}
        row.update({"delta": {"content": text}} if chat else {"text": text})
        yield row

    async def _stream(self, choices, waiter, deadline, prompts, head, chat: bool, as_ids: bool,
                      usage: bool):  # fmt: skip
        def sse(body):
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                for c in choices:
                    row = {"index": c.index, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None}  # fmt: skip
                    yield sse({**head, "choices": [row]})
            while True:
                waiter.changed.clear()
                for c in choices:
                    for row in self._events(c, chat, as_ids):
                        yield sse(row if "error" in row else {**head, "choices": [row]})
                if all(c.closed for c in choices):
                    break
                try:
                    left = max(deadline - time.monotonic(), 0)
                    await asyncio.wait_for(waiter.changed.wait(), left)
                except TimeoutError:
                    msg = f"request not finished within {self.cfg.request_timeout_s}s"
                    yield sse({"error": {"message": msg, "type": "invalid_request_error",
                                         "code": 408}})  # fmt: skip
                    break
            if usage:
                yield sse({**head, "choices": [], "usage": self._usage(prompts, choices)})
            yield "data: [DONE]\n\n"
        finally:
            for c in choices:
                c.cancelled = c.finish is None

    async def _run(self, req, prompts, top_logprobs, chat: bool) -> Response:
        sampling = self._sampling(req, prompts, top_logprobs)
        choices, waiter = self._start(prompts, req.n, sampling, req.stream)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        as_ids = req.return_tokens_as_token_ids
        head = self._head("chat.completion.chunk" if chat else "text_completion")
        if req.stream:
            gen = self._stream(choices, waiter, deadline, prompts, head, chat, as_ids,
                               req.include_usage)  # fmt: skip
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        await self._finish(choices, waiter, deadline)
        rows = []
        for c in choices:
            finish = "stop" if c.finish in ("stop", "abort") else c.finish
            row = {"index": c.index, "finish_reason": finish, "logprobs": None}
            if c.s.top_logprobs is not None:
                row["logprobs"] = (
                    self._chat_logprobs(c, 0, len(c.ids), as_ids)
                    if chat
                    else self._completion_logprobs(c, 0, len(c.ids), as_ids, 0)
                )
            if chat:
                row["message"] = {"role": "assistant", "content": c.text}
            else:
                row["text"] = c.text
            rows.append(row)
        head = self._head("chat.completion" if chat else "text_completion")
        return _json({**head, "choices": rows, "usage": self._usage(prompts, choices)})

    # ------------------------------------------------------------------ routes
    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, CompletionRequest)
        prompts = await self._prompt_ids(req.prompts())
        return await self._run(req, prompts, req.logprobs, chat=False)

    async def chat(self, request: Request) -> Response:
        req = await self._parse(request, ChatCompletionRequest)
        if not self.tok.chat_template:
            raise ApiError(400, "messages: this model's tokenizer has no chat template; use "
                           "/v1/completions", param="messages")  # fmt: skip
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tok.render_chat(
                msgs,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
            )
        except Exception as e:  # noqa: BLE001  (a template that rejects the conversation)
            raise ApiError(
                400, f"messages: the chat template failed: {e}", param="messages"
            ) from None
        prompts = await self._prompt_ids([text])
        k = (req.top_logprobs or 0) if req.logprobs else None
        return await self._run(req, prompts, k, chat=True)

    async def models(self, request: Request) -> Response:
        self._auth(request)
        card = {"id": self.cfg.model_name, "object": "model", "created": self.created,
                "owned_by": "floe_jax", "max_model_len": self.engine.context}  # fmt: skip
        return _json({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        if not self.engine.running:
            return _json({"status": "engine stopped"}, 503)
        return _json({"status": "ok"})


def build_app(cloud: CloudApp) -> Starlette:
    """The Starlette app: routes with and without `/v1`, errors in OpenAI's body."""

    def guarded(fn):
        async def route(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as e:
                return e.response()

        return route

    routes = []
    for prefix in ("/v1", ""):
        routes += [
            Route(prefix + "/completions", guarded(cloud.completions), methods=["POST"]),
            Route(prefix + "/chat/completions", guarded(cloud.chat), methods=["POST"]),
            Route(prefix + "/models", guarded(cloud.models), methods=["GET"]),
        ]
    routes.append(Route("/health", cloud.health, methods=["GET"]))

    async def not_found(request, exc):
        code = getattr(exc, "status_code", 404)
        msg = f"no route {request.method} {request.url.path}"
        return ApiError(code if code in (404, 405) else 404, msg).response()

    async def crashed(request, exc):
        return ApiError(500, f"{type(exc).__name__}: {exc}").response()

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found,
                                                        Exception: crashed})  # fmt: skip
