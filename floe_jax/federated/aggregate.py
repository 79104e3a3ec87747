"""Heterogeneous-rank LoRA aggregation rules, one jitted call per round.

Shapes: C clients, L layers, I input width, O output width, R padded rank, K = C * R stacked rank.
Client k has factors `A_k [I, r_k]`, `B_k [r_k, O]` (zero-padded to R), scale `s_k` and update
`ΔW_k = s_k A_k B_k`; `p_k = n_k / Σ n` over the clients that pass screening.

Every rule is an `(init, apply)` pair of pure functions (optax style) registered by name:
`init(client_loras, *, key) -> state`, `apply(state, client_loras, weights, ranks) -> (Aggregated,
state)`. `aggregate` validates on the host, then runs one jitted `apply` whose static arguments are
the method and its options only: ranks and weights are arrays, so a new rank mix never recompiles.

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
  otherwise densely, from the eigendecomposition of the Gram matrix of ΔW's shorter side.
  Up: A_k, B_k. Down: A_k, B_k.
- `flora` — FLoRA (Wang et al., NeurIPS 2024): stacking, `Σ p_k s_k A_k B_k` exactly, returned as
  `base_delta` for every client to fold into its *base weights* (the base model changes each
  round); adapters restart fresh (A random, B zero) from the rule state's key. Up: A_k, B_k.
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
equal). Clients that are excluded (non-finite update, ‖ΔW_k‖_F above `max_norm`, zero weight)
contribute nothing and still download the round's result; `reason` says why, and
`exclusion_reasons` turns it into text.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.federated.linalg import top_svd_dense, top_svd_factored
from floe_jax.lora import LoRA

REASON_OK = 0
REASON_NONFINITE = 1
REASON_NORM = 2
REASON_ZERO_WEIGHT = 3
REASON_NOT_IN_CLUSTER = 4
REASONS = {
    REASON_OK: "included",
    REASON_NONFINITE: "non-finite update (NaN/Inf in its factors or scale)",
    REASON_NORM: "update norm ‖ΔW‖_F above max_norm",
    REASON_ZERO_WEIGHT: "zero weight",
    REASON_NOT_IN_CLUSTER: "not in this cluster",
}
BYTES_PER_PARAM = 4  # float32


class AggregationError(ValueError):
    """Invalid aggregation input; the message names the client or field."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Aggregated:
    """One round's aggregation result.

    Attributes:
      global_lora: the server's adapter padded to R (a new client is truncated from it).
      client_loras: [C] what each client downloads (its own rank slots; fedsa keeps its own B).
      base_delta: `{module: [L, I, O]}` to add to the base weights (flora, fedex), else None.
      included: [C] bool, clients whose update was used.
      reason: [C] int32 reason code (`REASONS`), 0 when included.
      ranks: [C] int32 rank each client holds after the round (hetlora pruning may lower it).
      bytes_up: [C] float32 bytes each client uploaded (exact below 2**24).
      bytes_down: [C] float32 bytes each client downloads.
    """

    global_lora: LoRA
    client_loras: LoRA
    base_delta: dict | None
    included: jax.Array
    reason: jax.Array
    ranks: jax.Array
    bytes_up: jax.Array
    bytes_down: jax.Array


class Rule(NamedTuple):
    """An aggregation rule: `init(client_loras, *, key) -> state` and
    `apply(state, client_loras, weights, ranks) -> (Aggregated, state)`.

    `personal` names the factors (`"a"`, `"b"`) that stay on the client between rounds: a
    federated round starts each client from its own copy of them, not the global one (FedSA's
    B). `frozen` names the factors clients never train (FFA's A)."""

    init: Callable
    apply: Callable
    personal: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()


_RULES: dict[str, Callable[..., Rule]] = {}


def register_rule(*names: str):
    """Registers a factory `(**options) -> Rule` under `names`."""

    def deco(factory):
        for n in names:
            _RULES[n] = factory
        return factory

    return deco


def available_rules() -> tuple[str, ...]:
    return tuple(sorted(_RULES))


def make_rule(method: str, **options) -> Rule:
    """The `(init, apply)` pair of `method` with its options bound."""
    if method not in _RULES:
        raise AggregationError(f"unknown aggregation method {method!r}; known: {available_rules()}")
    return _RULES[method](**options)


