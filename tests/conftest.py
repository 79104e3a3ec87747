"""Shared fixtures. Tests run on the CPU in float32 at highest matmul precision."""

import dataclasses

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

from floe_jax.config import ModelConfig  # noqa: E402
from floe_jax.model import init_params  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    """A tiny Llama with GQA: fast enough for every test."""
    return ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    return init_params(tiny_cfg, key=jax.random.key(0))


@pytest.fixture(scope="session")
def kernel_cfg(tiny_cfg) -> ModelConfig:
    """The tiny Llama widened to head dim 16, the smallest the decode kernel takes."""
    return dataclasses.replace(tiny_cfg, hidden_size=64, intermediate_size=96)


@pytest.fixture(scope="session")
def kernel_params(kernel_cfg):
    return init_params(kernel_cfg, key=jax.random.key(0))
