"""Tests for floe_jax/federated/aggregate.py against hand-computable invariants."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import LoRAConfig, normalize_targets
from floe_jax.federated import aggregate as ag
from floe_jax.lora import LoRA, delta_weight, rank_mask, stack_loras, unstack_loras

R = 8


def make_clients(cfg, ranks, *, seed=0, shared_a=False, max_rank=R, cfgs=None, targets=None):
    """Stacked clients with PEFT-style random A and nonzero random B on live slots (numpy, fast).

    `shared_a` gives every client the same A (one init padded to R, truncated to each rank), as
    FFA-LoRA assumes; `cfgs` overrides the per-client LoRAConfig (targets, layers).
    """
    targets = normalize_targets(targets or "all")
    rng = np.random.default_rng(seed)
    shared = {
        m: rng.uniform(-1, 1, (cfg.num_layers, cfg.proj_shape(m)[0], max_rank)) for m in targets
    }
    a, b, mask, scale = (
        {m: [] for m in targets},
        {m: [] for m in targets},
        {m: [] for m in targets},
        [],
    )
    for k, r in enumerate(ranks):
        lcfg = cfgs[k] if cfgs else LoRAConfig(rank=int(r), alpha=16.0, max_rank=max_rank)
        live = rank_mask(lcfg, cfg.num_layers, max_rank)
        for m in targets:
            i, o = cfg.proj_shape(m)
            mm = live if m in lcfg.targets else np.zeros_like(live)
            raw = shared[m] if shared_a else rng.uniform(-1, 1, shared[m].shape)
            a[m].append(raw / np.sqrt(i) * mm[:, None, :])
            b[m].append(rng.standard_normal((cfg.num_layers, max_rank, o)) * mm[:, :, None])
            mask[m].append(mm)
        scale.append(lcfg.scale)
    f32 = lambda xs: jnp.asarray(np.stack(xs), jnp.float32)
    return LoRA(
        a={m: f32(v) for m, v in a.items()},
        b={m: f32(v) for m, v in b.items()},
        mask={m: f32(v) for m, v in mask.items()},
        scale=f32(scale),
    )


def weighted_delta(lora, weights, included=None):
    """Σ p_k ΔW_k per module with numpy, p over included clients."""
    w = np.asarray(weights, np.float64)
    if included is not None:
        w = w * np.asarray(included)
    p = w / w.sum()
    out = {}
    for m in lora.a:
        d = np.asarray(jax.vmap(lambda x, m=m: delta_weight(x, m))(lora), np.float64)
        out[m] = np.tensordot(p, d, axes=1)
    return out


def product(lora, m):
    """ΔW of one adapter or [C] of a stacked one."""
    if lora.scale.ndim:
        return np.asarray(jax.vmap(lambda x: delta_weight(x, m))(lora))
    return np.asarray(delta_weight(lora, m))


def best_rank(d_LIO, r):
    u, s, vh = np.linalg.svd(d_LIO, full_matrices=False)
    return np.einsum("lir,lr,lro->lio", u[..., :r], s[..., :r], vh[..., :r, :])


RANKS = np.array([2, 4, 8])
WEIGHTS = np.array([1.0, 2.0, 3.0])


@pytest.fixture(scope="module")
def clients(tiny_cfg):
    return make_clients(tiny_cfg, RANKS)


def test_fedit_is_hetlora_exactly_and_fedavg_of_factors(clients):
    fedit = ag.aggregate("fedit", clients, weights=WEIGHTS, ranks=RANKS)
    het = ag.aggregate("hetlora", clients, weights=WEIGHTS, ranks=RANKS)
    avg = ag.aggregate("fedavg", clients, weights=WEIGHTS, ranks=RANKS)
    chex.assert_trees_all_equal(fedit, het)
    chex.assert_trees_all_equal(fedit, avg)
    p = WEIGHTS / WEIGHTS.sum()
    for m in clients.a:
        np.testing.assert_allclose(
            fedit.global_lora.a[m], np.tensordot(p, clients.a[m], 1), rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(
            fedit.global_lora.b[m], np.tensordot(p, clients.b[m], 1), rtol=1e-6, atol=1e-6
        )
        # client k downloads the first r_k slots
        for k, r in enumerate(RANKS):
            np.testing.assert_array_equal(
                fedit.client_loras.a[m][k, :, :, :r], fedit.global_lora.a[m][:, :, :r]
            )


def test_equal_ranks_reduce_to_fedavg(tiny_cfg):
    ranks = np.array([4, 4, 4])
    lora = make_clients(tiny_cfg, ranks, seed=3)
    p = WEIGHTS / WEIGHTS.sum()
    ref = ag.aggregate("fedavg", lora, weights=WEIGHTS, ranks=ranks)
    # hetlora with norm weighting and equal norms is FedAvg too: give every client one update.
    same = stack_loras([unstack_loras(lora)[0]] * 3)
    het = ag.aggregate("hetlora", same, weights=WEIGHTS, ranks=ranks, norm_weighting=True)
    chex.assert_trees_all_close(het.global_lora, unstack_loras(same)[0], rtol=1e-6, atol=1e-6)
    # ffa: B is FedAvg of B (scales equal); fedsa: A is FedAvg of A.
    ffa = ag.aggregate("ffa", lora, weights=WEIGHTS, ranks=ranks)
    fedsa = ag.aggregate("fedsa", lora, weights=WEIGHTS, ranks=ranks)
    for m in lora.a:
        np.testing.assert_allclose(ffa.global_lora.b[m], ref.global_lora.b[m], atol=1e-6)
        np.testing.assert_allclose(fedsa.global_lora.a[m], ref.global_lora.a[m], atol=1e-7)
        np.testing.assert_allclose(
            ref.global_lora.b[m], np.tensordot(p, lora.b[m], 1), rtol=1e-6, atol=1e-6
        )
        np.testing.assert_array_equal(fedsa.client_loras.b[m], lora.b[m])  # B stays local
    np.testing.assert_allclose(ref.global_lora.scale, lora.scale[0], rtol=1e-6)


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_flexlora_one_or_identical_clients_returns_delta_exactly(tiny_cfg, path):
    # K = 2 clients x R=4 = 8 < min(I, O) = 16, so both paths apply.
    one = make_clients(tiny_cfg, [3], seed=5, max_rank=4)
    two = stack_loras([unstack_loras(one)[0]] * 2)
    for lora in (one, two):
        n = lora.scale.shape[0]
        r = np.full((n,), 3)
        out = ag.aggregate("flexlora", lora, weights=np.ones(n), ranks=r, path=path)
        for m in lora.a:
            want = product(lora, m)[0]
            for k in range(n):
                np.testing.assert_allclose(product(out.client_loras, m)[k], want, atol=2e-5)
            np.testing.assert_allclose(product(out.global_lora, m), want, atol=2e-5)


@pytest.mark.parametrize("total_rank", [None, 14])
def test_flexlora_truncation_is_best_rank_r(clients, total_rank):
    # path="auto" with K = 3 x 8 = 24: dense (eigh) for k and v (min(I, O) = 16), factored for
    # the others (min(I, O) = 32); total_rank=14 makes K = 14 < 16, factored everywhere.
    out = ag.aggregate(
        "flexlora", clients, weights=WEIGHTS, ranks=RANKS, path="auto", total_rank=total_rank
    )
    want = weighted_delta(clients, WEIGHTS)
    for m in clients.a:
        got = product(out.client_loras, m)
        for k, r in enumerate(RANKS):
            np.testing.assert_allclose(got[k], best_rank(want[m], r), atol=5e-5)
        np.testing.assert_allclose(product(out.global_lora, m), best_rank(want[m], R), atol=5e-5)


def test_flexlora_factored_equals_dense_and_numpy(tiny_cfg):
    ranks = np.array([1, 3, 2])
    lora = make_clients(tiny_cfg, ranks, seed=7, max_rank=4)  # K = 12 < 16
    w = np.array([5.0, 1.0, 2.0])
    fac = ag.aggregate("flexlora", lora, weights=w, ranks=ranks, path="factored")
    den = ag.aggregate("flexlora", lora, weights=w, ranks=ranks, path="dense")
    com = ag.aggregate("flexlora", lora, weights=w, ranks=ranks, path="factored", total_rank=6)
    want = weighted_delta(lora, w)
    for m in lora.a:
        for out in (den, com):
            np.testing.assert_allclose(
                product(fac.client_loras, m), product(out.client_loras, m), atol=3e-5
            )
        for k, r in enumerate(ranks):
            np.testing.assert_allclose(
                product(fac.client_loras, m)[k], best_rank(want[m], r), atol=3e-5
            )


@pytest.mark.parametrize(
    "I,K,O,via",
    [
        (24, 20, 96, True),
        (96, 20, 24, True),
        (24, 28, 160, True),  # K >= min(I, O): where FlexLoRA's "auto" takes the dense path
        (160, 28, 24, True),
        (24, 20, 24, False),
        (24, 60, 96, False),
    ],
)
def test_top_svd_dense_either_gram_is_the_svd(I, K, O, via):
    # The Gram of d = p q's shorter side, from d or through the factors (p (q qᵀ) pᵀ, d never
    # formed), whichever has fewer FLOPs; both give d's top singular triplets.
    from floe_jax.federated import linalg

    r = 6
    assert linalg.dense_gram_via_factors(I, K, O, r) is via
    rng = np.random.default_rng(I + K + O)
    p = rng.standard_normal((I, K)).astype(np.float32)
    q = (rng.standard_normal((K, O)) * np.logspace(0, -2, K)[:, None]).astype(np.float32)
    u, s, v = jax.jit(lambda p, q: linalg.top_svd_dense(p, q, r))(p, q)
    d = p.astype(np.float64) @ q
    want_u, want_s, want_vh = np.linalg.svd(d, full_matrices=False)
    np.testing.assert_allclose(s, want_s[:r], rtol=2e-5)
    np.testing.assert_allclose(np.abs(np.sum(u * want_u[:, :r], 0)), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(v * want_vh[:r].T, 0)), 1.0, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(u) * np.asarray(s) @ np.asarray(v).T, best_rank(d[None], r)[0], atol=2e-4
    )


def test_dense_gram_route_at_real_model_shapes():
    # Qwen2.5-0.5B with a round's 960 live columns: an MLP projection's Gram through the
    # factors (12.2 against 16.2 GFLOP), attention's square q/o from ΔW, padded K = 2048 from ΔW.
    from floe_jax.federated.linalg import dense_gram_via_factors

    assert dense_gram_via_factors(896, 960, 4864, 32) and dense_gram_via_factors(4864, 960, 896, 32)
    assert not dense_gram_via_factors(896, 960, 896, 32)
    assert not dense_gram_via_factors(896, 2048, 4864, 32)


def test_exact_rules_reproduce_weighted_sum(tiny_cfg, clients):
    want = weighted_delta(clients, WEIGHTS)
    flora = ag.aggregate("flora", clients, weights=WEIGHTS, ranks=RANKS, key=jax.random.key(1))
    fedex = ag.aggregate("fedex", clients, weights=WEIGHTS, ranks=RANKS)
    shared = make_clients(tiny_cfg, RANKS, seed=2, shared_a=True)
    ffa = ag.aggregate("ffa", shared, weights=WEIGHTS, ranks=RANKS)
    want_shared = weighted_delta(shared, WEIGHTS)
    for m in clients.a:
        np.testing.assert_allclose(flora.base_delta[m], want[m], atol=1e-5)
        total = fedex.base_delta[m] + product(fedex.global_lora, m)
        np.testing.assert_allclose(total, want[m], atol=1e-5)
        np.testing.assert_allclose(product(ffa.global_lora, m), want_shared[m], atol=1e-5)
        # ffa clients keep their frozen A
        np.testing.assert_allclose(ffa.client_loras.a[m], shared.a[m], atol=1e-7)
        # flora restarts adapters: B zero, A random on live slots only
        assert not np.any(np.asarray(flora.client_loras.b[m]))
        live = np.asarray(flora.client_loras.mask[m])
        assert np.all((np.abs(np.asarray(flora.client_loras.a[m])).sum(-2) > 0) == (live > 0))


@pytest.mark.parametrize("method", ag.available_rules())
def test_padded_slots_stay_zero(clients, method):
    out = ag.aggregate(method, clients, weights=WEIGHTS, ranks=RANKS)
    for m in clients.a:
        pad = np.arange(R)[None, :] >= out.ranks[:, None]  # [C, R]
        assert not np.any(np.asarray(out.client_loras.a[m]) * pad[:, None, None, :])
        assert not np.any(np.asarray(out.client_loras.b[m]) * pad[:, None, :, None])
        np.testing.assert_array_equal(
            np.asarray(out.client_loras.mask[m]) > 0,
            np.broadcast_to(~pad[:, None, :], out.client_loras.mask[m].shape),
        )


def test_unadapted_targets_and_layers_stay_zero(tiny_cfg):
    cfgs = [
        LoRAConfig(rank=2, max_rank=4, targets=("q", "v"), layers=(1,)),
        LoRAConfig(rank=4, max_rank=4, targets=("q", "v")),
    ]
    lora = make_clients(tiny_cfg, [2, 4], max_rank=4, cfgs=cfgs, targets=("q", "v"))
    for method in ("flexlora", "hetlora"):
        out = ag.aggregate(method, lora, weights=[1.0, 1.0], ranks=[2, 4])
        assert not np.any(np.asarray(out.client_loras.a["q_proj"][0, 0]))  # layer 0 unadapted
        assert np.any(np.asarray(out.client_loras.a["q_proj"][0, 1]))
        assert np.any(np.asarray(out.client_loras.a["q_proj"][1, 0]))


def test_nonfinite_and_absurd_norm_clients_are_excluded(tiny_cfg):
    ranks = np.array([2, 4, 8, 4])
    lora = make_clients(tiny_cfg, ranks, seed=11)
    a = dict(lora.a)
    a["k_proj"] = a["k_proj"].at[1, 0, 0, 0].set(jnp.nan)
    b = dict(lora.b)
    b["up_proj"] = b["up_proj"].at[2].multiply(1e6)
    bad = dataclasses.replace(lora, a=a, b=b)
    w = np.array([1.0, 1.0, 1.0, 2.0])
    for method in ("fedit", "flexlora", "fedex"):
        out = ag.aggregate(method, bad, weights=w, ranks=ranks, max_norm=1e4)
        np.testing.assert_array_equal(out.included, [True, False, False, True])
        np.testing.assert_array_equal(
            out.reason, [ag.REASON_OK, ag.REASON_NONFINITE, ag.REASON_NORM, ag.REASON_OK]
        )
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out.global_lora))
        ref = ag.aggregate(method, lora, weights=w * [1, 0, 0, 1], ranks=ranks, max_norm=1e4)
        for m in lora.a:
            np.testing.assert_allclose(
                product(out.global_lora, m), product(ref.global_lora, m), atol=1e-5
            )
    text = ag.exclusion_reasons(out.reason)
    assert "non-finite" in text[1] and "max_norm" in text[2] and text[0] == "included"


def test_errors(clients):
    with pytest.raises(ag.AggregationError, match="sum to zero"):
        ag.aggregate("fedit", clients, weights=[0.0, 0.0, 0.0], ranks=RANKS)
    with pytest.raises(ag.AggregationError, match="client 2 has rank 9"):
        ag.aggregate("fedit", clients, weights=WEIGHTS, ranks=[2, 4, 9])
    with pytest.raises(ag.AggregationError, match="client 0 has rank 0"):
        ag.aggregate("fedit", clients, weights=WEIGHTS, ranks=[0, 4, 8])
    with pytest.raises(ag.AggregationError, match="live slots but ranks"):
        ag.aggregate("fedit", clients, weights=WEIGHTS, ranks=[2, 4, 4])
    with pytest.raises(ag.AggregationError, match="one per client"):
        ag.aggregate("fedit", clients, weights=[1.0, 1.0], ranks=RANKS)
    with pytest.raises(ag.AggregationError, match="unknown aggregation method"):
        ag.aggregate("fedprox", clients, weights=WEIGHTS, ranks=RANKS)
    with pytest.raises(ag.AggregationError, match="every client was excluded"):
        ag.aggregate("fedit", clients, weights=WEIGHTS, ranks=RANKS, max_norm=1e-9)
    with pytest.raises(ag.AggregationError, match="total_rank"):
        ag.aggregate("flexlora", clients, weights=WEIGHTS, ranks=RANKS, total_rank=10)
    with pytest.raises(ag.AggregationError, match="stacked"):
        ag.aggregate("fedit", unstack_loras(clients)[0], weights=[1.0], ranks=[2])


def test_bytes_match_hand_count(tiny_cfg, clients):
    # tiny_cfg: D=32, F=64, KV width 16; per rank slot per layer, I + O summed over modules:
    io = {"q": 32 + 32, "k": 32 + 16, "v": 32 + 16, "o": 32 + 32}
    io |= {"gate": 32 + 64, "up": 32 + 64, "down": 64 + 32}
    i_sum = 32 * 6 + 64  # Σ_m I over the seven modules
    o_sum = 32 + 16 + 16 + 32 + 64 + 64 + 32
    L = tiny_cfg.num_layers
    full = sum(io.values())
    assert full == i_sum + o_sum == 512
    per = lambda width: 4 * L * RANKS * width  # bytes per client
    got = {m: ag.aggregate(m, clients, weights=WEIGHTS, ranks=RANKS) for m in ag.available_rules()}
    for m in ("fedit", "hetlora", "flexlora"):
        np.testing.assert_array_equal(got[m].bytes_up, per(full))
        np.testing.assert_array_equal(got[m].bytes_down, per(full))
    np.testing.assert_array_equal(got["fedsa"].bytes_up, per(i_sum))
    np.testing.assert_array_equal(got["ffa"].bytes_down, per(o_sum))
    np.testing.assert_array_equal(got["flora"].bytes_down, [4 * L * full * RANKS.sum()] * 3)
    dense = 4 * L * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3)  # residual I x O per module
    np.testing.assert_array_equal(got["fedex"].bytes_down, per(full) + dense)
    assert int(per(full)[0]) == 4 * 2 * 2 * 512 == 8192


def test_hetlora_pruning_and_norm_weighting(tiny_cfg):
    ranks = np.array([4, 4])
    lora = make_clients(tiny_cfg, ranks, seed=13, max_rank=4)
    b = {m: v.at[0, :, 2:].multiply(1e-4) for m, v in lora.b.items()}  # client 0: tail tiny
    lora = dataclasses.replace(lora, b=b)
    out = ag.aggregate("hetlora", lora, weights=[1.0, 1.0], ranks=ranks, prune_threshold=1e-3)
    np.testing.assert_array_equal(out.ranks, [2, 4])
    assert not np.any(np.asarray(out.client_loras.a["q_proj"][0, :, :, 2:]))
    # norm weighting: weights ∝ p_k ‖ΔW_k‖_F
    nw = ag.aggregate("hetlora", lora, weights=[1.0, 3.0], ranks=ranks, norm_weighting=True)
    norms = np.sqrt(np.asarray(ag.lora_sq_norms(lora)))
    q = np.array([1.0, 3.0]) * norms
    q /= q.sum()
    np.testing.assert_allclose(
        nw.global_lora.b["v_proj"], np.tensordot(q, lora.b["v_proj"], 1), rtol=1e-5, atol=1e-6
    )


def test_sq_norms_match_dense(clients):
    want = sum((product(clients, m) ** 2).sum((1, 2, 3)) for m in clients.a)
    np.testing.assert_allclose(ag.lora_sq_norms(clients), want, rtol=1e-5)


def test_no_recompile_across_rank_mixes_and_jit_equals_nojit(tiny_cfg):
    lora1 = make_clients(tiny_cfg, [2, 4, 8], seed=17)
    lora2 = make_clients(tiny_cfg, [8, 1, 3], seed=18)
    ag.aggregate("flexlora", lora1, weights=WEIGHTS, ranks=[2, 4, 8])
    n = ag.aggregate_jit._cache_size()
    out = ag.aggregate("flexlora", lora2, weights=WEIGHTS, ranks=[8, 1, 3])
    assert ag.aggregate_jit._cache_size() == n
    rule = ag.make_rule("flexlora")
    w = jnp.asarray(WEIGHTS, jnp.float32)
    ref, _ = rule.apply((), lora2, w, jnp.asarray([8, 1, 3]), key=None)
    for m in lora2.a:  # singular vectors may flip sign between programs; compare products
        np.testing.assert_allclose(
            product(out.client_loras, m), product(ref.client_loras, m), atol=1e-4
        )
    assert isinstance(out.global_lora, LoRA)


def test_masked_sums_and_stacked_products_match_dense_numpy(tiny_cfg):
    """The one-pass masked weighted sums (FedIT, FFA) and the per-layer stacked products
    (FLoRA's `Σ p_k s_k A_k B_k`, FedEx's residual) against plain NumPy: garbage in the padded
    slots of an included client and NaN in a zero-weight client change nothing."""
    ranks = np.array([2, 4, 8])
    lora = make_clients(tiny_cfg, ranks, seed=5)
    a, b = dict(lora.a), dict(lora.b)
    for m in a:  # client 0 (rank 2): large finite values in its dead slots; client 2: NaN
        a[m] = a[m].at[0, :, :, 2:].set(1e3).at[2].set(jnp.nan)
        b[m] = b[m].at[0, :, 2:, :].set(-1e3)
    dirty = dataclasses.replace(lora, a=a, b=b)
    w = np.array([1.0, 3.0, 0.0])
    p = np.array([0.25, 0.75, 0.0])
    live = (np.arange(R)[None] < ranks[:, None]).astype(np.float64)  # [C, R]
    clean = {
        m: (
            np.nan_to_num(np.asarray(lora.a[m], np.float64)) * live[:, None, None, :],
            np.nan_to_num(np.asarray(lora.b[m], np.float64)) * live[:, None, :, None],
        )
        for m in lora.a
    }
    s = np.asarray(lora.scale, np.float64)
    g_scale = float(np.sum(p * s))
    fedit = ag.aggregate("fedit", dirty, weights=w, ranks=ranks)
    ffa = ag.aggregate("ffa", dirty, weights=w, ranks=ranks)
    flora = ag.aggregate("flora", dirty, weights=w, ranks=ranks)
    fedex = ag.aggregate("fedex", dirty, weights=w, ranks=ranks)
    for m, (a_np, b_np) in clean.items():
        g_a, g_b = np.tensordot(p, a_np, 1), np.tensordot(p, b_np, 1)
        np.testing.assert_allclose(fedit.global_lora.a[m], g_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fedit.global_lora.b[m], g_b, rtol=1e-5, atol=1e-6)
        slot_w = p[:, None] * live  # FFA's A: per-slot average over the clients holding it
        ffa_a = np.einsum("cr,clir->lir", slot_w, a_np) / np.maximum(slot_w.sum(0), 1e-30)
        np.testing.assert_allclose(ffa.global_lora.a[m], ffa_a, rtol=1e-5, atol=1e-6)
        ffa_b = np.tensordot(p * s / g_scale, b_np, 1)
        np.testing.assert_allclose(ffa.global_lora.b[m], ffa_b, rtol=1e-5, atol=1e-6)
        exact = np.einsum("c,clir,clro->lio", p * s, a_np, b_np)
        np.testing.assert_allclose(flora.base_delta[m], exact, rtol=1e-5, atol=1e-6)
        resid = exact - g_scale * np.einsum("lir,lro->lio", g_a, g_b)
        np.testing.assert_allclose(fedex.base_delta[m], resid, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(fedit.included, [True, True, False])


def test_screen_flags_nonfinite_factors_without_norms(tiny_cfg):
    """Without max_norm, screening reads the factors once for NaN/Inf (padded slots too)."""
    lora = make_clients(tiny_cfg, [2, 4, 8], seed=2)
    a = dict(lora.a)
    a["q_proj"] = a["q_proj"].at[1, 0, 0, 7].set(jnp.inf)  # a dead slot of client 1 (rank 4)
    np.testing.assert_array_equal(ag.factors_finite(lora), [True, True, True])
    bad = dataclasses.replace(lora, a=a)
    np.testing.assert_array_equal(ag.factors_finite(bad), [True, False, True])
    w, reason = ag.screen(bad, np.ones(3))
    np.testing.assert_array_equal(reason, [ag.REASON_OK, ag.REASON_NONFINITE, ag.REASON_OK])
    assert float(w[1]) == 0.0 and float(w[0]) > 0
    b = dict(lora.b)  # NaN and -Inf in live slots propagate through the product with zeros too
    b["up_proj"] = b["up_proj"].at[2, 1, 3, 5].set(jnp.nan)
    b["k_proj"] = b["k_proj"].at[0, 0, 0, 0].set(-jnp.inf)
    worse = dataclasses.replace(lora, a=a, b=b)
    np.testing.assert_array_equal(ag.factors_finite(worse), [False, False, False])


@pytest.mark.parametrize(
    "method", ["fedit", "hetlora", "ffa", "fedsa", "flexlora", "flora", "fedex"]
)
def test_round_path_without_downloads_gives_the_same_global(tiny_cfg, method):
    """`downloads=False` (the program a federated round runs) returns no `client_loras` and
    the full call's global adapter, base delta and per-client fields bit for bit, with a NaN
    client and garbage in an included client's padded slots screened the same way."""
    ranks = np.array([2, 4, 8, 3])
    lora = make_clients(tiny_cfg, ranks, seed=9)
    a, b = dict(lora.a), dict(lora.b)
    a["q_proj"] = a["q_proj"].at[3, 0, 0, 0].set(jnp.nan)  # client 3: excluded (non-finite)
    b["v_proj"] = b["v_proj"].at[0, :, 5:, :].set(7.0)  # client 0 (rank 2): dead-slot garbage
    dirty = dataclasses.replace(lora, a=a, b=b)
    w = [1.0, 2.0, 3.0, 4.0]
    full = ag.aggregate(method, dirty, weights=w, ranks=ranks)
    lean = ag.aggregate(method, dirty, weights=w, ranks=ranks, downloads=False)
    assert lean.client_loras is None and full.client_loras is not None
    chex.assert_trees_all_equal(
        dataclasses.replace(full, client_loras=None), dataclasses.replace(lean, client_loras=None)
    )
    np.testing.assert_array_equal(lean.included, [True, True, True, False])
    assert np.isfinite(np.asarray(lean.global_lora.b["v_proj"])).all()


