"""`HTTPCloud` against `serve_cloud` (completions and chat, one tokenizer or two) and against
servers that misbehave: hanging, drip-feeding, capped at 5 log-probs, chat-only, rate-limiting,
answering tokens that are not in the edge vocabulary. Every request ends within its deadline."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from _inference_util import bytelevel_tokenizer, metaspace_tokenizer, tiny_model
from _serve_util import chat_model, chat_tokenizer

from floe_jax.inference.align import AlignConfig, StringMapper, vocab_of
from floe_jax.inference.cloud import LocalCloud, Prefix, encode_text
from floe_jax.inference.deadline import SimClock
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.http_cloud import HTTPCloud, openai_settings
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.server import serve_cloud

# top-k of a random tiny model holds little mass: renormalise it so w = 0 follows the cloud's top-1
CLOUD_TOPK = FusionConfig(gate="fixed", fixed_w=0.0, align=AlignConfig(tail="renorm"))
ALLOW = PrivacyPolicy(action="allow")


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return chat_model(tok, context=256)


@pytest.fixture(scope="module")
def server(model, tok):
    cfg, params = model
    with serve_cloud(params, cfg, tok, model_name="tiny") as srv:
        yield srv.url


def test_completions_match_the_local_backend(server, model, tok):
    cfg, params = model
    texts = ["the quick brown fox", "small models run on", "the cat"]
    prefixes = [Prefix(ids=encode_text(tok, t), text=t) for t in texts]
    local = LocalCloud(params, cfg, tokenizer=tok, top_k=5, inputs="ids").next_token(prefixes)
    by_ids = HTTPCloud(server, model="tiny", top_k=5, prompt="ids", token_ids=True)
    remote = by_ids.next_token(prefixes)
    by_ids.close()
    assert remote.ok.all()
    np.testing.assert_array_equal(remote.top_ids, local.top_ids)
    np.testing.assert_allclose(remote.top_logprobs, local.top_logprobs, atol=1e-5)
    by_text = HTTPCloud(server, model="tiny", top_k=5, edge_tokenizer=tok)
    got = by_text.next_token(prefixes)
    by_text.close()
    mapper = StringMapper(vocab_of(tok))
    for b in range(len(texts)):  # decoded-string keys, mapped onto the (same) edge vocabulary
        want = {}
        for t, lp in zip(local.top_tokens[b], local.top_logprobs[b], strict=True):
            want.setdefault(t, lp)
        for t, i, lp in zip(got.top_tokens[b], got.top_ids[b], got.top_logprobs[b], strict=False):
            assert abs(want[t] - lp) < 1e-5 and i == mapper(t)


def test_chat_continues_the_partial_reply(server, model, tok):
    """The first text of a stream is the user's message; what the stream adds is the assistant's
    reply so far, continued: the top-k is that of the rendered conversation's next token."""
    cfg, params = model
    local = LocalCloud(params, cfg, tokenizer=tok, inputs="ids")
    chat = HTTPCloud(server, api="chat", model="tiny", top_k=4, edge_tokenizer=tok)
    prompt, reply = "the dog sat", " on the"
    for text, msgs, cont in [
        (prompt, [{"role": "user", "content": prompt}], False),
        (prompt + reply, [{"role": "user", "content": prompt},
                          {"role": "assistant", "content": reply}], True),
    ]:  # fmt: skip
        out = chat.next_token([Prefix(text=text, stream="s")])
        assert out.ok[0], out.errors
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not cont,
                                           continue_final_message=cont)  # fmt: skip
        lp = local.logprobs(encode_text(tok, rendered))
        np.testing.assert_allclose(out.top_logprobs[0], np.sort(lp)[::-1][:4], atol=1e-5)
    chat.close()


