"""`serve_cloud` against the official `openai` client: completions and chat with log-probs,
streaming, stop, n / seed / top_p, refusals that name the field, the API key, and batching that
changes no number."""

import json
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from _serve_util import chat_model, chat_tokenizer

from floe_jax.inference.align import token_bytes
from floe_jax.inference.cloud import LocalCloud, encode_text
from floe_jax.inference.server import serve_cloud
from floe_jax.inference.server.engine import Engine


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return chat_model(tok)


@pytest.fixture(scope="module")
def server(model, tok):
    cfg, params = model
    with serve_cloud(params, cfg, tok, model_name="tiny", max_tokens_limit=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def local(model, tok):
    cfg, params = model
    return LocalCloud(params, cfg, tokenizer=tok, inputs="ids")


def _greedy(local, ids, n):
    out = []
    for _ in range(n):
        out.append(int(np.argmax(local.logprobs(ids + out))))
    return out


def test_completions_logprobs_are_the_models(client, local, tok):
    r = client.completions.create(model="tiny", prompt="the dog", max_tokens=4, temperature=0,
                                  logprobs=5)  # fmt: skip
    ids = encode_text(tok, "the dog")
    want = _greedy(local, ids, 4)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.text == tok.decode(want)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 4
    lp0 = local.logprobs(ids)
    top = c.logprobs.top_logprobs[0]
    assert len(top) <= 5 and max(top.values()) == pytest.approx(float(lp0.max()), abs=1e-5)
    np.testing.assert_allclose(c.logprobs.token_logprobs[0], lp0[want[0]], atol=1e-5)
    assert c.logprobs.text_offset[0] == 0 and len(c.logprobs.tokens) == 4


def test_chat_uses_the_template_and_reports_bytes(client, local, tok):
    msgs = [{"role": "user", "content": "the cat sat"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=3)  # fmt: skip
    ids = encode_text(tok, tok.apply_chat_template(msgs, tokenize=False,
                                                   add_generation_prompt=True))  # fmt: skip
    want = _greedy(local, ids, 3)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == tok.decode(want)
    first = c.logprobs.content[0]
    assert len(first.top_logprobs) == 3
    assert first.bytes == list(token_bytes(tok.convert_ids_to_tokens(want[0]), "bytelevel"))
    np.testing.assert_allclose(first.logprob, local.logprobs(ids)[want[0]], atol=1e-5)
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_matches_the_whole_answer(client):
    kw = dict(model="tiny", prompt="small models", max_tokens=6, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert len(chunks) >= 1 and "".join(ch.choices[0].text for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    msgs = [{"role": "user", "content": "the dog"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5,
                                           temperature=0).choices[0].message.content  # fmt: skip
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole
    assert parts[-1].usage.completion_tokens == 5


def test_stop_ends_the_text_before_the_stop_string(client):
    kw = dict(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text[3:5]
    assert stop and text.find(stop) >= 0
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True,
                                                                            **kw))  # fmt: skip
    assert streamed == text[: text.find(stop)]


def test_n_seed_and_top_p(client):
    kw = dict(model="tiny", prompt="the cat", max_tokens=5, temperature=1.0)
    a = client.completions.create(n=3, seed=7, **kw)
    b = client.completions.create(n=3, seed=7, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    greedy = client.completions.create(**{**kw, "temperature": 0}).choices[0].text
    nucleus = client.completions.create(top_p=1e-6, seed=1, **kw).choices[0].text
    assert nucleus == greedy  # the nucleus of a tiny top_p is the likeliest token alone


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"seed": "x"}, "seed"),
        ({"seed": -1, "temperature": 1.0}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"echo": True, "stream": True}, "echo"),  # echo is implemented, not when streaming
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"nonsense_field": 1}, "nonsense_field"),
        ({"prompt": "the " * 200}, "prompt"),  # past the 96-token context
        ({"prompt": 3}, "prompt"),
    ],
)
def test_bad_fields_are_a_400_naming_them(server, extra, param):
    code, body = _post(server.url + "/v1/completions",
                       {"model": "tiny", "prompt": "x", "max_tokens": 2, **extra})  # fmt: skip
    assert code == 400, body
    assert param in body["error"]["message"] or body["error"]["param"] == param


def test_unknown_model_and_route_are_404(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-nope", prompt="x", max_tokens=1)
    code, body = _post(server.url + "/v1/embeddings", {"model": "tiny"})
    assert code == 404 and body["error"]["message"]


def test_on_prompt_sees_every_accepted_prompt_as_text(model, tok):
    """The audit hook gets each prompt the server accepts: text as sent, token ids decoded, a
    chat conversation as its template renders it; a refused request reaches it not at all."""
    cfg, params = model
    seen = []
    with serve_cloud(params, cfg, tok, model_name="tiny", on_prompt=seen.append) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        c.completions.create(model="tiny", prompt="the edge", max_tokens=1)
        ids = encode_text(tok, "a cloud")
        c.completions.create(model="tiny", prompt=ids, max_tokens=1)
        c.chat.completions.create(
            model="tiny", max_tokens=1, messages=[{"role": "user", "content": "hello there"}]
        )
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-1)
        c.close()
    assert seen[:2] == ["the edge", tok.decode(ids)]
    assert len(seen) == 3 and "hello there" in seen[2]


