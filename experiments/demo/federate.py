"""The demo's federated runs: Floe (clustered by client updates, `fed.rounds.agg` inside each
cluster) and each unclustered baseline of `fed.baselines`, on the same private data and ranks.

Each run writes `run_dir/fed/<name>/` (checkpoints, metrics.jsonl, the fingerprint of its
settings); a second call with the same settings resumes or restores the runs, one with other
settings is refused with the differences listed (`restart=True` starts over), and `evaluate` only
loads finished runs (`floe_jax.federated.loop.load_trained`), never trains.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments.calibrate import MODELS
from experiments.demo.setup import Setup, client_ranks, private_data, setup
from experiments.presets import CENTRAL, LOCAL, DemoPreset
from experiments.real_presets import RealPreset
from floe_jax import sharding
from floe_jax.federated import train_federated
from floe_jax.federated.loop import load_trained
from floe_jax.federated.rounds import client_start
from floe_jax.federated.types import ClientData, client_data


def federate(
    preset: DemoPreset | RealPreset,
    prep: Setup,
    run_dir: str,
    *,
    progress: bool,
    train: bool = True,
    restart: bool = False,
    mesh=None,
):
    """Trains (or resumes) every run's adapters and writes `run_dir/clients.json`; with
    `train=False` only loads finished runs (an unfinished or missing one is an error). With a
    `mesh` (`floe_jax.sharding.make_mesh`) every run's rounds run over it, except the
    centralized baseline's: its clients are the task families, whose number need not divide the
    mesh's `clients` axis, so it runs on one device (printed).

    Returns:
      `{run name: (client LoRAs [N], info)}`: each client's adapter (its cluster's, at the rank
      it ends the run with) and `{"assignment", "ranks", "seconds"}`.
    """
    bench, tok, fed = prep.bench, prep.tokenizer, preset.fed
    truncate = isinstance(preset, RealPreset) and preset.long_examples == "truncate"
    data = private_data(fed, bench, tok, prep.edge_cfg.vocab_size, truncate=truncate)
    N = bench.num_clients
    families = task_families(bench.client_tasks)
    devices, ranks = client_ranks(
        fed, N, prep.edge_cfg, seq_len=data.seq_len, toy=not isinstance(preset, RealPreset)
    )
    out = {}
    for name, rounds in fed.runs(len(set(bench.client_tasks)), N).items():
        t0 = time.perf_counter()
        if progress:
            # above the cloud's pretraining bar, which `run_demo` may still be drawing
            tqdm.write(f"federated rounds: {name} ({rounds.agg.method}, "
                       f"clustering={rounds.clustering})")  # fmt: skip
        where = dict(cfg=prep.edge_cfg, fed=rounds, run_dir=os.path.join(run_dir, "fed", name),
                     ranks=np.asarray(ranks, np.int32))  # fmt: skip
        run_data = data
        if name == LOCAL:  # every client its own cluster
            where |= dict(assignment=np.arange(N, dtype=np.int32), num_clusters=N)
        elif name == CENTRAL:  # a client per task family holding its clients' examples
            run_data = pooled(data, families)
            T = run_data.num_clients
            where |= dict(ranks=np.full(T, max(fed.rank_candidates), np.int32),
                          assignment=np.arange(T, dtype=np.int32), num_clusters=T)  # fmt: skip
        if train:
            run_mesh = None if name == CENTRAL else mesh
            if mesh is not None and run_mesh is None:
                print(f"federated rounds: {name} has a client per task family, which need not "
                      "divide the mesh: on one device")  # fmt: skip
            state, _ = train_federated(
                prep.edge_params, run_data, **where, progress=progress, restart=restart,
                mesh=run_mesh,
            )  # fmt: skip
        else:
            state = load_trained(prep.edge_params, run_data, **where)
        # a client ends the run at its own rank, which HetLoRA's self-pruning may have lowered
        assignment, final = np.asarray(state.assignment), np.asarray(state.ranks)
        loras = client_start(
            state.global_loras, jnp.asarray(assignment), jnp.asarray(final), rounds
        )
        if name == CENTRAL:  # every client runs its task family's pooled adapter
            loras = jax.tree.map(lambda x: x[families], loras)
            assignment, final = families, final[families]
        out[name] = (loras, {"assignment": assignment.tolist(), "ranks": final.tolist(),
                             "seconds": time.perf_counter() - t0,
                             "dp": _dp_summary(rounds, where["run_dir"])})  # fmt: skip
    info = {"devices": devices, "ranks": ranks, "client_tasks": list(bench.client_tasks)}
    if jax.process_index() == 0:  # a multi-host run's files are process 0's
        with open(os.path.join(run_dir, "clients.json"), "w") as f:
            json.dump(info, f, indent=1)
    return out


def task_families(client_tasks) -> np.ndarray:
    """[N] each client's task family as an index, families numbered in order of first client."""
    names = list(dict.fromkeys(client_tasks))
    return np.asarray([names.index(t) for t in client_tasks], np.int32)


