"""Router gates and fusion rules: hand-computable answers and endpoint identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import ConfigError
from floe_jax.inference.router import (
    FusionConfig,
    edge_gate,
    edge_weight,
    entropy,
    entropy_gate,
    fuse,
    maxprob_gate,
    proxy_tuning,
)


def _logp(p):
    return jnp.log(jnp.asarray(p, jnp.float32))


def test_entropy_matches_formula():
    p = np.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    want = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(entropy(_logp(p)), want, rtol=1e-6)


def test_entropy_gate_formula_and_symmetry():
    pe = np.array([[0.9, 0.05, 0.05]])
    pc = np.array([[0.4, 0.3, 0.3]])
    T = 0.7
    he, hc = -(pe * np.log(pe)).sum(), -(pc * np.log(pc)).sum()
    want = np.exp(-he / T) / (np.exp(-he / T) + np.exp(-hc / T))
    w = entropy_gate(_logp(pe), _logp(pc), T)
    np.testing.assert_allclose(w, [want], rtol=1e-5)
    assert float(w[0]) > 0.5  # the more certain edge gets more weight
    np.testing.assert_allclose(entropy_gate(_logp(pe), _logp(pe), T), [0.5], rtol=1e-6)


def test_edge_gate_is_the_edges_normalised_certainty_whatever_the_cloud():
    pe = np.array([[0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])
    he = -(pe[0] * np.log(pe[0])).sum()
    want = [1 - he / np.log(3), 0.0, 1.0]
    np.testing.assert_allclose(edge_gate(_logp(pe)), want, atol=1e-6)
    confident_cloud = _logp(np.array([[0.0, 1.0, 0.0]] * 3) + 1e-30)
    cfg = FusionConfig(gate="edge")
    w = edge_weight(_logp(pe), confident_cloud, jnp.array([True, True, False]), cfg)
    np.testing.assert_allclose(w, [want[0], 0.0, 1.0], atol=1e-6)  # no cloud: w = 1


def test_maxprob_gate():
    pe, pc = np.array([[0.6, 0.4]]), np.array([[0.2, 0.8]])
    np.testing.assert_allclose(maxprob_gate(_logp(pe), _logp(pc)), [0.6 / 1.4], rtol=1e-6)


def test_missing_cloud_gives_weight_one():
    pe, pc = _logp([[0.6, 0.4], [0.5, 0.5]]), _logp([[0.2, 0.8], [0.9, 0.1]])
    for gate in ("entropy", "maxprob", "fixed"):
        cfg = FusionConfig(gate=gate, fixed_w=0.3)
        w = edge_weight(pe, pc, jnp.array([False, True]), cfg)
        assert float(w[0]) == 1.0 and float(w[1]) < 1.0


@pytest.mark.parametrize("space", ["prob", "log"])
def test_fuse_endpoints(space):
    k1, k2 = jax.random.split(jax.random.key(0))
    le = jax.nn.log_softmax(jax.random.normal(k1, (3, 11)))
    lc = jax.nn.log_softmax(jax.random.normal(k2, (3, 11)))
    np.testing.assert_array_equal(fuse(le, lc, jnp.ones(3), space), le)
    np.testing.assert_allclose(fuse(le, lc, jnp.zeros(3), space), lc, atol=1e-6)
    mid = fuse(le, lc, jnp.full(3, 0.25), space)
    np.testing.assert_allclose(jnp.exp(mid).sum(-1), 1.0, rtol=1e-5)


def test_fuse_prob_and_log_formulas():
    pe, pc = np.array([[0.7, 0.2, 0.1]]), np.array([[0.1, 0.3, 0.6]])
    w = 0.4
    got = np.exp(fuse(_logp(pe), _logp(pc), jnp.array([w]), "prob"))
    np.testing.assert_allclose(got, w * pe + (1 - w) * pc, rtol=1e-5)
    geo = pe**w * pc ** (1 - w)
    got = np.exp(fuse(_logp(pe), _logp(pc), jnp.array([w]), "log"))
    np.testing.assert_allclose(got, geo / geo.sum(), rtol=1e-5)


def test_proxy_tuning_formula_and_shift_invariance():
    k = jax.random.split(jax.random.key(1), 3)
    zc, zt, zb = (jax.random.normal(x, (2, 7)) for x in k)
    want = jax.nn.log_softmax(zc + zt - zb)
    np.testing.assert_allclose(proxy_tuning(zc, zt, zb), want, atol=1e-6)
    got = proxy_tuning(jax.nn.log_softmax(zc), zt + 3.0, zb)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fusion_config_validates():
    with pytest.raises(ConfigError, match="gate"):
        FusionConfig(gate="learned")
    with pytest.raises(ConfigError, match="fixed_w"):
        FusionConfig(fixed_w=1.5)
    with pytest.raises(ConfigError, match="space"):
        FusionConfig(space="logit")
