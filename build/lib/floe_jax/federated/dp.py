"""Client-level differential privacy of the federated rounds: DP-FedAvg (McMahan, Ramage, Talwar
and Zhang, 2018, "Learning Differentially Private Recurrent Language Models") over LoRA factors,
with ε accounted by Google's `dp-accounting` package.

Each round, inside the jitted round (`rounds.round_step`), cluster k's global adapter moves by

    Δ_k = (Σ_{sampled c in k} clip(u_c, S) + N(0, (σ S)² I)) / E_k,

where `u_c` is client c's change of the factors it trains (A and B; B alone under FFA-LoRA), the
clip scales it to L2 norm at most S over the whole tree (McMahan et al.'s flat clipping), and
E_k = C · N_k / N is the expected number of cluster-k clients among the C sampled of N (the fixed
denominator of their unbiased estimator: dividing by the number actually sampled would leak it).
Every client weighs the same (a client's contribution is bounded, not its example count), a
client dropped by screening contributes zero, and every cluster with members is noised every
round whether or not a member was sampled, so the adapters the server publishes are the Gaussian
mechanism on a subsampled sum. One client's data reaches only its own cluster's sum, so
the clusters compose in parallel: per round, each client meets one subsampled Gaussian mechanism
with noise multiplier σ and sampling rate q = C / N, composed over the rounds by the RDP
accountant (`epsilon`; `DPConfig.sampling` picks the round's own fixed-size sampler under
replace-one adjacency, where the sum's sensitivity is 2S, or the Poisson approximation).

The trust model is DP-FedAvg's: the server sees each client's raw update and adds the noise, so
the guarantee covers what it publishes (the global adapters every peer downloads, and anything
computed from them), not the server itself (that needs secure aggregation or local noise).

Why the factors and not the product ΔW = s(A+ΔA)(B+ΔB) − sAB: the factors are what a client
uploads and what FedAvg over LoRA averages, so the noised sum is over the very tensors the server
aggregates and the adapters peers download are post-processing of it; the noise has R(I + O)
dimensions per layer instead of I·O; and the result stays low rank without an SVD. The cost is
the one Sun et al. (2024, "Improving LoRA in Privacy-preserving Federated Learning", FFA-LoRA)
point out: noise on both A and B is multiplied through the product (ΔW picks up a noise x noise
term), which is why FFA-LoRA freezes A and privatises B alone; `agg.method="ffa"` does exactly
that here (A is frozen, so only B is clipped and noised).

What it does not cover: `clustering="updates"` clusters the clients by their (unclipped,
un-noised) updates before round 0, and the assignment it publishes is outside this guarantee;
use `"none"` or `"given"` clustering for an ε that covers the whole run. Nor does it cover the
run's own logs: `metrics.jsonl` holds each sampled client's un-noised loss, update norm, drop
reason and whether it was clipped, which stay with the server's operator. With heterogeneous
ranks a slot moves by the updates of the clients that hold it over E_k (rather than FedIT's
zero-padded average), and the global scale stays the server's.

Shapes: N clients, C sampled, K clusters, L layers, I / O widths, R padded rank.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp

from floe_jax.federated.config import DPConfig
from floe_jax.lora import LoRA

NOISE_SALT = 0xD9  # the round's noise key is fold_in(round key, NOISE_SALT)


def expected_clients(assignment_N: jax.Array, clients_per_round: int, num_clusters: int):
    """E_k = C · N_k / N: the expected number of cluster-k clients among the C sampled. [K]"""
    n_K = jnp.bincount(assignment_N, length=num_clusters).astype(jnp.float32)
    return clients_per_round * n_K / assignment_N.shape[0]


def client_updates(start: LoRA, trained: LoRA, included_C, frozen: tuple[str, ...] = ()) -> dict:
    """Each client's change of the factors it trains (`{"a": {m: [C, ...]}, "b": ...}` minus the
    `frozen` ones), zero for a client not included (its NaNs too)."""
    keep = lambda d: jnp.where(included_C.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0)
    diff = jax.tree.map(lambda t, s: keep(t - s), trained.trainable(), start.trainable())
    return {f: v for f, v in diff.items() if f not in frozen}


def clip_updates(update: dict, clip_norm: float) -> tuple[dict, jax.Array]:
    """Scales each client's update to L2 norm at most `clip_norm` over the whole tree.

    Returns:
      `(clipped update, norm [C] before clipping)`.
    """
    sq = sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(update))
    norm_C = jnp.sqrt(sq)
    factor_C = jnp.minimum(1.0, clip_norm / jnp.maximum(norm_C, 1e-30))
    clipped = jax.tree.map(lambda x: x * factor_C.reshape((-1,) + (1,) * (x.ndim - 1)), update)
    return clipped, norm_C


def _live(global_loras: LoRA, factor: str) -> dict:
    """The global adapter's live entries of `factor`, as a multiplier per module."""
    if factor == "a":
        return {m: v[..., None, :] for m, v in global_loras.mask.items()}
    return {m: v[..., :, None] for m, v in global_loras.mask.items()}


