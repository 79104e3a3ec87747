"""The parameter layout of `floe_jax.model`: random init, the expected shapes, and the two
layouts a model's params come in (the module docstring of `floe_jax.model` describes them): the
canonical one, every per-layer leaf stacked on a leading L axis (training, checkpoints), and the
decode layout, a tuple of per-layer dicts with projection groups fused (`unstack_layers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import LORA_TARGETS, ModelConfig
from floe_jax.quant import concat_outputs, split_outputs


def init_params(cfg: ModelConfig, *, key: jax.Array) -> dict:
    """Random params, N(0, 0.02) as Hugging Face initialises, norms at one, biases at zero."""
    dtype = jnp.dtype(cfg.dtype)
    keys = iter(jax.random.split(key, 16))
    normal = lambda shape: (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    norm = jnp.zeros if cfg.norm_unit_offset else jnp.ones  # a unit scale either way
    layers = {name: norm((L, n), dtype) for name, n in norm_shapes(cfg).items()}
    for m in LORA_TARGETS:
        d_in, d_out = cfg.proj_shape(m)
        layers[m] = {"w": normal((L, d_in, d_out))}
        if _has_bias(cfg, m):
            layers[m]["b"] = jnp.zeros((L, d_out), dtype)
    params = {"embed": normal((V, D)), "norm": norm((D,), dtype), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((D, V))
    return params


def norm_shapes(cfg: ModelConfig) -> dict[str, int]:
    """{per-layer norm: its width} for `cfg` (the norms `qk_norm` and `sandwich_norms` add)."""
    D, K = cfg.hidden_size, cfg.dim_head
    shapes = {"input_norm": D, "post_norm": D}
    if cfg.qk_norm:
        shapes.update(q_norm=K, k_norm=K)
    if cfg.sandwich_norms:
        shapes.update(attn_out_norm=D, mlp_out_norm=D)
    return shapes


def _has_bias(cfg: ModelConfig, name: str) -> bool:
    if name in ("q_proj", "k_proj", "v_proj"):
        return cfg.qkv_bias
    if name == "o_proj":
        return cfg.o_bias
    return cfg.mlp_bias


# Projections that read the same input; `fuse_projections` concatenates each group's weights so
# the group runs as one wider matmul. Decode uses it (few rows per step: fewer dots is faster);
# training keeps them apart (the split of a fused result costs copies in the backward pass).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_projections(params: dict) -> dict:
    """Params with each group in `FUSED_GROUPS` as one `"q_proj+k_proj+v_proj"`-style entry
    whose weight (and bias) concatenates the group's along the output axis. `forward` splits the
    result, so logits are unchanged; one wide matmul replaces two or three narrow ones. Works on
    stacked and unstacked layers; already-fused params are returned as they are."""

    def fuse(lp):
        lp = dict(lp)
        for group in FUSED_GROUPS:
            if all(m in lp for m in group):
                parts = [lp.pop(m) for m in group]
                lp["+".join(group)] = {k: concat_outputs([q[k] for q in parts]) for k in parts[0]}
        return lp

    layers = params["layers"]
    fused = tuple(map(fuse, layers)) if isinstance(layers, tuple | list) else fuse(layers)
    return {**params, "layers": fused}


def unstack_layers(params: dict, *, fuse: bool = True) -> dict:
    """Params with `layers` as a tuple of per-layer dicts (see `hidden_states`), with projection
    groups fused (`fuse_projections`) unless `fuse=False`. This is the decode layout."""
    layers = params["layers"]
    if not isinstance(layers, tuple | list):
        n = jax.tree.leaves(layers)[0].shape[0]
        layers = tuple(jax.tree.map(lambda t, i=i: t[i], layers) for i in range(n))
        params = {**params, "layers": layers}
    return fuse_projections(params) if fuse else params


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """The canonical layout (see the module docstring) from the decode layout of
    `unstack_layers`: fused groups split back into their projections, per-layer dicts stacked
    on a leading L axis. Canonical params are returned as they are."""

    def unfuse(lp):
        lp = dict(lp)
        for group in FUSED_GROUPS:
            fused = lp.pop("+".join(group), None)
            if fused is not None:
                ends = np.cumsum([cfg.proj_shape(m)[1] for m in group])[:-1]
                parts = {k: split_outputs(v, ends) for k, v in fused.items()}
                lp.update({m: {k: parts[k][i] for k in parts} for i, m in enumerate(group)})
        return lp

    layers = params["layers"]
    if isinstance(layers, tuple | list):
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *map(unfuse, layers))
    else:
        layers = unfuse(layers)
    return {**params, "layers": layers}


def param_shapes(cfg: ModelConfig) -> dict:
    """The expected shape of every param leaf, without allocating (for loaders and checks)."""
    return jax.tree.map(
        lambda x: x.shape, jax.eval_shape(lambda: init_params(cfg, key=jax.random.key(0)))
    )
