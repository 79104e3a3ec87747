"""kernels/: each Pallas kernel equals its pure-jnp reference (in Pallas' interpreter on the CPU),
lowers for a GPU, and is reached from the model through its dispatcher."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import ConfigError, ModelConfig
from floe_jax.decode import pad_prompts
from floe_jax.model import forward, init_cache
from kernels import decode_attention as da

_SIZES = dict(vocab_size=16, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4)


def _case(B, N, G, S, K, n_filled, left_pad, dtype=jnp.float32, seed=0):
    """Random q/k/v and a decode mask: row b sees slots [left_pad[b], n_filled)."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B * N, G, K), dtype)
    k = jax.random.normal(kk, (B * N, S, K), dtype)
    v = jax.random.normal(kv, (B * N, S, K), dtype)
    slot = jnp.arange(S)[None]
    mask = (slot < n_filled) & (slot >= jnp.asarray(left_pad)[:, None])
    return q, k, v, mask


@pytest.mark.parametrize(
    "B,N,G,S,K,n_filled",
    [
        (2, 4, 2, 128, 32, 77),  # FJ-REF's heads; fill ends inside a block
        (1, 2, 7, 256, 64, 128),  # Qwen2.5-0.5B's 14/2 heads (G padded to 8); block boundary
        (3, 1, 1, 48, 16, 1),  # one slot filled; S a multiple of 16 only
        (2, 2, 4, 64, 32, 64),  # cache full
    ],
)
def test_pallas_equals_reference(B, N, G, S, K, n_filled):
    q, k, v, mask = _case(B, N, G, S, K, n_filled, left_pad=[0, n_filled // 3, 0][:B])
    want = da.reference(q, k, v, mask)
    got = da.pallas(q, k, v, mask, n_filled, block=da.kernel_block(S, K), interpret=True)
    assert got.shape == (B * N, G, K)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-6)


def test_pallas_equals_reference_in_bfloat16():
    q, k, v, mask = _case(2, 4, 2, 128, 32, 90, left_pad=[5, 0], dtype=jnp.bfloat16)
    want = da.reference(q, k, v, mask).astype(jnp.float32)
    got = da.pallas(q, k, v, mask, 90, interpret=True).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)


def test_pallas_reads_no_block_past_the_filled_slots():
    """NaN in every block after the last filled one: the kernel never touches them (the
    reference, which scores every slot, is NaN there)."""
    S, block, n_filled = 256, 64, 70  # slots 70..127 are in a read block, 128.. are not
    q, k, v, mask = _case(2, 2, 2, S, 32, n_filled, left_pad=[0, 3])
    poisoned_k = k.at[:, 2 * block :].set(jnp.nan)
    poisoned_v = v.at[:, 2 * block :].set(jnp.nan)
    got = da.pallas(q, poisoned_k, poisoned_v, mask, n_filled, block=block, interpret=True)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(da.reference(q, k, v, mask)), atol=2e-6, rtol=2e-6
    )
    assert np.isnan(np.asarray(da.reference(q, poisoned_k, poisoned_v, mask))).any()


def test_pallas_under_vmap_with_a_fill_per_member():
    """Vmapped (say over clients, each cache filled to its own length) it still equals the
    reference, and the batched kernel still lowers for a GPU."""
    C, B, N, G, S, K = 3, 2, 2, 2, 64, 16
    ks = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(ks[0], (C, B * N, G, K))
    k = jax.random.normal(ks[1], (C, B * N, S, K))
    v = jax.random.normal(ks[2], (C, B * N, S, K))
    n = jnp.asarray([5, 33, 64], jnp.int32)
    mask = jnp.broadcast_to(jnp.arange(S)[None, None] < n[:, None, None], (C, B, S))
    one = lambda q, k, v, m, n, interpret: da.pallas(q, k, v, m, n, block=16, interpret=interpret)
    got = jax.vmap(functools.partial(one, interpret=True))(q, k, v, mask, n)
    want = jax.vmap(da.reference)(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-6)
    batched = jax.jit(jax.vmap(functools.partial(one, interpret=False)))
    text = batched.trace(q, k, v, mask, n).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


def test_pallas_lowers_for_a_gpu_through_triton():
    """The kernel's Triton lowering runs here without a GPU (compiling it to PTX needs one)."""
    q, k, v, mask = _case(2, 4, 2, 128, 32, 50, left_pad=[0, 0])
    fn = jax.jit(lambda q, k, v, m, n: da.pallas(q, k, v, m, n, block=64))
    text = fn.trace(q, k, v, mask, jnp.int32(50)).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @__gpu\$xla\.gpu\.triton", text)


def test_pallas_refuses_blocks_that_do_not_tile_the_cache():
    q, k, v, mask = _case(1, 2, 2, 48, 32, 40, left_pad=[0])
    with pytest.raises(ValueError, match=r"48 slots, head dim 32\] with block 64"):
        da.pallas(q, k, v, mask, 40, block=64, interpret=True)


def test_kernel_block_follows_triton_shapes():
    assert da.kernel_block(128, 32) == 64
    assert da.kernel_block(96, 64) == 32
    assert da.kernel_block(48, 16) == 16
    assert da.kernel_block(40, 32) is None  # no power-of-two block >= 16 divides 40
    assert da.kernel_block(128, 80) is None  # head dim not a power of two
    assert da.kernel_block(128, 8) is None