def client_roles(method: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`(personal, frozen)` factors of rule `method` (see `Rule`); `((), ())` for a name that is
    not registered (a caller's own aggregation function)."""
    if method not in _RULES:
        return (), ()
    rule = make_rule(method)
    return rule.personal, rule.frozen


def exclusion_reasons(reason) -> list[str]:
    """Host-side text for each client's reason code."""
    return [REASONS.get(int(r), f"unknown reason {int(r)}") for r in np.asarray(reason)]


# ----------------------------------------------------------------------------- shared helpers


class _Prep(NamedTuple):
    lora: LoRA  # live slots only, excluded clients zeroed
    live: dict  # {m: [C, L, R]} float32 live mask
    adapted: dict  # {m: [C, L]} float32: client adapts (m, l)
    p: jax.Array  # [C] normalised weights over included clients
    included: jax.Array
    reason: jax.Array
    sq_norm: jax.Array  # [C] ‖ΔW_k‖_F², summed over modules and layers
    scale: jax.Array  # [] global scale Σ p_k s_k (1 when nothing is included)


def _slot_mask(ranks, R):
    return (jnp.arange(R)[None, :] < ranks[:, None]).astype(jnp.float32)  # [C, R]


def _bcast(x_C, ndim):
    return x_C.reshape(x_C.shape + (1,) * (ndim - 1))


def lora_sq_norms(lora: LoRA) -> jax.Array:
    """‖ΔW‖_F² per client from factors, `s² Σ_m Σ_l tr((AᵀA)(BBᵀ))`, masks applied. [C]"""
    total = 0.0
    for m in lora.a:
        a = lora.a[m] * lora.mask[m][..., None, :]
        aa = jnp.einsum("...lir,...lis->...lrs", a, a)
        bb = jnp.einsum("...lro,...lso->...lrs", lora.b[m], lora.b[m])
        total = total + jnp.sum(aa * bb, axis=(-3, -2, -1))
    return total * lora.scale**2


def _prepare(lora: LoRA, weights, ranks, *, max_norm: float) -> _Prep:
    R = lora.max_rank
    ranks = ranks.astype(jnp.int32)
    slots = _slot_mask(ranks, R)
    live = {m: (v > 0).astype(jnp.float32) * slots[:, None, :] for m, v in lora.mask.items()}
    adapted = {m: (v.sum(-1) > 0).astype(jnp.float32) for m, v in live.items()}
    a = {m: jnp.where(live[m][..., None, :] > 0, v, 0.0) for m, v in lora.a.items()}
    b = {m: jnp.where(live[m][..., :, None] > 0, v, 0.0) for m, v in lora.b.items()}
    clean = LoRA(a=a, b=b, mask=live, scale=lora.scale)
    sq = lora_sq_norms(clean)
    finite = jnp.isfinite(sq) & jnp.isfinite(lora.scale)
    small = sq <= max_norm**2
    positive = weights > 0
    reason = jnp.where(
        ~finite,
        REASON_NONFINITE,
        jnp.where(~small, REASON_NORM, jnp.where(~positive, REASON_ZERO_WEIGHT, REASON_OK)),
    ).astype(jnp.int32)
    included = reason == REASON_OK
    w = jnp.where(included, weights.astype(jnp.float32), 0.0)
    p = w / jnp.where(w.sum() > 0, w.sum(), 1.0)
    keep = lambda x: jnp.where(_bcast(included, x.ndim), x, 0.0)
    clean = LoRA(
        a=jax.tree.map(keep, a),
        b=jax.tree.map(keep, b),
        mask=live,
        scale=jnp.where(included, lora.scale, 0.0),
    )
    s = jnp.sum(p * clean.scale)
    return _Prep(clean, live, adapted, p, included, reason, sq, jnp.where(s > 0, s, 1.0))


def _wsum(x, p):
    """Σ_k p_k x_k over the leading client axis."""
    return jnp.tensordot(p, x, axes=1)


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


def _dense_sum(prep: _Prep) -> dict:
    """`Σ_k p_k s_k A_k B_k` per module: {m: [L, I, O]}."""
    ps = prep.p * prep.lora.scale
    return {
        m: jnp.einsum("clir,clro->lio", prep.lora.a[m] * ps[:, None, None, None], prep.lora.b[m])
        for m in prep.lora.a
    }


def _result(prep, ranks, g_a, g_b, g_mask, c_a, c_b, c_mask, c_scale, up, down, base=None):
    return Aggregated(
        global_lora=LoRA(a=g_a, b=g_b, mask=g_mask, scale=prep.scale),
        client_loras=LoRA(a=c_a, b=c_b, mask=c_mask, scale=c_scale),
        base_delta=base,
        included=prep.included,
        reason=prep.reason,
        ranks=ranks.astype(jnp.int32),
        bytes_up=up.astype(jnp.float32),
        bytes_down=down.astype(jnp.float32),
    )


def _no_state(client_loras=None, *, key=None):
    return ()


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


def _fedit_apply(state, client_loras, weights, ranks, *, max_norm, norm_weighting, prune):
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks, max_norm=max_norm)
    up = _count(prep.live, _dims(client_loras), "ab")
    if prune is not None:
        ranks = jnp.where(prep.included, _prune_ranks(prep, ranks, prune), ranks)
        prep = _prepare(client_loras, weights, ranks, max_norm=max_norm)._replace(
            included=prep.included, reason=prep.reason, p=prep.p, scale=prep.scale
        )
        prep = prep._replace(lora=_zero_excluded(prep.lora, prep.included))
    if norm_weighting:
        w = prep.p * jnp.sqrt(jnp.where(prep.included, prep.sq_norm, 0.0))
        p = w / jnp.where(w.sum() > 0, w.sum(), 1.0)
        prep = prep._replace(p=jnp.where(w.sum() > 0, p, prep.p))
        prep = prep._replace(scale=jnp.where(w.sum() > 0, jnp.sum(prep.p * prep.lora.scale), 1.0))
    g_a = {m: _wsum(v, prep.p) for m, v in prep.lora.a.items()}
    g_b = {m: _wsum(v, prep.p) for m, v in prep.lora.b.items()}
    c_mask = _out_mask(prep, ranks)
    c_a, c_b = _to_clients(g_a, g_b, c_mask)
    down = _count(c_mask, _dims(client_loras), "ab")
    out = _result(
        prep, ranks, g_a, g_b, _global_mask(prep), c_a, c_b, c_mask, client_loras.scale, up, down
    )
    return out, state


def _zero_excluded(lora: LoRA, included) -> LoRA:
    keep = lambda x: jnp.where(_bcast(included, x.ndim), x, 0.0)
    return dataclasses.replace(lora, a=jax.tree.map(keep, lora.a), b=jax.tree.map(keep, lora.b))


@register_rule("fedavg", "fedit")
def fedit(*, max_norm: float = math.inf) -> Rule:
    """FedIT / FedAvg of A and B separately, zero-padded to R."""
    apply = functools.partial(_fedit_apply, max_norm=max_norm, norm_weighting=False, prune=None)
    return Rule(_no_state, apply)


@register_rule("hetlora")
def hetlora(
    *,
    max_norm: float = math.inf,
    norm_weighting: bool = False,
    prune_threshold: float | None = None,
) -> Rule:
    """HetLoRA: FedIT on zero-padded factors, optional norm weighting and rank self-pruning."""
    apply = functools.partial(
        _fedit_apply, max_norm=max_norm, norm_weighting=norm_weighting, prune=prune_threshold
    )
    return Rule(_no_state, apply)


# ----------------------------------------------------------------------------- FlexLoRA


def _compact(p_IK, q_KO, live_K, k: int):
    """Moves the live columns of p (rows of q) to the front and keeps the first k."""
    order = jnp.argsort(live_K <= 0, stable=True)[:k]
    return p_IK[:, order], q_KO[order]


def _flexlora_apply(state, client_loras, weights, ranks, *, max_norm, path, total_rank):
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks, max_norm=max_norm)
    C, R = ranks.shape[0], client_loras.max_rank
    root = jnp.sqrt(prep.p * prep.lora.scale)  # [C]
    g_a, g_b = {}, {}
    for m in prep.lora.a:
        a, b = prep.lora.a[m], prep.lora.b[m]  # [C, L, I, R], [C, L, R, O]
        _, L, I, _ = a.shape
        O = b.shape[-1]
        p_LIK = jnp.moveaxis(a * root[:, None, None, None], 0, 2).reshape(L, I, C * R)
        q_LKO = (b * root[:, None, None, None]).transpose(1, 0, 2, 3).reshape(L, C * R, O)
        live_LK = jnp.moveaxis(prep.live[m], 0, 1).reshape(L, C * R)
        k = C * R if total_rank is None else min(total_rank, C * R)
        factored = {"auto": k < min(I, O), "factored": True, "dense": False}[path]
        if factored and k > min(I, O):
            raise AggregationError(
                f"flexlora path='factored' needs K={k} <= min(I, O)={min(I, O)} for {m}"
            )
        r = min(R, k, I, O)

        def one_layer(p_IK, q_KO, live_K, k=k, r=r, factored=factored):
            if k < p_IK.shape[1]:
                p_IK, q_KO = _compact(p_IK, q_KO, live_K, k)
            top = top_svd_factored if factored else top_svd_dense
            u, s, v = top(p_IK, q_KO, r)
            return u * jnp.sqrt(s)[None], jnp.sqrt(s)[:, None] * v.T

        with jax.named_scope(f"flexlora_{m}"):
            a_LIr, b_LrO = jax.vmap(one_layer)(p_LIK, q_LKO, live_LK)
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


