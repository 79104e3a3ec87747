"""The command line: parse a command, a preset and `key=value` overrides, call one function.

Commands register themselves in `COMMANDS` with a one-line help and a handler taking the
remaining arguments and the `CommandEnv`. The logic each handler calls lives in floe_jax or in an
experiments module.

The environment is read here, once per command (`CommandEnv.from_environ`), never by the library:
`FLOE_KERNELS` (`reference`, the default, or `pallas`) is set as `ModelConfig.attention_impl` on
the model configs the command builds; `FLOE_JAX_CPU_KERNELS` (1, the default, or 0) as
`QuantConfig.cpu_kernel` on its quantization configs; `CXX` and `FLOE_JAX_KERNEL_CACHE` (the
compiler and the cache folder of the CPU kernel, `kernels.cpu_qmatvec`) are passed to
`cpu_qmatvec.configure` before the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from floe_jax.config import ATTENTION_IMPLS, ConfigError, ModelConfig
from floe_jax.federated.run_folder import NothingTrainedError, RunMismatchError

KERNELS_ENV = "FLOE_KERNELS"
CPU_KERNELS_ENV = "FLOE_JAX_CPU_KERNELS"
KERNEL_CACHE_ENV = "FLOE_JAX_KERNEL_CACHE"
CXX_ENV = "CXX"


def attention_impl_from_env() -> str:
    """`FLOE_KERNELS` from the environment, else "reference"."""
    impl = os.environ.get(KERNELS_ENV, "reference")
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"{KERNELS_ENV}={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    return impl


def cpu_kernel_from_env() -> bool:
    """`FLOE_JAX_CPU_KERNELS` from the environment (1, the default: the CPU matvec kernel; 0:
    XLA's paths)."""
    value = os.environ.get(CPU_KERNELS_ENV, "1")
    if value not in ("0", "1"):
        raise ConfigError(f"{CPU_KERNELS_ENV}={value!r}: expected 0 (XLA's multiply-reduce) or 1 "
                          "(the CPU kernel)")  # fmt: skip
    return value == "1"


def configure_kernel_build_from_env() -> None:
    """Passes `CXX` and `FLOE_JAX_KERNEL_CACHE` (unset or empty: the defaults) to
    `kernels.cpu_qmatvec.configure`."""
    from kernels import cpu_qmatvec

    cpu_qmatvec.configure(cxx=os.environ.get(CXX_ENV) or None,
                          cache_dir=os.environ.get(KERNEL_CACHE_ENV) or None)  # fmt: skip


def _replace_nested(obj, cls: type, **changes):
    """`obj` with `changes` on every `cls` instance in it: itself, or a field of a (nested)
    dataclass such as a preset."""
    if isinstance(obj, cls):
        return dataclasses.replace(obj, **changes)
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    new_fields = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        v = getattr(obj, f.name)
        new = _replace_nested(v, cls, **changes)
        if new is not v:
            new_fields[f.name] = new
    return dataclasses.replace(obj, **new_fields) if new_fields else obj


def with_attention_impl(obj, impl: str):
    """`obj` with `attention_impl=impl` on every `ModelConfig` in it."""
    return _replace_nested(obj, ModelConfig, attention_impl=impl)


def with_cpu_kernel(obj, on: bool):
    """`obj` with `cpu_kernel=on` on every `floe_jax.quant.QuantConfig` in it."""
    from floe_jax.quant import QuantConfig

    return _replace_nested(obj, QuantConfig, cpu_kernel=on)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommandEnv:
    """The settings a command takes from the environment, read once (`from_environ`)."""

    attention_impl: str = "reference"
    cpu_kernel: bool = True

    @classmethod
    def from_environ(cls) -> CommandEnv:
        return cls(attention_impl=attention_impl_from_env(), cpu_kernel=cpu_kernel_from_env())

    def apply(self, obj):
        """`obj` (a preset, a config) with these settings on the configs in it."""
        return with_cpu_kernel(with_attention_impl(obj, self.attention_impl), self.cpu_kernel)


def _bench(argv: list[str], env: CommandEnv) -> int:
    from experiments import benchmarks

    p = argparse.ArgumentParser(
        prog="python -m experiments bench",
        description="Benchmarks that run floe_jax and its competitor side by side in one process "
        "and print ratios. Names: " + ", ".join(benchmarks.available()) + ". No name runs all.",
    )
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="trace each benchmark with jax.profiler into DIR/NAME and print floe_jax's XLA "
        "time per op (fusion, dot, ...) summed over the run",
    )
    args = p.parse_args(argv)
    for name in args.names or benchmarks.available():
        if args.profile is None:
            benchmarks.run(name, quick=args.quick, attention_impl=env.attention_impl,
                           cpu_kernel=env.cpu_kernel)  # fmt: skip
            continue
        from experiments.benchmarks._profile import op_table, traced
        from experiments.benchmarks._util import print_table

        out = os.path.join(args.profile, name)
        with traced(out):
            benchmarks.run(name, quick=args.quick, attention_impl=env.attention_impl,
                           cpu_kernel=env.cpu_kernel)  # fmt: skip
        print_table(op_table(out), title=f"{name}: XLA time per op (trace in {out})")
    return 0


