"""One federated round as one compiled program: sample clients, hand each its slots of its
cluster's global adapter, train every sampled client at once, drop bad updates, aggregate,
evaluate.

FedAvg (McMahan et al., 2017) over LoRA adapters, with heterogeneous ranks handled by zero-padding
to a shared R (HetLoRA, Cho et al., 2024, sends client k the first r_k slots) and one global
adapter per task cluster (Floe; IFCA, Ghosh et al., 2020). The aggregation rule is pluggable:
`aggregate(method, client_loras [C], *, weights [C], ranks [C]) -> Aggregated`. `fedavg` below is
the built-in rule (weighted, zero-padded averaging of `a` and `b`).

Shapes: N clients, C sampled per round, K clusters, S local steps, B batch, T tokens, E examples per
client, L layers, I / O widths, R padded rank.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ConfigError, LoRAConfig, ModelConfig, normalize_targets
from floe_jax.federated.aggregate import (
    Aggregated,
    aggregate_traced,
    available_rules,
    client_roles,
)
from floe_jax.federated.client import local_update_clients, make_optimizer, token_loss
from floe_jax.federated.types import ClientData
from floe_jax.lora import LoRA, init_lora, rank_mask

AggregateFn = Callable[..., Aggregated]
_BYTES_PER_PARAM = 4  # adapters travel as float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedConfig:
    """A federated LoRA training run.

    Attributes:
      num_rounds: rounds to run.
      clients_per_round: C clients sampled (without replacement) each round.
      local_steps: S optimizer steps per client per round.
      batch_size: B examples per step.
      seq_len: T; client data must have this sequence length.
      lr, weight_decay, optimizer: the client optimizer (`adamw`, `adam`, `sgd`), fresh per round.
      max_grad_norm: clip each step's gradient to this global norm; None = no clipping.
      aggregation: method name handed to the aggregation rule (`fedavg` built in).
      client_chunk: 0 vmaps all sampled clients; k > 0 trains k at a time (`lax.map`); None
        picks by backend: 1 on a CPU, 0 on a GPU or TPU (`client.default_client_chunk`).
      seed: seeds the server key: every random choice derives from it and the round index.
      checkpoint_every: save the server state every this many rounds (and at the end).
      max_update_norm: drop a client whose adapter moved more than this (Frobenius norm of the
        change of its trainable tree); None = no limit.
      lora_rank: padded rank R shared by every client.
      lora_alpha, rslora: scale numerator and rule; each client's scale uses its true rank.
      lora_targets, lora_layers: adapted projections and layers (None = all layers).
      eval_batch_size: rows of each sampled client's eval split scored after aggregation.
      max_to_keep: checkpoints kept on disk.
      clustering: `"none"` (one global adapter), `"updates"` (Floe's task clustering: before
        round 0 every client trains once from a shared fresh adapter and the server clusters
        the updates by cosine similarity of their ΔW, see `loop.cluster_by_updates`), or
        `"given"` (the caller passes `assignment`, e.g. task labels).
      num_clusters: K for `"updates"`; None picks K by silhouette (`cluster.cluster_clients`).
      cluster_method: `"spectral"` (k-means on a spectral embedding) or `"agglomerative"`.
    """

    num_rounds: int = 10
    clients_per_round: int = 8
    local_steps: int = 4
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    max_grad_norm: float | None = None
    aggregation: str = "fedavg"
    client_chunk: int | None = None  # by backend; see local_update_clients
    seed: int = 0
    checkpoint_every: int = 1
    max_update_norm: float | None = None
    lora_rank: int = 32
    lora_alpha: float = 16.0
    rslora: bool = False
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    lora_layers: tuple[int, ...] | None = None
    eval_batch_size: int = 8
    max_to_keep: int = 2
    clustering: str = "none"
    num_clusters: int | None = None
    cluster_method: str = "spectral"

    def __post_init__(self):
        for name in (
            "num_rounds",
            "clients_per_round",
            "local_steps",
            "batch_size",
            "seq_len",
            "checkpoint_every",
            "lora_rank",
            "eval_batch_size",
            "max_to_keep",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"FedConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.clustering not in ("none", "updates", "given"):
            raise ConfigError(
                f"FedConfig.clustering={self.clustering!r} is not one of none, updates, given"
            )
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ConfigError(f"FedConfig.num_clusters must be >= 1, got {self.num_clusters}")
        if self.client_chunk is not None and self.client_chunk < 0:
            raise ConfigError(f"FedConfig.client_chunk must be >= 0, got {self.client_chunk}")
        if self.lr <= 0:
            raise ConfigError(f"FedConfig.lr must be > 0, got {self.lr}")
        if self.max_update_norm is not None and self.max_update_norm <= 0:
            raise ConfigError(f"FedConfig.max_update_norm must be > 0, got {self.max_update_norm}")
        make_optimizer(self.optimizer, lr=self.lr)  # raises on an unknown name
        object.__setattr__(self, "lora_targets", normalize_targets(self.lora_targets))
        if self.lora_layers is not None:
            object.__setattr__(self, "lora_layers", tuple(sorted(set(self.lora_layers))))

    @property
    def opt(self):
        return make_optimizer(
            self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )

    def lora_config(self, rank: int | None = None) -> LoRAConfig:
        return LoRAConfig(
            rank=rank or self.lora_rank,
            alpha=self.lora_alpha,
            rslora=self.rslora,
            targets=self.lora_targets,
            layers=self.lora_layers,
            max_rank=self.lora_rank,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds (and checkpoints). Never the frozen base.

    Attributes:
      global_loras: [K] one global adapter per cluster (K = 1 without clustering).
      assignment: int32 [N] cluster of each client.
      ranks: int32 [N] each client's true LoRA rank (<= R).
      base_delta: `{module: [L, I, O]}` accumulated into the base by rules that fold updates into
        the base weights (FLoRA, FedEx-LoRA), or None when the rule never does.
      personal: `{"b": {module: [N, L, R, O]}}` (or `"a"`) every client's own copy of the factors
        the rule keeps on the client between rounds (FedSA-LoRA's B), or None when it keeps
        none. It starts at the client's cluster's initial factors (B = 0: LoRA's init); a round
        starts each sampled client from it and stores back what an included client trained.
        (On a real deployment it lives on the devices; the simulation keeps it here.)
      round: int32 [], rounds done.
      key: uint32 [2] raw PRNG key; round r uses `fold_in(key, r)`.
    """

    global_loras: LoRA
    assignment: jax.Array
    ranks: jax.Array
    base_delta: dict | None
    personal: dict | None
    round: jax.Array
    key: jax.Array

    @property
    def num_clusters(self) -> int:
        return self.global_loras.scale.shape[0]


