"""The next-token loss every training path uses: federated local steps, centralized LoRA
fine-tuning, pretraining and the cost table's measured step.

Shapes: B batch, T tokens, V vocab.

It returns a sum and a count rather than a mean, so callers can pool it over rows, steps and
clients and divide once (a short client's padded rows then weigh nothing).

With `ModelConfig.loss_chunk = k > 0` the vocabulary projection runs k tokens at a time: the
hidden states are computed once, then a `lax.scan` over chunks of the flattened B·(T-1)
predicting positions forms each chunk's float32 logits, its logsumexp and target logit, and
keeps only the two [k] results. The chunk body is `jax.checkpoint`ed, so the backward pass
recomputes a chunk's logits instead of storing every chunk's: at most [k, V] logits are live in
either pass (the unchunked loss holds [B, T-1, V] and its gradient). At V = 152k this is the
largest activation of a small model's training step (`tests/test_memory.py` measures it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from floe_jax.config import ModelConfig
from floe_jax.lora import LoRA
from floe_jax.model import forward, hidden_states, lm_head


def token_loss(
    params: dict,
    lora: LoRA | None,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    loss_mask_BT: jax.Array,
    *,
    cfg: ModelConfig,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and its token count (both float32 []).

    Target t+1 counts when it is real, a training target, and predicted from a real position t.
    Masked tokens still shape the context of later tokens through attention (as in training with
    a prompt), they only carry no loss.

    Args:
      params: base params.
      lora: adapters, or None.
      tokens_BT: int32 [B, T].
      mask_BT: [B, T] 1 for real tokens, 0 for padding.
      loss_mask_BT: [B, T] 1 where the token is a training target (all ones in pretraining, the
        response in instruction tuning).
      cfg: model config (`cfg.loss_chunk` > 0: the chunked projection of the module docstring).
    """
    m = mask_BT.astype(jnp.float32)
    w_BT = m[:, :-1] * m[:, 1:] * loss_mask_BT[:, 1:].astype(jnp.float32)
    if cfg.loss_chunk > 0:
        return _chunked_loss(params, lora, tokens_BT, mask_BT, w_BT, cfg=cfg)
    logits_BTV = forward(params, tokens_BT, cfg, lora=lora, mask=mask_BT)[:, :-1]
    tgt_BT = tokens_BT[:, 1:]
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    tgt_logit_BT = jnp.take_along_axis(logits_BTV, tgt_BT[..., None], axis=-1)[..., 0]
    return jnp.sum((lse_BT - tgt_logit_BT) * w_BT), jnp.sum(w_BT)


def _chunked_loss(params, lora, tokens_BT, mask_BT, w_BT, *, cfg):
    """`token_loss` with the vocabulary projection in chunks of `cfg.loss_chunk` tokens (module
    docstring). The B·(T-1) predicting positions are padded with zero-weight rows to a multiple
    of the chunk."""
    x_BTD, _ = hidden_states(params, tokens_BT, cfg, lora=lora, mask=mask_BT)
    B, T, D = x_BTD.shape
    n = B * (T - 1)
    k = min(cfg.loss_chunk, n)
    n_chunks = -(-n // k)
    pad = n_chunks * k - n
    flat = lambda a: jnp.pad(a.reshape(n, *a.shape[2:]), [(0, pad)] + [(0, 0)] * (a.ndim - 2))
    x_NKD = flat(x_BTD[:, :-1]).reshape(n_chunks, k, D)
    tgt_NK = flat(tokens_BT[:, 1:]).reshape(n_chunks, k)
    w_NK = flat(w_BT).reshape(n_chunks, k)

    @jax.checkpoint
    def chunk(x_KD, tgt_K, w_K):
        logits_KV = lm_head(params, x_KD[None], cfg)[0]
        lse_K = jax.nn.logsumexp(logits_KV, axis=-1)
        tgt_logit_K = jnp.take_along_axis(logits_KV, tgt_K[:, None], axis=-1)[:, 0]
        return jnp.sum((lse_K - tgt_logit_K) * w_K)

    def body(total, xs):
        return total + chunk(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x_NKD, tgt_NK, w_NK))
    return total, jnp.sum(w_BT)
