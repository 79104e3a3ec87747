"""One federated round as one compiled program: sample clients, hand each its slots of its
cluster's global adapter, train every sampled client at once, screen, aggregate per cluster,
evaluate. It reads like FedAvg's server loop (fedjax's `fed_avg`) with an optax-style rule:

    state = init_server_state(cfg, fed, ranks=...)      # rule.init runs here, once
    state, metrics = run_round(state, params, data, cfg=cfg, fed=fed)   # rule.apply per cluster

FedAvg (McMahan et al., 2017) over LoRA adapters, with heterogeneous ranks handled by zero-padding
to a shared R (HetLoRA, Cho et al., 2024, sends client k the first r_k slots) and one global
adapter per task cluster (Floe; IFCA, Ghosh et al., 2020). The rule is `fed.agg` (a registered
name and its options, `floe_jax.federated.rules`); its state lives in `ServerState.rule_state`.

Shapes: N clients, C sampled per round, K clusters, S local steps, B batch, T tokens, L layers,
I / O widths, R padded rank.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from floe_jax.config import ConfigError, ModelConfig
from floe_jax.federated.aggregate import init_states, pick_clients, screen_aggregate
from floe_jax.federated.checks import check_base_format, check_shared_base
from floe_jax.federated.client import local_update_clients, token_loss
from floe_jax.federated.config import FedConfig
from floe_jax.federated.dp import NOISE_SALT, expected_clients, private_step
from floe_jax.federated.types import ClientData, eval_rows, sample_batches
from floe_jax.lora import LoRA, init_lora, rank_mask


@struct.dataclass
class ServerState:
    """Everything the server carries between rounds (and checkpoints). Never the frozen base.

    Attributes:
      global_loras: [K] one global adapter per cluster (K = 1 without clustering).
      assignment: int32 [N] cluster of each client.
      ranks: int32 [N] each client's true LoRA rank (<= R).
      base_delta: `{module: [L, I, O]}` accumulated into the base by rules that fold updates into
        the base weights (`Rule.init_base`: FLoRA, FedEx-LoRA), or None when the rule never does.
      personal: `{"b": {module: [N, L, R, O]}}` (or `"a"`) every client's own copy of the factors
        the rule keeps on the client between rounds (FedSA-LoRA's B), or None when it keeps
        none. It starts at the client's cluster's initial factors (B = 0: LoRA's init); a round
        starts each sampled client from it and stores back what an included client trained.
        (On a real deployment it lives on the devices; the simulation keeps it here.)
      rule_state: the aggregation rule's own state, one per cluster (`aggregate.init_states`,
        then each round's `Rule.apply` of that cluster).
      round: int32 [], rounds done.
      key: uint32 [2] raw PRNG key; round r uses `fold_in(key, r)`.
    """

    global_loras: LoRA
    assignment: jax.Array
    ranks: jax.Array
    base_delta: dict | None
    personal: dict | None
    rule_state: object
    round: jax.Array
    key: jax.Array

    @property
    def num_clusters(self) -> int:
        return self.global_loras.scale.shape[0]


# ----------------------------------------------------------------------------- state


def init_global_loras(cfg: ModelConfig, fed: FedConfig, num_clusters: int = 1) -> LoRA:
    """K fresh global adapters [K] (random `a`, zero `b`, all R slots live), from `fed.seed`."""
    R = fed.max_rank
    k_init = jax.random.fold_in(jax.random.PRNGKey(fed.seed), 0x7FFFFFFF)  # rounds: r small
    lcfg = dataclasses.replace(fed.lora, rank=R, max_rank=R)
    globs = [
        init_lora(cfg, lcfg, key=k, targets=fed.lora.targets, max_rank=R)
        for k in jax.random.split(k_init, num_clusters)
    ]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *globs)


def round_config(fed: FedConfig, ranks) -> FedConfig:
    """`fed` as the round program takes it (`train_federated`, the Flower server; `run_round`
    called directly takes `fed` as given), given every client's rank: FlexLoRA with no
    `total_rank` gets the largest sum of ranks that the `clients_per_round` clients of a round
    can have, so its SVD works on live columns only (`rules.flexlora`: the same ΔW, whose padded
    columns are zeros, at a fraction of the FLOPs when ranks are heterogeneous; the floats may
    differ in their last bits). A FlexLoRA client's rank never grows during a run, so the bound
    holds for every round. A given `total_rank` below that sum is an error (a round past it
    would drop live columns); other configs come back as they are."""
    if fed.agg.method != "flexlora":
        return fed
    top = int(np.sort(np.asarray(ranks, np.int64))[::-1][: fed.clients_per_round].sum())
    if fed.agg.total_rank is not None:
        if fed.agg.total_rank < top:
            raise ConfigError(
                f"AggregationConfig.total_rank={fed.agg.total_rank} is below {top}, the largest "
                f"sum of ranks of {fed.clients_per_round} clients of this run (clients_per_round)"
            )
        return fed
    return dataclasses.replace(fed, agg=dataclasses.replace(fed.agg, total_rank=top))


def init_server_state(
    cfg: ModelConfig, fed: FedConfig, *, ranks, assignment=None, num_clusters: int = 1
) -> ServerState:
    """A fresh server: K global adapters, the rule's initial state, and (for a rule that folds
    updates into the base) a zero base delta.

    Args:
      cfg: base model.
      fed: run config (lora, agg, seed).
      ranks: [N] each client's true rank, 1 <= r <= R.
      assignment: [N] cluster ids in [0, K); None puts every client in cluster 0.
      num_clusters: K.
    """
    R = fed.max_rank
    ranks = np.asarray(ranks, np.int32)
    bad = np.flatnonzero((ranks < 1) | (ranks > R))
    if bad.size:
        raise ConfigError(
            f"client {int(bad[0])} has rank {int(ranks[bad[0]])}, outside [1, the padded rank "
            f"FedConfig.lora.max_rank={R}]"
        )
    assignment = np.zeros_like(ranks) if assignment is None else np.asarray(assignment, np.int32)
    if assignment.shape != ranks.shape:
        raise ValueError(f"assignment has shape {assignment.shape}, ranks {ranks.shape}")
    if assignment.size and (assignment.min() < 0 or assignment.max() >= num_clusters):
        raise ValueError(f"assignment values must lie in [0, num_clusters={num_clusters})")
    rule = fed.agg.rule()
    key = jax.random.PRNGKey(fed.seed)
    global_loras = init_global_loras(cfg, fed, num_clusters)
    first = jax.tree.map(lambda x: x[0], global_loras)
    personal = {
        f: {m: v[jnp.asarray(assignment)] for m, v in getattr(global_loras, f).items()}
        for f in rule.personal
    } or None
    return ServerState(
        global_loras=global_loras,
        assignment=jnp.asarray(assignment),
        ranks=jnp.asarray(ranks),
        base_delta=None if rule.init_base is None else rule.init_base(first),
        personal=personal,
        rule_state=init_states(
            rule, global_loras, num_clusters, key=jax.random.fold_in(key, 0x7FFFFFFE)
        ),
        round=jnp.zeros((), jnp.int32),
        key=key,
    )


def client_start(
    global_loras: LoRA, cluster_C, rank_C, fed: FedConfig, personal: dict | None = None, ids_C=None
) -> LoRA:
    """Each client's adapter [C] from the server's: its cluster's global factors on its first r
    slots of the configured targets and layers, scale `alpha / r` (or `alpha / sqrt(r)`) from its
    true rank. With `personal` (`ServerState.personal`), the factors it holds come from clients
    `ids_C`'s own copies instead of the global ones."""
    g = jax.tree.map(lambda x: x[cluster_C], global_loras)
    for f, own in (personal or {}).items():  # factors a client keeps for itself
        g = dataclasses.replace(
            g, **{f: {**getattr(g, f), **{m: v[ids_C] for m, v in own.items()}}}
        )
    R = fed.max_rank
    slot_CR = (jnp.arange(R)[None, :] < rank_C[:, None]).astype(jnp.float32)
    layers = dataclasses.replace(fed.lora, rank=R, max_rank=R)
    layer_L = rank_mask(layers, next(iter(g.a.values())).shape[1], R)[:, 0]
    mask = {}
    for m in g.a:
        live = layer_L if m in fed.lora.targets else np.zeros_like(layer_L)
        mask[m] = jnp.asarray(live)[None, :, None] * slot_CR[:, None, :]
    r = rank_C.astype(jnp.float32)
    scale = fed.lora.alpha / (jnp.sqrt(r) if fed.lora.rslora else r)
    return LoRA(
        a={m: v * mask[m][:, :, None, :] for m, v in g.a.items()},
        b={m: v * mask[m][:, :, :, None] for m, v in g.b.items()},
        mask=mask,
        scale=scale,
    )


def effective_params(params: dict, base_delta: dict | None) -> dict:
    """The base with the accumulated `base_delta` folded in (the frozen base itself unchanged)."""
    if base_delta is None:
        return params
    layers = dict(params["layers"])
    for m, d in base_delta.items():
        p = dict(layers[m])
        p["w"] = (p["w"].astype(jnp.float32) + d).astype(p["w"].dtype)
        layers[m] = p
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- the round


def tensor_names(lora: LoRA) -> list[str]:
    """Names of the trainable tensors (`a['q_proj']`, ...) in the order `round_step` reports
    their finiteness: the leaf order of `lora.trainable()`."""
    flat = jax.tree_util.tree_flatten_with_path(lora.trainable())[0]
    return [p[0].key + jax.tree_util.keystr(p[1:]) for p, _ in flat]


def _update_stats(start: LoRA, trained: LoRA) -> tuple[jax.Array, jax.Array]:
    """`(finite [C, tensors], update norm [C])`: which trained tensors are finite (for the log)
    and the Frobenius norm of each client's change of its trainable tree."""
    tr = trained.trainable()
    per_axis = lambda x: tuple(range(1, x.ndim))
    finite_CX = jnp.stack(
        [jnp.all(jnp.isfinite(x), axis=per_axis(x)) for x in jax.tree.leaves(tr)], 1
    )
    diff = jax.tree.leaves(jax.tree.map(lambda x, y: x - y, tr, start.trainable()))
    norm_C = jnp.sqrt(sum(jnp.sum(jnp.square(x), axis=per_axis(x)) for x in diff))
    return finite_CX, norm_C


def round_step(
    state: ServerState,
    params: dict,
    data: ClientData,
    eval_data: ClientData | None = None,
    *,
    cfg: ModelConfig,
    fed: FedConfig,
) -> tuple[ServerState, dict]:
    """One round (pure; `run_round` is its jitted form).

    Args:
      state: server state before the round.
      params: the frozen base params.
      data: every client's training examples (N clients).
      eval_data: every client's eval examples, or None to skip evaluation.
      cfg, fed: static.

    Returns:
      `(state, metrics)`: the state after the round, and per-round device values: sums
      (`loss_sum`, `tokens`, `eval_loss_sum`, `eval_tokens`, `bytes_up`, `bytes_down`) and
      per-client arrays for the host's log (`client_ids`, `included`, `reason`, `finite`
      [C, tensors], `update_norm`, `examples`, `client_loss_sum`, `client_tokens`), and
      `global_finite`; with `fed.dp` enabled also `dp_clipped` (`dp.private_step`).
    """
    check_base_format(fed, params)  # at trace time: a quantized base under FLoRA / FedEx-LoRA
    plan = plan_round(state, fed, data.num_clients)
    trained, cm = train_sampled(
        effective_params(params, state.base_delta), plan.start, data, plan.ids_C,
        plan.data_keys, plan.train_keys, cfg=cfg, fed=fed, frozen=fed.agg.rule().frozen,
    )  # fmt: skip
    return finish_round(state, plan, trained, cm, params, eval_data, cfg=cfg, fed=fed)


@struct.dataclass
class RoundPlan:
    """What the server decides before a round's clients train (`plan_round`): the sampled
    clients, their clusters, ranks and starting adapters, and the keys each client trains with.
    The fused round and the Flower app (`floe_jax.flower`) both start from it, so a client that
    trains elsewhere trains exactly what it would have trained inside `round_step`.

    Attributes:
      k_round: the round's key, `fold_in(state.key, state.round)`.
      k_agg: the aggregation rules' key.
      ids_C, cluster_C, rank_C: int32 [C] the sampled clients, their clusters and true ranks.
      start: [C] each sampled client's starting adapter (`client_start`).
      data_keys, train_keys: [C] each client's batch-sampling and training key.
    """

    k_round: jax.Array
    k_agg: jax.Array
    ids_C: jax.Array
    cluster_C: jax.Array
    rank_C: jax.Array
    start: LoRA
    data_keys: jax.Array
    train_keys: jax.Array

    def take(self, rows) -> RoundPlan:
        """The plan of only the sampled clients at positions `rows` (those that replied)."""
        rows = jnp.asarray(rows, jnp.int32)
        keep = lambda x: x[rows]
        return dataclasses.replace(
            self,
            ids_C=keep(self.ids_C),
            cluster_C=keep(self.cluster_C),
            rank_C=keep(self.rank_C),
            start=jax.tree.map(keep, self.start),
            data_keys=keep(self.data_keys),
            train_keys=keep(self.train_keys),
        )


def plan_round(state: ServerState, fed: FedConfig, num_clients: int) -> RoundPlan:
    """Samples the round's C clients and builds their starting adapters and keys (traceable)."""
    C, K = fed.clients_per_round, state.num_clusters
    check_shared_base(fed, K)
    k_round = jax.random.fold_in(state.key, state.round)
    k_sample, k_data, k_train = jax.random.split(k_round, 3)
    k_agg = jax.random.fold_in(k_round, 0xA66)  # apart from the split above
    ids_C = jax.random.choice(k_sample, num_clients, (C,), replace=False)
    cluster_C, rank_C = state.assignment[ids_C], state.ranks[ids_C]
    start = client_start(state.global_loras, cluster_C, rank_C, fed, state.personal, ids_C)
    return RoundPlan(
        k_round=k_round,
        k_agg=k_agg,
        ids_C=ids_C,
        cluster_C=cluster_C,
        rank_C=rank_C,
        start=start,
        data_keys=jax.random.split(k_data, C),
        train_keys=jax.random.split(k_train, C),
    )


def train_sampled(
    params: dict,
    start: LoRA,
    data: ClientData,
    ids_C,
    data_keys,
    train_keys,
    *,
    cfg: ModelConfig,
    fed: FedConfig,
    frozen: tuple[str, ...] = (),
) -> tuple[LoRA, dict]:
    """The clients' side of a round (traceable): each of clients `ids_C` of `data` draws its
    `fed.local_steps` x `fed.batch_size` rows with its data key (`sample_batches`) and trains
    its starting adapter on them (`local_update_clients`). A device holding only its own
    examples calls it with its one-client `data` and `ids_C = [0]`.

    Returns:
      `(trained [C], metrics)`: as `local_update_clients`.
    """
    batches = sample_batches(data, ids_C, data_keys, fed.local_steps, fed.batch_size)
    return local_update_clients(
        params, start, batches, cfg=cfg, opt=fed.opt, keys=train_keys,
        client_chunk=fed.client_chunk, frozen=frozen,
    )  # fmt: skip


def finish_round(
    state: ServerState,
    plan: RoundPlan,
    trained: LoRA,
    cm: dict,
    params: dict | None = None,
    eval_data: ClientData | None = None,
    *,
    cfg: ModelConfig,
    fed: FedConfig,
) -> tuple[ServerState, dict]:
    """The server's side of a round (traceable): screens the clients' trained adapters,
    aggregates each cluster with the rule, updates the state and reports the round's metrics.

    Args:
      state: the server state the round was planned from.
      plan: `plan_round`'s plan, or `plan.take(rows)` for the clients that replied.
      trained, cm: the clients' trained adapters [C] and their `local_update` metrics [C], in
        the plan's order.
      params: the frozen base, needed only to evaluate (`eval_data`).
      eval_data: every client's eval examples, or None to skip evaluation.

    Returns:
      `(state, metrics)`: as `round_step`.
    """
    K = state.num_clusters
    rule = fed.agg.rule()
    k_round, k_agg, ids_C = plan.k_round, plan.k_agg, plan.ids_C
    cluster_C, rank_C, start = plan.cluster_C, plan.rank_C, plan.start

    # Screen, then aggregate each cluster's clients. downloads=False: clients restart from the
    # global adapter (`client_start`), so the per-client copies of it are never built (an
    # averaging rule then reads the factors once, at scale, and writes 1/C of them:
    # `screen_aggregate`; the update norms below read the trained factors once more).
    finite_CX, norm_C = _update_stats(start, trained)
    agg, rule_state, any_in = screen_aggregate(
        rule, state.rule_state, trained, cm["examples"], rank_C, cluster_C, K, key=k_agg,
        max_norm=fed.agg.max_norm, update_norm=norm_C, max_update_norm=fed.max_update_norm,
        downloads=False,
    )  # fmt: skip
    included_C = agg.included
    dp_metrics = {}
    if fed.dp.enabled:  # DP-FedAvg: clipped, noised sums replace the rule's average
        global_loras, dp_metrics = private_step(
            state.global_loras, start, trained, included_C, cluster_C,
            expected_clients(state.assignment, fed.clients_per_round, K), dp=fed.dp,
            frozen=rule.frozen, key=jax.random.fold_in(k_round, NOISE_SALT),
        )  # fmt: skip
    else:
        global_loras = jax.tree.map(
            lambda n, o: jnp.where(any_in.reshape((K,) + (1,) * (n.ndim - 1)), n, o),
            agg.global_lora,
            state.global_loras,
        )
    ranks_after_C = jnp.where(included_C, agg.ranks, rank_C)  # hetlora's pruning may lower it
    new_state = dataclasses.replace(
        state,
        global_loras=global_loras,
        base_delta=_fold_base(state.base_delta, agg.base_delta, any_in, fed),
        personal=_keep_personal(state.personal, trained, included_C, ids_C),
        rule_state=rule_state,
        ranks=state.ranks.at[ids_C].set(ranks_after_C),
        round=state.round + 1,
    )

    keep = lambda x: jnp.where(included_C, x, 0.0)
    metrics = {
        "round": state.round,
        "loss_sum": jnp.sum(keep(cm["loss_sum"])),
        "tokens": jnp.sum(keep(cm["tokens"])),
        "bytes_up": jnp.sum(keep(agg.bytes_up)),
        "bytes_down": jnp.sum(agg.bytes_down),
        "client_ids": ids_C,
        "included": included_C,
        "reason": agg.reason,
        "finite": finite_CX,
        "update_norm": norm_C,
        "examples": cm["examples"],
        "client_loss_sum": cm["loss_sum"],
        "client_tokens": cm["tokens"],
        "global_finite": jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(global_loras)])
        ),
    }
    metrics.update(dp_metrics)
    if eval_data is not None:
        metrics.update(_evaluate(new_state, params, eval_data, ids_C, ranks_after_C, cfg, fed))
    return new_state, metrics