def test_api_key_is_required_when_set(model, tok):
    cfg, params = model
    with serve_cloud(params, cfg, tok, model_name="tiny", api_key="s3cret") as srv:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"
        assert json.loads(urllib.request.urlopen(srv.url + "/health", timeout=5).read()) == {
            "status": "ok"
        }


def test_batched_requests_get_the_numbers_of_single_ones(model, tok, local):
    """Jobs prefilled and decoded together (different prompt lengths, different lengths to
    generate) get the same log-probs as one at a time."""
    import asyncio

    from floe_jax.inference.server.choice import Choice, Sampling, Tokens

    cfg, params = model
    engine = Engine(params, cfg, max_batch=8, start=False)
    loop = asyncio.new_event_loop()
    tokens = Tokens(tok, cfg.vocab_size)
    texts = ["the dog", "the cat sat on", "the quick brown fox"]  # one prompt bucket
    choices = []
    for i, t in enumerate(texts):
        s = Sampling(max_tokens=2 + i, temperature=0.0, top_logprobs=3)
        choices.append(Choice(encode_text(tok, t), s, tokens, index=i, loop=loop,
                              notify=lambda c: None))  # fmt: skip
        assert engine.submit(choices[-1])
    engine.start()
    try:
        deadline = time.monotonic() + 120  # the first call compiles; a loaded CI box is slow
        while not all(c.finish for c in choices) and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.02))
    finally:
        engine.close()
        loop.close()
    assert engine.stats["prefills"] == 1  # one shared prefill
    for c, t in zip(choices, texts, strict=True):
        ids = encode_text(tok, t)
        assert c.finish == "length" and c.ids == _greedy(local, ids, len(c.ids))
        np.testing.assert_allclose(c.logprobs[-1], local.logprobs(ids + c.ids[:-1])[c.ids[-1]],
                                   atol=2e-5)  # fmt: skip


def test_echo_and_prompt_logprobs_score_the_prompt(server, local, tok):
    """`echo` with `logprobs` (OpenAI legacy) and vLLM's `prompt_logprobs` give the model's
    log-probs after every prompt prefix, from the request's one prefill."""
    ids = encode_text(tok, "the dog sat on the")
    steps = server.engine.stats["prefills"]
    status, body = _post(server.url + "/v1/completions", {
        "model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 3,
        "echo": True, "prompt_logprobs": 2, "return_tokens_as_token_ids": True})  # fmt: skip
    assert status == 200 and server.engine.stats["prefills"] == steps + 1
    row = body["choices"][0]
    lp = row["logprobs"]
    assert lp["tokens"][: len(ids)] == [f"token_id:{i}" for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["top_logprobs"]) == len(ids) + 1
    for n in range(1, len(ids) + 1):  # position n: after ids[:n]
        want = local.logprobs(ids[:n])
        top = lp["top_logprobs"][n]
        best = np.argsort(-want, kind="stable")[:3]
        assert [f"token_id:{i}" for i in best] == list(top)
        np.testing.assert_allclose(list(top.values()), want[best], atol=2e-5)
        if n < len(ids):
            np.testing.assert_allclose(lp["token_logprobs"][n], want[ids[n]], atol=2e-5)
            vl = row["prompt_logprobs"][n]
            assert str(ids[n]) in vl and len(vl) <= 3
            np.testing.assert_allclose(vl[str(ids[n])]["logprob"], want[ids[n]], atol=2e-5)
    assert row["prompt_logprobs"][0] is None and len(row["prompt_logprobs"]) == len(ids)
    status, err = _post(server.url + "/v1/completions", {
        "model": "tiny", "prompt": "x", "echo": True, "stream": True})  # fmt: skip
    assert status == 400 and err["error"]["param"] == "echo"


def test_cli_validates_and_loads_local_files_only(tmp_path, monkeypatch):
    from experiments.serve_cloud import config_from, main, parser

    args = parser().parse_args(["--random", "--tokenizer", "t.json", "--port", "0"])
    assert args.random and args.port == 0 and args.model_name == "floe-cloud"
    monkeypatch.setenv("FLOE_API_KEY", "k")
    assert config_from(args).api_key == "k"
    assert config_from(args).warm_up  # on by default at the command line, off-able
    off = parser().parse_args(["--random", "--tokenizer", "t.json", "--no-warm-up"])
    assert not config_from(off).warm_up
    with pytest.raises(SystemExit):
        main(["--random"])  # a random model still needs a tokenizer
    with pytest.raises(SystemExit, match="local files only"):
        main(["--checkpoint", str(tmp_path / "missing")])


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