@register_rule("flexlora")
def flexlora(
    *, max_norm: float = math.inf, path: str = "auto", total_rank: int | None = None
) -> Rule:
    """FlexLoRA: weighted sum of full updates, redistributed by truncated SVD.

    Args:
      max_norm: exclude clients with ‖ΔW_k‖_F above it.
      path: `"auto"` (factored when K < min(I, O)), `"factored"` or `"dense"`.
      total_rank: static bound on Σ_k r_k (K). When given, live slots are gathered into K
        columns first, so padding costs no flops; `aggregate` checks the bound on the host.
    """
    if path not in ("auto", "factored", "dense"):
        raise AggregationError(f"flexlora path={path!r} is not auto, factored or dense")
    apply = functools.partial(_flexlora_apply, max_norm=max_norm, path=path, total_rank=total_rank)
    return Rule(_no_state, apply)


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


def _flora_init(client_loras=None, *, key=None):
    return {"key": jax.random.key(0) if key is None else key}


def _flora_apply(state, client_loras, weights, ranks, *, max_norm):
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks, max_norm=max_norm)
    base = _dense_sum(prep)
    key, k_glob, k_cli = jax.random.split(state["key"], 3)
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
    return out, {"key": key}


@register_rule("flora")
def flora(*, max_norm: float = math.inf) -> Rule:
    """FLoRA stacking: exact `Σ p_k ΔW_k` into `base_delta`; fresh adapters from the state key."""
    return Rule(_flora_init, functools.partial(_flora_apply, max_norm=max_norm))


