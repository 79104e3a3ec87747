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

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from floe_jax import quant, sharding
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
    # Ties the frozen base to the adapter, which changes every step: under a loop over steps
    # (`local_update`'s scan) XLA's loop-invariant code motion would otherwise hoist whatever
    # depends on the base alone out of the loop and keep it for the whole loop, which for a
    # quantized base is its decoded float copy (a bfloat16 base's float32 copy measured 2.9 GB
    # of temporaries at Qwen2.5-0.5B shapes, above the float32 base's whole round). The barrier
    # moves no data; the weights are decoded inside each step, as for a single step. A float base
    # has nothing to decode, so its program is left as it was (the barrier changes XLA's fusions
    # there, and with them the rounding of a trained adapter).
    if any(map(quant.is_quantized, jax.tree.leaves(params, is_leaf=quant.is_quantized))):
        params, lora = jax.lax.optimization_barrier((params, lora))
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
    round), give a chunk k > 0, or `"auto"` (`auto_client_chunk`) to have it chosen from the
    compiled program's memory."""
    return 1 if jax.default_backend() == "cpu" else 0


def local_update_clients(
    params: dict,
    loras: LoRA,
    batches: dict,
    *,
    cfg: ModelConfig,
    opt: optax.GradientTransformation,
    keys: jax.Array,
    client_chunk: int | str | None = None,
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
        measurements). On an accelerator the client axis is what fills the device. `"auto"`:
        the largest chunk whose compiled program fits the device's free memory
        (`auto_client_chunk`; 0 when all fit), resolved at trace time from the shapes. Under a
        mesh with a `clients` axis of D devices (`floe_jax.sharding`), the C clients are split
        into D blocks, one per device, and the chunk (`"auto"`: of the block) applies within
        each block.

    Returns:
      `(loras [C], metrics)`, each metric [C].
    """

    def one(params, lora, batch, key):
        return local_update(params, lora, batch, cfg=cfg, opt=opt, key=key, frozen=frozen)

    if client_chunk is None:
        client_chunk = default_client_chunk()
    elif client_chunk != "auto" and not isinstance(client_chunk, int):
        raise ValueError(f"client_chunk={client_chunk!r}: give an int >= 0, 'auto' or None")
    elif client_chunk == "auto" and jax.process_count() > 1:
        raise ValueError(
            f"client_chunk='auto' in a run of {jax.process_count()} jax.distributed processes: "
            "each process would size the chunk from its own free memory and could compile "
            "another round program than the others; give FedConfig.client_chunk an int "
            "(`python -m experiments plan --devices D` gives clients per device)"
        )

    def clients(loras, batches, keys):
        chunk = client_chunk
        if chunk == "auto":  # the clients this device trains: the block under a mesh
            chunk = auto_client_chunk(params, loras, batches, cfg=cfg, opt=opt, frozen=frozen)
        if chunk <= 0:
            return jax.vmap(one, in_axes=(None, 0, 0, 0))(params, loras, batches, keys)
        xs = (loras, batches, keys)
        return jax.lax.map(lambda x: one(params, *x), xs, batch_size=chunk)

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

    return compiled_memory(jax.jit(one).lower(params, lora, batches).compile())


def compiled_memory(compiled) -> dict[str, int]:
    """A compiled program's memory from XLA's analysis, in bytes: `arguments`, `temporaries`,
    `outputs` (less those aliased to donated arguments) and their `total`."""
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "outputs": int(m.output_size_in_bytes - m.alias_size_in_bytes),
    }
    out["total"] = sum(out.values())
    return out


def _abstract(tree):
    """`tree` as `jax.ShapeDtypeStruct`s (arrays or tracers alike): shapes only."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class ClientsMemory:
    """The compiled memory of k clients' `local_update`s vmapped at once, as a line in k.

    `need(k) = fixed_bytes + k * per_client_bytes`, fitted through XLA's compiled memory analysis
    (`client_memory_bytes`' totals: arguments, temporaries, outputs) of the vmapped program at
    k = 1 and k = 2, from shapes alone (nothing allocated or run). `fixed_bytes` holds the
    frozen base (`base_bytes`, an argument every client shares) and whatever else does not grow
    with k; `io_bytes` is one client's adapter, batches and trained adapter, which
    `local_update_clients` holds for every client of the round even when it trains k at a time.
    """

    base_bytes: int
    fixed_bytes: int
    per_client_bytes: int
    io_bytes: int

    def need(self, k: int, clients: int | None = None) -> int:
        """Bytes to train k clients at once, of `clients` (default k) in the round."""
        clients = k if clients is None else clients
        return self.fixed_bytes + k * self.per_client_bytes + (clients - k) * self.io_bytes

    def max_clients(self, budget_bytes: int, clients: int | None = None) -> int:
        """The largest k with `need(k, clients) <= budget_bytes`, at most `clients` when given
        (without it, clients trained alone: `need(k)`); 0 when not even one fits."""
        if clients is None:
            return max(0, (budget_bytes - self.fixed_bytes) // self.per_client_bytes)
        room = budget_bytes - self.fixed_bytes - clients * self.io_bytes
        step = self.per_client_bytes - self.io_bytes
        if room < step:
            return 0
        return clients if step <= 0 else int(min(clients, room // step))


_CLIENTS_MEMORY: dict = {}


def clients_memory(
    params, lora: LoRA, batches: dict, *, cfg: ModelConfig, opt, frozen: tuple[str, ...] = ()
) -> ClientsMemory:
    """`ClientsMemory` of one client's shapes: `lora` and `batches` without a client axis
    (arrays, tracers or `jax.ShapeDtypeStruct`s; two compiles, cached by shape)."""
    params, lora, batches = _abstract(params), _abstract(lora), _abstract(batches)
    cache_key = (jax.tree.structure((params, lora, batches)), tuple(
        (x.shape, str(x.dtype)) for x in jax.tree.leaves((params, lora, batches))
    ), cfg, opt, frozen)  # fmt: skip
    if cache_key in _CLIENTS_MEMORY:
        return _CLIENTS_MEMORY[cache_key]

    def total(k):
        stack = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype), t)
        keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), k))

        def run(p, lo, b, ks):
            return local_update_clients(
                p, lo, b, cfg=cfg, opt=opt, keys=ks, client_chunk=0, frozen=frozen
            )

        # One device's program: without a mesh, even when called while a round is traced under
        # one (`client_chunk="auto"` in a mesh round prices one device's block of clients), so
        # `local_update_clients` does not split k probe clients over the `clients` axis.
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            compiled = jax.jit(run).lower(params, stack(lora), stack(batches), keys).compile()
        return compiled_memory(compiled)["total"]

    one, two = total(1), total(2)
    base = _nbytes(params)
    per_client = two - one
    if per_client <= 0:  # XLA reused a buffer across the two: price a client as all but the base
        per_client = one - base
    out = ClientsMemory(
        base_bytes=base,
        fixed_bytes=one - per_client,
        per_client_bytes=per_client,
        io_bytes=2 * _nbytes(lora.trainable()) + _nbytes(batches),
    )
    _CLIENTS_MEMORY[cache_key] = out
    return out