def private_step(
    global_loras: LoRA,
    start: LoRA,
    trained: LoRA,
    included_C,
    cluster_C,
    expected_K,
    *,
    dp: DPConfig,
    frozen: tuple[str, ...] = (),
    key: jax.Array,
) -> tuple[LoRA, dict]:
    """One DP-FedAvg server step of every cluster (traceable; the module docstring's Δ_k).

    Args:
      global_loras: [K] the clusters' adapters before the round.
      start, trained: [C] each sampled client's adapter before and after its local update.
      included_C: [C] bool, clients screening kept (the rest contribute zero).
      cluster_C: [C] int cluster of each sampled client.
      expected_K: [K] float E_k (`expected_clients`); a cluster with E_k = 0 has no members and
        keeps its adapter.
      dp: clip_norm and noise_multiplier.
      frozen: factors no client trains (FFA-LoRA's A): neither clipped nor noised.
      key: the noise key; leaf j of the noised tree draws from `fold_in(key, j)`.

    Returns:
      `(global_loras [K], {"dp_clipped": included clients whose update was scaled down})`.
    """
    K = expected_K.shape[0]
    clipped, norm_C = clip_updates(client_updates(start, trained, included_C, frozen), dp.clip_norm)
    onehot_CK = jax.nn.one_hot(cluster_C, K, dtype=jnp.float32)
    std = dp.noise_multiplier * dp.clip_norm
    flat, treedef = jax.tree_util.tree_flatten_with_path(clipped)
    moved = []
    for j, (path, x) in enumerate(flat):
        factor, module = path[0].key, path[1].key
        lead = lambda v, x=x: v.reshape((K,) + (1,) * (x.ndim - 1))
        sum_K = jnp.einsum("ck,c...->k...", onehot_CK, x)
        noise = jax.random.normal(jax.random.fold_in(key, j), sum_K.shape, jnp.float32) * std
        step = (sum_K + noise * _live(global_loras, factor)[module]) / lead(
            jnp.where(expected_K > 0, expected_K, 1.0)
        )
        old = getattr(global_loras, factor)[module]
        moved.append(jnp.where(lead(expected_K > 0), old + step, old))
    moved = jax.tree.unflatten(treedef, moved)
    out = global_loras.with_trainable({**global_loras.trainable(), **moved})
    return out, {"dp_clipped": jnp.sum(included_C & (norm_C > dp.clip_norm))}


# ----------------------------------------------------------------------------- accounting


def _event(dp: DPConfig, num_clients: int, clients_per_round: int, rounds: int):
    """The dp-accounting event of `rounds` DP rounds (see `DPConfig.sampling`)."""
    if dp.sampling == "poisson":
        one = dp_accounting.PoissonSampledDpEvent(
            clients_per_round / num_clients, dp_accounting.GaussianDpEvent(dp.noise_multiplier)
        )
    else:
        # Replace-one adjacency: swapping one client's clipped update for another's moves the
        # sum by up to 2S, so the noise is σ/2 sensitivities.
        one = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients,
            clients_per_round,
            dp_accounting.GaussianDpEvent(dp.noise_multiplier / 2),
        )
    return dp_accounting.SelfComposedDpEvent(one, rounds)


def _neighbours(dp: DPConfig):
    rel = dp_accounting.NeighboringRelation
    return rel.ADD_OR_REMOVE_ONE if dp.sampling == "poisson" else rel.REPLACE_ONE


@functools.lru_cache(maxsize=1024)
def epsilon(dp: DPConfig, *, num_clients: int, clients_per_round: int, rounds: int) -> float:
    """ε(δ = `dp.delta`) of `rounds` DP rounds sampling C = `clients_per_round` of N =
    `num_clients` clients, from dp-accounting's RDP accountant; inf without noise, 0 after no
    round."""
    if not 0 < clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round={clients_per_round} must lie in [1, {num_clients}]")
    if rounds == 0:
        return 0.0
    if dp.noise_multiplier == 0:
        return math.inf
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=_neighbours(dp))
    acc.compose(_event(dp, num_clients, clients_per_round, rounds))
    return float(acc.get_epsilon(dp.delta))


def host_metrics(m: dict, dp: DPConfig, *, num_clients: int, clients_per_round: int) -> dict:
    """The DP fields of a round's metrics row (host side): `dp_epsilon` at `dp_delta` after
    that round (None when it is infinite: no noise) and `dp_clipped`; empty when DP is off."""
    if not dp.enabled:
        return {}
    rounds = int(m["round"]) + 1
    eps = epsilon(dp, num_clients=num_clients, clients_per_round=clients_per_round, rounds=rounds)
    return {
        "dp_epsilon": eps if math.isfinite(eps) else None,
        "dp_delta": dp.delta,
        "dp_clipped": int(m["dp_clipped"]),
    }
