"""Speculative fused decoding: the token-by-token fused output under greedy decoding (shared and
different tokenizers), the fused distribution under sampling, the privacy guard on drafts, late
replies, and the adaptive draft length."""

import jax
import numpy as np
import pytest
from _inference_util import bytelevel_tokenizer, metaspace_tokenizer, tiny_model

from floe_jax.config import ConfigError
from floe_jax.decode import SamplingConfig
from floe_jax.inference.align import build_map, vocab_of
from floe_jax.inference.cloud import Draft, LocalCloud
from floe_jax.inference.deadline import SimClock, SimulatedNetwork
from floe_jax.inference.draft_length import DraftLength
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.router import FusionConfig
from floe_jax.model import init_params

N = 12
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 3], [40, 41, 42]]
ALLOW = PrivacyPolicy(action="allow")
FUSION = FusionConfig()


@pytest.fixture(scope="module")
def cloud_params(tiny_cfg):
    return init_params(tiny_cfg, key=jax.random.key(7))


def _run(params, cfg, cloud_params, prompts=PROMPTS, *, speculate=0, fusion=FUSION,
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
    for k, adapt in ((1, False), (5, True)):
        got = _run(tiny_params, tiny_cfg, cloud_params, fusion=fusion, speculate=k,
                   adapt_k=adapt)  # fmt: skip
        assert got.tokens == want.tokens, (k, adapt)
        assert got.share_fused == 1.0 and not got.failures
        s = got.speculation
        assert s["calls"] < sum(map(len, want.tokens))  # fewer round trips than tokens
        assert s["tokens_per_call"] > 1.0


def test_drafting_ahead_during_the_wait_keeps_the_output(tiny_cfg, tiny_params, cloud_params):
    """A 100 ms wait: the edge drafts ahead meanwhile; where the first token ahead is kept (the
    edge leads at w = 0.9, so most are), the rest start the next round's draft. The output is
    still the token-by-token one."""
    fusion = FusionConfig(gate="fixed", fixed_w=0.9)
    want = _run(tiny_params, tiny_cfg, cloud_params, PROMPTS[:1], fusion=fusion)
    net = SimulatedNetwork(rtt_ms=100.0, sigma=0.0)
    got = _run(tiny_params, tiny_cfg, cloud_params, PROMPTS[:1], fusion=fusion, speculate=3,
               net=net)  # fmt: skip
    assert got.tokens == want.tokens and got.share_fused == 1.0
    assert got.speculation["ahead"] > 0, got.speculation


def test_the_edge_step_estimate_leaves_out_the_wait(tiny_cfg, tiny_params, cloud_params):
    """Under `RealClock` with a 300 ms cloud, the edge drafts ahead until it has drafted all it
    may and then waits: the draft length's estimate of one edge step (`edge_step_s`) counts the
    steps, not the rest of the wait, so it stays near the estimate with no wait at all (SimClock,
    no network; a loose 5x for a shared machine) and far under the wait per step."""
    from floe_jax.inference.deadline import RealClock

    fusion = FusionConfig(gate="fixed", fixed_w=0.9)
    kw = dict(fusion=fusion, speculate=3, adapt_k=False)
    _run(tiny_params, tiny_cfg, cloud_params, PROMPTS[:1], **kw)  # compiled
    alone = _run(tiny_params, tiny_cfg, cloud_params, PROMPTS[:1], **kw).speculation
    cloud = GuardedCloud(LocalCloud(cloud_params, tiny_cfg), PrivacyDetector(ALLOW))
    config = FusedDecodeConfig(max_new_tokens=N, deadline_s=1e9, **kw)
    real = generate_fused(
        tiny_params,
        tiny_cfg,
        PROMPTS[:1],
        cloud=cloud,
        config=config,
        clock=RealClock(),
        network=SimulatedNetwork(rtt_ms=300.0, sigma=0.0),
    )
    got = real.speculation
    assert got["edge_step_s"] < 5 * alone["edge_step_s"] + 2e-3, (got, alone)
    assert got["edge_step_s"] < 0.3 / (2 * 3 + 1), got  # the wait spread over a round's steps


def test_greedy_speculation_across_tokenizers():
    """Edge byte-level BPE, cloud Metaspace BPE reading text: the cloud scores each drafted
    position where its tokens line up, and the output is the token-by-token one."""
    bl, ms = bytelevel_tokenizer(), metaspace_tokenizer()
    ecfg, eparams = tiny_model(bl.get_vocab_size(), 0)
    eparams = {**eparams, "norm": eparams["norm"] * 30}  # a sharper edge, so drafts get accepted
    ccfg, cparams = tiny_model(ms.get_vocab_size(), 1)
    vm = build_map(vocab_of(ms), vocab_of(bl))
    prompts = [bl.encode("the dog sat on").ids, bl.encode("the cloud").ids]

    def run(k):
        guard = GuardedCloud(LocalCloud(cparams, ccfg, tokenizer=ms), PrivacyDetector(ALLOW))
        config = FusedDecodeConfig(max_new_tokens=8, deadline_s=1e9, speculate=k, adapt_k=False,
                                   fusion=FusionConfig(gate="fixed", fixed_w=0.3))  # fmt: skip
        return generate_fused(eparams, ecfg, prompts, cloud=guard, decode=bl.decode, vocab_map=vm,
                              clock=SimClock(), config=config)  # fmt: skip

    want, got = run(0), run(4)
    assert got.tokens == want.tokens
    assert got.speculation["calls"] < sum(map(len, want.tokens)), got.speculation
    assert 0 < got.speculation["acceptance"] < 1, got.speculation


class _EveryThird:
    """A stand-in NER detector: a span may be under way wherever the text's length is a multiple
    of 3, so under `pending="edge"` some prefixes are withheld and others sent."""

    def find(self, text):
        return []

    def pending(self, text):
        return 1 if len(text) % 3 == 0 else 0


def test_greedy_speculation_with_withheld_prefixes_gives_the_token_by_token_output():
    """A withheld prefix leaves the edge only the positions up to the first one the guard would
    send again (`sendable`); there token by token decoding asks the cloud, and so does the next
    round (keeping the whole draft, as for a late reply, gave other tokens)."""
    bl, ms = bytelevel_tokenizer(), metaspace_tokenizer()
    ecfg, eparams = tiny_model(bl.get_vocab_size(), 0)
    eparams = {**eparams, "norm": eparams["norm"] * 30}
    ccfg, cparams = tiny_model(ms.get_vocab_size(), 1)
    vm = build_map(vocab_of(ms), vocab_of(bl))
    prompts = [bl.encode("the dog sat on").ids, bl.encode("the cloud").ids]

    def run(k):
        det = PrivacyDetector(PrivacyPolicy(pending="edge"), detectors=[_EveryThird()])
        guard = GuardedCloud(LocalCloud(cparams, ccfg, tokenizer=ms), det)
        config = FusedDecodeConfig(max_new_tokens=16, deadline_s=1e9, speculate=k, adapt_k=False,
                                   fusion=FusionConfig(gate="fixed", fixed_w=0.3))  # fmt: skip
        return generate_fused(eparams, ecfg, prompts, cloud=guard, decode=bl.decode, vocab_map=vm,
                              clock=SimClock(), config=config)  # fmt: skip

    want = run(0)
    assert 0 < want.failures["privacy"] < sum(map(len, want.tokens))  # some withheld, some sent
    for k in (2, 4):
        got = run(k)
        assert got.tokens == want.tokens, k
        assert got.failures["privacy"] > 0 and got.speculation["answered"] > 0


def test_late_replies_leave_the_draft_to_the_edge(tiny_cfg, tiny_params, cloud_params):
    edge_only = _run(tiny_params, tiny_cfg, cloud_params, fusion=FusionConfig(gate="fixed",
                     fixed_w=1.0))  # fmt: skip
    net = SimulatedNetwork(rtt_ms=300.0, sigma=0.0)
    got = _run(tiny_params, tiny_cfg, cloud_params, speculate=3, adapt_k=False, net=net, tau=0.1)
    assert got.tokens == edge_only.tokens
    assert got.share_fused == 0.0 and np.all(got.w[~np.isnan(got.w)] == 1.0)
    assert got.failures["deadline"] == got.speculation["calls"] > 0
    assert got.speculation["answered"] == 0
    assert got.speculation["tokens_per_call"] > 3.0  # k drafted + the edge's bonus, bar the end
    rounds = got.latency_s[got.latency_s > 0]
    assert len(rounds) == got.speculation["calls"] // 3  # one wait per round (3 rows a round)
    assert np.all(rounds >= 0.1)  # each waited out the deadline


class _Recording:
    """A sparse back end that records what it is asked and answers every position."""

    kind = "sparse"

    def __init__(self):
        self.drafts, self.prefixes = [], []

    def _rows(self, n):
        from floe_jax.inference.cloud import CloudDistribution

        ids = np.tile(np.arange(3, dtype=np.int32), (n, 1))
        lps = np.tile(np.log([0.5, 0.3, 0.2]).astype(np.float32), (n, 1))
        return CloudDistribution(ok=np.ones(n, bool), top_ids=ids, top_logprobs=lps)

    def next_token(self, prefixes):
        self.prefixes += list(prefixes)
        return self._rows(len(prefixes))

    def score(self, draft):
        self.drafts.append(draft)
        return self._rows(draft.positions)


def test_the_guard_stops_a_draft_at_a_held_span():
    """Token by token, `bob@` is held back (it may become an email): the draft is sent only up to
    the position before it, and the later positions come back missing (`held`)."""
    pieces = ["my mail is", " bob", "@", "exa", "mple", ".com"]
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    backend = _Recording()
    guard = GuardedCloud(backend, PrivacyDetector())
    got = guard.score(Draft(text=text, text_ends=ends, stream="s"))
    (sent,) = backend.drafts
    assert sent.text == "my mail is bob" and sent.text_ends == (10, 14)
    assert got.ok.tolist() == [True, True, False, False, False, False]
    assert got.errors[2:] == ["held"] * 4
    assert "@" not in "".join(d.text for d in backend.drafts)
    # a withheld prefix (edge_only) sends nothing at all
    strict = GuardedCloud(_Recording(), PrivacyDetector(PrivacyPolicy(action="edge_only")))
    got = strict.score(Draft(text="mail bob@example.com now", text_ends=(20, 24), stream="t"))
    assert not got.ok.any() and got.errors == ["privacy", "privacy"]
    # pending="edge": withheld while a name may be under way, sent again once it is decided
    det = PrivacyDetector(PrivacyPolicy(pending="edge"), terms=["Mira Okafor"])
    pieces = ["Call Mi", "ra", " Okafor", ",", " now", " ok"]
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    got = GuardedCloud(backend := _Recording(), det).score(
        Draft(text="".join(pieces), text_ends=ends, stream="u")
    )
    m = got.errors.index("sendable")
    assert not got.ok.any() and got.errors[:m] == ["privacy"] * m and m >= 1
    assert det.screen("".join(pieces)[: ends[m]]).action == "redact"  # what would be sent there
    assert not backend.drafts and not backend.prefixes  # nothing left the device


def test_accept_follows_the_fused_distribution():
    """The speculative-sampling rule on fixed distributions, many rows at once: the first emitted
    token follows the target p_0 (not the draft q), and the second, when emitted, p_1. Pearson's
    chi-square at p < 1e-6 (so the test does not fail by chance) passes for p and fails for q."""
    from scipy import stats

    from floe_jax.inference.replies import CloudInput
    from floe_jax.inference.speculative import accept_jit, sampler_logp

    rng = np.random.default_rng(0)
    M, V, k = 40000, 6, 2
    P = k + 1
    sampling = SamplingConfig(temperature=0.8, top_p=0.95)
    edge = rng.normal(size=(P, V)).astype(np.float32) * 1.5
    cloud = rng.normal(size=(P, V)).astype(np.float32) * 1.5
    cloud_lp = jax.nn.log_softmax(cloud, axis=-1)
    fusion = FusionConfig(gate="fixed", fixed_w=0.3)

    # the reference: target p and draft q as numpy computes them
    def dist(lp):
        z = np.asarray(lp, np.float64) / sampling.temperature
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out = np.zeros_like(p)
        for r in range(p.shape[0]):
            order = np.argsort(-p[r], kind="stable")
            keep = (np.cumsum(p[r][order]) - p[r][order]) < sampling.top_p
            out[r, order[keep]] = p[r, order[keep]]
        return out / out.sum(-1, keepdims=True)

    e_lp = np.asarray(jax.nn.log_softmax(edge, axis=-1))
    fused = np.log(0.3 * np.exp(e_lp) + 0.7 * np.exp(np.asarray(cloud_lp)))
    p, q = dist(fused), dist(e_lp)
    np.testing.assert_allclose(np.exp(np.asarray(sampler_logp(fused, sampling))), p, atol=1e-5)
    draft = np.stack([rng.choice(V, size=M, p=q[j]) for j in range(k)], 1).astype(np.int32)
    z = np.zeros((M * P, 0))
    ci = CloudInput(np.ones(M * P, bool), np.tile(np.asarray(cloud_lp), (M, 1)),
                    np.zeros((0,), np.int32), z.astype(np.int32), z.astype(np.float32),
                    z.astype(bool))  # fmt: skip
    out = accept_jit(np.broadcast_to(edge, (M, P, V)), ci, draft, np.int32(k),
                     np.full(M, P, np.int32), jax.random.key(1), fusion=fusion,
                     sampling=sampling)  # fmt: skip
    n, toks = np.asarray(out["n"]), np.asarray(out["tokens"])

    def chi2_p(samples, probs):
        counts = np.bincount(samples, minlength=V)
        support = probs > 0
        assert counts[~support].sum() == 0
        return stats.chisquare(counts[support], probs[support] * len(samples)).pvalue

    assert chi2_p(toks[:, 0], p[0]) > 1e-6
    assert chi2_p(toks[n >= 2, 1], p[1]) > 1e-6
    assert chi2_p(toks[:, 0], q[0]) < 1e-6  # the test can tell the draft from the target
    assert 1.0 < n.mean() < P


def test_draft_length_follows_acceptance_and_rtt():
    fast = DraftLength(k_max=8, deadline_s=1.0)
    assert fast.choose(cap=8) == 8  # nothing measured yet
    for _ in range(10):
        fast.update([(0, 1), (1, 2)], rtt_s=0.002, edge_s=0.001)
    slow = DraftLength(k_max=8, deadline_s=1.0)
    for _ in range(10):
        slow.update([(8, 8), (4, 5)], rtt_s=0.15, edge_s=0.001)
    assert fast.choose(cap=8) <= 2 < slow.choose(cap=8)
    assert slow.choose(cap=3) == 3
    assert DraftLength(k_max=5, deadline_s=1.0, adapt=False).choose(cap=8) == 5


def test_draft_length_reads_run_lengths_not_a_pooled_rate():
    """Runs that either stop at once or go long (a fused output alternates between stretches the
    edge predicts and tokens it does not): the survival past position i is estimated per
    position (here 1/2, then 1 for every later position judged), not the pooled rate's
    geometric decay, so a long draft pays off at a long round trip. Drafts cut at k are
    censored: a run of 8 kept out of 8 says nothing about position 9."""
    d = DraftLength(k_max=8, deadline_s=1.0, decay=1.0, prior=0.0)
    for _ in range(5):
        d.update([(0, 1), (8, 8)], rtt_s=0.15, edge_s=0.001)
    s = d.survival()
    np.testing.assert_allclose(s[1:9], 0.5)
    assert d.alpha == pytest.approx((40 + 1) / (45 + 2))
    np.testing.assert_allclose(d.expected_tokens(8), 1 + 8 * 0.5)
    assert d.choose(cap=8) == 8
    assert d.choose(cap=8, ahead=8) == 8


@pytest.mark.parametrize("field,value", [("speculate", -1)])
def test_config_names_the_bad_field(field, value):
    with pytest.raises(ConfigError, match=field):
        FusedDecodeConfig(max_new_tokens=4, **{field: value})
    with pytest.raises(ConfigError, match="proxy"):
        FusedDecodeConfig(max_new_tokens=4, speculate=2, fusion=FusionConfig(gate="proxy"))


def test_http_cloud_scores_a_draft_in_one_request():
    """Over loopback `serve_cloud`, `HTTPCloud.score` asks for a drafted continuation's
    log-probs in one completions request (`echo` with `logprobs`): greedy speculative output is
    the token-by-token output, with more than one token per cloud call."""
    from _serve_util import chat_model, chat_tokenizer

    from floe_jax.inference.http_cloud import HTTPCloud
    from floe_jax.inference.server import serve_cloud

    tok = chat_tokenizer()
    cfg, params = chat_model(tok, context=256)
    ecfg, eparams = tiny_model(cfg.vocab_size, 5)
    prompts = [tok.encode("the quick brown fox"), tok.encode("a small")]
    fusion = FusionConfig(gate="fixed", fixed_w=0.5)
    with serve_cloud(params, cfg, tok, model_name="tiny") as srv:
        out, requests = [], []
        for k in (0, 4):
            client = HTTPCloud(srv.url, model="tiny", top_k=5, prompt="ids", token_ids=True)
            config = FusedDecodeConfig(max_new_tokens=8, deadline_s=1e9, speculate=k, top_k=5,
                                       fusion=fusion)  # fmt: skip
            guard = GuardedCloud(client, PrivacyDetector(ALLOW))
            out.append(generate_fused(eparams, ecfg, prompts, cloud=guard, clock=SimClock(),
                                      config=config))  # fmt: skip
            client.close()
            requests.append(client.requests)
    assert out[1].tokens == out[0].tokens and out[1].share_fused == 1.0 and not out[1].failures
    assert out[1].speculation["tokens_per_call"] > 1.0 and requests[1] < requests[0]


def _turns(n: int, N: int, k: int) -> int:
    """Cache slots a speculative run moves through when its n rows take turns keeping k drafted
    tokens (one row emits k + 1 a round, the others 1): each round moves every row by the most
    any row emitted."""
    outs, slots, r = [0] * n, 0, 0
    while min(outs) < N:
        emitted = [min(k + 1 if b == r % n else 1, N - o) for b, o in enumerate(outs)]
        outs = [o + e for o, e in zip(outs, emitted, strict=True)]
        slots += max(emitted)
        r += 1
    return slots


@pytest.mark.parametrize("n,N,k", [(1, 64, 8), (2, 64, 8), (3, 64, 8), (3, 12, 4), (8, 16, 8)])
def test_the_speculative_cache_holds_rows_taking_turns(n, N, k):
    """`FusedRun.cache_slots` against the worst schedule by hand: a batch of 3 rows taking turns
    keeping 8 drafted tokens moves through 3 N (k + 1) / (k + 3) ~ 157 slots for N = 64, more
    than 2N + 2k + 1 = 145; the cache must hold it (the draft room of the last round besides)."""
    import types

    from floe_jax.inference.fused import FusedRun

    run = types.SimpleNamespace(config=FusedDecodeConfig(max_new_tokens=N, speculate=k), n=n,
                                batch=n)  # fmt: skip
    slots = FusedRun.cache_slots.fget(run)
    assert _turns(n, N, k) <= slots - (2 * k + 1), (slots, _turns(n, N, k))
