"""The federated round loop: one jitted round per iteration, an orbax checkpoint of the server
state every `checkpoint_every` rounds, metrics appended to a JSONL file, exact resume.

Resume is exact because a round's randomness comes only from the stored key and round index
(`fold_in(key, round)`), and the state is restored bit for bit. Metrics are fetched one round late
(the next round is dispatched first) except on checkpoint rounds, where the state is needed on the
host anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from floe_jax import checkpoint
from floe_jax.config import ModelConfig
from floe_jax.federated.cluster import cluster_by_updates
from floe_jax.federated.config import FedConfig
from floe_jax.federated.dp import host_metrics as dp_host_metrics
from floe_jax.federated.rounds import (
    ServerState,
    check_round,
    drop_reasons,
    init_server_state,
    run_round,
    tensor_names,
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


def _rewrite_jsonl(path: str, upto_round: int) -> set[int]:
    """Keeps the lines of rounds < `upto_round` (a resumed run rewrites the rest); returns the
    rounds kept."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["round"] < upto_round]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {r["round"] for r in rows}


def _resolve_clusters(params, data, *, cfg, fed, ranks, assignment, num_clusters, run_dir):
    """The (assignment, K) this run uses; `"updates"` clustering is computed once and stored in
    `run_dir/clusters.json`, so a resumed run keeps the same clusters."""
    if fed.clustering != "updates":
        return assignment, num_clusters
    path = os.path.join(run_dir, "clusters.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    else:
        labels, info = cluster_by_updates(params, data, cfg=cfg, fed=fed, ranks=ranks)
        saved = {"assignment": [int(x) for x in labels], "num_clusters": int(labels.max()) + 1}
        saved.update(info)
        with open(path, "w") as f:
            json.dump(saved, f)
        log.info("clustered %d clients into %d clusters", len(labels), saved["num_clusters"])
    return np.asarray(saved["assignment"], np.int32), saved["num_clusters"]


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
) -> tuple[ServerState, list[dict]]:
    """Runs (or resumes) `fed.num_rounds` rounds, writing `run_dir/checkpoints/` and
    `run_dir/metrics.jsonl`.

    Args:
      params: frozen base params (never checkpointed).
      data: every client's training examples; `eval_data` likewise, optional.
      cfg, fed: model and run config.
      run_dir: output folder; when it holds a checkpoint, the run resumes from the newest one.
      ranks: [N] true LoRA rank per client (default: `fed.lora.rank` for all).
      assignment, num_clusters: cluster of each client and the cluster count K (with
        `fed.clustering == "updates"` both come from `cluster_by_updates` instead).
      stop_after: return after this many rounds in this call (a deliberate interruption).
      progress: show a tqdm bar.

    Returns:
      `(state, rows)`: the final server state and the metric rows written by this call.
    """
    ranks = np.full((data.num_clients,), fed.lora.rank) if ranks is None else ranks
    os.makedirs(run_dir, exist_ok=True)
    assignment, num_clusters = _resolve_clusters(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, run_dir=run_dir,
    )  # fmt: skip
    state = init_server_state(
        cfg, fed, ranks=ranks, assignment=assignment, num_clusters=num_clusters
    )
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    if checkpoint.latest_step(ckpt_dir) is not None:
        state, meta = checkpoint.restore(ckpt_dir, state)
        log.info("resumed %s at round %d", run_dir, int(state.round))
        done = _rewrite_jsonl(metrics_path, int(state.round))
        last = meta.get("last_metrics")
        if last is not None and last["round"] not in done:
            with open(metrics_path, "a") as f:  # killed between checkpoint and metrics line
                f.write(json.dumps(last) + "\n")
    else:
        _rewrite_jsonl(metrics_path, 0)
        with open(os.path.join(run_dir, "fed_config.json"), "w") as f:
            json.dump(dataclasses.asdict(fed), f, indent=1)
    check_round(fed, data, state)
    names = tensor_names(state.global_loras)
    first = int(state.round)
    last_round = fed.num_rounds if stop_after is None else min(fed.num_rounds, first + stop_after)

    rows: list[dict] = []

    def emit(m, t0, extra_save=None):
        m = jax.device_get(m)  # blocks until that round is done
        row = _host_metrics(m, names, fed, time.perf_counter() - t0)
        row.update(dp_host_metrics(m, fed.dp, num_clients=data.num_clients,
                                   clients_per_round=fed.clients_per_round))  # fmt: skip
        if extra_save is not None:
            extra_save(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        bar.set_postfix(loss=row["loss"], dropped=len(row["dropped"]))

    bar = tqdm(range(first, last_round), initial=first, total=fed.num_rounds, disable=not progress)
    pending = None  # (device metrics, start time) of the previous round, fetched one round late
    for r in bar:
        t0 = time.perf_counter()
        state, m = run_round(state, params, data, eval_data, cfg=cfg, fed=fed)
        if pending is not None:
            emit(*pending)
            pending = None
        if (r + 1) % fed.checkpoint_every == 0 or r + 1 == last_round:
            # Saved before the metrics line: a kill in between is repaired on resume.
            def save(row, r=r, state=state):
                meta = {"round": r + 1, "fed": dataclasses.asdict(fed), "last_metrics": row}
                checkpoint.save(ckpt_dir, r + 1, state, meta, max_to_keep=fed.max_to_keep)

            emit(m, t0, save)
        else:
            pending = (m, t0)
    bar.close()
    if fed.dp.enabled and rows:
        log.info("DP: ε = %s at δ = %g after %d rounds", rows[-1]["dp_epsilon"], fed.dp.delta,
                 rows[-1]["round"] + 1)  # fmt: skip
    return state, rows