def _nonfinite_cases(lora):
    """Clean factors, then one non-finite entry in each place the screening must catch it:
    a live slot of an included client, a padded slot, a zero-weight client, a client of the
    other cluster. Client 2 (rank 8, weight 0 below) is the zero-weight one."""
    yield "clean", lora, None
    for name, (side, m, at, value, who) in {
        "nan in a live slot": ("a", "q_proj", (0, 1, 3, 1), jnp.nan, 0),
        "inf in a padded slot": ("b", "down_proj", (1, 0, 6, 2), jnp.inf, 1),
        "nan in a zero-weight client": ("b", "v_proj", (2, 0, 0, 0), jnp.nan, 2),
        "-inf in cluster 1": ("a", "up_proj", (3, 1, 0, 2), -jnp.inf, 3),
    }.items():
        tree = dict(getattr(lora, side))
        tree[m] = tree[m].at[at].set(value)
        yield name, dataclasses.replace(lora, **{side: tree}), who


@pytest.mark.parametrize(
    "method, options, max_norm, K",
    [
        ("fedit", (), None, 1),
        ("fedit", (), 30.0, 2),
        ("hetlora", (("norm_weighting", True), ("prune_threshold", 0.2)), None, 2),
        ("ffa", (), None, 1),
        ("fedsa", (), 30.0, 2),
    ],
)
def test_one_pass_round_path_equals_the_two_pass_one(tiny_cfg, method, options, max_norm, K):
    """The one-pass program (`screen_aggregate` with `Rule.one_pass`) gives the two-pass
    program's result bit for bit: on finite factors, and with a NaN/Inf anywhere (where its
    fallback runs the two-pass program, so the reason codes say non-finite and the global
    adapters stay finite)."""
    ranks = np.array([2, 4, 8, 3])
    lora = make_clients(tiny_cfg, ranks, seed=5)
    w, r = ag.validate(lora, [1.0, 2.0, 0.0, 4.0], ranks)
    labels = np.array([0, 0, 1, 1], np.int32) if K == 2 else np.zeros(4, np.int32)
    rule = ag.make_rule(method, **dict(options))
    states = ag.init_states(rule, jax.tree.map(lambda x: x[0], lora), K, key=jax.random.key(1))
    args = (method, options, max_norm, K, states)
    for name, given, who in _nonfinite_cases(lora):
        call = functools.partial(ag.aggregate_jit, *args, given, w, r, labels, jax.random.key(2))
        one, two = call(downloads=False, one_pass=True), call(downloads=False, one_pass=False)
        chex.assert_trees_all_equal(one, two)
        if who is not None:
            assert int(one[0].reason[who]) == ag.REASON_NONFINITE, name
        else:  # clean: max_norm = 30 leaves out a client by its norm (the Gram path is taken)
            assert (ag.REASON_NORM in np.asarray(one[0].reason)) == (max_norm is not None)
        for x in jax.tree.leaves(one[0].global_lora):
            assert np.isfinite(np.asarray(x)).all(), name


