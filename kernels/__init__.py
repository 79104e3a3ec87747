"""Pallas kernels for floe_jax's hot paths, each beside its pure-jnp reference and a dispatcher.

- `decode_attention`: one decode step's attention to a KV cache, reading only its filled blocks.

A model chooses its kernel with `ModelConfig.attention_impl` (`reference`, the default, or
`pallas`); the command line sets it from `FLOE_KERNELS`. On a CPU the Pallas kernels run in
Pallas' interpreter (slow: for tests).
"""
