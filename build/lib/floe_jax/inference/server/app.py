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
import hmac
import json
import time

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from floe_jax.inference.server.answers import AnswerRows
from floe_jax.inference.server.choice import Choice, Sampling, Tokens
from floe_jax.inference.server.config import ServeConfig
from floe_jax.inference.server.engine import Engine
from floe_jax.inference.server.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    describe,
    refused,
)

_DRAIN_LIMIT = 64 << 20  # bodies up to this are read to the end before a 413 (no reset)
_LONG_TEXT = 16384  # a request's prompts of more characters are tokenized off the event loop


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
    choice has news, `left` counts the choices still running; `done()` is called once per
    finished choice (the client's count of choices in flight)."""

    def __init__(self, n: int, done=lambda: None):
        self.changed, self.left, self.done = asyncio.Event(), n, done

    def notify(self, choice: Choice) -> None:
        if choice.finish is not None and not choice.counted:
            choice.counted = True
            self.left -= 1
            self.done()
        self.changed.set()


class _TimedStream(StreamingResponse):
    """Server-sent events whose every send must be taken within `send_timeout_s`: a client
    that stops reading ends its stream (the connection is closed, its choices cancelled)."""

    def __init__(self, content, send_timeout_s: float, **kw):
        super().__init__(content, **kw)
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send) -> None:
        async def timed(message):
            await asyncio.wait_for(send(message), self.send_timeout_s)

        try:
            await super().stream_response(timed)
        except TimeoutError:
            await self.body_iterator.aclose()  # its `finally` cancels the choices
            raise OSError(f"client took no data for {self.send_timeout_s}s") from None


