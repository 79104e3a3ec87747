"""The GPU dequantize-matvec (`kernels.gpu_qmatvec`): in Pallas' interpreter against the
dequantize-then-float reference, the shapes it refuses, its Triton lowering, and its wiring into
`floe_jax.quant` (`gpu_kernel`), whose gradient is XLA's path's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax import quant
from floe_jax.decode import generate, pad_prompts
from floe_jax.quant import QuantConfig
from kernels import gpu_qmatvec as gq

# (format, group size, K, N): per-row int8 (chunks of 128), int8 groups of 32 and 64, int4 groups
# of 64 and 128, per-row int4; N a multiple of 16 but not of 32 or 64 in some.
CASES = [
    ("int8", None, 256, 64),
    ("int8", 32, 96, 48),
    ("int8", 64, 256, 80),
    ("int4", 64, 256, 32),
    ("int4", 128, 256, 16),
    ("int4", None, 384, 64),
]


def _weight(fmt, gs, k, n, seed=0):
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    return quant.quantize_matrix(w, fmt, gs, transposed=True)


def _ref(x, qt):
    return np.asarray(x, np.float64) @ np.asarray(qt.dequantize(), np.float64)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(("fmt", "gs", "k", "n"), CASES)
def test_kernel_equals_the_dequantized_reference(fmt, gs, k, n, m):
    qt = _weight(fmt, gs, k, n)
    x = np.random.default_rng(m).normal(size=(m, k)).astype(np.float32)
    got = np.asarray(gq.qmatvec(x, qt.q, qt.scale, fmt, interpret=True))
    want = _ref(x, qt)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_shapes_it_does_not_take_are_refused_by_name():
    assert gq.block_n(9, 64, 256, 1, "int8") is None  # more rows than a decode step's
    assert gq.block_n(1, 64, 200, 1, "int8") is None  # K not a multiple of 128
    assert gq.block_n(1, 64, 256, 8, "int4") is None  # 4-bit groups of 32
    assert gq.block_n(1, 40, 256, 1, "int8") is None  # N not a multiple of 16
    assert gq.block_n(1, 64, 256, 4, "nf4") is None  # NF4 codes
    assert gq.block_n(1, 4864, 896, 1, "int8") == 16  # 304 programs: two per SM of a large GPU
    assert gq.block_n(1, 151936, 896, 1, "int8") == 64
    qt = _weight("int8", None, 200, 64)
    with pytest.raises(ValueError, match=r"gpu_qmatvec: x \[1, 200\] with int8 codes"):
        gq.qmatvec(np.ones((1, 200), np.float32), qt.q, qt.scale, "int8", interpret=True)


def test_kernel_lowers_for_a_gpu_through_triton():
    """The Triton lowering runs here without a GPU (compiling it to PTX needs one)."""
    for fmt, gs in (("int8", None), ("int4", 64)):
        qt = _weight(fmt, gs, 896, 256)
        fn = jax.jit(lambda x, q, s, fmt=fmt: gq.qmatvec(x, q, s, fmt))
        text = fn.trace(jnp.ones((2, 896)), qt.q, qt.scale).lower(lowering_platforms=("cuda",))
        assert f"floe_gpu_qmatvec_{fmt}" in text.as_text()


def test_quantized_generate_with_the_gpu_kernel_lowers_for_a_gpu(monkeypatch, kernel_cfg,
                                                                 kernel_params):  # fmt: skip
    qp = quant.quantize(kernel_params, kernel_cfg, QuantConfig(format="int8", group_size=32))
    qp = quant.with_options(qp, gpu_kernel=True)
    tokens, mask = pad_prompts([[5, 9, 11], [3]])
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        traced = jax.jit(generate, static_argnames=("cfg", "max_new_tokens")).trace(
            qp, tokens, mask, kernel_cfg, max_new_tokens=3, key=jax.random.key(0)
        )
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "floe_gpu_qmatvec_int8" in text and "floe_qmatvec" not in text


def test_gpu_path_elsewhere_runs_xla_and_its_gradient_is_xlas(monkeypatch):
    """Traced as for a GPU but run on this CPU, the kernel's call takes XLA's branch; its
    custom gradient wrt x is the dequantized product's."""
    qt = quant.with_options(_weight("int4", 64, 256, 48), gpu_kernel=True)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 256)).astype(np.float32)
    c = rng.normal(size=(2, 48)).astype(np.float32)
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        y = jax.jit(quant.linear).lower(x, qt).compile()(x, qt)
        g = jax.jit(jax.grad(lambda x: jnp.sum(quant.linear(x, qt) * c))).lower(x).compile()(x)
    np.testing.assert_allclose(y, _ref(x, qt), rtol=1e-5, atol=1e-5 * np.abs(_ref(x, qt)).max())
    want = c.astype(np.float64) @ np.asarray(qt.dequantize(), np.float64).T
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="gpu_kernel must be a bool"):
        quant.with_options(qt, gpu_kernel="yes")
