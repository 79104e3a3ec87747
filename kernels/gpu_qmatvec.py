"""A dequantize-matvec for int8 and int4 bases on GPUs, as a Pallas (Triton) kernel.

On a GPU a decode step's quantized matmuls otherwise run XLA's multiply-reduce
(`floe_jax.qmatmul.multiply_reduce`): it reads each code once, but `bench qmatvec` measured it on
an H200 at a quarter (int8) and a tenth (int4) of the rate XLA's float32 dot reads its weights.
Here each program takes `block_n` weight rows and every row of x (at most `MAX_ROWS`), walks K
one chunk at a time (a weight group, or 128 inputs when there is one scale per row), decodes the
chunk's codes in registers, multiply-adds them against x in float32 and scales the chunk's sum by
its group's scale. 4-bit codes are read as stored (element 2j in the low nibble of byte j, 2j+1 in
the high one) against x split into its even and odd inputs. Results equal the
dequantize-then-float reference up to summation order.

`qmatvec` runs on a GPU through Triton and, with `interpret=True`, in Pallas' interpreter on any
backend (the tests); `block_n` says which shapes it takes (Triton's blocks are powers of two).
Under `vmap` over clients that share a base the call goes through `pallas_call`'s batching, which
runs the kernel once per client (each reading the weights), where the CPU kernel folds the
clients into its rows; not measured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

FORMATS = ("int8", "int4")
MAX_ROWS = 8  # rows of x: a decode step's batch; wider inputs are XLA's dot's
# Elements of one chunk's product [rows, block_n, chunk] held per program (registers).
_PRODUCT = 16384


def _chunk(k: int, groups: int, fmt: str) -> int | None:
    """Inputs per chunk: the group (one scale per chunk), or 128 with one scale per row."""
    chunk = k // groups if groups > 1 else 128
    ok = chunk >= 32 and chunk & (chunk - 1) == 0 and k % chunk == 0
    return chunk if ok and (fmt != "int4" or chunk >= 64) else None


def _rows(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def block_n(m: int, n: int, k: int, groups: int, fmt: str) -> int | None:
    """Weight rows per program for an [m, k] x [n, k]ᵀ product, or None if the kernel cannot
    take it: at most `MAX_ROWS` rows of x, an int8/int4 format, chunks a power of two that
    divide K, and N a multiple of the block (16 to 64 rows: the largest that still gives 256
    programs, two per streaming multiprocessor of a large GPU, and keeps a chunk's product
    within `_PRODUCT` elements where 16 rows allow it)."""
    chunk = _chunk(k, groups, fmt) if fmt in FORMATS else None
    if chunk is None or m > MAX_ROWS:
        return None
    cap = max(16, _PRODUCT // (_rows(m) * chunk))
    fits = [b for b in (64, 32, 16) if b <= cap and n % b == 0]
    return next((b for b in fits if n // b >= 256), fits[-1] if fits else None)


def _kernel(xa_ref, xb_ref, q_ref, s_ref, o_ref, *, fmt: str, chunk: int, per_row: bool):
    """One block of weight rows. xa_ref/xb_ref [Mp, K'] (int8: x and unused; int4: x's even and
    odd inputs, K' = K/2), q_ref [bn, K'] codes, s_ref [bn, G] scales, o_ref [Mp, bn]."""
    step = chunk if fmt == "int8" else chunk // 2  # code columns per chunk
    n_chunks = q_ref.shape[1] // step

    def body(j, acc):
        at = pl.ds(pl.multiple_of(j * step, step), step)
        q = q_ref[:, at]
        if fmt == "int8":
            w = q.astype(jnp.float32)
            part = jnp.sum(xa_ref[:, at][:, None, :] * w[None], axis=-1)
        else:
            c = q.astype(jnp.int32)
            lo = (c & 15).astype(jnp.float32) - 8.0
            hi = (c >> 4).astype(jnp.float32) - 8.0
            xa, xb = xa_ref[:, at][:, None, :], xb_ref[:, at][:, None, :]
            part = jnp.sum(xa * lo[None] + xb * hi[None], axis=-1)
        if per_row:
            return acc + part
        return acc + part * s_ref[:, pl.ds(j, 1)][:, 0][None, :]

    acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(o_ref.shape, jnp.float32))
    if per_row:
        acc = acc * s_ref[:, pl.ds(0, 1)][:, 0][None, :]
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("fmt", "interpret"))
def qmatvec(x_MK, q, scale, fmt: str, *, interpret: bool = False) -> jax.Array:
    """`x [M, K] . decode(q, scale)^T` -> float32 [M, N] for `floe_jax.quant`'s int8 codes
    (q int8 [N, K]) and int4 codes (q uint8 [N, K/2]), scale [N, G].

    Raises:
      ValueError: a shape or format the kernel does not take (`block_n` is None), naming it.
    """
    m, k = x_MK.shape
    n, g = scale.shape
    bn = block_n(m, n, k, g, fmt)
    if bn is None:
        raise ValueError(
            f"gpu_qmatvec: x [{m}, {k}] with {fmt} codes {tuple(q.shape)} and {g} scale groups "
            f"is not a shape the kernel takes (formats {FORMATS}, at most {MAX_ROWS} rows, groups "
            "a power of two from 32 (64 for int4) or K a multiple of 128, N a multiple of 16)"
        )
    chunk = _chunk(k, g, fmt)
    mp = _rows(m)
    x = jnp.pad(x_MK.astype(jnp.float32), ((0, mp - m), (0, 0)))
    xa, xb = (x, x[:, :1]) if fmt == "int8" else (x[:, 0::2], x[:, 1::2])
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        params["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=2)
    y = pl.pallas_call(
        functools.partial(_kernel, fmt=fmt, chunk=chunk, per_row=g == 1),
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
        grid=(n // bn,),
        in_specs=[
            pl.BlockSpec(xa.shape, lambda i: (0, 0)),
            pl.BlockSpec(xb.shape, lambda i: (0, 0)),
            pl.BlockSpec((bn, q.shape[1]), lambda i: (i, 0)),
            pl.BlockSpec((bn, g), lambda i: (i, 0)),
        ],
        out_specs=pl.BlockSpec((mp, bn), lambda i: (0, i)),
        interpret=interpret,
        name=f"floe_gpu_qmatvec_{fmt}",
        **params,
    )(xa, xb, q, scale)
    return y[:m]
