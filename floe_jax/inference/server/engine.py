"""Continuous (iteration-level) batching of completion requests onto one floe_jax model, on one
host thread (Yu et al., 2022, "Orca": requests join and leave the running batch between decode
steps, instead of waiting for the batch to drain).

Shapes: B rows of a cohort (padded to a batch bucket), P prompt bucket, S cache slots (P + the
headroom bucket its first jobs asked for), J joining rows, V vocab.

Requests arrive from the HTTP event loop as `Job`s. The engine thread loops: it admits at most one
prefill's worth of queued jobs (the oldest and those of its prompt bucket, up to `max_batch`
rows), then advances every live cohort by one token (one `advance` call per cohort), so new
requests never hold up the streams already running. A cohort is a batch decoding together on
one KV cache whose write slot `index` all its rows share (`floe_jax.kv_cache`). Admitted jobs
join a running cohort when its shape allows: its `index` is at least their prompt bucket P
(their prefilled keys go in the slots [index - P, index), the row's earlier slots masked out) and
its slots left hold their `max_tokens`; the cohort grows to the next batch bucket when it has no
free row (up to `max_batch` live rows). From the next step on they share its decode steps.
Otherwise they start a cohort of their own. A row whose job finished is free for the next joiner;
a cohort whose live rows fit a batch bucket four times smaller is compacted to it. A model whose
RoPE switches with the sequence length (longrope) takes none of this: a forward's factors follow
its longest row, so rows are batched only in one prefill whose cohort cannot pass the original
length, and each cohort is served as prefilled (`Engine._shares`).
Log-probs come back to the host once per call ([B, V] float32), where each job chooses its token
(its own temperature, top-p, seed, stop strings) and reports progress to the event loop.

`prefill`/`advance` are the decode loop's own (`floe_jax.decode`); compiles are per (batch bucket,
prompt bucket, headroom bucket) and for joins per (cohort shape, joining rows, prompt bucket), so
a served model compiles a bounded set of programs, not one per request; `warm_up` compiles the
common ones before the first request.
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
from floe_jax.inference.server.prompt_memo import PromptMemo
from floe_jax.inference.server.rows import resize_rows, splice_rows
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
    """Jobs decoded together on one cache; rows join and leave between steps."""

    state: DecodeState
    jobs: list[Job | None]  # None: a free row (finished, or batch padding)
    tokens: np.ndarray  # [B] int32 fed at the next step
    index: int  # the cache's next write slot (the host's copy of `state.cache.index`)

    @property
    def slots(self) -> int:
        return self.state.cache.max_len

    @property
    def live(self) -> int:
        return sum(j is not None for j in self.jobs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmUp:
    """The shapes `Engine.warm_up` compiles before the first request: for every batch bucket up
    to `max_batch` and every prompt bucket up to the one that holds `max_prompt` tokens, a
    cohort's prefill and decode step with the headroom of `max_tokens` new tokens, one row
    joining it, and its growth from the batch bucket below (no joins or growth for a longrope
    model: `Engine._shares`). Other shapes (longer prompts or answers, prompt log-probs,
    several rows joining at once) compile on first use."""

    max_prompt: int = 128
    max_tokens: int = 16

    def __post_init__(self):
        if self.max_prompt < 1 or self.max_tokens < 1:
            raise ValueError(f"WarmUp needs max_prompt and max_tokens >= 1 ({self})")


class Engine:
    """The model behind `serve_cloud`: a thread that batches `Job`s (module docstring).

    Args:
      params, cfg, lora: the served model (adapters optional).
      max_batch: live rows of one cohort (and of one prefill).
      max_queue: jobs waiting for admission before `submit` refuses (the server answers 503).
      pad_id: filler id for padded prompt slots and free rows.
      warm_up: compile these shapes on the thread before serving (jobs submitted meanwhile wait
        in the queue); None compiles on first use.
      memo_bytes: answer one-token jobs whose prompt was prefilled before from a memo of up to
        this many bytes (`prompt_memo.PromptMemo`; 0: off). Off by default: a benchmark that
        repeats a request to time the model must not be answered from a memo. A memoised row
        can differ from a new prefill in the last bits where that prefill would batch the
        prompt with other rows.
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
        warm_up: WarmUp | None = None,
        memo_bytes: int = 0,
        start: bool = True,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1 ({max_batch}, {max_queue})")
        if max_batch > BATCH_BUCKETS[-1]:
            raise ValueError(f"max_batch {max_batch} is past the largest batch bucket "
                             f"{BATCH_BUCKETS[-1]}")  # fmt: skip
        self.params, self.cfg, self.lora = unstack_layers(params), cfg, lora
        self.context = int(cfg.max_position_embeddings)
        self.buckets = prompt_buckets(self.context)
        # longrope: a forward's RoPE factors follow its longest row (`ModelConfig.rope_switches`),
        # so rows share a cohort only when none of its slots can pass the original length
        self._short_len = cfg.rope_scaling.original_max_position_embeddings if (
            cfg.rope_switches) else None  # fmt: skip
        self.max_batch, self.max_queue, self.pad_id = max_batch, max_queue, pad_id
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._cohorts: list[_Cohort] = []
        self._stop = False
        self._key = jax.random.key(0)  # the decode state's; jobs sample on the host
        self.stats = collections.Counter()
        self._warm_up = warm_up
        self.warm_up_error: str | None = None
        self.warming = warm_up is not None  # True until `warm_up` has compiled its shapes
        self._memo = PromptMemo(memo_bytes) if memo_bytes else None
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
        """Stops the thread (jobs still queued or running get an error), bounded in time (a
        warm-up stops after the compile in progress)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        if self._warm_up is not None:
            try:
                self.warm_up(self._warm_up)
            except Exception as e:  # noqa: BLE001  (the shapes then compile on first use)
                self.stats["warm_up_errors"] += 1
                self.warm_up_error = f"{type(e).__name__}: {e}"
            self.warming = False
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

    def warm_up(self, spec: WarmUp) -> None:
        """Compiles `spec`'s shapes (see `WarmUp`) by running them on a padding prompt; counts
        them in `stats["warm_up_shapes"]`. Runs on the engine thread before it serves."""
        headroom = bucket_length(max(spec.max_tokens - 1, 1), HEADROOM_BUCKETS)
        batches = [b for b in BATCH_BUCKETS if b < self.max_batch]
        batches.append(bucket_length(self.max_batch, BATCH_BUCKETS))
        # up to the bucket that holds `max_prompt` tokens (the whole context past it)
        top = bucket_length(min(spec.max_prompt, self.context), self.buckets)
        for P in (b for b in self.buckets if b <= top):
            below = None
            joiner = None
            for B in batches:
                if self._stop:
                    return
                tokens, mask = np.full((B, P), self.pad_id, np.int32), np.ones((B, P), np.int32)
                state, logits = prefill_jit(self.params, tokens, mask, cfg=self.cfg,
                                            max_new_tokens=headroom, key=self._key,
                                            lora=self.lora)  # fmt: skip
                _log_softmax(logits)
                if joiner is None and self._short_len is None:
                    joiner, _ = prefill_jit(self.params, tokens[:1], mask[:1], cfg=self.cfg,
                                            max_new_tokens=0, key=self._key,
                                            lora=self.lora)  # fmt: skip
                if self._short_len is None:  # longrope: no joins, growth or compaction
                    rows = jnp.full((1,), B, jnp.int32)  # a dropped row: only shapes count
                    cache = splice_rows(state.cache, joiner.cache, rows, state.cache.index)
                    state = dataclasses.replace(state, cache=cache)
                    if below is not None:
                        resize_rows(below, B)
                # `advance_jit` donates the state it is given: keep the one it returns
                below, logits = advance_jit(self.params, state, cfg=self.cfg, lora=self.lora)
                jax.block_until_ready(_log_softmax(logits))
                self.stats["warm_up_shapes"] += 1

    def _next_prefill(self) -> list[Job]:
        """The jobs of one prefill, taken off the queue (under the lock): the oldest job and
        the queued jobs of its prompt bucket, up to `max_batch`. One prefill per iteration, so
        a burst of new requests never holds up the live cohorts' next steps."""
        if not self._queue:
            return []
        bucket = bucket_length(len(self._queue[0].prompt), self.buckets)
        take, keep = [], collections.deque()
        for job in self._queue:
            fits = len(take) < self.max_batch and (not take or self._shares(take[0], job))
            if fits and bucket_length(len(job.prompt), self.buckets) == bucket:
                take.append(job)
            else:
                keep.append(job)
        self._queue = keep
        return take

    def _shares(self, first: Job, job: Job) -> bool:
        """Whether `job` may share a cohort with `first` (same prompt bucket). Always, unless the
        model's RoPE switches regime with the sequence length (longrope): every forward of a
        cohort uses the factors of its longest row, so both must fit a cohort whose slots
        (prompt bucket + headroom) stay within `original_max_position_embeddings`, where every
        row keeps the short factors it gets served alone."""
        if self._short_len is None:
            return True
        P = bucket_length(len(first.prompt), self.buckets)
        return all(
            P + bucket_length(max(j.max_tokens - 1, 1), HEADROOM_BUCKETS) <= self._short_len
            for j in (first, job)
        )

    def _admit(self, jobs: list[Job]) -> None:
        """Jobs of one prompt bucket: into a running cohort that can hold them (the fullest
        one, so batches grow rather than multiply), else into a cohort of their own. Jobs
        past the cohort's free rows go back to the front of the queue. One-token jobs whose
        prompt is memoised are answered first (`memo_bytes`)."""
        if self._memo is not None:
            left = [j for j in jobs if not self._memo.answer(j)]
            self.stats["memo_hits"] += len(jobs) - len(left)
            if not left:
                return
            jobs = left
        P = bucket_length(len(jobs[0].prompt), self.buckets)
        need = max(j.max_tokens for j in jobs) - 1  # steps after the prefill's token
        fits = [
            c
            for c in self._cohorts
            if c.index >= P
            and c.slots - c.index >= need
            and c.live < self.max_batch
            and self._short_len is None  # longrope: no joins (`_shares`, `splice_rows`)
        ]
        if fits:
            c = max(fits, key=lambda c: c.live)
            room = self.max_batch - c.live
            if room < len(jobs):
                with self._cv:
                    self._queue.extendleft(reversed(jobs[room:]))
                jobs = jobs[:room]
            self._join(c, jobs, P)
            return
        self._prefill(jobs, bucket_length(max(need, 1), HEADROOM_BUCKETS))

    def _prefill_rows(self, jobs: list[Job], headroom: int):
        """One prefill of `jobs` padded to a batch bucket: (state, log-probs [B, V] of each
        row's first new token); prompt log-probs go to the jobs that want them."""
        B = bucket_length(len(jobs), BATCH_BUCKETS)
        rows = [list(j.prompt) for j in jobs] + [[self.pad_id]] * (B - len(jobs))
        tokens, mask = pad_prompts(
            rows, pad_id=self.pad_id, buckets=self.buckets, vocab_size=self.cfg.vocab_size
        )
        scored = any(getattr(j, "wants_prompt", False) for j in jobs)
        fn = prefill_scored_jit if scored else prefill_jit
        state, out = fn(self.params, tokens, mask, cfg=self.cfg, max_new_tokens=headroom,
                        key=self._key, lora=self.lora)  # fmt: skip
        if not scored:
            lp_BV = np.asarray(_log_softmax(out))
            if self._memo is not None:
                self._memo.store(jobs, lp_BV)
            return state, lp_BV
        lp_BPV = np.asarray(out)
        for b, j in enumerate(jobs):
            if getattr(j, "wants_prompt", False):
                j.on_prompt_logprobs(lp_BPV[b, tokens.shape[1] - len(j.prompt) :])
        return state, lp_BPV[:, -1]

    def _prefill(self, jobs: list[Job], headroom: int) -> None:
        try:
            state, lp = self._prefill_rows(jobs, headroom)
        except Exception as e:  # noqa: BLE001  (a failed call fails its jobs, not the server)
            for j in jobs:
                j.on_error(f"{type(e).__name__}: {e}")
            return
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(jobs)
        self.stats["cohorts"] += 1
        B = state.token.shape[0]
        cohort = _Cohort(state, [*jobs, *[None] * (B - len(jobs))], np.full(B, self.pad_id),
                         index=int(state.cache.max_len - headroom))  # fmt: skip
        self._feed(cohort, lp, range(len(jobs)))
        if cohort.live:
            self._cohorts.append(cohort)

    def _join(self, c: _Cohort, jobs: list[Job], P: int) -> None:
        """Prefills `jobs` (prompt bucket P, no headroom) and splices them into free rows of
        cohort `c` (grown to the next batch bucket when it has too few)."""
        try:
            new, lp = self._prefill_rows(jobs, 0)
            free = [b for b, j in enumerate(c.jobs) if j is None]
            if len(free) < len(jobs):
                B = bucket_length(c.live + len(jobs), BATCH_BUCKETS)
                grown = resize_rows(c.state, B)
                c.state = grown
                c.jobs += [None] * (B - len(c.jobs))
                c.tokens = np.concatenate([c.tokens, np.full(B - len(c.tokens), self.pad_id)])
                free = [b for b, j in enumerate(c.jobs) if j is None]
                self.stats["grown"] += 1
            rows = free[: len(jobs)]
            J = new.token.shape[0]
            rows_J = np.full(J, len(c.jobs), np.int32)  # padding rows: dropped
            rows_J[: len(jobs)] = rows
            cache = splice_rows(c.state.cache, new.cache, jnp.asarray(rows_J), c.state.cache.index)
            c.state = dataclasses.replace(c.state, cache=cache)
        except Exception as e:  # noqa: BLE001
            for j in jobs:
                j.on_error(f"{type(e).__name__}: {e}")
            return
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(jobs)
        self.stats["joins"] += 1
        self.stats["joined_rows"] += len(jobs)
        for b, j in zip(rows, jobs, strict=True):
            c.jobs[b] = j
        self._feed(c, lp, range(len(jobs)), rows)

    def _feed(self, cohort: _Cohort, lp_XV: np.ndarray, lp_rows, rows=None) -> None:
        """Gives each job its log-probs row (`lp_XV[lp_rows[i]]` for cohort row `rows[i]`,
        default the same index) and records the token it feeds next; a finished job frees
        its row."""
        rows = lp_rows if rows is None else rows
        for x, b in zip(lp_rows, rows, strict=True):
            job = cohort.jobs[b]
            if job is None:
                continue
            try:
                nxt = job.on_logprobs(lp_XV[x])
            except Exception as e:  # noqa: BLE001
                job.on_error(f"{type(e).__name__}: {e}")
                nxt = None
            if nxt is None:
                cohort.jobs[b] = None
                cohort.tokens[b] = self.pad_id
            else:
                cohort.tokens[b] = nxt

    def _compact(self, c: _Cohort) -> None:
        """Shrinks a cohort whose live rows fit a batch bucket four times smaller to that
        bucket (fewer rows computed each step for the rows still decoding)."""
        B = len(c.jobs)
        small = bucket_length(max(c.live, 1), BATCH_BUCKETS)
        if 4 * small > B or self._short_len is not None:  # longrope: served as prefilled
            return
        keep = [b for b, j in enumerate(c.jobs) if j is not None]
        keep_R = np.full(small, B, np.int32)  # past the old rows: empty rows
        keep_R[: len(keep)] = keep
        c.state = resize_rows(c.state, small, jnp.asarray(keep_R))
        c.jobs = [c.jobs[b] for b in keep] + [None] * (small - len(keep))
        c.tokens = np.concatenate([c.tokens[keep], np.full(small - len(keep), self.pad_id)])
        self.stats["compacted"] += 1

    def _advance(self) -> None:
        cohorts, self._cohorts = self._cohorts, []
        for c in cohorts:
            if not c.live:
                continue
            state = dataclasses.replace(c.state, token=jnp.asarray(c.tokens, jnp.int32))
            try:
                c.state, logits = advance_jit(self.params, state, cfg=self.cfg, lora=self.lora)
                lp = np.asarray(_log_softmax(logits))
            except Exception as e:  # noqa: BLE001
                for j in c.jobs:
                    if j is not None:
                        j.on_error(f"{type(e).__name__}: {e}")
                continue
            c.index += 1
            self.stats["steps"] += 1
            self.stats["step_rows"] += c.live
            self._feed(c, lp, range(len(c.jobs)))
            if c.live:
                self._compact(c)
                self._cohorts.append(c)
