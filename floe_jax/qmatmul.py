"""Products over quantized codes, on raw arrays: how each format's codes decode to floats
(`decode`), and the paths `x [M, K] . decode(q, scale) [N, K]^T` takes (`contract`): the CPU
kernel (`kernels.cpu_qmatvec`), the GPU kernel (`kernels.gpu_qmatvec`), XLA's multiply-reduce
that reads each code once, or a dequantize-then-dot for wide inputs. `floe_jax.quant` holds the
formats, the quantizer and the `QuantizedTensor` whose static fields choose among the kernels.

Shapes: M rows of activations, K contracted width, N outputs, G = K / group_size groups.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_qmatvec, gpu_qmatvec

# QLoRA's NF4 code book: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODES = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip

# Activations with at most this many rows (decode steps) contract the codes without a float copy
# of the weight (XLA:CPU turns a dot on a converted operand into one): on CPUs in the fused C++
# kernel `kernels.cpu_qmatvec` (unless `QuantConfig.cpu_kernel` is False), elsewhere in a
# multiply-reduce fusion that reads each code once. Wider inputs (prefill, training) dequantize
# and run a dot.
SMALL_ROWS = 16
# On CPUs the kernel also runs inputs of up to this many rows (a short prompt's prefill): it
# decodes each weight once per pass of 4 rows (AVX-512) from cache, or once into scratch (AVX2),
# which at 32 rows still beat dequantizing the weight for a dot about twofold (12 MLP matrices of
# Qwen2.5-0.5B shapes at 32 rows: int8 104 against 204 ms, int4 88 against 221; `9ae0eac`).
KERNEL_ROWS = 32
# The largest float copy of one weight a wide matmul makes at once (see `dequantized_dot`).
CHUNK_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------- codes


def _unpack4(q):
    lo, hi = q & 15, q >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])


def decode(q, scale, fmt, dtype):
    """Float values [..., N, K] of codes `q` with `scale` [..., N, G]."""
    if fmt == "bf16":
        # The codes are uint16 bit patterns, bitcast to bfloat16 only to be converted. Stored as
        # bfloat16, they would pass XLA:CPU's float normalization,
        # which upcasts every bfloat16 array that is sliced or reshaped (a layer scan's slice,
        # the chunks of `dequantized_dot`) to float32 whole: a float32 copy of the base in a
        # training step (measured: 2.9 GB of temporaries at Qwen2.5-0.5B shapes, 160% of a
        # float32 base's step). A micro-benchmark ran matmuls over this decode up to ~1.3x
        # slower than over bfloat16-typed codes; real-scale decode did not (`generate` at
        # Qwen2.5-0.5B shapes on a loaded 2-core host: 755 ms per token over uint16 codes, 819
        # over bfloat16-typed ones, the same tokens).
        return jax.lax.bitcast_convert_type(q, jnp.bfloat16).astype(dtype)
    if fmt == "int8":
        v = q.astype(dtype)
    else:
        c = _unpack4(q)
        v = (c.astype(jnp.int8) - 8).astype(dtype) if fmt == "int4" else jnp.asarray(NF4_CODES)[c]
        v = v.astype(dtype)
    *lead, n, k = v.shape
    g = scale.shape[-1]
    v = v.reshape(*lead, n, g, k // g) * scale[..., None].astype(dtype)
    return v.reshape(*lead, n, k)


# ----------------------------------------------------------------------------- products


def contract(x, w, out_dtype=None):
    """`x [..., K] . storage [N, K]` over K -> [..., N] in `out_dtype` (default x's), float32
    accumulation, for a `floe_jax.quant.QuantizedTensor` `w` (its codes, scales, format and
    kernel options)."""
    lead, k = x.shape[:-1], x.shape[-1]
    m = int(np.prod(lead)) if lead else 1
    x2 = x.reshape(m, k)
    backend = jax.default_backend()
    if m <= KERNEL_ROWS and w.cpu_kernel and backend == "cpu" and cpu_qmatvec.available():
        y = _cpu_rows(x2, w.q, w.scale, w.format, _kernel_activations(w.activations))
    elif (w.gpu_kernel and backend == "gpu"
          and gpu_qmatvec.block_n(m, w.q.shape[0], k, w.scale.shape[-1], w.format)):  # fmt: skip
        y = _gpu_rows(x2, w.q, w.scale, w.format)
    elif m <= SMALL_ROWS:
        y = multiply_reduce(x2, w.q, w.scale, w.format)
    else:
        y = dequantized_dot(x2, w.q, w.scale, w.format)
    return y.astype(out_dtype or x.dtype).reshape(*lead, y.shape[-1])


def _kernel_activations(activations: str) -> str:
    """`activations`, or float32 (with a warning, once) where this CPU's kernel has no int8
    path (an AVX-512 CPU without VNNI)."""
    if activations == "int8" and not cpu_qmatvec.int8_activations():
        _warn_no_vnni()
        return "float32"
    return activations


@functools.cache
def _warn_no_vnni() -> None:
    warnings.warn("QuantConfig(activations='int8') needs AVX-512 VNNI on an AVX-512 CPU, "
                  "which this CPU lacks: "
                  "its kernel multiplies float32 activations instead", stacklevel=4)  # fmt: skip


def multiply_reduce(x_MK, q, scale, fmt):
    """`x . decode(q).T` [M, N] in one multiply-reduce fusion that reads each code once (XLA's
    decode-step path; compute-bound on CPUs, where `kernels.cpu_qmatvec` replaces it)."""
    m = x_MK.shape[0]
    # A single row is padded to two: XLA rewrites a one-row multiply-reduce into a dot on a float
    # copy of the weight.
    xp = jnp.pad(x_MK, ((0, 1), (0, 0))) if m == 1 else x_MK
    per_row = fmt == "int8" and scale.shape[-1] == 1
    v = q.astype(jnp.float32) if per_row else decode(q, scale, fmt, jnp.float32)
    y = jnp.sum(xp.astype(jnp.float32)[:, None, :] * v[None], axis=-1)[:m]
    return y * scale[:, 0] if per_row else y  # per row: one scale per output, after the sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _cpu_rows(x_MK, q, scale, fmt, act):
    """`x . decode(q).T` [M, N] for a decode step or a short prefill: the fused C++ kernel on
    CPUs (`kernels.cpu_qmatvec`, with `act` activations), elsewhere what `contract` runs
    without it, on `x` as it is (one program lowers for every platform). Its gradient wrt x is
    that XLA path's (float32 x, whatever `act`); the frozen codes get none. Reverse mode only: a
    `custom_vjp` has no forward-mode (`jax.jvp`) rule."""
    return jax.lax.platform_dependent(
        x_MK, q, scale,
        cpu=lambda x, q, s: cpu_qmatvec.qmatvec(x.astype(jnp.float32), q, s, fmt, act),
        default=lambda x, q, s: _xla_product(x, q, s, fmt),
    )  # fmt: skip


def _xla_product(x_MK, q, scale, fmt):
    if x_MK.shape[0] <= SMALL_ROWS:
        return multiply_reduce(x_MK, q, scale, fmt)
    return dequantized_dot(x_MK, q, scale, fmt)


def _cpu_rows_fwd(x_MK, q, scale, fmt, act):
    return _cpu_rows(x_MK, q, scale, fmt, act), (x_MK, q, scale)


def _cpu_rows_bwd(fmt, act, res, g_MN):
    x_MK, q, scale = res
    _, vjp = jax.vjp(lambda x: _xla_product(x, q, scale, fmt), x_MK)
    return (*vjp(g_MN), None, None)


_cpu_rows.defvjp(_cpu_rows_fwd, _cpu_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gpu_rows(x_MK, q, scale, fmt):
    """`x . decode(q).T` [M, N] for a decode step on a GPU: the Pallas kernel
    (`kernels.gpu_qmatvec`) there, XLA's path elsewhere; its gradient wrt x is XLA's path's."""
    return jax.lax.platform_dependent(
        x_MK, q, scale,
        cuda=lambda x, q, s: gpu_qmatvec.qmatvec(x, q, s, fmt),
        default=lambda x, q, s: _xla_product(x, q, s, fmt),
    )  # fmt: skip


_gpu_rows.defvjp(
    lambda x, q, s, fmt: (_gpu_rows(x, q, s, fmt), (x, q, s)),
    lambda fmt, res, g: _cpu_rows_bwd(fmt, "float32", res, g),
)


# Rematerialized under autodiff: the backward pass decodes the weight again instead of keeping
# its float copy as a residual (which, stacked over a layer scan, would be the whole float base).
@functools.partial(jax.checkpoint, static_argnums=(3,))
def _dot_decoded(x_MK, q, scale, fmt):
    v_NK = decode(q, scale, fmt, x_MK.dtype)
    return jnp.einsum("mk,nk->mn", x_MK, v_NK, preferred_element_type=jnp.float32)


def dequantized_dot(x_MK, q, scale, fmt):
    """`x @ decode(q).T` [M, N]. A weight whose float copy would pass `CHUNK_BYTES` (the
    vocabulary matrix) is decoded CHUNK_BYTES at a time under a `lax.map` over output rows, so
    its float copy never exists whole, forward or backward."""
    n = q.shape[-2]
    chunks = next(
        (c for c in range(1, n + 1) if n % c == 0 and (n // c) * x_MK.shape[-1] * 4 <= CHUNK_BYTES),
        n,
    )
    if chunks == 1:
        return _dot_decoded(x_MK, q, scale, fmt)
    qc = q.reshape(chunks, n // chunks, q.shape[-1])
    sc = scale.reshape(chunks, n // chunks, scale.shape[-1])
    y_CMn = jax.lax.map(lambda qs: _dot_decoded(x_MK, *qs, fmt), (qc, sc))
    return jnp.moveaxis(y_CMn, 0, 1).reshape(x_MK.shape[0], n)
