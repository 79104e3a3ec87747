"""One choice of a completion as the engine's `Job`: sampling, log-probs, stop strings, and the
hand-off of its progress from the engine thread to the HTTP event loop.

Shapes: V vocab, K top log-probs.

Log-probs reported are the model's own (before temperature and top-p), as vLLM reports them by
default: a client reading the cloud's distribution wants the model's, not the sampler's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from floe_jax.inference.align import token_bytes, vocab_of
from floe_jax.inference.cloud import decode_ids, encode_text


class Tokens:
    """The served tokenizer as the server needs it: text in and out, one token's text and bytes
    (cached per id), end-of-sequence ids, and the chat template when the tokenizer has one."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.vocab = vocab_of(tokenizer, size=vocab_size)
        self.eos_ids = frozenset(int(i) for i in eos_ids if i is not None)
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        return decode_ids(self.tokenizer, ids)

    def text(self, i: int) -> str:
        s = self._text.get(i)
        if s is None:
            s = self._text[i] = self.tokenizer.decode([int(i)])
        return s

    def bytes(self, i: int) -> list[int]:
        b = self._bytes.get(i)
        if b is None:
            tok = self.vocab.tokens[i] if i < self.vocab.size else ""
            raw = token_bytes(tok, self.vocab.style) if tok else self.text(i).encode()
            b = self._bytes[i] = list(raw)
        return b

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool,
                    continue_final_message: bool) -> str:  # fmt: skip
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )  # fmt: skip


def top_ids(lp_V: np.ndarray, k: int) -> np.ndarray:
    """The k likeliest ids, best first (ties by id)."""
    k = min(k, lp_V.shape[-1])
    idx = np.argpartition(-lp_V, k - 1)[:k] if k < lp_V.shape[-1] else np.arange(lp_V.shape[-1])
    return idx[np.lexsort((idx, -lp_V[idx]))]


def stop_hold(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may begin a stop string (held back from a stream)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """How a choice picks its tokens and what it reports.

    Attributes:
      max_tokens: new tokens at most.
      temperature: 0 is greedy.
      top_p: nucleus mass kept before sampling.
      seed: None draws fresh randomness; a seed makes the choice repeatable.
      top_logprobs: None reports no log-probs; k reports the k likeliest tokens per position.
      stops: stop strings (the text ends before the first one).
      prompt_logprobs: None, or k: the prompt's own log-probs are reported too, with the k
        likeliest tokens at each of its positions (`echo`, `prompt_logprobs`).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int | None = None
    stops: tuple[str, ...] = ()
    prompt_logprobs: int | None = None


class Choice:
    """A `Job` for the engine (see `engine.Job`): chooses tokens, keeps the text and log-probs,
    and tells the event loop (`notify`, called through `loop.call_soon_threadsafe`) when there is
    something new to stream, and when it is finished."""

    def __init__(self, prompt: list[int], sampling: Sampling, tokens: Tokens, *, index: int,
                 loop: asyncio.AbstractEventLoop, notify: Callable[[Choice], None],
                 stream: bool = False):  # fmt: skip
        self.prompt, self.s, self.tok, self.index = prompt, sampling, tokens, index
        self.max_tokens = sampling.max_tokens
        self._loop, self._notify, self._stream = loop, notify, stream
        seed = sampling.seed
        self._rng = np.random.default_rng(None if seed is None else [seed, index])
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[int]] = []  # top ids per position
        self.top_lps: list[list[float]] = []
        self.text = ""  # the text so far (cut at a stop string once one is seen)
        self.finish: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.sent = 0  # tokens handed to a stream
        self.sent_chars = 0
        self.offset = 0  # text offset of the next streamed token
        self.closed = False  # the stream has sent this choice's last row
        self.counted = False  # the request's waiter has counted it finished
        self.wants_prompt = sampling.prompt_logprobs is not None
        self.prompt_lps: list[float] = []  # of prompt[i + 1] after prompt[: i + 1]
        self.prompt_tops: list[list[int]] = []
        self.prompt_top_lps: list[list[float]] = []
        self.prompt_ranks: list[int] = []

    def on_prompt_logprobs(self, lp_LV: np.ndarray) -> None:
        """Log-probs after each prompt token (row i: after `prompt[: i + 1]`): those of the
        prompt's own next token and the k likeliest, for positions 1 .. L - 1."""
        k = self.s.prompt_logprobs or 0
        for i in range(len(self.prompt) - 1):
            t = self.prompt[i + 1]
            self.prompt_lps.append(float(lp_LV[i, t]))
            self.prompt_ranks.append(int((lp_LV[i] > lp_LV[i, t]).sum()) + 1)
            ids = top_ids(lp_LV[i], k) if k else np.zeros(0, np.int64)
            self.prompt_tops.append(ids.tolist())
            self.prompt_top_lps.append(lp_LV[i, ids].tolist())

    def _choose(self, lp: np.ndarray) -> int:
        s = self.s
        if s.temperature == 0:
            return int(np.argmax(lp))
        z = lp.astype(np.float64) / s.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if s.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            keep = np.searchsorted(np.cumsum(p[order]), s.top_p) + 1
            q = np.zeros_like(p)
            q[order[:keep]] = p[order[:keep]]
            p = q / q.sum()
        return int(self._rng.choice(p.shape[0], p=p))

    def on_logprobs(self, lp_V: np.ndarray) -> int | None:
        if self.cancelled:
            self._end("abort")
            return None
        t = self._choose(lp_V)
        self.ids.append(t)
        self.logprobs.append(float(lp_V[t]))
        if self.s.top_logprobs:
            ids = top_ids(lp_V, self.s.top_logprobs)
            self.tops.append(ids.tolist())
            self.top_lps.append(lp_V[ids].tolist())
        elif self.s.top_logprobs is not None:
            self.tops.append([])
            self.top_lps.append([])
        if t in self.tok.eos_ids:  # listed with its log-probs, but not part of the text
            self._end("stop")
            return None
        text = self.tok.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.s.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self._end("stop")
            return None
        self.text = text
        if len(self.ids) >= self.max_tokens:
            self._end("length")
            return None
        if self._stream:
            self._tell()
        return t

    def on_error(self, msg: str) -> None:
        self.error = msg
        self._end("error")

    def _end(self, reason: str) -> None:
        self.finish = reason
        self._tell()

    def _tell(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._notify, self)
        except RuntimeError:  # the event loop is closed (shutdown): no one is waiting
            pass

    def stream_text(self) -> str:
        """New text that is safe to send: not a possible start of a stop string, and not an
        incomplete UTF-8 character (unless the choice has finished)."""
        if self.finish is not None:
            end = len(self.text)
        else:
            end = len(self.text) - stop_hold(self.text, self.s.stops)
            while end > self.sent_chars and self.text[end - 1] == "\ufffd":
                end -= 1
        out = self.text[self.sent_chars : max(end, self.sent_chars)]
        self.sent_chars += len(out)
        return out
