"""Cloud back ends: LocalCloud's per-stream KV cache, the simulated network, and a cross-tokenizer
cloud (`serve_cloud` and `HTTPCloud` are tested in test_server*.py and test_http_cloud.py)."""

import jax
import numpy as np
import pytest
from _inference_util import bytelevel_tokenizer, metaspace_tokenizer, tiny_model

from floe_jax.inference.align import build_map, vocab_of
from floe_jax.inference.cloud import LocalCloud, Prefix
from floe_jax.inference.deadline import SimClock, SimulatedNetwork
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector
from floe_jax.inference.router import FusionConfig
from floe_jax.model import forward

CLOUD_ONLY = FusionConfig(gate="fixed", fixed_w=0.0)


@pytest.fixture(scope="module")
def tok():
    return bytelevel_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.get_vocab_size(), 3)


def test_local_cloud_cache_matches_full_forward(model):
    cfg, params = model
    cloud = LocalCloud(params, cfg, headroom=4)
    ids = [5, 9, 17, 33, 2, 8, 40, 41]
    full = jax.nn.log_softmax(forward(params, np.asarray([ids]), cfg)[0], axis=-1)
    for n in range(3, len(ids) + 1):  # a stream growing by one token, past its headroom once
        got = cloud.next_token([Prefix(ids=ids[:n], stream="s")]).logprobs[0]
        np.testing.assert_allclose(got, full[n - 1], atol=2e-5)
    assert cloud.stats["prefills"] == 2 and cloud.stats["extends"] == 4
    cloud.next_token([Prefix(ids=ids, stream="s")])
    assert cloud.stats["hits"] == 1


def test_local_cloud_sparse_and_bad_rows(model, tok):
    cfg, params = model
    cloud = LocalCloud(params, cfg, tokenizer=tok, top_k=5, inputs="ids")
    out = cloud.next_token([Prefix(ids=[1, 2, 3]), Prefix(text="")])
    assert out.ok.tolist() == [True, False] and "empty" in out.errors[1]
    assert out.top_ids.shape == (2, 5) and np.all(np.diff(out.top_logprobs[0]) <= 0)
    assert out.top_tokens[0][0] == tok.decode([int(out.top_ids[0, 0])])


def test_simulated_network_is_seeded_and_has_the_mean():
    a = SimulatedNetwork(rtt_ms=50, sigma=0.3, loss=0.1, seed=1)
    b = SimulatedNetwork(rtt_ms=50, sigma=0.3, loss=0.1, seed=1)
    xa = [a.sample(1000) for _ in range(4000)]
    assert xa == [b.sample(1000) for _ in range(4000)]
    got = np.array([x for x in xa if x is not None])
    assert abs(len(got) / 4000 - 0.9) < 0.03
    assert abs(got.mean() - 0.050) < 0.002
    slow = SimulatedNetwork(rtt_ms=10, sigma=0, bandwidth_mbps=1.0)
    np.testing.assert_allclose(slow.sample(125_000), 0.010 + 1.0)  # 1 Mbit at 1 Mbit/s
    c = SimClock()
    c.advance(0.25)
    assert c.now() == 0.25
    with pytest.raises(ValueError):
        c.advance(-1)


def test_cross_tokenizer_cloud_runs():
    """Edge (byte-level BPE) and cloud (Metaspace BPE) with different vocabularies: the cloud
    reads text, its distribution is mapped onto the edge vocabulary."""
    bl, ms = bytelevel_tokenizer(), metaspace_tokenizer()
    ecfg, eparams = tiny_model(bl.get_vocab_size(), 0)
    ccfg, cparams = tiny_model(ms.get_vocab_size(), 1)
    vm = build_map(vocab_of(ms), vocab_of(bl))
    prompts = [bl.encode("the dog sat on").ids, bl.encode("the cloud").ids]
    cloud = LocalCloud(cparams, ccfg, tokenizer=ms)
    guard = GuardedCloud(cloud, PrivacyDetector())
    res = generate_fused(eparams, ecfg, prompts, cloud=guard, decode=bl.decode,
                         vocab_map=vm, clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=4, fusion=CLOUD_ONLY,
                                                  deadline_s=1e9))  # fmt: skip
    assert res.share_fused == 1.0
    # w = 0: every token is the edge image of the cloud's aligned argmax
    first = cloud.logprobs(ms.encode(bl.decode(prompts[0])).ids)
    p_edge = np.zeros(ecfg.vocab_size)
    np.add.at(p_edge, vm.cloud_to_edge[vm.cloud_to_edge >= 0], np.exp(first)[vm.cloud_to_edge >= 0])
    assert res.tokens[0][0] == int(np.argmax(p_edge))
