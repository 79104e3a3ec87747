"""Training memory: the chunked next-token loss, per-layer rematerialisation, bfloat16 against
transformers, `client_chunk="auto"` and the planner (`floe_jax.plan`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.lora import init_lora
from floe_jax.loss import token_loss
from floe_jax.model import init_params

TINY = ModelConfig(
    model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3,
    num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
)  # fmt: skip


def _lora(cfg, seed=1):
    """An adapter with nonzero `b`, so gradients reach both factors."""
    lo = init_lora(cfg, LoRAConfig(rank=4), key=jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(lo.b)))
    b = {m: 0.1 * jax.random.normal(next(keys), v.shape) for m, v in lo.b.items()}
    return dataclasses.replace(lo, b=b)


def _batch(cfg, B=3, T=13, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[0, :4] = 0  # left padding
    loss_mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(loss_mask)


def _loss_and_grads(cfg, params, lora, batch):
    """Mean loss and its gradients wrt the adapter and the base (pretraining's gradient)."""

    def mean(params, train):
        s, n = token_loss(params, lora.with_trainable(train), *batch, cfg=cfg)
        return s / n

    return jax.value_and_grad(mean, argnums=(0, 1))(params, lora.trainable())


@pytest.mark.parametrize("chunk", [1, 5, 16, 10_000])
def test_chunked_loss_equals_plain(chunk):
    """Value and gradients (adapter and base) of the chunked loss equal the plain loss's: chunks
    that divide B·(T-1) = 36 tokens or not, one token, and one chunk bigger than the batch."""
    params = init_params(TINY, key=jax.random.key(0))
    lora, batch = _lora(TINY), _batch(TINY)
    want, (gp_want, gl_want) = _loss_and_grads(TINY, params, lora, batch)
    cfg = dataclasses.replace(TINY, loss_chunk=chunk)
    got, (gp_got, gl_got) = _loss_and_grads(cfg, params, lora, batch)
    assert float(want) > 1.0  # ~ln(97): the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(jnp.abs(gl_want["b"]["q_proj"]).max()) > 1e-4
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), gl_got, gl_want
    )
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), gp_got, gp_want
    )
    s, n = token_loss(params, lora, *batch, cfg=cfg)
    s0, n0 = token_loss(params, lora, *batch, cfg=TINY)
    assert float(n) == float(n0) > 0  # the count is the plain loss's, padding rows excluded


def test_chunked_loss_untied_head():
    """The chunked projection reads `lm_head` when the embeddings are untied."""
    cfg = dataclasses.replace(TINY, tie_word_embeddings=False)
    params = init_params(cfg, key=jax.random.key(3))
    lora, batch = _lora(cfg), _batch(cfg, seed=2)
    want, (gp_want, _) = _loss_and_grads(cfg, params, lora, batch)
    got, (gp_got, _) = _loss_and_grads(dataclasses.replace(cfg, loss_chunk=7), params, lora, batch)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(gp_got["lm_head"], gp_want["lm_head"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_layers", [3, 12])  # unrolled layer scan, and a rolled one
def test_remat_gradients_equal_plain(num_layers):
    """`remat=True` changes what the backward pass stores, not what it computes."""
    cfg = dataclasses.replace(TINY, num_layers=num_layers)
    params = init_params(cfg, key=jax.random.key(0))
    lora, batch = _lora(cfg), _batch(cfg)
    want, (gp_want, gl_want) = _loss_and_grads(cfg, params, lora, batch)
    got, (gp_got, gl_got) = _loss_and_grads(
        dataclasses.replace(cfg, remat=True), params, lora, batch
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), gl_got, gl_want
    )
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), gp_got, gp_want
    )


@pytest.mark.parametrize("case", ["qwen2-gqa", "llama-gqa", "qwen2-mqa-tied-theta"])
def test_bf16_forward_matches_transformers_bf16(case, tmp_path):
    """A bfloat16 checkpoint runs in bfloat16 (weights and activations) and its logits agree with
    transformers' bfloat16 model within bfloat16 tolerance: at most 2^-5 of the largest logit
    anywhere (8 units in the last place of bf16's 8-bit mantissa) and 2^-6 on average."""
    import torch

    from floe_jax.hf import load_hf
    from floe_jax.model import hidden_states
    from tests import _hf_utils as U

    model = U.make_hf_model(case, seed=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    assert cfg.dtype == "bfloat16"
    tokens = U.random_tokens(cfg, b=2, t=24, seed=1)
    x, _ = hidden_states(params, jnp.asarray(tokens), cfg)
    assert x.dtype == jnp.bfloat16  # activations, not only weights, are bf16
    want = U.hf_logits(model, tokens)
    got = np.asarray(U.forward(params, jnp.asarray(tokens), cfg))
    scale = np.abs(want).max()
    assert scale > 1.0
    err = np.abs(got - want)
    assert err.max() <= 2**-5 * scale, (err.max(), scale)
    assert err.mean() <= 2**-6 * np.abs(want).mean(), (err.mean(), np.abs(want).mean())
