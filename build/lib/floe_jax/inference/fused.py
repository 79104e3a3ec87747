"""Fused edge-cloud generation under a per-token deadline (the host loop around `fused_step`).

Shapes: B batch (padded to a batch bucket), P prompt bucket, N max new tokens, V edge vocab.

`generate_fused` decodes a batch of requests token by token (`decode_token`). For token t it
sends the prefix so far (prompt + fused tokens, as ids and text) through the privacy guard to the
cloud on a thread pool, runs the edge forward meanwhile, and waits for the cloud until the
deadline `tau` (`floe_jax.inference.deadline`). A row whose distribution has not arrived (or
failed, or was withheld) gets `w = 1`. To overlap the cloud wait with the edge forward the loop
dispatches the step's two halves, `floe_jax.decode.advance` and `fuse_sample`, as separate
programs; `overlap=False` runs the single `fused_step` program after the wait.

Clocks: under `RealClock` latencies are measured. Under `SimClock` the edge and cloud compute
times are measured one after the other (so they do not contend for the CPU) and the network delay
is drawn from `SimulatedNetwork`; a token then costs
`max(edge_s, min(delay + cloud_s, tau)) + fuse_s` of virtual time.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ConfigError, ModelConfig, require_finite
from floe_jax.decode import (
    DEFAULT_BUCKETS,
    DecodeState,
    SamplingConfig,
    advance_jit,
    eos_tuple,
    pad_prompts,
    prefill_jit,
)
from floe_jax.inference.align import StringMapper, VocabMap
from floe_jax.inference.cloud import CloudDistribution, Prefix
from floe_jax.inference.deadline import (
    RealClock,
    SimulatedNetwork,
    call_cloud,
    collect_real,
    collect_simulated,
)
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector
from floe_jax.inference.replies import cloud_input, merge_rows, reason, unmapped_rows
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.step import fuse_sample_jit, fused_step_jit, rows_lora
from floe_jax.lora import LoRA
from floe_jax.model import unstack_layers

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusedDecodeConfig:
    """How `generate_fused` decodes (static: hashable, every field a plain value).

    Attributes:
      max_new_tokens: N.
      deadline_s: tau; a cloud distribution later than this is not used (`w = 1`).
      fusion: the router, fusion and alignment (`FusionConfig`).
      sampling: how a token is chosen from the fused distribution.
      top_k: columns of the sparse cloud input.
      eos_id, pad_id: stop id (or a tuple of them: any one stops a row) and filler.
      buckets, batch_buckets: prompt-length and batch buckets (compiles are per bucket).
      overlap: dispatch the edge half before waiting for the cloud (real clock); False runs the
        single `fused_step` program after the wait.
      max_workers: threads that call the cloud.
      real_timeout_s: hard wall-time cap on waiting for one cloud reply under `SimClock`.
      speculate: 0 decodes token by token; k > 0 decodes speculatively, one cloud call per round
        of up to k drafted tokens (`floe_jax.inference.speculative`): the same greedy output,
        the same distribution when sampling, fewer round trips.
      adapt_k: choose each round's draft length in [1, speculate] from the measured acceptance
        rate, round trip and edge step (False: always `speculate`).
      propose: with `speculate=k`, for chat-only clouds (no prompt log-probs): the cloud proposes
        its next k tokens in one chat call and the edge verifies them in one forward
        (`propose_decode.propose_round`) instead of the edge drafting and the cloud scoring.
    """

    max_new_tokens: int
    deadline_s: float = 0.2
    fusion: FusionConfig = FusionConfig()
    sampling: SamplingConfig = SamplingConfig()
    top_k: int = 20
    eos_id: int | tuple[int, ...] | None = None
    pad_id: int = 0
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    batch_buckets: tuple[int, ...] = BATCH_BUCKETS
    overlap: bool = True
    max_workers: int = 8
    real_timeout_s: float = 30.0
    speculate: int = 0
    adapt_k: bool = True
    propose: bool = False

    def __post_init__(self):
        if self.eos_id is not None and not isinstance(self.eos_id, int):
            ids = eos_tuple(self.eos_id)
            if not ids:
                raise ConfigError("eos_id must be an id, a non-empty tuple of ids, or None")
            object.__setattr__(self, "eos_id", ids)  # hashable: a static argument
        for name in ("buckets", "batch_buckets"):
            v = tuple(int(b) for b in getattr(self, name))
            if not v or any(b < 1 for b in v) or list(v) != sorted(v):
                raise ConfigError(f"{name} must be increasing positive sizes, got {v}")
            object.__setattr__(self, name, v)
        for name in ("max_new_tokens", "top_k", "max_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if math.isnan(self.deadline_s):  # inf is allowed: no deadline
            raise ConfigError(f"deadline_s must be a number >= 0, got {self.deadline_s}")
        require_finite("FusedDecodeConfig", real_timeout_s=self.real_timeout_s)
        if self.deadline_s < 0:
            raise ConfigError(f"deadline_s must be >= 0, got {self.deadline_s}")
        if self.real_timeout_s <= 0:
            raise ConfigError(f"real_timeout_s must be > 0, got {self.real_timeout_s}")
        if self.speculate < 0:
            raise ConfigError(f"speculate must be >= 0, got {self.speculate}")
        if self.propose and not self.speculate:
            raise ConfigError("propose needs speculate=k > 0 (the tokens a chat call proposes)")
        if self.speculate and self.fusion.gate == "proxy":
            raise ConfigError('speculate needs a mixture gate: gate="proxy" is token by token')


@dataclasses.dataclass
class FusedResult:
    """What `generate_fused` produced and measured.

    Attributes:
      tokens: per request, the generated ids (up to and including EOS).
      latency_s: [N] seconds per step (virtual under `SimClock`, wall under `RealClock`).
      edge_s, cloud_s: [N] measured edge step time, and slowest cloud reply that step (0 if none).
      w: [N, B] edge weight per token (1 where the cloud missed), NaN after a row stopped.
      fused: [N, B] the cloud's distribution was used for that token.
      failures: reasons rows had no cloud distribution (`deadline`, `privacy`, `lost`, errors...).
      privacy: the detector's counters (spans by type, requests by decision).
      speculation: with `speculate`: cloud calls, calls answered in time, acceptance rate of
        drafted (or proposed) tokens, tokens per call, mean draft length, drafts stopped early,
        tokens drafted ahead during a wait and kept.

    Under speculation a round's tokens arrive together: `latency_s` holds the round's time at its
    first token and 0 at the others (the mean is still the time per token).
    """

    tokens: list[list[int]]
    latency_s: np.ndarray
    edge_s: np.ndarray
    cloud_s: np.ndarray
    w: np.ndarray
    fused: np.ndarray
    failures: Counter
    privacy: dict
    speculation: dict = dataclasses.field(default_factory=dict)

    @property
    def share_fused(self) -> float:
        live = ~np.isnan(self.w)
        return float(self.fused[live].mean()) if live.any() else 0.0

    @property
    def ms_per_token(self) -> float:
        return float(self.latency_s.mean() * 1e3) if self.latency_s.size else 0.0


# ----------------------------------------------------------------------------- one run


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusedRun:
    """What one `generate_fused` call fixes before its first token.

    Attributes:
      params, cfg: the edge model (params in the decode layout).
      config: the decoding options.
      guard: the only way to the cloud (None: edge-only).
      rows: B token lists, the n requests then batch padding; `tokens`, `mask` [B, P] padded.
      n: real requests.
      lora: None, one adapter, or per-row adapters in the `rows_lora` layout.
      key: sampling key.
      clock, network, decode, vocab_map, mapper: see `generate_fused`.
      pool: the threads that call the cloud; stream: names this run's request streams.
    """

    params: dict
    cfg: ModelConfig
    config: FusedDecodeConfig
    guard: GuardedCloud | None
    rows: list[list[int]]
    tokens: np.ndarray
    mask: np.ndarray
    n: int
    lora: LoRA | None
    key: jax.Array
    clock: object
    network: SimulatedNetwork | None
    decode: Callable[[Sequence[int]], str] | None
    vocab_map: VocabMap | None
    mapper: StringMapper | None
    pool: cf.ThreadPoolExecutor
    stream: object

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def kind(self) -> str:
        return self.guard.kind if self.guard is not None else "dense"

    @property
    def cache_slots(self) -> int:
        """Edge cache slots past the prompt. Speculating, a round moves every row's cache
        position by the most tokens any row emitted in it (rows that keep fewer leave gaps), at
        most the sum over the n rows, so N tokens per row take at most n * N slots (rows taking
        turns keeping k tokens come close: about n N (k + 1) / (k + n)); a round drafts up to
        2k + 1 more (k sent, k ahead)."""
        c = self.config
        if not c.speculate:
            return c.max_new_tokens
        return max(1, self.n) * c.max_new_tokens + 2 * c.speculate + 1

    @property
    def cloud_size(self) -> int:
        V = self.cfg.vocab_size if self.vocab_map is None else self.vocab_map.cloud_size
        if self.kind == "dense" and self.guard is not None and getattr(self.guard, "vocab_size", 0):
            return self.guard.vocab_size
        return V


@dataclasses.dataclass
class EdgeCarry:
    """The device side between tokens: the edge's state and its logits for the next token (and
    the adapter-free base model's, for `gate="proxy"`)."""

    state: DecodeState | None = None
    logits: jax.Array | None = None
    base_state: DecodeState | None = None
    base_logits: jax.Array | None = None


