"""The federated round loop: one jitted round per iteration, an orbax checkpoint of the server
state every `checkpoint_every` rounds, metrics appended to a JSONL file, exact resume.

Resume is exact because a round's randomness comes only from the stored key and round index
(`fold_in(key, round)`), and the state is restored bit for bit. Metrics are fetched one round late
(the next round is dispatched first) except on checkpoint rounds, where the state is needed on the
host anyway.

A run folder cannot be confused with another run: `fingerprint.json` holds what shapes the run's
numbers (`run_fingerprint`), and resuming with any of it changed is a `RunMismatchError` listing
the differences, unless `restart=True`, which clears a folder holding another run (the run's own
checkpoints are kept and resumed). `load_trained` reads a finished
run's adapters and never trains. A damaged newest checkpoint falls back to the previous intact one
(`floe_jax.checkpoint.restore`), and a run in which no client was ever aggregated ends with
`NothingTrainedError` instead of returning untrained adapters.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from floe_jax import checkpoint, sharding
from floe_jax.config import ModelConfig
from floe_jax.federated.checks import check_base_format, check_data, check_round, drop_reasons
from floe_jax.federated.cluster import cluster_by_updates
from floe_jax.federated.config import FedConfig
from floe_jax.federated.dp import host_metrics as dp_host_metrics
from floe_jax.federated.rounds import (
    ServerState,
    init_server_state,
    round_config,
    run_round,
    tensor_names,
)
from floe_jax.federated.run_folder import (
    UntrainedRunError,
    check_trained,
    claim_run_dir,
    fingerprint_digest,
    holds_this_run,
    restore_run,
    resume_or_start,
    run_fingerprint,
    save_round,
)
from floe_jax.federated.types import ClientData

log = logging.getLogger(__name__)


def _host_metrics(m: dict, names: list[str], fed: FedConfig, seconds: float) -> dict:
    """Divides sums on the host and names every dropped client; raises on a non-finite global."""
    rnd = int(m["round"])
    if not bool(m["global_finite"]):
        raise FloatingPointError(
            f"round {rnd}: the aggregated global adapter is not finite (aggregation="
            f"{fed.agg.method!r}); the checkpoint of round {rnd} is the last good state"
        )
    dropped = drop_reasons(m, names, fed)
    for cid, why in dropped.items():
        log.warning("round %d: client %d dropped: %s", rnd, cid, why)
    tokens = float(m["tokens"])
    out = {
        "round": rnd,
        "loss": float(m["loss_sum"]) / tokens if tokens > 0 else None,
        "tokens": tokens,
        "clients": [int(c) for c in np.asarray(m["client_ids"])],
        "included": int(np.sum(np.asarray(m["included"]))),
        "dropped": {str(k): v for k, v in dropped.items()},
        "bytes_up": float(m["bytes_up"]),
        "bytes_down": float(m["bytes_down"]),
        "seconds": seconds,
    }
    if "eval_loss_sum" in m:
        n = float(m["eval_tokens"])
        out["eval_loss"] = float(m["eval_loss_sum"]) / n if n > 0 else None
        out["eval_tokens"] = n
    return out


def round_row(m: dict, names: list[str], fed: FedConfig, seconds: float, *, num_clients: int):
    """A round's metrics.jsonl row from its host-fetched metrics (`_host_metrics`, with the
    privacy spent when `fed.dp` is enabled)."""
    row = _host_metrics(m, names, fed, seconds)
    row.update(dp_host_metrics(m, fed.dp, num_clients=num_clients,
                               clients_per_round=fed.clients_per_round))  # fmt: skip
    return row


def resolve_clusters(
    params, data, *, cfg, fed, ranks, assignment, num_clusters, run_dir, updates=None
):
    """The (assignment, K) this run uses; `"updates"` clustering is computed once and stored in
    `run_dir/clusters.json`, so a resumed run keeps the same clusters. `updates`, when given,
    is a `() -> (labels, info)` that computes the clustering instead of `cluster_by_updates`
    (the Flower server gathers the clients' updates over the network)."""
    if fed.clustering != "updates":
        return assignment, num_clusters
    path = os.path.join(run_dir, "clusters.json")
    exists = os.path.exists(path)
    sharding.sync("floe_jax:clusters_checked")  # before process 0 may write it
    if exists:
        with open(path) as f:
            saved = json.load(f)
    else:
        if updates is None:
            labels, info = cluster_by_updates(params, _whole(data), cfg=cfg, fed=fed, ranks=ranks)
        else:
            labels, info = updates()
        saved = {"assignment": [int(x) for x in labels], "num_clusters": int(labels.max()) + 1}
        saved.update(info)

        def write():
            with open(path, "w") as f:
                json.dump(saved, f)

        sharding.together("floe_jax:write_clusters", write, primary_only=True)
        log.info("clustered %d clients into %d clusters", len(labels), saved["num_clusters"])
    return np.asarray(saved["assignment"], np.int32), saved["num_clusters"]


def _whole(data: ClientData) -> ClientData:
    """`data` whole on this process: a multi-host run's client data (each process holding its
    share) gathered from every process, for the one-time update clustering that every process
    then computes alike on its own devices."""
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(data)):
        return data
    from jax.experimental import multihost_utils

    return jax.tree.map(jnp.asarray, multihost_utils.process_allgather(data, tiled=True))


