"""Aggregation of heterogeneous-rank LoRA adapters: the rule interface and registry, the one
per-cluster aggregation, screening plus aggregation in one program (`screen_aggregate`), and
the public `aggregate` entry point.

Shapes: C clients, K clusters, L layers, I input width, O output width, R padded rank. Client k
has factors `A_k [I, r_k]`, `B_k [r_k, O]` (zero-padded to R), scale `s_k` and update
`ΔW_k = s_k A_k B_k`.

A rule is an optax-style `(init, apply)` pair of pure functions (`Rule`), registered by name
(`register_rule`; the built-in rules live in `floe_jax.federated.rules`):

    state = rule.init(global_lora, key=key)                        # once, per run
    out, state = rule.apply(state, client_loras, weights, ranks, key=key)   # every round

`apply` sees screened clients: `screening.screen` has already set the weight of every client it
leaves out (non-finite update, ‖ΔW_k‖_F above `max_norm`, an adapter that moved more than
`max_update_norm`, zero weight) to zero, and a rule includes exactly the clients of positive
weight, zeroing the factors of the rest (so a NaN never reaches an average). `key` is a fresh key
per call (FLoRA draws its new factors from it); rules that need none ignore it. A rule may also
give a `one_pass` apply that lets non-finite factors through to its result, so that
`screen_aggregate` can skip the screening's own read of the factors.

`aggregate_clusters` runs a rule once per cluster over the same screened clients, threading the
rule state, and gives each client its own cluster's result: Floe's clustered aggregation
(`cluster.cluster_aggregate`) and the federated round (`rounds.round_step`) both use it. With
`downloads=False` it leaves out `Aggregated.client_loras` (the global adapter written into every
client's slots, [C] of the stacked size): the round restarts each client from the global adapter
(`rounds.client_start`), so what it needs is one read of the factors and a write of 1/C of them.
`aggregate` validates on the host, then runs one jitted program whose static arguments are the
method and its options only: ranks and weights are arrays, so a new rank mix never recompiles.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from floe_jax.federated.screening import (  # noqa: F401  (re-exported: callers name them here)
    REASON_BAD_WEIGHT,
    REASON_NONFINITE,
    REASON_NORM,
    REASON_OK,
    REASON_UPDATE_NORM,
    REASON_ZERO_WEIGHT,
    REASONS,
    exclusion_reasons,
    factors_finite,
    lora_sq_norms,
    scale_to_unit,
    screen,
)
from floe_jax.lora import LoRA

BYTES_PER_PARAM = 4  # adapters travel as float32
# Stacked client factors from which `screen_aggregate` takes the one-pass program by default. It
# compiles a second program, its fallback: a few seconds once per run (3-6 s more for the first
# round of each of the demo's runs), against one read of the factors saved per round (about 10 ms
# per 256 MiB at this CPU's jitted-sum rate): below this a run would need hundreds of rounds to
# gain.
ONE_PASS_MIN_BYTES = 256 << 20


class AggregationError(ValueError):
    """Invalid aggregation input; the message names the client or field."""


@struct.dataclass
class Aggregated:
    """One aggregation's result.

    Attributes:
      global_lora: the server's adapter padded to R (a new client is truncated from it); with
        clusters, one per cluster on a leading K axis.
      client_loras: [C] what each client downloads (its own rank slots; fedsa keeps its own B);
        None from a call with `downloads=False`.
      base_delta: `{module: [L, I, O]}` ([K, L, I, O] with clusters) to add to the base weights
        (flora, fedex), else None.
      included: [C] bool, clients whose update was used.
      reason: [C] int32 reason code (`REASONS`), 0 when included.
      ranks: [C] int32 rank each client holds after the round (hetlora pruning may lower it).
      bytes_up: [C] float32 bytes each client uploaded (exact below 2**24).
      bytes_down: [C] float32 bytes each client downloads.
    """

    global_lora: LoRA
    client_loras: LoRA | None
    base_delta: dict | None
    included: jax.Array
    reason: jax.Array
    ranks: jax.Array
    bytes_up: jax.Array
    bytes_down: jax.Array


class Rule(NamedTuple):
    """An aggregation rule.

    Attributes:
      init: `(lora, *, key) -> state`, run once per cluster when the server starts; `lora` is
        one adapter (no client or cluster axis: the cluster's global adapter), showing the
        adapters' structure (`init_states`).
      apply: `(state, client_loras [C], weights [C], ranks [C], *, key) -> (Aggregated, state)`,
        run every round for each cluster with that cluster's own state, on screened clients.
      personal: factors (`"a"`, `"b"`) that stay on the client between rounds: a federated
        round keeps each included client's trained copy of them, unchanged by the rule, and
        starts the client from it (FedSA's B).
      frozen: factors clients never train (FFA's A).
      init_base: for a rule that folds updates into the shared base weights (FLoRA,
        FedEx-LoRA), `(global_lora) -> {module: zeros [L, I, O]}`, the base delta the server
        accumulates `Aggregated.base_delta` into; None for a rule that never does.
      one_pass: `apply` for weights screened without reading the factors (`screen_aggregate`):
        it must return `apply`'s result, state included, whenever every client's factors are
        finite, and a non-finite `global_lora` factor whenever any entry of any client's
        factors is NaN or ±Inf (a zero-weight client's and padded slots too). None for a rule
        that always runs after the full screening.
    """

    init: Callable
    apply: Callable
    personal: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    init_base: Callable | None = None
    one_pass: Callable | None = None


_RULES: dict[str, tuple[Callable[..., Rule], tuple[str, ...]]] = {}


def register_rule(*names: str, options: tuple[str, ...] = ()):
    """Registers a factory `(**options) -> Rule` under `names`; `options` names the keyword
    options it takes (the fields of `AggregationConfig` it reads)."""

    def deco(factory):
        for n in names:
            _RULES[n] = (factory, tuple(options))
        return factory

    return deco


def unregister_rule(*names: str) -> None:
    """Removes rules registered under `names` (a test's or an experiment's own)."""
    for n in names:
        _RULES.pop(n, None)


def available_rules() -> tuple[str, ...]:
    return tuple(sorted(_RULES))


def rule_options(method: str) -> tuple[str, ...]:
    """The option names rule `method` takes."""
    _check_method(method)
    return _RULES[method][1]


def _check_method(method: str) -> None:
    if method not in _RULES:
        raise AggregationError(f"unknown aggregation method {method!r}; known: {available_rules()}")


def make_rule(method: str, **options) -> Rule:
    """The `Rule` of `method` with its options bound."""
    _check_method(method)
    factory, takes = _RULES[method]
    extra = sorted(set(options) - set(takes))
    if extra:
        raise AggregationError(
            f"aggregation method {method!r} takes no option {extra[0]!r} "
            f"(its options: {', '.join(takes) or 'none'})"
        )
    return factory(**options)


def no_state(global_lora=None, *, key=None):
    """`init` of a rule that keeps no state between rounds."""
    return ()


def zero_base_delta(global_lora: LoRA) -> dict:
    """`{module: zeros [L, I, O]}` for every module of the (unstacked) adapter."""
    return {
        m: jnp.zeros(global_lora.a[m].shape[-3:-1] + global_lora.b[m].shape[-1:], jnp.float32)
        for m in global_lora.a
    }


def broadcast_clients(x_C: jax.Array, ndim: int) -> jax.Array:
    """`x [C]` reshaped to broadcast against a leaf of `ndim` dimensions led by C."""
    return x_C.reshape(x_C.shape + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------- per cluster


def pick_clients(c_C, new, old):
    """Per client: `new`'s leaves where `c_C` [C] is true, `old`'s elsewhere."""
    return jax.tree.map(lambda n, o: jnp.where(broadcast_clients(c_C, n.ndim), n, o), new, old)


def init_states(rule: Rule, lora: LoRA, num_clusters: int, *, key: jax.Array) -> tuple:
    """The K clusters' rule states: cluster k's is `rule.init(lora_k, key=fold_in(key, k))`,
    where `lora` is one adapter shared by every cluster (no leading axis) or the K clusters'
    stacked adapters (`lora.scale` of shape [K]): each cluster's state is its own, so a rule
    with memory (server momentum) never mixes two clusters."""
    stacked = jnp.ndim(lora.scale) == 1
    one = lambda k: jax.tree.map(lambda x: x[k], lora) if stacked else lora
    return tuple(rule.init(one(k), key=jax.random.fold_in(key, k)) for k in range(num_clusters))


def aggregate_clusters(
    rule: Rule,
    states: tuple,
    client_loras: LoRA,
    weights,
    ranks,
    labels,
    num_clusters: int,
    *,
    key: jax.Array,
    reason=None,
    downloads: bool = True,
) -> tuple[Aggregated, object, jax.Array]:
    """Aggregates each cluster's clients with `rule` (traceable; K = `num_clusters` is static).

    Rules run with float32 matmuls at full precision (`jax.default_matmul_precision`): an
    accelerator's default passes (TF32 on NVIDIA GPUs, bfloat16 on TPUs) are for training
    steps, not for a server's sums and SVDs, whose errors every client inherits; on an H200
    FlexLoRA differed from NumPy's by 1.4e-3 (relative) at the default. A CPU computes float32
    either way.

    Args:
      rule, states: the rule and the K clusters' states (`init_states`); cluster k is applied
        with `states[k]`.
      client_loras: stacked LoRA [C, ...]; weights [C] screened weights; ranks [C] true ranks.
      labels: [C] int cluster of each client, in [0, K).
      key: cluster k's rule gets `fold_in(key, k)`.
      reason: [C] screening reasons (`screen`), copied into the result.
      downloads: whether to return `client_loras`, what each client downloads. False for a
        caller that restarts clients from the global adapter (the federated round): the
        program then never computes them (XLA drops the unused broadcast), and an averaging
        rule writes 1/C of what it reads instead of as much again.

    Returns:
      `(Aggregated, states, any_in [K] bool)`: `global_lora` and `base_delta` carry a leading K
      axis; every per-client field is the client's own cluster's; `any_in[k]` says whether
      cluster k used any client (when not, its global adapter means nothing).
    """
    ranks = jnp.asarray(ranks, jnp.int32)
    if len(states) != num_clusters:
        raise ValueError(f"{len(states)} rule states for {num_clusters} clusters")
    outs, new_states = [], []
    with jax.default_matmul_precision("highest"):
        for k in range(num_clusters):  # K is small and static
            w_k = jnp.where(labels == k, weights, 0.0)
            key_k = jax.random.fold_in(key, k)
            out, s_k = rule.apply(states[k], client_loras, w_k, ranks, key=key_k)
            outs.append(out if downloads else dataclasses.replace(out, client_loras=None))
            new_states.append(s_k)
    per_client = ("included", "reason", "ranks", "bytes_up", "bytes_down")
    if downloads:
        per_client = ("client_loras", *per_client)
    merged = {n: getattr(outs[0], n) for n in per_client}
    for k, out in enumerate(outs[1:], start=1):
        merged = pick_clients(labels == k, {n: getattr(out, n) for n in per_client}, merged)
    stack = lambda *xs: jnp.stack(xs)
    merged = Aggregated(
        **{"client_loras": None, **merged},
        global_lora=jax.tree.map(stack, *(o.global_lora for o in outs)),
        base_delta=None
        if outs[0].base_delta is None
        else jax.tree.map(stack, *(o.base_delta for o in outs)),
    )
    if reason is not None:
        merged = dataclasses.replace(merged, reason=reason)
    any_in = jnp.stack([jnp.any(o.included) for o in outs])
    return merged, tuple(new_states), any_in


def screen_aggregate(
    rule: Rule,
    states: tuple,
    client_loras: LoRA,
    weights,
    ranks,
    labels,
    num_clusters: int,
    *,
    key: jax.Array,
    max_norm: float | None = None,
    update_norm: jax.Array | None = None,
    max_update_norm: float | None = None,
    downloads: bool = True,
    one_pass: bool | None = None,
) -> tuple[Aggregated, object, jax.Array]:
    """`screen`, then `aggregate_clusters` on the screened clients (traceable): the program of
    every aggregation (`aggregate_jit`) and of the federated round (`rounds.finish_round`).

    The full screening reads every client's factors for NaN/Inf and an averaging rule reads
    them again for its weighted sum: two reads where the rule's one would do. So with
    `one_pass`, for a rule with `Rule.one_pass` and a call without `downloads`, the rule runs
    first on weights screened without reading the factors (`screen(read_factors=False)`;
    `max_norm` still reads them for its Gram norms), and its `one_pass` apply makes the global
    adapter non-finite whenever any factor entry is. A finite global adapter means every
    factor was finite, so the full screening would have given the same weights and reasons
    and the result is the two-pass one bit for bit. Otherwise (also after an overflow of
    finite factors) `lax.cond` runs the two-pass program, which gives its own results and
    reason codes; on the normal path that branch costs nothing. With `downloads` the two-pass
    program always runs: there the [C] outputs' writes, not the second read, take the time.

    Args:
      rule, states, client_loras, ranks, labels, num_clusters, key, downloads: as
        `aggregate_clusters`.
      weights: [C] example counts, unscreened.
      max_norm, update_norm, max_update_norm: as `screen`.
      one_pass: None takes the one-pass program for factors of at least `ONE_PASS_MIN_BYTES`
        (below, compiling its fallback costs more than the read it saves); True whenever the
        rule has one; False never (to compare the two).

    Returns:
      As `aggregate_clusters`, with `reason` the screening's.
    """

    def run(r: Rule, read_factors: bool):
        with jax.default_matmul_precision("highest"):  # `max_norm`'s Gram norms, as the rules
            w, reason = screen(
                client_loras, weights, max_norm=max_norm, update_norm=update_norm,
                max_update_norm=max_update_norm, read_factors=read_factors,
            )  # fmt: skip
        return aggregate_clusters(
            r, states, client_loras, w, ranks, labels, num_clusters, key=key, reason=reason,
            downloads=downloads,
        )  # fmt: skip

    two_pass = lambda: run(rule, True)
    if one_pass is None:
        one_pass = sum(x.nbytes for x in jax.tree.leaves((client_loras.a, client_loras.b)))
        one_pass = one_pass >= ONE_PASS_MIN_BYTES
    if not one_pass or downloads or rule.one_pass is None:
        return two_pass()
    fast = run(rule._replace(apply=rule.one_pass), False)
    g = fast[0].global_lora
    finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((g.a, g.b))])
    # `lax.cond`, not a `while_loop` of 0/1 trips: in `bench aggregate` the loop (which closes
    # over the clients' factors) made this program slower than the two-pass one.
    return jax.lax.cond(jnp.all(finite), lambda: fast, two_pass)


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
    if w.max() <= 0:
        raise AggregationError("weights sum to zero: no client carries any weight")
    w = scale_to_unit(w)  # in float64, before float32 could overflow (1e39) or flush (1e-46)
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


def _aggregate_program(
    method,
    options,
    max_norm,
    num_clusters,
    states,
    client_loras,
    weights,
    ranks,
    labels,
    key,
    downloads=True,
    one_pass=None,
):
    return screen_aggregate(
        make_rule(method, **dict(options)), states, client_loras, weights, ranks, labels,
        num_clusters, key=key, max_norm=max_norm, downloads=downloads, one_pass=one_pass,
    )  # fmt: skip


_STATIC = ("method", "options", "max_norm", "num_clusters", "downloads", "one_pass")
aggregate_jit = jax.jit(_aggregate_program, static_argnames=_STATIC)
aggregate_jit.__doc__ = """`screen_aggregate` of rule `method` (its `options` a sorted tuple of
pairs), compiled once per (method, options, max_norm, K, downloads, one_pass, shapes);
`downloads=False` is the aggregation a federated round runs (no `client_loras`); `one_pass` as
`screen_aggregate`'s (False: the two-pass program, for comparison)."""
aggregate_jit_donating = jax.jit(
    _aggregate_program, static_argnames=_STATIC, donate_argnames=("client_loras",)
)
aggregate_jit_donating.__doc__ = """`aggregate_jit` that consumes `client_loras`: XLA writes the
outputs of their shapes (each client's factors) into the clients' own buffers, memory already
mapped, where a new output costs XLA:CPU a page fault per 4 KiB on first touch (for the averaging
rules at Qwen2.5-0.5B scale, most of their time). For a caller done with the clients' factors."""


def _single(out: Aggregated) -> Aggregated:
    """Drops the K = 1 cluster axis."""
    first = lambda t: None if t is None else jax.tree.map(lambda x: x[0], t)
    return dataclasses.replace(
        out, global_lora=first(out.global_lora), base_delta=first(out.base_delta)
    )


def aggregate_with_state(
    method: str,
    client_loras: LoRA,
    *,
    weights,
    ranks,
    state=None,
    key=None,
    max_norm: float | None = None,
    downloads: bool = True,
    **options,
):
    """Like `aggregate`, and also takes and returns the rule state."""
    rule = make_rule(method, **options)  # unknown methods / bad options fail here
    w, r = validate(client_loras, weights, ranks, total_rank=options.get("total_rank"))
    key = jax.random.key(0) if key is None else key
    if state is None:
        (state,) = init_states(rule, jax.tree.map(lambda x: x[0], client_loras), 1, key=key)
    out, (state,), _ = aggregate_jit(
        method,
        tuple(sorted(options.items())),
        None if max_norm is None or math.isinf(max_norm) else float(max_norm),
        1,
        (state,),
        client_loras,
        w,
        r,
        jnp.zeros(r.shape, jnp.int32),
        key,
        downloads=downloads,
    )
    if not np.asarray(out.included).any():
        why = "; ".join(f"client {k}: {t}" for k, t in enumerate(exclusion_reasons(out.reason)))
        raise AggregationError(f"every client was excluded ({why})")
    return _single(out), state


def aggregate(method: str, client_loras: LoRA, *, weights, ranks, **options) -> Aggregated:
    """Aggregates stacked client adapters with rule `method` in one jitted call.

    Args:
      method: one of `available_rules()`.
      client_loras: stacked LoRA, every leaf [C, ...], padded to R.
      weights: [C] example counts n_k (normalised over included clients inside).
      ranks: [C] int true ranks, 1 <= r_k <= R.
      **options: `max_norm` (screening), the rule's static options (hetlora's
        `norm_weighting` and `prune_threshold`, flexlora's `path` and `total_rank`), plus `key`,
        `state` and `downloads` (False: `client_loras` is None and never computed, the cost a
        federated round pays; see `aggregate_clusters`).

    Returns:
      An `Aggregated`.

    Raises:
      AggregationError: bad shapes, ranks, weights, or every client excluded.
    """
    return aggregate_with_state(method, client_loras, weights=weights, ranks=ranks, **options)[0]
