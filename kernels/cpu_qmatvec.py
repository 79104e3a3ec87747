"""A fused dequantize-matvec for quantized bases on CPUs: `cpu_qmatvec.cc` as an XLA FFI call.

XLA:CPU has no fused dequantize-matmul: a dot on a converted operand first writes the whole float
weight, and the multiply-reduce fusion `floe_jax.quant` uses for decode steps instead reads each
code once but is compute-bound far below the read bandwidth (README, "Quantized bases"). The C++
kernel decodes bf16/int8/int4/nf4 codes in registers (AVX-512 where the CPU has it, else AVX2
with FMA) and
multiply-adds them into float32 accumulators, each weight read once, output rows split into
chunks run on XLA's own intra-op threads (the FFI thread pool: a second pool, such as OpenMP's,
competes with XLA's threads for the cores: on a 2-core host a product inside a jitted program ran
as fast as on one thread): `y [M, N] = x [M, K] . decode(q, scale) [N, K]^T` with float32
activations, equal to the dequantize-then-float reference up to summation order.

`activations="int8"` (int8 and int4 weights, CPUs with AVX-512 VNNI or with AVX2 and no AVX-512)
instead quantizes x per block of 32 inputs as llama.cpp's Q8_0 does and sums exact integer
products with `vpdpbusd` (64 codes per instruction instead of 16 float multiply-adds; AVX2:
`vpmaddubsw` and `vpmaddwd`, 32 codes per pair, int4's two nibbles of a byte summed in int16
before the widening); `quantize_activations` is the
exact specification, `cpu_qmatvec.cc` ("int8 activations") the kernel.

The library is compiled at first use with a C++ compiler (default `g++`) into a cache folder
(default `~/.cache/floe_jax/kernels`), under a name keyed by the source, jaxlib's version, the
compiler, its flags and the host's CPU flags, and registered as the CPU target `floe_qmatvec`; a
cached library that changed since its build (truncated, corrupt: its hash is kept beside it) or
fails to load is rebuilt. `configure(cxx=...,
cache_dir=...)` changes the compiler and the folder before the first build; the library reads no
environment variable (the command line, `experiments.cli`, reads `CXX` and
`FLOE_JAX_KERNEL_CACHE` and calls `configure`). Whether a quantized weight uses the kernel is its
own static field, `QuantizedTensor.cpu_kernel` (from `floe_jax.quant.QuantConfig.cpu_kernel`),
so the jit cache keys on it. If compilation fails, `available` warns once with the compiler
command and its stderr and returns False (the XLA path runs).
"""

from __future__ import annotations

import ctypes
import dataclasses
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
ACTIVATION_CODES = {"float32": 0, "int8": 1}
INT8_FORMATS = ("int8", "int4")  # the weights int8 activations take (integer codes)
BLOCK = 32  # inputs per int8 activation block (one float scale each)
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
DEFAULT_CXX = "g++"
DEFAULT_CACHE_DIR = "~/.cache/floe_jax/kernels"
# A compile takes ~10 s here; a compiler stuck past this is an error naming its command.
BUILD_TIMEOUT_S = 300.0


