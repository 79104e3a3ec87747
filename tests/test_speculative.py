"""Speculative fused decoding: the token-by-token fused output under greedy decoding (shared and
different tokenizers), the fused distribution under sampling, the privacy guard on drafts, late
replies, and the adaptive draft length."""

import dataclasses

import jax
import numpy as np
import pytest
from _inference_util import bytelevel_tokenizer, metaspace_tokenizer, tiny_model

from floe_jax.config import ConfigError
from floe_jax.decode import SamplingConfig
from floe_jax.inference.align import build_map, vocab_of
from floe_jax.inference.cloud import Draft, LocalCloud
from floe_jax.inference.deadline import SimClock, SimulatedNetwork
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.speculative import DraftLength
from floe_jax.model import init_params

N = 12
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], [40, 41, 42]]
ALLOW = PrivacyPolicy(action="allow")


@pytest.fixture(scope="module")
def cloud_params(tiny_cfg):
    return init_params(tiny_cfg, key=jax.random.key(7))


def _run(params, cfg, cloud_params, prompts=PROMPTS, *, speculate=0, fusion=FusionConfig(),
         net=None, tau=1e9, **kw):  # fmt: skip
    cloud = GuardedCloud(LocalCloud(cloud_params, cfg), PrivacyDetector(ALLOW))
    config = FusedDecodeConfig(max_new_tokens=N, fusion=fusion, deadline_s=tau,
                               speculate=speculate, **kw)  # fmt: skip
    return generate_fused(params, cfg, prompts, cloud=cloud, config=config, clock=SimClock(),
                          network=net)  # fmt: skip


@pytest.mark.parametrize("space", ["prob", "log"])
def test_greedy_speculation_gives_the_token_by_token_output(tiny_cfg, tiny_params, cloud_params,
                                                            space):  # fmt: skip
    fusion = FusionConfig(space=space)
    want = _run(tiny_params, tiny_cfg, cloud_params, fusion=fusion)
    for k, adapt in ((1, False), (4, False), (6, True)):
        got = _run(tiny_params, tiny_cfg, cloud_params, fusion=fusion, speculate=k,
                   adapt_k=adapt)  # fmt: skip
        assert got.tokens == want.tokens, (k, adapt)
        assert got.share_fused == 1.0 and not got.failures
        s = got.speculation
        assert s["calls"] < sum(map(len, want.tokens))  # fewer round trips than tokens
        assert s["tokens_per_call"] > 1.0
