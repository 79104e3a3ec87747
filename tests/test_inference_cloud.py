"""Cloud back ends: LocalCloud's per-stream KV cache, the simulated network, `serve_cloud` over a
real socket against `HTTPCloud` and the local back end, and a cross-tokenizer cloud."""

import json
import urllib.request

import jax
import numpy as np
import pytest
from _inference_util import bytelevel_tokenizer, metaspace_tokenizer, tiny_model

from floe_jax.inference.align import AlignConfig, build_map, vocab_of
from floe_jax.inference.cloud import LocalCloud, Prefix
from floe_jax.inference.deadline import SimClock, SimulatedNetwork
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.http_cloud import HTTPCloud
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.server import serve_cloud
from floe_jax.model import forward

CLOUD_ONLY = FusionConfig(gate="fixed", fixed_w=0.0)
# top-k of a random tiny model holds little mass: renormalise it so w = 0 follows the cloud's top-1
CLOUD_TOPK = FusionConfig(gate="fixed", fixed_w=0.0, align=AlignConfig(tail="renorm"))


@pytest.fixture(scope="module")
def tok():
    return bytelevel_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.get_vocab_size(), 3)


@pytest.fixture(scope="module")
def server(model, tok):
    cfg, params = model
    srv = serve_cloud(params, cfg, tok, port=0, block=False, model_name="tiny")
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


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


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_endpoints(server, tok):
    assert _get(server + "/health") == {"status": "ok"}
    assert _get(server + "/v1/models")["data"][0]["id"] == "tiny"
    body = {"prompt": "the dog", "max_tokens": 3, "temperature": 0, "logprobs": 2}
    code, out = _post(server + "/v1/completions", body)
    assert code == 200 and out["usage"]["completion_tokens"] == 3
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(t) <= 2 for t in lp["top_logprobs"])
    assert out["choices"][0]["text"] == "".join(lp["tokens"])
    for bad in ({"prompt": 3}, {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "logprobs": 99}):
        code, out = _post(server + "/v1/completions", bad)
        assert code == 400 and out["error"]["message"]


def test_http_client_matches_local_backend(server, model, tok):
    cfg, params = model
    texts = ["the quick brown fox", "small models run on", "the cat"]
    prefixes = [Prefix(ids=tok.encode(t).ids, text=t) for t in texts]
    local = LocalCloud(params, cfg, tokenizer=tok, top_k=5, inputs="ids").next_token(prefixes)
    by_ids = HTTPCloud(server, top_k=5, prompt="ids", token_ids=True, timeout_s=30)
    remote = by_ids.next_token(prefixes)
    assert remote.ok.all()
    np.testing.assert_array_equal(remote.top_ids, local.top_ids)
    np.testing.assert_allclose(remote.top_logprobs, local.top_logprobs, atol=1e-5)
    by_text = HTTPCloud(server, top_k=5, prompt="text", timeout_s=30).next_token(prefixes)
    for b in range(len(texts)):  # decoded-string keys (collisions keep the likelier)
        want = {}
        for t, lp in zip(local.top_tokens[b], local.top_logprobs[b], strict=True):
            want.setdefault(t, lp)
        for t, lp in zip(by_text.top_tokens[b], by_text.top_logprobs[b], strict=False):
            assert abs(want[t] - lp) < 1e-5
    by_ids.close()


def test_fused_generation_through_the_http_cloud(server, model, tok):
    """w = 0 over HTTP with token-id keys reproduces the local cloud's greedy tokens."""
    cfg, params = model
    edge_cfg, edge_params = tiny_model(tok.get_vocab_size(), 11)
    prompts = [tok.encode("the dog sat").ids]
    allow = PrivacyDetector(PrivacyPolicy(action="allow"))
    config = FusedDecodeConfig(max_new_tokens=4, fusion=CLOUD_TOPK, deadline_s=1e9, top_k=5)
    kw = dict(clock=SimClock(), config=config)
    remote = GuardedCloud(HTTPCloud(server, top_k=5, prompt="ids", token_ids=True), allow)
    got = generate_fused(edge_params, edge_cfg, prompts, cloud=remote, **kw)
    local = GuardedCloud(LocalCloud(params, cfg), allow)
    want = generate_fused(edge_params, edge_cfg, prompts, cloud=local, **kw)
    assert got.tokens == want.tokens and got.share_fused == 1.0
    remote.close()


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


def test_serve_cloud_cli_validates():
    from experiments.serve_cloud import main, parser

    args = parser().parse_args(["--random", "--tokenizer", "t.json", "--port", "0"])
    assert args.random and args.port == 0 and args.model_name == "floe-cloud"
    with pytest.raises(SystemExit):
        main(["--random"])  # a random model still needs a tokenizer