class KernelBuildError(RuntimeError):
    """The C++ compiler failed (the message holds its command and stderr)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildSettings:
    """How the kernel library is built: `cxx`, the compiler command (split like a shell word
    list, e.g. "ccache g++"); `cache_dir`, the folder of compiled libraries."""

    cxx: str = DEFAULT_CXX
    cache_dir: str = DEFAULT_CACHE_DIR


# The process's build settings. A module-level setting (not a config field) because the FFI
# target it builds is itself registered once per process; `configure` sets it before first use.
_settings = [BuildSettings()]


def configure(*, cxx: str | None = None, cache_dir: str | os.PathLike | None = None) -> None:
    """Sets the compiler and the cache folder the kernel is built with (None: the default).

    Once the kernel is registered in a process, its library stays: configuring other settings
    then warns and changes nothing (XLA keeps one library per FFI target).
    """
    new = BuildSettings(cxx=cxx or DEFAULT_CXX, cache_dir=str(cache_dir or DEFAULT_CACHE_DIR))
    if new == _settings[0]:
        return
    if _register.cache_info().currsize and _register() is None:
        warnings.warn(
            f"cpu_qmatvec.configure({new}): the kernel is already registered, built with "
            f"{_settings[0]}; that library stays for this process",
            stacklevel=2,
        )
        return
    _settings[0] = new
    _register.cache_clear()  # a failed build with the old settings is retried with the new


@functools.cache  # read once: the kernel checks run on every trace
def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((ln for ln in text.splitlines() if ln.startswith("flags")), "")


def build(
    cxx: str = DEFAULT_CXX,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    *,
    force: bool = False,
    timeout: float = BUILD_TIMEOUT_S,
    flags: tuple[str, ...] = FLAGS,
) -> Path:
    """The compiled library's path, compiling it first if the cache lacks it (or `force`).

    Args:
      cxx: the compiler command.
      cache_dir: the folder of compiled libraries (`~` is expanded).
      force: compile even if the cache holds the library (it failed to load).
      timeout: seconds each compiler call may take.
      flags: the compiler's flags (tests build each vector path with another `-march`).

    Raises:
      KernelBuildError: the compiler failed, is missing or timed out; the message names the
        command.
    """
    cmd0 = shlex.split(cxx)
    cache = Path(cache_dir).expanduser()
    source = SOURCE.read_bytes()
    version = _run([*cmd0, "--version"], timeout).stdout
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                jax.lib.__version__.encode(),
                shlex.join(cmd0).encode(),
                version.encode(),
                " ".join(flags).encode(),
                _cpu_flags().encode(),
            ]
        )  # fmt: skip
    ).hexdigest()[:16]
    out = cache / f"cpu_qmatvec-{key}.so"
    digest = out.with_suffix(".sha256")
    if not force and _intact(out, digest):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # concurrent builders: own temp names
    os.close(fd)
    cmd = [*cmd0, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        proc = _run(cmd, timeout)
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            raise KernelBuildError(
                f"compiling floe_jax's CPU kernel failed (exit {proc.returncode}): "
                f"{shlex.join(cmd)}\n{proc.stderr.strip()}"
            )
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, out)
    # The library's hash beside it: a cached library changed since (truncated, corrupt) is
    # compiled again rather than loaded (a truncated library can crash `dlopen` with SIGBUS).
    fd, tmp = tempfile.mkstemp(suffix=".sha256", dir=cache)
    with os.fdopen(fd, "w") as f:
        f.write(hashlib.sha256(out.read_bytes()).hexdigest())
    os.replace(tmp, digest)
    return out


def _intact(lib: Path, digest: Path) -> bool:
    """Whether `lib` exists and its hash is the one its build wrote to `digest`."""
    try:
        return hashlib.sha256(lib.read_bytes()).hexdigest() == digest.read_text().strip()
    except OSError:
        return False


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        raise KernelBuildError(f"C++ compiler not runnable: {shlex.join(cmd)}: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise KernelBuildError(
            f"C++ compiler timed out after {timeout:g} s: {shlex.join(cmd)}"
        ) from e


def load(settings: BuildSettings) -> ctypes.CDLL:
    """The kernel library built with `settings`, loaded. A cached library whose hash changed
    since its build is compiled again (`build`), and so, once, is one that fails to load."""
    so = build(settings.cxx, settings.cache_dir)
    try:
        return ctypes.cdll.LoadLibrary(str(so))
    except OSError:
        return ctypes.cdll.LoadLibrary(str(build(settings.cxx, settings.cache_dir, force=True)))


@functools.cache
def _register() -> str | None:
    """Builds, loads and registers the kernel once per process (with `configure`'s settings);
    the failure message, or None. A cached library that does not load is rebuilt once."""
    try:
        lib = load(_settings[0])
    except (KernelBuildError, OSError) as e:
        return str(e)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, SYMBOL)), platform="cpu")
    return None


# The kernel's vector paths need one of these sets (`cpu_qmatvec.cc`: 16-lane AVX-512, else 8-lane
# AVX2); without them it compiles a scalar loop that is slower than XLA's vectorized
# multiply-reduce, so it is not used.
VECTOR_FLAGS = ("avx512f", "avx512bw", "avx512vl")
AVX2_FLAGS = ("avx2", "fma")


def vectorized() -> bool:
    """Whether this CPU has the instructions of one of the kernel's vector paths (`VECTOR_FLAGS`
    or `AVX2_FLAGS`)."""
    flags = set(_cpu_flags().split())
    return set(VECTOR_FLAGS) <= flags or set(AVX2_FLAGS) <= flags


# int8 activations on the AVX-512 path need VNNI's integer dot product (vpdpbusd on 512-bit
# vectors); the AVX2 path has its own (vpmaddubsw).
INT8_FLAGS = ("avx512_vnni",)


def int8_activations() -> bool:
    """Whether this CPU runs the kernel's int8-activation path: the AVX-512 path with
    `INT8_FLAGS`, or the AVX2 path (`AVX2_FLAGS` without AVX-512)."""
    flags = set(_cpu_flags().split())
    if set(VECTOR_FLAGS) <= flags:
        return set(INT8_FLAGS) <= flags
    return set(AVX2_FLAGS) <= flags


def quantize_activations(x_MK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's int8 activations, in NumPy: (codes int8 [M, K], scales float32 [M, B]).

    Per row and block b of `BLOCK` inputs (the last block may be shorter): a = max |x| over the
    block, d = a / 127 in float32, codes = rint(x / d) (float32 division, round half to even)
    clipped to [-127, 127], 0 where d = 0; a block holding a non-finite value gets d = NaN (so
    the product is NaN, as on the float path). The kernel then returns
    y[m, n] = sum_b d[m, b] * s[n, g(b)] * sum_{k in b} codes[m, k] * c[n, k] with the weight's
    integer codes c (int8 as stored; int4: nibble - 8) and scales s, the inner sums exact."""
    x = np.asarray(x_MK, np.float32)
    m, k = x.shape
    nb = -(-k // BLOCK)
    xp = np.zeros((m, nb * BLOCK), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(m, nb, BLOCK)
    with np.errstate(invalid="ignore"):
        a = np.max(np.abs(xb), axis=-1)
        d = np.where(np.isfinite(a), a / np.float32(127), np.float32(np.nan)).astype(np.float32)
        safe = np.where(d > 0, d, np.float32(1))[..., None]
        q = np.where(d[..., None] > 0, np.clip(np.rint(xb / safe), -127, 127), 0)
    return q.reshape(m, -1)[:, :k].astype(np.int8), d


def available() -> bool:
    """Whether this CPU runs the kernel's vector path and the kernel is registered (built at the
    first call). A failed build warns once, naming the compiler command and its stderr, and
    leaves XLA's path to run."""
    if not vectorized():
        return False
    error = _register()
    if error is not None:
        _warn_once(error)
    return error is None


@functools.cache
def _warn_once(error: str) -> None:
    warnings.warn(f"{error}\nfloe_jax falls back to XLA's multiply-reduce matvec "
                  "(QuantConfig(cpu_kernel=False), or FLOE_JAX_CPU_KERNELS=0 on the command "
                  "line, silences this).", stacklevel=3)  # fmt: skip


def path(cpu_kernel: bool = True, activations: str = "float32") -> str:
    """The matvec path a decode step on the CPU takes for weights quantized with
    `QuantConfig(cpu_kernel=..., activations=...)` (benchmarks print it)."""
    if not cpu_kernel:
        return "XLA multiply-reduce (cpu_kernel=False)"
    if activations == "int8" and available():
        if int8_activations():
            isa = "VNNI" if set(VECTOR_FLAGS) <= set(_cpu_flags().split()) else "AVX2"
            return f"floe_qmatvec kernel, int8 activations ({isa})"
        return "floe_qmatvec kernel, float32 activations (this CPU lacks avx512_vnni)"
    if not vectorized():
        return (f"XLA multiply-reduce (this CPU lacks {'/'.join(VECTOR_FLAGS)} and "
                f"{'/'.join(AVX2_FLAGS)})")  # fmt: skip
    return "floe_qmatvec kernel" if _register() is None else "XLA multiply-reduce (build failed)"


def _call(x_MK, q, scale, fmt: str, act: str):
    m, n = x_MK.shape[0], q.shape[0]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    attrs = dict(fmt=np.int32(FORMAT_CODES[fmt]), act=np.int32(ACTIVATION_CODES[act]))
    return jax.ffi.ffi_call(TARGET, out)(x_MK, q, scale, **attrs)


@functools.cache
def _batched(fmt: str, act: str):
    """The call for one format, whose vmap over rows of x (a shared weight) folds the batch
    axis into the rows: the weight is never broadcast."""

    @jax.custom_batching.custom_vmap
    def f(x_MK, q, scale):
        return _call(x_MK, q, scale, fmt, act)

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


# The codes' dtype per format (bf16: its uint16 bit patterns, or bfloat16 built by hand).
CODE_DTYPES = {"bf16": ("uint16", "bfloat16"), "int8": ("int8",), "int4": ("uint8",),
               "nf4": ("uint8",)}  # fmt: skip


def check_activations(fmt: str, group_size: int | None, activations: str) -> None:
    """Raises ValueError unless weights of `fmt` grouped by `group_size` inputs (None: one group
    per row) take `activations`: the one statement of the int8-activation rules
    (`floe_jax.quant.QuantConfig` and `check_operands` apply it)."""
    if activations not in ACTIVATION_CODES:
        raise ValueError(f"activations={activations!r} is not one of {tuple(ACTIVATION_CODES)}")
    if activations == "float32":
        return
    if fmt not in INT8_FORMATS:
        raise ValueError(f"activations='int8' takes formats {INT8_FORMATS} (integer codes), "
                         f"not format={fmt!r}: keep activations='float32'")  # fmt: skip
    if group_size is not None and group_size % BLOCK:
        raise ValueError(f"activations='int8' needs group_size a multiple of {BLOCK} (one "
                         f"activation block per weight group), got {group_size}")  # fmt: skip


def check_operands(x_MK, q, scale, fmt: str, activations: str = "float32") -> None:
    """Raises ValueError, naming the shapes and dtypes, if `qmatvec` cannot take its operands."""
    if fmt not in FORMAT_CODES:
        raise ValueError(f"qmatvec: format {fmt!r} is not one of {tuple(FORMAT_CODES)}")
    what = f"x {x_MK.dtype}{list(x_MK.shape)}, q {q.dtype}{list(q.shape)}, scale " \
           f"{scale.dtype}{list(scale.shape)}, format {fmt}"  # fmt: skip
    if x_MK.ndim != 2 or q.ndim != 2 or scale.ndim != 2:
        raise ValueError(f"qmatvec: x, q and scale must be 2-D ({what})")
    if str(q.dtype) not in CODE_DTYPES[fmt]:
        raise ValueError(f"qmatvec: format {fmt} needs q of dtype {' or '.join(CODE_DTYPES[fmt])} "
                         f"({what})")  # fmt: skip
    if scale.dtype != jnp.float32:
        raise ValueError(f"qmatvec: scale must be float32 ({what})")
    k = x_MK.shape[1]
    packed = fmt in ("int4", "nf4")
    if (2 * q.shape[1] if packed else q.shape[1]) != k or scale.shape[0] != q.shape[0]:
        raise ValueError(f"qmatvec: shapes disagree: x's K={k} against q's {q.shape[1]} "
                         f"{'bytes (2 codes each)' if packed else 'codes'}, or scale's rows "
                         f"against q's ({what})")  # fmt: skip
    g = scale.shape[1]
    bad = g != 0 if fmt == "bf16" else (g < 1 or k % g or (packed and (k // g) % 2))
    if bad:
        raise ValueError(f"qmatvec: scale's {g} groups do not split K={k} into "
                         f"{'no groups (bf16)' if fmt == 'bf16' else 'equal (even) groups'} "
                         f"({what})")  # fmt: skip
    try:
        check_activations(fmt, k // g if g > 1 else None, activations)
    except ValueError as e:
        raise ValueError(f"qmatvec: {e} ({what})") from None


def qmatvec(
    x_MK: jax.Array, q: jax.Array, scale: jax.Array, fmt: str, activations: str = "float32"
) -> jax.Array:
    """`x [M, K] . decode(q, scale)^T` -> float32 [M, N] on the CPU (`floe_jax.quant`'s codes:
    q [N, K] or [N, K/2] packed, scale [N, G]), built and registered at the first call. With
    `activations="int8"`, x is first quantized per block as `quantize_activations` specifies.

    Raises:
      ValueError: operands the kernel does not take (`check_operands`), or int8 activations on
        a CPU whose kernel has no int8 path (`int8_activations`).
      KernelBuildError: the kernel could not be built (`available()` checks without raising).
    """
    check_operands(x_MK, q, scale, fmt, activations)
    if activations == "int8" and not int8_activations():
        raise ValueError("qmatvec: int8 activations need the kernel's int8 path: "
                         f"{'/'.join(INT8_FLAGS)} where the CPU has AVX-512, or AVX2 + FMA "
                         "without AVX-512; this CPU has neither")  # fmt: skip
    if (error := _register()) is not None:
        raise KernelBuildError(error)
    return _batched(fmt, activations)(x_MK.astype(jnp.float32), q, scale)
