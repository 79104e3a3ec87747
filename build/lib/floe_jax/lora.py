"""LoRA adapters as pytrees, padded to a maximum rank (Hu et al., 2021, "LoRA").

Shapes: L layers, I input width, O output width, R padded rank, C clients.

A `LoRA` holds, for each adapted projection `m` of every layer,

    a[m]    [L, I, R]  random at init (padded slots zero)
    b[m]    [L, R, O]  zero at init, so a fresh adapter is a no-op
    mask[m] [L, R]     1 for a live (layer, rank slot), 0 for padding or an unadapted layer
    scale   []         alpha / r (or alpha / sqrt(r), rsLoRA) from the client's *true* rank r

and the update of `x [.., I]` is `delta = ((x @ a) * mask) @ b * scale`. Because the mask sits
between the two factors, gradients of padded slots are exactly zero, so slots that start at zero
stay zero under any gradient-based optimizer; `freeze_padding` enforces it after each step too.

Clients of different ranks, targets and layers share one tree structure (the union of targets,
padded to one R), so they stack on a leading client axis and run in one compiled program.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import LoRAConfig, ModelConfig, normalize_targets
from floe_jax.quant import is_quantized


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
    """LoRA factors for one client (or C stacked clients: every leaf gains a leading C axis)."""

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    mask: dict[str, jax.Array]
    scale: jax.Array

    @property
    def targets(self) -> tuple[str, ...]:
        return normalize_targets(tuple(self.a))

    @property
    def max_rank(self) -> int:
        return next(iter(self.a.values())).shape[-1]

    def trainable(self) -> dict[str, dict[str, jax.Array]]:
        """The part an optimizer updates: `{"a": ..., "b": ...}`."""
        return {"a": self.a, "b": self.b}

    def with_trainable(self, tree: dict[str, dict[str, jax.Array]]) -> LoRA:
        return dataclasses.replace(self, a=tree["a"], b=tree["b"])


def rank_mask(lora_cfg: LoRAConfig, num_layers: int, max_rank: int) -> np.ndarray:
    """[L, R] float32 mask: 1 where layer is adapted and slot < rank."""
    layers = range(num_layers) if lora_cfg.layers is None else lora_cfg.layers
    m = np.zeros((num_layers, max_rank), np.float32)
    for i in layers:
        if not 0 <= i < num_layers:
            raise ValueError(f"LoRA layer index {i} is outside [0, {num_layers})")
        m[i, : lora_cfg.rank] = 1.0
    return m


def init_lora(
    cfg: ModelConfig,
    lora_cfg: LoRAConfig,
    *,
    key: jax.Array,
    targets: tuple[str, ...] | None = None,
    max_rank: int | None = None,
) -> LoRA:
    """A fresh adapter: `a` random in live slots, `b` zero, padded slots zero.

    Args:
      cfg: the base model.
      lora_cfg: this client's rank, alpha, targets and layers.
      key: PRNG key.
      targets: tree targets, a superset of `lora_cfg.targets`, so clients with different targets
        share a structure (unadapted targets get an all-zero mask). Defaults to `lora_cfg.targets`.
      max_rank: padded rank R; defaults to `lora_cfg.padded_rank`.
    """
    tree_targets = normalize_targets(targets) if targets is not None else lora_cfg.targets
    missing = set(lora_cfg.targets) - set(tree_targets)
    if missing:
        raise ValueError(
            f"LoRA targets {sorted(missing)} are not in the tree targets {tree_targets}"
        )
    r_pad = max_rank or lora_cfg.padded_rank
    if r_pad < lora_cfg.rank:
        raise ValueError(f"max_rank={r_pad} is below the client's rank={lora_cfg.rank}")
    live = rank_mask(lora_cfg, cfg.num_layers, r_pad)
    a, b, mask = {}, {}, {}
    for m, k in zip(tree_targets, jax.random.split(key, len(tree_targets)), strict=True):
        d_in, d_out = cfg.proj_shape(m)
        shape = (cfg.num_layers, d_in, r_pad)
        if lora_cfg.init == "kaiming":  # PEFT: kaiming_uniform_(a=sqrt(5)) -> bound 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(d_in)
            w = jax.random.uniform(k, shape, jnp.float32, -bound, bound)
        else:
            w = jax.random.normal(k, shape, jnp.float32) / lora_cfg.rank
        m_lr = live if m in lora_cfg.targets else np.zeros_like(live)
        a[m] = w * m_lr[:, None, :]
        b[m] = jnp.zeros((cfg.num_layers, r_pad, d_out), jnp.float32)
        mask[m] = jnp.asarray(m_lr)
    return LoRA(a=a, b=b, mask=mask, scale=jnp.asarray(lora_cfg.scale, jnp.float32))


def lora_delta(
    x: jax.Array, a_IR: jax.Array, b_RO: jax.Array, mask_R: jax.Array, scale
) -> jax.Array:
    """`((x @ a) * mask) @ b * scale` for one layer's projection; x [..., I] -> [..., O].

    Per-row adapters (one client per batch row, as in fused serving): `a [B, I, R]`,
    `b [B, R, O]`, `mask [B, R]`, `scale [B]` with `x [B, T, I]`.
    """
    if a_IR.ndim == 3:
        a, b, m = a_IR.astype(x.dtype), b_RO.astype(x.dtype), mask_R.astype(x.dtype)
        h = jnp.einsum("bti,bir->btr", x, a) * m[:, None, :]
        s = jnp.reshape(jnp.asarray(scale, x.dtype), (-1, 1, 1))
        return jnp.einsum("btr,bro->bto", h, b) * s
    lead, dt = x.shape[:-1], x.dtype
    y = _delta_2d(
        x.reshape(-1, x.shape[-1]), a_IR.astype(dt), b_RO.astype(dt), mask_R.astype(dt),
        jnp.asarray(scale, dt),
    )  # fmt: skip
    return y.reshape(*lead, y.shape[-1])


# The delta with a hand-written VJP. Autodiff's transpose rules would form the adapter gradients
# as `x^T @ g` with the token axis contracted on the wide operand, and XLA:CPU then writes that
# operand (x, or the gradient reaching a wide projection) transposed, a strided copy that cost a
# third of a training step. Here every product over tokens puts the narrow [T, R] factor on the
# left (`g_r^T @ x`), so only the small operand is transposed. Being a `custom_vjp`, it supports
# reverse-mode AD only (`jax.jvp` / `jacfwd` through it raise). Shapes: x [T, I], a [I, R],
# b [R, O], m [R], s [].
@jax.custom_vjp
def _delta_2d(x, a, b, m, s):
    return ((x @ a) * m) @ b * s


def _delta_2d_fwd(x, a, b, m, s):
    xa_TR = x @ a
    return (xa_TR * m) @ b * s, (x, a, b, m, s, xa_TR)


def _delta_2d_bwd(res, dy_TO):
    x, a, b, m, s, xa_TR = res
    h_TR = xa_TR * m
    hdy_RO = jnp.einsum("tr,to->ro", h_TR, dy_TO)
    dh_TR = jnp.einsum("to,ro->tr", dy_TO, b) * s
    dxa_TR = dh_TR * m
    da = jnp.einsum("tr,ti->ri", dxa_TR, x).T
    dx = jnp.einsum("tr,ir->ti", dxa_TR, a)
    ds = jnp.sum(hdy_RO * b).reshape(s.shape)
    return dx, da, hdy_RO * s, jnp.sum(dh_TR * xa_TR, axis=0), ds


_delta_2d.defvjp(_delta_2d_fwd, _delta_2d_bwd)


def delta_weight(lora: LoRA, name: str) -> jax.Array:
    """Dense update `scale * a diag(mask) b` of projection `name`: [L, I, O]."""
    a = lora.a[name] * lora.mask[name][:, None, :]
    return jnp.einsum("lir,lro->lio", a, lora.b[name]) * lora.scale


def merge_lora(params: dict, lora: LoRA) -> dict:
    """Base params with every adapter folded in: `w + scale * a b`. Returns a new tree.

    Takes the canonical layout (stacked layers; `model.stack_layers` converts the decode layout).
    A quantized weight (`floe_jax.quant`) is dequantized first and comes back float32: requantize
    the merged params (`quant.quantize`) or export them (`floe_jax.hf.gguf`) as the device needs.
    """
    if isinstance(params["layers"], tuple | list) or any("+" in k for k in params["layers"]):
        raise ValueError(
            "merge_lora takes canonical params (stacked layers, projections apart); these are in "
            "the decode layout of unstack_layers: pass model.stack_layers(params, cfg)"
        )
    layers = dict(params["layers"])
    for m in lora.a:
        p = dict(layers[m])
        if is_quantized(p["w"]):
            p["w"] = p["w"].dequantize(jnp.float32) + delta_weight(lora, m)
        else:
            p["w"] = (p["w"].astype(jnp.float32) + delta_weight(lora, m)).astype(p["w"].dtype)
        layers[m] = p
    return {**params, "layers": layers}


def freeze_padding(lora: LoRA) -> LoRA:
    """Zeroes every padded slot (`jnp.where` on the mask), leaving live slots untouched."""
    a = {m: jnp.where(lora.mask[m][..., None, :] > 0, v, 0.0) for m, v in lora.a.items()}
    b = {m: jnp.where(lora.mask[m][..., :, None] > 0, v, 0.0) for m, v in lora.b.items()}
    return dataclasses.replace(lora, a=a, b=b)


def true_rank(lora: LoRA) -> jax.Array:
    """Each client's rank: the largest live slot count over targets and layers. [] or [C]."""
    return jnp.max(jnp.stack([m.sum(-1).max(-1) for m in lora.mask.values()]), axis=0).astype(
        jnp.int32
    )


def stack_loras(loras: list[LoRA]) -> LoRA:
    """Stacks same-structure adapters on a new leading client axis C."""
    if not loras:
        raise ValueError("stack_loras needs at least one adapter")
    structs = {jax.tree_util.tree_structure(x) for x in loras}
    if len(structs) != 1:
        raise ValueError("adapters differ in targets; init them with the same `targets=`")
    shapes = {tuple(v.shape for v in jax.tree.leaves(x)) for x in loras}
    if len(shapes) != 1:
        raise ValueError("adapters differ in padded rank; init them with the same `max_rank=`")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *loras)


def unstack_loras(stacked: LoRA) -> list[LoRA]:
    """Inverse of `stack_loras`."""
    n = stacked.scale.shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def num_lora_params(lora: LoRA) -> int:
    """Live (unpadded) parameter count of one client's adapter."""
    total = 0
    for m in lora.a:
        live = np.asarray(lora.mask[m]).sum()  # sum over layers and slots
        total += int(live) * (lora.a[m].shape[-2] + lora.b[m].shape[-1])
    return total
