"""`bench aggregate --quick` runs every rule through the jitted entry point with per-cluster rule
states, states each rule's bound from rates measured in the same run, and floe_jax's FlexLoRA
agrees with the NumPy reference loop it is timed against."""

from experiments.benchmarks import aggregate as bench


def test_bench_aggregate_quick_runs_every_rule_and_agrees_with_numpy():
    rows = {r["rule"]: r for r in bench.run(quick=True)}
    for rule in ("fedit", "hetlora", "ffa", "fedsa", "flora", "fedex", "flexlora"):
        row = rows[rule]
        assert row["floe_jax_s"] > 0 and row["bound_s"] > 0, rule
        assert row["pct_of_bound"] == 100 * row["bound_s"] / row["floe_jax_s"], rule
        # every rule reads the 4 clients' factors of one layer: Σ (I + O) R C L float32
        assert row["GiB_read"] * 2**30 == 4 * 1 * 32 * 4 * (2 * 1792 + 2 * 1024 + 3 * 5760)
    assert rows["fedit"]["TFLOP"] == 0 and rows["flora"]["TFLOP"] > 0
    assert rows["fedex"]["TFLOP"] > rows["flora"]["TFLOP"]  # R residual columns more
    assert rows["flexlora"]["TFLOP"] < rows["flexlora, padded"]["TFLOP"]  # K = 60, not 128
    assert rows["flexlora vs numpy max rel. diff (layer 0)"]["speedup"] < 1e-4
    assert rows["flexlora (1 layers), interleaved"]["numpy_s"] > 0
    assert rows["fedit, interleaved"]["numpy_s"] > 0
    for rule in ("fedit", "hetlora", "ffa", "fedsa"):  # one pass against two, same bound
        one, two = rows[f"{rule}, round path"], rows[f"{rule}, round path, two-pass"]
        assert one["bound_s"] == two["bound_s"] < rows[rule]["bound_s"], rule
        assert one["vs_two_pass"] == two["floe_jax_s"] / one["floe_jax_s"], rule
    for rule in ("flora", "fedex", "flexlora", "flexlora, padded"):  # the same FLOPs, fewer bytes
        path, full = rows[f"{rule}, round path"], rows[rule]
        assert path["TFLOP"] == full["TFLOP"] > 0, rule
        assert path["GiB_written"] < full["GiB_written"], rule
