"""Consistency of floe_jax.model's equivalent paths (parity with transformers is in test_hf.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import LoRAConfig, ModelConfig, RopeScaling
from floe_jax.lora import init_lora
from floe_jax.model import forward, init_cache
from tests import _hf_utils as U

fwd = jax.jit(forward, static_argnames="cfg")

LLAMA3_ROPE = RopeScaling(rope_type="llama3", factor=8.0, original_max_position_embeddings=64)
CFGS = {
    "llama-gqa": ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    ),
    "qwen2-mqa-tied-llama3": ModelConfig(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        qkv_bias=True,
        tie_word_embeddings=True,
        rope_scaling=LLAMA3_ROPE,
    ),
}


@pytest.fixture(scope="module", params=sorted(CFGS))
def model(request):
    cfg = CFGS[request.param]
    return cfg, U.random_params(cfg, seed=1)


def _tokens(cfg, b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32)


def test_cached_prefill_then_decode_equals_full_forward(model):
    cfg, params = model
    tokens = _tokens(cfg, 2, 10)
    full = fwd(params, tokens, cfg)
    P = 6
    cache = init_cache(cfg, batch=2, max_len=12)
    logits, cache = fwd(params, tokens[:, :P], cfg, cache=cache)
    steps = [logits]
    for t in range(P, tokens.shape[1]):
        logits, cache = fwd(params, tokens[:, t : t + 1], cfg, cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache.index) == 10
    np.testing.assert_array_equal(cache.pos, [10, 10])


def _left_pad(rows, t, pad_id=0):
    tokens = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        tokens[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_left_padded_batch_equals_unpadded_examples(model):
    cfg, params = model
    rows = [np.asarray(_tokens(cfg, 1, n, seed=n))[0] for n in (9, 4, 6)]
    tokens, mask = _left_pad(rows, 9)
    got = np.asarray(fwd(params, tokens, cfg, mask=mask))
    for i, r in enumerate(rows):
        want = fwd(params, jnp.asarray(r)[None], cfg)[0]
        np.testing.assert_allclose(got[i, 9 - len(r) :], want, atol=1e-5)
        assert np.isfinite(got[i]).all()  # padding rows stay finite


def test_left_padded_cached_decode_equals_unpadded_forward(model):
    """Padded prefill through the cache, then per-token decode: each row as if alone."""
    cfg, params = model
    full_rows = [np.asarray(_tokens(cfg, 1, n, seed=10 + n))[0] for n in (8, 5)]
    prompts = [r[:-3] for r in full_rows]
    tokens, mask = _left_pad(prompts, 5)
    cache = init_cache(cfg, batch=2, max_len=8)
    logits, cache = fwd(params, tokens, cfg, cache=cache, mask=mask)
    outs = [logits[:, -1:]]
    for k in range(3):
        step = jnp.asarray([[r[len(r) - 3 + k]] for r in full_rows], jnp.int32)
        logits, cache = fwd(params, step, cfg, cache=cache)
        outs.append(logits)
    got = np.asarray(jnp.concatenate(outs, axis=1))  # logits after the prompt and 3 new tokens
    for i, r in enumerate(full_rows):
        want = np.asarray(fwd(params, jnp.asarray(r)[None], cfg))[0, len(r) - 4 :]
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_jit_equals_no_jit(model):
    cfg, params = model
    lcfg = LoRAConfig(rank=2, alpha=4, targets=("q", "down"), max_rank=3)
    lora = init_lora(cfg, lcfg, key=jax.random.key(0))
    lora = dataclasses.replace(lora, b=jax.tree.map(lambda b: b + 0.1, lora.b))
    tokens = _tokens(cfg, 2, 7, seed=3)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    np.testing.assert_allclose(
        fwd(params, tokens, cfg, lora=lora, mask=mask),
        forward(params, tokens, cfg, lora=lora, mask=mask),
        atol=1e-5,  # XLA fuses differently under jit: float32 rounding only
    )


def test_bf16_forward_close_to_f32(model):
    cfg, params = model
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = _tokens(cfg, 2, 8, seed=4)
    want = fwd(params, tokens, cfg)
    got = fwd(params16, tokens, cfg16)
    assert got.dtype == jnp.float32
    err = np.abs(np.asarray(got) - np.asarray(want))
    assert err.max() < 0.1 * np.abs(np.asarray(want)).max(), err.max()
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) > 0.8
