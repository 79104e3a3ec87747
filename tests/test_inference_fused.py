"""Fused decoding: consistency with edge-only and cloud-only decoding, per-row adapters, the
single-program step, sparse against dense, and the deadline under a simulated clock."""

import dataclasses

import jax
import numpy as np
import pytest

from floe_jax.config import LoRAConfig
from floe_jax.decode import SamplingConfig, generate, pad_prompts
from floe_jax.inference.cloud import LocalCloud
from floe_jax.inference.deadline import SimClock
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.router import FusionConfig
from floe_jax.lora import init_lora, stack_loras
from floe_jax.model import forward, init_params

N = 5
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], [40, 41, 42]]
EDGE_ONLY = FusionConfig(gate="fixed", fixed_w=1.0)
CLOUD_ONLY = FusionConfig(gate="fixed", fixed_w=0.0)


@pytest.fixture(scope="module")
def cloud_params(tiny_cfg):
    return init_params(tiny_cfg, key=jax.random.key(7))


def _allow(backend):
    return GuardedCloud(backend, PrivacyDetector(PrivacyPolicy(action="allow")))


GREEDY = SamplingConfig()


def _ref(params, cfg, prompts=PROMPTS, lora=None, sampling=GREEDY, key=0):
    toks, mask = pad_prompts(prompts)
    out, _ = generate(params, toks, mask, cfg, max_new_tokens=N, key=jax.random.key(key),
                      lora=lora, sampling=sampling)  # fmt: skip
    return np.asarray(out).tolist()


def _random_lora(cfg, seed, rank):
    lora = init_lora(
        cfg, LoRAConfig(rank=rank, max_rank=4, targets=("q", "v")), key=jax.random.key(seed)
    )
    b = {m: 0.5 * jax.random.normal(jax.random.key(seed + 100), v.shape) for m, v in lora.b.items()}
    return dataclasses.replace(lora, b=b)


def test_weight_one_equals_edge_only_decoding(tiny_cfg, tiny_params, cloud_params):
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=_allow(LocalCloud(cloud_params,
                         tiny_cfg)), clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=N, fusion=EDGE_ONLY,
                                                  deadline_s=1e9))  # fmt: skip
    assert res.tokens == _ref(tiny_params, tiny_cfg)
    assert res.share_fused == 1.0 and np.all(res.w == 1.0)


def test_weight_one_with_sampling_equals_edge_sampling(tiny_cfg, tiny_params, cloud_params):
    s = SamplingConfig(temperature=0.8, top_p=0.9)
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=_allow(LocalCloud(cloud_params,
                         tiny_cfg)), key=jax.random.key(3), clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=N, fusion=EDGE_ONLY, sampling=s,
                                                  deadline_s=1e9))  # fmt: skip
    assert res.tokens == _ref(tiny_params, tiny_cfg, sampling=s, key=3)


@pytest.mark.parametrize("overlap", [True, False])
def test_weight_zero_equals_cloud_greedy(tiny_cfg, tiny_params, cloud_params, overlap):
    cloud = LocalCloud(cloud_params, tiny_cfg)
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=_allow(cloud), clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=N, fusion=CLOUD_ONLY,
                                                  deadline_s=1e9, overlap=overlap))  # fmt: skip
    assert res.tokens == _ref(cloud_params, tiny_cfg)
    assert res.share_fused == 1.0
    assert cloud.stats["prefills"] == len(PROMPTS)  # then one cached extend per token
    assert cloud.stats["extends"] == len(PROMPTS) * (N - 1)


def test_sparse_full_vocab_equals_dense(tiny_cfg, tiny_params, cloud_params):
    fusion = FusionConfig(gate="entropy")
    config = FusedDecodeConfig(max_new_tokens=N, fusion=fusion, deadline_s=1e9)
    dense = generate_fused(tiny_params, tiny_cfg, PROMPTS, clock=SimClock(), config=config,
                           cloud=_allow(LocalCloud(cloud_params, tiny_cfg)))  # fmt: skip
    V = tiny_cfg.vocab_size
    sparse = generate_fused(tiny_params, tiny_cfg, PROMPTS, clock=SimClock(),
                            config=dataclasses.replace(config, top_k=V),
                            cloud=_allow(LocalCloud(cloud_params, tiny_cfg, top_k=V)))  # fmt: skip
    assert dense.tokens == sparse.tokens
    np.testing.assert_allclose(dense.w, sparse.w, atol=1e-5)
    assert np.all((dense.w > 0) & (dense.w < 1))


