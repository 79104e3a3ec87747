"""The generation loop under a simulated clock: the deadline, scripted and lossy clouds, the
privacy guard inside the loop."""

import jax
import numpy as np
import pytest

from floe_jax.decode import generate, pad_prompts
from floe_jax.inference.cloud import CloudDistribution, LocalCloud
from floe_jax.inference.deadline import SimClock, SimulatedNetwork
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.router import FusionConfig
from floe_jax.model import init_params

N = 5
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], [40, 41, 42]]
CLOUD_ONLY = FusionConfig(gate="fixed", fixed_w=0.0)


def _allow(backend):
    return GuardedCloud(backend, PrivacyDetector(PrivacyPolicy(action="allow")))


def _ref(params, cfg, prompts=PROMPTS):
    toks, mask = pad_prompts(prompts)
    out, _ = generate(params, toks, mask, cfg, max_new_tokens=N, key=jax.random.key(0))
    return np.asarray(out).tolist()


@pytest.fixture(scope="module")
def cloud_params(tiny_cfg):
    return init_params(tiny_cfg, key=jax.random.key(7))


class _Scripted:
    """A dense cloud whose per-call availability is scripted."""

    kind = "dense"

    def __init__(self, inner, fail_calls):
        self.inner, self.fail_calls, self.calls = inner, set(fail_calls), 0

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    def next_token(self, prefixes):
        self.calls += 1
        if self.calls in self.fail_calls:
            return CloudDistribution.missing(len(prefixes), "scripted")
        return self.inner.next_token(prefixes)


def test_deadline_with_simulated_clock(tiny_cfg, tiny_params, cloud_params):
    """RTT 50 ms against tau 100 ms: fused; RTT 500 ms: every token falls back to the edge, and
    each token costs tau (the loop waits until the deadline), never the full RTT."""
    cloud = LocalCloud(cloud_params, tiny_cfg)
    p = [PROMPTS[0]]
    config = FusedDecodeConfig(max_new_tokens=N, fusion=CLOUD_ONLY, deadline_s=0.1)
    fast = generate_fused(tiny_params, tiny_cfg, p, cloud=_allow(cloud), config=config,
                          clock=SimClock(),
                          network=SimulatedNetwork(rtt_ms=50, sigma=0, server_ms=2))  # fmt: skip
    assert fast.share_fused == 1.0 and fast.tokens == _ref(cloud_params, tiny_cfg, p)
    assert np.all(fast.latency_s[1:] >= 0.05)
    clock = SimClock()
    slow = generate_fused(tiny_params, tiny_cfg, p, cloud=_allow(cloud), config=config,
                          clock=clock,
                          network=SimulatedNetwork(rtt_ms=500, sigma=0, server_ms=2))  # fmt: skip
    assert slow.share_fused == 0.0 and slow.failures["deadline"] == N
    assert slow.tokens == _ref(tiny_params, tiny_cfg, p)
    assert np.all(slow.latency_s >= 0.1) and np.all(slow.latency_s < 0.1 + 5.0)
    np.testing.assert_allclose(clock.now(), slow.latency_s.sum())


def test_mixed_misses_fall_back_per_token(tiny_cfg, tiny_params, cloud_params):
    """Steps whose cloud reply is missing are decoded by the edge alone (w = 1), the rest fused."""
    inner = LocalCloud(cloud_params, tiny_cfg)
    res = generate_fused(tiny_params, tiny_cfg, [PROMPTS[0]],
                         cloud=_allow(_Scripted(inner, fail_calls={2, 4})), clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=N, fusion=CLOUD_ONLY,
                                                  deadline_s=1e9))  # fmt: skip
    assert res.fused[:, 0].tolist() == [True, False, True, False, True]
    assert res.w[[1, 3], 0].tolist() == [1.0, 1.0] and res.w[[0, 2, 4], 0].tolist() == [0, 0, 0]
    assert res.failures["scripted"] == 2


