"""Speculation against a chat-only cloud ("propose"): one chat call returns the cloud's next k
tokens with its top-k at each, the edge verifies them in one forward. Against the real
`serve_cloud` on loopback: the greedy output is the token-by-token fused output, the request is
what a chat API takes, and the guard cuts a proposal where token by token it would have held the
text back."""

import json

import jax
import numpy as np
import pytest
from _inference_util import tiny_model
from _serve_util import chat_model, chat_tokenizer

from floe_jax.config import ConfigError
from floe_jax.decode import SamplingConfig
from floe_jax.inference.cloud import LocalCloud, Prefix, encode_text
from floe_jax.inference.deadline import SimClock
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.http_cloud import HTTPCloud
from floe_jax.inference.http_cloud.propose import proposal_rows
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.propose_decode import agree_jit
from floe_jax.inference.replies import CloudInput
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.server import serve_cloud

ALLOW = PrivacyPolicy(action="allow")


@pytest.fixture(scope="module")
def served():
    tok = chat_tokenizer()
    cfg, params = chat_model(tok, context=256)
    params = _words_only(tok, params, 30.0)  # a peaked cloud, as trained models are
    with serve_cloud(params, cfg, tok, model_name="tiny") as srv:
        yield srv, tok, cfg, params


def _generate(srv, tok, ecfg, eparams, prompts, *, k, fusion, N=8):
    client = HTTPCloud(srv.url, api="chat", model="tiny", top_k=5, token_ids=True, timeout_s=120)
    config = FusedDecodeConfig(max_new_tokens=N, deadline_s=1e9, speculate=k, propose=k > 0,
                               top_k=5, fusion=fusion)  # fmt: skip
    guard = GuardedCloud(client, PrivacyDetector(ALLOW))
    try:
        return generate_fused(eparams, ecfg, prompts, cloud=guard, clock=SimClock(),
                              config=config, decode=tok.decode), client.requests  # fmt: skip
    finally:
        client.close()


def test_a_proposal_is_one_chat_request_with_the_cloud_tokens_and_top_k(served):
    """`HTTPCloud.propose` asks for k greedy tokens with top-k log-probs: position j's top-k is
    the cloud model's next-token distribution after the rendered conversation and the cloud's
    own first j tokens (checked against the model run locally), and token j is its best."""
    srv, tok, cfg, params = served
    chat = HTTPCloud(srv.url, api="chat", model="tiny", top_k=4, token_ids=True, timeout_s=120)
    prompt = "the quick brown fox"
    got = chat.propose(Prefix(text=prompt, stream="s"), 4)
    chat.close()
    assert chat.requests == 1
    assert got.dist.ok.all() and (got.ids >= 0).all() and len(got.pieces) == 4
    assert got.ids.tolist() == got.dist.top_ids[:, 0].tolist()
    assert got.text() == tok.decode(got.ids.tolist())
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
    local = LocalCloud(params, cfg, tokenizer=tok, inputs="ids")
    for j in range(4):
        lp = local.logprobs(encode_text(tok, rendered) + got.ids[:j].tolist())
        np.testing.assert_allclose(got.dist.top_logprobs[j], np.sort(lp)[::-1][:4], atol=1e-5)


def _words_only(tok, params, scale: float):
    """`params` whose head can only rank first a token that is a whole word after a space
    (" the", " dog", ...): the other columns are 0, the final norm scaled by `scale` (peaked).
    Text made of such tokens re-encodes to the same tokens, which a chat cloud needs to see
    token by token what it generated (it reads the reply as text)."""
    V = params["lm_head"].shape[1]
    words = [i for i in range(V) if (s := tok.decode([i])).startswith(" ") and s[1:].isalpha()
             and s.isascii() and tok.encode(s) == [i]]  # fmt: skip
    keep = np.zeros(V, np.float32)
    keep[words] = 1.0
    return {**params, "lm_head": params["lm_head"] * keep, "norm": params["norm"] * scale}


