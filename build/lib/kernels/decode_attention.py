"""Decode attention that reads only the filled part of a KV cache.

A decode step (one new token per row) attends to a static-shape cache of S slots, of which only
the first `n_filled` have been written. `reference` is what `floe_jax.model.attention` computes
for such a step: it scores all S slots and masks the unwritten ones, so its cost follows the
cache's length, not the text's. The Pallas kernel walks the cache in blocks of `block` slots and
stops after the last filled block, with an online softmax (flash decoding, one program per row
of the merged batch·KV-head axis). `decode_attention` dispatches between them on an `impl`
argument (the model passes `ModelConfig.attention_impl`); nothing here reads the environment.

A sliding-window layer's cache is a ring buffer of `window` slots (`floe_jax.kv_cache`): with
`window` set, `n_filled` counts the sequence slots written so far and the kernel reads the
min(n_filled, window) ring slots that hold them. Scores scale by `scale` (Gemma's
`query_pre_attn_scalar ** -0.5`), or by `1 / sqrt(K)` when it is None.

Shapes: X = B·N (batch and KV heads merged, as `floe_jax.model.KVCache` stores them), G query
heads per KV head, S cache slots, K head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from floe_jax.config import ATTENTION_IMPLS as IMPLS

# Finite "minus infinity" for masked scores (floe_jax.model's attention uses it too): a fully
# masked (padding) query row stays finite.
NEG = -1e30


def reference(q_XGK, k_XSK, v_XSK, mask_BS, *, scale=None) -> jax.Array:
    """Plain-jnp decode attention: softmax(q·kᵀ·scale, masked) · v over all S slots (the
    window, if any, is in the mask); [X, G, K].

    Per query head one matrix-vector product over the cached keys: XLA turns the batched
    [G, K] x [S, K]ᵀ product into a slower transposed-operand matmul (`bench decode`).
    """
    X, G, K = q_XGK.shape
    B, S = mask_BS.shape
    s_XGS = jnp.stack(
        [
            jnp.einsum("xsk,xk->xs", k_XSK, q_XGK[:, g], preferred_element_type=jnp.float32)
            for g in range(G)
        ],
        axis=1,
    )
    s = s_XGS.reshape(B, X // B, G, S)
    s = s / math.sqrt(K) if scale is None else s * scale
    s = jnp.where(mask_BS[:, None, None], s, NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v_XSK.dtype).reshape(X, G, S)
    o = jnp.einsum("xgs,xsk->xgk", p, v_XSK, preferred_element_type=jnp.float32)
    return o.astype(q_XGK.dtype)


def _kernel(n_ref, q_ref, k_ref, v_ref, m_ref, o_ref, *, block: int, scale: float | None):
    """One row x: q_ref [G, K], k_ref/v_ref [S, K], m_ref [S] (int32 0/1), n_ref [1]."""
    G, K = q_ref.shape
    q = q_ref[...].astype(jnp.float32) * (1.0 / math.sqrt(K) if scale is None else scale)

    def body(j, carry):
        m_i, l_i, acc = carry
        at = pl.ds(pl.multiple_of(j * block, block), block)
        k = k_ref[at, :].astype(jnp.float32)
        v = v_ref[at, :].astype(jnp.float32)
        s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)  # [G, block]
        s = jnp.where(m_ref[at][None, :] != 0, s, NEG)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m_i - m_new)
        l_new = l_i * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[:, None] + jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
        return m_new, l_new, acc

    n_blocks = jnp.minimum((n_ref[0] + block - 1) // block, k_ref.shape[0] // block)
    init = (
        jnp.full((G,), NEG, jnp.float32),
        jnp.zeros((G,), jnp.float32),
        jnp.zeros((G, K), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def pallas(
    q_XGK, k_XSK, v_XSK, mask_BS, n_filled, *, block: int = 64, interpret: bool = False,
    scale: float | None = None, window: int | None = None,
):  # fmt: skip
    """The Pallas kernel: attends to slots [0, n_filled) only, in blocks of `block` (to the
    min(n_filled, window) filled slots of a ring buffer of `window` slots when it is set).

    Slots at or past `n_filled` must be masked out (they are in a decode step: unwritten slots
    are not valid). A row whose every slot is masked returns the mean of the values it visited,
    where `reference` averages all S slots: both are meaningless, neither is NaN.
    """
    X, G, K = q_XGK.shape
    B, S = mask_BS.shape
    if S % block or block & (block - 1) or K & (K - 1):
        raise ValueError(
            f"decode_attention kernel: cache [{S} slots, head dim {K}] with block {block}: "
            "the block and head dim must be powers of two and the block must divide the slots"
        )
    N = X // B
    Gp = 1 << max(G - 1, 0).bit_length()  # Triton blocks are powers of two; pad the query heads
    q = jnp.pad(q_XGK, ((0, 0), (0, Gp - G), (0, 0)))
    n = jnp.asarray(n_filled, jnp.int32).reshape(1)
    if window is not None:
        n = jnp.minimum(n, window)
    kernel = functools.partial(_kernel, block=block, scale=scale)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        params["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=1)
    o = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((X, Gp, K), q_XGK.dtype),
        grid=(X,),
        in_specs=[
            pl.BlockSpec((1,), lambda x: (0,)),
            pl.BlockSpec((None, Gp, K), lambda x: (x, 0, 0)),
            pl.BlockSpec((None, S, K), lambda x: (x, 0, 0)),
            pl.BlockSpec((None, S, K), lambda x: (x, 0, 0)),
            pl.BlockSpec((None, S), lambda x: (x // N, 0)),
        ],
        out_specs=pl.BlockSpec((None, Gp, K), lambda x: (x, 0, 0)),
        interpret=interpret,
        name="floe_decode_attention",
        **params,
    )(n, q, k_XSK, v_XSK, mask_BS.astype(jnp.int32))
    return o[:, :G]


def kernel_block(S: int, K: int) -> int | None:
    """The slot block the kernel uses for a cache of S slots and head dim K, or None.

    Triton tensors have power-of-two shapes and the kernel reads whole blocks, so K must be a
    power of two and S a multiple of the block (64 slots, or the largest power of two from 16 up
    that divides S).
    """
    if K & (K - 1) or K < 16:
        return None
    for block in (64, 32, 16):
        if S % block == 0:
            return block
    return None


def decode_attention(
    q_XGK, k_XSK, v_XSK, mask_BS, n_filled, *, impl: str = "reference", fallback: bool = False,
    scale: float | None = None, window: int | None = None,
):  # fmt: skip
    """Attention of one new token per row to a KV cache; [X, G, K].

    Args:
      q_XGK: queries, the G heads that share each of the X = B·N KV heads.
      k_XSK, v_XSK: the cache's keys and values for this layer.
      mask_BS: [B, S] bool, slot s may be attended by row b; false at and past `n_filled`.
      n_filled: [] int, slots written so far (the kernel reads no block past it).
      scale: the score scale; None is `1 / sqrt(K)`.
      window: None, or the size W of a ring buffer (`k_XSK` then has W slots, sequence slot a
        at a mod W): the kernel reads min(n_filled, W) slots; the mask says which are valid.
      impl: "reference" (plain jnp, every slot) or "pallas" (the kernel: on GPU through Triton,
        on CPU in Pallas' interpreter, for tests).
      fallback: what "pallas" does with shapes the kernel cannot take, or on a TPU (the kernel
        is written for Triton): False raises, True runs the reference. The model passes True: a
        config asks for the kernel wherever it applies.
    """
    if impl not in IMPLS:
        raise ValueError(f"decode_attention impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "reference":
        return reference(q_XGK, k_XSK, v_XSK, mask_BS, scale=scale)
    S, K = k_XSK.shape[1:]
    block = kernel_block(S, K)
    backend = jax.default_backend()
    if block is None or backend == "tpu":
        if not fallback:
            why = f"cache [{S} slots, head dim {K}]" if block is None else "a TPU backend"
            raise ValueError(
                f"decode_attention impl='pallas' cannot take {why}: the kernel needs a power-of-"
                "two head dim >= 16, a slot count divisible by 16, and a GPU (or the CPU "
                "interpreter); use impl='reference'"
            )
        return reference(q_XGK, k_XSK, v_XSK, mask_BS, scale=scale)
    return pallas(
        q_XGK, k_XSK, v_XSK, mask_BS, n_filled, block=block, interpret=backend == "cpu",
        scale=scale, window=window,
    )  # fmt: skip
