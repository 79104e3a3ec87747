"""Pallas kernels for floe_jax's hot paths, each beside its pure-jnp reference and a dispatcher.

- `decode_attention`: one decode step's attention to a KV cache, reading only its filled blocks.

Kernels are chosen with `FLOE_KERNELS` (`reference`, the default, or `pallas`), read when a step
is traced; on a CPU the Pallas kernels run in Pallas' interpreter (slow: for tests).
"""
