"""Shared fixtures. Tests run on the CPU in float32 at highest matmul precision."""

import dataclasses
import gc
import os

# The suite compiles thousands of tiny programs that then run for microseconds, so XLA's compile
# time is its run time (~0.1 s per cold compile on a 2-core CPU). Two settings, read when jax is
# imported, so they reach both xdist workers and every subprocess a test starts:
# - a persistent compilation cache in this checkout's .pytest_cache/xla, shared by the workers: a
#   program one worker (or an earlier test's fresh closure) compiled is loaded, not rebuilt (a
#   fresh clone starts cold, as CI does);
# - LLVM's cheap pipeline and XLA's older elemental fusion emitter: the programs are too small
#   for the optimisations to pay back (together they cut a cold compile about 3x here).
# Neither changes a result: the cache is keyed on the HLO, the flags and the versions, and XLA's
# CPU backend keeps IEEE semantics at every optimisation level. Values already in the
# environment win.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["XLA_FLAGS"] = " ".join(
    [
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
        "--xla_cpu_use_fusion_emitters=false",
        os.environ.get("XLA_FLAGS", ""),  # last, so a flag set here overrides these
    ]
).strip()

import jax  # noqa: E402
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

from floe_jax.config import ModelConfig  # noqa: E402
from floe_jax.model import init_params  # noqa: E402


def _mappings() -> tuple[int, int] | None:
    """(memory mappings of this process, the kernel's limit), or None where /proc has neither."""
    try:
        with open("/proc/self/maps") as f:
            used = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return used, int(f.read())
    except OSError:
        return None


@pytest.fixture(scope="module", autouse=True)
def _free_executables(request):
    """Drop jax's compiled programs after each test module.

    Each live XLA:CPU executable maps its code into the process (several mappings each), and
    jax's jit caches keep every one alive. A worker that runs half the suite builds thousands, and
    past Linux's `vm.max_map_count` (65530 by default) the next JIT load or C++ exception dies in
    native code (a segfault in the unwinder, or LLVM's "Unable to allocate section memory").
    Clearing the caches unmaps them; a later module that needs a program again loads it from the
    persistent cache above. If the process still holds over 80% of the limit after a module (a
    leak: something keeps programs alive), that module fails, naming the mappings it added,
    instead of a later crash.
    """
    before = _mappings()
    yield
    jax.clear_caches()
    after = _mappings()
    if after is not None and after[0] > 0.8 * after[1]:
        gc.collect()  # programs held only by reference cycles
        after = _mappings()
    if after is not None and after[0] > 0.8 * after[1]:
        added = "" if before is None else f" ({after[0] - before[0]:+d} during this module)"
        pytest.fail(
            f"after {request.module.__name__} this process holds {after[0]} memory mappings"
            f"{added} of the {after[1]} vm.max_map_count allows, with jax's caches cleared: "
            "something keeps compiled programs alive",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    """A tiny Llama with GQA: fast enough for every test."""
    return ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    return init_params(tiny_cfg, key=jax.random.key(0))


@pytest.fixture(scope="session")
def kernel_cfg(tiny_cfg) -> ModelConfig:
    """The tiny Llama widened to head dim 16, the smallest the decode kernel takes."""
    return dataclasses.replace(tiny_cfg, hidden_size=64, intermediate_size=96)


@pytest.fixture(scope="session")
def kernel_params(kernel_cfg):
    return init_params(kernel_cfg, key=jax.random.key(0))