@pytest.mark.parametrize(
    "fusion,edge_scale", [(FusionConfig(gate="fixed", fixed_w=0.3), 10.0), (FusionConfig(), 30.0)]
)
def test_greedy_proposals_give_the_token_by_token_output(served, fusion, edge_scale):
    """The fused choice is kept while it is the cloud's token, then the fused token where they
    part: the tokens of token-by-token fusion, every one fused, in fewer chat calls (w = 0.3:
    the cloud leads and its proposals are kept; the entropy gate between two peaked models:
    they part too).

    What is promised: position j of a proposal is the cloud's distribution after its own first
    j tokens; token by token, a chat cloud reads the reply as text and re-encodes it. The two
    are the same, and so are the outputs, when the text re-encodes to the tokens generated
    (checked here); a random model's byte fragments do not."""
    srv, tok, cfg, _ = served
    ecfg, eparams = tiny_model(cfg.vocab_size, 5)
    eparams = _words_only(tok, eparams, edge_scale)
    prompts = [tok.encode(" the dog sat on"), tok.encode(" a small")]
    (want, n0), (got, n1) = (
        _generate(srv, tok, ecfg, eparams, prompts, k=k, fusion=fusion) for k in (0, 4)
    )
    assert got.tokens == want.tokens
    assert got.share_fused == 1.0 and not got.failures
    assert n1 == got.speculation["calls"] < n0
    assert 1.0 < got.speculation["tokens_per_call"], got.speculation
    for p, out in zip(prompts, got.tokens, strict=True):  # the premise: text re-encodes
        assert tok.encode(tok.decode(p + out)) == p + out, tok.decode(out)
    assert (got.speculation["acceptance"] < 1.0) == (fusion.gate != "fixed"), got.speculation


def test_agree_emits_fused_draws_and_stops_where_they_part():
    """`agree` on fixed distributions: every emitted token is a draw from its position's fused
    distribution (chi-square at p < 1e-6 for position 0, and for position 1 among the rows that
    reached it), a row goes on only while the draw is the cloud's token, and never past its
    usable positions."""
    from scipy import stats

    rng = np.random.default_rng(0)
    M, V, P = 30000, 5, 3
    edge = rng.normal(size=(P, V)).astype(np.float32)
    cloud = np.asarray(jax.nn.log_softmax(rng.normal(size=(P, V)) * 2, axis=-1))
    fusion = FusionConfig(gate="fixed", fixed_w=0.5)
    z = np.zeros((M * P, 0))
    ci = CloudInput(np.ones(M * P, bool), np.tile(cloud, (M, 1)), np.zeros((0,), np.int32),
                    z.astype(np.int32), z.astype(np.float32), z.astype(bool))  # fmt: skip
    proposed = np.tile(np.argmax(cloud, -1).astype(np.int32), (M, 1))
    usable = np.where(np.arange(M) % 2 == 0, P, 2).astype(np.int32)
    out = agree_jit(np.broadcast_to(edge, (M, P, V)), ci, proposed, usable, jax.random.key(3),
                    fusion=fusion, sampling=SamplingConfig(temperature=1.0))  # fmt: skip
    n, toks = np.asarray(out["n"]), np.asarray(out["tokens"])
    e = np.exp(np.asarray(jax.nn.log_softmax(edge, axis=-1), np.float64))
    p = 0.5 * e + 0.5 * np.exp(cloud.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    for j, rows in ((0, n >= 1), (1, n >= 2)):
        counts = np.bincount(toks[rows, j], minlength=V)
        assert stats.chisquare(counts, p[j] * rows.sum()).pvalue > 1e-6
    went_on = toks[:, 0] == proposed[:, 0]
    assert np.array_equal(n >= 2, went_on)  # usable >= 2 everywhere
    assert n[usable == 2].max() == 2 and n[usable == P].max() == P


def test_the_guard_cuts_a_proposal_where_token_by_token_holds_back():
    """A cloud proposing `bob@example.com`: token by token the guard would hold `bob@` back (it
    may become an email), so the proposal's distributions stop before the position whose prefix
    ends in `@`; a withheld prefix sends nothing."""
    pieces = [b" bob", b"@", b"example", b".", b"com"]
    Proposer = _proposer(pieces)
    backend = Proposer()
    got = GuardedCloud(backend, PrivacyDetector()).propose(Prefix(text="mail", stream="s"), 5)
    assert backend.sent == ["mail"]
    assert got.dist.ok.tolist() == [True, True, False, False, False]  # "mail bob@" is held
    assert got.dist.errors[2:] == ["held"] * 3 and got.ids.tolist() == [0, 1, -1, -1, -1]
    strict = GuardedCloud(Proposer(), PrivacyDetector(PrivacyPolicy(action="edge_only")))
    got = strict.propose(Prefix(text="mail bob@example.com", stream="t"), 3)
    assert not got.dist.ok.any() and got.dist.errors == ["privacy"] * 3


def _proposer(pieces):
    """A back end whose proposal is always `pieces` (ids 0..k-1, every row ok); it records the
    prefixes it was sent."""

    class Proposer:
        kind = "sparse"

        def __init__(self):
            self.sent = []

        def propose(self, prefix, k):
            from floe_jax.inference.cloud import CloudDistribution
            from floe_jax.inference.http_cloud.propose import Proposal

            self.sent.append(prefix.text)
            dist = CloudDistribution(ok=np.ones(k, bool), top_ids=np.zeros((k, 1), np.int32),
                                     top_logprobs=np.zeros((k, 1), np.float32),
                                     errors=[None] * k)  # fmt: skip
            return Proposal(dist, np.arange(k, dtype=np.int32), pieces[:k])

    return Proposer


def test_the_guard_screens_a_proposal_after_the_original_prefix_not_the_redacted_one():
    """ "Mail bob@example.co" is sent as "Mail [EMAIL]"; the cloud proposes "m", " and". Token by
    token, the prefix after "m" is "Mail bob@example.com", sent as "Mail [EMAIL]" (not
    "Mail [EMAIL]m"): the cloud would not have seen the proposal's text there, so the proposal
    stops after its first token (row 1 `held`)."""
    backend = _proposer([b"m", b" and"])()
    got = GuardedCloud(backend, PrivacyDetector()).propose(
        Prefix(text="Mail bob@example.co", stream="s"), 2
    )
    assert backend.sent == ["Mail [EMAIL]"]
    assert got.dist.ok.tolist() == [True, False] and got.dist.errors[1] == "held"
    assert got.ids.tolist() == [0, -1] and got.pieces == [b"m"]
    backend = _proposer([b" to", b" you"])()  # nothing to redact: the whole proposal
    got = GuardedCloud(backend, PrivacyDetector()).propose(Prefix(text="Mail", stream="s"), 2)
    assert got.dist.ok.all() and got.ids.tolist() == [0, 1]


def test_proposal_rows_reads_a_chat_answer_and_names_what_is_missing():
    e = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}
    body = {"choices": [{"logprobs": {"content": [
        {**e("a", -0.1), "top_logprobs": [e("a", -0.1), e("b", -2.5)]},
        {**e("é", -0.3), "top_logprobs": [e("é", -0.3)]},
    ]}}]}  # fmt: skip
    rows = proposal_rows(json.dumps(body).encode())
    assert rows == [("a", b"a", [("a", -0.1), ("b", -2.5)]),
                    ("é", "é".encode(), [("é", -0.3)])]  # fmt: skip
    with pytest.raises(Exception, match="content"):
        proposal_rows(b'{"choices": [{"logprobs": null}]}')
    with pytest.raises(ConfigError, match="propose"):
        FusedDecodeConfig(max_new_tokens=4, propose=True)


