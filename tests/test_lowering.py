"""The compiled programs GPU and TPU research runs use lower for those platforms, from this CPU.

No accelerator is needed to lower a jitted function for one (`lowering_platforms`); compiling
and running it does need one, so these tests catch what lowering catches (ops or custom calls a
platform lacks, CPU-only host callbacks, Pallas kernels the Triton lowering rejects), not what
only the device shows. While tracing, `jax.default_backend()` answers the target platform, so
every backend-dependent choice takes its accelerator branch (`jnp.linalg.eigh` instead of the
CPU's LAPACK callback, every client vmapped at once, the Triton kernel instead of the
interpreter), as it would on the device.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax import sharding
from floe_jax.config import LoRAConfig, RopeScaling
from floe_jax.decode import SamplingConfig, generate, pad_prompts, prefill_jit
from floe_jax.federated import (
    AggregationConfig,
    FedConfig,
    client_data,
    init_server_state,
    round_step,
)
from floe_jax.federated import aggregate as agg
from floe_jax.federated.aggregate import available_rules
from floe_jax.federated.client import local_update_clients
from floe_jax.federated.client import make_optimizer as client_optimizer
from floe_jax.inference.replies import CloudInput
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.step import fused_step_jit
from floe_jax.lora import init_lora, stack_loras
from floe_jax.model import init_params
from floe_jax.pretrain import PretrainConfig, make_optimizer, train_step
from floe_jax.quant import QuantConfig, quantize

PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}  # lowering platform: what default_backend() says
# Rules that fold updates into the shared base weights run with one cluster.
ONE_CLUSTER = ("fedex", "flora")


def _lowered_text(monkeypatch, platform, fn, *args, **kwargs) -> str:
    """`fn` traced as on `platform` and lowered for it (raises where it cannot be)."""
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: PLATFORMS[platform])
        traced = fn.trace(*args, **kwargs)
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("rule", available_rules())
def test_federated_round_lowers(monkeypatch, kernel_cfg, kernel_params, platform, rule):
    rng = np.random.default_rng(0)
    ex = [
        (
            rng.integers(0, kernel_cfg.vocab_size, (3, 12)).astype(np.int32),
            np.ones((3, 12)),
            np.ones((3, 12)),
        )
        for _ in range(4)
    ]
    data = client_data(ex)
    fed = FedConfig(
        num_rounds=1,
        clients_per_round=4,
        local_steps=2,
        batch_size=2,
        seq_len=12,
        lora=LoRAConfig(rank=8, targets=("q", "v", "down")),
        agg=AggregationConfig(method=rule),
    )
    clusters = [0, 0, 0, 0] if rule in ONE_CLUSTER else [0, 1, 0, 1]
    state = init_server_state(
        kernel_cfg, fed, ranks=[2, 4, 8, 2], assignment=clusters, num_clusters=max(clusters) + 1
    )
    fn = jax.jit(lambda s, p, d: round_step(s, p, d, cfg=kernel_cfg, fed=fed))
    assert "func.func public @main" in _lowered_text(
        monkeypatch, platform, fn, state, kernel_params, data
    )


AGGREGATE_PROGRAMS = [(rule, ()) for rule in available_rules()] + [
    ("flexlora", (("total_rank", 16),)),  # live slots gathered first
    ("flexlora", (("path", "dense"),)),
]


def _aggregate_args(kernel_cfg, method, options, *, max_norm):
    """`aggregate_jit`'s positional arguments for 4 clients of ranks 2-8 on q, v and down."""
    ranks = np.array([2, 4, 8, 2], np.int32)
    lora_cfg = LoRAConfig(rank=8, max_rank=8, targets=("q", "v", "down"))
    loras = [
        init_lora(kernel_cfg, dataclasses.replace(lora_cfg, rank=int(r)), key=jax.random.key(k))
        for k, r in enumerate(ranks)
    ]
    stacked = stack_loras(loras)
    w, r = agg.validate(stacked, np.ones(4), ranks, total_rank=dict(options).get("total_rank"))
    first = jax.tree.map(lambda x: x[0], stacked)
    states = agg.init_states(
        agg.make_rule(method, **dict(options)), first, 1, key=jax.random.key(0)
    )
    labels = np.zeros(4, np.int32)
    return (method, options, max_norm, 1, states, stacked, w, r, labels, jax.random.key(0))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(("method", "options"), AGGREGATE_PROGRAMS)
