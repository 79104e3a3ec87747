"""The built-in heterogeneous-rank LoRA aggregation rules, registered by name in
`floe_jax.federated.aggregate` (`Rule`, `register_rule`).

Shapes: C clients, L layers, I input width, O output width, R padded rank, K = C * R stacked rank.
Client k has factors `A_k [I, r_k]`, `B_k [r_k, O]` (zero-padded to R), scale `s_k` and update
`ΔW_k = s_k A_k B_k`; `p_k = n_k / Σ n` over the clients of positive (screened) weight.

Rules (what each client sends up / receives down; bytes count live float32 parameters only):

- `fedavg` / `fedit` — FedIT (Zhang et al., 2023, "Towards Building the Federated GPT"):
  `A = Σ p_k A_k`, `B = Σ p_k B_k` on zero-padded factors (inexact: the product of averages is
  not the average of products). Up: A_k, B_k. Down: the first r_k slots of A and B.
- `hetlora` — HetLoRA (Cho et al., EMNLP 2024): zero-pad, weighted average, truncate to r_k;
  optional norm weighting `p_k ‖ΔW_k‖_F / Σ` (`norm_weighting=True`) and rank self-pruning
  (`prune_threshold`: the client keeps the fewest leading slots whose discarded tail energy is at
  most `prune_threshold` of its total, measured per slot as `s_k² Σ ‖a_j‖² ‖b_j‖²`). Without
  options it is FedIT exactly. Up: A_k, B_k. Down: first r'_k slots (r'_k after pruning).
- `flexlora` — FlexLoRA (Bai et al., NeurIPS 2024): `ΔW = Σ p_k ΔW_k`, truncated SVD
  `U Σ Vᵀ`, client k gets `A_k = U[:, :r_k] Σ^{1/2} / √s_k`, `B_k = Σ^{1/2} V[:, :r_k]ᵀ / √s_k`
  so `s_k A_k B_k` is the best rank-r_k approximation of ΔW. Computed without forming ΔW
  (K x K eigenproblems of the stacked factors, `top_svd_factored`) when K < min(I, O);
  otherwise from the top eigenpairs of the Gram matrix of ΔW's shorter side, formed from ΔW or
  as P (Q Qᵀ) Pᵀ, whichever costs fewer FLOPs (`top_svd_dense`).
  Up: A_k, B_k. Down: A_k, B_k.
- `flora` — FLoRA (Wang et al., NeurIPS 2024): stacking, `Σ p_k s_k A_k B_k` exactly, returned as
  `base_delta` for every client to fold into its *base weights* (the base model changes each
  round); adapters restart fresh (A random, B zero) from the call's key. Up: A_k, B_k.
  Down: the stacked factors of every included client (Σ_j live_j (I + O) each).
- `fedsa` — FedSA-LoRA (Guo et al., ICLR 2025): average A only; B stays on the client (a
  federated round keeps each client's B in the server state's `personal` and starts the client
  from it). Up: A_k. Down: A. The global adapter's B is the weighted average of B, for
  evaluation only (never sent).
- `ffa` — FFA-LoRA (Sun et al., ICLR 2024): A frozen at the shared init (clients train B only);
  average B only, with scales folded in (`B = Σ p_k (s_k / s) B_k`), exact when A is shared.
  Up: B_k. Down: B.
- `fedex` — FedEx-LoRA (Singhal et al., 2025): FedIT's A and B, plus the residual
  `Σ p_k ΔW_k − s A B` in `base_delta`: exact overall. Up: A_k, B_k. Down: A, B and the dense
  residual I x O of every adapted (layer, module).

The global adapter carries the scale `s = Σ p_k s_k` (the clients' common scale when ranks are
equal). No built-in rule keeps state between rounds (`init` is `aggregate.no_state`).
The averaging rules (FedIT, HetLoRA, FedSA, FFA) also give a `one_pass` apply (`Rule.one_pass`):
their weighted sums read every entry of every factor, so there a zero-weight slot contributes
`x - x` and any NaN/Inf reaches the global adapter (`_slot_wsums`). The factored rules mask
before their products and keep the two-pass screening.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from floe_jax.federated.aggregate import (
    BYTES_PER_PARAM,
    REASON_OK,
    REASON_ZERO_WEIGHT,
    Aggregated,
    AggregationError,
    Rule,
    broadcast_clients,
    lora_sq_norms,
    no_state,
    register_rule,
    zero_base_delta,
)
from floe_jax.federated.linalg import top_svd_dense, top_svd_factored
from floe_jax.lora import LoRA

# ----------------------------------------------------------------------------- shared helpers


class _Prep(NamedTuple):
    lora: LoRA  # live slots only, clients of zero weight zeroed (materialised only where used)
    raw: LoRA  # the clients' factors as given (the big rules mask them where they read them)
    live: dict  # {m: [C, L, R]} float32 live mask
    adapted: dict  # {m: [C, L]} float32: client adapts (m, l)
    p: jax.Array  # [C] normalised weights over included clients
    included: jax.Array  # [C] weight > 0
    scale: jax.Array  # [] global scale Σ p_k s_k (1 when nothing is included)


def _slot_mask(ranks, R):
    return (jnp.arange(R)[None, :] < ranks[:, None]).astype(jnp.float32)  # [C, R]


def _prepare(lora: LoRA, weights, ranks) -> _Prep:
    """Live slots of every client, normalised weights; a client of zero weight is zeroed
    (`jnp.where`, so its NaNs go too)."""
    slots = _slot_mask(ranks.astype(jnp.int32), lora.max_rank)
    live = {m: (v > 0).astype(jnp.float32) * slots[:, None, :] for m, v in lora.mask.items()}
    adapted = {m: (v.sum(-1) > 0).astype(jnp.float32) for m, v in live.items()}
    included = weights > 0
    w = jnp.where(included, weights.astype(jnp.float32), 0.0)
    p = w / jnp.where(w.sum() > 0, w.sum(), 1.0)
    keep = lambda x, on: jnp.where(broadcast_clients(included, x.ndim) & on, x, 0.0)
    clean = LoRA(
        a={m: keep(v, live[m][..., None, :] > 0) for m, v in lora.a.items()},
        b={m: keep(v, live[m][..., :, None] > 0) for m, v in lora.b.items()},
        mask=live,
        scale=jnp.where(included, lora.scale, 0.0),
    )
    s = jnp.sum(p * clean.scale)
    return _Prep(clean, lora, live, adapted, p, included, jnp.where(s > 0, s, 1.0))


def _slot_wsums(terms, propagate: bool = False):
    """`Σ_k w_k ⊙ x_k` over the client axis for each `(x, w_CLR, side)` in `terms`.

    `x` is a factor `[C, L, I, R]` (side "a") or `[C, L, R, O]` (side "b") as the clients sent it,
    `w_CLR` a weight per client, layer and slot; a slot of weight 0 contributes exactly 0 (a
    `where`, so a left-out client's NaN never reaches the sum). One scan over the clients per
    term: each factor is read once, masking and weighting are fused into the read, and nothing
    of the stacked size is written (a `tensordot` would need the masked copy first, and XLA:CPU
    reduces a [C, N] array over C far below bandwidth). A scan per term, not one for all: its
    accumulator (one factor's 1/C, 15 MiB at most at Qwen2.5-0.5B scale) then stays in cache
    across the steps, where every term's together (67 MiB) would go to memory and back each step.

    With `propagate` a slot of weight 0 contributes `x - x` instead: exactly +0 where x is
    finite (the same sums bit for bit), NaN where it is not, so a non-finite entry of any client
    in any slot makes its sum non-finite (`Rule.one_pass`).
    """

    def one(x, w_CLR, side):
        def add(acc, xs):
            x_k, w_LR = xs
            w = w_LR[:, None, :] if side == "a" else w_LR[:, :, None]
            return acc + jnp.where(w > 0, x_k * w, x_k - x_k if propagate else 0.0), None

        return jax.lax.scan(add, jnp.zeros(x.shape[1:], x.dtype), (x, w_CLR))[0]

    return [one(*term) for term in terms]


def _weighted_factors(
    prep: _Prep, weights_C, part: str = "ab", propagate: bool = False
) -> tuple[dict, dict]:
    """`{m: Σ_k weights_k A_k}` and `{m: Σ_k weights_k B_k}` on live slots (`part` picks which;
    `propagate` as `_slot_wsums`)."""
    mods = list(prep.raw.a)
    terms, keys = [], []
    for m in mods:
        w = weights_C[:, None, None] * prep.live[m] * prep.included[:, None, None]
        if "a" in part:
            terms.append((prep.raw.a[m], w, "a"))
            keys.append(("a", m))
        if "b" in part:
            terms.append((prep.raw.b[m], w, "b"))
            keys.append(("b", m))
    sums = dict(zip(keys, _slot_wsums(terms, propagate), strict=True))
    a = {m: sums[("a", m)] for m in mods if ("a", m) in sums}
    b = {m: sums[("b", m)] for m in mods if ("b", m) in sums}
    return a, b


def _layer_stacks(prep: _Prep, m: str, l, weight_C):
    """Layer `l` of module m as the stacked factors `P [I, C R]`, `Q [C R, O]` with
    `P Q = Σ_k weight_k A_k B_k` over live slots, and the live mask `[C R]` of the columns.
    Built per layer (inside a loop over layers) so that no stacked copy of every layer exists."""
    a_l = jax.lax.dynamic_index_in_dim(prep.raw.a[m], l, axis=1, keepdims=False)  # [C, I, R]
    b_l = jax.lax.dynamic_index_in_dim(prep.raw.b[m], l, axis=1, keepdims=False)  # [C, R, O]
    live = jax.lax.dynamic_index_in_dim(prep.live[m], l, axis=1, keepdims=False)  # [C, R]
    keep = (live > 0) & prep.included[:, None]
    C, I, R = a_l.shape
    p = jnp.where(keep[:, None, :], a_l * weight_C[:, None, None], 0.0)
    q = jnp.where(keep[:, :, None], b_l, 0.0)
    return p.transpose(1, 0, 2).reshape(I, C * R), q.reshape(C * R, -1), keep.reshape(C * R)


def _out_mask(prep: _Prep, ranks) -> dict:
    slots = _slot_mask(ranks.astype(jnp.int32), next(iter(prep.live.values())).shape[-1])
    return {m: v[..., None] * slots[:, None, :] for m, v in prep.adapted.items()}


def _global_mask(prep: _Prep) -> dict:
    inc = prep.included.astype(jnp.float32)
    return {m: jnp.max(v * inc[:, None, None], axis=0) for m, v in prep.live.items()}


def _to_clients(a_g, b_g, mask, factor=None) -> tuple[dict, dict]:
    """Broadcasts global factors to every client's slots; `factor` [C] multiplies a and b."""
    a, b = {}, {}
    for m in a_g:
        f = 1.0 if factor is None else factor[:, None, None, None]
        a[m] = a_g[m][None] * mask[m][:, :, None, :] * f
        b[m] = b_g[m][None] * mask[m][:, :, :, None] * f
    return a, b


def _dims(lora: LoRA) -> dict:
    return {m: (lora.a[m].shape[-2], lora.b[m].shape[-1]) for m in lora.a}


def _count(mask: dict, dims: dict, part: str) -> jax.Array:
    """Live parameters per client: Σ_m live slots x (I for A, O for B, I + O for both). [C]"""
    total = 0.0
    for m, v in mask.items():
        i, o = dims[m]
        width = {"a": i, "b": o, "ab": i + o}[part]
        total = total + v.sum((-2, -1)) * width
    return total * BYTES_PER_PARAM


def _dense_sum(prep: _Prep, minus: LoRA | None = None) -> dict:
    """`Σ_k p_k s_k A_k B_k` per module, minus `s A B` of the adapter `minus` when given:
    {m: [L, I, O]}. One layer at a time, each layer one matmul of the stacked factors (with
    `minus`'s factors appended as R more columns), so the only thing of full size written is
    the result."""
    ps = prep.p * prep.lora.scale
    out = {}
    for m in prep.raw.a:

        def layer(l, m=m):
            p_IK, q_KO, _ = _layer_stacks(prep, m, l, ps)
            if minus is not None:
                g_a = jax.lax.dynamic_index_in_dim(minus.a[m], l, axis=0, keepdims=False)
                g_b = jax.lax.dynamic_index_in_dim(minus.b[m], l, axis=0, keepdims=False)
                p_IK = jnp.concatenate([p_IK, -minus.scale * g_a], axis=1)
                q_KO = jnp.concatenate([q_KO, g_b], axis=0)
            return p_IK @ q_KO

        with jax.named_scope(f"dense_sum_{m}"):
            out[m] = jax.lax.map(layer, jnp.arange(prep.raw.a[m].shape[1]))
    return out


def _result(prep, ranks, g_a, g_b, g_mask, c_a, c_b, c_mask, c_scale, up, down, base=None):
    return Aggregated(
        global_lora=LoRA(a=g_a, b=g_b, mask=g_mask, scale=prep.scale),
        client_loras=LoRA(a=c_a, b=c_b, mask=c_mask, scale=c_scale),
        base_delta=base,
        included=prep.included,
        reason=jnp.where(prep.included, REASON_OK, REASON_ZERO_WEIGHT).astype(jnp.int32),
        ranks=ranks.astype(jnp.int32),
        bytes_up=up.astype(jnp.float32),
        bytes_down=down.astype(jnp.float32),
    )


# ----------------------------------------------------------------------------- FedIT / HetLoRA


def _prune_ranks(prep: _Prep, ranks, threshold: float):
    """HetLoRA rank self-pruning: fewest leading slots whose tail energy ≤ threshold x total."""
    e = 0.0  # per-slot energy [C, R]
    for m in prep.lora.a:
        na = jnp.sum(prep.lora.a[m] ** 2, axis=-2)  # [C, L, R]
        nb = jnp.sum(prep.lora.b[m] ** 2, axis=-1)
        e = e + jnp.sum(na * nb, axis=1)
    e = e * prep.lora.scale[:, None] ** 2
    tail = jnp.flip(jnp.cumsum(jnp.flip(e, -1), -1), -1)  # tail[j] = Σ_{i>=j} e_i
    ok = tail <= threshold * tail[:, :1]  # [C, R]: cutting at j keeps enough
    ok = ok | (jnp.arange(e.shape[-1])[None] >= ranks[:, None])
    ok = jnp.concatenate([ok, jnp.ones_like(ok[:, :1])], axis=-1)  # j = R keeps every slot
    new = jnp.argmax(ok, axis=-1)  # first j that is ok
    return jnp.clip(new, 1, ranks).astype(jnp.int32)


def _fedit_apply(
    state, client_loras, weights, ranks, *, key, norm_weighting, prune, propagate=False
):
    del key  # deterministic
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks)
    up = _count(prep.live, _dims(client_loras), "ab")
    if prune is not None:
        ranks = jnp.where(prep.included, _prune_ranks(prep, ranks, prune), ranks)
        prep = _prepare(client_loras, weights, ranks)
    if norm_weighting:
        w = prep.p * jnp.sqrt(jnp.where(prep.included, lora_sq_norms(prep.lora), 0.0))
        p = w / jnp.where(w.sum() > 0, w.sum(), 1.0)
        prep = prep._replace(p=jnp.where(w.sum() > 0, p, prep.p))
        prep = prep._replace(scale=jnp.where(w.sum() > 0, jnp.sum(prep.p * prep.lora.scale), 1.0))
    g_a, g_b = _weighted_factors(prep, prep.p, propagate=propagate)
    c_mask = _out_mask(prep, ranks)
    c_a, c_b = _to_clients(g_a, g_b, c_mask)
    down = _count(c_mask, _dims(client_loras), "ab")
    out = _result(
        prep, ranks, g_a, g_b, _global_mask(prep), c_a, c_b, c_mask, client_loras.scale, up, down
    )
    return out, state


@register_rule("fedavg", "fedit")
def fedit() -> Rule:
    """FedIT / FedAvg of A and B separately, zero-padded to R."""
    return hetlora()


@register_rule("hetlora", options=("norm_weighting", "prune_threshold"))
def hetlora(*, norm_weighting: bool = False, prune_threshold: float | None = None) -> Rule:
    """HetLoRA: FedIT on zero-padded factors, optional norm weighting and rank self-pruning."""
    apply = functools.partial(_fedit_apply, norm_weighting=norm_weighting, prune=prune_threshold)
    return Rule(no_state, apply, one_pass=functools.partial(apply, propagate=True))


# ----------------------------------------------------------------------------- FlexLoRA


def _compact(p_IK, q_KO, live_K, k: int):
    """Moves the live columns of p (rows of q) to the front and keeps the first k."""
    order = jnp.argsort(live_K <= 0, stable=True)[:k]
    return p_IK[:, order], q_KO[order]


def _flexlora_apply(state, client_loras, weights, ranks, *, key, path, total_rank):
    del key  # deterministic
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks)
    C, R = ranks.shape[0], client_loras.max_rank
    root = jnp.sqrt(prep.p * prep.lora.scale)  # [C]
    g_a, g_b = {}, {}
    for m in prep.raw.a:
        _, L, I, _ = prep.raw.a[m].shape
        O = prep.raw.b[m].shape[-1]
        k = C * R if total_rank is None else min(total_rank, C * R)
        factored = {"auto": k < min(I, O), "factored": True, "dense": False}[path]
        if factored and k > min(I, O):
            raise AggregationError(
                f"flexlora path='factored' needs K={k} <= min(I, O)={min(I, O)} for {m}"
            )
        r = min(R, k, I, O)

        def one_layer(l, m=m, k=k, r=r, factored=factored):
            # √(p_k s_k) on both factors: P Q = Σ_k p_k s_k A_k B_k.
            p_IK, q_KO, live_K = _layer_stacks(prep, m, l, root)
            q_KO = q_KO * jnp.repeat(root, R)[:, None]
            if k < p_IK.shape[1]:
                p_IK, q_KO = _compact(p_IK, q_KO, live_K, k)
            top = top_svd_factored if factored else top_svd_dense
            u, s, v = top(p_IK, q_KO, r)
            return u * jnp.sqrt(s)[None], jnp.sqrt(s)[:, None] * v.T

        with jax.named_scope(f"flexlora_{m}"):
            # one layer at a time: no stacked copy of every layer's factors is ever written
            a_LIr, b_LrO = jax.lax.map(one_layer, jnp.arange(L))
        pad = R - r
        g_a[m] = jnp.pad(a_LIr, ((0, 0), (0, 0), (0, pad)))
        g_b[m] = jnp.pad(b_LrO, ((0, 0), (0, pad), (0, 0)))
    # g_a @ g_b is the unit-scale best rank-R approximation; split each scale evenly.
    c_mask = _out_mask(prep, ranks)
    inv_root = jax.lax.rsqrt(jnp.where(client_loras.scale > 0, client_loras.scale, 1.0))
    c_a, c_b = _to_clients(g_a, g_b, c_mask, inv_root)
    g_root = jax.lax.rsqrt(prep.scale)
    g_mask = _global_mask(prep)
    g_a = {m: v * g_root * g_mask[m][:, None, :] for m, v in g_a.items()}
    g_b = {m: v * g_root * g_mask[m][:, :, None] for m, v in g_b.items()}
    dims = _dims(client_loras)
    up, down = _count(prep.live, dims, "ab"), _count(c_mask, dims, "ab")
    out = _result(prep, ranks, g_a, g_b, g_mask, c_a, c_b, c_mask, client_loras.scale, up, down)
    return out, state