@dataclasses.dataclass
class FusedLog:
    """The host side between tokens: tokens so far, stop flags and what was measured."""

    outs: list[list[int]]
    done: np.ndarray
    w: np.ndarray
    fused: np.ndarray
    latency_s: list[float] = dataclasses.field(default_factory=list)
    edge_s: list[float] = dataclasses.field(default_factory=list)
    cloud_s: list[float] = dataclasses.field(default_factory=list)
    failures: Counter = dataclasses.field(default_factory=Counter)


def request_budget(run: FusedRun, delay_s: float | None) -> float | None:
    """Wall seconds a cloud request may take once started (`Prefix.budget_s`): the deadline less
    the network's delay (simulated time counts the measured compute against the deadline too),
    under `SimClock` at most `real_timeout_s` (all of it when the network fixes the compute)."""
    c = run.config
    sim = getattr(run.clock, "simulated", False)
    if sim and run.network is not None and run.network.server_ms is not None:
        return c.real_timeout_s
    budget = max(c.deadline_s - (delay_s or 0.0), 0.0)
    if sim:
        return min(budget, c.real_timeout_s)
    return budget if math.isfinite(budget) else None


def _send(run: FusedRun, active: list[int], log: FusedLog):
    """Puts token t's cloud requests of the active rows on the pool: (futures, delays)."""
    futures, delays = {}, {}
    if run.guard is None:
        return futures, delays
    sleep = not getattr(run.clock, "simulated", False)
    for b in active:
        ids = run.rows[b] + log.outs[b]
        text = run.decode(ids) if run.decode is not None else None
        prefix = Prefix(ids=ids, text=text, stream=(run.stream, b))
        d = run.network.sample(prefix.payload_bytes()) if run.network is not None else 0.0
        prefix = dataclasses.replace(prefix, budget_s=request_budget(run, d))
        delays[b] = d
        futures[b] = run.pool.submit(call_cloud, run.guard, prefix, d, sleep)
    return futures, delays


