"""Decoder-only transformer of the Llama, Qwen2/3, Mistral, Gemma 3, Phi-3 and SmolLM3 families
as pure functions: one model, whose `ModelConfig` fields switch on each family's differences.

Shape legend: B batch, T new tokens, S key slots (cache length, or T without a cache), D model
width, H query heads, N key/value heads, G = H // N query heads per KV head, K head dim, F ffn
width, V vocab, L layers, R LoRA rank.

Params are a nested dict of arrays; every per-layer leaf has a leading L axis so the layers run
under one `jax.lax.scan`:

    embed [V, D]; norm [D]; lm_head [D, V] (absent when embeddings are tied)
    layers: input_norm [L, D], post_norm [L, D] (the norm before the MLP),
            q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj: {"w": [L, I, O], "b": [L, O]?}
            q_norm, k_norm [L, K] (with `qk_norm`);
            attn_out_norm, mlp_out_norm [L, D] (with `sandwich_norms`)

`floe_jax.params` holds the layout's functions (re-exported here). `fuse_projections`
(applied by `unstack_layers`, the decode layout) replaces q/k/v and gate/up by
`"q_proj+k_proj+v_proj"` and `"gate_proj+up_proj"` entries with weights concatenated on the
output axis; `forward` accepts either form, and `stack_layers` turns it back into the canonical
layout (`save_hf` does so itself).

Linear weights are stored `[in, out]` (transposed from PyTorch). Any weight, `embed` and `lm_head`
may instead be a `floe_jax.quant.QuantizedTensor` (`floe_jax.quant.quantize`): the matmuls then
dequantize inside the compiled step. Left-padded batches are handled
with a token mask: position ids count real tokens only, and keys at padded slots are masked out,
so a left-padded row gives the same logits as the unpadded example.

Sliding-window layers (`ModelConfig.layer_windows`) see their last W slots only; their KV cache is
a ring buffer of W slots when the cache is longer than that (see `KVCache`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ModelConfig
from floe_jax.kv_cache import KVCache, ring_mask, ring_window, write_cache
from floe_jax.kv_cache import init_cache as init_cache  # its old home: `from floe_jax.model`
from floe_jax.lora import LoRA, lora_delta
from floe_jax.params import (  # the parameter layout; `from floe_jax.model` is its public home
    FUSED_GROUPS as FUSED_GROUPS,
)
from floe_jax.params import fuse_projections as fuse_projections
from floe_jax.params import init_params as init_params
from floe_jax.params import norm_shapes as norm_shapes
from floe_jax.params import param_shapes as param_shapes
from floe_jax.params import stack_layers as stack_layers
from floe_jax.params import unstack_layers as unstack_layers
from floe_jax.quant import is_quantized, linear, linear_t, take_rows
from floe_jax.rope import apply_rope, layer_inv_freq, longrope_inv_freq, rope_attention_scaling
from kernels.decode_attention import NEG, decode_attention

# Stacks of at most this many layers are unrolled inside the layer scan: each layer's saved
# activations stay separate buffers instead of slices of a stacked one (a faster training step,
# `bench step`); deeper stacks stay rolled to bound compile time.
UNROLL_MAX_LAYERS = 8


# ----------------------------------------------------------------------------- components


def rms_norm(x: jax.Array, w: jax.Array, eps: float, *, unit_offset: bool = False) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype (as Hugging Face's LlamaRMSNorm); with
    `unit_offset` the scale is `1 + w` and the product stays in float32 (Gemma3RMSNorm)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * y.astype(x.dtype)


def _norm(cfg: ModelConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    return rms_norm(x, w, cfg.rms_norm_eps, unit_offset=cfg.norm_unit_offset)


def attention(
    q_BTHK, k_XSK, v_XSK, mask_BTS, n_keys=None, *, impl="reference", scale=None, window=None
) -> jax.Array:
    """Grouped-query softmax attention; returns [B, T, H, K]. Scores in float32.

    Keys and values are [X = B·N, S, K] (batch and KV heads on one axis, as the cache holds
    them); each KV head's G query heads and T steps become the G·T rows of one batched matmul.
    Scores scale by `scale`, or by `1 / sqrt(K)` when it is None. A decode step (T == 1) goes to
    `kernels.decode_attention` with `impl` (`ModelConfig.attention_impl`), whose Pallas kernel
    reads only the first `n_keys` slots (of a ring of `window` slots when `window` is set).
    """
    B, T, H, K = q_BTHK.shape
    X, S, _ = k_XSK.shape
    N = X // B
    G = H // N
    q = q_BTHK.reshape(B, T, N, G, K).transpose(0, 2, 3, 1, 4).reshape(X, G * T, K)
    if T == 1:
        n = S if n_keys is None else n_keys
        o = decode_attention(
            q, k_XSK, v_XSK, mask_BTS[:, 0], n, impl=impl, fallback=True, scale=scale,
            window=window,
        )  # fmt: skip
        return o.reshape(B, H, 1, K).transpose(0, 2, 1, 3)
    s = jnp.einsum("xqk,xsk->xqs", q, k_XSK, preferred_element_type=jnp.float32)
    s = s.reshape(B, N, G, T, S)
    s_BNGTS = s / math.sqrt(K) if scale is None else s * scale
    s_BNGTS = jnp.where(mask_BTS[:, None, None], s_BNGTS, NEG)
    p = jax.nn.softmax(s_BNGTS, axis=-1).astype(v_XSK.dtype).reshape(X, G * T, S)
    # Heads-major output, then one explicit transpose: XLA then runs p @ v as a plain batched
    # matmul. Asking the einsum for [B, T, N, G, K] directly makes it swap the operands into a
    # transposed dot plus copies.
    o = jnp.einsum("xqs,xsk->xqk", p, v_XSK, preferred_element_type=jnp.float32)
    o = o.reshape(B, N, G, T, K).transpose(0, 3, 1, 2, 4)
    return o.reshape(B, T, H, K).astype(q_BTHK.dtype)


def _linear(x, p):
    y = linear(x, p["w"])  # a float or quantized weight (`floe_jax.quant`)
    return y + p["b"].astype(x.dtype) if "b" in p else y


def _projections(cfg, x, lp, names, lora_l):
    """`x @ W_m (+ b_m) (+ LoRA_m)` for each projection m in `names` (which read the same x),
    through one matmul when `lp` holds the group fused (see `unstack_layers`)."""
    fused = "+".join(names)
    if len(names) > 1 and fused in lp:
        ends = np.cumsum([cfg.proj_shape(m)[1] for m in names])[:-1]
        ys = jnp.split(_linear(x, lp[fused]), ends, axis=-1)
    else:
        ys = [_linear(x, lp[m]) for m in names]
    if lora_l is None:
        return ys
    return [
        y if m not in lora_l.a else
        y + lora_delta(x, lora_l.a[m], lora_l.b[m], lora_l.mask[m], lora_l.scale)
        for m, y in zip(names, ys, strict=True)
    ]  # fmt: skip


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, True)}


def block(cfg, inv_freq, x_BTD, lp, lora_l, pos_BT, mask_BTS, cache_kv):
    """One transformer layer (`lp`: its params; `lora_l`: its adapters or None; `inv_freq`:
    its RoPE frequencies, None for a layer without RoPE).

    `cache_kv` is None (attend to this step's keys only) or `(k_XSK, v_XSK, write_at, ring)`,
    this layer's cache buffers: this step's keys/values are written at slot `write_at` (of a
    ring of `ring` slots when it is not None, see `write_cache`) and attention reads the
    buffer. Returns (x, k_XSK, v_XSK) (None, None uncached).
    """
    B, T, _ = x_BTD.shape
    H, N, K = cfg.num_heads, cfg.kv_heads, cfg.dim_head
    with jax.named_scope("attention"):
        h = _norm(cfg, x_BTD, lp["input_norm"])
        q, k, v = _projections(cfg, h, lp, FUSED_GROUPS[0], lora_l)
        q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, N, K), v.reshape(B, T, N, K)
        if cfg.qk_norm:
            q, k = _norm(cfg, q, lp["q_norm"]), _norm(cfg, k, lp["k_norm"])
        if inv_freq is not None:
            rs = rope_attention_scaling(cfg)
            q, k = apply_rope(q, pos_BT, inv_freq, rs), apply_rope(k, pos_BT, inv_freq, rs)
        # [B·N, T, K]: batch and KV heads merged into one dot batch axis (see `KVCache`).
        k = k.transpose(0, 2, 1, 3).reshape(B * N, T, K)
        v = v.transpose(0, 2, 1, 3).reshape(B * N, T, K)
        if cache_kv is None:
            k_out = v_out = n_keys = ring = None
            k_XSK, v_XSK = k, v
        else:
            k_cache, v_cache, write_at, ring = cache_kv
            k_out, k_XSK = write_cache(k_cache, k, write_at, ring)
            v_out, v_XSK = write_cache(v_cache, v, write_at, ring)
            k_XSK, v_XSK = k_XSK.astype(q.dtype), v_XSK.astype(q.dtype)
            n_keys = write_at + T
        scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        o = attention(
            q, k_XSK, v_XSK, mask_BTS, n_keys, impl=cfg.attention_impl, scale=scale, window=ring
        )
        (o,) = _projections(cfg, o.reshape(B, T, H * K), lp, ("o_proj",), lora_l)
        if cfg.sandwich_norms:
            o = _norm(cfg, o, lp["attn_out_norm"])
        x_BTD = x_BTD + o
    with jax.named_scope("mlp"):
        h = _norm(cfg, x_BTD, lp["post_norm"])
        g, u = _projections(cfg, h, lp, FUSED_GROUPS[1], lora_l)
        (d,) = _projections(cfg, _ACTIVATIONS[cfg.hidden_act](g) * u, lp, ("down_proj",), lora_l)
        if cfg.sandwich_norms:
            d = _norm(cfg, d, lp["mlp_out_norm"])
        x_BTD = x_BTD + d
    return x_BTD, k_out, v_out


def _layer_lora(lora: LoRA | None):
    """Splits a LoRA into the per-layer part that is scanned and the broadcast scale."""
    if lora is None:
        return None
    return {"a": lora.a, "b": lora.b, "mask": lora.mask}


def hidden_states(
    params: dict,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    lora: LoRA | None = None,
    cache: KVCache | None = None,
    mask: jax.Array | None = None,
    _rope_long: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [B, T, D] (and the updated cache when one is given).

    `params["layers"]` is either the stacked dict (layers run under `lax.scan`: one compiled layer,
    the default for training) or a tuple of per-layer dicts from `unstack_layers` (a Python loop:
    what decoding wants, since slicing a stacked weight inside a loop makes XLA copy it, doubling
    the bytes a memory-bound decode step moves). With a cache the layers always run in a Python
    loop (stacked params are unstacked first), each on its own cache buffer. Under the scan,
    what differs between layers (RoPE frequencies, sliding or not) is scanned over with the
    weights; a config whose layers agree on them scans constants, as before. With `cfg.remat`
    each layer is `jax.checkpoint`ed (the scan body, or each layer of the unstacked loop when
    there is no cache): per-layer activation rematerialisation.

    With `longrope` (`ModelConfig.rope_switches`) every position of a forward uses the short or
    the long factors by the forward's length, as in transformers; a cache whose keys were
    computed in the other regime is recomputed from its tokens first (`_recompute_cache`), as
    transformers' Phi-3 drops its cache there, so cached decode gives the logits of the full forward
    of each prefix. `_rope_long` forces the regime (that recomputation's own prefill).
    """
    B, T = tokens.shape
    dtype = jnp.dtype(cfg.dtype)
    mask_BT = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    x = take_rows(params["embed"], tokens, dtype)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    step_pos = jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1
    if cache is None:
        pos_BT = jnp.maximum(step_pos, 0)
        valid_BS = mask_BT
        q_slot = k_slot = jnp.arange(T)
        write_at = None
    else:
        pos_BT = jnp.maximum(cache.pos[:, None] + step_pos, 0)
        valid_BS = jax.lax.dynamic_update_slice(cache.valid, mask_BT, (0, cache.index))
        q_slot = cache.index + jnp.arange(T)
        k_slot = jnp.arange(cache.max_len)
        write_at = cache.index
    mask_BTS = valid_BS[:, None, :] & (q_slot[None, :, None] >= k_slot[None, None, :])
    windows = cfg.layer_windows
    rings = [None if cache is None else ring_window(w, cache.max_len) for w in windows]
    masks = {None: mask_BTS}  # by window
    for w in set(windows) - {None}:
        if cache is None:
            masks[w] = mask_BTS & (q_slot[:, None] - k_slot[None, :] < w)[None]
        elif ring_window(w, cache.max_len) is None:
            masks[w] = mask_BTS  # a cache this short never reaches the window
        else:
            masks[w] = ring_mask(valid_BS, cache.index, T, w)
    inv_freqs = layer_inv_freq(cfg)  # host constants
    rope_freqs = inv_freqs  # what each layer rotates by in this forward
    if cfg.rope_switches:  # longrope: short or long factors by this forward's length
        rope_freqs, use_long = longrope_inv_freq(cfg, pos_BT, _rope_long)
        if cache is not None and _rope_long is None:
            if cache.tokens is None:
                raise ValueError(
                    "this config's RoPE (longrope) needs a cache that keeps its tokens: build "
                    "it with init_cache for this config"
                )
            cache = jax.lax.cond(
                use_long == cache.rope_long,
                lambda c: c,
                lambda c: _recompute_cache(params, c, cfg, lora, use_long),
                cache,
            )

    layer_lora = _layer_lora(lora)
    scale = None if lora is None else lora.scale

    def layer(x, lp, ll, cache_kv, inv_freq, mask_l):
        lora_l = None if ll is None else LoRA(a=ll["a"], b=ll["b"], mask=ll["mask"], scale=scale)
        return block(cfg, inv_freq, x, lp, lora_l, pos_BT, mask_l, cache_kv)

    layers = params["layers"]
    if cache is None and not isinstance(layers, tuple | list):
        per_layer = {}
        if any(f is None or not np.array_equal(f, inv_freqs[0]) for f in inv_freqs):
            zero = np.zeros(cfg.rotary_dim // 2, np.float32)  # no RoPE: angle 0 rotates nothing
            per_layer["inv_freq"] = jnp.stack([zero if f is None else f for f in rope_freqs])
        if len(set(windows)) > 1:
            per_layer["sliding"] = np.asarray([w is not None for w in windows])
            w_slide = next(w for w in windows if w is not None)

        def body(x, xs):
            lp, ll, pl = xs
            inv_freq = pl.get("inv_freq", rope_freqs[0])
            mask_l = masks[windows[0]]
            if "sliding" in pl:
                mask_l = jnp.where(pl["sliding"], masks[w_slide], masks[None])
            return layer(x, lp, ll, None, inv_freq, mask_l)[0], None

        unroll = cfg.num_layers <= UNROLL_MAX_LAYERS
        if cfg.remat:  # the backward keeps each layer's input x only and recomputes the rest
            # A rolled scan keeps XLA from merging the recomputation into the forward; unrolled
            # layers are straight-line code and need `prevent_cse`.
            body = jax.checkpoint(body, prevent_cse=unroll)
        x, _ = jax.lax.scan(body, x, (layers, layer_lora, per_layer), unroll=unroll)
    else:
        if not isinstance(layers, tuple | list):  # the cache is one buffer per layer
            layers = unstack_layers(params, fuse=False)["layers"]
        k_new, v_new = [], []
        step = jax.checkpoint(layer) if cfg.remat and cache is None else layer  # as the scan's
        for i, lp in enumerate(layers):
            ll = None if layer_lora is None else jax.tree.map(lambda t, i=i: t[i], layer_lora)
            cache_kv = None
            if cache is not None:
                want = rings[i] or cache.max_len
                if cache.k[i].shape[1] != want:
                    raise ValueError(
                        f"KV cache layer {i} has {cache.k[i].shape[1]} slots, expected {want}: "
                        "build the cache with init_cache for this config"
                    )
                cache_kv = (cache.k[i], cache.v[i], write_at, rings[i])
            x, k, v = step(x, lp, ll, cache_kv, rope_freqs[i], masks[windows[i]])
            k_new.append(k)
            v_new.append(v)
    x = _norm(cfg, x, params["norm"])
    if cache is None:
        return x, None
    new_cache = KVCache(
        k=tuple(k_new),
        v=tuple(v_new),
        valid=valid_BS,
        index=cache.index + T,
        pos=cache.pos + mask_BT.sum(1),
    )
    if cfg.rope_switches:
        new_cache = dataclasses.replace(
            new_cache,
            tokens=jax.lax.dynamic_update_slice(
                cache.tokens, tokens.astype(jnp.int32), (0, cache.index)
            ),
            rope_long=use_long,
        )
    return x, new_cache


def _recompute_cache(params, cache: KVCache, cfg: ModelConfig, lora, rope_long) -> KVCache:
    """`cache` with every layer's keys and values recomputed from its tokens in the RoPE regime
    `rope_long` (`ModelConfig.rope_switches`): one prefill of all S slots, right-aligned so
    that it ends at `cache.index` (as a left-padded prompt: position ids count valid slots, so
    they are the ones the tokens had) and a ring buffer receives the last W slots, then each
    buffer rolled back so that slot s is where `cache` keeps it."""
    B, S = cache.valid.shape
    shift = S - cache.index
    src = jnp.arange(S) - shift  # the cache slot at each prefill slot
    ok = src >= 0
    tokens = jnp.where(ok, jnp.take(cache.tokens, jnp.maximum(src, 0), axis=1), 0)
    mask = ok & jnp.take(cache.valid, jnp.maximum(src, 0), axis=1)
    fresh = init_cache(cfg, B, S, dtype=cache.k[0].dtype)
    _, fresh = hidden_states(
        params, tokens, cfg, lora=lora, cache=fresh, mask=mask, _rope_long=rope_long
    )
    roll = lambda bufs: tuple(jnp.roll(b, -shift, axis=1) for b in bufs)
    return dataclasses.replace(cache, k=roll(fresh.k), v=roll(fresh.v), rope_long=rope_long)


def lm_head(params: dict, x_BTD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [B, T, V] in float32."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    if is_quantized(w):
        if cfg.tie_word_embeddings:
            return linear_t(x_BTD, w)
        return linear(x_BTD, w, jnp.float32)
    w = w.T if cfg.tie_word_embeddings else w
    return jnp.einsum(
        "btd,dv->btv", x_BTD, w.astype(x_BTD.dtype), preferred_element_type=jnp.float32
    )


def forward(
    params: dict,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    lora: LoRA | None = None,
    cache: KVCache | None = None,
    mask: jax.Array | None = None,
    last_only: bool = False,
):
    """Runs the model on `tokens`.

    Args:
      params: base params (see module docstring).
      tokens: int32 [B, T].
      cfg: the model config (static).
      lora: one client's adapters, or per-row adapters in `inference.fused.rows_lora`'s
        layout (one client per batch row, the base shared), or None.
      cache: a KV cache; when given, the T new tokens are written at `cache.index` and attend to
        every valid slot before them (prefill when the cache is empty, decode when T == 1).
      mask: [B, T] 1 for real tokens, 0 for left padding. Defaults to all ones.
      last_only: project only the last position to the vocabulary (logits [B, 1, V]): all a
        prefill samples from, and it skips T - 1 rows of the widest matmul.

    Returns:
      float32 logits [B, T, V] ([B, 1, V] with `last_only`); or `(logits, new_cache)` when a
      cache is given.
    """
    x, new_cache = hidden_states(params, tokens, cfg, lora=lora, cache=cache, mask=mask)
    logits = lm_head(params, x[:, -1:] if last_only else x, cfg)
    return logits if cache is None else (logits, new_cache)