@register_rule("flexlora", options=("path", "total_rank"))
def flexlora(*, path: str = "auto", total_rank: int | None = None) -> Rule:
    """FlexLoRA: weighted sum of full updates, redistributed by truncated SVD.

    Args:
      path: `"auto"` (factored when K < min(I, O)), `"factored"` or `"dense"`.
      total_rank: static bound on Σ_k r_k (K). When given, live slots are gathered into K
        columns first, so padding costs no flops; `aggregate` checks the bound on the host, a
        federated run sets it from its clients' ranks (`rounds.round_config`).
    """
    if path not in ("auto", "factored", "dense"):
        raise AggregationError(f"flexlora path={path!r} is not auto, factored or dense")
    return Rule(no_state, functools.partial(_flexlora_apply, path=path, total_rank=total_rank))


# ----------------------------------------------------------------------------- FLoRA


def _fresh_factors(key, mask: dict, dims: dict, lead: tuple) -> tuple[dict, dict]:
    """PEFT-style fresh adapters: a ~ U(±1/√I) on live slots, b = 0."""
    a, b = {}, {}
    for m, k in zip(mask, jax.random.split(key, len(mask)), strict=True):
        i, o = dims[m]
        L, R = mask[m].shape[-2:]
        bound = 1.0 / math.sqrt(i)
        w = jax.random.uniform(k, lead + (L, i, R), jnp.float32, -bound, bound)
        a[m] = w * mask[m][..., None, :]
        b[m] = jnp.zeros(lead + (L, R, o), jnp.float32)
    return a, b


