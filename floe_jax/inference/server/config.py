"""`ServeConfig`: what `serve_cloud` serves, its limits and its batching."""

from __future__ import annotations

import dataclasses

from floe_jax.config import ConfigError


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
      max_batch: live rows the engine prefills or decodes in one call (a batch that requests
        join between decode steps, `engine`).
      max_queue: requests waiting for the engine before new ones get a 503.
      max_choices: prompts x n of one request (more is a 400).
      max_client_choices: choices of one client (host) in flight at once (more is a 429).
      send_timeout_s: a streamed row not taken by the client by then ends the stream (a client
        that stops reading cannot hold its connection).
      warm_up: compile the engine's padded shapes (every batch bucket up to `max_batch`, every
        prompt bucket up to the one holding `warm_up_prompt_tokens`, answers of
        `default_max_tokens`) on its thread at start, so the first requests do not wait for
        compiles; `/health` answers 503 `warming up` meanwhile, and requests wait in the
        queue. Off by default (tests); on by default at the command line.
      warm_up_prompt_tokens: the warm-up compiles every prompt bucket up to the one that holds
        this many tokens.
      poll_s: how often a request waiting for its choices checks that its client is still there
        (a client that went away cancels its choices).
      memo_mib: MiB of one-token answers' log-probs memoised by prompt ids (`Engine`'s
        `memo_bytes`; 0: off, the default). For a client that asks for the same prompts' next
        token again and again (fused decoding's evaluations); not for timing the model.
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
    max_choices: int = 64
    max_client_choices: int = 256
    send_timeout_s: float = 10.0
    poll_s: float = 0.25
    warm_up: bool = False
    warm_up_prompt_tokens: int = 128
    memo_mib: int = 0

    def __post_init__(self):
        for name in ("max_logprobs", "memo_mib"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ServeConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_tokens_limit", "default_max_tokens", "max_body_bytes",
                     "max_connections", "backlog", "max_batch", "max_queue", "max_choices",
                     "max_client_choices", "warm_up_prompt_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "request_timeout_s", "keep_alive_s",
                     "send_timeout_s", "poll_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ConfigError(f"ServeConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.model_name:
            raise ConfigError("ServeConfig.model_name must not be empty")
