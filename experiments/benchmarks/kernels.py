"""`python -m experiments bench kernels`: each Pallas kernel of `kernels/` against its reference.

`decode_attention`: one decode step's attention to a KV cache of 2,048 slots (256 with
`--quick`) filled to 1/16, 1/4 and all of it, batch 8, with FJ-REF's heads (8 query, 4 KV, head
dim 32) and Qwen2.5-0.5B's (14 query, 2 KV, head dim 64); the pure-jnp reference (what the model
runs by default: every slot scored, the unfilled ones masked) against the Pallas kernel (only
the filled blocks read), both jitted, alternating calls, medians, and the largest difference.
On an accelerator each timing is 200 calls dispatched back to back (per-call figures), so a
kernel of microseconds is not hidden under one call's dispatch and synchronisation.
On a GPU the kernel compiles through Triton. On a CPU it runs in Pallas' interpreter: the
`mode` column says so, and those timings measure the interpreter, not the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import block, machine, print_table, timeit_alternating
from kernels import decode_attention as da

HEADS = {"fj-ref": (4, 2, 32), "qwen2.5-0.5b": (2, 7, 64)}  # KV heads N, G per KV head, K
BATCH = 8


def _call(fn, *args, iters: int = 1):
    """`iters` calls of `fn`, dispatched back to back, blocking on the last: a compiled kernel
    of a few microseconds is timed over many calls, not over one call's dispatch and sync."""
    for _ in range(iters - 1):
        fn(*args)
    return block(fn(*args))


def run(quick: bool = False) -> list[dict]:
    S = 256 if quick else 2048
    interpret = jax.default_backend() == "cpu"
    mode = "interpreter (CPU)" if interpret else "compiled"
    iters = 1 if interpret else 200  # calls per timing; figures are per call
    rows = []
    for name, (N, G, K) in HEADS.items():
        X = BATCH * N
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(kq, (X, G, K))
        k = jax.random.normal(kk, (X, S, K))
        v = jax.random.normal(kv, (X, S, K))
        ref = jax.jit(da.reference)
        ker = jax.jit(lambda q, k, v, m, n: da.pallas(q, k, v, m, n, interpret=interpret))
        for n_filled in (S // 16, S // 4, S):
            mask = jnp.broadcast_to(jnp.arange(S) < n_filled, (BATCH, S))
            n = jnp.int32(n_filled)
            call_ref = functools.partial(_call, ref, q, k, v, mask, iters=iters)
            call_ker = functools.partial(_call, ker, q, k, v, mask, n, iters=iters)
            want, got = call_ref(), call_ker()
            t_ref, t_ker = timeit_alternating(
                call_ref, call_ker, repeats=3 if quick else 20, pause=0.05 if interpret else 0
            )
            rows.append(
                {
                    "heads": name,
                    "cache slots": S,
                    "filled": n_filled,
                    "reference us": 1e6 * t_ref / iters,
                    "pallas us": 1e6 * t_ker / iters,
                    "speed-up": t_ref / t_ker,
                    "max abs diff": float(np.abs(np.asarray(got) - np.asarray(want)).max()),
                    "mode": mode,
                }
            )
    print_table(rows, title=f"bench kernels: decode_attention, batch {BATCH} — {machine()}")
    return rows
