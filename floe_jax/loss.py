"""The next-token loss every training path uses: federated local steps, centralized LoRA
fine-tuning, pretraining and the cost table's measured step.

Shapes: B batch, T tokens, V vocab.

It returns a sum and a count rather than a mean, so callers can pool it over rows, steps and
clients and divide once (a short client's padded rows then weigh nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from floe_jax.config import ModelConfig
from floe_jax.lora import LoRA
from floe_jax.model import forward


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
      cfg: model config.
    """
    logits_BTV = forward(params, tokens_BT, cfg, lora=lora, mask=mask_BT)[:, :-1]
    tgt_BT = tokens_BT[:, 1:]
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    tgt_logit_BT = jnp.take_along_axis(logits_BTV, tgt_BT[..., None], axis=-1)[..., 0]
    m = mask_BT.astype(jnp.float32)
    w_BT = m[:, :-1] * m[:, 1:] * loss_mask_BT[:, 1:].astype(jnp.float32)
    return jnp.sum((lse_BT - tgt_logit_BT) * w_BT), jnp.sum(w_BT)
