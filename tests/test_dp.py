"""Tests of floe_jax/federated/dp.py: DP-FedAvg rounds (clipping, noise, the fixed denominator)
and their ε from dp-accounting."""

import dataclasses
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import ConfigError, LoRAConfig
from floe_jax.federated import dp
from floe_jax.federated.config import AggregationConfig, DPConfig, FedConfig
from floe_jax.federated.loop import train_federated
from floe_jax.federated.rounds import init_server_state, round_step
from floe_jax.federated.types import client_data
from floe_jax.lora import LoRA
from floe_jax.overrides import apply_overrides

T, R = 12, 4
TARGETS = ("q", "v")
FED = FedConfig(
    num_rounds=2,
    clients_per_round=2,
    local_steps=2,
    batch_size=2,
    seq_len=T,
    lr=1e-2,
    lora=LoRAConfig(rank=R, targets=TARGETS),
    max_to_keep=1,
)


def _examples(vocab, n_clients=4, n=3, seed=0):
    rng = np.random.default_rng(seed)
    ones = np.ones((n, T), np.float32)
    return [(rng.integers(0, vocab, (n, T)).astype(np.int32), ones, ones) for _ in range(n_clients)]


# ----------------------------------------------------------------------------- config


def test_dp_config_validates_and_is_reachable_by_overrides():
    assert not FedConfig().dp.enabled
    fed = apply_overrides(FedConfig(), ["dp.enabled=true", "dp.noise_multiplier=0.7"])
    assert fed.dp == DPConfig(enabled=True, noise_multiplier=0.7)
    assert hash(fed) == hash(dataclasses.replace(fed))
    for bad, field in (
        ("dp.clip_norm=0", "clip_norm"),
        ("dp.clip_norm=inf", "clip_norm"),
        ("dp.noise_multiplier=-1", "noise_multiplier"),
        ("dp.noise_multiplier=nan", "noise_multiplier"),
        ("dp.delta=1", "delta"),
        ("dp.sampling=shuffle", "sampling"),
    ):
        # the parser refuses a non-finite number itself, naming the key (`dp.clip_norm: ...`)
        with pytest.raises(ConfigError, match=rf"(DPConfig|dp)\.{field}"):
            apply_overrides(FedConfig(), [bad])
    for field in ("clip_norm", "noise_multiplier"):  # built in code, the config refuses them
        with pytest.raises(ConfigError, match=f"DPConfig.{field}"):
            DPConfig(**{field: float("nan")})


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "flora", "fedsa", "fedex"])
def test_dp_refuses_rules_that_do_not_average_factors(method):
    with pytest.raises(ConfigError, match=f"agg.method={method!r}"):
        FedConfig(agg=AggregationConfig(method=method), dp=DPConfig(enabled=True))
    FedConfig(agg=AggregationConfig(method=method), dp=DPConfig())  # off: any rule


# ----------------------------------------------------------------------------- the server step


def _stacked(lead, L=4, I=128, O=96, key=0, scale=1.0):
    """A LoRA with leading axes `lead`, random factors, every slot live."""
    ka, kb = jax.random.split(jax.random.key(key))
    return LoRA(
        a={"q_proj": jax.random.normal(ka, (*lead, L, I, R))},
        b={"q_proj": jax.random.normal(kb, (*lead, L, R, O))},
        mask={"q_proj": jnp.ones((*lead, L, R))},
        scale=jnp.full(lead, scale),
    )


def _moved(new: LoRA, old: LoRA) -> np.ndarray:
    """[K] L2 norm of each cluster's change over the whole trainable tree."""
    d = jax.tree.map(lambda x, y: x - y, new.trainable(), old.trainable())
    return np.sqrt(sum(np.sum(np.square(np.asarray(x)), axis=tuple(range(1, x.ndim)))
                       for x in jax.tree.leaves(d)))  # fmt: skip


def test_clipping_bounds_one_clients_contribution():
    C, S = 3, 0.5
    glob = _stacked((1,), key=1)
    start = jax.tree.map(lambda x: jnp.broadcast_to(x, (C, *x.shape[1:])), glob)
    small = jax.tree.map(lambda x, d: x + 1e-3 * d, start, _stacked((C,), key=2))
    huge = jax.tree.map(lambda x, d: x.at[0].add(1e6 * d[0]), small, _stacked((C,), key=3))
    cfg = DPConfig(enabled=True, clip_norm=S, noise_multiplier=0.0)
    E = jnp.asarray([2.0])
    step = lambda trained, inc: dp.private_step(
        glob, start, trained, jnp.asarray(inc), jnp.zeros(C, jnp.int32), E, dp=cfg,
        key=jax.random.key(0),
    )[0]  # fmt: skip
    without = step(small, [False, True, True])
    with_huge, m = dp.private_step(
        glob, start, huge, jnp.ones(C, bool), jnp.zeros(C, jnp.int32), E, dp=cfg,
        key=jax.random.key(0),
    )  # fmt: skip
    assert int(m["dp_clipped"]) == 1
    # The huge client moves the average by exactly S / E: clipped to S, divided by E.
    np.testing.assert_allclose(_moved(with_huge, without), [S / 2.0], rtol=1e-5)
    # Unclipped small updates pass unchanged: (Δ1 + Δ2) / E.
    want = jax.tree.map(lambda g, s, t: g[0] + (t[1] + t[2] - 2 * s[0]) / 2.0, glob, start, small)
    np.testing.assert_allclose(np.asarray(without.b["q_proj"][0]), np.asarray(want.b["q_proj"]),
                               atol=1e-6)  # fmt: skip
    # A NaN client left out by screening contributes nothing.
    nan = jax.tree.map(lambda x: x.at[0].set(jnp.nan), small)
    np.testing.assert_array_equal(
        np.asarray(step(nan, [False, True, True]).a["q_proj"]), np.asarray(without.a["q_proj"])
    )