# ----------------------------------------------------------------------------- FedSA / FFA


def _fedsa_apply(state, client_loras, weights, ranks, *, max_norm):
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks, max_norm=max_norm)
    g_a = {m: _wsum(v, prep.p) for m, v in prep.lora.a.items()}
    g_b = {m: _wsum(v, prep.p) for m, v in prep.lora.b.items()}  # evaluation only, never sent
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
def fedsa(*, max_norm: float = math.inf) -> Rule:
    """FedSA-LoRA: A averaged and shared, B personal."""
    return Rule(_no_state, functools.partial(_fedsa_apply, max_norm=max_norm), personal=("b",))


def _ffa_apply(state, client_loras, weights, ranks, *, max_norm):
    ranks = ranks.astype(jnp.int32)
    prep = _prepare(client_loras, weights, ranks, max_norm=max_norm)
    g_a, g_b = {}, {}
    for m in prep.lora.a:
        # A is shared: per-slot average over the clients holding the slot (exact when equal).
        w = prep.p[:, None, None] * prep.live[m]  # [C, L, R]
        tot = w.sum(0)
        g_a[m] = (
            jnp.einsum("clr,clir->lir", w, prep.lora.a[m])
            / jnp.where(tot > 0, tot, 1.0)[:, None, :]
        )
        ps = prep.p * prep.lora.scale / prep.scale
        g_b[m] = _wsum(prep.lora.b[m], ps)
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
def ffa(*, max_norm: float = math.inf) -> Rule:
    """FFA-LoRA: A frozen at the shared init, B averaged with scales folded in (exact)."""
    return Rule(_no_state, functools.partial(_ffa_apply, max_norm=max_norm), frozen=("a",))


# ----------------------------------------------------------------------------- FedEx-LoRA


def _fedex_apply(state, client_loras, weights, ranks, *, max_norm):
    out, state = _fedit_apply(
        state, client_loras, weights, ranks, max_norm=max_norm, norm_weighting=False, prune=None
    )
    prep = _prepare(client_loras, weights, ranks.astype(jnp.int32), max_norm=max_norm)
    exact = _dense_sum(prep)
    g = out.global_lora
    base = {m: exact[m] - jnp.einsum("lir,lro->lio", g.a[m], g.b[m]) * g.scale for m in exact}
    dims = _dims(client_loras)
    adapted = {m: (v.sum(-1) > 0) for m, v in g.mask.items()}  # [L]
    dense = sum(adapted[m].sum() * dims[m][0] * dims[m][1] for m in adapted) * BYTES_PER_PARAM
    out = dataclasses.replace(out, base_delta=base, bytes_down=out.bytes_down + dense)
    return out, state