def _flora_apply(state, client_loras, weights, ranks, *, key):
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks)
    base = _dense_sum(prep)
    _, k_glob, k_cli = jax.random.split(key, 3)
    dims = _dims(client_loras)
    c_mask = _out_mask(prep, ranks)
    g_mask = _global_mask(prep)
    C = ranks.shape[0]
    c_a, c_b = _fresh_factors(k_cli, c_mask, dims, (C,))
    g_a, g_b = _fresh_factors(k_glob, g_mask, dims, ())
    up = _count(prep.live, dims, "ab")
    stacked = jnp.sum(_count(prep.live, dims, "ab") * prep.included)
    down = jnp.full((C,), stacked)
    out = _result(
        prep, ranks, g_a, g_b, g_mask, c_a, c_b, c_mask, client_loras.scale, up, down, base
    )
    return out, state


@register_rule("flora")
def flora() -> Rule:
    """FLoRA stacking: exact `Σ p_k ΔW_k` into `base_delta`; fresh adapters from the key."""
    return Rule(no_state, _flora_apply, init_base=zero_base_delta)


# ----------------------------------------------------------------------------- FedSA / FFA


def _fedsa_apply(state, client_loras, weights, ranks, *, key, propagate=False):
    del key  # deterministic
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks)
    g_a, g_b = _weighted_factors(prep, prep.p, propagate=propagate)  # g_b: evaluation only
    c_mask = _out_mask(prep, ranks)
    c_a, _ = _to_clients(g_a, g_b, c_mask)
    dims = _dims(client_loras)
    up, down = _count(prep.live, dims, "a"), _count(c_mask, dims, "a")
    out = _result(
        prep,
        ranks,
        g_a,
        g_b,
        _global_mask(prep),
        c_a,
        client_loras.b,
        client_loras.mask,
        client_loras.scale,
        up,
        down,
    )
    return out, state