def pooled(data: ClientData, groups) -> ClientData:
    """One client per group: client g holds the examples (the real rows, not the padding) of
    every client k with `groups[k] == g`, in client order: the centralized baseline's data."""
    n, groups = np.asarray(data.num_examples), np.asarray(groups)
    out = []
    for g in range(int(groups.max()) + 1):
        ks = np.flatnonzero(groups == g)
        out.append(tuple(np.concatenate([np.asarray(x)[k, : n[k]] for k in ks])
                         for x in (data.tokens, data.mask, data.loss_mask)))  # fmt: skip
    return client_data(out)


def _dp_summary(rounds, run_dir: str) -> dict | None:
    """The privacy a DP run spent (its last round's `dp_epsilon`) and its settings; None for a
    run without DP."""
    if not rounds.dp.enabled:
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = json.loads([x for x in f if x.strip()][-1])
    return dict(epsilon=last.get("dp_epsilon"), delta=rounds.dp.delta,
                noise_multiplier=rounds.dp.noise_multiplier, clip_norm=rounds.dp.clip_norm,
                sampling=rounds.dp.sampling, clipped_last_round=last.get("dp_clipped"))  # fmt: skip


def write_config(preset: DemoPreset | RealPreset, run_dir: str) -> None:
    """`run_dir/config.json`: the preset as run, overrides applied."""
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(preset), f, indent=1, default=str)


def run_federate(
    preset: DemoPreset | RealPreset,
    run_dir: str,
    *,
    progress: bool = True,
    restart: bool = False,
    mesh=None,
    models: tuple[str, ...] = MODELS,
) -> dict:
    """Pretraining of `models` (cached; the rounds need only the edge, `run_demo` trains the
    cloud beside them) and the federated rounds of every run; writes the run folder, its
    `config.json` once every run has been accepted and trained (a refused run leaves the folder's
    record as it was). `restart` clears runs trained with other settings; `mesh` as `federate`'s
    (in a multi-host run every process calls this; process 0 writes the folder's files).
    Returns `{run name: info}` (see `federate`)."""
    os.makedirs(run_dir, exist_ok=True)
    prep = _setup_in_turn(preset, progress, models)
    out = federate(preset, prep, run_dir, progress=progress, restart=restart, mesh=mesh)
    if jax.process_index() == 0:
        write_config(preset, run_dir)
    return {name: info for name, (_, info) in out.items()}


def _setup_in_turn(
    preset: DemoPreset | RealPreset, progress: bool, models: tuple[str, ...] = MODELS
) -> Setup:
    """`setup`, in a multi-host run by process 0 first: a cold pretraining cache is then
    pretrained and written once (processes writing the same cache folder at once collide), and
    every other process loads the very base weights process 0 trained, so the replicated base
    is the same on every process (pretraining independently need not be, on an accelerator)."""
    if jax.process_count() == 1 or not isinstance(preset, DemoPreset):
        return setup(preset, progress=progress, models=models)
    # process 0 writes the pretraining cache; an error there stops every process
    first = lambda: setup(preset, progress=progress, models=models)  # noqa: E731
    prep = sharding.together("floe_jax:demo_setup", first, primary_only=True)
    return prep if prep is not None else setup(preset, progress=progress, models=models)
