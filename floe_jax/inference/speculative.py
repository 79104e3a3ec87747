"""Speculative fused decoding: one cloud call per k tokens.

Shapes: B batch, P = k_max + 1 positions of a round, K = k_max drafted tokens, V edge vocab.

Token-by-token fusion pays a round trip per token. Here (Leviathan et al., ICML 2023; Chen et al.,
2023, speculative sampling) each round the edge drafts k tokens with its adapter (`draft_step`,
k cached decode steps), one cloud call scores the drafted continuation at its k + 1 positions
(`Draft`, through the privacy guard like any prefix), and `accept` forms the fused distribution
`p` at every position with the same alignment, router and deadline as token-by-token fusion.
With `q` the edge's (draft) distribution, drafted token x is kept with probability
`min(1, p(x) / q(x))`; the first rejected position emits a token from `norm(max(0, p - q))`, and
a draft kept whole earns a bonus token from `p` at position k. The output follows `p` exactly;
under greedy decoding (`p`, `q` one-hot) it is the token-by-token fused output itself.

Two things stop a draft early, and neither changes the output: a position the cloud could not
score from the one request (the guard holds a span back there, or the cloud's tokenizer splits
the text across it) ends the round at the last scored position; a reply later than the deadline
(or lost, failed, withheld) leaves the whole round to the edge (`w = 1` at every position: all
k drafted tokens are kept, plus the bonus from the edge), as a missed token is today.

k adapts (`DraftLength`): after each round it is the k in `[1, k_max]` that minimises the expected
time per token, `(e (k + 1) + min(rtt, tau)) / E(k)` with `E(k) = (1 - a^{k+1}) / (1 - a)`,
from the measured acceptance rate `a`, round trip `rtt` and edge step `e` (decayed averages).

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
from floe_jax.decode import DecodeState, SamplingConfig, advance, greedy, sample_logits
from floe_jax.inference.cloud import CloudDistribution, Draft
from floe_jax.inference.deadline import call_cloud, collect_real, collect_simulated
from floe_jax.inference.extend import rewind_jit
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
class DraftLength:
    """Chooses k each round from the measured acceptance rate, round trip and edge step.

    Attributes:
      k_max: the longest draft; `adapt=False` always drafts `k_max`.
      deadline_s: tau (a wait never lasts longer).
      decay: weight of the past in the running averages.
    """

    k_max: int
    deadline_s: float
    adapt: bool = True
    decay: float = 0.7
    accepted: float = 1.0  # a prior of one accepted token in two judged
    tested: float = 2.0
    rtt_s: float | None = None
    edge_s: float | None = None

    @property
    def alpha(self) -> float:
        return self.accepted / self.tested if self.tested > 0 else 0.5

    def update(self, accepted: int, tested: int, rtt_s: float | None, edge_s: float) -> None:
        d = self.decay
        if tested:
            self.accepted, self.tested = d * self.accepted + accepted, d * self.tested + tested
        if rtt_s is not None:
            self.rtt_s = rtt_s if self.rtt_s is None else d * self.rtt_s + (1 - d) * rtt_s
        self.edge_s = edge_s if self.edge_s is None else d * self.edge_s + (1 - d) * edge_s

    def expected_tokens(self, k: int) -> float:
        """E(k) = 1 + a + ... + a^k: tokens a round of k drafted tokens emits on average."""
        return float(sum(self.alpha**i for i in range(k + 1)))

    def choose(self, cap: int) -> int:
        """k for the next round, at most `cap` (cache slots or tokens left), at least 1."""
        hi = max(1, min(self.k_max, cap))
        if not self.adapt or self.rtt_s is None or self.edge_s is None:
            return hi
        wait = min(self.rtt_s, self.deadline_s)
        cost = {
            k: (self.edge_s * (k + 1) + wait) / self.expected_tokens(k) for k in range(1, hi + 1)
        }
        return min(cost, key=cost.get)


@dataclasses.dataclass
class SpecLog:
    """What speculation did: cloud calls, drafted tokens judged and kept, tokens per call."""

    calls: int = 0
    answered: int = 0
    tested: int = 0
    accepted: int = 0
    tokens: int = 0
    stopped: int = 0  # drafts stopped early (a position the cloud could not score)
    ks: list[int] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        return {
            "calls": self.calls,
            "answered": self.answered,
            "acceptance": self.accepted / self.tested if self.tested else 0.0,
            "tokens_per_call": self.tokens / self.calls if self.calls else 0.0,
            "mean_k": float(np.mean(self.ks)) if self.ks else 0.0,
            "stopped": self.stopped,
        }


def _draft_of(run, b: int, base: list[int], drafted: list[int]) -> Draft:
    ids = base + drafted
    ends = [len(base) + j for j in range(len(drafted) + 1)]
    text = text_ends = None
    if run.decode is not None:
        texts = [run.decode(ids[:e]) for e in ends]
        text = texts[-1]
        text_ends = [len(t) if text.startswith(t) else -1 for t in texts]
    return Draft(ids=ids, text=text, stream=(run.stream, b), id_ends=ends, text_ends=text_ends)


def _flat(got: dict, k: int, P: int) -> tuple[dict, dict]:
    """({b * P + j: one-row distribution}, {b: positions that may emit})."""
    flat, limit = {}, {}
    for b, d in got.items():
        if d.batch != k + 1 or not d.ok[0]:  # late, lost, failed or withheld: the edge's round
            limit[b] = k + 1
            continue
        m = int(np.argmin(d.ok)) if not d.ok.all() else d.batch
        limit[b] = m
        for j in range(m):
            flat[b * P + j] = d.row(j)
    return flat, limit


def decode_round(run, r: int, edge, log, spec: SpecLog, length: DraftLength, slots: list[int]):
    """One speculative round of every active row: feed the last token, draft k, one cloud call
    per row, accept. Appends the tokens to `log`; returns the edge carry for the next round.
    `slots`: [next cache slot, cache slots] of the edge, kept on the host."""
    from floe_jax.inference.fused import edge_half, request_budget  # fused.py dispatches here

    c, clock = run.config, run.clock
    sim = getattr(clock, "simulated", False)
    B, P, N = run.batch, c.speculate + 1, c.max_new_tokens
    active = [b for b in range(run.n) if not log.done[b]]
    left = max(N - len(log.outs[b]) for b in active)
    feed = 0 if r == 0 else 1
    k = length.choose(min(left - 1, slots[1] - slots[0] - feed))
    k = max(0, min(k, left - 1, slots[1] - slots[0] - feed))
    t_start = clock.now()
    e0 = time.perf_counter()
    edge = edge_half(run, r, edge)
    key = jax.random.fold_in(run.key, r)
    logits, toks, state = [edge.logits], [], edge.state
    for j in range(k):
        state, lg, tok = draft_step_jit(
            run.params, state, logits[-1], jax.random.fold_in(key, j), cfg=run.cfg,
            sampling=c.sampling, lora=run.lora,
        )  # fmt: skip
        logits.append(lg)
        toks.append(tok)
    drafted = np.stack([np.asarray(t) for t in toks], 1) if k else np.zeros((B, 0), np.int32)
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
    if sim:
        server_s = None
        if run.network is not None and run.network.server_ms is not None:
            server_s = run.network.server_ms / 1e3
        got, wait_s, _ = collect_simulated(
            futures, delays, c.deadline_s, c.real_timeout_s, server_s
        )
    else:
        got, _ = collect_real(futures, t_send, c.deadline_s, clock)
        wait_s = clock.now() - t_send
    rtt = wait_s if futures else None  # capped by the deadline, as every wait is
    spec.calls += len(futures)
    for d in got.values():
        if d.ok[0]:
            spec.answered += 1
        else:
            log.failures[reason(d.errors[0] if d.errors else None)] += 1
    flat, limit = _flat(got, k, P)
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
    pad = [jnp.zeros((B, V), logits[0].dtype)] * (P - len(logits))
    draft_BK = np.zeros((B, P - 1), np.int32)
    draft_BK[:, :k] = drafted
    lim = np.array([limit.get(b, k + 1) for b in range(B)], np.int32)
    out = accept_jit(
        jnp.stack(logits + pad, 1), ci, jnp.asarray(draft_BK), jnp.asarray(k, jnp.int32),
        jnp.asarray(lim), jax.random.fold_in(key, 1 << 20), fusion=c.fusion, sampling=c.sampling,
    )  # fmt: skip
    out = jax.device_get(out)
    fuse_s = time.perf_counter() - f0
    # --- emit, then keep the drafted slots each row kept
    ok = np.asarray(ci.ok).reshape(B, P)
    keep = np.zeros(B, np.int32)
    nxt = np.full(B, c.pad_id, np.int32)
    most = 0
    for b in active:
        n = int(out["n"][b])
        emitted = 0
        for j in range(n):
            t = len(log.outs[b])
            tok = int(out["tokens"][b, j])
            log.outs[b].append(tok)
            log.w[t, b] = out["w"][b, j]
            log.fused[t, b] = bool(ok[b, j])
            emitted += 1
            if (c.eos_id is not None and tok == c.eos_id) or t + 1 >= N:
                log.done[b] = True
                break
        most = max(most, emitted)
        keep[b], nxt[b] = n - 1, int(out["tokens"][b, n - 1])
        if b in got and got[b].ok[0]:
            spec.accepted += int(out["accepted"][b])
            spec.tested += int(out["tested"][b])
        spec.tokens += emitted
    spec.ks.append(k)
    state = rewind_jit(state, jnp.asarray(keep), jnp.asarray(k, jnp.int32))
    edge.state = dataclasses.replace(state, token=jnp.asarray(nxt))
    slots[0] += feed + int(keep.max())
    answered = [b for b in active if b in got and got[b].ok[0]]
    length.update(
        sum(int(out["accepted"][b]) for b in answered),
        sum(int(out["tested"][b]) for b in answered),
        rtt,
        edge_s / (k + feed) if k + feed else edge_s,
    )
    # --- time: the draft, then the wait for the cloud, then the acceptance
    if sim:
        step_s = edge_s + wait_s + fuse_s
        clock.advance(step_s)
    else:
        step_s = clock.now() - t_start
    gaps = [step_s] + [0.0] * (most - 1)  # a round's tokens arrive together
    log.latency_s += gaps
    log.edge_s += [edge_s] + [0.0] * (most - 1)
    log.cloud_s += [wait_s] + [0.0] * (most - 1)
    return edge