def test_fused_generation_through_the_http_cloud(server, model, tok):
    """w = 0 over HTTP with token-id keys reproduces the local cloud's greedy tokens; with string
    keys (a random model's byte fragments all read as U+FFFD there, which no edge token is)
    every token is fused or reported `unmapped`, never fused on nothing."""
    cfg, params = model
    edge_cfg, edge_params = tiny_model(cfg.vocab_size, 11)
    prompts = [encode_text(tok, "the dog sat")]
    allow = PrivacyDetector(ALLOW)
    config = FusedDecodeConfig(max_new_tokens=4, fusion=CLOUD_TOPK, deadline_s=1e9, top_k=5)
    kw = dict(clock=SimClock(), config=config, decode=tok.decode)
    want = generate_fused(edge_params, edge_cfg, prompts,
                          cloud=GuardedCloud(LocalCloud(params, cfg), allow), **kw)  # fmt: skip
    for client in (HTTPCloud(server, model="tiny", top_k=5, prompt="ids", token_ids=True),
                   HTTPCloud(server, model="tiny", top_k=5, edge_tokenizer=tok)):  # fmt: skip
        got = generate_fused(edge_params, edge_cfg, prompts, cloud=GuardedCloud(client, allow),
                             **kw)  # fmt: skip
        client.close()
        if client.token_ids:
            assert got.tokens == want.tokens and got.share_fused == 1.0 and not got.failures
        else:
            assert got.fused.sum() + got.failures["unmapped"] == 4 and set(got.failures) <= {
                "unmapped"
            }


def test_cross_tokenizer_cloud_over_http():
    """Cloud with a Metaspace vocabulary, edge with a byte-level one: string keys are mapped onto
    the edge vocabulary by the client, every token is fused, nothing fails."""
    bl, ms = bytelevel_tokenizer(), metaspace_tokenizer()
    ccfg, cparams = tiny_model(ms.get_vocab_size(), 1)
    ecfg, eparams = tiny_model(bl.get_vocab_size(), 0)
    with serve_cloud(cparams, ccfg, ms, model_name="ms") as srv:
        client = HTTPCloud(srv.url, model="ms", top_k=8, edge_tokenizer=bl, cloud_tokenizer=ms)
        res = generate_fused(eparams, ecfg, [bl.encode("the dog sat on").ids],
                             cloud=GuardedCloud(client, PrivacyDetector(ALLOW)), decode=bl.decode,
                             clock=SimClock(),
                             config=FusedDecodeConfig(max_new_tokens=3, fusion=CLOUD_TOPK,
                                                      deadline_s=1e9, top_k=8))  # fmt: skip
        client.close()
    assert res.share_fused == 1.0 and not res.failures


def test_string_keys_without_a_mapper_are_refused():
    with pytest.raises(ValueError, match="edge_tokenizer"):
        HTTPCloud("http://127.0.0.1:9")
    HTTPCloud("http://127.0.0.1:9", token_ids=True).close()  # ids of a shared tokenizer: fine


# ----------------------------------------------------------------------------- misbehaving servers


