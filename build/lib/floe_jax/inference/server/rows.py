"""Row surgery on a running cohort's decode state, for continuous batching
(`floe_jax.inference.server.engine`): `splice_rows` puts freshly prefilled rows into a running
cache at its write slot, `resize_rows` grows, compacts or reorders a cohort's rows. Both are
jitted; shapes: B cohort rows, S cache slots, J joining rows, P their prompt bucket, N KV heads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from floe_jax.decode import DecodeState
from floe_jax.kv_cache import KVCache


def _row_slots(rows_J: jax.Array, N: int) -> jax.Array:
    """Cache rows [J * N] of batch rows `rows_J` (row b's KV heads are b * N .. b * N + N - 1)."""
    return (rows_J[:, None] * N + jnp.arange(N)).reshape(-1)


@jax.jit
def splice_rows(cache: KVCache, new: KVCache, rows_J: jax.Array, at: jax.Array) -> KVCache:
    """Puts the J freshly prefilled rows of `new` (P slots: a prompt bucket) into rows `rows_J`
    of a running cohort's cache whose next write slot is `at` (>= P): sequence slot a of `new`
    goes to slot `at - P + a`, so the row's next token is written at `at` with the cohort's.
    Its slots before `at - P` are marked invalid (masked out), its position id is `new`'s.
    A ring buffer (sliding-window layer, `floe_jax.kv_cache`) on either side maps slots modulo
    its size. Rows equal to B (batch padding of the joiners) are dropped."""
    B, S = cache.valid.shape
    J, P = new.valid.shape
    N = cache.k[0].shape[0] // B
    xrows = _row_slots(rows_J, N)

    def put(buf, nb):
        r = jnp.arange(nb.shape[1])
        # the sequence slot of `new` each of its buffer slots holds (the last W of P in a ring)
        a_new = r if nb.shape[1] == P else (P - 1) - jnp.mod(P - 1 - r, nb.shape[1])
        a = a_new + at - P
        dst = a if buf.shape[1] == S else jnp.mod(a, buf.shape[1])
        return buf.at[xrows[:, None], dst[None, :]].set(nb.astype(buf.dtype), mode="drop")

    if cache.tokens is not None or new.tokens is not None:
        # each row's keys were computed in its own forward's RoPE regime (`rope_long`): one
        # cache of rows joined at different lengths holds no single regime to recompute from
        raise ValueError(
            "splice_rows cannot join rows into a cache whose RoPE switches with the sequence "
            "length (longrope, ModelConfig.rope_switches): serve such a model without joins"
        )
    valid_JS = jax.lax.dynamic_update_slice(jnp.zeros((J, S), bool), new.valid, (0, at - P))
    return KVCache(
        k=tuple(put(b, n) for b, n in zip(cache.k, new.k, strict=True)),
        v=tuple(put(b, n) for b, n in zip(cache.v, new.v, strict=True)),
        valid=cache.valid.at[rows_J].set(valid_JS, mode="drop"),
        index=cache.index,
        pos=cache.pos.at[rows_J].set(new.pos, mode="drop"),
    )


@functools.partial(jax.jit, static_argnames=("rows",))
def resize_rows(state: DecodeState, rows: int, keep_R: jax.Array | None = None) -> DecodeState:
    """A cohort's state with `rows` batch rows: the rows `keep_R` ([rows] indices; padding
    indices past the old B give empty rows) or, when None, the old rows first and empty rows
    after them (growth). Empty rows hold no valid slot."""
    B = state.cache.valid.shape[0]
    N = state.cache.k[0].shape[0] // B
    if keep_R is None:
        keep_R = jnp.arange(rows)
    xrows = _row_slots(keep_R, N)

    def take(x, idx):
        return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)

    cache = state.cache
    cache = KVCache(
        k=tuple(take(b, xrows) for b in cache.k),
        v=tuple(take(b, xrows) for b in cache.v),
        valid=jnp.take(cache.valid, keep_R, axis=0, mode="fill", fill_value=False),
        index=cache.index,
        pos=take(cache.pos, keep_R),
        tokens=None if cache.tokens is None else take(cache.tokens, keep_R),
        rope_long=cache.rope_long,
    )
    return dataclasses.replace(state, cache=cache, token=take(state.token, keep_R),
                               out=take(state.out, keep_R),
                               done=jnp.take(state.done, keep_R, axis=0, mode="fill",
                                             fill_value=True))  # fmt: skip
