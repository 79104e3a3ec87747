"""Timing and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import numpy as np

from floe_jax.config import ModelConfig

# The reference shape every benchmark in the issues names: Llama, vocab 2048, hidden 256,
# 4 layers, 8 heads, 4 KV heads, intermediate 704, untied embeddings, float32.
FJ_REF = ModelConfig(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=704,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    tie_word_embeddings=False,
)


def fj_ref_torch(seed: int = 0):
    """A transformers `LlamaForCausalLM` of FJ-REF's shape in float32, random weights from
    `torch.manual_seed(seed)`: the PyTorch side of the benchmarks."""
    import torch
    import transformers

    from floe_jax.hf import config_to_hf

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(FJ_REF))).float()


def block(x):
    """Waits for every array in a pytree."""
    return jax.block_until_ready(x)


def timeit(fn, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` (which must block on its own results)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_alternating(*fns, repeats: int = 5, warmup: int = 1, pause: float = 0.05):
    """Median wall seconds of each `fn()` (each must block on its own results), calling them in
    turn (a, b, ..., a, b, ...). Returns a list, one median per fn.

    Comparisons run this way so that every side sees the same machine: on a shared CPU the
    speed drifts over minutes, and back-to-back blocks would measure the drift. `pause` seconds
    before each call let the previous side's worker threads (PyTorch's OpenMP pool spin-waits
    after a call) go idle.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def machine() -> str:
    """One line naming the machine: CPU model and core count, or the accelerator."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} ({dev.platform})"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU)"


def matmul_gflops(n: int | None = None, dtype=np.float32) -> float:
    """Measured float32 matmul rate of this machine through XLA (JAX's default precision), in
    GFLOP/s, from an n x n product: n = 1024 on a CPU, 8192 on an accelerator (a 1024² product
    there is a few microseconds, timed mostly as dispatch)."""
    n = n or (1024 if jax.default_backend() == "cpu" else 8192)
    x = jax.numpy.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    block(f(x))
    sec = timeit(lambda: block(f(x)), repeats=5)
    return 2 * n**3 / sec / 1e9


def print_table(rows: list[dict], title: str | None = None) -> str:
    """Prints rows as a Markdown table and returns the text."""
    if not rows:
        return ""
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    text = ("\n".join([f"### {title}", ""]) + "\n" if title else "") + "\n".join(lines)
    print(text, flush=True)
    return text
