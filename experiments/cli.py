"""The command line: parse a command, a preset and `key=value` overrides, call one function.

Commands register themselves in `COMMANDS` with a one-line help and a handler taking the
remaining arguments. The logic each handler calls lives in floe_jax or in an experiments module.
"""

from __future__ import annotations

import argparse
import sys

from floe_jax.config import ConfigError


def _bench(argv: list[str]) -> int:
    from experiments import benchmarks

    p = argparse.ArgumentParser(
        prog="python -m experiments bench",
        description="Benchmarks that run floe_jax and its competitor side by side in one process "
        "and print ratios. Names: " + ", ".join(benchmarks.available()) + ". No name runs all.",
    )
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = p.parse_args(argv)
    for name in args.names or benchmarks.available():
        benchmarks.run(name, quick=args.quick)
    return 0


def _profile(argv: list[str]) -> int:
    from experiments import profile

    profile.main(argv)
    return 0


def _serve_cloud(argv: list[str]) -> int:
    from experiments import serve_cloud

    return serve_cloud.main(argv)


def _pretrain(argv: list[str]) -> int:
    from experiments import calibrate

    return calibrate.pretrain_main(argv)


def _calibrate(argv: list[str]) -> int:
    from experiments import calibrate

    return calibrate.main(argv)


COMMANDS: dict[str, tuple[str, object]] = {
    "bench": ("benchmarks against PyTorch / transformers / NumPy, side by side", _bench),
    "serve-cloud": (
        "serve a floe_jax model as an OpenAI-compatible cloud (/v1/completions)",
        _serve_cloud,
    ),
    "profile": (
        "measure a LoRA cost table (decode ms/token, training memory) on this machine",
        _profile,
    ),
    "pretrain": (
        "tokenizer + cloud and edge base models of the embedded benchmark (cached)",
        _pretrain,
    ),
    "calibrate": (
        "accuracy of the pretrained models and a pooled LoRA edge, per query type",
        _calibrate,
    ),
}
DEFAULT_COMMAND = "bench"


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
        return COMMANDS[command][1](rest) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
