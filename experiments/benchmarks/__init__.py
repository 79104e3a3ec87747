"""Benchmarks run by `python -m experiments bench NAME`.

Each module `experiments/benchmarks/NAME.py` defines `run(quick: bool = False) -> list[dict]`, which
runs floe_jax and its competitor side by side in one process, prints a table and returns its rows.
"""

import importlib
import pkgutil

NAMES = ("decode", "round", "step", "aggregate", "fusion", "kernels")


def available() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in NAMES if n in found] + sorted(found - set(NAMES))


def run(name: str, quick: bool = False) -> list[dict]:
    if name not in available():
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(available())}")
    return importlib.import_module(f"experiments.benchmarks.{name}").run(quick=quick)
