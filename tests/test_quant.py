"""Weight-only quantized bases (`floe_jax.quant`): codes against hand-computed values, the
quantized forward against its dequantize-then-float reference in every family, cached decode
against the forward, QLoRA training over a quantized frozen base, merge, footprint."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax import qmatmul, quant
from floe_jax.config import ConfigError, LoRAConfig, ModelConfig
from floe_jax.federated.client import local_update, local_update_clients, make_optimizer
from floe_jax.lora import init_lora, merge_lora, stack_loras
from floe_jax.loss import token_loss
from floe_jax.model import forward as _forward
from floe_jax.model import init_cache, init_params, stack_layers, unstack_layers

forward = jax.jit(_forward, static_argnames=("cfg", "last_only"))
QCFGS = {
    "bf16": quant.QuantConfig(format="bf16"),
    "int8": quant.QuantConfig(format="int8"),
    "int8-g32": quant.QuantConfig(format="int8", group_size=32),
    "int4": quant.QuantConfig(format="int4", group_size=32),
    "nf4": quant.QuantConfig(format="nf4", group_size=32),
}
BASE = ModelConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2,
)  # fmt: skip
FAMILIES = {
    "llama": BASE,
    "qwen2-tied-bias": dataclasses.replace(
        BASE, model_type="qwen2", qkv_bias=True, tie_word_embeddings=True
    ),
    "mistral-window4": dataclasses.replace(BASE, model_type="mistral", sliding_window=4),
    "gemma3": dataclasses.replace(
        BASE,
        model_type="gemma3_text",
        num_layers=3,
        qk_norm=True,
        norm_unit_offset=True,
        sandwich_norms=True,
        scale_embeddings=True,
        query_pre_attn_scalar=16.0,
        hidden_act="gelu_pytorch_tanh",
        sliding_window=4,
        rope_local_theta=1e4,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        tie_word_embeddings=True,
    ),  # fmt: skip
    "smollm3-nope": dataclasses.replace(
        BASE, model_type="smollm3", nope_layers=(1,), tie_word_embeddings=True
    ),
}


def _params(cfg, seed=0):
    return init_params(cfg, key=jax.random.key(seed))


def _tokens(b, t, seed=0):
    return np.random.default_rng(seed).integers(0, BASE.vocab_size, (b, t)).astype(np.int32)


def test_codes_match_hand_computed_values():
    w = np.array([[0.3, -1.0, 0.25, 0.0], [2.0, 1.0, -0.5, 0.125]], np.float32)  # [N=2, K=4]
    q8 = quant.quantize_matrix(w, "int8", None, transposed=False)
    np.testing.assert_array_equal(q8.q, [[38, -127, 32, 0], [127, 64, -32, 8]])
    np.testing.assert_allclose(q8.scale[:, 0], [1 / 127, 2 / 127])
    q4 = quant.quantize_matrix(w, "int4", 2, transposed=False)
    # groups (0.3, -1) -> scale 1/7, codes (2, -7) + 8; (0.25, 0) -> 0.25/7, (7, 0) + 8
    np.testing.assert_array_equal(q4.q[0], [10 | (1 << 4), 15 | (8 << 4)])
    np.testing.assert_allclose(q4.scale[0], [1 / 7, 0.25 / 7], rtol=1e-6)
    nf = quant.quantize_matrix(w, "nf4", 4, transposed=False)
    nf4 = quant.NF4_CODES
    np.testing.assert_allclose(nf.dequantize()[0], [nf4[11], -1.0, nf4[10], 0.0], rtol=1e-6)
    assert q8.shape == q4.shape == nf.shape == (2, 4)
    assert quant.quantize_matrix(w, "int4", 2, transposed=True).shape == (2, 4)


@pytest.mark.parametrize("name", sorted(QCFGS))
def test_quantization_error_is_bounded(name):
    w = jax.random.normal(jax.random.key(1), (128, 64)) * 0.02
    qt = quant.quantize_matrix(w, QCFGS[name].format, QCFGS[name].groups, transposed=True)
    assert qt.shape == w.shape
    err = float(jnp.abs(qt.dequantize() - w).max() / jnp.abs(w).max())
    # half a code step of the group's absmax: 2^-8 (bf16), 0.5 / 127, 0.5 / 7, and NF4's widest
    # gap (0.7230 to 1.0) halved
    assert err < {"bf16": 4e-3, "int8": 4e-3, "int8-g32": 4e-3, "int4": 0.072, "nf4": 0.139}[name]


@pytest.mark.parametrize("name", sorted(QCFGS))
def test_forward_equals_dequantized_reference(name):
    cfg, params = BASE, _params(BASE)
    qp = quant.quantize(params, cfg, QCFGS[name])
    ref = quant.dequantize_params(qp)
    assert all(not quant.is_quantized(x) for x in jax.tree.leaves(ref, is_leaf=quant.is_quantized))
    for toks in (_tokens(3, 13), _tokens(1, 5)):  # a dot (39 rows); 5 rows: the CPU kernel
        # where it builds, else a multiply-reduce (test_cpu_kernels checks both against this)
        chex.assert_trees_all_close(forward(qp, toks, cfg), forward(ref, toks, cfg), atol=2e-6)


@pytest.mark.parametrize(
    ("family", "name"), [(f, "int4") for f in sorted(FAMILIES)] + [("llama", "int8")]
)
def test_cached_decode_equals_forward(family, name):
    cfg = FAMILIES[family]
    qp = quant.quantize(_params(cfg, 3), cfg, QCFGS[name])
    toks = _tokens(2, 10, seed=4)
    full = forward(qp, toks, cfg)
    dec = unstack_layers(qp)  # the decode layout: fused quantized projections
    logits, cache = forward(dec, toks[:, :6], cfg, cache=init_cache(cfg, 2, 10))
    steps = [logits]
    for t in range(6, 10):
        logits, cache = forward(dec, toks[:, t : t + 1], cfg, cache=cache)
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_decode_layout_round_trips():
    qp = quant.quantize(_params(BASE), BASE, QCFGS["int4"])
    back = stack_layers(unstack_layers(qp), BASE)
    chex.assert_trees_all_equal(back, qp)


def _batches(cfg, s, b, t, seed):
    toks = np.random.default_rng(seed).integers(0, 8, (s, b, t)).astype(np.int32)  # learnable
    ones = np.ones_like(toks, np.float32)
    return {"tokens": toks, "mask": ones, "loss_mask": ones}


def test_qlora_local_update_reduces_loss_and_touches_no_base():
    cfg = BASE
    qp = quant.quantize(_params(cfg), cfg, QCFGS["nf4"])
    lora = init_lora(cfg, LoRAConfig(rank=4, alpha=8), key=jax.random.key(2))
    opt = make_optimizer("adamw", lr=1e-2)
    step = jax.jit(lambda p, lo, b: local_update(p, lo, b, cfg=cfg, opt=opt))
    batches = _batches(cfg, 6, 2, 12, seed=5)
    lora1, m1 = step(qp, lora, batches)
    _, m2 = step(qp, lora1, batches)
    assert float(m2["loss_sum"] / m2["tokens"]) < float(m1["loss_sum"] / m1["tokens"])
    assert float(jnp.abs(lora1.b["q_proj"]).max()) > 0


def test_qlora_vmapped_clients_equal_a_loop():
    cfg = BASE
    qp = quant.quantize(_params(cfg), cfg, QCFGS["int8"])
    loras = stack_loras(
        [init_lora(cfg, LoRAConfig(rank=2, alpha=4), key=jax.random.key(i)) for i in range(2)]
    )
    opt = make_optimizer("sgd", lr=0.1)
    b = [_batches(cfg, 1, 2, 8, seed=i) for i in range(2)]
    batches = jax.tree.map(lambda *x: np.stack(x), *b)
    keys = jax.random.split(jax.random.key(0), 2)
    run = jax.jit(lambda *a, chunk: local_update_clients(*a, cfg=cfg, opt=opt, keys=keys,
                                                          client_chunk=chunk),
                  static_argnames="chunk")  # fmt: skip
    vm, m_vm = run(qp, loras, batches, chunk=0)
    lp, m_lp = run(qp, loras, batches, chunk=1)
    chex.assert_trees_all_close(vm, lp, atol=1e-6)
    chex.assert_trees_all_close(m_vm, m_lp, rtol=1e-6)


def test_merge_over_quantized_base_equals_unmerged():
    cfg = BASE
    qp = quant.quantize(_params(cfg), cfg, QCFGS["int4"])
    lora = init_lora(cfg, LoRAConfig(rank=4, alpha=8), key=jax.random.key(2))
    lora = dataclasses.replace(lora, b=jax.tree.map(lambda x: x + 0.05, lora.b))
    lora = dataclasses.replace(lora, b={m: v * lora.mask[m][..., None] for m, v in lora.b.items()})
    merged = merge_lora(qp, lora)
    toks = _tokens(2, 7)
    chex.assert_trees_all_close(
        forward(merged, toks, cfg), forward(qp, toks, cfg, lora=lora), atol=1e-5
    )


def test_footprint():
    cfg = dataclasses.replace(BASE, vocab_size=256)
    params = _params(cfg)
    f32 = quant.param_bytes(params)
    got = {n: quant.param_bytes(quant.quantize(params, cfg, q)) for n, q in QCFGS.items()}
    assert got["bf16"] < 0.51 * f32 and got["int8"] < 0.27 * f32 and got["int4"] < 0.16 * f32
    assert quant.weight_bytes_per_param("int4", 32) == 0.5 + 4 / 32
    assert quant.weight_bytes_per_param("int8") == 1.0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="format"):
        quant.QuantConfig(format="int3")
    with pytest.raises(ConfigError, match="group_size"):
        quant.QuantConfig(format="int4", group_size=0)
    with pytest.raises(ValueError, match="group_size=48"):
        quant.quantize(_params(BASE), BASE, quant.QuantConfig(format="int4", group_size=48))
    qp = quant.quantize(_params(BASE), BASE, QCFGS["int8"])
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize(qp, BASE, QCFGS["int8"])


def test_chunked_vocabulary_matmul_equals_whole(monkeypatch):
    cfg = dataclasses.replace(BASE, tie_word_embeddings=True)
    qp = quant.quantize(_params(cfg), cfg, QCFGS["int8-g32"])
    lora = init_lora(cfg, LoRAConfig(rank=2, alpha=4), key=jax.random.key(2))
    lora = dataclasses.replace(lora, b=jax.tree.map(lambda x: x + 0.01, lora.b))
    toks = _tokens(3, 12)  # 36 rows: past qmatmul.KERNEL_ROWS, the dequantizing (chunked) path
    ones = np.ones(toks.shape, np.float32)

    def loss(lo):
        s, n = token_loss(qp, lo, toks, ones, ones, cfg=cfg)
        return s / n

    whole = jax.jit(jax.value_and_grad(loss))(lora)  # CHUNK_BYTES is read when traced
    monkeypatch.setattr(qmatmul, "CHUNK_BYTES", 16 * cfg.hidden_size * 4)  # 6 chunks of 16 rows
    chunked = jax.jit(jax.value_and_grad(loss))(lora)
    chex.assert_trees_all_close(chunked, whole, atol=1e-6)


def test_qlora_step_decodes_no_float_copy_of_the_base():
    """A quantized base's local update (QLoRA) keeps no float copy of the base, and so needs
    less memory than a float32 base's: XLA:CPU upcast a bfloat16 base whole when it was sliced,
    and loop-invariant code motion kept decoded weights across the local steps."""
    from floe_jax.federated.client import client_memory_bytes

    cfg = dataclasses.replace(BASE, vocab_size=1024, hidden_size=128, intermediate_size=256)
    base = jax.eval_shape(lambda: _params(cfg))
    lora = jax.eval_shape(
        lambda: init_lora(cfg, LoRAConfig(rank=2, alpha=4), key=jax.random.key(0))
    )
    # 40 rows: above qmatmul.KERNEL_ROWS, the dequantizing matmuls of a training batch (decode's
    # few rows take the CPU kernel or a multiply-reduce, not what this test is about)
    spec = lambda dt: jax.ShapeDtypeStruct((3, 1, 40), dt)  # noqa: E731
    batches = {"tokens": spec(jnp.int32), "mask": spec(jnp.float32), "loss_mask": spec(jnp.float32)}
    opt = make_optimizer("sgd", lr=0.1)
    mem = lambda p: client_memory_bytes(p, lora, batches, cfg=cfg, opt=opt)  # noqa: E731
    f32 = mem(base)
    weights = quant.param_bytes(base)  # a float32 copy of the base, for scale
    for name in ("bf16", "int8"):
        q = jax.eval_shape(lambda b, n=name: quant.quantize(b, cfg, QCFGS[n]), base)
        got = mem(q)
        # Matrices are decoded one at a time inside the step, never the whole base at once
        # (before: bf16 +1.5 and int8 +1.0 float copies of the base; now +0.34).
        assert got["temporaries"] <= f32["temporaries"] + weights // 2, (name, got, f32)
        assert got["total"] < f32["total"], (name, got, f32)


def test_bench_decode_real_scale_rows_on_a_tiny_model():
    """`bench decode`'s real-scale rows (`_decode_scale.run`) through the same code on a tiny
    config of the family: every format is decoded beside transformers (float32 here, whose
    greedy tokens equal floe_jax float32's), bytes and bound are those of the format, and the
    probe's bandwidth row closes the batch."""
    from experiments.benchmarks import _decode_scale as bench

    rows = bench.run(cfg=bench.small_config(), batches=(1,), new=4, repeats=1, hf_bf16=False,
                     xla_formats=("int8",), int8_act_formats=())  # fmt: skip
    by = {r["side"]: r for r in rows}
    fmts = [f"floe_jax {f}" for f in bench.FORMATS]
    assert set(fmts + ["floe_jax int8 (XLA m-r)", "transformers float32"]) <= set(by)
    assert by["transformers float32"]["greedy = floe_jax f32"] == 1.0
    assert by["transformers float32"]["matvec"] == "torch (cpu)"
    assert by["floe_jax int8 (XLA m-r)"]["matvec"].startswith("XLA multiply-reduce")
    mb = [by[s]["weights MB"] for s in fmts]
    assert mb == sorted(mb, reverse=True) and mb[1] == pytest.approx(mb[0] / 2, rel=0.01)
    for s in fmts:
        gbs = by["read bandwidth (GB/s)"]["ms/token-step"]
        assert by[s]["bound ms"] == pytest.approx(by[s]["weights MB"] / gbs, rel=1e-6)  # MB/(GB/s)
        assert by[s]["ms/token-step"] > 0
        # The 1-token call (prefill and token 0) timed in the same loop; the steps after it.
        r = by[s]
        assert r["prefill ms"] > 0
        if r["prefill ms"] < 4 * r["ms/token-step"]:  # else noise: NaN (a tiny model's steps)
            assert r["step ms"] == pytest.approx((4 * r["ms/token-step"] - r["prefill ms"]) / 3)
            assert r["step % of bound"] == pytest.approx(100 * r["bound ms"] / r["step ms"])
        else:
            assert np.isnan(r["step ms"]) and np.isnan(r["step % of bound"])
    with pytest.raises(ValueError, match="new=1"):
        bench.run(cfg=bench.small_config(), batches=(1,), new=1)
