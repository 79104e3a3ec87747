"""One client's local LoRA update, then the same update lifted over the client axis.

The local step is FedAvg's client update (McMahan et al., 2017, "Communication-Efficient Learning
of Deep Networks from Decentralized Data") applied to LoRA adapters only (Hu et al., 2021): the base
is frozen and shared by every client, and only `lora.trainable()` reaches the optimizer.

Shapes: C clients, S local steps, B batch, T tokens, V vocab, R padded rank.

A client's batches are `{"tokens": int32 [S, B, T], "mask": [S, B, T], "loss_mask": [S, B, T]}`
with an optional `"batch_mask"` ([S] or [S, B]): a zero row or step weighs nothing, and a step
whose loss weight is zero (a short client's padding) leaves the adapter and optimizer state
untouched. Each local step is `train_step`, which the centralized fine-tune and the cost table's
measurement run too; its loss is `floe_jax.loss.token_loss`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from floe_jax import sharding
from floe_jax.config import ModelConfig
from floe_jax.lora import LoRA, freeze_padding
from floe_jax.loss import token_loss

OPTIMIZERS = ("adamw", "adam", "sgd")


@functools.lru_cache(maxsize=64)
def make_optimizer(
    name: str = "adamw",
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer for the LoRA tree. Cached, so equal arguments give the same (hashable)
    object and a jitted round taking it as a static argument does not recompile."""
    if name == "adamw":
        tx = optax.adamw(lr, weight_decay=weight_decay)
    elif name == "adam":
        tx = optax.adam(lr)
    elif name == "sgd":
        tx = optax.sgd(lr)
    else:
        raise ValueError(f"optimizer={name!r} is not one of {OPTIMIZERS}")
    if max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx


