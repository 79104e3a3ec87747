"""Speculative fused decoding: one cloud call per k tokens.

Shapes: B batch, P = 2 k_max + 1 positions of a round, K drafted tokens (k sent, the rest
drafted ahead), V edge vocab.

Token-by-token fusion pays a round trip per token. Here (Leviathan et al., ICML 2023; Chen et al.,
2023, speculative sampling) each round the edge drafts k tokens with its adapter (`draft_step`,
k cached decode steps), one cloud call scores the drafted continuation at its k + 1 positions
(`Draft`, through the privacy guard like any prefix), and `accept` forms the fused distribution
`p` at every position with the same alignment, router and deadline as token-by-token fusion.
With `q` the edge's (draft) distribution, drafted token x is kept with probability
`min(1, p(x) / q(x))`; the first rejected position emits a token from `norm(max(0, p - q))`, and
a draft kept whole earns a bonus token from `p` at position k. The output follows `p` exactly;
under greedy decoding (`p`, `q` one-hot) it is the token-by-token fused output itself.

While the cloud's reply is out the edge keeps drafting (up to k_max more tokens, no longer than
the wait): the first token drafted ahead is judged at position k, the last one the cloud scored,
in place of the bonus token (the same rule, one more drafted token), and when it is kept the
rest start the next round's draft, drafted for free.

Two things stop a draft early, and neither changes the output: a position the cloud could not
score from the one request (the guard holds a span back there, or the cloud's tokenizer splits
the text across it) ends the round at the last scored position; a reply later than the deadline
(or lost, failed, withheld) leaves the whole round to the edge (`w = 1` at every position: all
drafted tokens are kept, plus the bonus from the edge), as a missed token is today; a withheld
prefix keeps the drafted tokens up to the first position the guard would send again.

k adapts (`floe_jax.inference.draft_length.DraftLength`): after each round it is the k in
`[1, k_max]` that minimises the expected time per token, `(e (k - ahead) + min(rtt, tau)) /
E(k)`, with `E(k) = 1 + S(1) + ... + S(k)` from the measured per-position survival `S` of drafts
(censored run lengths), round trip `rtt` and edge step `e` (decayed counts and averages).

Chat-only clouds cannot score a draft; with `propose` the cloud drafts instead
(`floe_jax.inference.propose_decode`): one chat call returns its next k tokens with its top-k
at each, the edge scores them in one forward (`extend`), and `agree` keeps the fused choice while
it is the cloud's token, then the fused token where they part.

The edge's cache is shared by the rows of a batch (one write index); rows that keep different
numbers of drafted tokens drop the rest by marking their slots invalid (`rewind`).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ModelConfig
from floe_jax.decode import (
    DecodeState,
    SamplingConfig,
    advance,
    eos_tuple,
    greedy,
    sample_logits,
)
from floe_jax.inference.cloud import CloudDistribution, Draft
from floe_jax.inference.deadline import call_cloud, collect_real, collect_simulated
from floe_jax.inference.draft_length import DraftLength
from floe_jax.inference.extend import rewind_jit, rewindable
from floe_jax.inference.replies import CloudInput, cloud_input, merge_rows, reason, unmapped_rows
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.step import fused_logp
from floe_jax.lora import LoRA


def sampler_logp(logp_BV: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Log-probs [B, V] of the distribution `floe_jax.decode.sample_logits` draws from
    (temperature, then top-p); greedy: one-hot at `greedy`'s token (log 1 = 0, else -inf)."""
    V = logp_BV.shape[-1]
    if sampling.temperature == 0.0:
        return jnp.where(jnp.arange(V) == greedy(logp_BV)[:, None], 0.0, -jnp.inf)
    z = logp_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1.0:  # the cut of `sample_logits`, written the same way
        z_sorted = jnp.sort(z, axis=-1)[:, ::-1]
        p_sorted = jax.nn.softmax(z_sorted, axis=-1)
        keep = jnp.cumsum(p_sorted, axis=-1) - p_sorted < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, z_sorted, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z >= cutoff, z, -jnp.inf)
    return jax.nn.log_softmax(z, axis=-1)


