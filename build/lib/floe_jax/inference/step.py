"""The jitted fused decode step: edge forward, alignment, router, fusion and sampling.

Shapes: B batch (padded to a batch bucket), V edge vocab, W cloud vocab, K listed cloud tokens,
L layers, I/O a projection's input/output width, R LoRA rank.

`fused_step` is one compiled program: the edge forward of the last token with its KV cache and
LoRA (`floe_jax.decode.advance`; one adapter per row: a stacked `LoRA` is laid out layer-major
once by `rows_lora` and each row adds its own low-rank update to the shared base matmul,
`lora.lora_delta`), alignment of the cloud distribution already fetched (`CloudInput`), the
router, fusion, and `floe_jax.decode.append_token`. Batch, prompt length, cloud shape and adapter
ranks are fixed per bucket, so steps and clients never recompile. Its two halves, `advance` and
`fuse_sample`, also run as separate programs, so a host loop can overlap the cloud wait with the
edge forward (JAX dispatch is asynchronous); `fused_step` is exactly their composition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from floe_jax.config import ModelConfig
from floe_jax.decode import DecodeState, SamplingConfig, advance, append_token
from floe_jax.inference.align import align_dense, align_sparse
from floe_jax.inference.replies import CloudInput
from floe_jax.inference.router import FusionConfig, edge_weight, fuse, proxy_tuning
from floe_jax.lora import LoRA

_FUSION = FusionConfig()
_GREEDY = SamplingConfig()


def rows_lora(lora: LoRA) -> LoRA:
    """A stacked adapter (leading row axis B: one client per batch row) in the layer-major layout
    the model's per-row LoRA path reads: `a [L, B, I, R]`, `b [L, B, R, O]`, `mask [L, B, R]`,
    `scale [B]`. Done once per generation, outside the step."""
    if lora.scale.ndim != 1:
        raise ValueError("rows_lora needs a stacked LoRA (scale of shape [B])")
    t = lambda x: jnp.swapaxes(x, 0, 1)
    return LoRA(
        a={m: t(v) for m, v in lora.a.items()},
        b={m: t(v) for m, v in lora.b.items()},
        mask={m: t(v) for m, v in lora.mask.items()},
        scale=lora.scale,
    )


def aligned_cloud(cloud: CloudInput, logp_e_BV, fusion: FusionConfig) -> jax.Array:
    """The cloud's log-probs on the edge vocabulary [B, V]."""
    V = logp_e_BV.shape[-1]
    if cloud.is_dense:
        c2e = cloud.c2e if cloud.c2e.shape[0] > 0 else None
        return align_dense(cloud.dense, c2e, V)
    return align_sparse(
        cloud.ids, cloud.logp, cloud.valid, V, tail=fusion.align.tail, edge_logp_BV=logp_e_BV
    )


def fused_logp(
    logits_BV: jax.Array,
    cloud: CloudInput,
    fusion: FusionConfig,
    base_logits_BV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(edge log-probs [B, V], fused log-probs [B, V], edge weight w [B]) of one position: the
    alignment, the router and the fusion (the edge alone where `cloud.ok` is False)."""
    logp_e = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    logp_c = aligned_cloud(cloud, logp_e, fusion)
    logp_c = jnp.where(cloud.ok[:, None], logp_c, logp_e)  # never let a missing row leak
    w = edge_weight(logp_e, logp_c, cloud.ok, fusion)
    if fusion.gate == "proxy":
        if base_logits_BV is None:
            raise ValueError('gate="proxy" needs the edge base logits (base_logits_BV)')
        base = jax.nn.log_softmax(base_logits_BV.astype(jnp.float32), axis=-1)
        fused = jnp.where(cloud.ok[:, None], proxy_tuning(logp_c, logp_e, base), logp_e)
    else:
        fused = fuse(logp_e, logp_c, w, fusion.space)
    return logp_e, fused, w


def fuse_sample(
    state: DecodeState,
    logits_BV: jax.Array,
    cloud: CloudInput,
    *,
    fusion: FusionConfig,
    sampling: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    base_logits_BV: jax.Array | None = None,
) -> tuple[DecodeState, dict]:
    """Aligns, routes, fuses and samples token `state.step`. Returns (state, {"w": [B]}).

    `base_logits_BV`: the edge base model's logits (no adapters), for `fusion.gate="proxy"`.
    """
    with jax.named_scope("fuse"):
        _, fused, w = fused_logp(logits_BV, cloud, fusion, base_logits_BV)
    state = append_token(state, fused, sampling=sampling, eos_id=eos_id, pad_id=pad_id)
    return state, {"w": w}


def fused_step(
    params,
    state: DecodeState,
    cloud: CloudInput,
    cfg: ModelConfig,
    *,
    fusion: FusionConfig = _FUSION,
    sampling: SamplingConfig = _GREEDY,
    lora: LoRA | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> tuple[DecodeState, dict]:
    """One fused decode step: `advance` (edge forward of `state.token`), then `fuse_sample`.

    `lora` is None, one adapter for every row, or per-row adapters in the `rows_lora` layout.
    """
    state, logits = advance(params, state, cfg, lora=lora)
    return fuse_sample(
        state, logits, cloud, fusion=fusion, sampling=sampling, eos_id=eos_id, pad_id=pad_id
    )


_FUSE_STATIC = ("fusion", "sampling", "eos_id", "pad_id")
fuse_sample_jit = jax.jit(fuse_sample, static_argnames=_FUSE_STATIC, donate_argnames=("state",))
fused_step_jit = jax.jit(
    fused_step, static_argnames=("cfg", *_FUSE_STATIC), donate_argnames=("state",)
)