def _tree_where(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _row_weights(batches: dict) -> jax.Array:
    """[S, B] float32 row weight from the optional `batch_mask` ([S] or [S, B])."""
    S, B = batches["tokens"].shape[:2]
    bm = batches.get("batch_mask")
    if bm is None:
        return jnp.ones((S, B), jnp.float32)
    bm = jnp.asarray(bm, jnp.float32)
    return jnp.broadcast_to(bm[:, None] if bm.ndim == 1 else bm, (S, B))


def optimized_factors(lora: LoRA, frozen: tuple[str, ...] = ()) -> dict:
    """The factors of `lora.trainable()` an optimizer sees: all but the `frozen` ones.

    `opt.init(optimized_factors(lora, frozen))` is the optimizer state `train_step` expects.
    """
    full = lora.trainable()
    unknown = set(frozen) - set(full)
    if unknown:
        raise ValueError(f"frozen={frozen!r}: {sorted(unknown)} not among {sorted(full)}")
    return {k: v for k, v in full.items() if k not in frozen}


def train_step(
    params: dict,
    lora: LoRA,
    opt_state: optax.OptState,
    batch: dict,
    *,
    cfg: ModelConfig,
    opt: optax.GradientTransformation,
    frozen: tuple[str, ...] = (),
) -> tuple[LoRA, optax.OptState, tuple[jax.Array, jax.Array]]:
    """One optimizer step of a LoRA adapter on one batch: the step every LoRA training runs (a
    federated client's local steps, a centralized fine-tune, the cost table's measured step).

    The gradient is that of the mean `token_loss` over the batch's loss tokens, taken with respect
    to `optimized_factors(lora, frozen)` only; padded rank slots stay exactly zero. A batch with no
    loss token (a short client's padding) changes nothing, optimizer state included.

    Args:
      params: frozen base params.
      lora: the adapter (padded to R, its mask and scale set).
      opt_state: `opt`'s state over `optimized_factors(lora, frozen)`.
      batch: `tokens`, `mask`, `loss_mask` [B, T].
      cfg: base model config (static).
      opt: the optimizer (static).
      frozen: factors (`"a"`, `"b"`) that are not trained (static).

    Returns:
      `(lora, opt_state, (loss_sum, tokens))`, the sums float32 [].
    """
    train = optimized_factors(lora, frozen)
    fixed = {k: v for k, v in lora.trainable().items() if k in frozen}  # no gradient, no state
    whole = lambda train: lora.with_trainable({**fixed, **train})  # the adapter they make up

    def loss_of(train):
        s, n = token_loss(
            params, whole(train), batch["tokens"], batch["mask"], batch["loss_mask"], cfg=cfg
        )
        return s / jnp.maximum(n, 1.0), (s, n)

    (_, (s, n)), g = jax.value_and_grad(loss_of, has_aux=True)(train)
    updates, new_opt_state = opt.update(g, opt_state, train)
    new_train = freeze_padding(whole(optax.apply_updates(train, updates))).trainable()
    new_train = {k: new_train[k] for k in train}
    live = n > 0
    new_train = _tree_where(live, new_train, train)
    return whole(new_train), _tree_where(live, new_opt_state, opt_state), (s, n)


def local_update(
    params: dict,
    lora: LoRA,
    batches: dict,
    *,
    cfg: ModelConfig,
    opt: optax.GradientTransformation,
    key: jax.Array | None = None,
    frozen: tuple[str, ...] = (),
) -> tuple[LoRA, dict]:
    """Trains one client's adapter for S local steps: `train_step` under a `lax.scan`.

    Args:
      params: frozen base params.
      lora: this client's starting adapter (padded to R, its mask and scale set).
      batches: tokens/mask/loss_mask [S, B, T], optional batch_mask [S] or [S, B].
      cfg: base model config (static).
      opt: optimizer over the factors of `lora.trainable()` not in `frozen` (static); a fresh
        state each call, as a client does.
      key: PRNG key; the loss is deterministic (no dropout), so it is reserved for stochastic
        extensions and may be None.
      frozen: factors (`"a"`, `"b"`) that stay as they are (FFA-LoRA trains B only): no gradient
        is formed for them, and the optimizer never sees them (no moments, no weight decay).

    Returns:
      `(lora, metrics)`: the trained adapter (padded slots exactly zero) and metric *sums*:
      `loss_sum`, `tokens` (loss-token count), `steps` (steps that updated), `examples` (rows
      with a nonzero loss weight), all float32 [].
    """
    del key  # deterministic loss; kept in the signature so callers thread keys explicitly
    rows_SB = _row_weights(batches)
    loss_mask = batches["loss_mask"].astype(jnp.float32) * rows_SB[..., None]
    xs = {"tokens": batches["tokens"], "mask": batches["mask"], "loss_mask": loss_mask}

    def step(carry, batch):
        lora, opt_state = carry
        lora, opt_state, (s, n) = train_step(
            params, lora, opt_state, batch, cfg=cfg, opt=opt, frozen=frozen
        )
        return (lora, opt_state), (s, n, (n > 0).astype(jnp.float32))

    opt_state = opt.init(optimized_factors(lora, frozen))
    with jax.named_scope("local_update"):
        (lora, _), (s_S, n_S, live_S) = jax.lax.scan(step, (lora, opt_state), xs)
    m = batches["mask"].astype(jnp.float32)
    row_live = jnp.sum(m[..., :-1] * m[..., 1:] * loss_mask[..., 1:], axis=-1) > 0
    metrics = {
        "loss_sum": jnp.sum(s_S),
        "tokens": jnp.sum(n_S),
        "steps": jnp.sum(live_S),
        "examples": jnp.sum(row_live.astype(jnp.float32)),
    }
    return lora, metrics


def default_client_chunk() -> int:
    """`local_update_clients`' chunk when none is given: 1 (one client at a time) on a CPU, 0
    (every client vmapped at once) on a GPU or TPU. Vmapping holds every sampled client's
    activations at once; when they do not fit in device memory (large models, many clients per
    round), give a chunk k > 0 instead."""
    return 1 if jax.default_backend() == "cpu" else 0


def local_update_clients(
    params: dict,
    loras: LoRA,
    batches: dict,
    *,
    cfg: ModelConfig,
    opt: optax.GradientTransformation,
    keys: jax.Array,
    client_chunk: int | None = None,
    frozen: tuple[str, ...] = (),
) -> tuple[LoRA, dict]:
    """`local_update` over C clients; the base is broadcast, never copied per client.

    Args:
      params: frozen base params (shared: `in_axes=None`).
      loras: [C] stacked starting adapters.
      batches: every leaf with a leading C axis ([C, S, B, T]).
      cfg, opt, frozen: as in `local_update` (static).
      keys: [C] PRNG keys.
      client_chunk: 0 vmaps all C clients at once; k > 0 runs `jax.lax.map(..., batch_size=k)`,
        k clients vmapped at a time (less activation memory); None picks by backend
        (`default_client_chunk`): 1 on a CPU, 0 on an accelerator. On a CPU, vmapping every
        client at once is slower (the activations of all clients no longer fit in cache); a few
        clients per chunk can help workloads with little work per client (`bench round` has the
        measurements). On an accelerator the client axis is what fills the device. Under a
        mesh with a `clients` axis of D devices (`floe_jax.sharding`), the C clients are split
        into D blocks, one per device, and the chunk applies within each block.

    Returns:
      `(loras [C], metrics)`, each metric [C].
    """

    def one(params, lora, batch, key):
        return local_update(params, lora, batch, cfg=cfg, opt=opt, key=key, frozen=frozen)

    if client_chunk is None:
        client_chunk = default_client_chunk()

    def clients(loras, batches, keys):
        if client_chunk <= 0:
            return jax.vmap(one, in_axes=(None, 0, 0, 0))(params, loras, batches, keys)
        xs = (loras, batches, keys)
        return jax.lax.map(lambda x: one(params, *x), xs, batch_size=client_chunk)

    D = sharding.client_blocks()  # devices on the traced mesh's clients axis, 1 without one
    if D == 1:
        return clients(loras, batches, keys)
    # One block of C / D clients per device, each chunked as on one device.
    blocks = sharding.split_clients((loras, batches, keys), D)
    return sharding.merge_clients(jax.vmap(clients)(*blocks))


def client_memory_bytes(
    params: dict,
    lora: LoRA,
    batches: dict,
    *,
    cfg: ModelConfig,
    opt: optax.GradientTransformation,
    frozen: tuple[str, ...] = (),
) -> dict[str, int]:
    """One client's `local_update` memory from XLA's compiled memory analysis, in bytes.

    Arguments may be arrays or `jax.ShapeDtypeStruct`s (`jax.eval_shape` of a base, quantized
    or not): nothing is allocated or run. `arguments` holds the frozen base, the adapter and the
    client's batches; `temporaries` the activations, gradients and optimizer state the step
    needs; `total` their sum with the outputs. With a quantized base (`floe_jax.quant`, QLoRA)
    the base's share is its codes and scales.
    """

    def one(params, lora, batches):
        return local_update(params, lora, batches, cfg=cfg, opt=opt, frozen=frozen)

    m = jax.jit(one).lower(params, lora, batches).compile().memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "outputs": int(m.output_size_in_bytes - m.alias_size_in_bytes),
    }
    out["total"] = sum(out.values())
    return out