def test_noise_has_the_configured_scale_per_cluster():
    C, K, S, sigma = 4, 3, 0.7, 1.3
    glob = _stacked((K,), key=1)
    start = jax.tree.map(lambda x: x[jnp.array([0, 0, 1, 1])], glob)
    glob = dataclasses.replace(  # cluster 2's slot 3 is not live: it gets no noise
        glob, mask={"q_proj": glob.mask["q_proj"].at[2, :, 3].set(0.0)}
    )
    E = dp.expected_clients(jnp.asarray([0, 0, 0, 1, 1, 2, 2, 2]), C, K)  # C·N_k/N
    np.testing.assert_allclose(np.asarray(E), [1.5, 1.0, 1.5])
    cfg = DPConfig(enabled=True, clip_norm=S, noise_multiplier=sigma)
    new, m = dp.private_step(
        glob, start, start, jnp.ones(C, bool), jnp.asarray([0, 0, 1, 1]), E, dp=cfg,
        key=jax.random.key(7),
    )  # fmt: skip
    assert int(m["dp_clipped"]) == 0
    for k in range(K):  # every cluster is noised, sampled or not (cluster 2 is not)
        noise = np.concatenate(
            [
                np.ravel(np.asarray(getattr(new, f)["q_proj"][k] - getattr(glob, f)["q_proj"][k]))
                for f in ("a", "b")
            ]  # fmt: skip
        )
        if k == 2:
            live = np.concatenate([np.ravel(np.broadcast_to(
                np.asarray(glob.mask["q_proj"][2])[:, None, :], glob.a["q_proj"].shape[1:])),
                np.ravel(np.broadcast_to(np.asarray(glob.mask["q_proj"][2])[:, :, None],
                                         glob.b["q_proj"].shape[1:]))])  # fmt: skip
            assert np.all(noise[live == 0] == 0)
            noise = noise[live > 0]
        assert noise.size > 2000
        want = sigma * S / float(E[k])
        assert abs(np.std(noise) / want - 1) < 0.04, (k, np.std(noise), want)
        assert abs(np.mean(noise)) < 4 * want / math.sqrt(noise.size)
    # A cluster with no members (E = 0) keeps its adapter; FFA's frozen A is never noised.
    new, _ = dp.private_step(
        glob, start, start, jnp.ones(C, bool), jnp.asarray([0, 0, 1, 1]),
        jnp.asarray([1.0, 1.0, 0.0]), dp=cfg, frozen=("a",), key=jax.random.key(7),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(new.a["q_proj"]), np.asarray(glob.a["q_proj"]))
    np.testing.assert_array_equal(np.asarray(new.b["q_proj"][2]), np.asarray(glob.b["q_proj"][2]))
    assert np.all(np.asarray(new.b["q_proj"][:2]) != np.asarray(glob.b["q_proj"][:2]))


# ----------------------------------------------------------------------------- the round


@pytest.mark.parametrize("method", ["fedavg", "ffa"])
def test_dp_round_without_noise_or_clipping_is_the_plain_round(tiny_cfg, tiny_params, method):
    """σ = 0 and S huge, one cluster, equal example counts and ranks: the clipped, noised sum
    over E = C is FedAvg's average, so the round is the plain round."""
    fed = dataclasses.replace(FED, agg=AggregationConfig(method=method))
    private = dataclasses.replace(
        fed, dp=DPConfig(enabled=True, clip_norm=1e9, noise_multiplier=0.0)
    )
    data = client_data(_examples(tiny_cfg.vocab_size))
    state = init_server_state(tiny_cfg, fed, ranks=[R] * 4)
    plain, m0 = jax.jit(lambda s: round_step(s, tiny_params, data, cfg=tiny_cfg, fed=fed))(state)
    dp_new, m1 = jax.jit(lambda s: round_step(s, tiny_params, data, cfg=tiny_cfg, fed=private))(
        state
    )
    assert int(m1["dp_clipped"]) == 0 and "dp_clipped" not in m0
    np.testing.assert_array_equal(np.asarray(m0["client_ids"]), np.asarray(m1["client_ids"]))
    moved = False
    for f in ("a", "b"):
        for mod in getattr(plain.global_loras, f):
            x = np.asarray(getattr(plain.global_loras, f)[mod])
            y = np.asarray(getattr(dp_new.global_loras, f)[mod])
            np.testing.assert_allclose(y, x, atol=1e-6, err_msg=f"{f}[{mod}]")
            moved |= not np.allclose(x, np.asarray(getattr(state.global_loras, f)[mod]))
    assert moved


