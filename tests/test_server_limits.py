"""`serve_cloud`'s limits on one request and one client: prompts x n per request, choices in
flight per client, a client that goes away (its choices are cancelled), a chunked body over the
limit (a 413 before it is all read), and tokenization of many prompts off the event loop.
Loopback only; every wait is bounded."""

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest
from _serve_util import chat_model, chat_tokenizer

from floe_jax.inference.server import ServeConfig, serve_cloud
from floe_jax.inference.server.app import CloudApp


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def srv(tok):
    cfg, params = chat_model(tok, context=1100)
    with serve_cloud(params, cfg, tok, model_name="tiny", max_choices=4, max_client_choices=2,
                     poll_s=0.05, max_body_bytes=1 << 20, body_timeout_s=5.0) as s:  # fmt: skip
        yield s


def _port(srv):
    return int(srv.url.rsplit(":", 1)[1])


def _post(srv, body, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", _port(srv), timeout=timeout)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.status, json.loads(r.read())
    c.close()
    return out


def _wait(cond, timeout_s=10.0):
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < timeout_s:
        time.sleep(0.01)
    return cond()


def test_prompts_times_n_is_capped_per_request(srv):
    status, body = _post(srv, {"model": "tiny", "prompt": ["a", "b", "c"], "n": 2,
                               "max_tokens": 1})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "n" and "4" in body["error"]["message"]


def test_a_client_that_goes_away_frees_its_choices_and_its_quota(srv):
    """Two long choices fill the client's quota (a third is a 429); the client hangs up, and its
    choices are cancelled long before their 1000 tokens, so its next request is served."""
    body = json.dumps({"model": "tiny", "prompt": "the dog", "n": 2, "max_tokens": 1000,
                       "temperature": 0})  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", _port(srv)), timeout=5)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
    assert _wait(lambda: srv.app.live.get("127.0.0.1") == 2)
    status, err = _post(srv, {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert status == 429 and err["error"]["code"] == "rate_limit_exceeded"
    steps = srv.engine.stats["steps"]
    sock.close()
    assert _wait(lambda: not srv.app.live, 60.0)  # the first prefill may still be compiling
    assert srv.engine.stats["steps"] - steps < 900  # cancelled, not run to the end
    status, _ = _post(srv, {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert status == 200


def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(srv):
    """1 MB limit: a chunked body that goes on past 2 MB is answered 413 while the client is
    still sending, not read to 64 MB (nor held until the body timeout)."""
    sock = socket.create_connection(("127.0.0.1", _port(srv)), timeout=5)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    chunk = b"%x\r\n%s\r\n" % (64 << 10, b" " * (64 << 10))
    got = b""
    sock.settimeout(0.05)
    t0 = time.monotonic()
    for _ in range(48):  # 3 MB, never the last chunk
        try:
            sock.sendall(chunk)
            got += sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            continue
        except OSError:
            break
        if got:
            break
    sock.settimeout(3.0)
    try:
        while b"\r\n\r\n" not in got:
            part = sock.recv(4096)
            if not part:
                break
            got += part
    except OSError:
        pass
    sock.close()
    assert got.startswith(b"HTTP/1.1 413"), got[:80]
    assert time.monotonic() - t0 < 4.0


def test_many_prompts_are_tokenized_off_the_event_loop(tok):
    """What moves tokenization to a thread is the request's total text, not one prompt's."""

    class FakeEngine:
        cfg = type("C", (), {"vocab_size": len(tok.get_vocab())})

    app = CloudApp(FakeEngine(), None, ServeConfig(max_choices=64))
    threads = []

    class Tok:
        def encode(self, text):
            threads.append(threading.current_thread())
            return [1] * 3

    app.tok = Tok()

    async def run():
        await app._prompt_ids(["x" * 10_000] * 4)  # 40,000 characters, each under 16,384
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    assert threads and all(t is not loop_thread for t in threads)


def test_new_requests_do_not_hold_up_live_streams(tok):
    """The engine prefills at most one prompt bucket per iteration: three requests of three
    buckets arriving together are admitted one at a time, with a step of the live stream
    between them (not three prefills, and three compiles, while it waits)."""
    import numpy as np

    from floe_jax.inference.server.engine import Engine

    cfg, params = chat_model(tok, context=256)
    events, lock = [], threading.Lock()

    class Job:
        def __init__(self, name, n, max_tokens):
            self.name, self.prompt, self.max_tokens, self.got = name, [5] * n, max_tokens, 0

        def on_logprobs(self, lp):
            with lock:
                events.append(self.name)
            self.got += 1
            return None if self.got >= self.max_tokens else int(np.argmax(lp))

        def on_error(self, msg):  # only the shutdown's, for the live job at the end
            self.error = msg

    engine = Engine(params, cfg, max_batch=4)
    live = Job("live", 3, 240)  # long enough to outlive the three prefills
    assert engine.submit(live)
    assert _wait(lambda: live.got >= 2, 60)  # its first compiles
    with engine._cv:  # the three arrive together: queued in one go (the lock is reentrant)
        for name, n in (("a", 20), ("b", 40), ("c", 100)):
            assert engine.submit(Job(name, n, 1))
    assert _wait(lambda: all(x in events for x in "abc"), 60)
    engine.close()
    first = {x: events.index(x) for x in "abc"}
    order = sorted(first.values())
    for lo, hi in zip(order, order[1:], strict=False):
        assert "live" in events[lo:hi], events


def test_infinite_time_limits_are_no_limits(tok):
    """`math.inf` for a time limit means none (not an overflow): plain and streamed requests
    are answered."""
    import math

    cfg, params = chat_model(tok)
    limits = {
        name: math.inf
        for name in (
            "header_timeout_s",
            "body_timeout_s",
            "request_timeout_s",
            "keep_alive_s",
            "send_timeout_s",
        )
    }
    with serve_cloud(params, cfg, tok, model_name="tiny", **limits) as s:  # fmt: skip
        status, body = _post(s, {"model": "tiny", "prompt": "the dog", "max_tokens": 3,
                                 "temperature": 0})  # fmt: skip
        c = http.client.HTTPConnection("127.0.0.1", _port(s), timeout=30)
        req = {"model": "tiny", "prompt": "the dog", "max_tokens": 3, "temperature": 0,
               "stream": True}  # fmt: skip
        c.request("POST", "/v1/completions", json.dumps(req), {"Content-Type": "application/json"})
        r = c.getresponse()
        events = [x for x in r.read().decode().split("\n\n") if x.startswith("data: ")]
        c.close()
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert r.status == 200 and events[-1] == "data: [DONE]"
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert streamed == body["choices"][0]["text"]


def test_connection_and_request_time_limits(tok):
    """`max_connections`: with two connections open (idle), a third request is a 503; once they
    close the next is answered. `request_timeout_s`: a request not finished by then is a 408 (its
    choices cancelled, the engine free for the next)."""
    cfg, params = chat_model(tok, context=1100)
    short = {"model": "tiny", "prompt": "a", "max_tokens": 1}
    with serve_cloud(params, cfg, tok, model_name="tiny", max_connections=2,
                     request_timeout_s=0.3, poll_s=0.05) as s:  # fmt: skip
        # its shape compiled first (a 408 while the first compile outlasts the 0.3 s)
        assert _wait(lambda: _post(s, short)[0] == 200, 120)
        idle = [socket.create_connection(("127.0.0.1", _port(s)), timeout=5) for _ in range(2)]
        time.sleep(0.2)  # let the server accept both
        c = http.client.HTTPConnection("127.0.0.1", _port(s), timeout=10)
        c.request("GET", "/v1/models")
        r = c.getresponse()
        busy = r.status
        r.read()
        c.close()
        for sock in idle:
            sock.close()
        freed = _post(s, short)[0]  # served again
        status, body = _post(
            s, {"model": "tiny", "prompt": "the dog", "max_tokens": 1000, "temperature": 0}
        )  # fmt: skip  (greedy: no end of text)
        assert _wait(lambda: not s.app.live, 60)  # the cancelled choice ends in the engine
    assert busy == 503 and freed == 200, freed
    assert status == 408 and "0.3s" in body["error"]["message"], body
