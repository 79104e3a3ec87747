"""Benchmarks run by `python -m experiments bench NAME`.

Each module `experiments/benchmarks/NAME.py` defines `run(quick: bool = False) -> list[dict]`, which
runs floe_jax and its competitor side by side in one process, prints a table and returns its rows.
The benchmarks that time cached decode steps (`DECODING`) also take `attention_impl`, the decode
attention kernel of their models (`ModelConfig.attention_impl`, set from `FLOE_KERNELS` by the
command line); `kernels` times both kernels itself, and the others run no decode step. The
benchmarks that quantize a model (`QUANTIZING`) take `cpu_kernel` (`QuantConfig.cpu_kernel`, set
from `FLOE_JAX_CPU_KERNELS` by the command line); `qmatvec` times the kernel and XLA's path side
by side whatever it says.
"""

import importlib
import pkgutil

NAMES = ("decode", "round", "step", "aggregate", "fusion", "kernels")
DECODING = ("decode", "fusion")
QUANTIZING = ("decode", "quant")


def available() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in NAMES if n in found] + sorted(found - set(NAMES))


def run(
    name: str, quick: bool = False, attention_impl: str = "reference", cpu_kernel: bool = True
) -> list[dict]:
    if name not in available():
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"experiments.benchmarks.{name}")
    kw = {}
    if name in DECODING:
        kw["attention_impl"] = attention_impl
    if name in QUANTIZING:
        kw["cpu_kernel"] = cpu_kernel
    return module.run(quick=quick, **kw)