def _initial_state(params, data, *, cfg, fed, ranks, assignment, num_clusters, run_dir):
    """The fresh server state of the run in `run_dir`: its clusters (given, computed by
    `resolve_clusters`, or read back from the folder) and `init_server_state`."""
    assignment, num_clusters = resolve_clusters(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, run_dir=run_dir,
    )  # fmt: skip
    return init_server_state(
        cfg, fed, ranks=ranks, assignment=assignment, num_clusters=num_clusters
    )


def train_federated(
    params: dict,
    data: ClientData,
    *,
    cfg: ModelConfig,
    fed: FedConfig,
    run_dir: str,
    ranks=None,
    assignment=None,
    num_clusters: int = 1,
    eval_data: ClientData | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    restart: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ServerState, list[dict]]:
    """Runs (or resumes) `fed.num_rounds` rounds, writing `run_dir/checkpoints/`,
    `run_dir/metrics.jsonl` and `run_dir/fingerprint.json`.

    Args:
      params: frozen base params (never checkpointed).
      data: every client's training examples; `eval_data` likewise, optional.
      cfg, fed: model and run config.
      run_dir: output folder; when it holds a run with the same fingerprint
        (`run_fingerprint`), the run resumes from its newest intact checkpoint.
      ranks: [N] true LoRA rank per client (default: `fed.lora.rank` for all).
      assignment, num_clusters: cluster of each client and the cluster count K (with
        `fed.clustering == "updates"` both come from `cluster_by_updates` instead).
      stop_after: return after this many rounds in this call (a deliberate interruption).
      progress: show a tqdm bar.
      restart: when `run_dir` holds another run (or one of unknown settings), clear it
        (checkpoints, metrics, clusters, fingerprint) and start over instead of refusing it; a
        folder holding this run resumes either way.
      mesh: run every round over this `jax.sharding.Mesh` (`floe_jax.sharding.make_mesh`):
        the sampled clients split over its `clients` axis, the base over its `fsdp` axis.
        The same round program; its numbers equal one device's up to float summation order.
        In a multi-host run (`floe_jax.sharding.initialize_distributed`) every process calls
        this with the mesh over all devices and `data` either whole or as the global arrays of
        `sharding.place_client_data(mesh, load=...)` (each process holding its share);
        process 0 writes the folder's files, every process the checkpoints (orbax).

    Returns:
      `(state, rows)`: the final server state and the metric rows written by this call.

    Raises:
      RunMismatchError: `run_dir` holds a run with other settings (lists them) or a checkpoint
        past `fed.num_rounds`.
      NothingTrainedError: the run is complete and no client was aggregated in any round.
    """
    ranks = np.full((data.num_clients,), fed.lora.rank) if ranks is None else ranks
    check_data(fed, data, cfg=cfg, eval_data=eval_data)
    check_base_format(fed, params)
    fingerprint = run_fingerprint(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, eval_data=eval_data,
    )  # fmt: skip
    # Process 0 alone checks and claims the folder; a mismatch it finds stops every process.
    claim = lambda: claim_run_dir(run_dir, fingerprint, restart=restart)  # noqa: E731
    sharding.together("floe_jax:claim_run_dir", claim, primary_only=True)
    digest = fingerprint_digest(fingerprint)
    state = _initial_state(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, run_dir=run_dir,
    )  # fmt: skip
    state = sharding.together(
        "floe_jax:resume_or_start", lambda: resume_or_start(run_dir, state, digest, fed)
    )
    program_fed = round_config(fed, ranks)  # the run's own `fed` keys its folder and checkpoints
    step, in_mesh = run_round, contextlib.nullcontext
    if mesh is not None:
        state, params, data, eval_data = sharding.place_round_inputs(
            mesh, state, params, data, eval_data
        )
        step, in_mesh = sharding.round_program(mesh), functools.partial(jax.set_mesh, mesh)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    check_round(fed, data, state, cfg=cfg, eval_data=eval_data)
    names = tensor_names(state.global_loras)
    first = int(state.round)
    last_round = fed.num_rounds if stop_after is None else min(fed.num_rounds, first + stop_after)

    rows: list[dict] = []
    # Process 0's failed metrics write in a multi-host run: the processes agree on it at the next
    # checkpoint, before saving (no checkpoint past a lost line), not with a sync every round.
    failed_write: list[OSError] = []

    def write(row):
        try:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            if jax.process_count() == 1:
                raise
            failed_write.append(e)

    def writes_ok():
        if failed_write:
            raise failed_write[0]

    def emit(m, t0, extra_save=None):
        m = jax.device_get(m)  # blocks until that round is done
        row = round_row(m, names, fed, time.perf_counter() - t0, num_clients=data.num_clients)
        if extra_save is not None:
            sharding.together("floe_jax:metrics_lines", writes_ok, primary_only=True)
            extra_save(row)
        if sharding.is_primary() and not failed_write:
            write(row)
        rows.append(row)
        bar.set_postfix(loss=row["loss"], dropped=len(row["dropped"]))

    bar = tqdm(range(first, last_round), initial=first, total=fed.num_rounds, disable=not progress)
    pending = None  # (device metrics, start time) of the previous round, fetched one round late
    for r in bar:
        t0 = time.perf_counter()
        with in_mesh():
            state, m = step(state, params, data, eval_data, cfg=cfg, fed=program_fed)
        if pending is not None:
            emit(*pending)
            pending = None
        if (r + 1) % fed.checkpoint_every == 0 or r + 1 == last_round:
            # Saved before the metrics line: a kill in between is repaired on resume.
            def save(row, r=r, state=state):
                save_round(run_dir, r + 1, state, fed, digest, row)

            emit(m, t0, save)
        else:
            pending = (m, t0)
    bar.close()
    if fed.dp.enabled and rows:
        log.info("DP: ε = %s at δ = %g after %d rounds", rows[-1]["dp_epsilon"], fed.dp.delta,
                 rows[-1]["round"] + 1)  # fmt: skip
    sharding.together("floe_jax:metrics_written", writes_ok, primary_only=True)
    if int(state.round) == fed.num_rounds:
        check_trained(run_dir)
    return state, rows