def test_aggregate_program_lowers(monkeypatch, kernel_cfg, platform, method, options):
    """`aggregate_jit`, the program `bench aggregate` times, lowers for the accelerator with no
    host callback left in it (on CPU its eigenproblems go to LAPACK on the host)."""
    args = _aggregate_args(kernel_cfg, method, options, max_norm=None)
    text = _lowered_text(monkeypatch, platform, agg.aggregate_jit, *args)
    assert "func.func public @main" in text
    assert "callback" not in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_generate_with_lora_lowers(monkeypatch, kernel_cfg, kernel_params, platform):
    lora = init_lora(kernel_cfg, LoRAConfig(rank=4, max_rank=8), key=jax.random.key(1))
    tokens, mask = pad_prompts([[5, 9, 11], [3]])
    text = _lowered_text(
        monkeypatch, platform, generate, kernel_params, tokens, mask, kernel_cfg,
        max_new_tokens=12, key=jax.random.key(0), lora=lora,
        sampling=SamplingConfig(temperature=0.8, top_p=0.9),
    )  # fmt: skip
    assert "func.func public @main" in text


def test_generate_with_the_decode_kernel_lowers_for_a_gpu(monkeypatch, kernel_cfg, kernel_params):
    cfg = dataclasses.replace(kernel_cfg, attention_impl="pallas")
    tokens, mask = pad_prompts([[5, 9, 11], [3]])
    new = 32 - tokens.shape[1]  # a cache of 32 slots: shapes the kernel takes
    text = _lowered_text(
        monkeypatch, "cuda", generate, kernel_params, tokens, mask, cfg,
        max_new_tokens=new, key=jax.random.key(0),
    )  # fmt: skip
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_fused_decode_step_lowers(monkeypatch, kernel_cfg, kernel_params, platform):
    B = 2
    tokens, mask = pad_prompts([[5, 9, 11], [3]])
    key = jax.random.key(0)
    state, _ = prefill_jit(
        kernel_params, tokens, mask, kernel_cfg, max_new_tokens=8, key=key, done=jnp.zeros(B, bool)
    )
    lp = jax.nn.log_softmax(jax.random.normal(key, (B, kernel_cfg.vocab_size)))
    z = np.zeros((B, 0))
    cloud = CloudInput(
        jnp.ones(B, bool), lp, jnp.zeros((0,), jnp.int32), z.astype(np.int32),
        z.astype(np.float32), z.astype(bool),
    )  # fmt: skip
    text = _lowered_text(
        monkeypatch,
        platform,
        fused_step_jit,
        kernel_params,
        state,
        cloud,
        kernel_cfg,
        fusion=FusionConfig(),
    )
    assert "func.func public @main" in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_pretrain_step_lowers(monkeypatch, kernel_cfg, kernel_params, platform):
    opt = make_optimizer(PretrainConfig())
    tokens = jnp.zeros((2, 16), jnp.int32)
    text = _lowered_text(
        monkeypatch, platform, train_step, kernel_params, opt.init(kernel_params), tokens,
        jnp.ones((2, 16), jnp.float32), cfg=kernel_cfg, opt=opt,
    )  # fmt: skip
    assert "func.func public @main" in text


def _family_cfg(kernel_cfg, impl="reference"):
    """The kernel-sized model as a Gemma 3-style family: interleaved sliding (ring-buffer) and
    full layers, qk-norm, sandwich norms, GeGLU, scaled embeddings, a NoPE layer."""
    return dataclasses.replace(
        kernel_cfg, model_type="gemma3_text", num_layers=3, qk_norm=True, norm_unit_offset=True,
        sandwich_norms=True, scale_embeddings=True, query_pre_attn_scalar=24.0,
        hidden_act="gelu_pytorch_tanh", sliding_window=16, rope_local_theta=1e4,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"), nope_layers=(2,),
        attention_impl=impl,
    )  # fmt: skip