@pytest.mark.parametrize("method", ["fedit", "ffa"])
def test_one_pass_with_update_norms_equals_the_two_pass_one(tiny_cfg, method):
    """As `rounds.finish_round` calls it, with each client's update norm and a limit on it: a
    client moved too far and a diverged client (NaN factors, NaN norm) are left out with the
    two-pass program's reasons, bit for bit, in both programs."""
    ranks = np.array([2, 4, 8, 3])
    lora = make_clients(tiny_cfg, ranks, seed=7)
    a = dict(lora.a)
    a["k_proj"] = a["k_proj"].at[3, 0, 1, 0].set(jnp.nan)  # client 3 diverged
    lora = dataclasses.replace(lora, a=a)
    rule = ag.make_rule(method)
    states = ag.init_states(rule, jax.tree.map(lambda x: x[0], lora), 1, key=jax.random.key(1))
    norms = jnp.asarray([1.0, 9.0, 2.0, jnp.nan])  # client 1 moved past max_update_norm = 5

    @functools.partial(jax.jit, static_argnums=0)
    def run(one_pass, lora):
        return ag.screen_aggregate(
            rule, states, lora, jnp.asarray([1.0, 2.0, 3.0, 4.0]), jnp.asarray(ranks),
            jnp.zeros(4, jnp.int32), 1, key=jax.random.key(2), update_norm=norms,
            max_update_norm=5.0, downloads=False, one_pass=one_pass,
        )  # fmt: skip

    one, two = run(True, lora), run(False, lora)
    chex.assert_trees_all_equal(one, two)
    reasons = [ag.REASON_OK, ag.REASON_UPDATE_NORM, ag.REASON_OK, ag.REASON_NONFINITE]
    np.testing.assert_array_equal(one[0].reason, reasons)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(one[0].global_lora))