@register_rule("fedsa")
def fedsa() -> Rule:
    """FedSA-LoRA: A averaged and shared, B personal."""
    one_pass = functools.partial(_fedsa_apply, propagate=True)
    return Rule(no_state, _fedsa_apply, personal=("b",), one_pass=one_pass)


def _ffa_apply(state, client_loras, weights, ranks, *, key, propagate=False):
    del key  # deterministic
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks)
    # A is shared: per-slot average over the clients holding the slot (exact when equal).
    g_a, _ = _weighted_factors(prep, prep.p, "a", propagate)
    for m in g_a:
        tot = jnp.sum(prep.p[:, None, None] * prep.live[m] * prep.included[:, None, None], 0)
        g_a[m] = g_a[m] / jnp.where(tot > 0, tot, 1.0)[:, None, :]
    _, g_b = _weighted_factors(prep, prep.p * prep.lora.scale / prep.scale, "b", propagate)
    c_mask = _out_mask(prep, ranks)
    ratio = prep.scale / jnp.where(client_loras.scale > 0, client_loras.scale, 1.0)
    c_b = {m: g_b[m][None] * c_mask[m][..., None] * ratio[:, None, None, None] for m in g_b}
    c_a = {m: g_a[m][None] * c_mask[m][:, :, None, :] for m in g_a}
    dims = _dims(client_loras)
    up, down = _count(prep.live, dims, "b"), _count(c_mask, dims, "b")
    out = _result(
        prep, ranks, g_a, g_b, _global_mask(prep), c_a, c_b, c_mask, client_loras.scale, up, down
    )
    return out, state