@pytest.mark.parametrize("platform", PLATFORMS)
def test_generate_with_sliding_layers_lowers(monkeypatch, kernel_cfg, platform):
    cfg = _family_cfg(kernel_cfg, "pallas" if platform == "cuda" else "reference")
    params = jax.eval_shape(lambda: init_params(cfg, key=jax.random.key(0)))
    lora = init_lora(cfg, LoRAConfig(rank=4, max_rank=8), key=jax.random.key(1))
    tokens, mask = pad_prompts([[5, 9, 11], [3]])
    text = _lowered_text(
        monkeypatch, platform, generate, params, tokens, mask, cfg,
        max_new_tokens=32 - tokens.shape[1], key=jax.random.key(0), lora=lora,
    )  # fmt: skip
    assert "func.func public @main" in text
    if platform == "cuda":  # the ring (16 slots) and the full cache (32) both take the kernel
        assert text.count("__gpu$xla.gpu.triton") >= 2


@pytest.mark.parametrize("platform", PLATFORMS)
def test_generate_with_phi4_mini_rope_lowers(monkeypatch, kernel_cfg, platform):
    """Partial rotary and longrope: the decode step holds the cache's recomputation (a
    `lax.cond` over a prefill of every slot) for when the text passes the switch."""
    cfg = dataclasses.replace(
        kernel_cfg, model_type="phi3", partial_rotary_factor=0.75, sliding_window=16,
        rope_scaling=RopeScaling(
            rope_type="longrope", factor=8.0, original_max_position_embeddings=8,
            short_factor=(1.0,) * 6, long_factor=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
        ),
        attention_impl="pallas" if platform == "cuda" else "reference",
    )  # fmt: skip
    params = jax.eval_shape(lambda: init_params(cfg, key=jax.random.key(0)))
    tokens, mask = pad_prompts([[5, 9, 11], [3]])
    text = _lowered_text(
        monkeypatch, platform, generate, params, tokens, mask, cfg,
        max_new_tokens=32 - tokens.shape[1], key=jax.random.key(0),
    )  # fmt: skip
    assert "func.func public @main" in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_with_sliding_layers_lowers(monkeypatch, kernel_cfg, platform):
    cfg = _family_cfg(kernel_cfg)
    params = jax.eval_shape(lambda: init_params(cfg, key=jax.random.key(0)))
    opt = make_optimizer(PretrainConfig())
    tokens = jnp.zeros((2, 24), jnp.int32)
    text = _lowered_text(
        monkeypatch, platform, train_step, params, jax.eval_shape(opt.init, params), tokens,
        jnp.ones((2, 24), jnp.float32), cfg=cfg, opt=opt,
    )  # fmt: skip
    assert "func.func public @main" in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_generate_over_a_quantized_base_lowers(monkeypatch, kernel_cfg, kernel_params, platform):
    qp = quantize(kernel_params, kernel_cfg, QuantConfig(format="int4", group_size=32))
    lora = init_lora(kernel_cfg, LoRAConfig(rank=4, max_rank=8), key=jax.random.key(1))
    tokens, mask = pad_prompts([[5, 9, 11], [3]])
    text = _lowered_text(
        monkeypatch, platform, generate, qp, tokens, mask, kernel_cfg, max_new_tokens=4,
        key=jax.random.key(0), lora=lora,
    )  # fmt: skip
    assert "func.func public @main" in text
    assert "floe_qmatvec" not in text  # the CPU kernel stays out of an accelerator's program


