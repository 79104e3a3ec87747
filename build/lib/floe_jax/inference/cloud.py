"""Cloud back ends behind one interface.

Shapes: B prefixes (rows), W cloud vocab, K listed tokens (top-k).

A back end answers `next_token(prefixes) -> CloudDistribution`: for each prefix (token ids and/or
text) the cloud's next-token distribution, either dense log-probs [B, W] or sparse top-k (ids
and/or token strings with log-probs, k <= 20 as proprietary APIs give). Rows fail independently
(`ok[b] = False` with a reason); a back end never raises for one bad row.

- `LocalCloud` serves a floe_jax model: the simulated cloud of the experiments. It keeps a decode
  state per request stream, so a prefix that extends the last one by a token costs one decode
  step (`floe_jax.decode.prefill` and `advance`, as every decode loop).

Speculative fused decoding (`floe_jax.inference.speculative`) asks a back end to `score` a `Draft`:
a prefix and a drafted continuation, answered with the next-token distribution at each of its
k + 1 positions in one request (one row per position). `LocalCloud` does it with one forward over
the draft on top of the stream's KV cache (rolled back to where the draft starts).
- `HTTPCloud` (in `floe_jax.inference.http_cloud`) speaks the OpenAI completions API.

The network between edge and cloud, and the clocks, are in `floe_jax.inference.deadline`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ModelConfig
from floe_jax.decode import (
    DEFAULT_BUCKETS,
    DecodeState,
    advance_jit,
    bucket_length,
    pad_prompts,
    prefill_jit,
)
from floe_jax.inference.extend import extend_jit, rewind_jit
from floe_jax.lora import LoRA
from floe_jax.model import unstack_layers
from floe_jax.sharding import shard_cloud

EXTEND_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class CloudError(RuntimeError):
    """A cloud request failed (the message says which request and why)."""


@dataclasses.dataclass(frozen=True)
class Prefix:
    """One request: the text so far, as ids and/or text. `stream` names the request stream so a
    back end can keep state (a KV cache) between successive prefixes of one generation.
    `budget_s`: wall seconds, from when the back end starts on it, after which the answer is of
    no use (the fused loop's per-token deadline less the network's delay); a back end that waits
    on something (`HTTPCloud`) gives up then, so an abandoned request frees its worker."""

    ids: tuple[int, ...] | None = None
    text: str | None = None
    stream: object = None
    budget_s: float | None = None

    def __post_init__(self):
        if self.ids is None and self.text is None:
            raise ValueError("a Prefix needs ids or text")
        if self.ids is not None:
            object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))

    def payload_bytes(self) -> int:
        """Rough request size on the wire (for the bandwidth term)."""
        n = len(self.text.encode()) if self.text is not None else 0
        return 200 + max(n, 6 * len(self.ids or ()))


@dataclasses.dataclass(frozen=True)
class Draft(Prefix):
    """A prefix with a drafted continuation, to be scored at k + 1 positions in one request.

    `ids` / `text` hold the whole text (prefix and draft); position j is the prefix that ends at
    `id_ends[j]` tokens / `text_ends[j]` characters (j = 0: the prefix before the draft, j = k:
    the whole draft). A text end of -1 marks a position whose text is not a prefix of the whole
    (a character split across tokens): it cannot be scored from this text.
    """

    id_ends: tuple[int, ...] | None = None
    text_ends: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("id_ends", "text_ends"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(int(e) for e in v))
        if self.id_ends is None and self.text_ends is None:
            raise ValueError("a Draft needs id_ends or text_ends")
        if self.id_ends is not None and self.text_ends is not None:
            if len(self.id_ends) != len(self.text_ends):
                raise ValueError("a Draft's id_ends and text_ends differ in length")

    @property
    def positions(self) -> int:
        """k + 1."""
        return len(self.id_ends if self.id_ends is not None else self.text_ends)

    def prefix(self, j: int) -> Prefix:
        """Position j as a plain prefix (what token-by-token decoding sends)."""
        ids = self.ids[: self.id_ends[j]] if self.ids is not None and self.id_ends else None
        text = None
        if self.text is not None and self.text_ends and self.text_ends[j] >= 0:
            text = self.text[: self.text_ends[j]]
        return Prefix(ids=ids, text=text, stream=self.stream, budget_s=self.budget_s)


@dataclasses.dataclass
class CloudDistribution:
    """The cloud's next-token distributions for B rows.

    Attributes:
      ok: [B] bool, row holds a usable distribution.
      logprobs: dense [B, W] log-probs (None when sparse).
      top_ids: sparse [B, K] int32 cloud ids, -1 where unknown or padding (None when the back end
        names tokens by string only).
      top_tokens: sparse token strings per row (as the API spelled them), or None.
      top_logprobs: sparse [B, K] log-probs; padding slots are -inf.
      errors: per row, None or why it is missing.
    """

    ok: np.ndarray
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_tokens: list[list[str]] | None = None
    top_logprobs: np.ndarray | None = None
    errors: list[str | None] = dataclasses.field(default_factory=list)

    @property
    def batch(self) -> int:
        return int(self.ok.shape[0])

    @property
    def dense(self) -> bool:
        return self.logprobs is not None

    @classmethod
    def missing(cls, batch: int, reason: str = "missing") -> CloudDistribution:
        return cls(ok=np.zeros(batch, bool), errors=[reason] * batch)

    def sanitized(self) -> CloudDistribution:
        """Rows with NaN, +inf or no finite entry become missing (reason `nan`)."""
        ok = self.ok.copy()
        errors = list(self.errors) + [None] * (self.batch - len(self.errors))
        arr = self.logprobs if self.dense else self.top_logprobs
        if arr is not None and arr.size:
            bad = np.isnan(arr).any(-1) | np.isposinf(arr).any(-1) | ~np.isfinite(arr).any(-1)
            for b in np.nonzero(bad & ok)[0]:
                ok[b], errors[b] = False, "nan"
        return dataclasses.replace(self, ok=ok, errors=errors)

    def row(self, j: int) -> CloudDistribution:
        """Row j as a one-row distribution."""
        cut = lambda a: None if a is None else a[j : j + 1]
        return CloudDistribution(
            ok=self.ok[j : j + 1].copy(), logprobs=cut(self.logprobs), top_ids=cut(self.top_ids),
            top_tokens=None if self.top_tokens is None else [self.top_tokens[j]],
            top_logprobs=cut(self.top_logprobs),
            errors=[self.errors[j] if j < len(self.errors) else None],
        )  # fmt: skip

    def scatter_rows(self, rows: Sequence[int], batch: int, reason: str) -> CloudDistribution:
        """This distribution's rows placed at `rows` of a batch of `batch`; other rows missing."""
        ok = np.zeros(batch, bool)
        ok[list(rows)] = self.ok
        errors: list[str | None] = [reason] * batch
        for j, r in enumerate(rows):
            errors[r] = self.errors[j] if j < len(self.errors) else None

        def place(a, fill):
            if a is None:
                return None
            out = np.full((batch, *a.shape[1:]), fill, a.dtype)
            out[list(rows)] = a
            return out

        tokens = None
        if self.top_tokens is not None:
            tokens = [[] for _ in range(batch)]
            for j, r in enumerate(rows):
                tokens[r] = self.top_tokens[j]
        return CloudDistribution(
            ok=ok,
            logprobs=place(self.logprobs, -np.inf),
            top_ids=place(self.top_ids, -1),
            top_tokens=tokens,
            top_logprobs=place(self.top_logprobs, -np.inf),
            errors=errors,
        )


