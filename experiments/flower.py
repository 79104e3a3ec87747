"""`python -m experiments flower`: the demo's federated part as a Flower app, in Flower's
simulation engine on this machine, or deployed on a SuperLink with SuperNodes on other hosts
(`experiments/floe-flower/`, README "Flower").

Both ways run the same `floe_jax.flower` client and server on the demo preset: the server is
`FloeServer` with the preset's run config (`fed.rounds`, Floe's clustering for the `floe` run),
and the device of `partition-id` k is `FloeClient` with client k's examples of the embedded
benchmark and the rank its device profile gets (`demo.setup.client_ranks`: profiles cycle
through `fed.devices`), unless its node config gives `rank`. The run folder is the one
`federate` writes (`<out>/fed/<run>/`), with the same fingerprint, so `evaluate` and
`load_trained` read a Flower run like a loop run.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np

from experiments.demo.setup import Setup, client_ranks, private_data, setup
from experiments.presets import CENTRAL, FLOE, LOCAL, DemoPreset, get_preset
from experiments.real_presets import RealPreset
from floe_jax.config import ConfigError
from floe_jax.federated.config import FedConfig
from floe_jax.federated.run_folder import run_fingerprint
from floe_jax.federated.types import ClientData
from floe_jax.flower import FloeClient, FloeServer, client_app, server_app

DEFAULT_TIMEOUT = 600.0  # seconds a round waits for its clients


@dataclasses.dataclass(frozen=True)
class DemoRun:
    """One federated run of the demo preset: its setup, data, ranks and round config."""

    prep: Setup
    data: ClientData
    devices: list
    ranks: list
    fed: FedConfig
    name: str


@functools.lru_cache(maxsize=4)
def demo_run(preset: DemoPreset | RealPreset, name: str = FLOE) -> DemoRun:
    """The run `name` of the preset (`DemoFed.runs`): the edge's pretraining from the cache
    (rounds need no cloud; a real preset loads both checkpoints), every client's private
    examples and device-profile ranks. Once per process."""

    def refuse(runs):
        usable = [r for r in runs if r not in (LOCAL, CENTRAL)]
        raise ConfigError(
            f"run {name!r} cannot run on Flower; runs of this preset: {', '.join(usable)} "
            f"({LOCAL!r} and {CENTRAL!r} are baselines without federation)"
        )

    if name in (LOCAL, CENTRAL):  # before the setup, which may pretrain
        refuse([FLOE, *preset.fed.baseline_runs()])
    prep = setup(preset, progress=False, models=("edge",))
    bench = prep.bench
    data = private_data(preset.fed, bench, prep.tokenizer, prep.edge_cfg.vocab_size)
    N = bench.num_clients
    runs = preset.fed.runs(len(set(bench.client_tasks)), N)
    if name not in runs:
        refuse(runs)
    devices, ranks = client_ranks(preset.fed, N, prep.edge_cfg, seq_len=data.seq_len)
    return DemoRun(prep, data, devices, ranks, runs[name], name)


def load_client(context, *, preset: DemoPreset | RealPreset, name: str = FLOE) -> FloeClient:
    """The device of `context.node_config["partition-id"]`: the base model, that client's
    examples, and its rank (`node_config["rank"]`, else its device profile's)."""
    run = demo_run(preset, name)
    cfg = context.node_config
    if "partition-id" not in cfg:
        raise ConfigError(
            "SuperNode without partition-id: start it with --node-config 'partition-id=K' "
            f"(K in [0, {run.data.num_clients}))"
        )
    k = int(cfg["partition-id"])
    if not 0 <= k < run.data.num_clients:
        raise ConfigError(
            f"node config partition-id={k} is outside [0, {run.data.num_clients}) clients"
        )
    rank = int(cfg.get("rank", run.ranks[k]))
    one = jax.tree.map(lambda x: x[k : k + 1], run.data)
    return FloeClient(run.prep.edge_params, one, run.prep.edge_cfg, run.fed, k, rank)


def load_server(
    context=None,
    *,
    preset: DemoPreset | RealPreset,
    out: str,
    name: str = FLOE,
    timeout: float | None = DEFAULT_TIMEOUT,
    restart: bool = False,
) -> FloeServer:
    """Floe's server for run `name` writing `<out>/fed/<name>/`, with the fingerprint the loop
    (`federate`) gives the same run (with the ranks the devices report)."""
    run = demo_run(preset, name)
    p, cfg = run.prep.edge_params, run.prep.edge_cfg
    ranks = np.asarray(run.ranks, np.int32)
    fp = run_fingerprint(p, run.data, cfg=cfg, fed=run.fed, ranks=ranks)
    # ranks=None: a device's own `rank` (node config) stands, and goes into the fingerprint
    return FloeServer(
        cfg, run.fed, os.path.join(out, "fed", name), run.data.num_clients, fp, ranks=None,
        timeout=timeout, restart=restart,
    )  # fmt: skip


def simulate(
    preset: DemoPreset | RealPreset,
    out: str,
    *,
    name: str = FLOE,
    timeout: float | None = DEFAULT_TIMEOUT,
    restart: bool = False,
    num_cpus: int | None = None,
):
    """Runs `name` in Flower's simulation engine (Ray), one virtual SuperNode per client.

    Args:
      num_cpus: CPUs Ray may use (default: all); each client asks for one, so Ray runs at most
        this many clients at once, each in its own process with its own copy of the base model.

    Returns:
      The final `ServerState`.
    """
    from flwr.simulation import run_simulation

    run = demo_run(preset, name)  # fail early, in this process, on a bad run name
    done = []
    init = {"log_to_driver": False} | ({} if num_cpus is None else {"num_cpus": num_cpus})
    run_simulation(
        server_app=server_app(
            functools.partial(
                load_server, preset=preset, out=out, name=name, timeout=timeout, restart=restart
            ),
            done=done.append,
        ),  # fmt: skip
        client_app=client_app(
            functools.partial(load_client, preset=preset, name=name), name=f"simulate {name}"
        ),
        num_supernodes=run.data.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init},
    )
    if not done:
        raise RuntimeError(f"the Flower simulation of run {name!r} ended without a result; "
                           "its log above says why")  # fmt: skip
    return done[0]


# ------------------------------------------------------------------ deployment (`flwr run`)


def _run_config_preset(context) -> DemoPreset | RealPreset:
    rc = context.run_config
    return get_preset(str(rc.get("preset", "default")), str(rc.get("overrides", "")).split())


def _deployed_server(context) -> FloeServer:
    rc = context.run_config
    timeout = float(rc.get("timeout", DEFAULT_TIMEOUT))
    return load_server(
        preset=_run_config_preset(context), out=str(rc.get("out", "runs/flower")),
        name=str(rc.get("run", FLOE)), timeout=timeout if timeout > 0 else None,
        restart=bool(rc.get("restart", False)),
    )  # fmt: skip


def _deployed_client(context) -> FloeClient:
    return load_client(
        context, preset=_run_config_preset(context), name=str(context.run_config.get("run", FLOE))
    )


# The components `experiments/floe-flower/pyproject.toml` names: `flwr run` starts them on the
# SuperLink's host and on every SuperNode, configured by the app's run config (preset,
# overrides, out, run, timeout, restart).
server = server_app(_deployed_server)
client = client_app(_deployed_client, name="experiments.flower.deployed")