def test_lossy_network_is_deterministic(tiny_cfg, tiny_params, cloud_params):
    net = lambda: SimulatedNetwork(
        rtt_ms=80, sigma=0.5, jitter_ms=10, loss=0.3, server_ms=5, seed=4
    )
    kw = dict(config=FusedDecodeConfig(max_new_tokens=N, fusion=FusionConfig(), deadline_s=0.1))
    runs = [
        generate_fused(
            tiny_params,
            tiny_cfg,
            PROMPTS,
            cloud=_allow(LocalCloud(cloud_params, tiny_cfg)),
            clock=SimClock(),
            network=net(),
            **kw,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert runs[0].tokens == runs[1].tokens
    np.testing.assert_array_equal(runs[0].fused, runs[1].fused)
    assert 0 < runs[0].share_fused < 1 and runs[0].failures["lost"] > 0


def test_privacy_edge_only_rows_never_reach_the_cloud(tiny_cfg, tiny_params, cloud_params):
    seen = []

    class Spy:
        kind = "dense"
        vocab_size = tiny_cfg.vocab_size

        def next_token(self, prefixes):
            seen.extend(p.text for p in prefixes)
            return LocalCloud(cloud_params, tiny_cfg).next_token(prefixes)

    decode = lambda ids: (
        " ".join(f"w{i}" for i in ids) + (" bob@example.com" if ids[0] == 5 else "")
    )
    det = PrivacyDetector(PrivacyPolicy(action="edge_only"))
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=GuardedCloud(Spy(), det,
                         decode=decode), decode=decode, clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=3, fusion=CLOUD_ONLY,
                                                  deadline_s=1e9))  # fmt: skip
    assert seen and not any("@" in t for t in seen)
    assert res.fused[:, 0].sum() == 0 and res.fused[:, 1:].all()
    assert res.failures["privacy"] == 3 and res.privacy["requests"]["edge_only"] == 3


def test_bare_backend_is_wrapped_and_fails_closed(tiny_cfg, tiny_params, cloud_params):
    """Without a decoder the default guard cannot read ids: nothing leaves, edge decodes."""
    res = generate_fused(tiny_params, tiny_cfg, PROMPTS, cloud=LocalCloud(cloud_params, tiny_cfg),
                         clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=3, fusion=CLOUD_ONLY))  # fmt: skip
    assert res.share_fused == 0.0 and res.privacy["requests"]["unchecked"] == 3 * len(PROMPTS)
    assert res.tokens == [r[:3] for r in _ref(tiny_params, tiny_cfg)]


@pytest.mark.parametrize("mode", ["500", "garbage", "nan", "hang", "refused"])
def test_failing_http_cloud_degrades_to_edge(tiny_cfg, tiny_params, mode):
    """A cloud that errors, talks garbage, sends NaN or never answers: edge-only output, the
    failures counted, no exception and no hang (short client timeouts)."""
    from _inference_util import RECORDED_VOCAB, RecordingServer

    from floe_jax.inference.http_cloud import HTTPCloud

    server = RecordingServer("ok" if mode == "refused" else mode)
    url = server.url
    if mode == "refused":
        server.close()  # nothing listens there any more
    client = HTTPCloud(
        url,
        top_k=3,
        timeout_s=0.3,
        retries=1,
        backoff_s=0.01,
        max_workers=2,
        edge_tokenizer=RECORDED_VOCAB,
    )
    decode = lambda ids: " ".join(f"w{i}" for i in ids)
    guard = GuardedCloud(client, PrivacyDetector(), decode=decode)
    try:
        res = generate_fused(tiny_params, tiny_cfg, PROMPTS[:2], cloud=guard, decode=decode,
                             clock=SimClock(),
                             config=FusedDecodeConfig(max_new_tokens=3, fusion=CLOUD_ONLY,
                                                      deadline_s=0.1,
                                                      real_timeout_s=5.0))  # fmt: skip
    finally:
        client.close()
        server.close()
    assert res.tokens == [r[:3] for r in _ref(tiny_params, tiny_cfg, PROMPTS[:2])]
    assert res.share_fused == 0.0
    assert sum(res.failures.values()) == 6
    assert sum(client.failures.values()) == 6
    if mode == "500":
        assert len(server.bodies) == 12  # each request tried twice within its token's time
    if mode == "hang":
        assert len(server.bodies) == 6  # a request ends at its token's deadline: no retry