class FakeServer:
    """A loopback HTTP server whose `respond(handler, path, body)` the test writes."""

    def __init__(self, respond):
        self.respond, self.bodies, self.release = respond, [], threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                outer.bodies.append((self.path, body))
                outer.respond(self, self.path, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def send(h, code, obj, headers=()):
    data = json.dumps(obj).encode()
    h.send_response(code)
    for k, v in headers:
        h.send_header(k, v)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def completion(top: dict):
    return {"choices": [{"logprobs": {"top_logprobs": [top]}}]}


VOCAB = {" the": 0, " a": 1, "x": 2}
TOP = {" the": -0.5, " a": -1.5, "x": -3.0}


@pytest.fixture
def fake():
    servers = []

    def make(respond):
        servers.append(FakeServer(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _timed(client, prefixes):
    t0 = time.monotonic()
    out = client.next_token(prefixes)
    return out, time.monotonic() - t0


def test_hanging_and_dripping_servers_end_within_the_deadline(fake):
    def hang(h, path, body):
        srv.release.wait(10)  # never answers until the test closes the server

    def drip(h, path, body):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(100):  # a byte every 50 ms: every read succeeds, the answer never ends
            if srv.release.is_set():
                return
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.05)

    for respond in (hang, drip):
        srv = fake(respond)
        client = HTTPCloud(srv.url, top_k=3, timeout_s=0.3, retries=1, backoff_s=0.05,
                           deadline_s=0.5, edge_tokenizer=VOCAB)  # fmt: skip
        out, took = _timed(client, [Prefix(text="hi"), Prefix(text="yo")])
        client.close()
        assert not out.ok.any() and took < 1.5, (respond.__name__, took)
        assert all(e.startswith(("deadline", "timeout")) for e in out.errors), out.errors


def test_close_cancels_requests_in_flight(fake):
    srv = fake(lambda h, path, body: srv.release.wait(10))
    client = HTTPCloud(srv.url, top_k=3, timeout_s=30, edge_tokenizer=VOCAB)
    got = {}
    t = threading.Thread(target=lambda: got.update(out=client.next_token([Prefix(text="hi")])))
    t.start()
    while not srv.bodies:
        time.sleep(0.01)
    t0 = time.monotonic()
    client.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert got["out"].errors[0].startswith("closed")


def test_a_logprobs_cap_is_learned_from_the_400(fake):
    def capped(h, path, body):
        if body["logprobs"] > 5:  # vLLM's wording
            asked = body["logprobs"]
            msg = f"Requested sample logprobs of {asked}, which is greater than max allowed: 5"
            return send(h, 400, {"object": "error", "message": msg, "code": 400})
        send(h, 200, completion(TOP))

    srv = fake(capped)
    client = HTTPCloud(srv.url, top_k=20, edge_tokenizer=VOCAB)
    with pytest.warns(UserWarning, match="allows 5 log-probs"):
        out = client.next_token([Prefix(text="hi")])
    out2 = client.next_token([Prefix(text="ho")])
    client.close()
    assert out.ok.all() and out2.ok.all() and client.logprobs_cap == 5
    assert [b["logprobs"] for _, b in srv.bodies] == [20, 5, 5]


def test_chat_only_server_and_error_bodies_in_reasons(fake):
    seen = []

    def chat_only(h, path, body):
        seen.append((h.headers.get("X-Org"), h.headers.get("Authorization")))
        if path != "/v1/chat/completions":
            return send(h, 404, {"error": {"message": f"no route {path}"}})
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in TOP.items()]
        send(
            h,
            200,
            {
                "choices": [
                    {
                        "logprobs": {
                            "content": [{"token": " the", "logprob": -0.5, "top_logprobs": top}]
                        }
                    }
                ]
            },
        )

    srv = fake(chat_only)
    comp = HTTPCloud(srv.url, top_k=3, edge_tokenizer=VOCAB, retries=0)
    out = comp.next_token([Prefix(text="hi")])
    assert not out.ok[0] and "HTTP 404" in out.errors[0] and "no route" in out.errors[0]
    chat = HTTPCloud(srv.url, api="chat", top_k=3, edge_tokenizer=VOCAB, system="be brief",
                     api_key="k", headers={"X-Org": "floe"})  # fmt: skip
    out = chat.next_token([Prefix(text="hi")])
    comp.close(), chat.close()
    assert out.ok[0] and out.top_ids[0, :3].tolist() == [0, 1, 2]
    path, body = srv.bodies[-1]
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    assert seen[-1] == ("floe", "Bearer k")  # the extra header and the key were sent


def test_retry_after_is_honoured_within_the_deadline(fake, monkeypatch):
    calls = []

    def limited(h, path, body):
        calls.append(1)
        if len(calls) == 1:
            return send(h, 429, {"error": {"message": "slow down"}}, [("Retry-After", "0.2")])
        send(h, 200, completion(TOP))

    srv = fake(limited)
    waits = []
    client = HTTPCloud(srv.url, top_k=3, edge_tokenizer=VOCAB, sleep=waits.append)
    assert client.next_token([Prefix(text="hi")]).ok[0] and waits == [0.2]
    # a Retry-After past the deadline fails at once (in simulated time: nothing sleeps)
    calls.clear()
    late = HTTPCloud(srv.url, top_k=3, edge_tokenizer=VOCAB, deadline_s=1.0, sleep=waits.append)
    srv.respond = lambda h, p, b: send(h, 503, {"error": {"message": "busy"}},
                                       [("Retry-After", "100")])  # fmt: skip
    out = late.next_token([Prefix(text="hi")])
    client.close(), late.close()
    assert out.errors[0].startswith("deadline") and "busy" in out.errors[0] and waits == [0.2]


def test_openai_variables_give_url_and_key(fake, monkeypatch):
    """The OpenAI client's variables, read once by the caller; the client itself reads none."""
    seen = []
    srv = fake(lambda h, p, b: (seen.append(h.headers.get("Authorization")),
                                send(h, 200, completion(TOP))))  # fmt: skip
    env = {"OPENAI_BASE_URL": srv.url + "/v1", "OPENAI_API_KEY": "sk-test"}
    client = HTTPCloud(**openai_settings(env), edge_tokenizer=VOCAB, top_k=3)
    assert client.next_token([Prefix(text="hi")]).ok[0]
    client.close()
    assert seen == ["Bearer sk-test"]
    monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
    with pytest.raises(ValueError, match="base_url"):
        HTTPCloud(edge_tokenizer=VOCAB)


@pytest.mark.parametrize(
    "top, fallback",
    [
        ({"token_id:99999": -0.1}, "none"),
        ({"zzz-not-a-token": -0.1}, "none"),
        ({"token_id:99999": -0.1}, "prefix"),
    ],  # an id is never matched as text  # fmt: skip
)
def test_an_answer_on_no_edge_token_is_a_reported_failure(fake, top, fallback):
    """Out-of-vocabulary `token_id:N` keys (with the default prefix fallback too), or strings no
    edge token matches: the row fails (`unmapped`), no token counts as fused."""
    import jax

    from floe_jax.config import ModelConfig
    from floe_jax.model import init_params

    srv = fake(lambda h, p, b: send(h, 200, completion(top)))
    cfg = ModelConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1)  # fmt: skip
    params = init_params(cfg, key=jax.random.key(0))
    client = HTTPCloud(srv.url, top_k=3, token_ids=True, mapper=StringMapper(
        vocab_of(VOCAB), AlignConfig(fallback=fallback)))  # fmt: skip
    res = generate_fused(params, cfg, [[0, 1]], cloud=GuardedCloud(client, PrivacyDetector(ALLOW)),
                         decode=lambda ids: "x" * len(ids), clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=2, fusion=CLOUD_TOPK,
                                                  deadline_s=1e9))  # fmt: skip
    client.close()
    assert res.share_fused == 0.0 and res.failures["unmapped"] == 2


