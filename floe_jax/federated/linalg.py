"""Symmetric eigenproblems and top-r SVDs of low-rank products, safe inside any jit.

FlexLoRA needs the best rank-r approximation of `ΔW = Σ p_k s_k A_k B_k` (`top_svd_factored`
when the stacked rank K is below min(I, O), else `top_svd_dense`); Floe's spectral clustering
needs `eigh`. On CPU both go to LAPACK on the host (see `eigh` for why), one OpenBLAS thread
at a time (`lapack_threads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

_BLAS_LOCK = threading.Lock()
_BLAS_STATE = {"depth": 0, "saved": []}


@functools.cache
def _openblas_threads() -> tuple:
    """`(get, set)` thread-count functions of every OpenBLAS loaded in this process (NumPy's
    and SciPy's each bring their own; jaxlib's CPU LAPACK kernels are SciPy's)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return ()
    found = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for stem in ("scipy_openblas", "openblas"):
            for tail in ("64_", ""):
                get = getattr(lib, f"{stem}_get_num_threads{tail}", None)
                put = getattr(lib, f"{stem}_set_num_threads{tail}", None)
                if get is not None and put is not None:
                    found.append((get, put))
                    break
            else:
                continue
            break
    return tuple(found)


@contextlib.contextmanager
def lapack_threads(n: int = 1):
    """Runs the block with every loaded OpenBLAS limited to `n` threads, then restores them.

    While a jitted program runs, XLA:CPU's own thread pool already has every core; OpenBLAS's
    pool on top spin-waits against it (and against any other process), and small LAPACK calls
    slow down by an order of magnitude: on the shared 2-core machine this was written on,
    SciPy's top-32 `syevr` of a 128 x 128 matrix took 64 ms with OpenBLAS's default threads
    and 1.3 ms with one. Nested and concurrent uses share one setting (a depth count).
    """
    libs = _openblas_threads()
    with _BLAS_LOCK:
        if _BLAS_STATE["depth"] == 0:
            _BLAS_STATE["saved"] = [get() for get, _ in libs]
            for _, put in libs:
                put(n)
        _BLAS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["depth"] -= 1
            if _BLAS_STATE["depth"] == 0:
                for (_, put), k in zip(libs, _BLAS_STATE["saved"], strict=True):
                    put(k)


def eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric eigendecomposition `(w ascending, v)` of `x [..., K, K]`, safe inside any jit.

    On CPU it goes to NumPy's LAPACK through a host callback: XLA's CPU `eigh` splits a batch
    over the intra-op thread pool and blocks the pool thread that called it until the pieces
    finish (`jax::ParallelBatchMap`), so two such calls running at once can leave every thread
    of a small pool waiting, and the program deadlocks. Accelerators use `jnp.linalg.eigh`.
    """
    if jax.default_backend() != "cpu":
        return jnp.linalg.eigh(x)
    out = (jax.ShapeDtypeStruct(x.shape[:-1], x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))

    def host(a):
        with lapack_threads(1):
            return tuple(np.linalg.eigh(np.asarray(a)))

    return jax.pure_callback(host, out, x, vmap_method="broadcast_all")


def top_svd_factored(p_IK, q_KO, r: int):
    """Top-r SVD of `p @ q` without forming it, K < min(I, O): K x K work only.

    `pᵀp = E diag(d) Eᵀ` gives `p = U_p diag(√d) Eᵀ` with orthonormal `U_p = p E / √d`, so
    `p q = U_p M` with `M = diag(√d) Eᵀ q` [K, O]; the top singular triplets of M (from `eigh` of
    `M Mᵀ`) map back through U_p. This plays the role of the usual thin QR of both factors followed
    by an SVD of the K x K core: the same U, Σ, V from K x K problems.
    """
    d, e = eigh(p_IK.T @ p_IK)
    sd = jnp.sqrt(jnp.maximum(d, 0.0))
    keep = sd > jnp.finfo(p_IK.dtype).eps * p_IK.shape[0] * jnp.max(sd)
    m_KO = (sd * keep)[:, None] * (e.T @ q_KO)
    u_core, s, v_OR = top_svd_dense_gram(m_KO, r)  # K <= O: eigh of the K x K Gram M Mᵀ
    u_IR = (p_IK @ e) * jnp.where(keep, 1.0 / jnp.where(keep, sd, 1.0), 0.0)[None] @ u_core
    return u_IR, s, v_OR


def top_eigh(x: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """The r largest eigenpairs `(w [..., r] descending, v [..., K, r])` of symmetric x [..., K, K].

    On CPU, LAPACK's `syevr` through SciPy computes only those r (FlexLoRA needs r = R_max of a
    K up to the model width, far fewer than a full decomposition finds); see `eigh` for why CPU
    linear algebra goes through the host. Accelerators slice `jnp.linalg.eigh`.
    """
    K = x.shape[-1]
    if r >= K or jax.default_backend() != "cpu":
        w, v = eigh(x) if r >= K else jnp.linalg.eigh(x)
        return w[..., ::-1][..., :r], v[..., ::-1][..., :r]

    def host(a):
        import scipy.linalg  # noqa: PLC0415 (a dependency of jax)

        a = np.asarray(a)
        flat = a.reshape(-1, K, K)
        w = np.empty(flat.shape[:1] + (r,), a.dtype)
        v = np.empty(flat.shape[:1] + (K, r), a.dtype)
        with lapack_threads(1):
            for i, m in enumerate(flat):
                wi, vi = scipy.linalg.eigh(m, subset_by_index=[K - r, K - 1], driver="evr")
                w[i], v[i] = wi[::-1], vi[:, ::-1]
        return w.reshape(a.shape[:-2] + (r,)), v.reshape(a.shape[:-2] + (K, r))

    out = (
        jax.ShapeDtypeStruct(x.shape[:-1][:-1] + (r,), x.dtype),
        jax.ShapeDtypeStruct(x.shape[:-1] + (r,), x.dtype),
    )
    return jax.pure_callback(host, out, x, vmap_method="broadcast_all")


def _svd_from_gram(w, u, project):
    """`(u, s, v)` from the top eigenpairs `(w, u)` of a Gram `d dᵀ` of d [n, N]: `s = √w`,
    `v = project(u) / s` with `project(u) = dᵀ u`; negligible singular values (rounding of
    a rank-deficient d) give s = 0 and v = 0 instead of dividing by them."""
    s = jnp.sqrt(jnp.maximum(w, 0.0))
    tiny = s <= 1e-30 + jnp.finfo(u.dtype).eps * s[:1] * u.shape[0]
    v = jnp.where(tiny[None], 0.0, project(u) / jnp.where(tiny, 1.0, s)[None])
    return u, jnp.where(tiny, 0.0, s), v


def top_svd_dense_gram(d_IO, r: int):
    """Top-r SVD of a dense d with I <= O, from the top eigenpairs of `d dᵀ`."""
    w, u = top_eigh(d_IO @ d_IO.T, r)  # descending
    return _svd_from_gram(w, u, lambda u: d_IO.T @ u)


def dense_gram_flops(I: int, K: int, O: int, r: int) -> tuple[int, int]:
    """FLOPs of `top_svd_dense`'s two routes for d = p q [I, O] (K inner), eigenproblem left
    out (the same n x n one): `(through the factors, from d)`. With n = min(I, O), N = max:
    the Gram `p (q qᵀ) pᵀ` and `v = qᵀ (pᵀ u)` cost 2K²N + 2nK² + 2n²K + 2nKr + 2KNr; forming
    d, `d dᵀ` and `dᵀ u` cost 2nKN + 2n²N + 2nNr. Through the factors wins when K is near n and
    N is long (an MLP projection of Qwen2.5-0.5B with 960 live columns: 12.2 against 16.2
    GFLOP at 896 x 4864); from d for square d and large K."""
    n, N = min(I, O), max(I, O)
    via = 2 * K * K * N + 2 * n * K * K + 2 * n * n * K + 2 * n * K * r + 2 * K * N * r
    return via, 2 * n * K * N + 2 * n * n * N + 2 * n * N * r


def dense_gram_via_factors(I: int, K: int, O: int, r: int) -> bool:
    """Whether `top_svd_dense` takes the route through the factors (`dense_gram_flops`)."""
    via, from_d = dense_gram_flops(I, K, O, r)
    return via < from_d


def _top_svd_via_factors(p_IK, q_KO, r: int):
    """`top_svd_dense` through the factors, I <= O: d = p q is never formed."""
    w, u = top_eigh(p_IK @ ((q_KO @ q_KO.T) @ p_IK.T), r)  # d dᵀ, descending
    return _svd_from_gram(w, u, lambda u: q_KO.T @ (p_IK.T @ u))


def top_svd_dense(p_IK, q_KO, r: int):
    """Top-r SVD of `d = p @ q` from the top eigenpairs of the Gram matrix of d's shorter side,
    formed from d or through the factors, whichever costs fewer FLOPs (`dense_gram_flops`)."""
    I, K = p_IK.shape
    O = q_KO.shape[1]
    via = dense_gram_via_factors(I, K, O, r)
    if I > O:  # the Gram of dᵀ
        if via:
            v, s, u = _top_svd_via_factors(q_KO.T, p_IK.T, r)
        else:
            v, s, u = top_svd_dense_gram((p_IK @ q_KO).T, r)
        return u, s, v
    return _top_svd_via_factors(p_IK, q_KO, r) if via else top_svd_dense_gram(p_IK @ q_KO, r)