def test_real_clock_paths(tiny_cfg, tiny_params, cloud_params):
    """Under the wall clock: a cloud in time is fused (w = 0 reproduces the cloud), a cloud that
    never answers costs at most the deadline per token and decodes edge-only."""
    from _inference_util import RECORDED_VOCAB, RecordingServer

    from floe_jax.inference.deadline import RealClock
    from floe_jax.inference.http_cloud import HTTPCloud

    p = [PROMPTS[1]]
    ok = generate_fused(tiny_params, tiny_cfg, p, cloud=_allow(LocalCloud(cloud_params, tiny_cfg)),
                        clock=RealClock(),
                        config=FusedDecodeConfig(max_new_tokens=3, fusion=CLOUD_ONLY,
                                                 deadline_s=60.0))  # fmt: skip
    assert ok.share_fused == 1.0 and ok.tokens == [_ref(cloud_params, tiny_cfg, p)[0][:3]]
    server = RecordingServer("hang")
    client = HTTPCloud(server.url, top_k=3, timeout_s=0.5, retries=0, edge_tokenizer=RECORDED_VOCAB)
    decode = lambda ids: " ".join(f"w{i}" for i in ids)
    try:
        res = generate_fused(tiny_params, tiny_cfg, p, cloud=GuardedCloud(client, decode=decode),
                             decode=decode, clock=RealClock(),
                             config=FusedDecodeConfig(max_new_tokens=3, fusion=CLOUD_ONLY,
                                                      deadline_s=0.05, overlap=False))  # fmt: skip
    finally:
        client.close()
        server.close()
    assert res.share_fused == 0.0 and res.failures["deadline"] == 3
    assert res.tokens == [_ref(tiny_params, tiny_cfg, p)[0][:3]]


def test_infinite_deadlines_under_the_wall_clock(tiny_cfg, tiny_params):
    """`deadline_s=inf` is no deadline, not an overflow: under `RealClock` the loop waits for
    every reply (each token fused), an `HTTPCloud` with infinite `timeout_s` and `deadline_s`
    answers, and `close()` still ends a request to a server that never answers."""
    import math
    import threading
    import time

    from _inference_util import RECORDED_VOCAB, RecordingServer

    from floe_jax.inference.deadline import RealClock
    from floe_jax.inference.http_cloud import HTTPCloud

    decode = lambda ids: " ".join(f"w{i}" for i in ids)
    server = RecordingServer("ok")
    client = HTTPCloud(server.url, top_k=3, timeout_s=math.inf, deadline_s=math.inf,
                       edge_tokenizer=RECORDED_VOCAB)  # fmt: skip
    try:
        res = generate_fused(tiny_params, tiny_cfg, [PROMPTS[1]], decode=decode,
                             cloud=GuardedCloud(client, decode=decode), clock=RealClock(),
                             config=FusedDecodeConfig(max_new_tokens=3, fusion=CLOUD_ONLY,
                                                      deadline_s=math.inf))  # fmt: skip
    finally:
        client.close()
        server.close()
    # the server's top-1 is " the", edge id 0: cloud-only decoding follows it every token
    assert res.share_fused == 1.0 and not res.failures and res.tokens == [[0, 0, 0]]
    hang = RecordingServer("hang")
    client = HTTPCloud(hang.url, top_k=3, timeout_s=math.inf, deadline_s=math.inf,
                       edge_tokenizer=RECORDED_VOCAB)  # fmt: skip
    from floe_jax.inference.cloud import Prefix

    got = {}
    t = threading.Thread(target=lambda: got.update(out=client.next_token([Prefix(text="hi")])))
    t.start()
    while not hang.bodies:
        time.sleep(0.01)
    client.close()
    t.join(5)
    hang.close()
    assert not t.is_alive() and got["out"].errors[0].startswith("closed")
