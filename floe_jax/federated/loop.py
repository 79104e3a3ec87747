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

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
from flax.traverse_util import flatten_dict
from tqdm.auto import tqdm

from floe_jax import checkpoint
from floe_jax.config import ConfigError, ModelConfig
from floe_jax.federated.cluster import cluster_by_updates
from floe_jax.federated.config import FedConfig
from floe_jax.federated.dp import host_metrics as dp_host_metrics
from floe_jax.federated.rounds import (
    ServerState,
    check_data,
    check_round,
    drop_reasons,
    init_server_state,
    run_round,
    tensor_names,
)
from floe_jax.federated.types import ClientData

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
FINGERPRINT_VERSION = 1
# FedConfig fields that decide when the run saves, how many checkpoints it keeps and how its
# clients are batched (`lax.map` chunks or one `vmap`: the same computation), never its numbers.
# `num_rounds` is left out too: rounds depend on the key and their index only, so a resumed run
# may go on past the rounds it first asked for.
UNFINGERPRINTED_FIELDS = ("checkpoint_every", "max_to_keep", "client_chunk", "num_rounds")
# Files of a run in its folder: cleared by `restart=True`, and evidence of a run when present.
RUN_FILES = ("metrics.jsonl", "clusters.json", "fed_config.json", FINGERPRINT_FILE)


class RunMismatchError(ConfigError):
    """A run folder holds a run with other settings than the ones given (the message lists
    each differing setting with its saved and its new value)."""


class UntrainedRunError(ConfigError):
    """A run folder asked for trained adapters holds none, or an unfinished run."""


class NothingTrainedError(RuntimeError):
    """Every sampled client was dropped in every round of a run: nothing was aggregated."""


def tree_digest(tree) -> str:
    """A short SHA-256 of a pytree of arrays: every leaf's path, shape, dtype and bytes."""
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.ascontiguousarray(np.asarray(x))
        h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype.name};".encode())
        h.update(x.tobytes())
    return h.hexdigest()[:16]


def run_fingerprint(
    params, data, *, cfg, fed, ranks, assignment=None, num_clusters=1, eval_data=None
) -> dict:
    """The settings that shape a federated run's numbers, flat and JSON-ready: `fed.*` (less
    `UNFINGERPRINTED_FIELDS`), `model.*` (less `attention_impl`, which picks a decode kernel that
    training never runs), the clients' ranks, the given assignment and cluster count, and digests
    of the base params, the client data and the eval data (`tree_digest`).

    Hashing reads every base weight once per call, a host pass over the weights that is small
    beside the rounds a run trains."""
    fed_d = {k: v for k, v in dataclasses.asdict(fed).items() if k not in UNFINGERPRINTED_FIELDS}
    model = dataclasses.asdict(cfg)
    model.pop("attention_impl", None)
    out = {
        "version": FINGERPRINT_VERSION,
        "fed": fed_d,
        "model": model,
        "ranks": np.asarray(ranks).tolist(),
        "assignment": None if assignment is None else np.asarray(assignment).tolist(),
        "num_clusters": int(num_clusters),
        "base_params": tree_digest(params),
        "data": tree_digest(data),
        "eval_data": None if eval_data is None else tree_digest(eval_data),
    }
    return json.loads(json.dumps(flatten_dict(out, sep="."), default=str))