def edge_half(run: FusedRun, t: int, edge: EdgeCarry) -> EdgeCarry:
    """Prefill (t = 0) or advance the edge (and the proxy's base model) by one token."""
    proxy = run.config.fusion.gate == "proxy"
    if t == 0:
        kw = dict(cfg=run.cfg, max_new_tokens=run.cache_slots, key=run.key)
        done = jnp.asarray(np.arange(run.batch) >= run.n)
        state, logits = prefill_jit(
            run.params, run.tokens, run.mask, lora=run.lora, done=done, **kw
        )
        edge = EdgeCarry(state, logits)
        if proxy:  # the edge base model, without adapters, decodes beside it
            edge.base_state, edge.base_logits = prefill_jit(
                run.params, run.tokens, run.mask, lora=None, done=done, **kw
            )
        return edge
    edge.state, edge.logits = advance_jit(run.params, edge.state, cfg=run.cfg, lora=run.lora)
    if proxy:
        edge.base_state, edge.base_logits = advance_jit(
            run.params, edge.base_state, cfg=run.cfg, lora=None
        )
    return edge


def decode_token(run: FusedRun, t: int, edge: EdgeCarry, log: FusedLog) -> EdgeCarry:
    """Token t of every active row: cloud requests out, edge forward, cloud replies in until the
    deadline, then fusion and sampling. Appends to `log`; returns the carry for token t + 1."""
    c, clock = run.config, run.clock
    sim = getattr(clock, "simulated", False)
    t_start = clock.now()
    active = [b for b in range(run.n) if not log.done[b]]
    futures, delays = _send(run, active, log)
    if sim:  # measure the cloud alone first: no CPU contention with the edge step
        server_s = None if run.network is None else run.network.server_s
        got, wait_s, slowest = collect_simulated(
            futures, delays, c.deadline_s, c.real_timeout_s, server_s
        )
    # --- edge half: the cloud requests are already in flight on the pool
    e0 = time.perf_counter()
    split = t == 0 or c.overlap or c.fusion.gate == "proxy"
    if split:
        edge = edge_half(run, t, edge)
        jax.block_until_ready((edge.logits, edge.base_logits))
    edge_s = time.perf_counter() - e0
    if not sim:  # wait for what is left of the deadline
        got, slowest = collect_real(futures, t_start, c.deadline_s, clock)
    B = run.batch
    dist = merge_rows(got, B, run.kind) if got else CloudDistribution.missing(B, "no cloud")
    for b in active:
        if b in got and not got[b].ok[0]:
            log.failures[reason(got[b].errors[0])] += 1
    ci = cloud_input(
        dist, B, run.cfg.vocab_size, kind=run.kind, cloud_size=run.cloud_size, top_k=c.top_k,
        vocab_map=run.vocab_map, mapper=run.mapper,
    )  # fmt: skip
    if unmapped := unmapped_rows(dist, ci):  # answered onto no edge token: a failure, not fused
        log.failures["unmapped"] += len(unmapped)
    # --- fuse and sample (or the whole single-program step)
    static = dict(fusion=c.fusion, sampling=c.sampling, eos_id=c.eos_id, pad_id=c.pad_id)
    f0 = time.perf_counter()
    if split:
        edge.state, aux = fuse_sample_jit(
            edge.state, edge.logits, ci, base_logits_BV=edge.base_logits, **static
        )
        if edge.base_state is not None:  # its own buffer: both states are donated next token
            edge.base_state = dataclasses.replace(edge.base_state, token=jnp.copy(edge.state.token))
    else:
        edge.state, aux = fused_step_jit(
            run.params, edge.state, ci, run.cfg, lora=run.lora, **static
        )
    tok = np.asarray(edge.state.token)
    fuse_s = time.perf_counter() - f0
    if not split:
        edge_s, fuse_s = fuse_s, 0.0
    w = np.asarray(aux["w"])
    for b in active:
        log.outs[b].append(int(tok[b]))
        log.w[t, b] = w[b]
        log.fused[t, b] = bool(ci.ok[b])
        if int(tok[b]) in eos_tuple(c.eos_id):
            log.done[b] = True
    if sim:
        step_s = max(edge_s, wait_s) + fuse_s
        clock.advance(step_s)
    else:
        step_s = clock.now() - t_start
    log.latency_s.append(step_s)
    log.edge_s.append(edge_s)
    log.cloud_s.append(slowest)
    return edge