class CloudBackend(Protocol):
    """What the generation loop needs from a cloud: `kind` is `"dense"` or `"sparse"`."""

    kind: str

    def next_token(self, prefixes: Sequence[Prefix]) -> CloudDistribution: ...


def topk_rows(logprobs_BW: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids [B, K] int32, log-probs [B, K]) of dense log-probs, best first."""
    k = min(k, logprobs_BW.shape[-1])
    idx = np.argsort(-logprobs_BW, axis=-1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(logprobs_BW, idx, axis=-1)


# ----------------------------------------------------------------------------- text codecs


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` without special tokens (`tokenizers.Tokenizer` or Hugging Face)."""
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(out, "ids", out))


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids))


def token_string(tokenizer, i: int) -> str:
    """The decoded text of one token, as OpenAI-compatible servers list it."""
    return tokenizer.decode([int(i)])


# ----------------------------------------------------------------------------- LocalCloud


@dataclasses.dataclass
class _Stream:
    ids: tuple[int, ...]
    state: DecodeState  # after `ids`, its cache holding them
    logprobs: np.ndarray  # [W] after `ids`


class LocalCloud:
    """A floe_jax model served as the cloud, with a KV cache per request stream.

    A prefix whose `stream` was seen before and whose ids extend that stream's ids is served by
    feeding only the new tokens (one decode step each); anything else is prefilled (prompt padded
    to a bucket, cache of bucket + `headroom` slots, so compiles are per bucket, not per length).

    Args:
      params, cfg, lora: the cloud model (adapters optional).
      tokenizer: the cloud's tokenizer, for text prefixes and token strings.
      top_k: None serves dense log-probs; an int serves sparse top-k like an API.
      inputs: `"ids"` (prefix ids are cloud ids: a shared tokenizer) or `"text"` (encode the
        prefix text with `tokenizer`). Default: `"text"` when a tokenizer is given.
      headroom: cache slots beyond the prompt bucket before a stream is re-prefilled.
      max_streams: streams kept (least recently used are dropped).
      mesh: a `jax.sharding.Mesh` (or spec, e.g. `"model=2"`) with a `model` axis: the params
        are split tensor-parallel over it (`floe_jax.sharding.shard_cloud`), so a cloud too
        large for one device serves from several.
    """

    def __init__(
        self,
        params: dict,
        cfg: ModelConfig,
        *,
        lora: LoRA | None = None,
        tokenizer=None,
        top_k: int | None = None,
        inputs: str | None = None,
        headroom: int = 128,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_streams: int = 256,
        pad_id: int = 0,
        mesh=None,
    ):
        self.params = unstack_layers(params if mesh is None else shard_cloud(mesh, params))
        self.cfg, self.lora, self.tokenizer = cfg, lora, tokenizer
        self.top_k = top_k
        self.inputs = inputs or ("text" if tokenizer is not None else "ids")
        if self.inputs not in ("ids", "text"):
            raise ValueError(f"LocalCloud inputs={self.inputs!r}: use 'ids' or 'text'")
        if self.inputs == "text" and tokenizer is None:
            raise ValueError("LocalCloud(inputs='text') needs a tokenizer")
        self.headroom, self.buckets, self.pad_id = headroom, tuple(buckets), pad_id
        self.max_streams = max_streams
        self._key = jax.random.key(0)  # the decode state's; the cloud never samples
        self._streams: OrderedDict[object, _Stream] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"prefills": 0, "extends": 0, "hits": 0, "scores": 0}

    @property
    def kind(self) -> str:
        return "dense" if self.top_k is None else "sparse"

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def _ids(self, p: Prefix) -> tuple[int, ...]:
        if self.inputs == "ids" and p.ids is not None:
            return p.ids
        if p.text is None or self.tokenizer is None:
            raise CloudError("LocalCloud got a prefix without usable ids or text")
        return tuple(encode_text(self.tokenizer, p.text))

    def logprobs(self, ids: Sequence[int], stream: object = None) -> np.ndarray:
        """Next-token log-probs [W] after `ids`, reusing the stream's cache when it can."""
        ids = tuple(int(i) for i in ids)
        if not ids:
            raise CloudError("LocalCloud got an empty prefix")
        with self._lock:
            st = self._streams.get(stream) if stream is not None else None
            if st is not None and st.ids == ids:
                self.stats["hits"] += 1
                self._streams.move_to_end(stream)
                return st.logprobs
            n_new = len(ids) - len(st.ids) if st is not None else -1
            if (
                st is not None
                and 0 < n_new
                and ids[: len(st.ids)] == st.ids
                and int(st.state.cache.index) + n_new <= st.state.cache.max_len
            ):
                state, logits = st.state, None
                for t in ids[len(st.ids) :]:
                    state = dataclasses.replace(state, token=jnp.asarray([t], jnp.int32))
                    state, logits = advance_jit(self.params, state, cfg=self.cfg, lora=self.lora)
                self.stats["extends"] += n_new
            else:
                tokens, mask = pad_prompts([ids], pad_id=self.pad_id, buckets=self.buckets)
                state, logits = prefill_jit(
                    self.params, tokens, mask, cfg=self.cfg, max_new_tokens=self.headroom,
                    key=self._key, lora=self.lora,
                )  # fmt: skip
                self.stats["prefills"] += 1
            lp = jax.nn.log_softmax(logits, axis=-1)
            out = np.asarray(lp[0], np.float32)
            if stream is not None:
                self._streams[stream] = _Stream(ids, state, out)
                self._streams.move_to_end(stream)
                while len(self._streams) > self.max_streams:
                    self._streams.popitem(last=False)
            return out

    def next_token(self, prefixes: Sequence[Prefix]) -> CloudDistribution:
        B = len(prefixes)
        W = self.cfg.vocab_size
        dense = np.full((B, W), -np.inf, np.float32)
        ok = np.zeros(B, bool)
        errors: list[str | None] = [None] * B
        for b, p in enumerate(prefixes):
            try:
                dense[b] = self.logprobs(self._ids(p), p.stream)
                ok[b] = True
            except (CloudError, ValueError) as e:
                errors[b] = str(e)
        return self._answer(dense, ok, errors)

    def _position_ids(self, draft: Draft) -> list[tuple[int, ...] | None]:
        if self.inputs == "ids" and draft.ids is not None and draft.id_ends is not None:
            return [draft.ids[:e] for e in draft.id_ends]
        if draft.text is None or draft.text_ends is None or self.tokenizer is None:
            raise CloudError("LocalCloud got a draft without usable ids or text")
        return [tuple(encode_text(self.tokenizer, draft.text[:e])) if e >= 0 else None
                for e in draft.text_ends]  # fmt: skip

    def score(self, draft: Draft) -> CloudDistribution:
        """The next-token distribution at each of the draft's k + 1 positions (one row each), from
        one forward over the draft on the stream's cache. A position whose tokens are not a prefix
        of the whole draft's (the cloud's tokenizer splits the text differently there) is missing
        (`unscorable`); position 0 is always scored."""
        P, W = draft.positions, self.cfg.vocab_size
        dense = np.full((P, W), -np.inf, np.float32)
        ok = np.zeros(P, bool)
        errors: list[str | None] = ["unscorable"] * P
        try:
            seqs = self._position_ids(draft)
            if seqs[0] is None:
                raise CloudError("LocalCloud: the draft's prefix has no text")
            full = next(s for s in reversed(seqs) if s is not None)
            if full[: len(seqs[0])] != seqs[0]:
                full = seqs[0]
            lo = len(seqs[0])
            lps = self.logprobs_after(full, lo, draft.stream)
            for j, ids in enumerate(seqs):
                if ids is not None and len(ids) >= lo and full[: len(ids)] == ids:
                    dense[j], ok[j], errors[j] = lps[len(ids) - lo], True, None
        except (CloudError, ValueError) as e:
            errors = [str(e)] * P
            ok[:] = False
        return self._answer(dense, ok, errors)

    def logprobs_after(self, ids: Sequence[int], lo: int, stream: object = None) -> np.ndarray:
        """Next-token log-probs [len(ids) - lo + 1, W] after `ids[:n]` for n = lo..len(ids), from
        one forward over what the stream's cache does not hold (rolled back to the longest common
        prefix, at most `lo - 1` tokens: what follows may be a rejected draft)."""
        ids = tuple(int(i) for i in ids)
        if not 1 <= lo <= len(ids):
            raise CloudError(f"LocalCloud: cannot score after {lo} of {len(ids)} tokens")
        with self._lock:
            st = self._streams.pop(stream, None) if stream is not None else None
            common = 0
            if st is not None:
                n = min(len(st.ids), len(ids))
                diff = np.nonzero(np.asarray(st.ids[:n]) != np.asarray(ids[:n]))[0]
                common = int(diff[0]) if diff.size else n
            keep = min(common, lo - 1)
            T = bucket_length(len(ids) - keep, EXTEND_BUCKETS)
            if st is not None and keep >= 1:
                index = int(st.state.cache.index) - (len(st.ids) - keep)
                fits = index + T <= st.state.cache.max_len
            if st is None or keep < 1 or not fits:
                tokens, mask = pad_prompts([ids[: lo - 1] or ids[:1]], pad_id=self.pad_id,
                                           buckets=self.buckets)  # fmt: skip
                state, _ = prefill_jit(
                    self.params, tokens, mask, cfg=self.cfg, max_new_tokens=self.headroom,
                    key=self._key, lora=self.lora,
                )  # fmt: skip
                self.stats["prefills"] += 1
                keep = max(lo - 1, 1)
                T = bucket_length(len(ids) - keep, EXTEND_BUCKETS)
                if int(state.cache.index) + T > state.cache.max_len:
                    raise CloudError(f"LocalCloud: a draft of {len(ids) - keep} tokens does not "
                                     f"fit the cache (headroom={self.headroom})")  # fmt: skip
            else:
                drop = len(st.ids) - keep
                state = rewind_jit(st.state, jnp.zeros(1, jnp.int32), jnp.asarray(drop, jnp.int32))
            new = ids[keep:]
            tokens = np.full((1, T), self.pad_id, np.int32)
            tokens[0, : len(new)] = new
            mask = (np.arange(T) < len(new))[None].astype(np.int32)
            state, logits = extend_jit(self.params, state, tokens, mask, cfg=self.cfg,
                                       lora=self.lora)  # fmt: skip
            state = rewind_jit(state, jnp.asarray([len(new)], jnp.int32), jnp.asarray(T, jnp.int32))
            self.stats["scores"] += 1
            lp = np.asarray(jax.nn.log_softmax(logits[0, : len(new)], axis=-1), np.float32)
            if stream is not None:
                self._streams[stream] = _Stream(ids, state, lp[-1])
                while len(self._streams) > self.max_streams:
                    self._streams.popitem(last=False)
            return lp[lo - keep - 1 :]

    def _answer(self, dense: np.ndarray, ok: np.ndarray, errors) -> CloudDistribution:
        """Dense log-probs [B, W] as this back end serves them (dense, or top-k)."""
        if self.top_k is None:
            return CloudDistribution(ok=ok, logprobs=dense, errors=errors)
        ids, lps = topk_rows(dense, self.top_k)
        tokens = None
        if self.tokenizer is not None:
            tokens = [[token_string(self.tokenizer, i) for i in row] for row in ids]
        return CloudDistribution(
            ok=ok, top_ids=ids, top_tokens=tokens, top_logprobs=lps, errors=errors
        )

    def drop(self, stream: object) -> None:
        with self._lock:
            self._streams.pop(stream, None)


def headroom_for(prompt_len: int, max_new_tokens: int, buckets=DEFAULT_BUCKETS) -> int:
    """Cache headroom so a stream of `max_new_tokens` is never re-prefilled."""
    return max(1, max_new_tokens + bucket_length(prompt_len, buckets) - prompt_len)