def fingerprint_digest(fingerprint: dict) -> str:
    """A short hash of a fingerprint, stored in each checkpoint to tie it to its run."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """One line per differing setting: `name: saved X, now Y`."""
    show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"  # NaN equals NaN here
    return [
        f"{k}: saved {show(saved, k)}, now {show(now, k)}"
        for k in sorted(set(saved) | set(now))
        if show(saved, k) != show(now, k)
    ]


def _has_run(run_dir: str) -> bool:
    ckpt = os.path.join(run_dir, "checkpoints")
    return checkpoint.latest_step(ckpt) is not None or any(
        os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES
    )


def clear_run(run_dir: str) -> None:
    """Deletes a run's checkpoints, metrics, clusters and fingerprint from `run_dir` (other
    files stay)."""
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    for f in RUN_FILES:
        path = os.path.join(run_dir, f)
        if os.path.exists(path):
            os.remove(path)


def _holds_this_run(run_dir: str, fingerprint: dict) -> bool:
    """True when `run_dir` holds the run `fingerprint` describes, False when it holds no run;
    raises RunMismatchError when it holds another run or one of unknown settings."""
    path = os.path.join(run_dir, FINGERPRINT_FILE)
    if not os.path.exists(path):
        if _has_run(run_dir):
            raise RunMismatchError(
                f"run folder {run_dir} holds a run without a {FINGERPRINT_FILE}, so its "
                "settings are unknown; pass restart=True to start over or use another folder"
            )
        return False
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise RunMismatchError(
            f"run folder {run_dir}: {FINGERPRINT_FILE} cannot be read ({e}); pass "
            "restart=True to start the run over"
        ) from e
    diff = fingerprint_differences(saved, fingerprint)
    if diff:
        raise RunMismatchError(
            f"run folder {run_dir} holds a run with other settings; pass restart=True to "
            "start over (clearing its checkpoints and metrics) or use another folder. "
            "Differences:\n  " + "\n  ".join(diff)
        )
    return True


def _nothing_trained_yet(run_dir: str) -> bool:
    """True when `run_dir` has no checkpoint and no metrics line: a start that died before its
    first round ended (during clustering, say), whose claim on the folder need not stand."""
    if checkpoint.latest_step(os.path.join(run_dir, "checkpoints")) is not None:
        return False
    path = os.path.join(run_dir, "metrics.jsonl")
    return not os.path.exists(path) or os.path.getsize(path) == 0


def _claim_run_dir(run_dir: str, fingerprint: dict, *, restart: bool) -> None:
    """Makes `run_dir` this run's: checks a resumed run's fingerprint (another run is an error,
    unless `restart`, or unless it died before any round ended: then it is cleared), writes a
    new run's."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ConfigError(f"run_dir={run_dir!r} cannot be a folder: {e}") from e
    try:
        holds = _holds_this_run(run_dir, fingerprint)
    except RunMismatchError:
        if not (restart or _nothing_trained_yet(run_dir)):
            raise
        log.info("clearing the other run in %s", run_dir)
        clear_run(run_dir)
        holds = False
    if not holds:
        with open(os.path.join(run_dir, FINGERPRINT_FILE), "w") as f:
            json.dump(fingerprint, f, indent=1)