@register_rule("ffa")
def ffa() -> Rule:
    """FFA-LoRA: A frozen at the shared init, B averaged with scales folded in (exact)."""
    one_pass = functools.partial(_ffa_apply, propagate=True)
    return Rule(no_state, _ffa_apply, frozen=("a",), one_pass=one_pass)


# ----------------------------------------------------------------------------- FedEx-LoRA


def _fedex_apply(state, client_loras, weights, ranks, *, key):
    out, state = _fedit_apply(
        state, client_loras, weights, ranks, key=key, norm_weighting=False, prune=None
    )
    g = out.global_lora
    base = _dense_sum(_prepare(client_loras, weights, ranks.astype(jnp.int32)), minus=g)
    dims = _dims(client_loras)
    adapted = {m: (v.sum(-1) > 0) for m, v in g.mask.items()}  # [L]
    dense = sum(adapted[m].sum() * dims[m][0] * dims[m][1] for m in adapted) * BYTES_PER_PARAM
    out = dataclasses.replace(out, base_delta=base, bytes_down=out.bytes_down + dense)
    return out, state


@register_rule("fedex")
def fedex() -> Rule:
    """FedEx-LoRA: FedIT plus the exact residual folded into the base weights."""
    return Rule(no_state, _fedex_apply, init_base=zero_base_delta)
