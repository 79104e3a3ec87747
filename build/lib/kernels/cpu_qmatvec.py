"""A fused dequantize-matvec for quantized bases on CPUs: `cpu_qmatvec.cc` as an XLA FFI call.

XLA:CPU has no fused dequantize-matmul: a dot on a converted operand first writes the whole float
weight, and the multiply-reduce fusion `floe_jax.quant` uses for decode steps instead reads each
code once but is compute-bound far below the read bandwidth (README, "Quantized bases"). The C++
kernel decodes bf16/int8/int4/nf4 codes in registers (AVX-512 where the CPU has it) and
multiply-adds them into float32 accumulators, each weight read once, output rows split over
OpenMP threads: `y [M, N] = x [M, K] . decode(q, scale) [N, K]^T` with float32 activations, equal
to the dequantize-then-float reference up to summation order.

The library is compiled at first use with the system C++ compiler (`CXX`, default `g++`) into
`FLOE_JAX_KERNEL_CACHE` (default `~/.cache/floe_jax/kernels`), under a name keyed by the source,
jaxlib's version, the compiler, its flags and the host's CPU flags, and registered as the CPU
target `floe_qmatvec`. `FLOE_JAX_CPU_KERNELS=0` turns it off (`enabled`), read when a model is
traced: `floe_jax.quant` then keeps XLA's multiply-reduce. If compilation fails, `available`
warns once with the compiler command and its stderr and returns False (the XLA path runs).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("cpu_qmatvec.cc")
TARGET = "floe_qmatvec"
SYMBOL = "FloeQMatvec"
FORMAT_CODES = {"bf16": 0, "int8": 1, "int4": 2, "nf4": 3}
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-fopenmp", "-w")
ENV = "FLOE_JAX_CPU_KERNELS"


class KernelBuildError(RuntimeError):
    """The C++ compiler failed (the message holds its command and stderr)."""


def enabled() -> bool:
    """Whether `FLOE_JAX_CPU_KERNELS` (default 1) selects the kernel on CPUs."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 0 (XLA multiply-reduce) or 1 (the kernel)")
    return value == "1"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((ln for ln in text.splitlines() if ln.startswith("flags")), "")


def build(cxx: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The compiled library's path, compiling it first if the cache lacks it.

    Raises:
      KernelBuildError: the compiler failed or is missing; the message names the command.
    """
    cmd0 = shlex.split(cxx or os.environ.get("CXX") or "g++")
    cache = Path(cache_dir or os.environ.get("FLOE_JAX_KERNEL_CACHE")
                 or Path.home() / ".cache" / "floe_jax" / "kernels")  # fmt: skip
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([*cmd0, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        raise KernelBuildError(f"C++ compiler {shlex.join(cmd0)!r} not runnable: {e}") from e
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                jax.lib.__version__.encode(),
                shlex.join(cmd0).encode(),
                version.encode(),
                " ".join(FLAGS).encode(),
                _cpu_flags().encode(),
            ]
        )  # fmt: skip
    ).hexdigest()[:16]
    out = cache / f"cpu_qmatvec-{key}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # concurrent builders: own temp names
    os.close(fd)
    cmd = [*cmd0, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise KernelBuildError(f"C++ compiler not runnable: {shlex.join(cmd)}: {e}") from e
    if proc.returncode != 0 or os.path.getsize(tmp) == 0:
        os.unlink(tmp)
        raise KernelBuildError(
            f"compiling floe_jax's CPU kernel failed (exit {proc.returncode}): "
            f"{shlex.join(cmd)}\n{proc.stderr.strip()}"
        )
    os.replace(tmp, out)
    return out


@functools.cache
def _register() -> str | None:
    """Builds, loads and registers the kernel once per process; the failure message, or None."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (KernelBuildError, OSError) as e:
        return str(e)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, SYMBOL)), platform="cpu")
    return None


# The kernel's vector path needs these (`cpu_qmatvec.cc`); without them it compiles a scalar loop
# that is slower than XLA's vectorized multiply-reduce, so it is not used.
VECTOR_FLAGS = ("avx512f", "avx512bw", "avx512vl")


def vectorized() -> bool:
    """Whether this CPU has the instructions of the kernel's vector path (`VECTOR_FLAGS`)."""
    return set(VECTOR_FLAGS) <= set(_cpu_flags().split())


def available() -> bool:
    """Whether the kernel is enabled, this CPU runs its vector path, and it is registered (built
    at the first call). A failed build warns once, naming the compiler command and its stderr,
    and leaves XLA's path to run."""
    if not enabled() or not vectorized():
        return False
    error = _register()
    if error is not None:
        _warn_once(error)
    return error is None


@functools.cache
def _warn_once(error: str) -> None:
    warnings.warn(f"{error}\nfloe_jax falls back to XLA's multiply-reduce matvec "
                  f"(set {ENV}=0 to silence this).", stacklevel=3)  # fmt: skip


def path() -> str:
    """The matvec path a decode step on the CPU takes now (benchmarks print it)."""
    if not enabled():
        return f"XLA multiply-reduce ({ENV}=0)"
    if not vectorized():
        return f"XLA multiply-reduce (this CPU lacks {'/'.join(VECTOR_FLAGS)})"
    return "floe_qmatvec kernel" if _register() is None else "XLA multiply-reduce (build failed)"


def _call(x_MK, q, scale, fmt: str):
    m, n = x_MK.shape[0], q.shape[0]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x_MK, q, scale, fmt=np.int32(FORMAT_CODES[fmt]))


@functools.cache
def _batched(fmt: str):
    """The call for one format, whose vmap over rows of x (a shared weight) folds the batch
    axis into the rows: the weight is never broadcast."""

    @jax.custom_batching.custom_vmap
    def f(x_MK, q, scale):
        return _call(x_MK, q, scale, fmt)

    @f.def_vmap
    def _rule(axis_size, in_batched, x, q, scale):
        xb, qb, sb = in_batched
        if not (qb or sb):
            b, m, k = x.shape if xb else (1, *x.shape)
            y = f(x.reshape(b * m, k), q, scale).reshape(b, m, -1)
            return (y if xb else y[0]), xb
        # A weight per batch element (not a shared base): one call per element.
        bcast = lambda a, batched: a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        args = (bcast(x, xb), bcast(q, qb), bcast(scale, sb))
        return jax.lax.map(lambda a: f(*a), args), True

    return f


def qmatvec(x_MK: jax.Array, q: jax.Array, scale: jax.Array, fmt: str) -> jax.Array:
    """`x [M, K] . decode(q, scale)^T` -> float32 [M, N] on the CPU (`floe_jax.quant`'s codes:
    q [N, K] or [N, K/2] packed, scale [N, G]), built and registered at the first call.

    Raises:
      KernelBuildError: the kernel could not be built (`available()` checks without raising).
    """
    if fmt not in FORMAT_CODES:
        raise ValueError(f"qmatvec: format {fmt!r} is not one of {tuple(FORMAT_CODES)}")
    if (error := _register()) is not None:
        raise KernelBuildError(error)
    return _batched(fmt)(x_MK.astype(jnp.float32), q, scale)
