"""Tests for floe_jax/federated/cluster.py: similarity from factors, planted and trained tasks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_aggregate import make_clients, product, weighted_delta

from floe_jax.config import LoRAConfig
from floe_jax.federated import aggregate as ag
from floe_jax.federated import cluster as cl
from floe_jax.lora import LoRA, init_lora, stack_loras
from floe_jax.model import forward


def same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a[:, None] == a[None], b[:, None] == b[None])


def planted(cfg, tasks=3, per_task=3, noise=0.3, seed=0, R=8):
    """Clients as noisy, rank-truncated copies of a few task adapters; ranks cycle 2/4/8."""
    base = make_clients(cfg, [R] * tasks, seed=seed, max_rank=R)
    rng = np.random.default_rng(seed + 1)
    ranks = np.array([(2, 4, 8)[i % 3] for i in range(tasks * per_task)])
    truth = np.repeat(np.arange(tasks), per_task)
    a, b, mask = {}, {}, {}
    for m in base.a:
        slots = (np.arange(R)[None] < ranks[:, None]).astype(np.float32)  # [C, R]
        mask[m] = jnp.asarray(np.broadcast_to(slots[:, None], (len(ranks), cfg.num_layers, R)))
        a[m] = base.a[m][truth] * mask[m][:, :, None, :]
        decay = 0.5 ** np.arange(R)[None, None, :, None]  # trained spectra decay: slot j ~ 2^-j
        bb = np.asarray(base.b[m][truth]) * decay
        bb = bb + noise * decay * rng.standard_normal(bb.shape)
        b[m] = jnp.asarray(bb, jnp.float32) * mask[m][..., None]
    scale = jnp.asarray(16.0 / ranks, jnp.float32)
    return LoRA(a=a, b=b, mask=mask, scale=scale), ranks, truth


def test_inner_products_match_dense(tiny_cfg):
    lora = make_clients(tiny_cfg, [2, 4, 8], seed=1)
    other = make_clients(tiny_cfg, [3, 8], seed=2)
    flat = lambda x: np.concatenate([product(x, m).reshape(x.scale.shape[0], -1) for m in x.a], 1)
    fx, fy = flat(lora), flat(other)
    np.testing.assert_allclose(cl.pairwise_inner(lora), fx @ fx.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(cl.pairwise_inner(lora, other), fx @ fy.T, rtol=1e-4, atol=1e-3)
    nx = np.linalg.norm(fx, axis=1)
    ny = np.linalg.norm(fy, axis=1)
    want = fx @ fy.T / nx[:, None] / ny[None]
    np.testing.assert_allclose(cl.cosine_similarity(lora, other), want, atol=1e-5)


@pytest.mark.parametrize("method", cl.CLUSTER_METHODS)
def test_recovers_planted_groups_and_chooses_k(tiny_cfg, method):
    lora, ranks, truth = planted(tiny_cfg)
    lab, info = cl.cluster_clients(lora, method=method)
    assert same_partition(lab, truth), (lab, info["silhouette"])
    assert max(info["silhouette"], key=info["silhouette"].get) == 3
    fixed, _ = cl.cluster_clients(lora, num_clusters=3, method=method)
    assert same_partition(fixed, truth)


def test_single_task_gives_one_cluster(tiny_cfg):
    lora, _, _ = planted(tiny_cfg, tasks=1, per_task=6, noise=0.05)
    lab, _ = cl.cluster_clients(lora)
    np.testing.assert_array_equal(lab, 0)


def test_cluster_aggregate_per_cluster_and_assign(tiny_cfg):
    lora, ranks, truth = planted(tiny_cfg)
    w = np.arange(1.0, 10.0)
    out, assign = cl.cluster_aggregate("fedex", lora, weights=w, ranks=ranks, num_clusters=3)
    assert same_partition(assign, truth)
    for k in range(3):
        member = assign == k
        want = weighted_delta(lora, w * member)
        for m in lora.a:
            g = jax.tree.map(lambda x, k=k: x[k], out.global_lora)
            total = out.base_delta[m][k] + product(g, m)
            np.testing.assert_allclose(total, want[m], atol=1e-4)
    # per-client fields come from the client's own cluster: equal to a plain per-cluster call
    members = np.flatnonzero(assign == 1)
    sub = jax.tree.map(lambda x: x[members], lora)
    ref = ag.aggregate("fedex", sub, weights=w[members], ranks=ranks[members])
    for m in lora.a:
        np.testing.assert_allclose(out.client_loras.a[m][members], ref.client_loras.a[m], atol=1e-6)
    np.testing.assert_array_equal(out.bytes_up[members], ref.bytes_up)
    np.testing.assert_array_equal(out.included, True)
    # routing: each client's own update is nearest its cluster's adapter
    np.testing.assert_array_equal(cl.assign_cluster(lora, out.global_lora), assign)
    one = jax.tree.map(lambda x: x[4], lora)
    assert int(cl.assign_cluster(one, out.global_lora)) == assign[4]


def test_given_labels_and_errors(tiny_cfg):
    lora, ranks, truth = planted(tiny_cfg)
    w = np.ones(9)
    out, assign = cl.cluster_aggregate("fedit", lora, weights=w, ranks=ranks, labels=truth)
    np.testing.assert_array_equal(assign, truth)
    assert out.global_lora.a["q_proj"].shape[0] == 3
    with pytest.raises(ag.AggregationError, match="cluster 1 is empty"):
        cl.cluster_aggregate("fedit", lora, weights=w, ranks=ranks, labels=truth * 2)
    with pytest.raises(ag.AggregationError, match="weights of cluster 0 sum to zero"):
        cl.cluster_aggregate("fedit", lora, weights=(truth > 0) * 1.0, ranks=ranks, labels=truth)
    with pytest.raises(ag.AggregationError, match="every client of cluster"):
        cl.cluster_aggregate("fedit", lora, weights=w, ranks=ranks, labels=truth, max_norm=1e-9)
    with pytest.raises(ag.AggregationError, match="num_clusters"):
        cl.cluster_clients(lora, num_clusters=10)


# ----------------------------------------------------------------------------- trained adapters

TASKS = (
    lambda x, v: (x + 1) % v,  # successor
    lambda x, v: (v - 1) - x,  # mirror
    lambda x, v: (x * 7 + 3) % v,  # affine
)


def train_clients(cfg, params, ranks, task_of, *, steps=12, R=8):
    """Each client trains its adapter from the shared server init on its own task's data."""
    init = [
        init_lora(
            cfg,
            LoRAConfig(rank=int(r), max_rank=R, targets=("q", "v", "up", "down")),
            key=jax.random.key(0),
        )
        for r in ranks
    ]
    full = init_lora(
        cfg, LoRAConfig(rank=R, max_rank=R, targets=("q", "v", "up", "down")), key=jax.random.key(0)
    )
    init = [
        dataclasses.replace(x, a={m: full.a[m] * x.mask[m][:, None] for m in x.a}) for x in init
    ]
    lora = stack_loras(init)
    opt = optax.adam(1e-2)
    V = cfg.vocab_size

    def data(key, task):
        x = jax.random.randint(key, (8, 16), 0, V)
        y = jax.lax.switch(task, [lambda x, f=f: f(x, V) for f in TASKS], x)
        return x, y

    def loss(trainable, one, x, y):
        logits = forward(params, x, cfg, lora=one.with_trainable(trainable))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def run(lora, tasks, keys):
        def one_client(one, task, key):
            def step(carry, k):
                tr, st = carry
                x, y = data(k, task)
                g = jax.grad(loss)(tr, one, x, y)
                upd, st = opt.update(g, st)
                tr = optax.apply_updates(tr, upd)
                tr = {
                    "a": {m: v * one.mask[m][:, None] for m, v in tr["a"].items()},
                    "b": {m: v * one.mask[m][..., None] for m, v in tr["b"].items()},
                }
                return (tr, st), None

            tr = one.trainable()
            (tr, _), _ = jax.lax.scan(step, (tr, opt.init(tr)), jax.random.split(key, steps))
            return one.with_trainable(tr)

        return jax.vmap(one_client)(lora, tasks, keys)

    keys = jax.random.split(jax.random.key(42), len(ranks))
    trained = run(lora, jnp.asarray(task_of), keys)
    # the update relative to the broadcast init: A drifts too, so ΔW = s(A B) - s(A0 0) = s A B
    return trained


def test_clusters_adapters_trained_on_distinct_tasks(tiny_cfg, tiny_params):
    task_of = np.repeat(np.arange(3), 3)
    ranks = np.array([4, 8, 4, 8, 4, 8, 4, 8, 4])
    trained = train_clients(tiny_cfg, tiny_params, ranks, task_of)
    sim = np.asarray(cl.cosine_similarity(trained))
    same = task_of[:, None] == task_of[None]
    off = ~np.eye(9, dtype=bool)
    assert sim[same & off].min() > sim[~same].max(), sim.round(2)
    for method in cl.CLUSTER_METHODS:
        lab, _ = cl.cluster_clients(trained, method=method)
        assert same_partition(lab, task_of), (method, lab)
    out, assign = cl.cluster_aggregate(
        "flexlora", trained, weights=np.ones(9), ranks=ranks, num_clusters=3
    )
    assert same_partition(assign, task_of)
    np.testing.assert_array_equal(cl.assign_cluster(trained, out.global_lora), assign)
