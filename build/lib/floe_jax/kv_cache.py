"""The KV cache of `floe_jax.model`: one static-shape buffer per layer, and ring buffers of W
slots for sliding-window layers (Beltagy et al., 2020, "Longformer"; Jiang et al., 2023,
"Mistral 7B": a rolling buffer cache), so such a layer's memory and decode reads follow its
window, not the text.

Shapes: B batch, T new tokens, X = B·N (batch and KV heads merged), S cache slots, W window,
K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from floe_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    """Static-shape KV cache shared by a left-padded batch.

    Attributes:
      k, v: a tuple of L buffers, one per layer, each [B·N, S_l, K]: keys and values by slot, the
        batch and KV-head axes merged (row b·N + n), so attention reads a layer's buffer as its
        batched matmul wants it, with no reshape. One buffer per layer lets a decode step write
        its slot in place and attend to the buffer itself: slicing a layer out of a stacked
        [L, ...] cache makes XLA copy that layer's whole cache every step. S_l = S, except for a
        sliding-window layer whose window W is shorter than S: it keeps a ring buffer of W
        slots, sequence slot a at ring slot a mod W, since it never looks further back.
      valid: [B, S] bool, slot holds a real (non-padding) token.
      index: [] int32, next slot to write (the same for every row: rows are left-padded).
      pos: [B] int32, position id of each row's next real token.
      tokens: [B, S] int32, the token at each slot, and rope_long: [] bool, whether the keys
        were computed with `longrope`'s long factors; kept only for a config whose RoPE depends
        on the sequence length (`ModelConfig.rope_switches`), whose cache is recomputed from its
        tokens when a forward changes regime. None otherwise.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    pos: jax.Array
    tokens: jax.Array | None = None
    rope_long: jax.Array | None = None

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def ring_window(window: int | None, max_len: int) -> int | None:
    """The ring size of a layer with sliding window `window` in a cache of `max_len` slots, or
    None when the layer keeps a buffer of every slot (full attention, or a window that a cache
    this short never reaches)."""
    return window if window is not None and window < max_len else None


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots (ring buffers of W slots for layers whose sliding
    window W is shorter)."""
    dtype = jnp.dtype(dtype or cfg.dtype)

    def buffers():
        return tuple(
            jnp.zeros(
                (batch * cfg.kv_heads, ring_window(w, max_len) or max_len, cfg.dim_head), dtype
            )
            for w in cfg.layer_windows
        )

    switches = cfg.rope_switches
    return KVCache(
        k=buffers(),
        v=buffers(),
        valid=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
        pos=jnp.zeros((batch,), jnp.int32),
        tokens=jnp.zeros((batch, max_len), jnp.int32) if switches else None,
        rope_long=jnp.zeros((), bool) if switches else None,
    )


def write_cache(buf_XSK, new_XTK, write_at, ring):
    """(buffer after writing the T new rows at `write_at`, the keys attention reads).

    A full buffer is written in place and read whole. A ring buffer of W slots: one new row goes
    to slot `write_at mod W` and the ring is read (it then holds the last W slots); several rows
    are read after the ring as it was (see `ring_mask`), and the last min(T, W) are written.
    """
    T = new_XTK.shape[1]
    new = new_XTK.astype(buf_XSK.dtype)
    if ring is None or T == 1:
        at = write_at if ring is None else write_at % buf_XSK.shape[1]
        out = jax.lax.dynamic_update_slice(buf_XSK, new, (0, at, 0))
        return out, out
    W = buf_XSK.shape[1]
    m = min(T, W)
    slots = (write_at + T - m + jnp.arange(m)) % W
    return buf_XSK.at[:, slots].set(new[:, T - m :]), jnp.concatenate([buf_XSK, new], axis=1)


def ring_mask(valid_BS, index, T, W):
    """Which keys T new tokens (sequence slots index..index+T-1) attend in a ring of W slots:
    [B, 1, W] over the ring after the step's write (T == 1), else [B, T, W + T] over the ring
    before the write followed by the T new keys (`write_cache`'s read order)."""
    j = jnp.arange(W)
    if T == 1:
        slot = index - jnp.mod(index - j, W)  # the sequence slot each ring slot holds
    else:
        last = index - 1
        slot = jnp.concatenate([last - jnp.mod(last - j, W), index + jnp.arange(T)])
    q = index + jnp.arange(T)
    key_ok = jnp.take(valid_BS, jnp.maximum(slot, 0), axis=1) & (slot >= 0)
    window = (slot[None, :] <= q[:, None]) & (slot[None, :] > q[:, None] - W)
    return key_ok[:, None, :] & window[None]