def test_token_id_keys_without_a_cloud_tokenizer_are_edge_ids(fake):
    """`token_ids=True` with only the edge's tokenizer (a shared tokenizer): `token_id:N` is edge
    id N, never the text `token_id:N` run through the string fallback."""
    srv = fake(lambda h, p, b: send(h, 200, completion({"token_id:1": -0.2, "token_id:2": -1.0})))
    client = HTTPCloud(srv.url, top_k=2, token_ids=True, edge_tokenizer=VOCAB)
    out = client.next_token([Prefix(text="hi")])
    client.close()
    assert out.ok[0] and sorted(out.top_ids[0].tolist()) == [1, 2]


def test_a_body_cut_short_is_a_retried_failure_not_an_exception(fake):
    """A server that promises 1000 bytes and closes after 10: a connection error, retried, and
    reported as the row's failure (nothing raises out of `next_token`)."""

    def cut(h, path, body):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b'{"choices"')
        h.wfile.flush()
        h.close_connection = True

    srv = fake(cut)
    client = HTTPCloud(srv.url, top_k=3, timeout_s=1.0, retries=1, backoff_s=0.01,
                       edge_tokenizer=VOCAB)  # fmt: skip
    out = client.next_token([Prefix(text="hi")])
    client.close()
    assert not out.ok[0] and out.errors[0].startswith("connection error"), out.errors
    assert len(srv.bodies) == 2  # the first attempt and one retry


def test_a_hanging_server_costs_the_fused_deadline_not_the_request_timeout(fake):
    """Under `SimClock` a request the fused loop can no longer use is cancelled at the token's
    deadline (`Prefix.budget_s`), not at HTTPCloud's own (5 s here): three tokens against a
    server that never answers take well under one request timeout of wall time."""
    srv = fake(lambda h, path, body: srv.release.wait(10))
    cfg, params = tiny_model(64, 0)
    config = FusedDecodeConfig(max_new_tokens=3, deadline_s=0.2)
    for _ in range(2):  # the first compiles
        client = HTTPCloud(srv.url, top_k=3, timeout_s=5.0, retries=0, edge_tokenizer=VOCAB)
        guard = GuardedCloud(client, PrivacyDetector(ALLOW))
        t0 = time.monotonic()
        res = generate_fused(params, cfg, [[5, 6, 7]], cloud=guard, clock=SimClock(),
                             decode=lambda ids: "x" * len(ids), config=config)  # fmt: skip
        took = time.monotonic() - t0
        client.close()
    assert res.share_fused == 0.0 and set(res.failures) == {"deadline"}
    assert took < 2.5, took


def _chat_answer(h, path, body):
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in TOP.items()]
    content = [{"token": " the", "logprob": -0.5, "top_logprobs": top}]
    send(h, 200, {"choices": [{"logprobs": {"content": content}}]})