def _profile(argv: list[str], env: CommandEnv) -> int:
    from experiments import profile

    profile.main(argv, attention_impl=env.attention_impl)
    return 0


def _plan(argv: list[str], env: CommandEnv) -> int:
    from experiments import plan

    return plan.main(argv)


def _serve_cloud(argv: list[str], env: CommandEnv) -> int:
    from experiments import serve_cloud

    return serve_cloud.main(argv, attention_impl=env.attention_impl)


def _pretrain(argv: list[str], env: CommandEnv) -> int:
    from experiments import calibrate

    return calibrate.pretrain_main(argv, attention_impl=env.attention_impl)


def _calibrate(argv: list[str], env: CommandEnv) -> int:
    from experiments import calibrate

    return calibrate.main(argv, attention_impl=env.attention_impl)


def _run_parser(command: str, description: str, *, restart: bool = False):
    import argparse

    from experiments.presets import PRESETS
    from experiments.real_presets import REAL_PRESETS

    names = ", ".join([*PRESETS, *REAL_PRESETS])
    p = argparse.ArgumentParser(prog=f"python -m experiments {command}", description=description)
    p.add_argument("preset", nargs="?", default="default", help=f"one of {names}")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="preset overrides, e.g. fed.rounds.num_rounds=3 eval.decode.deadline_s=0.15 "
        "fed.rounds.agg.method=fedit bench.seed=1",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<preset>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if restart:
        p.add_argument(
            "--restart", action="store_true",
            help="clear federated runs in the run folder that were trained with other settings "
            "(without it, such a folder is an error listing the differences)",
        )  # fmt: skip
    return p


def _run_args(argv: list[str], env: CommandEnv, command: str, description: str, *, restart=False):
    """`(preset, run folder, progress, restart)` from a run command's arguments."""
    from experiments.presets import get_preset

    args = _run_parser(command, description, restart=restart).parse_intermixed_args(argv)
    if "=" in args.preset:  # `demo key=value` without a preset name
        args.overrides, args.preset = [args.preset, *args.overrides], "default"
    preset = env.apply(get_preset(args.preset, args.overrides))
    out = args.out or f"runs/demo-{preset.name}"
    check_out_dir(out)
    return preset, out, not args.no_progress, bool(getattr(args, "restart", False))


