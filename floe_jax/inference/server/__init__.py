"""`serve_cloud`: a floe_jax model as an OpenAI-compatible cloud (Starlette on uvicorn).

The server speaks the OpenAI schema (`floe_jax.inference.server.app`): completions and chat
completions with log-probs, server-sent-event streaming, `stop`, `n`, `top_p`, `seed`, `usage`,
`finish_reason`; requests it cannot serve faithfully are refused with a 400 naming the field
(`schema`). Concurrent requests are batched onto the model, joining the running batch between
decode steps (`engine`); `warm_up=True` compiles its shapes at start. Limits protect it from
bad traffic: a body size limit (413), header, body and request time limits (connection closed,
408), a connection limit (503), a listen backlog, and an optional API key (401).

    with serve_cloud(params, cfg, tokenizer) as srv:       # a loopback port picked for you
        client = HTTPCloud(srv.url, edge_tokenizer=tokenizer)
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from floe_jax.config import ModelConfig
from floe_jax.inference.server.app import CloudApp, build_app
from floe_jax.inference.server.choice import Tokens
from floe_jax.inference.server.config import ServeConfig
from floe_jax.inference.server.engine import Engine, WarmUp
from floe_jax.lora import LoRA

__all__ = ["ServeConfig", "ServerHandle", "serve_cloud"]


def _protocol(header_timeout_s: float):
    """uvicorn's httptools protocol with a header deadline: a connection that opens and sends
    nothing, or sends part of a request's headers, is answered 408 and closed (uvicorn only
    times out idle keep-alive connections between requests)."""

    class Protocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")  # fmt: skip
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


@dataclasses.dataclass(eq=False)
class ServerHandle:
    """A running `serve_cloud`: `url` (e.g. `http://127.0.0.1:54321`), `close()`, and a context
    manager that closes on exit. `engine` and `app` are there to read their stats."""

    url: str
    server: uvicorn.Server
    engine: Engine
    app: CloudApp
    thread: threading.Thread | None = None

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the server and its thread (bounded: open connections are dropped after
        `timeout_s`), then the engine."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(timeout_s)
        self.engine.close(timeout_s)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_cloud(
    params: dict,
    cfg: ModelConfig,
    tokenizer,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    block: bool = False,
    lora: LoRA | None = None,
    config: ServeConfig | None = None,
    eos_ids: tuple[int, ...] | None = None,
    log_level: str = "warning",
    on_prompt: Callable[[str], None] | None = None,
    **overrides,
) -> ServerHandle:
    """Serves a floe_jax model and its tokenizer as an OpenAI-compatible server.

    Args:
      params, cfg, lora: the model (adapters optional); `cfg.max_position_embeddings` is the
        context a prompt plus `max_tokens` must fit.
      tokenizer: a `tokenizers.Tokenizer` or a Hugging Face tokenizer (chat needs one with a
        chat template).
      host, port: where to listen; `port=0` picks a free port (read `handle.url`).
      block: serve on this thread until interrupted (then close and return the handle); False
        serves on a daemon thread and returns once the server accepts connections.
      config: names, limits and batching (`ServeConfig`); `overrides` replace its fields, e.g.
        `serve_cloud(..., model_name="tiny", api_key="k")`.
      eos_ids: ids that end a choice (default: `cfg.eos_token_id` and the tokenizer's).
      on_prompt: called with the text of every prompt the server accepts (completions prompts,
        token ids decoded; a chat conversation as its template renders it), before the model
        sees it: an audit hook, e.g. a recorder of what reached the cloud.
    """
    config = dataclasses.replace(config or ServeConfig(), **overrides)
    if eos_ids is None:
        eos_ids = (cfg.eos_token_id, getattr(tokenizer, "eos_token_id", None))
    tokens = Tokens(tokenizer, cfg.vocab_size, eos_ids)
    warm_up = None
    if config.warm_up:
        warm_up = WarmUp(max_prompt=config.warm_up_prompt_tokens,
                         max_tokens=config.default_max_tokens)  # fmt: skip
    engine = Engine(params, cfg, lora=lora, max_batch=config.max_batch,
                    max_queue=config.max_queue, warm_up=warm_up,
                    memo_bytes=config.memo_mib << 20)  # fmt: skip
    cloud = CloudApp(engine, tokens, config, on_prompt=on_prompt)
    uv = uvicorn.Config(
        build_app(cloud), http=_protocol(config.header_timeout_s), loop="auto",
        lifespan="off", log_level=log_level, access_log=False,
        timeout_keep_alive=config.keep_alive_s, limit_concurrency=config.max_connections,
        backlog=config.backlog, timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = uvicorn.Server(uv)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(config.backlog)
    except OSError:
        sock.close()
        engine.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    handle = ServerHandle(url=f"http://{shown}:{bound}", server=server, engine=engine, app=cloud)
    if block:
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            engine.close()
        return handle
    handle.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                     name="serve-cloud", daemon=True)  # fmt: skip
    handle.thread.start()
    t0 = time.monotonic()
    while not server.started and handle.thread.is_alive() and time.monotonic() - t0 < 30:
        time.sleep(0.005)
    if not server.started:
        handle.close()
        raise RuntimeError(f"serve_cloud did not start on {handle.url}")
    return handle
