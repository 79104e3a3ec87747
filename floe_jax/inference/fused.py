"""Fused edge-cloud decoding: one jitted padded step, and the generation loop with a deadline.

Shapes: B batch (padded to a batch bucket), P prompt bucket, N max new tokens, V edge vocab,
W cloud vocab, K listed cloud tokens.

The step (`fused_step`) is one compiled program: the edge forward of the last token with its KV
cache and LoRA (one adapter per row: a stacked `LoRA` is laid out layer-major once by `rows_lora`
and each row adds its own low-rank update to the shared base matmul, `lora.lora_delta`),
alignment of the cloud distribution already fetched (`CloudInput`), the router, fusion and
sampling. Batch, prompt length, cloud shape and adapter ranks are fixed per bucket, so steps and
clients never recompile.

`generate_fused` drives it from the host. For token t it sends the prefix so far (prompt + fused
tokens, as ids and text) through the privacy guard to the cloud on a thread pool, runs the edge
forward meanwhile, and waits for the cloud until the deadline `tau`. A row whose distribution has
not arrived (or failed, or was withheld) gets `w = 1`. To overlap the cloud wait with the edge
forward the loop dispatches the step's two halves, `edge_advance` and `fuse_sample`, as separate
programs (JAX dispatch is asynchronous; `fused_step` is exactly their composition, and
`overlap=False` runs the single program instead).

Clocks: under `RealClock` latencies are measured. Under `SimClock` the edge and cloud compute
times are measured one after the other (so they do not contend for the CPU) and the network delay
is drawn from `SimulatedNetwork`; a token then costs
`max(edge_s, min(delay + cloud_s, tau)) + fuse_s` of virtual time.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ModelConfig
from floe_jax.decode import DEFAULT_BUCKETS, DecodeState, SamplingConfig, pad_prompts, sample_logits
from floe_jax.inference.align import StringMapper, VocabMap, align_dense, align_sparse
from floe_jax.inference.cloud import CloudDistribution, Prefix, RealClock, SimulatedNetwork
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector
from floe_jax.inference.replies import CloudInput, cloud_input, merge_rows, reason
from floe_jax.inference.router import FusionConfig, edge_weight, fuse, proxy_tuning
from floe_jax.lora import LoRA
from floe_jax.model import forward, init_cache, unstack_layers

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_FUSION = FusionConfig()
_GREEDY = SamplingConfig()


# ----------------------------------------------------------------------------- jitted pieces


def rows_lora(lora: LoRA) -> LoRA:
    """A stacked adapter (leading row axis B: one client per batch row) in the layer-major layout
    the model's per-row LoRA path reads: `a [L, B, I, R]`, `b [L, B, R, O]`, `mask [L, B, R]`,
    `scale [B]`. Done once per generation, outside the step."""
    if lora.scale.ndim != 1:
        raise ValueError("rows_lora needs a stacked LoRA (scale of shape [B])")
    t = lambda x: jnp.swapaxes(x, 0, 1)
    return LoRA(
        a={m: t(v) for m, v in lora.a.items()},
        b={m: t(v) for m, v in lora.b.items()},
        mask={m: t(v) for m, v in lora.mask.items()},
        scale=lora.scale,
    )


def edge_prefill(
    params, tokens, mask, done, key, cfg: ModelConfig, *, max_new_tokens: int, lora=None
) -> tuple[DecodeState, jax.Array]:
    """Prompt [B, P] through the edge. Returns (state at step 0, logits [B, V] of token 0)."""
    B, P = tokens.shape
    cache = init_cache(cfg, B, P + max_new_tokens)
    logits, cache = forward(params, tokens, cfg, lora=lora, cache=cache, mask=mask, last_only=True)
    state = DecodeState(
        cache=cache,
        token=tokens[:, -1],
        out=jnp.zeros((B, max_new_tokens), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        done=done,
        key=key,
    )
    return state, logits[:, -1]


def edge_advance(params, state: DecodeState, cfg: ModelConfig, *, lora=None):
    """Feeds `state.token` to the edge. Returns (state with the cache advanced, logits [B, V])."""
    logits, cache = forward(params, state.token[:, None], cfg, lora=lora, cache=state.cache)
    return dataclasses.replace(state, cache=cache), logits[:, 0]


def aligned_cloud(cloud: CloudInput, logp_e_BV, fusion: FusionConfig) -> jax.Array:
    """The cloud's log-probs on the edge vocabulary [B, V]."""
    V = logp_e_BV.shape[-1]
    if cloud.is_dense:
        c2e = cloud.c2e if cloud.c2e.shape[0] > 0 else None
        return align_dense(cloud.dense, c2e, V)
    return align_sparse(
        cloud.ids, cloud.logp, cloud.valid, V, tail=fusion.align.tail, edge_logp_BV=logp_e_BV
    )