@register_rule("fedex")
def fedex(*, max_norm: float = math.inf) -> Rule:
    """FedEx-LoRA: FedIT plus the exact residual folded into the base weights."""
    return Rule(_no_state, functools.partial(_fedex_apply, max_norm=max_norm))


# ----------------------------------------------------------------------------- entry point


def validate(client_loras: LoRA, weights, ranks, *, total_rank: int | None = None):
    """Host-side checks that need concrete values; returns (weights, ranks) as numpy arrays."""
    if client_loras.scale.ndim != 1:
        raise AggregationError(
            f"client_loras must be stacked on a client axis (scale [C]); got scale shape "
            f"{client_loras.scale.shape}"
        )
    C, R = client_loras.scale.shape[0], client_loras.max_rank
    w = np.asarray(weights, np.float64)
    r = np.asarray(ranks)
    if w.shape != (C,):
        raise AggregationError(f"weights has shape {w.shape}; expected ({C},), one per client")
    if r.shape != (C,):
        raise AggregationError(f"ranks has shape {r.shape}; expected ({C},), one per client")
    if not np.issubdtype(r.dtype, np.integer):
        raise AggregationError(f"ranks must be integers, got dtype {r.dtype}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
        raise AggregationError(f"weights must be finite and >= 0; client {bad} has {w[bad]}")
    if w.sum() <= 0:
        raise AggregationError("weights sum to zero: no client carries any weight")
    for k in range(C):
        if not 1 <= r[k] <= R:
            raise AggregationError(f"client {k} has rank {int(r[k])}, outside [1, R={R}]")
    for m, mask in client_loras.mask.items():
        live = (np.asarray(mask) > 0).sum(-1)  # [C, L]
        bad = (live != 0) & (live != r[:, None])
        if bad.any():
            k, layer = map(int, np.argwhere(bad)[0])
            raise AggregationError(
                f"client {k} module {m} layer {layer} has {int(live[k, layer])} live slots but "
                f"ranks[{k}]={int(r[k])}"
            )
    if total_rank is not None and int(r.sum()) > total_rank:
        raise AggregationError(f"sum of ranks {int(r.sum())} exceeds total_rank={total_rank}")
    return w.astype(np.float32), r.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("method", "options"))
def _apply_jit(method, options, state, client_loras, weights, ranks):
    return make_rule(method, **dict(options)).apply(state, client_loras, weights, ranks)


def aggregate_with_state(
    method: str, client_loras: LoRA, *, weights, ranks, state=None, key=None, **options
):
    """Like `aggregate`, and also takes and returns the rule state."""
    rule = make_rule(method, **options)  # unknown methods / bad options fail here
    w, r = validate(client_loras, weights, ranks, total_rank=options.get("total_rank"))
    if state is None:
        state = rule.init(client_loras, key=key)
    out, state = _apply_jit(method, tuple(sorted(options.items())), state, client_loras, w, r)
    inc = np.asarray(out.included)
    if not inc.any():
        why = "; ".join(f"client {k}: {t}" for k, t in enumerate(exclusion_reasons(out.reason)))
        raise AggregationError(f"every client was excluded ({why})")
    return out, state


def aggregate_traced(method: str, client_loras: LoRA, *, weights, ranks, key=None) -> Aggregated:
    """`aggregate` without the host-side checks, for use inside a caller's jit (the federated
    round, whose inputs are validated once before the loop). Rule state starts fresh each call,
    from `key` (FLoRA draws its fresh factors from it; the round passes a new key every round;
    None means a fixed key)."""
    rule = make_rule(method)
    state = rule.init(client_loras, key=key)
    return rule.apply(state, client_loras, weights, jnp.asarray(ranks, jnp.int32))[0]


def aggregate(method: str, client_loras: LoRA, *, weights, ranks, **options) -> Aggregated:
    """Aggregates stacked client adapters with rule `method` in one jitted call.

    Args:
      method: one of `available_rules()`.
      client_loras: stacked LoRA, every leaf [C, ...], padded to R.
      weights: [C] example counts n_k (normalised over included clients inside).
      ranks: [C] int true ranks, 1 <= r_k <= R.
      **options: static rule options (`max_norm`, hetlora's `norm_weighting` and
        `prune_threshold`, flexlora's `path` and `total_rank`), plus `key` and `state`.

    Returns:
      An `Aggregated`.

    Raises:
      AggregationError: bad shapes, ranks, weights, or every client excluded.
    """
    return aggregate_with_state(method, client_loras, weights=weights, ranks=ranks, **options)[0]