# ----------------------------------------------------------------------------- aggregation


def live_params(lora: LoRA) -> jax.Array:
    """Live (unpadded) parameter count per client: [] or [C] float32 (traceable)."""
    total = 0.0
    for m in lora.a:
        i, o = lora.a[m].shape[-2], lora.b[m].shape[-1]
        total = total + lora.mask[m].sum(axis=(-2, -1)) * (i + o)
    return jnp.asarray(total, jnp.float32)


def fedavg(method: str, client_loras: LoRA, *, weights: jax.Array, ranks: jax.Array) -> Aggregated:
    """Weighted FedAvg of zero-padded factors (FedIT), traceable inside the round's jit."""
    if method not in ("fedavg", "fedit"):
        raise ConfigError(f"aggregation={method!r}: fedavg handles 'fedavg'/'fedit' only")
    return aggregate_traced("fedavg", client_loras, weights=weights, ranks=ranks)


def default_aggregate_fn(method: str) -> AggregateFn:
    """The traced rule for `method` (any of `aggregate.available_rules()`); unknown names fail
    here, before anything is compiled."""
    if method not in available_rules():
        raise ConfigError(
            f"FedConfig.aggregation={method!r} is not one of {', '.join(available_rules())}"
        )
    return aggregate_traced


# ----------------------------------------------------------------------------- state


