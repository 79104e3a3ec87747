"""`bench --profile`: the per-op table read back from a real jax.profiler trace."""

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks._profile import op_table, traced


def test_op_table_counts_each_call_of_a_jitted_op(tmp_path):
    f = jax.jit(lambda x, w: jnp.tanh(x @ w) * 2.0)
    x, w = jnp.ones((64, 128)), jnp.ones((128, 256)) * 0.01
    f(x, w).block_until_ready()  # compile outside the trace
    with traced(str(tmp_path)):
        for _ in range(7):
            f(x, w).block_until_ready()
        lax_loop = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.sin(y) + y, x))
        lax_loop(x).block_until_ready()
    rows = op_table(str(tmp_path), top=1000)
    ops = {r["op"]: r for r in rows}
    assert ops, "no XLA op in the trace"
    assert all(r["calls"] >= 1 and r["total ms"] >= 0 for r in rows)
    assert max(r["calls"] for r in rows) >= 7  # the matmul (or its fusion) ran 7 times
    assert "while" not in ops  # control flow spans its body; only the body's ops count
    assert not any(op.rsplit(".", 1)[-1].isdigit() for op in ops)  # instances merged
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def test_op_table_without_a_trace_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        op_table(str(tmp_path))