class CloudApp(AnswerRows):
    """The request logic: validation, the engine, and OpenAI-shaped answers."""

    def __init__(self, engine: Engine, tokens: Tokens, config: ServeConfig, *, on_prompt=None):
        self.engine, self.tok, self.cfg, self.on_prompt = engine, tokens, config, on_prompt
        self.created = int(time.time())
        self.live: dict[str, int] = {}  # client host -> choices in flight

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
        # a declared length is drained (up to _DRAIN_LIMIT) so its client reads the 413 instead
        # of a reset; a chunked body of unknown length is read no further than twice the limit
        drain = _DRAIN_LIMIT if declared is not None else min(2 * limit, _DRAIN_LIMIT)
        chunks, size = [], 0

        async def pull():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > drain:
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

    def _sampling(self, req, prompts: list[list[int]], top_logprobs: int | None,
                  prompt_k: int | None = None) -> Sampling:  # fmt: skip
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
        for name, k in (("prompt_logprobs", prompt_k), ("logprobs", top_logprobs)):
            if k is not None and k > self.cfg.max_logprobs:
                if name == "logprobs" and isinstance(req, ChatCompletionRequest):
                    name = "top_logprobs"
                raise ApiError(400, f"{name} must be <= {self.cfg.max_logprobs}, got {k}",
                               param=name)  # fmt: skip
        return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                        seed=req.seed, top_logprobs=top_logprobs,
                        stops=tuple(req.stops), prompt_logprobs=prompt_k)  # fmt: skip

    async def _prompt_ids(self, prompts, n: int = 1) -> list[list[int]]:
        if len(prompts) * n > self.cfg.max_choices:
            raise ApiError(400, f"{len(prompts)} prompts x n={n} is over the {self.cfg.max_choices}"
                           " choices one request may ask for", param="n")  # fmt: skip
        chars = sum(len(p) for p in prompts if isinstance(p, str))

        def encode_all():
            return [list(p) if isinstance(p, list) else self.tok.encode(p) for p in prompts]

        # many short prompts add up: what is off the event loop is decided by the total
        encoded = await asyncio.to_thread(encode_all) if chars > _LONG_TEXT else encode_all()
        out = []
        V = self.engine.cfg.vocab_size
        for i, ids in enumerate(encoded):
            if not ids:
                raise ApiError(400, f"prompt {i} is empty (no tokens)", param="prompt")
            if min(ids) < 0 or max(ids) >= V:
                raise ApiError(400, f"prompt {i} has a token id outside [0, {V})", param="prompt")
            out.append(ids)
        if self.on_prompt is not None:
            for p, ids in zip(prompts, out, strict=True):
                self.on_prompt(p if isinstance(p, str) else self.tok.decode(ids))
        return out

    def _start(self, prompts: list[list[int]], n: int, sampling: Sampling, stream: bool,
               host: str = ""):  # fmt: skip
        loop = asyncio.get_running_loop()
        total = len(prompts) * n
        if self.live.get(host, 0) + total > self.cfg.max_client_choices:
            raise ApiError(429, f"this client has {self.live.get(host, 0)} choices in flight; "
                           f"at most {self.cfg.max_client_choices}", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})  # fmt: skip
        self.live[host] = self.live.get(host, 0) + total

        def done():
            self.live[host] -= 1
            if not self.live[host]:
                del self.live[host]

        waiter = _Waiter(total, done)
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
                for _ in choices[k:]:  # never submitted: never finish
                    done()
                raise ApiError(503, "the server is busy; retry later", headers={"Retry-After": "1"})
        return choices, waiter

    async def _finish(self, choices: list[Choice], waiter: _Waiter, deadline: float,
                      request: Request | None = None) -> None:  # fmt: skip
        try:
            while waiter.left:
                waiter.changed.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                try:
                    await asyncio.wait_for(waiter.changed.wait(), min(left, self.cfg.poll_s))
                except TimeoutError:
                    if request is not None and await request.is_disconnected():
                        raise ApiError(499, "the client went away") from None
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

    async def _run(self, req, prompts, top_logprobs, chat: bool, request: Request,
                   prompt_k: int | None = None) -> Response:  # fmt: skip
        sampling = self._sampling(req, prompts, top_logprobs, prompt_k)
        host = request.client.host if request.client else ""
        choices, waiter = self._start(prompts, req.n, sampling, req.stream, host)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        as_ids = req.return_tokens_as_token_ids
        head = self._head("chat.completion.chunk" if chat else "text_completion")
        if req.stream:
            gen = self._stream(choices, waiter, deadline, prompts, head, chat, as_ids,
                               req.include_usage)  # fmt: skip
            return _TimedStream(gen, self.cfg.send_timeout_s, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache"})  # fmt: skip
        await self._finish(choices, waiter, deadline, request)
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
            elif req.echo:
                row["text"] = self.tok.decode(c.prompt) + c.text
                if c.s.top_logprobs is not None:
                    row["logprobs"] = self._echo_logprobs(c, as_ids)
            else:
                row["text"] = c.text
            if not chat and req.prompt_logprobs is not None:
                row["prompt_logprobs"] = self._prompt_logprobs(c, req.prompt_logprobs)
            rows.append(row)
        head = self._head("chat.completion" if chat else "text_completion")
        return _json({**head, "choices": rows, "usage": self._usage(prompts, choices)})

    # ------------------------------------------------------------------ routes
    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, CompletionRequest)
        prompts = await self._prompt_ids(req.prompts(), req.n)
        prompt_k = req.logprobs if req.echo else None
        if req.prompt_logprobs is not None:
            prompt_k = max(prompt_k or 0, req.prompt_logprobs)
        return await self._run(req, prompts, req.logprobs, chat=False, request=request,
                               prompt_k=prompt_k)  # fmt: skip

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
        prompts = await self._prompt_ids([text], req.n)
        k = (req.top_logprobs or 0) if req.logprobs else None
        return await self._run(req, prompts, k, chat=True, request=request)

    async def models(self, request: Request) -> Response:
        self._auth(request)
        card = {"id": self.cfg.model_name, "object": "model", "created": self.created,
                "owned_by": "floe_jax", "max_model_len": self.engine.context}  # fmt: skip
        return _json({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        if not self.engine.running:
            return _json({"status": "engine stopped"}, 503)
        if self.engine.warming:  # not ready: requests wait for the warm-up's compiles
            shapes = self.engine.stats["warm_up_shapes"]
            return _json({"status": "warming up", "compiled_shapes": shapes}, 503,
                         headers={"Retry-After": "1"})  # fmt: skip
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