def init_server_state(
    cfg: ModelConfig,
    fed: FedConfig,
    *,
    ranks,
    assignment=None,
    num_clusters: int = 1,
    aggregate_fn: AggregateFn | None = None,
) -> ServerState:
    """A fresh server: K global adapters (random `a`, zero `b`, all R slots live).

    Args:
      cfg: base model.
      fed: run config (R, alpha, targets, layers, seed, aggregation).
      ranks: [N] each client's true rank, 1 <= r <= fed.lora_rank.
      assignment: [N] cluster ids in [0, K); None puts every client in cluster 0.
      num_clusters: K.
      aggregate_fn: the rule; used (abstractly) to learn whether it folds updates into the base.
    """
    ranks = np.asarray(ranks, np.int32)
    bad = np.flatnonzero((ranks < 1) | (ranks > fed.lora_rank))
    if bad.size:
        raise ConfigError(
            f"client {int(bad[0])} has rank {int(ranks[bad[0]])}, outside [1, "
            f"FedConfig.lora_rank={fed.lora_rank}]"
        )
    assignment = np.zeros_like(ranks) if assignment is None else np.asarray(assignment, np.int32)
    if assignment.shape != ranks.shape:
        raise ValueError(f"assignment has shape {assignment.shape}, ranks {ranks.shape}")
    if assignment.size and (assignment.min() < 0 or assignment.max() >= num_clusters):
        raise ValueError(f"assignment values must lie in [0, num_clusters={num_clusters})")
    key = jax.random.PRNGKey(fed.seed)
    k_init = jax.random.fold_in(key, 0x7FFFFFFF)  # rounds use fold_in(key, r), r small
    lcfg = fed.lora_config()
    globs = [
        init_lora(cfg, lcfg, key=k, targets=fed.lora_targets, max_rank=fed.lora_rank)
        for k in jax.random.split(k_init, num_clusters)
    ]
    global_loras = jax.tree.map(lambda *xs: jnp.stack(xs), *globs)
    fn = aggregate_fn or default_aggregate_fn(fed.aggregation)
    probe = _client_start(global_loras, jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32), fed)
    out = jax.eval_shape(
        lambda l: fn(fed.aggregation, l, weights=jnp.ones((1,)), ranks=jnp.ones((1,), jnp.int32)),
        probe,
    )
    base_delta = None
    if out.base_delta is not None:
        base_delta = {m: jnp.zeros(s.shape, jnp.float32) for m, s in out.base_delta.items()}
    personal_factors, _ = client_roles(fed.aggregation)
    personal = {
        f: {m: v[jnp.asarray(assignment)] for m, v in getattr(global_loras, f).items()}
        for f in personal_factors
    } or None
    return ServerState(
        global_loras=global_loras,
        assignment=jnp.asarray(assignment),
        ranks=jnp.asarray(ranks),
        base_delta=base_delta,
        personal=personal,
        round=jnp.zeros((), jnp.int32),
        key=key,
    )


def _client_start(
    global_loras: LoRA, cluster_C, rank_C, fed: FedConfig, personal: dict | None = None, ids_C=None
) -> LoRA:
    """Each client's starting adapter: its cluster's global factors on its first r slots of the
    configured layers, scale `alpha / r` (or `alpha / sqrt(r)`) from its true rank. With
    `personal` (`ServerState.personal`), the factors it holds come from clients `ids_C`'s own
    copies instead of the global ones."""
    g = jax.tree.map(lambda x: x[cluster_C], global_loras)
    for f, own in (personal or {}).items():  # factors a client keeps for itself
        g = dataclasses.replace(
            g, **{f: {**getattr(g, f), **{m: v[ids_C] for m, v in own.items()}}}
        )
    R = fed.lora_rank
    slot_CR = (jnp.arange(R)[None, :] < rank_C[:, None]).astype(jnp.float32)
    layer_L = rank_mask(fed.lora_config(rank=R), next(iter(g.a.values())).shape[1], R)[:, 0]
    mask = {}
    for m in g.a:
        live = layer_L if m in fed.lora_targets else np.zeros_like(layer_L)
        mask[m] = jnp.asarray(live)[None, :, None] * slot_CR[:, None, :]
    r = rank_C.astype(jnp.float32)
    scale = fed.lora_alpha / (jnp.sqrt(r) if fed.rslora else r)
    return LoRA(
        a={m: v * mask[m][:, :, None, :] for m, v in g.a.items()},
        b={m: v * mask[m][:, :, :, None] for m, v in g.b.items()},
        mask=mask,
        scale=scale,
    )


