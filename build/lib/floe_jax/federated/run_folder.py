"""A federated run's folder: what makes it this run's and how it picks up where it stopped.

`fingerprint.json` holds what shapes the run's numbers (`run_fingerprint`); claiming a folder
that holds another run is a `RunMismatchError` listing the differences, unless `restart`, which
clears it (`claim_run_dir`). `resume_or_start` continues from the newest intact checkpoint
(metrics lines past it dropped, one lost between checkpoint and write restored); `save_round`
checkpoints a round with its metrics row; `check_trained` refuses a run that aggregated no
client in any round. Used by the round loop (`floe_jax.federated.loop`) and the Flower server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from floe_jax import checkpoint
from floe_jax.config import ConfigError
from floe_jax.federated.config import FedConfig

if TYPE_CHECKING:
    from floe_jax.federated.rounds import ServerState

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
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype.name};".encode())
            h.update(_global_digest(x))
            continue
        x = np.ascontiguousarray(np.asarray(x))
        h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype.name};".encode())
        h.update(x.tobytes())
    return h.hexdigest()[:16]


def _global_digest(x: jax.Array) -> bytes:
    """SHA-256 of an array spread over processes (a multi-host run's client data): each
    process hashes the shards it holds, and every process combines all of them in index order.
    (Not the digest of the same values on one host: a run folder resumes with its process
    layout.)"""
    from jax.experimental import multihost_utils

    mine = sorted(
        (tuple((i.start or 0) for i in sh.index), hashlib.sha256(np.asarray(sh.data).tobytes()))
        for sh in x.addressable_shards
        if sh.replica_id == 0
    )
    local = np.zeros((len(x.sharding.device_set), x.ndim + 32), np.int64)
    for k, (start, d) in enumerate(mine):
        local[k, : x.ndim] = start
        local[k, x.ndim :] = np.frombuffer(d.digest(), np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, x.ndim + 32)
    rows = sorted({tuple(r) for r in rows.tolist() if any(r[x.ndim :])})
    return hashlib.sha256(np.asarray(rows, np.int64).tobytes()).digest()


def run_fingerprint(
    params, data, *, cfg, fed, ranks, assignment=None, num_clusters=1, eval_data=None
) -> dict:
    """The settings that shape a federated run's numbers, flat and JSON-ready: `fed.*` (less
    `UNFINGERPRINTED_FIELDS`), `model.*` (less `attention_impl`, which picks a decode kernel that
    training never runs, and `remat` and `loss_chunk`, which trade memory for compute), the
    clients' ranks, the given assignment and cluster count, and digests of the base params, the
    client data and the eval data (`tree_digest`).

    Hashing reads every base weight once per call, a host pass over the weights that is small
    beside the rounds a run trains."""
    fed_d = {k: v for k, v in dataclasses.asdict(fed).items() if k not in UNFINGERPRINTED_FIELDS}
    model = dataclasses.asdict(cfg)
    for k in ("attention_impl", "remat", "loss_chunk"):
        model.pop(k, None)
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


def holds_this_run(run_dir: str, fingerprint: dict) -> bool:
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


def claim_run_dir(run_dir: str, fingerprint: dict, *, restart: bool) -> None:
    """Makes `run_dir` this run's: checks a resumed run's fingerprint (another run is an error,
    unless `restart`, or unless it died before any round ended: then it is cleared), writes a
    new run's."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ConfigError(f"run_dir={run_dir!r} cannot be a folder: {e}") from e
    try:
        holds = holds_this_run(run_dir, fingerprint)
    except RunMismatchError:
        if not (restart or _nothing_trained_yet(run_dir)):
            raise
        log.info("clearing the other run in %s", run_dir)
        clear_run(run_dir)
        holds = False
    if not holds:
        with open(os.path.join(run_dir, FINGERPRINT_FILE), "w") as f:
            json.dump(fingerprint, f, indent=1)


def restore_run(run_dir: str, state: ServerState, digest: str, fed: FedConfig):
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


def resume_or_start(run_dir: str, state: ServerState, digest: str, fed: FedConfig) -> ServerState:
    """The state a claimed run folder continues from: its newest intact checkpoint (later ones
    deleted, metrics lines past it dropped, a metrics line lost between checkpoint and write
    restored), or, for a new run, `state` itself with `fed_config.json` written and the metrics
    file emptied. In a multi-host run every process calls it and restores the checkpoint;
    process 0 alone rewrites the folder's files (the caller syncs the processes after)."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    primary = jax.process_index() == 0  # a multi-host run: process 0 writes the folder's files
    if checkpoint.latest_step(ckpt_dir) is None:
        if primary:
            _rewrite_jsonl(metrics_path, 0)
            with open(os.path.join(run_dir, "fed_config.json"), "w") as f:
                json.dump(dataclasses.asdict(fed), f, indent=1)
        return state
    state, meta = restore_run(run_dir, state, digest, fed)  # every process restores
    rnd = int(state.round)
    if not primary:
        return state
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
    resume). In a multi-host run every process calls it: orbax writes the checkpoint once,
    coordinating the processes."""
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


def check_trained(run_dir: str) -> None:
    """Raises `NothingTrainedError` when no round of the run in `run_dir` aggregated a client."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            why = _nothing_trained([json.loads(x) for x in f if x.strip()], run_dir)
        if why is not None:
            raise NothingTrainedError(why)
