"""Speculation against a chat-only cloud: the cloud proposes k tokens, the edge verifies them.

Shapes: B batch, P = k positions of a round, V edge vocab.

A chat API has no prompt log-probs, so it cannot score an edge draft; it can generate
(`floe_jax.inference.http_cloud.propose`): one chat call returns the cloud's next k tokens with
its top-k before each. Each round (`propose_round`) every active row asks for its proposal while
the edge takes in the last emitted token; the edge then scores the proposed tokens in one forward
(`extend`), and `agree` keeps the fused choice while it is the cloud's token, then the fused token
where they part. The cache and the round log are those of `floe_jax.inference.speculative`;
k is fixed.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.decode import SamplingConfig, sample_logits
from floe_jax.inference.cloud import CloudDistribution, Prefix
from floe_jax.inference.deadline import collect_real, collect_simulated
from floe_jax.inference.extend import extend_jit, rewind_jit
from floe_jax.inference.replies import CloudInput, cloud_input, merge_rows, reason, unmapped_rows
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.speculative import Ahead, SpecLog, check_room, emit
from floe_jax.inference.step import fused_logp


def agree(
    logits_BPV: jax.Array,
    cloud: CloudInput,
    proposed_BP: jax.Array,
    usable_B: jax.Array,
    key: jax.Array,
    *,
    fusion: FusionConfig,
    sampling: SamplingConfig,
) -> dict:
    """The fused choice along a cloud's proposal: at position j (after the cloud's tokens
    0..j-1) a token is drawn from the fused distribution as token-by-token decoding draws it;
    the round goes on while it is the cloud's token j and position j + 1 is usable.

    Every emitted token is drawn from the fused distribution of its own prefix (the proposal
    only decides where the round stops), so the output follows the fused distribution, and
    under greedy decoding it is the token-by-token output.

    Args:
      logits_BPV: edge logits at positions 0..P-1 (padding past a row's usable positions).
      cloud: the cloud's distributions, row b * P + j for position j of row b.
      proposed_BP: the cloud's token j (edge ids; -1: none or unmapped).
      usable_B: leading positions of row b with the cloud's distribution (0: the edge alone).
      key: PRNG key of the round.

    Returns:
      `n` [B] tokens emitted, `tokens` [B, P] (the first n), `w` [B, P] edge weights.
    """
    B, P, V = logits_BPV.shape
    _, fused, w = fused_logp(logits_BPV.reshape(B * P, V), cloud, fusion)
    keys = jax.random.split(key, P)
    tok = jax.vmap(lambda lp, k: sample_logits(lp, k, sampling), in_axes=(1, 0), out_axes=1)(
        fused.reshape(B, P, V), keys
    )
    j = jnp.arange(P)[None, :]
    go_on = (tok == proposed_BP) & (j + 1 < usable_B[:, None])
    stop = ~go_on
    n = jnp.argmax(stop, axis=1) + 1  # the first position that does not go on emits last
    n = jnp.where(stop.any(1), n, P)
    return {"n": n.astype(jnp.int32), "tokens": tok.astype(jnp.int32), "w": w.reshape(B, P)}


agree_jit = jax.jit(agree, static_argnames=("fusion", "sampling"))


def _call_propose(guard, prefix, k: int, delay_s, sleep: bool):
    """Worker: `guard.propose(prefix, k)` as `call_cloud` asks for a distribution: returns
    ((proposal's distributions, proposal), compute seconds) and never raises."""
    from floe_jax.inference.http_cloud.propose import Proposal

    if delay_s is None:
        p = Proposal.missing(k, "lost")
        return (p.dist, p), 0.0
    if sleep and delay_s > 0:
        time.sleep(delay_s)
    t0 = time.perf_counter()
    try:
        p = guard.propose(prefix, k)
        p = dataclasses.replace(p, dist=p.dist.sanitized())
    except Exception as e:  # noqa: BLE001  (a broken back end degrades to the edge)
        p = Proposal.missing(k, f"{type(e).__name__}: {e}")
    return (p.dist, p), time.perf_counter() - t0


class _Unpack:
    """A future of `_call_propose` seen as `collect_*` expect one: (distribution, seconds); the
    proposal is kept aside."""

    def __init__(self, fut, store: dict, b: int):
        self.fut, self.store, self.b = fut, store, b

    def result(self, timeout=None):
        (dist, prop), s = self.fut.result(timeout=timeout)
        self.store[self.b] = prop
        return dist, s

    def done(self) -> bool:
        return self.fut.done()


def propose_round(run, r: int, edge, log, spec: SpecLog, at: Ahead):
    """One round against a chat cloud: each active row asks the cloud (through the guard) for
    its next k tokens while the edge takes in the last emitted token; the edge then scores the
    proposed tokens in one forward (`extend`), and `agree` keeps the fused choice while it is
    the cloud's token, then the fused token where they part. Appends to `log`; returns the
    edge carry for the next round."""
    from floe_jax.inference.fused import edge_half, request_budget

    c, clock = run.config, run.clock
    sim = getattr(clock, "simulated", False)
    B, P, N = run.batch, c.speculate, c.max_new_tokens
    active = [b for b in range(run.n) if not log.done[b]]
    left = max(N - len(log.outs[b]) for b in active)
    k = max(1, min(P, left))
    t_start = clock.now()
    props: dict = {}
    futures, delays = {}, {}
    if run.guard is not None:
        for b in active:
            ids = run.rows[b] + log.outs[b]
            text = run.decode(ids) if run.decode is not None else None
            prefix = Prefix(ids=ids, text=text, stream=(run.stream, b))
            delays[b] = run.network.sample(prefix.payload_bytes()) if run.network else 0.0
            prefix = dataclasses.replace(prefix, budget_s=request_budget(run, delays[b]))
            fut = run.pool.submit(_call_propose, run.guard, prefix, k, delays[b], not sim)
            futures[b] = _Unpack(fut, props, b)
    if sim:  # the cloud measured alone first, as token by token
        server_s = None if run.network is None else run.network.server_s
        got, wait_s, _ = collect_simulated(
            futures, delays, c.deadline_s, c.real_timeout_s, server_s
        )
    e0 = time.perf_counter()
    check_room(at, at.feed)
    edge = edge_half(run, r, edge)
    at.base += at.feed
    jax.block_until_ready(edge.logits)
    edge_s = time.perf_counter() - e0
    if not sim:
        got, _ = collect_real(futures, t_start, c.deadline_s, clock)
        wait_s = clock.now() - t_start
    spec.calls += len(futures)
    # --- usable positions of each row, and the proposal as edge ids
    proposed = np.full((B, P), -1, np.int32)
    usable = np.zeros(B, np.int32)
    flat = {}
    for b, d in got.items():
        if not d.ok[0]:
            log.failures[reason(d.errors[0] if d.errors else None)] += 1
            continue
        spec.answered += 1
        ids = props[b].ids
        m = 0
        while m < k and d.ok[m] and (m == 0 or ids[m - 1] >= 0):
            flat[b * P + m] = d.row(m)
            m += 1
        usable[b], proposed[b, :k] = m, ids[:k]
    f0 = time.perf_counter()
    T = P - 1  # one shape: the proposal fed with padding masked
    state, logits = edge.state, [edge.logits[:, None]]
    fed = min(int(usable.max()) - 1, T)
    if at.base + T > at.end:  # the padded block would not fit: this round is token by token
        fed = 0
    if fed > 0:
        toks = np.where(proposed[:, :T] >= 0, proposed[:, :T], c.pad_id)
        mask = (np.arange(T)[None] < np.minimum(usable - 1, fed)[:, None]).astype(np.int32)
        state, lg = extend_jit(run.params, state, jnp.asarray(toks), jnp.asarray(mask),
                               run.cfg, lora=run.lora)  # fmt: skip
        logits.append(lg)
    else:
        logits.append(jnp.zeros((B, P - 1, run.cfg.vocab_size), edge.logits.dtype))
    usable = np.minimum(usable, max(fed, 0) + 1)
    dist = merge_rows(flat, B * P, run.kind) if flat else CloudDistribution.missing(B * P, "none")
    ci = cloud_input(
        dist, B * P, run.cfg.vocab_size, kind=run.kind, cloud_size=run.cloud_size,
        top_k=c.top_k, vocab_map=run.vocab_map, mapper=run.mapper,
    )  # fmt: skip
    if unmapped := unmapped_rows(dist, ci):
        log.failures["unmapped"] += len(unmapped)
    out = agree_jit(
        jnp.concatenate(logits, 1), ci, jnp.asarray(proposed), jnp.asarray(usable),
        jax.random.fold_in(jax.random.fold_in(run.key, r), 1 << 20), fusion=c.fusion,
        sampling=c.sampling,
    )  # fmt: skip
    out = jax.device_get(out)
    verify_s = time.perf_counter() - f0
    ok = np.asarray(ci.ok).reshape(B, P)
    keep = np.zeros(B, np.int32)
    nxt = np.full(B, c.pad_id, np.int32)
    most = 0
    for b in active:
        emitted = emit(log, out, ok, b, eos_id=c.eos_id, max_new=N)
        most = max(most, emitted)
        keep[b], nxt[b] = emitted - 1, int(out["tokens"][b, emitted - 1])
        if b in got and got[b].ok[0]:  # kept proposed tokens; judged: those and a parting one
            parted = int(out["tokens"][b, emitted - 1]) != int(proposed[b, emitted - 1])
            spec.accepted += emitted - 1
            spec.tested += emitted - 1 + int(parted)
        spec.tokens += emitted
    spec.ks.append(k)
    if fed > 0:
        state = rewind_jit(state, jnp.asarray(keep), jnp.asarray(T, jnp.int32))
    edge.state = dataclasses.replace(state, token=jnp.asarray(nxt))
    at.base += int(keep.max())
    at.feed = 1
    if sim:
        step_s = max(edge_s, wait_s) + verify_s
        clock.advance(step_s)
    else:
        step_s = clock.now() - t_start
    log.latency_s += [step_s] + [0.0] * (most - 1)
    log.edge_s += [edge_s] + [0.0] * (most - 1)
    log.cloud_s += [wait_s] + [0.0] * (most - 1)
    return edge