def test_dp_round_noises_every_cluster_with_members(tiny_cfg, tiny_params):
    """Two clusters of two, two clients sampled: both adapters move every round, whether or not
    a member was sampled (skipping one would publish that none was), and the round stays a
    pure function of the state."""
    fed = dataclasses.replace(FED, dp=DPConfig(enabled=True, clip_norm=0.1, noise_multiplier=1.0))
    data = client_data(_examples(tiny_cfg.vocab_size))
    state = init_server_state(tiny_cfg, fed, ranks=[R] * 4, assignment=[0, 0, 1, 1], num_clusters=2)
    before = jax.device_get(state)
    run = jax.jit(lambda s: round_step(s, tiny_params, data, cfg=tiny_cfg, fed=fed))
    new, m = run(before)
    assert 0 <= int(m["dp_clipped"]) <= 2 and bool(m["global_finite"])
    for k in range(2):  # B starts at zero: every live entry now carries noise
        assert np.all(np.asarray(new.global_loras.b["q_proj"][k]) != 0)
        assert np.all(
            np.asarray(new.global_loras.a["q_proj"][k] != before.global_loras.a["q_proj"][k])
        )
    again, _ = run(before)
    np.testing.assert_array_equal(
        np.asarray(again.global_loras.a["v_proj"]), np.asarray(new.global_loras.a["v_proj"])
    )


def test_train_federated_reports_epsilon_per_round(tiny_cfg, tiny_params, tmp_path):
    fed = dataclasses.replace(
        FED, num_rounds=3, dp=DPConfig(enabled=True, clip_norm=0.01, noise_multiplier=1.0)
    )
    data = client_data(_examples(tiny_cfg.vocab_size))
    state, rows = train_federated(
        tiny_params, data, cfg=tiny_cfg, fed=fed, run_dir=str(tmp_path), progress=False
    )
    eps = [r["dp_epsilon"] for r in rows]
    want = [dp.epsilon(fed.dp, num_clients=4, clients_per_round=2, rounds=t) for t in (1, 2, 3)]
    assert eps == want and eps[0] < eps[1] < eps[2]
    assert all(r["dp_delta"] == 1e-5 and r["dp_clipped"] == 2 for r in rows)  # S tiny: all
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.global_loras))


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_epsilon_is_dp_accountings_and_grows_with_rounds(sampling):
    cfg = DPConfig(enabled=True, noise_multiplier=1.1, delta=1e-5, sampling=sampling)
    N, C = 100, 10
    eps = [dp.epsilon(cfg, num_clients=N, clients_per_round=C, rounds=t) for t in (1, 10, 100)]
    assert 0 < eps[0] < eps[1] < eps[2] < math.inf
    if sampling == "poisson":  # their own computation, written out
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)),
                    100)  # fmt: skip
    else:  # replace-one: a swapped client moves the clipped sum by 2S
        acc = dp_accounting.rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        acc.compose(
            dp_accounting.SampledWithoutReplacementDpEvent(
                N, C, dp_accounting.GaussianDpEvent(0.55)
            ),
            100,
        )
    assert eps[2] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # More noise, less sampling or a larger δ all lower ε.
    assert dp.epsilon(dataclasses.replace(cfg, noise_multiplier=2.0), num_clients=N,
                      clients_per_round=C, rounds=100) < eps[2]  # fmt: skip
    assert dp.epsilon(cfg, num_clients=N, clients_per_round=5, rounds=100) < eps[2]
    assert dp.epsilon(dataclasses.replace(cfg, delta=1e-3), num_clients=N, clients_per_round=C,
                      rounds=100) < eps[2]  # fmt: skip


def test_epsilon_endpoints():
    cfg = DPConfig(enabled=True, noise_multiplier=0.0)
    assert dp.epsilon(cfg, num_clients=10, clients_per_round=2, rounds=3) == math.inf
    assert dp.epsilon(DPConfig(enabled=True), num_clients=10, clients_per_round=2, rounds=0) == 0
    row = dp.host_metrics({"round": 0, "dp_clipped": 1}, cfg, num_clients=10, clients_per_round=2)
    assert row == {"dp_epsilon": None, "dp_delta": 1e-5, "dp_clipped": 1}
    assert dp.host_metrics({"round": 0}, DPConfig(), num_clients=10, clients_per_round=2) == {}
    with pytest.raises(ValueError, match="clients_per_round"):
        dp.epsilon(cfg, num_clients=3, clients_per_round=5, rounds=1)