def _fold_base(base_delta, round_delta, any_in, fed: FedConfig):
    """The server's base delta plus this round's (K = 1, `check_shared_base`)."""
    if round_delta is None:
        return base_delta
    if base_delta is None:
        raise ValueError(
            f"aggregation {fed.agg.method!r} returned a base_delta but its Rule has no init_base"
        )
    return {
        **base_delta,
        **{m: base_delta[m] + jnp.where(any_in[0], d[0], 0.0) for m, d in round_delta.items()},
    }


def _keep_personal(personal, trained: LoRA, included_C, ids_C):
    """Included clients keep the personal factors they trained (`Rule.personal`: they stay on
    the client, so the rule never changes them); the rest keep their previous ones."""
    if personal is None:
        return None
    old = jax.tree.map(lambda v: v[ids_C], personal)
    new = pick_clients(included_C, {f: getattr(trained, f) for f in personal}, old)
    return jax.tree.map(lambda v, n: v.at[ids_C].set(n), personal, new)


def _evaluate(state: ServerState, params, eval_data, ids_C, rank_C, cfg, fed) -> dict:
    """Eval-loss sums of the sampled clients' adapters after the round."""
    base = effective_params(params, state.base_delta)
    cluster_C = state.assignment[ids_C]
    after = client_start(state.global_loras, cluster_C, rank_C, fed, state.personal, ids_C)
    rows = eval_rows(eval_data, ids_C, fed.eval_batch_size)

    def ev(lora, r):
        return token_loss(base, lora, r["tokens"], r["mask"], r["loss_mask"], cfg=cfg)

    s_C, n_C = jax.vmap(ev)(after, rows)
    ok = jnp.isfinite(s_C)  # a client's bad eval data must not hide everyone else's loss
    return {
        "eval_loss_sum": jnp.sum(jnp.where(ok, s_C, 0.0)),
        "eval_tokens": jnp.sum(jnp.where(ok, n_C, 0.0)),
    }


run_round = jax.jit(round_step, static_argnames=("cfg", "fed"), donate_argnames=("state",))
run_round.__doc__ = """`round_step` compiled once per (cfg, fed, shapes); donates `state`, so never
touch the state passed in after the call."""
