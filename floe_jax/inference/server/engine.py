"""Continuous batching of completion requests onto one floe_jax model, on one host thread.

Shapes: B rows of a cohort (padded to a batch bucket), P prompt bucket, N cache headroom,
V vocab.

Requests arrive from the HTTP event loop as `Job`s. The engine thread loops: it admits at most one
prefill's worth of queued jobs (the oldest and those of its prompt bucket, up to `max_batch`
rows, its cache sized for the longest of them), then advances every live cohort by one token
(one `advance` call per cohort), so new requests never hold up the streams already running. Jobs
that arrive together share their decode steps; a long job never blocks the admission of new ones,
which start their own cohort. Cohorts are not merged: requests that arrive one at a time decode
as cohorts of one row each.
Log-probs come back to the host once per call ([B, V] float32), where each job chooses its token
(its own temperature, top-p, seed, stop strings) and reports progress to the event loop.

`prefill`/`advance` are the decode loop's own (`floe_jax.decode`); compiles are per (batch bucket,
prompt bucket, headroom bucket), so a served model compiles a handful of programs, not one per
request.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
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
from floe_jax.lora import LoRA
from floe_jax.model import forward, init_cache, unstack_layers

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
HEADROOM_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)


class Job(Protocol):
    """One sequence to generate: `prompt` ids, at most `max_tokens` new tokens.

    `on_logprobs(lp_V)` gets the next-token log-probs and returns the token to feed next, or None
    once the job has finished (it chose its last token, hit a stop, or was cancelled).
    `on_error(msg)` ends the job when the model call failed. A job with `wants_prompt` True
    first gets `on_prompt_logprobs(lp_LV)`: the log-probs after each of its L prompt tokens (row
    i: after `prompt[: i + 1]`), from the same prefill."""

    prompt: Sequence[int]
    max_tokens: int

    def on_logprobs(self, lp_V: np.ndarray) -> int | None: ...

    def on_error(self, msg: str) -> None: ...


def prompt_buckets(context: int) -> tuple[int, ...]:
    """Prompt buckets up to the model's context (the last one is the context itself)."""
    return tuple(b for b in DEFAULT_BUCKETS if b < context) + (context,)


@jax.jit
def _log_softmax(logits_BV):
    return jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)


def prefill_scored(params, tokens_BP, mask_BP, cfg: ModelConfig, *, max_new_tokens: int, key,
                   lora: LoRA | None = None) -> tuple[DecodeState, jax.Array]:  # fmt: skip
    """`floe_jax.decode.prefill` that keeps every position: (state, log-probs [B, P, V], position
    p the next-token distribution after prompt slot p). The one prefill of a request that asks
    for its prompt's log-probs (`echo`, `prompt_logprobs`)."""
    B, P = tokens_BP.shape
    cache = init_cache(cfg, B, P + max_new_tokens)
    logits, cache = forward(params, tokens_BP, cfg, lora=lora, cache=cache, mask=mask_BP)
    out = jnp.zeros((B, max_new_tokens), jnp.int32)
    state = DecodeState(cache=cache, token=tokens_BP[:, -1], out=out, key=key,
                        step=jnp.zeros((), jnp.int32), done=jnp.zeros((B,), bool))  # fmt: skip
    return state, jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


prefill_scored_jit = jax.jit(prefill_scored, static_argnames=("cfg", "max_new_tokens"))


@dataclasses.dataclass(eq=False)
class _Cohort:
    """Jobs prefilled together and decoded together until the last one finishes."""

    state: DecodeState
    jobs: list[Job | None]  # None: finished, or batch padding
    tokens: np.ndarray  # [B] int32 fed at the next step


