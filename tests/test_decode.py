"""floe_jax.decode: generation equals the full forward; buckets; streaming; sampling."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import ConfigError, LoRAConfig
from floe_jax.decode import (
    SamplingConfig,
    bucket_length,
    generate,
    greedy,
    pad_prompts,
    sample_logits,
    stream,
)
from floe_jax.lora import init_lora, merge_lora
from floe_jax.model import forward, init_params, stack_layers, unstack_layers

_forward_jit = jax.jit(forward, static_argnames="cfg")


def _greedy_reference(params, prompt, cfg, n, lora=None):
    """Greedy decoding by re-running the full forward (no cache) on the growing sequence, kept in
    one right-padded buffer: causal attention hides the padding from every position read, and
    one buffer length is one compile."""
    L = len(prompt)
    seq = np.zeros((1, L + n), np.int32)
    seq[0, :L] = prompt
    for t in range(L, L + n):
        logits = _forward_jit(params, jnp.asarray(seq), cfg, lora=lora)
        seq[0, t] = int(logits[0, t - 1].argmax())
    return seq[0, L:]


def _prompts(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(1, vocab, n)) for n in lengths]


def test_generate_equals_full_forward_greedy_for_left_padded_batch(tiny_cfg, tiny_params):
    prompts = _prompts(tiny_cfg.vocab_size, [5, 11, 3])
    tokens, mask = pad_prompts(prompts)
    out, lengths = generate(
        tiny_params, tokens, mask, tiny_cfg, max_new_tokens=6, key=jax.random.key(0)
    )
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(
            np.asarray(out[i]), _greedy_reference(tiny_params, p, tiny_cfg, 6)
        )
    np.testing.assert_array_equal(np.asarray(lengths), [6, 6, 6])


def test_generate_with_lora_equals_reference(tiny_cfg, tiny_params):
    lora = init_lora(tiny_cfg, LoRAConfig(rank=4, max_rank=8), key=jax.random.key(1))
    lora = jax.tree.map(lambda x: x, lora)
    b = {m: 0.3 * jax.random.normal(jax.random.key(2), v.shape) for m, v in lora.b.items()}
    lora = type(lora)(a=lora.a, b=b, mask=lora.mask, scale=lora.scale)
    prompts = _prompts(tiny_cfg.vocab_size, [7])
    tokens, mask = pad_prompts(prompts)
    out, _ = generate(
        tiny_params, tokens, mask, tiny_cfg, max_new_tokens=5, key=jax.random.key(0), lora=lora
    )
    ref = _greedy_reference(tiny_params, prompts[0], tiny_cfg, 5, lora=lora)
    np.testing.assert_array_equal(np.asarray(out[0]), ref)
    base, _ = generate(tiny_params, tokens, mask, tiny_cfg, max_new_tokens=5, key=jax.random.key(0))
    assert not np.array_equal(np.asarray(base[0]), ref), "the adapter should change the output"


def test_stream_equals_generate(tiny_cfg, tiny_params):
    tokens, mask = pad_prompts(_prompts(tiny_cfg.vocab_size, [4, 9]))
    out, _ = generate(tiny_params, tokens, mask, tiny_cfg, max_new_tokens=5, key=jax.random.key(0))
    steps = list(
        stream(tiny_params, tokens, mask, tiny_cfg, max_new_tokens=5, key=jax.random.key(0))
    )
    np.testing.assert_array_equal(np.stack(steps, axis=1), np.asarray(out))


def test_one_compile_per_bucket(tiny_cfg, tiny_params):
    """Prompt lengths inside one bucket and new contents reuse the compiled program."""
    generate.clear_cache() if hasattr(generate, "clear_cache") else None
    for lengths in ([3, 5], [9, 2], [16, 1]):
        tokens, mask = pad_prompts(_prompts(tiny_cfg.vocab_size, lengths), buckets=(16, 32))
        generate(tiny_params, tokens, mask, tiny_cfg, max_new_tokens=3, key=jax.random.key(0))
    assert generate._cache_size() == 1


def test_eos_stops_row_and_pads(tiny_cfg, tiny_params):
    prompts = _prompts(tiny_cfg.vocab_size, [6, 6], seed=3)
    tokens, mask = pad_prompts(prompts)
    free, _ = generate(tiny_params, tokens, mask, tiny_cfg, max_new_tokens=6, key=jax.random.key(0))
    eos = int(free[0, 2])  # make row 0's third token the EOS
    out, lengths = generate(
        tiny_params, tokens, mask, tiny_cfg, max_new_tokens=6, key=jax.random.key(0), eos_id=eos,
        pad_id=-1,
    )  # fmt: skip
    out, free = np.asarray(out), np.asarray(free)
    first = int(np.argmax(free[0] == eos))
    assert int(lengths[0]) == first + 1
    np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1 :] == -1).all()


def test_top_p_samples_only_from_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    s = SamplingConfig(temperature=1.0, top_p=0.7)
    draws = jax.vmap(lambda k: sample_logits(logits, k, s))(
        jax.random.split(jax.random.key(0), 400)
    )
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.7: only the first two survive
    assert counts[0] > counts[1] > 0


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (3, 17))
    out = sample_logits(logits, jax.random.key(1), SamplingConfig())
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))


def test_greedy_matches_argmax_on_ties_infs_and_nans():
    """`greedy` (max, then the smallest index at it) picks what `jnp.argmax` picks."""
    z = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    z[1, [7, 30]] = 9.0  # tie: the first index
    z[2, [9, 4]] = np.nan  # NaN wins, the first one
    z[3] = -np.inf  # all -inf: index 0
    z[4, [8, 5]] = np.inf  # +inf tie
    z[5, 49] = 1e30  # the last index
    got = np.asarray(jax.jit(greedy)(jnp.asarray(z)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(z), -1)))
    assert got.tolist() == [got[0], 7, 4, 0, 5, 49] and got.dtype == np.int32


@pytest.mark.parametrize("fuse", [True, False])
def test_unstacked_layers_equal_scanned(fuse, tiny_cfg):
    """The decode layout (per-layer dicts, q/k/v and gate/up fused) gives the scanned logits,
    with q/k/v biases and a LoRA on projections inside and outside the fused groups."""
    cfg = dataclasses.replace(tiny_cfg, qkv_bias=True)
    params = init_params(cfg, key=jax.random.key(3))
    layers = params["layers"]
    for m in ("q_proj", "k_proj", "v_proj"):  # nonzero biases, so a misplaced split shows
        layers[m]["b"] = jax.random.normal(jax.random.key(len(m)), layers[m]["b"].shape)
    lcfg = LoRAConfig(rank=2, alpha=4, targets=("k", "up", "o"))
    lora = init_lora(cfg, lcfg, key=jax.random.key(4))
    lora = dataclasses.replace(
        lora, b={m: jax.random.normal(jax.random.key(5), b.shape) for m, b in lora.b.items()}
    )
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
    unstacked = unstack_layers(params, fuse=fuse)
    assert ("q_proj+k_proj+v_proj" in unstacked["layers"][0]) == fuse
    chex.assert_trees_all_equal(stack_layers(unstacked, cfg), params)  # the exact inverse
    with pytest.raises(ValueError, match="stack_layers"):
        merge_lora(unstacked, lora)
    np.testing.assert_allclose(
        forward(unstacked, tokens, cfg, lora=lora),
        forward(params, tokens, cfg, lora=lora),
        atol=1e-5,
    )


def test_bad_inputs():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="largest bucket 32768"):
        bucket_length(32769)
    with pytest.raises(ValueError, match="largest bucket 64"):
        bucket_length(65, (16, 64))
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1, 2], []])


def test_last_only_logits_are_the_last_row(tiny_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, tiny_cfg.vocab_size)
    mask = jnp.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    full = forward(tiny_params, tokens, tiny_cfg, mask=mask)
    last = forward(tiny_params, tokens, tiny_cfg, mask=mask, last_only=True)
    assert last.shape == (2, 1, tiny_cfg.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-6)


def test_prompt_past_2048_tokens(tiny_cfg, tiny_params):
    """A 2,100-token prompt pads to the 4,096 bucket and decodes as the full forward does."""
    assert bucket_length(2049) == 4096
    (prompt,) = _prompts(tiny_cfg.vocab_size, [2100], seed=5)
    tokens, mask = pad_prompts([prompt])
    assert tokens.shape == (1, 4096) and int(mask.sum()) == 2100
    cfg = dataclasses.replace(tiny_cfg, max_position_embeddings=8192)
    out, _ = generate(tiny_params, tokens, mask, cfg, max_new_tokens=2, key=jax.random.key(0))
    np.testing.assert_array_equal(
        np.asarray(out[0]), _greedy_reference(tiny_params, prompt, cfg, 2)
    )
