"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer") as the model families of
`floe_jax.model` use it, matching Hugging Face transformers' rotary embeddings (checked
against them in tests/test_hf.py and tests/test_families.py). Kept apart from the model because
the variants are a concept of their own: the frequencies are computed on the host from the
config, and the forward only selects them (longrope) and rotates by them.

Shape legend: B batch, T tokens, H heads, K head dim, R = `ModelConfig.rotary_dim` rotated dims.

Variants (`ModelConfig.rope_scaling`, a `RopeScaling`; `floe_jax.config.ROPE_TYPES`):

- `default`: `1 / theta^(2i / R)`.
- `linear`: every frequency divided by `factor` (Gemma 3's full-attention layers).
- `llama3` (Llama 3.1/3.2): low frequencies divided by `factor`, high ones kept, a smooth ramp
  between `low_freq_factor` and `high_freq_factor`.
- `longrope` (Phi-3.5, Phi-4-mini; Ding et al., 2024, "LongRoPE"): frequency i divided by
  `short_factor[i]` or `long_factor[i]`, cos and sin scaled by `attention_scaling`. As
  transformers' `dynamic_rope_update` does, one forward uses the short factors at every position
  while its largest position + 1 is at most `original_max_position_embeddings`, the long ones
  beyond (`longrope_inv_freq`); the model recomputes a cache built in the
  other regime (`floe_jax.model.hidden_states`).

YaRN and dynamic NTK scalings are not implemented; the config rejects them by name. Partial
rotary (Phi-4-mini's `partial_rotary_factor`) rotates the first R dims of each head and passes
the rest through. Per layer, sliding layers may use their own base (`rope_local_theta`,
unscaled: Gemma 3) and `nope_layers` no RoPE at all (SmolLM3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ModelConfig


def _inv_freq(k: int, theta: float, sc, long: bool = False) -> np.ndarray:
    """Inverse frequencies [k/2] of RoPE over k rotated dims with scaling `sc` (`long`: a
    `longrope` scaling's long factors, else its short ones)."""
    inv = 1.0 / (theta ** (np.arange(0, k, 2, dtype=np.float64) / k))
    if sc is None or sc.rope_type == "default":
        return inv.astype(np.float32)
    if sc.rope_type == "linear":
        return (inv / sc.factor).astype(np.float32)
    if sc.rope_type == "longrope":
        ext = np.asarray(sc.long_factor if long else sc.short_factor, np.float64)
        return (inv / ext).astype(np.float32)
    # llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    old = sc.original_max_position_embeddings
    low_wl, high_wl = old / sc.low_freq_factor, old / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / sc.factor, inv)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(cfg: ModelConfig, *, long: bool = False) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2] of full-attention layers, with the configured scaling
    (computed on the host; `long`: `longrope`'s long factors)."""
    return _inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, long)


def layer_inv_freq(cfg: ModelConfig, *, long: bool = False) -> tuple[np.ndarray | None, ...]:
    """Per layer, its RoPE inverse frequencies [rotary_dim/2], or None for a layer without RoPE
    (`nope_layers`). Sliding layers use `rope_local_theta`, unscaled, when it is set."""
    full = rope_inv_freq(cfg, long=long)
    local = None
    if cfg.rope_local_theta is not None:
        local = _inv_freq(cfg.rotary_dim, cfg.rope_local_theta, None)
    return tuple(
        None if i in cfg.nope_layers else (local if w is not None and local is not None else full)
        for i, w in enumerate(cfg.layer_windows)
    )


def longrope_inv_freq(
    cfg: ModelConfig, pos_BT: jax.Array, use_long: jax.Array | bool | None = None
) -> tuple[tuple[jax.Array | None, ...], jax.Array]:
    """(per layer, the frequencies a `longrope` forward at positions `pos_BT` rotates by, or None
    where no RoPE; whether they are the long ones, a traced bool). The long factors are used when
    the forward's largest position + 1 is past `original_max_position_embeddings`
    (`ModelConfig.rope_switches`), or as `use_long` says when it is given."""
    if use_long is None:
        use_long = jnp.max(pos_BT) + 1 > cfg.rope_scaling.original_max_position_embeddings
    else:
        use_long = jnp.asarray(use_long)
    short, long = layer_inv_freq(cfg), layer_inv_freq(cfg, long=True)
    freqs = tuple(
        None if f is None else jnp.where(use_long, lf, f) for f, lf in zip(short, long, strict=True)
    )
    return freqs, use_long


def rope_attention_scaling(cfg: ModelConfig) -> float:
    """The factor RoPE multiplies cos and sin by (1 except for `longrope`)."""
    return 1.0 if cfg.rope_scaling is None else cfg.rope_scaling.attention_scaling


def apply_rope(
    x_BTHK: jax.Array, pos_BT: jax.Array, inv_freq: jax.Array, scaling: float = 1.0
) -> jax.Array:
    """Rotary embedding, half-split convention (Hugging Face's `rotate_half`), of the first
    `2 * len(inv_freq)` dims of each head (all of them unless RoPE is partial); the rotated dims
    are multiplied by `scaling` (`rope_attention_scaling`), the others pass unchanged."""
    R = 2 * inv_freq.shape[-1]
    ang_BTk = pos_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    ang = jnp.concatenate([ang_BTk, ang_BTk], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    x32 = x_BTHK.astype(jnp.float32)
    x_rot, x_pass = x32[..., :R], x32[..., R:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * cos + rot * sin
    if R < x32.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out.astype(x_BTHK.dtype)