def fuse_sample(
    state: DecodeState,
    logits_BV: jax.Array,
    cloud: CloudInput,
    *,
    fusion: FusionConfig,
    sampling: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    base_logits_BV: jax.Array | None = None,
) -> tuple[DecodeState, dict]:
    """Aligns, routes, fuses and samples token `state.step`. Returns (state, {"w": [B]}).

    `base_logits_BV`: the edge base model's logits (no adapters), for `fusion.gate="proxy"`.
    """
    with jax.named_scope("fuse"):
        logp_e = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
        logp_c = aligned_cloud(cloud, logp_e, fusion)
        logp_c = jnp.where(cloud.ok[:, None], logp_c, logp_e)  # never let a missing row leak
        w = edge_weight(logp_e, logp_c, cloud.ok, fusion)
        if fusion.gate == "proxy":
            if base_logits_BV is None:
                raise ValueError('gate="proxy" needs the edge base logits (base_logits_BV)')
            base = jax.nn.log_softmax(base_logits_BV.astype(jnp.float32), axis=-1)
            fused = jnp.where(cloud.ok[:, None], proxy_tuning(logp_c, logp_e, base), logp_e)
        else:
            fused = fuse(logp_e, logp_c, w, fusion.space)
    nxt = sample_logits(fused, jax.random.fold_in(state.key, state.step), sampling)
    nxt = jnp.where(state.done, pad_id, nxt)
    done = state.done if eos_id is None else state.done | (nxt == eos_id)
    out = jax.lax.dynamic_update_slice(state.out, nxt[:, None], (0, state.step))
    new = dataclasses.replace(state, token=nxt, out=out, step=state.step + 1, done=done)
    return new, {"w": w}