def _pick(c_C, new, old):
    """Per client: `new`'s leaves where `c_C` [C] is true, `old`'s elsewhere."""
    return jax.tree.map(
        lambda n, o: jnp.where(c_C.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
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


# ----------------------------------------------------------------------------- data


def _sample_batches(data: ClientData, ids_C, keys_C, S: int, B: int) -> dict:
    """Each sampled client's S x B rows: a random permutation of its real examples, one pass at
    most; rows past its example count are padding (`batch_mask` 0)."""
    E = data.tokens.shape[1]

    def one(i, key):
        n = data.num_examples[i]
        u = jnp.where(jnp.arange(E) < n, jax.random.uniform(key, (E,)), 2.0)
        order = jnp.argsort(u)
        j = jnp.arange(S * B)
        idx = order[j % E]
        pick = lambda x: x[i][idx].reshape(S, B, -1)
        return {
            "tokens": pick(data.tokens),
            "mask": pick(data.mask),
            "loss_mask": pick(data.loss_mask),
            "batch_mask": (j < n).astype(jnp.float32).reshape(S, B),
        }

    return jax.vmap(one)(ids_C, keys_C)


def _eval_rows(data: ClientData, ids_C, B: int) -> dict:
    """The first B rows of each sampled client's eval split ([C, B, T])."""
    E = data.tokens.shape[1]
    j = jnp.arange(B) % E
    return {
        "tokens": data.tokens[ids_C][:, j],
        "mask": data.mask[ids_C][:, j],
        "loss_mask": data.loss_mask[ids_C][:, j]
        * (jnp.arange(B)[None, :, None] < data.num_examples[ids_C][:, None, None]),
    }


# ----------------------------------------------------------------------------- the round


def tensor_names(lora: LoRA) -> list[str]:
    """Names of the trainable tensors (`a['q_proj']`, ...) in the order `round_step` reports
    their finiteness: the leaf order of `lora.trainable()`."""
    flat = jax.tree_util.tree_flatten_with_path(lora.trainable())[0]
    return [p[0].key + jax.tree_util.keystr(p[1:]) for p, _ in flat]


def round_step(
    state: ServerState,
    params: dict,
    data: ClientData,
    eval_data: ClientData | None = None,
    *,
    cfg: ModelConfig,
    fed: FedConfig,
    aggregate_fn: AggregateFn,
) -> tuple[ServerState, dict]:
    """One round (pure; `run_round` is its jitted form).

    Args:
      state: server state before the round.
      params: the frozen base params.
      data: every client's training examples (N clients).
      eval_data: every client's eval examples, or None to skip evaluation.
      cfg, fed, aggregate_fn: static.

    Returns:
      `(state, metrics)`: the state after the round, and per-round device values: sums
      (`loss_sum`, `tokens`, `eval_loss_sum`, `eval_tokens`, `bytes_up`, `bytes_down`) and
      per-client arrays for the host's log (`client_ids`, `included`, `finite` [C, tensors],
      `update_norm`, `examples`, `client_loss_sum`, `client_tokens`), and `global_finite`.
    """
    N, C, K = data.num_clients, fed.clients_per_round, state.num_clusters
    S, B = fed.local_steps, fed.batch_size
    k_round = jax.random.fold_in(state.key, state.round)
    k_sample, k_data, k_train = jax.random.split(k_round, 3)
    k_agg = jax.random.fold_in(k_round, 0xA66)  # apart from the split above: it stays as it was
    ids_C = jax.random.choice(k_sample, N, (C,), replace=False)
    cluster_C, rank_C = state.assignment[ids_C], state.ranks[ids_C]

    personal_factors, frozen_factors = client_roles(fed.aggregation)
    base = effective_params(params, state.base_delta)
    start = _client_start(state.global_loras, cluster_C, rank_C, fed, state.personal, ids_C)
    batches = _sample_batches(data, ids_C, jax.random.split(k_data, C), S, B)
    trained, cm = local_update_clients(
        base,
        start,
        batches,
        cfg=cfg,
        opt=fed.opt,
        keys=jax.random.split(k_train, C),
        client_chunk=fed.client_chunk,
        frozen=frozen_factors,
    )

    # Drop bad clients before anything is averaged: 0 * NaN is NaN, so their factors are replaced.
    tr = trained.trainable()
    finite_CX = jnp.stack(
        [jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(tr)],
        axis=1,
    )
    diff = jax.tree.map(lambda x, y: x - y, tr, start.trainable())
    norm_C = jnp.sqrt(
        sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(diff))
    )
    ok_C = jnp.all(finite_CX, axis=1) & jnp.isfinite(norm_C) & (cm["examples"] > 0)
    if fed.max_update_norm is not None:
        ok_C = ok_C & (norm_C <= fed.max_update_norm)
    safe = start.with_trainable(_pick(ok_C, tr, start.trainable()))
    weights_C = jnp.where(ok_C, cm["examples"], 0.0)

    # A rule that draws random numbers (FLoRA's fresh factors) gets a new key every round, when
    # the aggregation function takes one (`aggregate_traced` does, and so does one that takes
    # `**kwargs`; a caller's own with a fixed signature may not).
    takes_key = any(
        p.name == "key" or p.kind is p.VAR_KEYWORD
        for p in inspect.signature(aggregate_fn).parameters.values()
    )
    agg_key = lambda k: {"key": jax.random.fold_in(k_agg, k)} if takes_key else {}
    globals_, included_C = [], jnp.zeros((C,), bool)
    bytes_up_C, bytes_down_C = jnp.zeros((C,)), jnp.zeros((C,))
    ranks_after_C = rank_C  # hetlora's self-pruning may lower a client's rank
    kept = {f: getattr(safe, f) for f in personal_factors}  # what clients keep for themselves
    base_delta = state.base_delta
    for k in range(K):  # K is small and static: one aggregation per cluster
        in_k = cluster_C == k
        w_k = jnp.where(in_k, weights_C, 0.0)
        agg = aggregate_fn(fed.aggregation, safe, weights=w_k, ranks=rank_C, **agg_key(k))
        any_k = jnp.sum(w_k) > 0
        old_k = jax.tree.map(lambda x, k=k: x[k], state.global_loras)
        globals_.append(
            jax.tree.map(lambda n, o, a=any_k: jnp.where(a, n, o), agg.global_lora, old_k)
        )
        included_C = jnp.where(in_k, agg.included & ok_C & any_k, included_C)
        bytes_up_C = jnp.where(in_k & agg.included & ok_C, agg.bytes_up, bytes_up_C)
        bytes_down_C = jnp.where(in_k, agg.bytes_down, bytes_down_C)
        ranks_after_C = jnp.where(in_k & agg.included & ok_C, agg.ranks, ranks_after_C)
        for f in personal_factors:
            kept[f] = _pick(in_k, getattr(agg.client_loras, f), kept[f])
        if agg.base_delta is not None:
            if K > 1:
                raise ValueError(
                    f"aggregation={fed.aggregation!r} folds updates into the base weights, which "
                    "the clients of all clusters share; use it with one cluster"
                )
            if base_delta is None:
                raise ValueError(
                    f"aggregation={fed.aggregation!r} returned a base_delta but the server state "
                    "has none; build the state with init_server_state(..., aggregate_fn=...)"
                )
            base_delta = {
                m: base_delta[m] + jnp.where(any_k, d, 0.0) for m, d in agg.base_delta.items()
            }
    global_loras = jax.tree.map(lambda *xs: jnp.stack(xs), *globals_)
    personal = state.personal
    if personal is not None:  # included clients keep what they trained; the rest keep theirs
        old = jax.tree.map(lambda v: v[ids_C], personal)
        new = _pick(included_C, {f: kept[f] for f in personal}, old)
        personal = jax.tree.map(lambda v, n: v.at[ids_C].set(n), personal, new)
    new_state = dataclasses.replace(
        state,
        global_loras=global_loras,
        base_delta=base_delta,
        personal=personal,
        ranks=state.ranks.at[ids_C].set(ranks_after_C),
        round=state.round + 1,
    )

    keep = lambda x: jnp.where(ok_C, x, 0.0)
    metrics = {
        "round": state.round,
        "loss_sum": jnp.sum(keep(cm["loss_sum"])),
        "tokens": jnp.sum(keep(cm["tokens"])),
        "bytes_up": jnp.sum(bytes_up_C),
        "bytes_down": jnp.sum(bytes_down_C),
        "client_ids": ids_C,
        "included": included_C,
        "finite": finite_CX,
        "update_norm": norm_C,
        "examples": cm["examples"],
        "client_loss_sum": cm["loss_sum"],
        "client_tokens": cm["tokens"],
        "global_finite": jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(global_loras)])
        ),
    }
    if eval_data is not None:
        new_base = effective_params(params, base_delta)
        after = _client_start(global_loras, cluster_C, ranks_after_C, fed, personal, ids_C)
        rows = _eval_rows(eval_data, ids_C, fed.eval_batch_size)

        def ev(lora, r):
            return token_loss(new_base, lora, r["tokens"], r["mask"], r["loss_mask"], cfg=cfg)

        s_C, n_C = jax.vmap(ev)(after, rows)
        ok = jnp.isfinite(s_C)  # a client's bad eval data must not hide everyone else's loss
        metrics["eval_loss_sum"] = jnp.sum(jnp.where(ok, s_C, 0.0))
        metrics["eval_tokens"] = jnp.sum(jnp.where(ok, n_C, 0.0))
    return new_state, metrics