def check_out_dir(path: str, flag: str = "--out") -> None:
    """Raises `ConfigError` naming `flag` when `path` cannot be a run folder: it, or a folder
    above it, is an existing file, or the nearest existing folder above it is not writable.
    Checked before any work, so a long run does not end in a storage-layer traceback."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a file, not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable")


def _demo(argv: list[str], env: CommandEnv) -> int:
    from experiments import demo

    preset, out, progress, restart = _run_args(
        argv, env, "demo",
        "The embedded Floe benchmark end to end: tokenizer and pretrained base models (cached), "
        "heterogeneous ranks from device profiles, federated LoRA rounds (Floe clustered, the "
        "fed.baselines rules unclustered), then every method on the same test queries under a "
        "simulated network. Writes config.json, fed/*/metrics.jsonl, eval.jsonl, report.md and "
        "plots into the run folder.", restart=True,
    )  # fmt: skip
    result = demo.run_demo(preset, out, progress=progress, restart=restart)
    print(demo.format_report(result))
    print(f"run folder: {out}")
    return 0


def _cluster_args(argv: list[str]) -> tuple[list[str], object]:
    """Takes `--mesh SPEC` and the `jax.distributed` options out of `argv`, joins the cluster
    (before anything touches a device) and returns `(the other arguments, the mesh or None)`."""
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--mesh", default=None)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true")
    args, rest = p.parse_known_args(argv)
    from floe_jax import sharding

    named = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(x is not None for x in named):
        sharding.initialize_distributed(*named)
    return rest, None if args.mesh is None else sharding.make_mesh(args.mesh)


CLUSTER_HELP = (
    "Devices and hosts: --mesh clients=8 (or clients=4,fsdp=2) runs the rounds over the "
    "devices of every process; --coordinator HOST:PORT --num-processes N --process-id I join a "
    "jax.distributed cluster (every process runs the same command with its own id), "
    "--distributed joins one the cluster describes itself (TPU pods, SLURM)."
)


def _federate(argv: list[str], env: CommandEnv) -> int:
    from experiments import demo

    argv, mesh = _cluster_args(argv)
    preset, out, progress, restart = _run_args(
        argv, env, "federate",
        "Pretraining (cached) and the federated LoRA rounds of every compared method only "
        "(resumes from the run folder's checkpoints). `evaluate` then scores them. "
        + CLUSTER_HELP, restart=True,
    )  # fmt: skip
    for method, info in demo.run_federate(preset, out, progress=progress, restart=restart,
                                          mesh=mesh).items():  # fmt: skip
        print(f"{method}: clusters {info['assignment']} ({info['seconds']:.1f}s)")
    print(f"run folder: {out}")
    return 0


def _evaluate(argv: list[str], env: CommandEnv) -> int:
    from experiments import demo

    preset, out, progress, _ = _run_args(
        argv, env, "evaluate",
        "Evaluate the adapters of an existing run folder (written by `federate` or `demo` with "
        "the same preset and overrides) and write eval.jsonl, report.md and plots.",
    )  # fmt: skip
    print(demo.format_report(demo.run_evaluate(preset, out, progress=progress)))
    return 0


def _flower(argv: list[str], env: CommandEnv) -> int:
    from experiments import flower

    p = _run_parser(
        "flower",
        "The demo's federated part as a Flower app in Flower's simulation engine (Ray): one "
        "virtual SuperNode per client running floe_jax's local update, Floe's server "
        "(clustering, the aggregation rule) on the replies. Writes <out>/fed/<run>/ as "
        "`federate` does. Deployed on real hosts: experiments/floe-flower and README 'Flower'.",
        restart=True,
    )
    next(
        a for a in p._actions if a.dest == "out"
    ).help = "run folder (default runs/flower-<preset>)"
    p.add_argument("--run", default="floe", help="which run of the preset (default floe)")
    p.add_argument(
        "--timeout",
        type=float,
        default=flower.DEFAULT_TIMEOUT,
        help="seconds a round waits for its clients; later ones are left out (0: no limit)",
    )
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs Ray may use: clients trained at once (default: all)")  # fmt: skip
    args = p.parse_intermixed_args(argv)
    if "=" in args.preset:
        args.overrides, args.preset = [args.preset, *args.overrides], "default"
    from experiments.presets import get_preset

    preset = env.apply(get_preset(args.preset, args.overrides))
    out = args.out or f"runs/flower-{preset.name}"
    check_out_dir(out)
    state = flower.simulate(preset, out, name=args.run, timeout=args.timeout or None,
                            restart=args.restart, num_cpus=args.num_cpus)  # fmt: skip
    import numpy as np

    print(f"{args.run}: clusters {np.asarray(state.assignment).tolist()}, "
          f"ranks {np.asarray(state.ranks).tolist()}, rounds {int(state.round)}")  # fmt: skip
    print(f"run folder: {os.path.join(out, 'fed', args.run)}")
    return 0


def _seeds(argv: list[str], env: CommandEnv) -> int:
    from experiments import seeds

    return seeds.main(argv, env.attention_impl)


COMMANDS: dict[str, tuple[str, object]] = {
    "demo": ("the embedded Floe benchmark end to end, with a report (the default)", _demo),
    "seeds": ("the whole demo over several seeds, mean ± sd per method", _seeds),
    "federate": ("pretrain + federated LoRA rounds of every compared method", _federate),
    "evaluate": ("evaluate a run folder's adapters: accuracy, privacy, latency", _evaluate),
    "flower": ("the federated rounds as a Flower app (simulation; deployment: README)", _flower),
    "bench": ("benchmarks against PyTorch / transformers / NumPy, side by side", _bench),
    "serve-cloud": (
        "serve a floe_jax model as an OpenAI-compatible cloud (/v1/completions)",
        _serve_cloud,
    ),
    "profile": (
        "measure a LoRA cost table (decode ms/token, training memory) on this machine",
        _profile,
    ),
    "plan": ("how many clients of a round fit a device memory budget (no allocation)", _plan),
    "pretrain": (
        "tokenizer + cloud and edge base models of the embedded benchmark (cached)",
        _pretrain,
    ),
    "calibrate": (
        "accuracy of the pretrained models and a pooled LoRA edge, per query type",
        _calibrate,
    ),
}
DEFAULT_COMMAND = "demo"


def _usage() -> str:
    lines = [
        "usage: python -m experiments [COMMAND] [ARGS...]",
        "",
        f"With no command, runs `{DEFAULT_COMMAND}`. Commands:",
    ]
    lines += [f"  {name:<12} {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += ["", "`python -m experiments COMMAND --help` explains each command."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
    elif argv and not argv[0].startswith("-") and "=" not in argv[0]:
        print(f"unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    else:
        command, rest = DEFAULT_COMMAND, argv
    try:
        env = CommandEnv.from_environ()
        configure_kernel_build_from_env()
        return COMMANDS[command][1](rest, env) or 0
    except RunMismatchError as e:
        print(f"error: {e}\n(on the command line: --restart)", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NothingTrainedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