class Engine:
    """The model behind `serve_cloud`: a thread that batches `Job`s (module docstring).

    Args:
      params, cfg, lora: the served model (adapters optional).
      max_batch: rows of one prefill or cohort.
      max_queue: jobs waiting for admission before `submit` refuses (the server answers 503).
      pad_id: filler id for padded prompt slots and finished rows.
      start: start the thread now (else call `start()`).
    """

    def __init__(
        self,
        params: dict,
        cfg: ModelConfig,
        *,
        lora: LoRA | None = None,
        max_batch: int = 32,
        max_queue: int = 4096,
        pad_id: int = 0,
        start: bool = True,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1 ({max_batch}, {max_queue})")
        self.params, self.cfg, self.lora = unstack_layers(params), cfg, lora
        self.context = int(cfg.max_position_embeddings)
        self.buckets = prompt_buckets(self.context)
        self.max_batch, self.max_queue, self.pad_id = max_batch, max_queue, pad_id
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._cohorts: list[_Cohort] = []
        self._stop = False
        self._key = jax.random.key(0)  # the decode state's; jobs sample on the host
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="floe-serve-engine", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Starts the thread (`start=False` lets jobs queue first, to batch them for sure)."""
        self._thread.start()

    # ------------------------------------------------------------------ the event loop's side
    def submit(self, job: Job) -> bool:
        """Queues a job; False when the queue is full (or the engine stopped)."""
        with self._cv:
            if self._stop or len(self._queue) >= self.max_queue:
                return False
            self._queue.append(job)
            self._cv.notify()
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the thread (jobs still queued or running get an error), bounded in time."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._queue and not self._cohorts:
                    self._cv.wait()
                if self._stop:
                    pending = list(self._queue) + [
                        j for c in self._cohorts for j in c.jobs if j is not None
                    ]
                    self._queue.clear()
                    self._cohorts.clear()
                    break
                new = self._next_prefill()
            if new:
                self._admit(new)
            self._advance()
        for job in pending:
            job.on_error("the server is shutting down")

    def _next_prefill(self) -> list[Job]:
        """The jobs of one prefill, taken off the queue (under the lock): the oldest job and
        the queued jobs of its prompt bucket, up to `max_batch`. One prefill per iteration, so
        a burst of new requests never holds up the live cohorts' next steps."""
        if not self._queue:
            return []
        bucket = bucket_length(len(self._queue[0].prompt), self.buckets)
        take, keep = [], collections.deque()
        for job in self._queue:
            fits = len(take) < self.max_batch
            if fits and bucket_length(len(job.prompt), self.buckets) == bucket:
                take.append(job)
            else:
                keep.append(job)
        self._queue = keep
        return take

    def _admit(self, jobs: list[Job]) -> None:
        groups: dict[int, list[Job]] = collections.defaultdict(list)
        for job in jobs:
            groups[bucket_length(len(job.prompt), self.buckets)].append(job)
        for group in groups.values():
            for i in range(0, len(group), self.max_batch):
                part = group[i : i + self.max_batch]
                longest = max(j.max_tokens for j in part)
                self._prefill(part, bucket_length(max(longest - 1, 1), HEADROOM_BUCKETS))

    def _prefill(self, jobs: list[Job], headroom: int) -> None:
        B = bucket_length(len(jobs), BATCH_BUCKETS)
        rows = [list(j.prompt) for j in jobs] + [[self.pad_id]] * (B - len(jobs))
        try:
            tokens, mask = pad_prompts(
                rows, pad_id=self.pad_id, buckets=self.buckets, vocab_size=self.cfg.vocab_size
            )
            scored = any(getattr(j, "wants_prompt", False) for j in jobs)
            fn = prefill_scored_jit if scored else prefill_jit
            state, out = fn(self.params, tokens, mask, cfg=self.cfg, max_new_tokens=headroom,
                            key=self._key, lora=self.lora)  # fmt: skip
            if scored:
                lp_BPV = np.asarray(out)
                lp = lp_BPV[:, -1]
                for b, j in enumerate(jobs):
                    if getattr(j, "wants_prompt", False):
                        j.on_prompt_logprobs(lp_BPV[b, tokens.shape[1] - len(j.prompt) :])
            else:
                lp = np.asarray(_log_softmax(out))
        except Exception as e:  # noqa: BLE001  (a failed call fails its jobs, not the server)
            for j in jobs:
                j.on_error(f"{type(e).__name__}: {e}")
            return
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(jobs)
        cohort = _Cohort(state, [*jobs, *[None] * (B - len(jobs))], np.full(B, self.pad_id))
        self._feed(cohort, lp)

    def _feed(self, cohort: _Cohort, lp_BV: np.ndarray) -> None:
        live = False
        for b, job in enumerate(cohort.jobs):
            if job is None:
                continue
            try:
                nxt = job.on_logprobs(lp_BV[b])
            except Exception as e:  # noqa: BLE001
                job.on_error(f"{type(e).__name__}: {e}")
                nxt = None
            if nxt is None:
                cohort.jobs[b] = None
                cohort.tokens[b] = self.pad_id
            else:
                cohort.tokens[b] = nxt
                live = True
        if live:
            self._cohorts.append(cohort)

    def _advance(self) -> None:
        cohorts, self._cohorts = self._cohorts, []
        for c in cohorts:
            state = dataclasses.replace(c.state, token=jnp.asarray(c.tokens, jnp.int32))
            try:
                c.state, logits = advance_jit(self.params, state, cfg=self.cfg, lora=self.lora)
                lp = np.asarray(_log_softmax(logits))
            except Exception as e:  # noqa: BLE001
                for j in c.jobs:
                    if j is not None:
                        j.on_error(f"{type(e).__name__}: {e}")
                continue
            self.stats["steps"] += 1
            self._feed(c, lp)