def free_device_memory() -> int:
    """Bytes a round may still use on this process's first device: an accelerator's
    `bytes_limit` less its `bytes_in_use` (`Device.memory_stats()`); on a CPU, which reports no
    stats, the host's available RAM (`MemAvailable` of /proc/meminfo, via
    `cost_table.local_memory_bytes`)."""
    from floe_jax.cost_table import local_memory_bytes

    try:
        # this process's first device: in a multi-host run `jax.devices()[0]` is process 0's
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends differ in what they implement
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return local_memory_bytes()


def auto_client_chunk(
    params,
    loras: LoRA,
    batches: dict,
    *,
    cfg: ModelConfig,
    opt,
    frozen: tuple[str, ...] = (),
    budget_bytes: int | None = None,
) -> int:
    """`client_chunk="auto"`: the most clients trained at once whose compiled program fits.

    `loras` and `batches` carry the round's C clients on a leading axis. The budget is
    `budget_bytes`, else `free_device_memory()` plus the base's bytes (the base is already
    resident, and the compiled program counts it as an argument). Returns 0 (vmap all C) when
    all fit, else k < C (`lax.map` k at a time, `ClientsMemory.need(k, C)` within the budget).

    Raises:
      ValueError: not even one client fits; names both sizes and what to change.
    """
    C = jax.tree.leaves(batches)[0].shape[0]
    one = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t)
    mem = clients_memory(params, one(_abstract(loras)), one(_abstract(batches)), cfg=cfg, opt=opt,
                         frozen=frozen)  # fmt: skip
    budget = free_device_memory() + mem.base_bytes if budget_bytes is None else budget_bytes
    if mem.need(C) <= budget:
        return 0
    k = mem.max_clients(budget, C)
    if k < 1:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"
        raise ValueError(
            f"client_chunk='auto': not even one client fits: one client's local update needs "
            f"{mib(mem.need(1, C))} ({mib(mem.base_bytes)} base, {mib(mem.per_client_bytes)} "
            f"per client, round of {C} clients) against a budget of {mib(budget)}; lower "
            "batch_size or seq_len, or set the model's remat=True / loss_chunk, or quantize "
            "the base"
        )
    return k