def _restore_run(run_dir: str, state: ServerState, digest: str, fed: FedConfig):
    """`(state, checkpoint metadata)` from the newest intact checkpoint of this run (`digest`),
    at most `fed.num_rounds` rounds in."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    state, meta = checkpoint.restore(ckpt_dir, state)
    rnd = int(state.round)
    if meta.get("fingerprint") != digest:
        raise RunMismatchError(
            f"run folder {run_dir}: the checkpoint of round {rnd} was written by a run with "
            f"another fingerprint than {FINGERPRINT_FILE}'s; pass restart=True to start over"
        )
    if rnd > fed.num_rounds:
        raise RunMismatchError(
            f"run folder {run_dir} holds a checkpoint of round {rnd}, past "
            f"FedConfig.num_rounds={fed.num_rounds}; pass restart=True to start over"
        )
    return state, meta


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


def _resolve_clusters(
    params, data, *, cfg, fed, ranks, assignment, num_clusters, run_dir, updates=None
):
    """The (assignment, K) this run uses; `"updates"` clustering is computed once and stored in
    `run_dir/clusters.json`, so a resumed run keeps the same clusters. `updates`, when given,
    is a `() -> (labels, info)` that computes the clustering instead of `cluster_by_updates`
    (the Flower server gathers the clients' updates over the network)."""
    if fed.clustering != "updates":
        return assignment, num_clusters
    path = os.path.join(run_dir, "clusters.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    else:
        if updates is None:
            labels, info = cluster_by_updates(params, data, cfg=cfg, fed=fed, ranks=ranks)
        else:
            labels, info = updates()
        saved = {"assignment": [int(x) for x in labels], "num_clusters": int(labels.max()) + 1}
        saved.update(info)
        with open(path, "w") as f:
            json.dump(saved, f)
        log.info("clustered %d clients into %d clusters", len(labels), saved["num_clusters"])
    return np.asarray(saved["assignment"], np.int32), saved["num_clusters"]


def _nothing_trained(rows: list[dict], run_dir: str) -> str | None:
    """Why no client was ever aggregated over `rows` (a whole run's metrics), or None when one
    was."""
    if not rows or any(r["included"] > 0 for r in rows):
        return None
    first, count = {}, {}
    for r in rows:
        for cid, why in r["dropped"].items():
            first.setdefault(cid, why)
            count[cid] = count.get(cid, 0) + 1
    shown = [
        f"client {c}: {first[c]} ({count[c]} of {len(rows)} rounds)" for c in sorted(first, key=int)
    ]
    if len(shown) > 8:
        shown = shown[:8] + [f"... {len(shown) - 8} more clients"]
    return (
        f"run {run_dir}: every sampled client was dropped in every one of its {len(rows)} "
        "rounds, so nothing was trained: " + "; ".join(shown)
    )


def _initial_state(params, data, *, cfg, fed, ranks, assignment, num_clusters, run_dir):
    """The fresh server state of the run in `run_dir`: its clusters (given, computed by
    `_resolve_clusters`, or read back from the folder) and `init_server_state`."""
    assignment, num_clusters = _resolve_clusters(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, run_dir=run_dir,
    )  # fmt: skip
    return init_server_state(
        cfg, fed, ranks=ranks, assignment=assignment, num_clusters=num_clusters
    )


def resume_or_start(run_dir: str, state: ServerState, digest: str, fed: FedConfig) -> ServerState:
    """The state a claimed run folder continues from: its newest intact checkpoint (later ones
    deleted, metrics lines past it dropped, a metrics line lost between checkpoint and write
    restored), or, for a new run, `state` itself with `fed_config.json` written and the metrics
    file emptied."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if checkpoint.latest_step(ckpt_dir) is None:
        _rewrite_jsonl(metrics_path, 0)
        with open(os.path.join(run_dir, "fed_config.json"), "w") as f:
            json.dump(dataclasses.asdict(fed), f, indent=1)
        return state
    state, meta = _restore_run(run_dir, state, digest, fed)
    rnd = int(state.round)
    checkpoint.delete_steps_after(ckpt_dir, rnd)  # damaged ones skipped by the restore
    log.info("resumed %s at round %d", run_dir, rnd)
    done = _rewrite_jsonl(metrics_path, rnd)
    last = meta.get("last_metrics")
    if last is not None and last["round"] not in done:
        with open(metrics_path, "a") as f:  # killed between checkpoint and metrics line
            f.write(json.dumps(last) + "\n")
    return state


def save_round(
    run_dir: str, rounds_done: int, state: ServerState, fed: FedConfig, digest: str, row: dict
) -> None:
    """Checkpoints `state` after `rounds_done` rounds with its metrics `row` in the metadata
    (saved before the row is appended to metrics.jsonl: a kill in between is repaired on
    resume)."""
    meta = {
        "round": rounds_done,
        "fed": dataclasses.asdict(fed),
        "fingerprint": digest,
        "last_metrics": row,
    }
    checkpoint.save(
        os.path.join(run_dir, "checkpoints"), rounds_done, state, meta,
        max_to_keep=fed.max_to_keep,
    )  # fmt: skip


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

    Returns:
      `(state, rows)`: the final server state and the metric rows written by this call.

    Raises:
      RunMismatchError: `run_dir` holds a run with other settings (lists them) or a checkpoint
        past `fed.num_rounds`.
      NothingTrainedError: the run is complete and no client was aggregated in any round.
    """
    ranks = np.full((data.num_clients,), fed.lora.rank) if ranks is None else ranks
    check_data(fed, data, cfg=cfg, eval_data=eval_data)
    fingerprint = run_fingerprint(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, eval_data=eval_data,
    )  # fmt: skip
    _claim_run_dir(run_dir, fingerprint, restart=restart)
    digest = fingerprint_digest(fingerprint)
    state = _initial_state(
        params, data, cfg=cfg, fed=fed, ranks=ranks, assignment=assignment,
        num_clusters=num_clusters, run_dir=run_dir,
    )  # fmt: skip
    state = resume_or_start(run_dir, state, digest, fed)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    check_round(fed, data, state, cfg=cfg, eval_data=eval_data)
    names = tensor_names(state.global_loras)
    first = int(state.round)
    last_round = fed.num_rounds if stop_after is None else min(fed.num_rounds, first + stop_after)

    rows: list[dict] = []

    def emit(m, t0, extra_save=None):
        m = jax.device_get(m)  # blocks until that round is done
        row = round_row(m, names, fed, time.perf_counter() - t0, num_clients=data.num_clients)
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
                save_round(run_dir, r + 1, state, fed, digest, row)

            emit(m, t0, save)
        else:
            pending = (m, t0)
    bar.close()
    if fed.dp.enabled and rows:
        log.info("DP: ε = %s at δ = %g after %d rounds", rows[-1]["dp_epsilon"], fed.dp.delta,
                 rows[-1]["round"] + 1)  # fmt: skip
    if int(state.round) == fed.num_rounds:
        _check_trained(run_dir)
    return state, rows


def _check_trained(run_dir: str) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            why = _nothing_trained([json.loads(x) for x in f if x.strip()], run_dir)
        if why is not None:
            raise NothingTrainedError(why)


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
    if not _holds_this_run(run_dir, fingerprint) or checkpoint.latest_step(ckpt_dir) is None:
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
    state, _ = _restore_run(run_dir, state, fingerprint_digest(fingerprint), fed)
    if int(state.round) != fed.num_rounds:
        raise UntrainedRunError(
            f"run folder {run_dir} holds round {int(state.round)} of "
            f"FedConfig.num_rounds={fed.num_rounds}; finish the run first (train_federated "
            "resumes it)"
        )
    _check_trained(run_dir)
    return state
