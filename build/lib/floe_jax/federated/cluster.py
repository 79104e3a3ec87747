"""Floe's task-clustered aggregation: group clients whose LoRA updates look alike, aggregate each
group with any rule of `floe_jax.federated.aggregate`, route new clients to the nearest group;
and Floe's update-based clustering of a federation before its first round (`cluster_by_updates`).

Floe (Tian et al., arXiv 2602.14302) clusters clients by task but does not publish its clustering
algorithm; floe_jax implements the natural candidates (related work: IFCA, Ghosh et al., NeurIPS
2020; CFL, Sattler et al., 2020; FedLEASE) behind one interface:

- Similarity: `cos(vec ΔW_i, vec ΔW_j)` summed over modules and layers, from factors only:
  `⟨ΔW_i, ΔW_j⟩_F = s_i s_j tr((A_iᵀ A_j)(B_j B_iᵀ))` costs `L R² (I + O)` per pair, never I x O.
- `"spectral"` (default): Ng–Jordan–Weiss spectral embedding of the affinity `max(cos, 0)`, then
  k-means (farthest-point init, fixed Lloyd iterations, so it jits and is deterministic).
- `"agglomerative"`: average linkage on `1 - cos`, a fixed C - K merges.
- Or the caller's task labels.

The number of clusters is fixed, or chosen by the mean silhouette (on `1 - cos`) over
`k in [2, k_max]`; when no k reaches `min_silhouette` (0.25, below which Kaufman & Rousseeuw call
a structure "not substantial"), or when every pair of updates has cosine >= `one_cluster_cos`
(0.5), all clients form one cluster.

Shapes: C clients, K clusters, N new clients, L layers, I/O widths, R padded rank.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ModelConfig
from floe_jax.federated import aggregate as agg
from floe_jax.federated.client import local_update_clients
from floe_jax.federated.config import FedConfig
from floe_jax.federated.linalg import eigh
from floe_jax.federated.rounds import client_start, init_global_loras
from floe_jax.federated.types import ClientData, sample_batches
from floe_jax.lora import LoRA

CLUSTER_METHODS = ("spectral", "agglomerative")


# ----------------------------------------------------------------------------- similarity


def pairwise_inner(x: LoRA, y: LoRA | None = None) -> jax.Array:
    """Frobenius inner products `⟨ΔW_i, ΔW_j⟩` over modules and layers, from factors.

    Args:
      x: stacked LoRA [N, ...].
      y: stacked LoRA [M, ...] with the same structure; defaults to x.

    Returns:
      [N, M] float32.
    """
    y = x if y is None else y
    total = 0.0
    for m in x.a:
        xa = x.a[m] * x.mask[m][..., None, :]
        ya = y.a[m] * y.mask[m][..., None, :]

        def one_layer(xa_NIR, xb_NRO, ya_MIR, yb_MRO):
            aa = jnp.einsum("nir,mis->nmrs", xa_NIR, ya_MIR)
            bb = jnp.einsum("nro,mso->nmrs", xb_NRO, yb_MRO)
            return jnp.sum(aa * bb, axis=(-2, -1))

        per_layer = jax.lax.map(
            lambda t: one_layer(*t),
            tuple(jnp.moveaxis(v, 1, 0) for v in (xa, x.b[m], ya, y.b[m])),
        )
        total = total + per_layer.sum(0)
    return total * x.scale[:, None] * y.scale[None, :]


def _cos_from_inner(inner, nx, ny):
    den = jnp.sqrt(jnp.maximum(nx, 0.0))[:, None] * jnp.sqrt(jnp.maximum(ny, 0.0))[None, :]
    return jnp.where(den > 0, inner / jnp.where(den > 0, den, 1.0), 0.0)


def cosine_similarity(x: LoRA, y: LoRA | None = None) -> jax.Array:
    """`cos(vec ΔW_i, vec ΔW_j)` [N, M]; 0 where either update is zero."""
    if y is None:
        g = pairwise_inner(x)
        d = jnp.diagonal(g)
        return jnp.clip(_cos_from_inner(g, d, d), -1.0, 1.0)
    g = pairwise_inner(x, y)
    nx, ny = agg.lora_sq_norms(x), agg.lora_sq_norms(y)
    return jnp.clip(_cos_from_inner(g, nx, ny), -1.0, 1.0)


# ----------------------------------------------------------------------------- clustering


def spectral_embedding(sim_CC: jax.Array, k: int) -> jax.Array:
    """Row-normalised top-k eigenvectors of `D^-1/2 W D^-1/2`, `W = max(sim, 0)`. [C, k]"""
    w = jnp.maximum(sim_CC, 0.0)
    d = jnp.maximum(w.sum(-1), 1e-12)
    lap = w / jnp.sqrt(d)[:, None] / jnp.sqrt(d)[None, :]
    _, vec = eigh(lap)
    emb = vec[:, ::-1][:, :k]
    return emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def kmeans(x_CD: jax.Array, k: int, *, iters: int = 50) -> jax.Array:
    """Lloyd's k-means with a fixed iteration count and farthest-point init. Labels [C] int32."""
    d2 = lambda c_KD: jnp.sum((x_CD[:, None, :] - c_KD[None]) ** 2, -1)  # [C, K]
    first = jnp.argmax(jnp.sum(x_CD @ x_CD.T, -1))  # densest point

    def pick(j, idx):
        chosen = x_CD[idx]  # [K, D]; slots >= j repeat `first` and do not change the min
        dist = jnp.min(jnp.where(jnp.arange(k)[None] < j, d2(chosen), jnp.inf), -1)
        return idx.at[j].set(jnp.argmax(dist))

    idx = jax.lax.fori_loop(1, k, pick, jnp.full((k,), first, jnp.int32))

    def step(_, c_KD):
        lab = jnp.argmin(d2(c_KD), -1)
        one = jax.nn.one_hot(lab, k, dtype=x_CD.dtype)  # [C, K]
        n = one.sum(0)
        new = (one.T @ x_CD) / jnp.maximum(n, 1.0)[:, None]
        return jnp.where(n[:, None] > 0, new, c_KD)  # an empty cluster keeps its centre

    centres = jax.lax.fori_loop(0, iters, step, x_CD[idx])
    return jnp.argmin(d2(centres), -1).astype(jnp.int32)


