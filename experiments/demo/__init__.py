"""The embedded Floe demo end to end: pretrain, federate, evaluate, report.

`run_demo(preset, run_dir)` is `run_federate` then `run_evaluate` on one run folder; on one
process it pretrains the embedded demo's cloud beside the federated rounds, which need only the
edge (`_cloud_beside`). One module
per stage (the package re-exports their public names, but not the functions named like their
modules: `experiments.demo.setup` is the module, `experiments.demo.setup.setup` its function):

- `setup`: tokenizer + pretrained base models (cached, `calibrate.prepare`) or a real-model
  preset's checkpoints, chat-templated prompts, stop ids and Dirichlet-split data (`setup_real`);
  one device profile per client (cycling `fed.devices`) and its LoRA rank from
  `floe_jax.devices.assign_ranks`; each client's private examples as `ClientData`.
- `federate`: federated rounds for Floe (`fed.rounds`: clustered by client updates) and for each
  unclustered baseline in `fed.baselines`; each run writes `run_dir/fed/<name>/`.
- `methods`: the compared methods and their stable ids.
- `cloud`: the black-box cloud (serve-cloud over loopback, or in-process) and the span recorder.
- `evaluate`: every method answers the same test queries, each behind its client's privacy
  guard, with a recorder in front of the cloud checking every request for private spans;
  `oracle`: the token oracle.
- `report`: `report.md` and plots.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jax

from experiments.calibrate import benchmark_and_tokenizers, pretraining
from experiments.demo.cloud import CloudEndpoint, SpanRecorder
from experiments.demo.evaluate import energy_table, run_evaluate
from experiments.demo.federate import run_federate, write_config
from experiments.demo.methods import Method, methods
from experiments.demo.report import QTYPES, format_report, plots
from experiments.demo.setup import Setup, client_ranks, private_data, setup_real
from experiments.presets import FLOE, DemoPreset
from experiments.real_presets import RealPreset

__all__ = [
    "FLOE",
    "CloudEndpoint",
    "Method",
    "QTYPES",
    "Setup",
    "SpanRecorder",
    "client_ranks",
    "energy_table",
    "format_report",
    "methods",
    "plots",
    "private_data",
    "run_demo",
    "run_evaluate",
    "run_federate",
    "setup_real",
    "write_config",
]


@contextlib.contextmanager
def _cloud_beside(preset: DemoPreset, progress: bool):
    """Pretrains (or loads) the cloud in a thread while the body runs, and waits for it on exit
    (`calibrate.pretraining`: an error on either side stops the other and is raised).

    The federated rounds need only the edge, so the cloud's pretraining overlaps the edge's and
    then the rounds, filling the cores one tiny model's step or an XLA compile leaves idle. The
    trained weights are the same as alone, bit for bit (`calibrate.prepare`). The tokenizers are
    trained (or loaded) first, so the two threads never write the same cache folder."""
    bench, _, cloud_tok = benchmark_and_tokenizers(preset)
    with pretraining(preset, ("cloud",), bench, {"cloud": cloud_tok}, progress=progress):
        yield


def run_demo(
    preset: DemoPreset | RealPreset, run_dir: str, *, progress: bool = True, restart: bool = False
) -> dict:
    """The whole demo into `run_dir`: pretraining (cached), federated rounds, evaluation, report.
    `restart` clears federated runs in `run_dir` that were trained with other settings."""
    t0 = time.perf_counter()
    times = {}
    if isinstance(preset, DemoPreset) and jax.process_count() == 1:
        with _cloud_beside(preset, progress):  # the rounds need only the edge
            run_federate(preset, run_dir, progress=progress, restart=restart, models=("edge",))
    else:
        run_federate(preset, run_dir, progress=progress, restart=restart)
    times["pretrain + federate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = run_evaluate(preset, run_dir, progress=progress)
    times["evaluate"] = time.perf_counter() - t1
    times["total"] = time.perf_counter() - t0
    result["times"] = times
    Path(run_dir, "report.md").write_text(format_report(result))
    return result