def fused_step(
    params,
    state: DecodeState,
    cloud: CloudInput,
    cfg: ModelConfig,
    *,
    fusion: FusionConfig = _FUSION,
    sampling: SamplingConfig = _GREEDY,
    lora: LoRA | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> tuple[DecodeState, dict]:
    """One fused decode step: edge forward of `state.token`, then `fuse_sample` with `cloud`.

    `lora` is None, one adapter for every row, or per-row adapters in the `rows_lora` layout.
    """
    state, logits = edge_advance(params, state, cfg, lora=lora)
    return fuse_sample(
        state, logits, cloud, fusion=fusion, sampling=sampling, eos_id=eos_id, pad_id=pad_id
    )


_FUSE_STATIC = ("fusion", "sampling", "eos_id", "pad_id")
prefill_jit = jax.jit(edge_prefill, static_argnames=("cfg", "max_new_tokens"))
advance_jit = jax.jit(edge_advance, static_argnames=("cfg",), donate_argnames=("state",))
fuse_sample_jit = jax.jit(fuse_sample, static_argnames=_FUSE_STATIC, donate_argnames=("state",))
fused_step_jit = jax.jit(
    fused_step, static_argnames=("cfg", *_FUSE_STATIC), donate_argnames=("state",)
)


# ----------------------------------------------------------------------------- host side


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
    """

    tokens: list[list[int]]
    latency_s: np.ndarray
    edge_s: np.ndarray
    cloud_s: np.ndarray
    w: np.ndarray
    fused: np.ndarray
    failures: Counter
    privacy: dict

    @property
    def share_fused(self) -> float:
        live = ~np.isnan(self.w)
        return float(self.fused[live].mean()) if live.any() else 0.0

    @property
    def ms_per_token(self) -> float:
        return float(self.latency_s.mean() * 1e3) if self.latency_s.size else 0.0


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


_RUN = itertools.count()


def _call_cloud(guard: GuardedCloud, prefix: Prefix, delay_s: float | None, sleep: bool):
    """Worker: (distribution, compute seconds). Never raises."""
    if delay_s is None:
        return CloudDistribution.missing(1, "lost"), 0.0
    if sleep and delay_s > 0:
        time.sleep(delay_s)  # real clock with a simulated network: the delay is real
    t0 = time.perf_counter()
    try:
        d = guard.next_token([prefix]).sanitized()
    except Exception as e:  # noqa: BLE001  (a broken back end degrades to the edge)
        d = CloudDistribution.missing(1, f"{type(e).__name__}: {e}")
    return d, time.perf_counter() - t0


def generate_fused(
    params: dict,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    cloud,
    max_new_tokens: int,
    fusion: FusionConfig = _FUSION,
    sampling: SamplingConfig = _GREEDY,
    lora: LoRA | None = None,
    key: jax.Array | None = None,
    deadline_s: float = 0.2,
    clock=None,
    network: SimulatedNetwork | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    vocab_map: VocabMap | None = None,
    mapper: StringMapper | None = None,
    top_k: int = 20,
    eos_id: int | None = None,
    pad_id: int = 0,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    batch_buckets: Sequence[int] = BATCH_BUCKETS,
    overlap: bool = True,
    max_workers: int = 8,
    real_timeout_s: float = 30.0,
) -> FusedResult:
    """Generates for a batch of requests with edge-cloud fusion under a per-token deadline.

    Args:
      params, cfg: the edge model.
      prompts: token id lists (edge vocabulary), one per request.
      cloud: a `GuardedCloud`, or a bare back end (then wrapped with a default `PrivacyDetector`
        and `decode`: the loop only reaches the cloud through the guard); None decodes edge-only.
      max_new_tokens: N.
      fusion, sampling: router/fusion/alignment and sampling (static).
      lora: None, one adapter for all rows, or a stacked adapter with one row per prompt.
      key: PRNG key for sampling (token t uses `fold_in(key, t)`).
      deadline_s: tau; a cloud distribution later than this is not used (`w = 1`).
      clock: `RealClock()` (default) or `SimClock()`.
      network: simulated delays (sleeps in a worker under a real clock, virtual under `SimClock`).
      decode: edge ids -> text, so the cloud (and the privacy detector) get text.
      vocab_map: cloud -> edge ids (None: shared vocabulary).
      mapper: token strings -> edge ids, for back ends that name tokens by string.
      top_k: columns of the sparse cloud input.
      eos_id, pad_id: stop id and filler.
      buckets, batch_buckets: prompt-length and batch buckets (compiles are per bucket).
      overlap: dispatch the edge half before waiting for the cloud (real clock); False runs the
        single `fused_step` program after the wait.
      real_timeout_s: hard wall-time cap on waiting for one cloud reply under `SimClock`.
    """
    clock = clock or RealClock()
    key = jax.random.key(0) if key is None else key
    guard = cloud
    if cloud is not None and not isinstance(cloud, GuardedCloud):
        guard = GuardedCloud(cloud, PrivacyDetector(), decode=decode)
    kind = guard.kind if guard is not None else "dense"
    n = len(prompts)
    B = _batch_bucket(n, batch_buckets)
    rows = [list(map(int, p)) for p in prompts] + [[pad_id]] * (B - n)
    tokens, mask = pad_prompts(rows, pad_id=pad_id, buckets=buckets)
    done0 = np.arange(B) >= n
    V = cfg.vocab_size
    cloud_size = V if vocab_map is None else vocab_map.cloud_size
    if kind == "dense" and guard is not None and getattr(guard, "vocab_size", None):
        cloud_size = guard.vocab_size
    lora_b = _pad_lora(lora, n, B)
    p_dec = unstack_layers(params)
    static = dict(fusion=fusion, sampling=sampling, eos_id=eos_id, pad_id=pad_id)

    run = next(_RUN)
    outs: list[list[int]] = [[] for _ in range(n)]
    done = done0.copy()
    lat, edge_t, cloud_t = [], [], []
    w_log = np.full((max_new_tokens, n), np.nan, np.float32)
    fused_log = np.zeros((max_new_tokens, n), bool)
    failures: Counter = Counter()
    sim = getattr(clock, "simulated", False)
    pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="floe-cloud")
    try:
        state = logits = base_state = base_logits = None
        proxy = fusion.gate == "proxy"
        for t in range(max_new_tokens):
            t_start = clock.now()
            active = [b for b in range(n) if not done[b]]
            futures, delays = {}, {}
            if guard is not None:
                for b in active:
                    ids = rows[b] + outs[b]
                    text = decode(ids) if decode is not None else None
                    prefix = Prefix(ids=ids, text=text, stream=(run, b))
                    d = network.sample(prefix.payload_bytes()) if network is not None else 0.0
                    delays[b] = d
                    futures[b] = pool.submit(_call_cloud, guard, prefix, d, not sim)
            got: dict[int, CloudDistribution] = {}
            if sim:  # measure the cloud alone first: no CPU contention with the edge step
                server_s = None
                if network is not None and network.server_ms is not None:
                    server_s = network.server_ms / 1e3
                wait_s, slowest = _collect(
                    futures, delays, got, None, deadline_s, clock, real_timeout_s, server_s
                )
            # --- edge half: the cloud requests are already in flight on the pool
            e0 = time.perf_counter()
            split = t == 0 or overlap or proxy
            if t == 0:
                state, logits = prefill_jit(
                    p_dec, tokens, mask, jnp.asarray(done0), key, cfg,
                    max_new_tokens=max_new_tokens, lora=lora_b,
                )  # fmt: skip
                if proxy:  # the edge base model, without adapters, decodes beside it
                    base_state, base_logits = prefill_jit(
                        p_dec, tokens, mask, jnp.asarray(done0), key, cfg,
                        max_new_tokens=max_new_tokens, lora=None,
                    )  # fmt: skip
            elif split:
                state, logits = advance_jit(p_dec, state, cfg, lora=lora_b)
                if proxy:
                    base_state, base_logits = advance_jit(p_dec, base_state, cfg, lora=None)
            if split:
                jax.block_until_ready((logits, base_logits))
            edge_s = time.perf_counter() - e0
            if not sim:  # wait for what is left of the deadline
                _, slowest = _collect(futures, delays, got, t_start, deadline_s, clock, 0.0)
            dist = merge_rows(got, B, kind) if got else CloudDistribution.missing(B, "no cloud")
            for b in active:
                if b in got and not got[b].ok[0]:
                    failures[reason(got[b].errors[0])] += 1
            ci = cloud_input(
                dist, B, V, kind=kind, cloud_size=cloud_size, top_k=top_k, vocab_map=vocab_map,
                mapper=mapper,
            )  # fmt: skip
            # --- fuse and sample (or the whole single-program step)
            f0 = time.perf_counter()
            if split:
                state, aux = fuse_sample_jit(
                    state, logits, ci, base_logits_BV=base_logits, **static
                )
                if proxy:
                    base_state = dataclasses.replace(base_state, token=state.token)
            else:
                state, aux = fused_step_jit(p_dec, state, ci, cfg, lora=lora_b, **static)
            tok = np.asarray(state.token)
            fuse_s = time.perf_counter() - f0
            if not split:
                edge_s, fuse_s = fuse_s, 0.0
            w = np.asarray(aux["w"])
            for b in active:
                outs[b].append(int(tok[b]))
                w_log[t, b] = w[b]
                fused_log[t, b] = bool(ci.ok[b])
                if eos_id is not None and tok[b] == eos_id:
                    done[b] = True
            if sim:
                step_s = max(edge_s, wait_s) + fuse_s
                clock.advance(step_s)
            else:
                step_s = clock.now() - t_start
            lat.append(step_s)
            edge_t.append(edge_s)
            cloud_t.append(slowest)
            if done[:n].all():
                break
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    steps = len(lat)
    return FusedResult(
        tokens=outs,
        latency_s=np.asarray(lat),
        edge_s=np.asarray(edge_t),
        cloud_s=np.asarray(cloud_t),
        w=w_log[:steps],
        fused=fused_log[:steps],
        failures=failures,
        privacy=guard.detector.stats() if guard is not None else {},
    )


def _collect(futures, delays, got, t_start, deadline_s, clock, real_timeout_s, server_s=None):
    """Gathers cloud replies into `got`. `t_start=None`: simulated time (wait for each reply in
    wall time up to `real_timeout_s`, then judge its virtual arrival against the deadline);
    otherwise wait in wall time until `t_start + deadline_s`. Returns (virtual wait, slowest
    cloud compute seconds)."""
    wait_s, slowest = 0.0, 0.0
    for b, fut in futures.items():
        if t_start is None:
            try:
                d, c_s = fut.result(timeout=real_timeout_s)
            except cf.TimeoutError:
                d, c_s = CloudDistribution.missing(1, "hung"), math.inf
            if server_s is not None and math.isfinite(c_s):
                c_s = server_s
            arrival = math.inf if delays[b] is None else delays[b] + c_s
            if d.errors and d.errors[0] == "privacy":
                arrival = 0.0  # withheld on the device: nothing to wait for
            wait_s = max(wait_s, min(arrival, deadline_s))
            slowest = max(slowest, c_s if math.isfinite(c_s) else 0.0)
            if arrival > deadline_s and d.ok[0]:
                d = CloudDistribution.missing(1, "deadline")
        else:
            left = t_start + deadline_s - clock.now()
            try:
                d, c_s = fut.result(timeout=max(left, 0.0))
                slowest = max(slowest, c_s)
            except cf.TimeoutError:
                d = CloudDistribution.missing(1, "deadline")
        got[b] = d
    return wait_s, slowest