@pytest.mark.parametrize("method", ["fedit", "hetlora", "ffa", "fedsa"])
def test_one_pass_apply_lets_every_nonfinite_entry_through(tiny_cfg, method):
    """`Rule.one_pass`'s contract: `apply`'s result on finite factors, and a non-finite global
    adapter when a client of zero weight (which `apply` zeroes) has a NaN."""
    ranks = np.array([2, 4, 8])
    lora = make_clients(tiny_cfg, ranks, seed=6)
    rule = ag.make_rule(method)
    w, r = jnp.asarray([1.0, 0.0, 2.0]), jnp.asarray(ranks)
    key = jax.random.key(0)
    chex.assert_trees_all_equal(
        rule.one_pass((), lora, w, r, key=key), rule.apply((), lora, w, r, key=key)
    )
    b = dict(lora.b)
    b["o_proj"] = b["o_proj"].at[1, 0, 0, 0].set(jnp.nan)
    bad = dataclasses.replace(lora, b=b)
    finite = lambda out: all(np.isfinite(x).all() for x in jax.tree.leaves(out.global_lora))
    assert finite(rule.apply((), bad, w, r, key=key)[0])
    assert not finite(rule.one_pass((), bad, w, r, key=key)[0])
    assert ag.make_rule("flexlora").one_pass is None  # the factored rules keep two passes