run_round = jax.jit(
    round_step, static_argnames=("cfg", "fed", "aggregate_fn"), donate_argnames=("state",)
)
run_round.__doc__ = """`round_step` compiled once per (cfg, fed, aggregate_fn, shapes); donates
`state`, so never touch the state passed in after the call."""


def check_round(fed: FedConfig, data: ClientData, state: ServerState) -> None:
    """Host-side checks that name the field, before anything is traced."""
    if data.seq_len != fed.seq_len:
        raise ConfigError(
            f"client data has sequence length {data.seq_len}, FedConfig.seq_len={fed.seq_len}"
        )
    if data.num_clients != state.assignment.shape[0]:
        raise ValueError(
            f"client data has {data.num_clients} clients, the server state "
            f"{state.assignment.shape[0]}"
        )
    if fed.clients_per_round > data.num_clients:
        raise ConfigError(
            f"FedConfig.clients_per_round={fed.clients_per_round} exceeds the "
            f"{data.num_clients} clients"
        )
    if state.global_loras.max_rank != fed.lora_rank:
        raise ConfigError(
            f"server adapters have rank {state.global_loras.max_rank}, "
            f"FedConfig.lora_rank={fed.lora_rank}"
        )


def drop_reasons(metrics: dict, names: list[str], fed: FedConfig) -> dict[int, str]:
    """`{client id: reason}` for every sampled client left out of the aggregate (host side)."""
    out = {}
    ids, inc = np.asarray(metrics["client_ids"]), np.asarray(metrics["included"])
    fin, norm = np.asarray(metrics["finite"]), np.asarray(metrics["update_norm"])
    ex = np.asarray(metrics["examples"])
    for c, cid in enumerate(ids):
        if inc[c]:
            continue
        bad = [names[j] for j in np.flatnonzero(~fin[c])]
        if bad:
            why = "non-finite update in " + ", ".join(bad)
        elif not math.isfinite(float(norm[c])):
            why = "non-finite update norm"
        elif ex[c] <= 0:
            why = "no training examples"
        elif fed.max_update_norm is not None and norm[c] > fed.max_update_norm:
            why = f"update norm {float(norm[c]):.4g} > max_update_norm={fed.max_update_norm}"
        else:
            why = "excluded by the aggregation rule"
        out[int(cid)] = why
    return out