# ----------------------------------------------------------------------------- the loop


def _batch_bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"batch of {n} is larger than the largest batch bucket {max(buckets)}")


def _pad_lora(lora: LoRA | None, n: int, B: int) -> LoRA | None:
    if lora is None or lora.scale.ndim == 0:
        return lora
    if lora.scale.shape[0] != n:
        raise ValueError(f"stacked LoRA has {lora.scale.shape[0]} rows for {n} prompts")
    if B != n:
        lora = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], B - n, 0)]), lora)
    return rows_lora(lora)


def generate_fused(
    params: dict,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    cloud,
    config: FusedDecodeConfig,
    lora: LoRA | None = None,
    key: jax.Array | None = None,
    clock=None,
    network: SimulatedNetwork | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    vocab_map: VocabMap | None = None,
    mapper: StringMapper | None = None,
) -> FusedResult:
    """Generates for a batch of requests with edge-cloud fusion under a per-token deadline.

    Args:
      params, cfg: the edge model.
      prompts: token id lists (edge vocabulary), one per request.
      cloud: a `GuardedCloud`, or a bare back end (then wrapped with a default `PrivacyDetector`
        and `decode`: the loop only reaches the cloud through the guard); None decodes edge-only.
      config: max new tokens, deadline, router, sampling, buckets (`FusedDecodeConfig`).
      lora: None, one adapter for all rows, or a stacked adapter with one row per prompt.
      key: PRNG key for sampling (token t uses `fold_in(key, t)`).
      clock: `RealClock()` (default) or `SimClock()`.
      network: simulated delays (sleeps in a worker under a real clock, virtual under `SimClock`).
      decode: edge ids -> text, so the cloud (and the privacy detector) get text.
      vocab_map: cloud -> edge ids (None: shared vocabulary).
      mapper: token strings -> edge ids, for back ends that name tokens by string.
    """
    c = config
    guard = cloud
    if cloud is not None and not isinstance(cloud, GuardedCloud):
        guard = GuardedCloud(cloud, PrivacyDetector(), decode=decode)
    if c.propose and guard is not None and not guard.can_propose:
        raise ConfigError(f"propose=True needs a cloud that proposes tokens (a chat HTTPCloud); "
                          f"{guard.backend_name} cannot")  # fmt: skip
    n = len(prompts)
    B = _batch_bucket(n, c.batch_buckets)
    rows = [list(map(int, p)) for p in prompts] + [[c.pad_id]] * (B - n)
    tokens, mask = pad_prompts(rows, pad_id=c.pad_id, buckets=c.buckets, vocab_size=cfg.vocab_size)
    log = FusedLog(
        outs=[[] for _ in range(n)],
        done=np.arange(B) >= n,
        w=np.full((c.max_new_tokens, n), np.nan, np.float32),
        fused=np.zeros((c.max_new_tokens, n), bool),
    )
    pool = cf.ThreadPoolExecutor(max_workers=c.max_workers, thread_name_prefix="floe-cloud")
    run = FusedRun(
        params=unstack_layers(params), cfg=cfg, config=c, guard=guard, rows=rows, tokens=tokens,
        mask=mask, n=n, lora=_pad_lora(lora, n, B),
        key=jax.random.key(0) if key is None else key, clock=clock or RealClock(),
        network=network, decode=decode, vocab_map=vocab_map, mapper=mapper, pool=pool,
        stream=object(),  # a new stream per run: a back end never mixes two runs' caches
    )  # fmt: skip
    spec = None
    try:
        edge = EdgeCarry()
        if c.speculate:
            spec = _speculate(run, edge, log)
        else:
            for t in range(c.max_new_tokens):
                edge = decode_token(run, t, edge, log)
                if log.done[:n].all():
                    break
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    steps = len(log.latency_s)
    return FusedResult(
        tokens=log.outs,
        latency_s=np.asarray(log.latency_s),
        edge_s=np.asarray(log.edge_s),
        cloud_s=np.asarray(log.cloud_s),
        w=log.w[:steps],
        fused=log.fused[:steps],
        failures=log.failures,
        privacy=guard.detector.stats() if guard is not None else {},
        speculation=spec.summary() if spec is not None else {},
    )


def _speculate(run: FusedRun, edge: EdgeCarry, log: FusedLog):
    """The speculative loop (`floe_jax.inference.speculative`)."""
    from floe_jax.inference import speculative  # it builds on this module's run and carry

    return speculative.speculate(run, edge, log)