def test_donating_program_matches_and_consumes_the_clients(tiny_cfg):
    """`aggregate_jit_donating` gives `aggregate_jit`'s result bit for bit and takes the
    clients' buffers (a caller must not use them again)."""
    ranks = np.array([2, 4, 8], np.int32)
    lora = make_clients(tiny_cfg, ranks, seed=4)
    w, r = ag.validate(lora, [1.0, 2.0, 3.0], ranks)
    args = (np.zeros(3, np.int32), jax.random.key(0))
    for method in ("fedit", "fedsa", "flexlora"):
        want = ag.aggregate_jit(method, (), None, 1, ((),), lora, w, r, *args)
        given = jax.tree.map(jnp.copy, lora)
        got = ag.aggregate_jit_donating(method, (), None, 1, ((),), given, w, r, *args)
        chex.assert_trees_all_equal(got, want)
        assert given.a["q_proj"].is_deleted()


def test_round_path_takes_the_one_pass_program_by_the_factors_size(tiny_cfg, monkeypatch):
    """`one_pass=None` (a federated round's): the one-pass program (its `lax.cond` fallback)
    only for factors of at least `ONE_PASS_MIN_BYTES`, the two-pass one below."""
    ranks = np.array([2, 4])
    lora = make_clients(tiny_cfg, ranks, seed=7)
    w, r = ag.validate(lora, [1.0, 2.0], ranks)
    rule = ag.make_rule("fedit")
    states = ag.init_states(rule, jax.tree.map(lambda x: x[0], lora), 1, key=jax.random.key(1))

    def has_cond():
        program = lambda x: ag.screen_aggregate(  # noqa: E731
            rule, states, x, w, r, np.zeros(2, np.int32), 1, key=jax.random.key(2),
            downloads=False,
        )  # fmt: skip
        return "cond" in str(jax.make_jaxpr(program)(lora))

    assert not has_cond()  # a few KiB of factors
    monkeypatch.setattr(ag, "ONE_PASS_MIN_BYTES", 0)
    assert has_cond()