def agglomerative(dist_CC: jax.Array, k: int) -> jax.Array:
    """Average-linkage agglomerative clustering with exactly C - k merges. Labels [C] int32."""
    C = dist_CC.shape[0]
    eye = jnp.eye(C, dtype=bool)

    def merge(_, carry):
        dist, size, active, lab = carry
        masked = jnp.where(active[:, None] & active[None, :] & ~eye, dist, jnp.inf)
        flat = jnp.argmin(masked)
        i, j = jnp.minimum(flat // C, flat % C), jnp.maximum(flat // C, flat % C)
        row = (size[i] * dist[i] + size[j] * dist[j]) / (size[i] + size[j])
        dist = dist.at[i].set(row).at[:, i].set(row)
        size = size.at[i].add(size[j])
        return dist, size, active.at[j].set(False), jnp.where(lab == j, i, lab)

    init = (dist_CC, jnp.ones((C,), dist_CC.dtype), jnp.ones((C,), bool), jnp.arange(C))
    _, _, active, lab = jax.lax.fori_loop(0, C - k, merge, init)
    return (jnp.cumsum(active) - 1)[lab].astype(jnp.int32)


def silhouette(dist_CC: jax.Array, labels_C: jax.Array, k: int) -> jax.Array:
    """Mean silhouette `(b - a) / max(a, b)`; a singleton scores 0 (Rousseeuw, 1987)."""
    one = jax.nn.one_hot(labels_C, k, dtype=dist_CC.dtype)  # [C, K]
    n = one.sum(0)
    sums = dist_CC @ one  # [C, K] total distance to each cluster
    own = one.astype(bool)
    n_own = (one * n[None]).sum(-1)
    a = (sums * one).sum(-1) / jnp.maximum(n_own - 1, 1.0)
    mean_other = jnp.where(own | (n[None] == 0), jnp.inf, sums / jnp.maximum(n[None], 1.0))
    b = mean_other.min(-1)
    s = jnp.where(n_own > 1, (b - a) / jnp.maximum(jnp.maximum(a, b), 1e-12), 0.0)
    return jnp.mean(jnp.where(jnp.isfinite(s), s, 0.0))


@functools.partial(jax.jit, static_argnames=("k", "method"))
def _labels_for_k(sim_CC, k: int, method: str):
    dist = 1.0 - sim_CC
    if method == "spectral":
        lab = kmeans(spectral_embedding(sim_CC, k), k)
    else:
        lab = agglomerative(dist, k)
    return lab, silhouette(dist, lab, k)


def _canonical(labels) -> np.ndarray:
    """Renumbers clusters 0..K-1 by their first member."""
    labels = np.asarray(labels)
    order = {}
    for x in labels:
        order.setdefault(int(x), len(order))
    return np.array([order[int(x)] for x in labels], np.int32)


def cluster_clients(
    client_loras: LoRA,
    *,
    num_clusters: int | None = None,
    method: str = "spectral",
    k_max: int = 8,
    min_silhouette: float = 0.25,
    one_cluster_cos: float = 0.5,
) -> tuple[np.ndarray, dict]:
    """Clusters clients by the cosine similarity of their updates.

    Args:
      client_loras: stacked LoRA [C, ...].
      num_clusters: K, or None to pick K by the best silhouette in [2, k_max]; 1 when none
        reaches `min_silhouette`, or when every pair has cosine >= `one_cluster_cos` (silhouette
        is scale-free, so it would split even near-identical updates).
      method: `"spectral"` or `"agglomerative"`.

    Returns:
      (labels [C] int32 numbered by first member, info with `similarity` and `silhouette` per k).
    """
    if method not in CLUSTER_METHODS:
        raise agg.AggregationError(f"cluster method {method!r} is not one of {CLUSTER_METHODS}")
    C = client_loras.scale.shape[0]
    sim = cosine_similarity(client_loras)
    info = {"similarity": np.asarray(sim), "silhouette": {}}
    if num_clusters is not None:
        if not 1 <= num_clusters <= C:
            raise agg.AggregationError(f"num_clusters={num_clusters} is outside [1, C={C}]")
        if num_clusters == 1:
            return np.zeros((C,), np.int32), info
        lab, s = _labels_for_k(sim, num_clusters, method)
        info["silhouette"][num_clusters] = float(s)
        return _canonical(lab), info
    best, best_s = np.zeros((C,), np.int32), min_silhouette
    if C < 3 or info["similarity"].min() >= one_cluster_cos:  # silhouette is scale-free
        return best, info
    for k in range(2, min(k_max, C - 1) + 1):
        lab, s = _labels_for_k(sim, k, method)
        info["silhouette"][k] = float(s)
        if float(s) > best_s:
            best, best_s = _canonical(lab), float(s)
    return best, info


# ----------------------------------------------------------------------------- aggregation


def cluster_aggregate(
    method: str,
    client_loras: LoRA,
    *,
    weights,
    ranks,
    num_clusters: int | None = None,
    labels=None,
    cluster_method: str = "spectral",
    k_max: int = 8,
    state=None,
    key=None,
    max_norm: float | None = None,
    **options,
) -> tuple[agg.Aggregated, np.ndarray]:
    """Clusters clients (or takes `labels`) and aggregates each cluster with rule `method`
    (`aggregate.aggregate_clusters`, the per-cluster aggregation the federated round uses).

    Args:
      method: an aggregation rule (`floe_jax.federated.aggregate.available_rules()`).
      client_loras: stacked LoRA [C, ...].
      weights: [C] example counts.
      ranks: [C] true ranks.
      num_clusters: K, or None to choose it (see `cluster_clients`).
      labels: [C] given task labels 0..K-1 (skips clustering).
      cluster_method: `"spectral"` or `"agglomerative"`.
      state, key: the K clusters' rule states (default: `aggregate.init_states`) and the key.
      max_norm: screening: leave out clients with ‖ΔW_k‖_F above it.
      **options: static options of the rule (e.g. hetlora's `prune_threshold`).

    Returns:
      `(Aggregated, assignment [C])`. In the Aggregated, `global_lora` and `base_delta` carry a
      leading K axis (one adapter per cluster); the per-client fields (`client_loras`,
      `included`, `reason`, `ranks`, `bytes_up`, `bytes_down`) are [C], each client's taken from
      its own cluster.

    Raises:
      AggregationError: an empty cluster, a cluster whose weights sum to zero or whose clients are
        all excluded, or invalid weights/ranks.
    """
    rule = agg.make_rule(method, **options)
    w, r = agg.validate(client_loras, weights, ranks, total_rank=options.get("total_rank"))
    if labels is None:
        labels, _ = cluster_clients(
            client_loras, num_clusters=num_clusters, method=cluster_method, k_max=k_max
        )
    labels = np.asarray(labels)
    C = w.shape[0]
    if labels.shape != (C,) or not np.issubdtype(labels.dtype, np.integer):
        raise agg.AggregationError(f"labels must be [C={C}] integers, got {labels.shape}")
    K = int(labels.max()) + 1 if num_clusters is None else num_clusters
    if labels.min() < 0 or labels.max() >= K:
        raise agg.AggregationError(f"labels must lie in [0, {K}), got {sorted(set(labels))}")
    for k in range(K):
        if not np.any(labels == k):
            raise agg.AggregationError(f"cluster {k} is empty")
        if w[labels == k].sum() <= 0:
            raise agg.AggregationError(f"weights of cluster {k} sum to zero")
    key = jax.random.key(0) if key is None else key
    if state is None:
        state = agg.init_states(rule, jax.tree.map(lambda x: x[0], client_loras), K, key=key)
    out, _, any_in = agg.aggregate_jit(
        method,
        tuple(sorted(options.items())),
        None if max_norm is None else float(max_norm),
        K,
        state,
        client_loras,
        jnp.asarray(w),
        jnp.asarray(r),
        jnp.asarray(labels, jnp.int32),
        key,
    )
    empty = np.flatnonzero(~np.asarray(any_in))
    if empty.size:
        raise agg.AggregationError(f"every client of cluster {int(empty[0])} was excluded")
    return out, labels.astype(np.int32)


# ----------------------------------------------------------------------------- Floe's clustering


def cluster_by_updates(
    params: dict, data: ClientData, *, cfg: ModelConfig, fed: FedConfig, ranks
) -> tuple[np.ndarray, dict]:
    """Floe's task clustering: every client trains `fed.local_steps` steps from one shared fresh
    adapter (each on its own rank slots), and the server clusters the resulting updates by the
    cosine similarity of their ΔW (`cluster_clients`, computed from the factors).

    Returns:
      (assignment [N] int32, info: `similarity` [N, N], `silhouette` per K tried).
    """
    N = data.num_clients
    start, data_keys, train_keys = clustering_plan(cfg, fed, ranks)
    batches = sample_batches(data, jnp.arange(N), data_keys, fed.local_steps, fed.batch_size)
    trained, _ = _local_updates(params, start, batches, train_keys, cfg=cfg, fed=fed)
    return labels_from_updates(trained, fed)


def clustering_plan(cfg: ModelConfig, fed: FedConfig, ranks) -> tuple[LoRA, jax.Array, jax.Array]:
    """What `cluster_by_updates` hands its N clients: `(start [N], data_keys [N], train_keys
    [N])`, one shared fresh adapter on each client's rank slots and each client's keys. The
    Flower app (`floe_jax.flower`) sends the same to each device, so its clusters are the
    loop's."""
    ranks = jnp.asarray(np.asarray(ranks, np.int32))
    N = ranks.shape[0]
    key = jax.random.fold_in(jax.random.PRNGKey(fed.seed), 0x5EED)  # apart from every round's
    k_data, k_train = jax.random.split(key)
    start = client_start(init_global_loras(cfg, fed), jnp.zeros((N,), jnp.int32), ranks, fed)
    return start, jax.random.split(k_data, N), jax.random.split(k_train, N)


def labels_from_updates(trained: LoRA, fed: FedConfig) -> tuple[np.ndarray, dict]:
    """The server's half of `cluster_by_updates`: clusters the clients' trained adapters [N]
    (`cluster_clients` with `fed.num_clusters` and `fed.cluster_method`).

    Returns:
      (assignment [N] int32, info: `similarity` [N, N] as lists, `silhouette` per K tried).
    """
    labels, info = cluster_clients(
        trained, num_clusters=fed.num_clusters, method=fed.cluster_method
    )
    return labels, {"similarity": info["similarity"].tolist(), "silhouette": info["silhouette"]}


@functools.partial(jax.jit, static_argnames=("cfg", "fed"))
def _local_updates(params, start, batches, keys, *, cfg, fed):
    return local_update_clients(
        params, start, batches, cfg=cfg, opt=fed.opt, keys=keys, client_chunk=fed.client_chunk
    )


def assign_cluster(lora: LoRA, cluster_loras: LoRA) -> jax.Array:
    """Nearest cluster (highest cosine of updates) for a new or returning client.

    Args:
      lora: one adapter (scale []) or N stacked ones.
      cluster_loras: the clusters' global adapters, stacked [K, ...].

    Returns:
      int32 [] (or [N]) cluster index.
    """
    single = lora.scale.ndim == 0
    x = jax.tree.map(lambda v: v[None], lora) if single else lora
    idx = jnp.argmax(cosine_similarity(x, cluster_loras), -1).astype(jnp.int32)
    return idx[0] if single else idx


__all__ = [
    "CLUSTER_METHODS",
    "agglomerative",
    "assign_cluster",
    "cluster_aggregate",
    "cluster_by_updates",
    "cluster_clients",
    "clustering_plan",
    "labels_from_updates",
    "cosine_similarity",
    "kmeans",
    "pairwise_inner",
    "silhouette",
    "spectral_embedding",
]
