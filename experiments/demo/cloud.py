"""The demo's cloud: a black box with its own tokenizer and vocabulary, reached the way a deployed
Floe device reaches one, and watched by a recorder that counts the private spans reaching it.

`CloudEndpoint` owns the back end for one evaluation: with `eval.cloud="http"` it starts
`serve_cloud` (the cloud model and the cloud's tokenizer) on a free loopback port and talks to it
with `HTTPCloud`, top-k log-probs keyed by token text; with `"local"` the same top-k back end runs
in-process (`LocalCloud(top_k=...)`). Either way the edge only sees token strings, mapped onto its
vocabulary by `StringMapper` (`floe_jax.inference.align`), and every request passes a
`SpanRecorder` before the back end.
"""

from __future__ import annotations

import threading

from floe_jax.inference import HTTPCloud, LocalCloud
from floe_jax.inference.align import StringMapper, vocab_of
from floe_jax.inference.privacy import count_private_spans
from floe_jax.inference.server import serve_cloud

# The server memoises one-token answers by prompt (`ServeConfig.memo_mib`): every compared method
# asks for the same prompts and prefixes (the evaluation charges the cloud's compute as a fixed
# `eval.server_ms`, so the memo changes no latency figure).
MEMO_MIB = 64


class SpanRecorder:
    """A cloud back end wrapper that checks every request it receives for private values with
    `count_private_spans`: complete occurrences, and a request that ends in the start of one (a
    span cut short while the edge was still generating it).

    Each request is checked for the private spans of its own query: `rows[b]` for a request of
    batch row `b` (the row is the second item of `Prefix.stream`, as `generate_fused` names its
    streams); requests without a row are checked for every value of `rows`.
    """

    def __init__(self, backend, decode):
        self._backend, self.decode = backend, decode
        self._lock = threading.Lock()  # fused decoding calls the cloud from a thread pool
        self.rows: list[tuple[str, ...]] = []
        self.requests = self.leaked_requests = self.leaked_spans = self.partial_spans = 0
        self.examples: list[str] = []

    def _values(self, stream) -> tuple[str, ...]:
        if isinstance(stream, tuple) and len(stream) == 2 and 0 <= stream[1] < len(self.rows):
            spans = self.rows[stream[1]]
        else:
            spans = [s for r in self.rows for s in r]
        return tuple(sorted({s for s in spans if s}, key=len, reverse=True))

    @property
    def kind(self):
        return self._backend.kind

    @property
    def vocab_size(self):
        return self._backend.vocab_size

    def next_token(self, prefixes):
        for p in prefixes:
            text = p.text if p.text is not None else self.decode(list(p.ids))
            found = count_private_spans(text, self._values(p.stream))
            with self._lock:
                self.requests += 1
                if found.total:
                    self.leaked_requests += 1
                    self.leaked_spans += found.complete
                    self.partial_spans += found.partial
                    if len(self.examples) < 3:
                        self.examples.append(text)
        return self._backend.next_token(prefixes)


class ServerRecorder:
    """What the cloud server itself received: `serve_cloud`'s `on_prompt` hook checks every
    prompt it accepts for complete occurrences of `values` (every private span of the evaluated
    queries; a cut-short span is attributed to its query by the `SpanRecorder` in front of the
    client, which sees which request belongs to which query)."""

    def __init__(self, values):
        self.values = tuple(sorted({v for v in values if v}, key=len, reverse=True))
        self._lock = threading.Lock()  # the server calls it from its event loop thread
        self.prompts = self.spans = 0

    def __call__(self, text: str) -> None:
        found = count_private_spans(text, self.values).complete
        with self._lock:
            self.prompts += 1
            self.spans += found


class CloudEndpoint:
    """The cloud of one evaluation (a context manager: the HTTP server stops on exit).

    Args:
      params, cfg, tokenizer: the cloud model and the cloud's own tokenizer.
      edge_tokenizer: the edge's, whose vocabulary the cloud's token strings are mapped onto.
      how: `http` (serve-cloud on 127.0.0.1, `HTTPCloud`, which maps the cloud's token strings
        onto the edge vocabulary itself) or `local` (in-process; `mapper` maps them).
      top_k: log-probs per token the cloud returns (hosted APIs give at most 20).
      private_values: what the server-side recorder (`ServerRecorder`, http only) looks for.
      eos_ids: the cloud's stop ids (http: `serve_cloud`'s; None: the config's and tokenizer's).
    """

    def __init__(self, params, cfg, tokenizer, *, edge_tokenizer, how: str = "http",
                 top_k: int = 20, private_values=(), eos_ids=None):  # fmt: skip
        self.how, self.top_k = how, top_k
        self.mapper = None  # HTTPCloud maps the strings itself (it is given both tokenizers)
        self._server = self.server_recorder = None
        if how == "http":
            self.server_recorder = ServerRecorder(private_values)
            self._server = serve_cloud(params, cfg, tokenizer, port=0, block=False,
                                       model_name="floe-cloud", max_logprobs=top_k,
                                       on_prompt=self.server_recorder, eos_ids=eos_ids,
                                       memo_mib=MEMO_MIB)  # fmt: skip
            self.backend = HTTPCloud(
                self._server.url,
                model="floe-cloud",
                top_k=top_k,
                edge_tokenizer=edge_tokenizer,
                cloud_tokenizer=tokenizer,
            )
        elif how == "local":
            self.mapper = StringMapper(vocab_of(edge_tokenizer))
            self.backend = LocalCloud(params, cfg, tokenizer=tokenizer, top_k=top_k,
                                      inputs="text", pad_id=tokenizer.pad_token_id)  # fmt: skip
        else:
            raise ValueError(f"cloud back end {how!r}: use http or local")

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
