"""`python -m experiments bench qmatvec`: the CPU quantized matvec kernel
(`kernels/cpu_qmatvec`) against XLA's multiply-reduce (`floe_jax.qmatmul.multiply_reduce`, the
path of `QuantConfig(cpu_kernel=False)`) and a float32 product, on Qwen2.5-0.5B's matrix shapes.
Both paths are called directly, so `FLOE_JAX_CPU_KERNELS` does not apply. On a CPU the kernel
does not run on only XLA's multiply-reduce is timed beside float32; on an accelerator XLA's
multiply-reduce (what a decode step runs there by default) and its dequantize-then-dot; on a GPU
also the Pallas kernel `kernels.gpu_qmatvec` ("pallas", int8 and int4: a decode step's path with
`quant.with_options(params, gpu_kernel=True)`).

One row of x (a decode step at batch 1) against 24 separate [4864, 896] MLP matrices (one per
layer, so they do not fit the cache, as in a decode step; `SHAPES`) and against the [151936, 896]
vocabulary matrix. GB/s is the bytes of codes and scales read over the time; each matrix's
float32 rate is the read bandwidth its other rows compare with. int8 and int4 also run the
kernel with int8 activations (`QuantConfig.activations="int8"`, "kernel, int8 act": x quantized
per block of 32, integer dot products) where the kernel has that path (AVX-512 VNNI, or AVX2);
its "rel. diff vs float32" includes the activations' rounding. Every side runs in one alternating
loop; medians.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import machine, print_table, timeit_alternating
from floe_jax import qmatmul, quant
from kernels import cpu_qmatvec, gpu_qmatvec

SHAPES = {"mlp [4864, 896] x24": (4864, 896, 24), "vocab [151936, 896]": (151936, 896, 1)}
FORMATS = (("bf16", None), ("int8", None), ("int4", 64), ("nf4", 64))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(w, fmt, gs):
    return quant.quantize_matrix(w, fmt, gs, transposed=False)  # jitted: NF4's argmin fuses


def _over(matvec, fmt, **kw):
    """One program applying `matvec(x, q, scale, fmt, **kw)` to x and each quantized weight."""
    return jax.jit(lambda x, qs: [matvec(x, q.q, q.scale, fmt, **kw) for q in qs])


def run(quick: bool = False) -> list[dict]:
    rows = []
    repeats = 3 if quick else 5
    kernel = jax.default_backend() == "cpu" and cpu_qmatvec.available()
    gpu = jax.default_backend() == "gpu"
    for name, (n, k, copies) in SHAPES.items():
        if quick:
            n, copies = min(n, 2048), min(copies, 2)
        rng = np.random.default_rng(0)
        ws = [jnp.asarray(rng.normal(size=(n, k)), jnp.float32) for _ in range(copies)]
        x = jnp.asarray(rng.normal(size=(1, k)), jnp.float32)
        f32 = jax.jit(lambda x, ws: [jnp.einsum("mk,nk->mn", x, w) for w in ws])
        sides = {("float32", "XLA dot"): (f32, ws, 4 * n * k * copies)}
        for fmt, gs in FORMATS:
            qs = [_quantize(w, fmt, gs) for w in ws]
            nbytes = sum(q.nbytes for q in qs)
            if kernel:
                sides[(fmt, "kernel")] = (_over(cpu_qmatvec.qmatvec, fmt), qs, nbytes)
            sides[(fmt, "XLA multiply-reduce")] = (_over(qmatmul.multiply_reduce, fmt), qs, nbytes)
            if jax.default_backend() != "cpu":
                sides[(fmt, "XLA dequantized dot")] = (_over(qmatmul.dequantized_dot, fmt), qs,
                                                       nbytes)  # fmt: skip
            if gpu and gpu_qmatvec.block_n(1, n, k, qs[0].scale.shape[-1], fmt):
                sides[(fmt, "pallas")] = (_over(gpu_qmatvec.qmatvec, fmt), qs, nbytes)
            if kernel and fmt in cpu_qmatvec.INT8_FORMATS and cpu_qmatvec.int8_activations():
                i8 = _over(cpu_qmatvec.qmatvec, fmt, activations="int8")
                sides[(fmt, "kernel, int8 act")] = (i8, qs, nbytes)
        del ws
        calls = [lambda f=f, a=a, x=x: jax.block_until_ready(f(x, a)) for f, a, _ in sides.values()]
        want = np.asarray(sides[("float32", "XLA dot")][0](x, sides[("float32", "XLA dot")][1])[0])
        times = timeit_alternating(*calls, repeats=repeats)
        bw = sides[("float32", "XLA dot")][2] / times[0]
        for ((fmt, path), (f, a, nbytes)), t in zip(sides.items(), times, strict=True):
            got = np.asarray(f(x, a)[0])
            rows.append(
                {
                    "matrix": name,
                    "format": fmt,
                    "path": path,
                    "ms": 1e3 * t,
                    "MB read": nbytes / 1e6,
                    "GB/s": nbytes / t / 1e9,
                    "% of float32's GB/s": 100 * nbytes / t / bw,
                    "rel. diff vs float32": float(np.abs(got - want).max() / np.abs(want).max()),
                }
            )
    print_table(rows, title=f"bench qmatvec: quantized matvec, 1 row — {machine()}, load "
                f"average {os.getloadavg()[0]:.1f}")  # fmt: skip
    return rows
