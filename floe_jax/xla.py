"""`jit`: `jax.jit` with floe_jax's XLA options for the backend, chosen at the first call.

Every top-level program that runs the model (decode, a federated round, pretraining, serving)
is compiled through this. On CPU it turns off XLA:CPU's YNNPACK fusions, which jaxlib 0.10
applies by default to matmuls, elementwise ops and reductions: on the 2-core CPU this project is
benchmarked on (`python -m experiments bench decode|round`), they made a batch-8 decode step about
1.3x slower (reductions over the KV cache, small matmuls) and a LoRA training step ~7% slower.
Other backends get no extra options. The backend is read at the first call, not at import, so
importing floe_jax never initialises JAX's backends.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

CPU_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def backend_options(backend: str) -> dict[str, Any]:
    """XLA compiler options floe_jax uses on `backend` ("cpu", "gpu", "tpu")."""
    return dict(CPU_OPTIONS) if backend == "cpu" else {}


class _Jitted:
    """A `jax.jit`-wrapped function built lazily; attributes (`lower`, `eval_shape`, ...) pass
    through to it."""

    def __init__(self, fun, jit_kwargs):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None

    def _get(self):
        if self._jitted is None:
            opts = backend_options(jax.default_backend()) or None
            self._jitted = jax.jit(self._fun, compiler_options=opts, **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._get(), name)


def jit(fun=None, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` plus `backend_options` for the default backend. Usable as
    `jit(f, static_argnames=...)` or as a decorator `@jit(static_argnames=...)`."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jitted(fun, jit_kwargs)
