"""Past one device: a `jax.sharding.Mesh` for federated rounds and the cloud, and the processes of
a multi-host (`jax.distributed`) run.

JAX's SPMD engine is the distributed engine: the round is the same compiled program with or
without a mesh. Inputs are placed with `NamedSharding`s (`place_round_inputs`), the round runs
under `jax.set_mesh(mesh)`, and `local_update_clients` splits the round's C sampled clients into
one block per device of the `clients` axis (`client_blocks`); the aggregation's sums over clients
then become cross-device reductions that XLA inserts inside the same program.

Mesh axes (`make_mesh("clients=4,fsdp=2")`; the sizes multiply to the device count):

    clients  the sampled clients of a round, and the N clients' data, split over devices
    fsdp     the frozen base weights split over devices (FSDP-style, `base_sharding`) when one
             copy does not fit a device; gathered where a layer uses them
    model    tensor parallelism for the cloud (`cloud_sharding`): attention heads and MLP width

Multi-host: `initialize_distributed` joins the cluster (call it before anything touches a
device). Each process then holds only its share of the clients' data: the clients whose rows
land on its own devices under `client_data_sharding` (`process_clients`), loaded by
`place_client_data(mesh, load)`. The round still samples over all N clients; the rows a sampled
client trains on are gathered across processes inside the round.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from floe_jax.config import ConfigError

log = logging.getLogger(__name__)

CLIENTS, FSDP, MODEL = "clients", "fsdp", "model"
AXES = (CLIENTS, FSDP, MODEL)

# Cloud tensor parallelism (Megatron-style): the projections into heads and MLP width are split
# on their output axis, the projections back to D on their input axis, so a layer needs one
# reduction after attention and one after the MLP. Names as in `floe_jax.model` (fused or not).
_SPLIT_OUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_SPLIT_IN = ("o_proj", "down_proj")


# ----------------------------------------------------------------------------- meshes


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`"clients=4,fsdp=2"` as `{"clients": 4, "fsdp": 2}` (order kept; axes from `AXES`).

    One size may be `-1`: the devices left over by the others."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ConfigError(
                f"mesh {spec!r}: {part!r} is not AXIS=SIZE with AXIS one of {AXES} "
                "(e.g. 'clients=8' or 'clients=4,fsdp=2')"
            )
        if name in out:
            raise ConfigError(f"mesh {spec!r}: axis {name!r} given twice")
        try:
            out[name] = int(size)
        except ValueError:
            raise ConfigError(f"mesh {spec!r}: size of {name!r} is {size!r}, not an int") from None
        if out[name] == 0 or out[name] < -1:
            raise ConfigError(f"mesh {spec!r}: size of {name!r} must be >= 1 (or -1: the rest)")
    return out


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) from a spec
    (`parse_mesh_spec`'s string or dict). Axis types are `Auto`: shardings inside the programs
    are XLA's to propagate, so the programs read as on one device."""
    axes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    rest = [a for a, n in axes.items() if n == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh {spec!r}: only one axis may have size -1")
    known = int(np.prod([n for n in axes.values() if n != -1]))
    if rest:
        if len(devices) % known:
            raise ConfigError(f"mesh {spec!r}: {len(devices)} devices do not split by {known}")
        axes[rest[0]] = len(devices) // known
    if int(np.prod(list(axes.values()))) != len(devices):
        raise ConfigError(
            f"mesh {spec!r} has {int(np.prod(list(axes.values())))} devices, but "
            f"{len(devices)} are present ({devices[0].platform}); the sizes must multiply "
            "to the device count"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(axes.values()), tuple(axes), auto, devices=devices)


def abstract_mesh(spec: str | dict[str, int]) -> jax.sharding.AbstractMesh:
    """A mesh of the spec's shape without devices (every size given): for lowering the sharded
    programs for another platform (`jax.sharding.use_abstract_mesh`), e.g. a TPU pod's from
    this host."""
    axes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    if -1 in axes.values():
        raise ConfigError(f"mesh {spec!r}: an abstract mesh needs every axis size")
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes), auto)


def axis_size(mesh, name: str) -> int:
    """The size of axis `name` of a mesh (concrete or abstract), 1 when it has no such axis."""
    if mesh is None or getattr(mesh, "empty", False):
        return 1
    return dict(mesh.shape).get(name, 1)