@pytest.mark.parametrize("platform", PLATFORMS)
def test_qlora_clients_lower(monkeypatch, kernel_cfg, kernel_params, platform):
    qp = quantize(kernel_params, kernel_cfg, QuantConfig(format="nf4", group_size=32))
    loras = stack_loras(
        [init_lora(kernel_cfg, LoRAConfig(rank=2), key=jax.random.key(i)) for i in range(2)]
    )
    toks = np.zeros((2, 2, 2, 12), np.int32)
    batches = {"tokens": toks, "mask": np.ones(toks.shape), "loss_mask": np.ones(toks.shape)}
    opt = client_optimizer("adamw", lr=1e-3)
    fn = jax.jit(
        lambda p, lo, b, k: local_update_clients(p, lo, b, cfg=kernel_cfg, opt=opt, keys=k)
    )
    keys = jax.random.split(jax.random.key(0), 2)
    text = _lowered_text(monkeypatch, platform, fn, qp, loras, batches, keys)
    assert "func.func public @main" in text


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("spec", ["clients=8", "clients=4,fsdp=2"])
def test_sharded_federated_round_lowers(monkeypatch, kernel_cfg, kernel_params, platform, spec):
    """The round over a mesh of 8 devices of the platform (`floe_jax.sharding`), lowered from
    this one-CPU host through an abstract mesh."""
    rng = np.random.default_rng(0)
    ex = [
        (rng.integers(0, kernel_cfg.vocab_size, (3, 12)).astype(np.int32), np.ones((3, 12)),
         np.ones((3, 12)))
        for _ in range(8)
    ]  # fmt: skip
    fed = FedConfig(
        num_rounds=1, clients_per_round=8, local_steps=2, batch_size=2, seq_len=12,
        lora=LoRAConfig(rank=4, targets=("q", "v", "down")), client_chunk=1,
    )  # fmt: skip
    state = init_server_state(kernel_cfg, fed, ranks=[1, 2, 3, 4] * 2)
    mesh = sharding.abstract_mesh(spec)
    args = sharding.round_input_shapes(mesh, state, kernel_params, client_data(ex))[:3]
    fn = jax.jit(lambda s, p, d: round_step(s, p, d, cfg=kernel_cfg, fed=fed))
    with jax.sharding.use_abstract_mesh(mesh):
        text = _lowered_text(monkeypatch, platform, fn, *args)
    assert "mhlo.num_partitions = 8" in text
    assert "sharding_constraint" in text  # the sampled clients' per-device blocks
    for axis in mesh.axis_names:  # the data, the clients' blocks and the base carry the axes
        assert f'"{axis}"' in text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_tensor_parallel_cloud_generate_lowers(monkeypatch, kernel_cfg, kernel_params, platform):
    mesh = sharding.abstract_mesh("model=2")
    params = sharding.shaped(kernel_params, sharding.cloud_sharding(mesh, kernel_params))
    tokens, mask = pad_prompts([[5, 9, 11], [3]])
    with jax.sharding.use_abstract_mesh(mesh):
        text = _lowered_text(
            monkeypatch, platform, generate, params, tokens, mask, kernel_cfg,
            max_new_tokens=4, key=jax.random.key(0),
        )  # fmt: skip
    assert "mhlo.num_partitions = 2" in text and '"model"' in text


@pytest.mark.parametrize("method", ["flexlora", "flora", "fedex"])
def test_aggregation_matmuls_run_at_full_float32_precision_on_a_gpu(
    monkeypatch, kernel_cfg, method
):
    """A rule's products and Gram matrices, and the screening's norms, lower with HIGHEST
    precision (`screen_aggregate`, `aggregate_clusters`):
    at a GPU's default (TF32 inputs) FlexLoRA's SVD was 1.4e-3 off NumPy's on an H200."""
    # max_norm: the screening's Gram norms too (`screen_aggregate`)
    args = _aggregate_args(kernel_cfg, method, (), max_norm=1e3)
    with jax.default_matmul_precision("default"):  # a user's setting, not the suite's highest
        text = _lowered_text(monkeypatch, "cuda", agg.aggregate_jit, *args)
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots, "no matmul in the program"
    low = [line for line in dots if "precision = [HIGHEST, HIGHEST]" not in line]
    assert not low, low[0]
