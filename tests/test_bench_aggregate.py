"""`bench aggregate --quick` runs every rule through the jitted entry point with per-cluster rule
states, and floe_jax's FlexLoRA agrees with the NumPy reference loop it is timed against."""

from experiments.benchmarks import aggregate as bench


def test_bench_aggregate_quick_runs_every_rule_and_agrees_with_numpy():
    rows = {r["rule"]: r for r in bench.run(quick=True)}
    for rule in ("fedit", "hetlora", "ffa", "fedsa", "flora", "fedex", "flexlora"):
        assert rows[rule]["floe_jax_s"] > 0, rule
    assert rows["flexlora vs numpy max rel. diff (layer 0)"]["ratio"] < 1e-4
    assert rows["one local train step (1x64 tok, rank 8)"]["floe_jax_s"] > 0