def client_blocks() -> int:
    """D, the number of devices a round's sampled clients are split over: the `clients` axis of
    the mesh being traced under (`jax.set_mesh`), 1 without one."""
    return axis_size(jax.sharding.get_abstract_mesh(), CLIENTS)


def split_clients(tree, D: int):
    """Leaves [C, ...] as [D, C / D, ...], the D blocks placed on the `clients` axis."""

    def split(x):
        if x.shape[0] % D:
            raise ConfigError(
                f"{x.shape[0]} sampled clients (FedConfig.clients_per_round) do not split "
                f"evenly over the mesh's {CLIENTS} axis of {D} devices"
            )
        y = x.reshape((D, x.shape[0] // D) + x.shape[1:])
        return jax.lax.with_sharding_constraint(y, P(CLIENTS))

    return jax.tree.map(split, tree)


def merge_clients(tree):
    """Leaves [D, C / D, ...] back as [C, ...] (inverse of `split_clients`)."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)


# ----------------------------------------------------------------------------- shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def client_data_sharding(mesh: Mesh) -> NamedSharding:
    """Client data [N, ...] split over the `clients` axis (replicated without one)."""
    return NamedSharding(mesh, P(CLIENTS) if CLIENTS in mesh.axis_names else P())


def _split_axis(shape, size: int, prefer: tuple[int, ...]) -> int | None:
    """The first axis of `prefer` (negative indices) that `size` divides, or None."""
    for ax in prefer:
        if len(shape) >= -ax and shape[ax] % size == 0 and shape[ax] >= size:
            return len(shape) + ax
    return None


def _spec(ndim: int, axis: int | None, name: str) -> P:
    parts = [None] * ndim
    if axis is not None:
        parts[axis] = name
    return P(*parts)


def base_sharding(mesh: Mesh, params):
    """`NamedSharding`s for the frozen base (a pytree of arrays or `ShapeDtypeStruct`s):
    with an `fsdp` axis, every matrix is split over it on its input axis (`[L, I, O]`: I; the
    embedding `[V, D]`: V), or its output axis where the input does not divide; vectors and
    leaves neither axis divides stay replicated (logged). Without one, all replicated."""
    n = axis_size(mesh, FSDP)

    def rule(path, x):
        if n == 1 or np.ndim(x) < 2:
            return NamedSharding(mesh, P())
        ax = _split_axis(np.shape(x), n, (-2, -1))
        if ax is None:
            log.info("base leaf %s %s stays replicated: no axis divides by fsdp=%d",
                     jax.tree_util.keystr(path), np.shape(x), n)  # fmt: skip
        return NamedSharding(mesh, _spec(np.ndim(x), ax, FSDP))

    return jax.tree_util.tree_map_with_path(rule, params)


def cloud_sharding(mesh: Mesh, params):
    """`NamedSharding`s for a cloud model's params (stacked or `unstack_layers`' per-layer and
    fused layout): tensor parallel over the `model` axis, Megatron-style. q/k/v and gate/up
    projections split on their output axis (heads, MLP width), o/down on their input axis, the
    embedding and `lm_head` on the vocabulary; norms, biases of split-input projections and
    anything the axis does not divide replicated (logged)."""
    n = axis_size(mesh, MODEL)

    def rule(path, x):
        keys = jax.tree_util.keystr(path)
        nd = np.ndim(x)
        if n == 1 or nd == 0:
            return NamedSharding(mesh, P())
        if any(k in keys for k in _SPLIT_IN) and nd >= 2:
            prefer = (-2,)
        elif any(k in keys for k in _SPLIT_OUT):
            prefer = (-1,)  # the weight's output axis, and its bias
        elif "lm_head" in keys:
            prefer = (-1,)
        elif "embed" in keys and nd >= 2:
            prefer = (-2,)
        else:
            return NamedSharding(mesh, P())
        ax = _split_axis(np.shape(x), n, prefer)
        if ax is None:
            log.info("cloud leaf %s %s stays replicated: model=%d does not divide it",
                     keys, np.shape(x), n)  # fmt: skip
        return NamedSharding(mesh, _spec(nd, ax, MODEL))

    return jax.tree_util.tree_map_with_path(rule, params)


@functools.lru_cache(maxsize=8)
def round_program(mesh: Mesh):
    """`run_round` for `mesh`: the same `round_step`, jitted with its outputs (state and
    metrics) replicated, so every process reads them whole; call it under `jax.set_mesh(mesh)`
    with `place_round_inputs`' inputs."""
    from floe_jax.federated.rounds import round_step

    return jax.jit(
        round_step, static_argnames=("cfg", "fed"), donate_argnames=("state",),
        out_shardings=replicated(mesh),
    )  # fmt: skip


# ----------------------------------------------------------------------------- placement


def place(tree, shardings):
    """Every leaf of `tree` (the same full value on every process) as a global array with its
    sharding: each process builds only the shards its devices hold (`make_array_from_callback`),
    so this works on one host and on many."""

    def put(x, s):
        if isinstance(x, jax.Array) and (
            not x.is_fully_addressable or jax.process_count() == 1
        ):  # already global (loaded per process), or one process: a plain transfer
            return jax.device_put(x, s)
        h = np.asarray(x)
        return jax.make_array_from_callback(h.shape, s, lambda idx: h[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def shard_cloud(mesh: Mesh | str, params):
    """A cloud model's params placed tensor-parallel over `mesh`'s `model` axis
    (`cloud_sharding`). A spec string (`"model=2"`) takes the first devices it counts, so the
    cloud can share a host with the edge (pick others with the mesh itself, or
    `CUDA_VISIBLE_DEVICES`). Every program the cloud then runs (prefill, decode steps,
    `LocalCloud`, `serve-cloud`'s engine) follows these shardings: XLA splits the heads and MLP
    width and inserts the reductions, the KV cache split likewise."""
    if isinstance(mesh, str):
        axes = parse_mesh_spec(mesh)
        n = int(np.prod([max(k, 1) for k in axes.values()]))
        devices = jax.devices()
        mesh = make_mesh(axes, devices[:n] if -1 not in axes.values() else devices)
    if MODEL not in mesh.axis_names:
        raise ConfigError(f"a cloud mesh needs a {MODEL!r} axis (e.g. 'model=2'); got {mesh.shape}")
    return place(params, cloud_sharding(mesh, params))


def process_clients(mesh: Mesh, num_clients: int) -> np.ndarray:
    """The client ids whose data this process holds under `client_data_sharding` (ascending):
    the union of its devices' row ranges. On one process, all N."""
    s = client_data_sharding(mesh)
    rows = set()
    for idx in s.addressable_devices_indices_map((num_clients,)).values():
        rows.update(range(num_clients)[idx[0]])
    return np.asarray(sorted(rows), np.int64)


def place_client_data(mesh: Mesh, data=None, *, load: Callable | None = None, num_clients=None):
    """Client data as global arrays split over the `clients` axis.

    Either `data` (a `ClientData` of all N clients, every process holding the same) or
    `load(ids) -> ClientData` with `num_clients`: each process calls `load` once with only its
    share (`process_clients`) and never holds another process's clients; every process's
    `load` must pad to the same examples E and tokens T (`client_data(..., min_examples=E)`).
    """
    from floe_jax.federated.types import ClientData

    s = client_data_sharding(mesh)
    if data is not None:
        _check_divides(data.num_clients, mesh)
        return place(data, s)
    if load is None or num_clients is None:
        raise ValueError("place_client_data needs data, or load and num_clients")
    _check_divides(num_clients, mesh)
    ids = process_clients(mesh, num_clients)
    local = load(ids)
    if not isinstance(local, ClientData) or local.num_clients != len(ids):
        got = getattr(local, "num_clients", type(local).__name__)
        raise ValueError(f"load({len(ids)} client ids) returned {got} clients, not {len(ids)}")
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            s, np.asarray(x), (num_clients,) + np.shape(x)[1:]
        ),
        local,
    )


def _check_divides(num_clients: int, mesh: Mesh) -> None:
    D = axis_size(mesh, CLIENTS)
    if num_clients % D:
        raise ConfigError(
            f"{num_clients} clients do not split evenly over the mesh's {CLIENTS} axis of {D} "
            "devices (each device holds N / D clients' data)"
        )


def place_round_inputs(mesh: Mesh, state, params, data, eval_data=None):
    """`(state, params, data, eval_data)` placed for a round under `mesh`: the server state
    replicated, the base by `base_sharding`, the client data by `client_data_sharding`."""
    state = place(state, replicated(mesh))
    params = place(params, base_sharding(mesh, params))
    data = place_client_data(mesh, data)
    if eval_data is not None:
        eval_data = place_client_data(mesh, eval_data)
    return state, params, data, eval_data


# ----------------------------------------------------------------------------- processes


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = "gloo",
) -> None:
    """Joins a `jax.distributed` cluster; call before anything touches a device.

    With no arguments the cluster is auto-detected (TPU pods, SLURM, Open MPI...); otherwise all
    three name it: the coordinator's `HOST:PORT` (process 0's host), the process count and this
    process's id. `cpu_collectives` picks the CPU backend's cross-process collectives (JAX's
    CPU backend has none by default), which the virtual-device tests and CPU hosts need."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError(
            "a jax.distributed cluster needs all of --coordinator, --num-processes and "
            "--process-id (or none of them, for the cluster's auto-detection)"
        )
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} is outside [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()


def is_primary() -> bool:
    """True on process 0, the one that writes a run folder's own files (metrics, fingerprint)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier of every process (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class ProcessFailedError(RuntimeError):
    """Another process of a multi-host run failed in a step the processes take together
    (`together`); its own log holds the error."""


