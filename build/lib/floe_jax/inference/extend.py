"""KV-cache operations of speculative decoding: feed several tokens at once, and take drafted
tokens back.

Shapes: B batch, T tokens fed at once, V vocab.

`extend` feeds a drafted continuation (or a cloud's proposal) in one forward; `rewind` drops the
drafted slots a row did not keep, per row, by marking them invalid (rows of one batch may keep
different numbers of tokens; the write index goes back to the row that kept the most). Both are
used by the edge (`floe_jax.inference.speculative`) and by `LocalCloud`, which scores a draft on
its stream's cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from floe_jax.config import ModelConfig
from floe_jax.decode import DecodeState
from floe_jax.kv_cache import ring_window
from floe_jax.lora import LoRA
from floe_jax.model import forward


def rewindable(cfg: ModelConfig, max_len: int) -> bool:
    """Whether a cache of `max_len` slots can be rewound: no layer keeps a ring buffer."""
    return all(ring_window(w, max_len) is None for w in cfg.layer_windows)


def extend(
    params, state: DecodeState, tokens_BT: jax.Array, mask_BT: jax.Array, cfg: ModelConfig, *,
    lora: LoRA | None = None,
) -> tuple[DecodeState, jax.Array]:  # fmt: skip
    """Feeds T tokens in one forward: (state, logits [B, T, V], position t the next-token logits
    after token t). Slots of mask-0 tokens (padding at the end) are written but never attended;
    `rewind` them away."""
    logits, cache = forward(params, tokens_BT, cfg, lora=lora, cache=state.cache, mask=mask_BT)
    return dataclasses.replace(state, cache=cache), logits


def rewind(state: DecodeState, keep_B: jax.Array, last: jax.Array) -> DecodeState:
    """Of the cache's `last` most recent slots, row b keeps the first `keep_B[b]`; the others
    become invalid (never attended), its position ids go back by the tokens dropped, and the
    write index goes back to the row that kept the most. Not for ring-buffer (sliding-window)
    caches, whose overwritten slots cannot come back."""
    c = state.cache
    start = c.index - last
    slot = jnp.arange(c.max_len)[None, :]
    drop = (slot >= start + keep_B[:, None]) & (slot < c.index)
    dropped = jnp.sum(c.valid & drop, axis=1).astype(c.pos.dtype)
    cache = dataclasses.replace(
        c, valid=c.valid & ~drop, index=start + jnp.max(keep_B), pos=c.pos - dropped
    )
    return dataclasses.replace(state, cache=cache)


extend_jit = jax.jit(extend, static_argnames=("cfg",), donate_argnames=("state",))
rewind_jit = jax.jit(rewind, donate_argnames=("state",))