def test_per_row_adapters_match_per_row_decoding(tiny_cfg, tiny_params, cloud_params):
    loras = [_random_lora(tiny_cfg, s, r) for s, r in ((1, 2), (2, 4), (3, 1))]
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=None, lora=stack_loras(loras),
                         clock=SimClock(), config=FusedDecodeConfig(max_new_tokens=N))  # fmt: skip
    for i, (p, lora) in enumerate(zip(PROMPTS, loras, strict=True)):
        assert res.tokens[i] == _ref(tiny_params, tiny_cfg, [p], lora=lora)[0], i
    plain = _ref(tiny_params, tiny_cfg)
    assert res.tokens != plain  # the adapters matter


def test_no_recompiles_across_steps_and_clients(tiny_cfg, tiny_params, cloud_params):
    from floe_jax import decode
    from floe_jax.inference import step

    kw = dict(clock=SimClock(), config=FusedDecodeConfig(max_new_tokens=N, deadline_s=1e9))
    cloud = _allow(LocalCloud(cloud_params, tiny_cfg))
    loras = [_random_lora(tiny_cfg, s, r) for s, r in ((4, 1), (5, 3), (6, 4))]
    generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=cloud, lora=stack_loras(loras), **kw)
    sizes = (decode.advance_jit._cache_size(), step.fuse_sample_jit._cache_size())
    loras = [_random_lora(tiny_cfg, s, r) for s, r in ((7, 4), (8, 2), (9, 1))]
    generate_fused(tiny_params, tiny_cfg, [[1, 2], [3], [4, 5, 6, 7]], cloud=cloud,
                   lora=stack_loras(loras), **kw)  # fmt: skip
    assert (decode.advance_jit._cache_size(), step.fuse_sample_jit._cache_size()) == sizes


def test_eos_stops_rows(tiny_cfg, tiny_params):
    ref = _ref(tiny_params, tiny_cfg)
    eos = ref[0][2]
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=None, clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=N, eos_id=eos))  # fmt: skip
    assert res.tokens[0] == ref[0][:3]


def test_proxy_tuning_baseline(tiny_cfg, tiny_params, cloud_params):
    """Without adapters the tuned and base edge cancel: proxy-tuning is the cloud itself; with an
    adapter the first token is argmax(z_cloud + z_tuned - z_base)."""
    proxy = FusionConfig(gate="proxy")
    kw = dict(clock=SimClock(), config=FusedDecodeConfig(max_new_tokens=N, fusion=proxy,
                                                          deadline_s=1e9))  # fmt: skip
    cloud = _allow(LocalCloud(cloud_params, tiny_cfg))
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=cloud, **kw)
    assert res.tokens == _ref(cloud_params, tiny_cfg)
    lora = _random_lora(tiny_cfg, 21, 4)
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS[:1], cloud=cloud, lora=lora, **kw)
    x = np.asarray([PROMPTS[0]])
    z = [forward(p, x, tiny_cfg, lora=lo)[0, -1] for p, lo in
         ((cloud_params, None), (tiny_params, lora), (tiny_params, None))]  # fmt: skip
    assert res.tokens[0][0] == int(np.argmax(z[0] + z[1] - z[2]))


@pytest.mark.parametrize(
    "field,value",
    [("max_new_tokens", 0), ("deadline_s", -1.0), ("buckets", (32, 16)), ("top_k", 0)],
)
def test_fused_decode_config_names_the_bad_field(field, value):
    from floe_jax.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        FusedDecodeConfig(**{"max_new_tokens": 4, field: value})