def test_dispatcher():
    q, k, v, mask = _case(1, 2, 2, 128, 32, 40, left_pad=[0])
    want = np.asarray(da.reference(q, k, v, mask))
    assert ModelConfig(**_SIZES).attention_impl == "reference"
    np.testing.assert_array_equal(np.asarray(da.decode_attention(q, k, v, mask, 40)), want)
    got = da.decode_attention(q, k, v, mask, 40, impl="pallas")  # the interpreter, on this CPU
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=2e-6)
    # As the model asks (fallback), shapes the kernel cannot take fall back to the reference ...
    q80, k80, v80, m80 = _case(1, 2, 2, 128, 80, 40, left_pad=[0])
    np.testing.assert_array_equal(
        np.asarray(da.decode_attention(q80, k80, v80, m80, 40, impl="pallas", fallback=True)),
        np.asarray(da.reference(q80, k80, v80, m80)),
    )
    # ... asked for by name they are an error naming the shape.
    with pytest.raises(ValueError, match=r"128 slots, head dim 80"):
        da.decode_attention(q80, k80, v80, m80, 40, impl="pallas")
    with pytest.raises(ValueError, match="impl='flash'"):
        da.decode_attention(q, k, v, mask, 40, impl="flash")
    with pytest.raises(ConfigError, match="attention_impl='triton'"):
        ModelConfig(**_SIZES, attention_impl="triton")


def test_floe_kernels_is_read_by_the_command_line(monkeypatch):
    """`FLOE_KERNELS` sets the attention of the model configs a command builds; a bad value is
    an error naming the variable."""
    from experiments.cli import KERNELS_ENV, attention_impl_from_env, with_attention_impl

    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert attention_impl_from_env() == "reference"
    monkeypatch.setenv(KERNELS_ENV, "pallas")
    assert attention_impl_from_env() == "pallas"
    monkeypatch.setenv(KERNELS_ENV, "triton")
    with pytest.raises(ConfigError, match="FLOE_KERNELS='triton'"):
        attention_impl_from_env()

    @dataclasses.dataclass(frozen=True)
    class Preset:
        edge: ModelConfig
        steps: int = 3

    got = with_attention_impl(Preset(edge=ModelConfig(**_SIZES)), "pallas")
    assert got.edge.attention_impl == "pallas" and got.steps == 3


def test_model_decode_with_the_kernel_equals_reference(kernel_cfg, kernel_params):
    """Prefill a left-padded batch, then decode steps: the same logits through either impl
    (`ModelConfig.attention_impl`)."""
    params = kernel_params
    tokens, mask = pad_prompts([[5, 9, 11, 2, 7], [3, 4]])
    nxt = jnp.asarray([[8], [1]], jnp.int32)

    def run(impl):
        cfg = dataclasses.replace(kernel_cfg, attention_impl=impl)
        cache = init_cache(cfg, batch=2, max_len=32)
        _, cache = forward(params, tokens, cfg, mask=mask, cache=cache)
        out = []
        for _ in range(3):
            logits, cache = forward(params, nxt, cfg, cache=cache)
            out.append(np.asarray(logits))
        return np.stack(out)

    np.testing.assert_allclose(run("pallas"), run("reference"), atol=1e-5, rtol=1e-5)


def test_transformers_does_not_take_kernels_for_the_hub_package():
    """`kernels` is also the name of Hugging Face's kernel-hub package, which transformers
    imports when it finds one of a supported version; it must not mistake this one for it."""
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()


def test_bench_kernels_quick_runs_and_agrees():
    from experiments.benchmarks import kernels as bench

    rows = bench.run(quick=True)
    assert {r["heads"] for r in rows} == set(bench.HEADS)
    assert all(r["max abs diff"] < 1e-5 and r["mode"] == "interpreter (CPU)" for r in rows)


def test_pallas_on_a_ring_buffer_equals_reference():
    """A sliding layer's ring of W slots: before it wraps the kernel reads the n filled slots,
    after it all W; the query scale is the caller's (Gemma's `query_pre_attn_scalar`)."""
    W, K = 32, 16
    for n_filled in (5, 77):
        q, k, v, mask = _case(2, 2, 3, W, K, min(n_filled, W), left_pad=[0, 2])
        want = da.reference(q, k, v, mask, scale=0.2)
        got = da.pallas(q, k, v, mask, n_filled, block=16, interpret=True, scale=0.2, window=W)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-6)
    poisoned = k.at[:, 16:].set(jnp.nan)  # before the ring fills, unfilled blocks stay unread
    q, k, v, mask = _case(2, 2, 3, W, K, 5, left_pad=[0, 2])
    got = da.pallas(q, poisoned, v, mask, 5, block=16, interpret=True, window=W)
    assert np.isfinite(np.asarray(got)).all()


def test_model_decode_with_the_kernel_on_sliding_layers_equals_reference(kernel_cfg):
    """A sliding layer (a ring of 16 slots), decoded past its window through either impl: the
    same logits (full layers: `test_model_decode_with_the_kernel_equals_reference`)."""
    from tests import _hf_utils as U

    cfg = dataclasses.replace(
        kernel_cfg, num_layers=1, sliding_window=16, qk_norm=True, query_pre_attn_scalar=24.0,
    )  # fmt: skip
    params = U.random_params(cfg, seed=2)
    tokens, mask = pad_prompts([[5, 9, 11, 2, 7, 1, 4, 8, 3, 2, 6, 9, 1, 5], [3, 4]])

    fwd = jax.jit(forward, static_argnames="cfg")

    def run(impl):
        c = dataclasses.replace(cfg, attention_impl=impl)
        cache = init_cache(c, batch=2, max_len=32)
        assert [b.shape[1] for b in cache.k] == [16]
        _, cache = fwd(params, tokens, c, mask=mask, cache=cache)
        out = []
        for t in range(3):
            logits, cache = fwd(params, jnp.asarray([[t + 1], [t + 2]]), c, cache=cache)
            out.append(np.asarray(logits))
        return np.stack(out)

    np.testing.assert_allclose(run("pallas"), run("reference"), atol=1e-5, rtol=1e-5)