def together(name: str, fn: Callable, *, primary_only: bool = False):
    """`fn()` as one step of every process: run on every process (or, `primary_only`, on process
    0 alone), then the processes agree on the outcome. A process whose `fn` raised re-raises its
    error; every other process raises `ProcessFailedError` naming the step and the failed
    processes. So an error on one process (a mismatched run folder found by process 0, a failed
    write) stops the whole run, instead of leaving the others waiting at the next barrier or
    collective. The agreement is itself a barrier: no `sync` is needed after it.

    Returns `fn()`'s result (None on the processes that did not run it). One process: `fn()`."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result, error = None, None
    if not primary_only or is_primary():
        try:
            result = fn()
        except BaseException as e:  # KeyboardInterrupt too: the others must not wait for it
            error = e
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed.any():
        raise ProcessFailedError(
            f"process(es) {np.flatnonzero(failed).tolist()} failed at {name!r}; "
            "their logs hold the error"
        )
    return result


# ----------------------------------------------------------------------------- memory


def shaped(tree, shardings):
    """`tree`'s leaves as `jax.ShapeDtypeStruct`s carrying `shardings` (one for all leaves, or a
    matching tree): a program's arguments for lowering or memory analysis, nothing allocated."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


def round_input_shapes(mesh, state, params, data, eval_data=None):
    """`place_round_inputs`' placement as `ShapeDtypeStruct`s (`shaped`): for lowering the
    sharded round, also over an `abstract_mesh`."""
    return (
        shaped(state, replicated(mesh)),
        shaped(params, base_sharding(mesh, params)),
        shaped(data, client_data_sharding(mesh)),
        None if eval_data is None else shaped(eval_data, client_data_sharding(mesh)),
    )