def test_chat_never_fuses_a_new_turn_as_the_reply(fake, monkeypatch):
    """A partial reply sent as a finished turn (continue_final=False), a stream whose text no
    longer extends its first message, and a forgotten stream are failures (`position`): the
    answer's first token would not be the reply's next one."""
    import floe_jax.inference.http_cloud as hc

    srv = fake(_chat_answer)
    plain = HTTPCloud(srv.url, api="chat", top_k=3, edge_tokenizer=VOCAB, continue_final=False)
    first = plain.next_token([Prefix(text="hi", stream="s")])
    later = plain.next_token([Prefix(text="hi the", stream="s")])
    plain.close()
    assert first.ok[0] and not later.ok[0] and later.errors[0].startswith("position")
    monkeypatch.setattr(hc, "MAX_STREAMS", 1)
    chat = HTTPCloud(srv.url, api="chat", top_k=3, edge_tokenizer=VOCAB)
    asks = [("hi", "a"), ("hi the", "a"), ("yo", "a"), ("ho", "b"), ("hi the a", "a")]
    rows = [chat.next_token([Prefix(text=t, stream=s)]) for t, s in asks]
    chat.close()
    assert [r.ok[0] for r in rows] == [True, True, False, True, False]
    assert rows[2].errors[0].startswith("position") and rows[4].errors[0].startswith("position")
    assert chat.failures["position"] == 2 and len(srv.bodies) == 1 + 3


@pytest.mark.parametrize("threshold, fails", [(0.5, True), (0.2, False)])
def test_an_answer_mostly_off_the_edge_vocabulary_is_a_reported_failure(fake, threshold, fails):
    """Top-3 mass split 25 / 75 between an edge token and tokens no edge token matches: under
    the default `min_mapped_share` (0.5) the row fails (`unmapped`, the share and the lost
    tokens in the reason) and generation fuses nothing; a threshold of 0.2 accepts it."""
    import jax

    from floe_jax.config import ModelConfig
    from floe_jax.model import init_params

    top = {" the": -1.0, "zzz": -0.5, "qqq": -0.7}  # e^-1 / (e^-1 + e^-.5 + e^-.7) = 0.25
    srv = fake(lambda h, p, b: send(h, 200, completion(top)))
    kw = {} if threshold == 0.5 else {"min_mapped_share": threshold}
    client = HTTPCloud(srv.url, top_k=3, mapper=StringMapper(vocab_of(VOCAB),
                       AlignConfig(fallback="none")), **kw)  # fmt: skip
    row = client.next_token([Prefix(text="hi")])
    assert row.ok[0] is not fails
    if fails:
        assert row.errors[0].startswith("unmapped: 25.0%") and "zzz" in row.errors[0]
    cfg = ModelConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1)  # fmt: skip
    params = init_params(cfg, key=jax.random.key(0))
    res = generate_fused(params, cfg, [[0, 1]], cloud=GuardedCloud(client, PrivacyDetector(ALLOW)),
                         decode=lambda ids: "x" * len(ids), clock=SimClock(),
                         config=FusedDecodeConfig(max_new_tokens=2, fusion=CLOUD_TOPK,
                                                  deadline_s=1e9))  # fmt: skip
    client.close()
    if fails:
        assert res.share_fused == 0.0 and res.failures["unmapped"] == 2
    else:  # the cloud's answer is used: cloud-only fusion follows its one mapped token
        assert res.share_fused == 1.0 and res.tokens == [[0, 0]]
    with pytest.raises(ValueError, match="min_mapped_share"):
        HTTPCloud(srv.url, top_k=3, edge_tokenizer=VOCAB, min_mapped_share=1.5)


def test_a_server_that_never_reads_the_body_ends_within_the_deadline():
    """A server that accepts the connection and never reads (a small receive buffer): a 16 MB
    body fills the socket buffers and the send blocks; the request still ends at its deadline,
    since the send is under the same deadline as the reads."""
    import socket

    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepted ones
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    held, stop = [], threading.Event()

    def accept():
        lsock.settimeout(0.05)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])  # kept open, never read
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{lsock.getsockname()[1]}"
    client = HTTPCloud(url, top_k=3, timeout_s=0.5, retries=0, deadline_s=0.5,
                       edge_tokenizer=VOCAB)  # fmt: skip
    try:
        out, took = _timed(client, [Prefix(text="x" * (16 << 20))])
    finally:
        client.close()
        stop.set()
        for s in held:
            s.close()
        lsock.close()
    assert len(held) == 1 and not out.ok[0] and took < 1.5, (took, out.errors)
    assert out.errors[0].startswith(("deadline", "timeout")), out.errors
