"""Kernels for floe_jax's hot paths, each beside its pure-jnp reference and a dispatcher.

- `decode_attention`: one decode step's attention to a KV cache, reading only its filled blocks.
- `cpu_qmatvec`: a C++ XLA FFI call (CPU only) contracting few rows of activations with a
  quantized weight (`floe_jax.quant`) without a float copy of it; `floe_jax.quant` selects it on
  CPUs through `jax.lax.platform_dependent` unless `QuantConfig(cpu_kernel=False)` (the command
  line sets it from `FLOE_JAX_CPU_KERNELS`; the library reads no environment).

A model chooses its kernel with `ModelConfig.attention_impl` (`reference`, the default, or
`pallas`); the command line sets it from `FLOE_KERNELS`. On a CPU the Pallas kernels run in
Pallas' interpreter (slow: for tests).
"""