def draft_step(
    params: dict,
    state: DecodeState,
    logits_BV: jax.Array,
    key: jax.Array,
    cfg: ModelConfig,
    *,
    sampling: SamplingConfig,
    lora: LoRA | None = None,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Drafts one token from the edge's logits and feeds it: (state, next logits [B, V], the
    drafted token [B])."""
    tok = sample_logits(jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1), key, sampling)
    state, logits = advance(params, dataclasses.replace(state, token=tok), cfg, lora=lora)
    return state, logits, tok


def accept(
    logits_BPV: jax.Array,
    cloud: CloudInput,
    draft_BK: jax.Array,
    k: jax.Array,
    limit_B: jax.Array,
    key: jax.Array,
    *,
    fusion: FusionConfig,
    sampling: SamplingConfig,
) -> dict:
    """The speculative-sampling rule on the fused distribution of one round.

    Args:
      logits_BPV: edge logits at positions 0..k (position j: after j drafted tokens); later
        positions are padding.
      cloud: the cloud's distributions, row b * P + j for position j of row b.
      draft_BK: drafted tokens (column j drafted at position j).
      k: [] drafted tokens this round.
      limit_B: positions of row b that may emit (k + 1, or fewer when the draft was stopped).
      key: PRNG key of the round.

    Returns:
      `n` [B] tokens emitted, `tokens` [B, P] (the first n), `w` [B, P] edge weights,
      `accepted` / `tested` [B] drafted tokens kept / judged.
    """
    B, P, V = logits_BPV.shape
    logp_e, fused, w = fused_logp(logits_BPV.reshape(B * P, V), cloud, fusion)
    lp = sampler_logp(fused, sampling).reshape(B, P, V)
    lq = sampler_logp(logp_e, sampling).reshape(B, P, V)
    j = jnp.arange(P)[None, :]
    d_BP = jnp.concatenate([draft_BK, jnp.zeros((B, P - draft_BK.shape[1]), jnp.int32)], 1)
    k_acc, k_res, k_bonus = jax.random.split(key, 3)
    if sampling.temperature == 0.0:
        best = greedy(fused).reshape(B, P)
        ok_BP = best == d_BP
        corr = best
    else:
        pick = lambda a: jnp.take_along_axis(a, d_BP[..., None], axis=-1)[..., 0]
        u = jax.random.uniform(k_acc, (B, P))
        ok_BP = jnp.log(u) < pick(lp) - pick(lq)
        resid = jnp.maximum(jnp.exp(lp) - jnp.exp(lq), 0.0)
        resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, jnp.exp(lp))  # p == q
        res_tok = jax.random.categorical(k_res, jnp.log(resid), axis=-1)
        bonus = jax.random.categorical(k_bonus, lp, axis=-1)
        corr = jnp.where(j == k, bonus, res_tok).astype(jnp.int32)
    judged = (j < k) & (j < limit_B[:, None])
    rejected = judged & ~ok_BP
    any_rej = rejected.any(1)
    first = jnp.argmax(rejected, axis=1)
    whole = limit_B == k + 1
    n = jnp.where(any_rej, first + 1, jnp.where(whole, k + 1, limit_B))
    ends_in_draft = (~any_rej & ~whole)[:, None] & (j == n[:, None] - 1)
    tokens = jnp.where((j < n[:, None] - 1) | ends_in_draft, d_BP, corr)
    kept = jnp.where(any_rej, first, jnp.minimum(k, limit_B))
    return {
        "n": n.astype(jnp.int32),
        "tokens": tokens.astype(jnp.int32),
        "w": w.reshape(B, P),
        "accepted": kept.astype(jnp.int32),
        "tested": jnp.where(any_rej, first + 1, jnp.minimum(k, limit_B)).astype(jnp.int32),
    }


draft_step_jit = jax.jit(
    draft_step, static_argnames=("cfg", "sampling"), donate_argnames=("state",)
)
accept_jit = jax.jit(accept, static_argnames=("fusion", "sampling"))


@dataclasses.dataclass
class SpecLog:
    """What speculation did: cloud calls, drafted tokens judged and kept, tokens per call."""

    calls: int = 0
    answered: int = 0
    tested: int = 0
    accepted: int = 0
    tokens: int = 0
    stopped: int = 0  # drafts stopped early (a position the cloud could not score)
    ahead: int = 0  # tokens drafted during a wait and kept
    ks: list[int] = dataclasses.field(default_factory=list)
    edge_step_s: float | None = None  # the draft length's estimate of one edge step

    def summary(self) -> dict:
        return {
            "calls": self.calls,
            "answered": self.answered,
            "acceptance": self.accepted / self.tested if self.tested else 0.0,
            "tokens_per_call": self.tokens / self.calls if self.calls else 0.0,
            "mean_k": float(np.mean(self.ks)) if self.ks else 0.0,
            "stopped": self.stopped,
            "ahead": self.ahead,
            "edge_step_s": self.edge_step_s,
        }


@dataclasses.dataclass
class Ahead:
    """Between rounds, on the host: where the edge's cache stands and what is drafted already.

    Attributes:
      base: cache slot of the round's position 0 (after the last emitted token is fed).
      end: cache slots.
      feed: the edge's `state.token` is an emitted token still to be fed (0 after a carry).
      logits: edge logits [B, V] after each drafted token carried over (the first: position 0).
      toks: drafted tokens [B] carried over (fed already; one fewer than `logits`).
    """

    base: int
    end: int
    feed: int = 0
    logits: list = dataclasses.field(default_factory=list)
    toks: list = dataclasses.field(default_factory=list)


def _draft_of(run, b: int, base: list[int], drafted: list[int]) -> Draft:
    ids = base + drafted
    ends = [len(base) + j for j in range(len(drafted) + 1)]
    text = text_ends = None
    if run.decode is not None:
        texts = [run.decode(ids[:e]) for e in ends]
        text = texts[-1]
        text_ends = [len(t) if text.startswith(t) else -1 for t in texts]
    return Draft(ids=ids, text=text, stream=(run.stream, b), id_ends=ends, text_ends=text_ends)


def _flat(got: dict, k: int, P: int, K: int) -> tuple[dict, dict]:
    """({b * P + j: one-row distribution}, {b: positions that may emit}). A row the cloud
    answered may emit at its scored positions; a late one at all K + 1 (the edge's round); a
    withheld one up to the first position the guard would send (`sendable`: token by token,
    the cloud is asked again there), or all k + 1 screened positions."""
    flat, limit = {}, {}
    for b, d in got.items():
        if d.batch == k + 1 and not d.ok[0] and d.errors and d.errors[0] == "privacy":
            limit[b] = d.errors.index("sendable") if "sendable" in d.errors else k + 1
            continue
        if d.batch != k + 1 or not d.ok[0]:  # late, lost or failed: the edge's round
            limit[b] = K + 1
            continue
        m = int(np.argmin(d.ok)) if not d.ok.all() else d.batch
        limit[b] = m
        for j in range(m):
            flat[b * P + j] = d.row(j)
    return flat, limit


def _draft(run, state, logits, toks, key, upto: int, stop=None):
    """Drafts until `upto` tokens are drafted (or `stop()`); appends to `logits` and `toks`."""
    while len(toks) < upto and not (stop is not None and stop()):
        state, lg, tok = draft_step_jit(
            run.params, state, logits[-1], jax.random.fold_in(key, len(toks)), cfg=run.cfg,
            sampling=run.config.sampling, lora=run.lora,
        )  # fmt: skip
        if stop is not None:
            jax.block_until_ready(lg)
        logits.append(lg)
        toks.append(tok)
    return state


def emit(log, out: dict, ok: np.ndarray, b: int, *, eos_id, max_new: int) -> int:
    """Appends row b's `out["n"][b]` decided tokens (`out["tokens"]`, with their edge weights
    `out["w"]` and `ok` saying whether the cloud was fused) to the decode log, stopping at EOS or
    `max_new` tokens (the row is then done); returns how many it appended."""
    emitted = 0
    for j in range(int(out["n"][b])):
        t = len(log.outs[b])
        tok = int(out["tokens"][b, j])
        log.outs[b].append(tok)
        log.w[t, b] = out["w"][b, j]
        log.fused[t, b] = bool(ok[b, j])
        emitted += 1
        if tok in eos_tuple(eos_id) or t + 1 >= max_new:
            log.done[b] = True
            break
    return emitted


def decode_round(run, r: int, edge, log, spec: SpecLog, length: DraftLength, at: Ahead):
    """One speculative round of every active row: feed the last token, draft k, one cloud call
    per row; while it is out, draft ahead (up to k_max more tokens, no longer than the wait);
    accept. The first token drafted ahead is judged at position k, the cloud's last scored
    position, in place of the bonus token; when every row keeps it, the rest carry over as the
    start of the next round's draft, drafted for free. Appends the tokens to `log`; returns the
    edge carry for the next round."""
    from floe_jax.inference.fused import edge_half, request_budget  # fused.py dispatches here

    c, clock = run.config, run.clock
    sim = getattr(clock, "simulated", False)
    B, P, N = run.batch, 2 * c.speculate + 1, c.max_new_tokens
    active = [b for b in range(run.n) if not log.done[b]]
    left = max(N - len(log.outs[b]) for b in active)
    key = jax.random.fold_in(run.key, r)
    t_start = clock.now()
    e0 = time.perf_counter()
    carried_in, at_feed = len(at.toks), at.feed
    if at.logits:  # carried over: position 0 is fed already
        state, logits, toks = edge.state, list(at.logits), list(at.toks)
    else:
        check_room(at, at.feed)
        edge = edge_half(run, r, edge)
        at.base += at.feed
        state, logits, toks = edge.state, [edge.logits], []
    room = at.end - at.base  # drafted tokens that fit the cache
    k = length.choose(min(left - 1, room), ahead=len(toks))
    k = max(0, min(k, left - 1, room))
    state = _draft(run, state, logits, toks, key, k)
    k = min(k, len(toks))
    drafted = np.stack([np.asarray(t) for t in toks[:k]], 1) if k else np.zeros((B, 0), np.int32)
    edge_s = time.perf_counter() - e0
    # --- one cloud call per row, through the guard
    futures, delays = {}, {}
    if run.guard is not None:
        sleep = not sim
        for b in active:
            draft = _draft_of(run, b, run.rows[b] + log.outs[b], drafted[b].tolist())
            delays[b] = run.network.sample(draft.payload_bytes()) if run.network else 0.0
            draft = dataclasses.replace(draft, budget_s=request_budget(run, delays[b]))
            futures[b] = run.pool.submit(call_cloud, run.guard, draft, delays[b], sleep)
    t_send = clock.now()
    upto = max(len(toks), min(k + c.speculate, left - 1, room))  # draft ahead while waiting
    if sim:
        server_s = None if run.network is None else run.network.server_s
        got, wait_s, _ = collect_simulated(
            futures, delays, c.deadline_s, c.real_timeout_s, server_s
        )
        a0 = time.perf_counter()  # then the edge, measured alone, for as long as the wait
        state = _draft(run, state, logits, toks, key, upto,
                       stop=lambda: time.perf_counter() - a0 >= wait_s)  # fmt: skip
        ahead_s = time.perf_counter() - a0
    else:
        a0 = time.perf_counter()
        state = _draft(run, state, logits, toks, key, upto,
                       stop=lambda: all(f.done() for f in futures.values()))  # fmt: skip
        ahead_s = time.perf_counter() - a0  # the edge's steps only, not the rest of the wait
        got, _ = collect_real(futures, t_send, c.deadline_s, clock)
        wait_s = clock.now() - t_send
    K = len(toks)
    rtt = wait_s if futures else None  # capped by the deadline, as every wait is
    spec.calls += len(futures)
    for d in got.values():
        if d.ok[0]:
            spec.answered += 1
        else:
            log.failures[reason(d.errors[0] if d.errors else None)] += 1
    flat, limit = _flat(got, k, P, K)
    spec.stopped += sum(1 for m in limit.values() if m < k + 1)
    f0 = time.perf_counter()
    kind = run.kind
    dist = merge_rows(flat, B * P, kind) if flat else CloudDistribution.missing(B * P, "none")
    ci = cloud_input(
        dist, B * P, run.cfg.vocab_size, kind=kind, cloud_size=run.cloud_size, top_k=c.top_k,
        vocab_map=run.vocab_map, mapper=run.mapper,
    )  # fmt: skip
    if unmapped := unmapped_rows(dist, ci):
        log.failures["unmapped"] += len(unmapped)
    V = run.cfg.vocab_size
    pad = [jnp.zeros((B, V), logits[0].dtype)] * (P - K - 1)
    draft_BK = np.zeros((B, P - 1), np.int32)
    if K:
        draft_BK[:, :K] = np.stack([np.asarray(t) for t in toks], 1)
    lim = np.array([limit.get(b, K + 1) for b in range(B)], np.int32)
    out = accept_jit(
        jnp.stack(logits[: K + 1] + pad, 1), ci, jnp.asarray(draft_BK), jnp.asarray(K, jnp.int32),
        jnp.asarray(lim), jax.random.fold_in(key, 1 << 20), fusion=c.fusion, sampling=c.sampling,
    )  # fmt: skip
    out = jax.device_get(out)
    fuse_s = time.perf_counter() - f0
    # --- emit
    ok = np.asarray(ci.ok).reshape(B, P)
    most = 0
    for b in active:
        emitted = emit(log, out, ok, b, eos_id=c.eos_id, max_new=N)
        most = max(most, emitted)
        if b in got and got[b].ok[0]:
            spec.accepted += int(out["accepted"][b])
            spec.tested += int(out["tested"][b])
        spec.tokens += emitted
    spec.ks.append(k)
    # --- the cache: carry the tokens drafted ahead when every live row kept the first of them
    live = [b for b in active if not log.done[b]]
    carry = (
        bool(live)
        and K > k
        and all(limit[b] == k + 1 and int(out["accepted"][b]) == k + 1 for b in live)
    )
    if carry:
        spec.ahead += K - k - 1
        at.logits, at.toks, at.feed = logits[k + 1 :], toks[k + 1 :], 0
        at.base += k + 1
        edge.state = state
    else:
        keep = np.zeros(B, np.int32)
        nxt = np.full(B, c.pad_id, np.int32)
        for b in active:
            n = int(out["n"][b])
            keep[b], nxt[b] = n - 1, int(out["tokens"][b, n - 1])
        state = rewind_jit(state, jnp.asarray(keep), jnp.asarray(K, jnp.int32))
        edge.state = dataclasses.replace(state, token=jnp.asarray(nxt))
        at.logits, at.toks, at.feed = [], [], 1
        at.base += int(keep.max())
    answered = [b for b in active if b in got and got[b].ok[0]]
    steps = K - carried_in + (0 if carried_in else at_feed)  # edge steps run this round
    length.update(
        [(int(out["accepted"][b]), int(out["tested"][b])) for b in answered],
        rtt,
        (edge_s + ahead_s) / steps if steps else None,
    )
    # --- time: the draft, then the wait for the cloud (drafting ahead meanwhile), acceptance
    if sim:
        step_s = edge_s + max(wait_s, ahead_s) + fuse_s
        clock.advance(step_s)
    else:
        step_s = clock.now() - t_start
    gaps = [step_s] + [0.0] * (most - 1)  # a round's tokens arrive together
    log.latency_s += gaps
    log.edge_s += [edge_s] + [0.0] * (most - 1)
    log.cloud_s += [wait_s] + [0.0] * (most - 1)
    return edge


def check_room(at: Ahead, feed: int) -> None:
    """Raises before a write past the edge cache (`dynamic_update_slice` would clamp it onto
    valid slots): `FusedRun.cache_slots` bounds what a run needs, so this is a bug."""
    if at.base + feed > at.end:
        raise RuntimeError(f"speculate: the edge cache is full (slot {at.base} of {at.end}); "
                           "FusedRun.cache_slots is too small for this run")  # fmt: skip


def speculate(run, edge, log) -> SpecLog:
    """The speculative loop of `generate_fused`: rounds until every row stopped."""
    c = run.config
    prompt = run.tokens.shape[1]
    if not rewindable(run.cfg, prompt + run.cache_slots):
        raise ValueError("speculate needs a cache it can rewind: this model has sliding-window "
                         "layers whose ring buffer is shorter than the cache")  # fmt: skip
    spec = SpecLog()
    length = DraftLength(k_max=c.speculate, deadline_s=c.deadline_s, adapt=c.adapt_k)
    at = Ahead(base=prompt, end=prompt + run.cache_slots)
    r = 0
    while not log.done[: run.n].all():
        if c.propose:
            from floe_jax.inference.propose_decode import propose_round  # it imports this module

            edge = propose_round(run, r, edge, log, spec, at)
        else:
            edge = decode_round(run, r, edge, log, spec, length, at)
        r += 1
    spec.edge_step_s = length.edge_s
    return spec