def test_a_proposed_token_maps_to_the_edge_by_exact_match_only():
    """Cross-tokenizer: the cloud proposes " theory", " a" to an edge whose vocabulary is
    {" the", " a", "x"}. The rows' top-k still map with the fallback (" theory" counts as " the"
    in the distribution), but the proposed token " theory" is no edge token: its id is -1 (the
    edge cannot emit it and go on), not " the"'s 0; " a" is exact. Through a `VocabMap` a
    `token_id:N` key is kept only where the cloud id maps exactly."""
    from floe_jax.inference.align import StringMapper, build_map, vocab_of

    edge = vocab_of({" the": 0, " a": 1, "x": 2}, style="plain")
    e = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}
    body = {"choices": [{"logprobs": {"content": [
        {**e(" theory", -0.1), "top_logprobs": [e(" theory", -0.1), e(" a", -2.5)]},
        {**e(" a", -0.2), "top_logprobs": [e(" a", -0.2), e("x", -1.9)]},
    ]}}]}  # fmt: skip
    rows = proposal_rows(json.dumps(body).encode())
    cloud = HTTPCloud("http://127.0.0.1:9", api="chat", mapper=StringMapper(edge))
    got = cloud.read_proposal(rows, 3)
    assert got.ids.tolist() == [-1, 1, -1]
    assert got.dist.ok.tolist() == [True, True, False]
    assert got.dist.top_ids[0, :2].tolist() == [0, 1]  # the distribution keeps the fallback
    assert got.text() == " theory a"
    vm = build_map(vocab_of({" theory": 0, " a": 1}, style="plain"), edge)
    ids = HTTPCloud("http://127.0.0.1:9", api="chat", mapper=StringMapper(edge, vocab_map=vm))
    assert ids._ids(["token_id:0", "token_id:1"], fallback=False) == [-1, 1]
    assert ids._ids(["token_id:0", "token_id:1"]) == [0, 1]


def test_propose_against_a_cloud_that_cannot_propose_is_refused(tiny_cfg, tiny_params):
    """`propose=True` with a back end that only scores or answers next-token questions (a
    `LocalCloud`, a completions `HTTPCloud`) would decode edge-only, every call failing: refused
    up front, naming the back end."""
    config = FusedDecodeConfig(max_new_tokens=4, speculate=2, propose=True)
    completions = HTTPCloud("http://127.0.0.1:9", api="completions", token_ids=True)
    for cloud, name in ((LocalCloud(tiny_params, tiny_cfg), "LocalCloud"),
                        (completions, "api='completions'")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"propose.*{name}.*cannot"):
            generate_fused(tiny_params, tiny_cfg, [[5, 6]], cloud=cloud, config=config,
                           clock=SimClock())  # fmt: skip
    completions.close()