def round_bytes_per_device(
    mesh: Mesh, state, params, data, eval_data=None, *, cfg, fed
) -> dict[str, int]:
    """One device's memory for a federated round under `mesh`, in bytes, from XLA's compiled
    memory analysis of the sharded round (`run_round`'s program). Arguments may be arrays or
    `jax.ShapeDtypeStruct`s: nothing is allocated or run. Keys as
    `floe_jax.federated.client.client_memory_bytes`: `arguments` (this device's shards of the
    state, base and data), `temporaries`, `outputs`, `total`."""
    from floe_jax.federated.client import compiled_memory
    from floe_jax.federated.rounds import round_step

    args = round_input_shapes(mesh, state, params, data, eval_data)
    fn = jax.jit(lambda s, p, d, e: round_step(s, p, d, e, cfg=cfg, fed=fed))
    with jax.set_mesh(mesh):
        return compiled_memory(fn.lower(*args).compile())


__all__ = [
    "AXES",
    "abstract_mesh",
    "CLIENTS",
    "FSDP",
    "MODEL",
    "axis_size",
    "base_sharding",
    "client_blocks",
    "client_data_sharding",
    "cloud_sharding",
    "initialize_distributed",
    "is_primary",
    "ProcessFailedError",
    "make_mesh",
    "merge_clients",
    "parse_mesh_spec",
    "place",
    "place_client_data",
    "place_round_inputs",
    "process_clients",
    "replicated",
    "round_bytes_per_device",
    "together",
    "round_input_shapes",
    "round_program",
    "shard_cloud",
    "shaped",
    "split_clients",
    "sync",
]
