"""`python -m experiments`: presets, runs, benchmarks and reports built on floe_jax."""