def load_trained(
    params: dict,
    data: ClientData,
    *,
    cfg: ModelConfig,
    fed: FedConfig,
    run_dir: str,
    ranks=None,
    assignment=None,
    num_clusters: int = 1,
    eval_data: ClientData | None = None,
) -> ServerState:
    """The final server state of the finished run in `run_dir` (`train_federated` with the same
    arguments), never training: for evaluation, which must not score untrained adapters.

    Raises:
      UntrainedRunError: `run_dir` holds no checkpoint, or the run has not finished.
      RunMismatchError: `run_dir` holds a run with other settings (lists them).
      NothingTrainedError: the run aggregated no client in any round.
    """
    ranks = np.full((data.num_clients,), fed.lora.rank) if ranks is None else ranks
    fingerprint = run_fingerprint(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, eval_data=eval_data,
    )  # fmt: skip
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not holds_this_run(run_dir, fingerprint) or checkpoint.latest_step(ckpt_dir) is None:
        raise UntrainedRunError(
            f"run folder {run_dir} holds no trained adapters (no checkpoint); train them first "
            "(train_federated, or the `federate` command)"
        )
    if fed.clustering == "updates" and not os.path.exists(os.path.join(run_dir, "clusters.json")):
        raise UntrainedRunError(f"run folder {run_dir} has checkpoints but no clusters.json")
    state = _initial_state(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, run_dir=run_dir,
    )  # fmt: skip
    state, _ = restore_run(run_dir, state, fingerprint_digest(fingerprint), fed)
    if int(state.round) != fed.num_rounds:
        raise UntrainedRunError(
            f"run folder {run_dir} holds round {int(state.round)} of "
            f"FedConfig.num_rounds={fed.num_rounds}; finish the run first (train_federated "
            "resumes it)"
        )
    check_trained(run_dir)
    return state
