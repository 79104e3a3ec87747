"""A bounded loopback load test of `serve_cloud`: 50 concurrent clients, connections that send
half a request or nothing, a 10 MB body. No connection is reset, the limits answer 408/413, and
`/health` keeps answering throughout (95% of polls within a second, none over 10 s: the 50
client threads share the server's process and GIL, on a 2-core machine another test worker also
loads). Only 127.0.0.1; every loop is bounded."""

import http.client
import json
import socket
import threading
import time

import pytest
from _serve_util import chat_model, chat_tokenizer

from floe_jax.inference.server import serve_cloud


@pytest.fixture(scope="module")
def server():
    tok = chat_tokenizer()
    cfg, params = chat_model(tok)
    with serve_cloud(params, cfg, tok, model_name="tiny", header_timeout_s=1.0,
                     body_timeout_s=1.0, max_body_bytes=1 << 20) as srv:  # fmt: skip
        yield srv


def _port(srv):
    return int(srv.url.rsplit(":", 1)[1])


def _completion(conn, i):
    body = json.dumps({"model": "tiny", "prompt": f"the dog {i}", "max_tokens": 1,
                       "logprobs": 5, "temperature": 0})  # fmt: skip
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_load_and_bad_traffic(server):
    port = _port(server)
    stop = threading.Event()
    health: list[float] = []
    errors: list[str] = []

    def poll_health():
        while not stop.is_set() and len(health) < 2000:
            t0 = time.monotonic()
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                assert c.getresponse().status == 200
                c.close()
            except Exception as e:  # noqa: BLE001
                errors.append(f"health: {e!r}")
            health.append(time.monotonic() - t0)
            time.sleep(0.02)

    def client(i):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for j in range(3):
                code, out = _completion(conn, i * 10 + j)
                if code != 200 or len(out["choices"][0]["logprobs"]["top_logprobs"][0]) == 0:
                    errors.append(f"client {i}: {code} {out}")
            conn.close()
        except Exception as e:  # noqa: BLE001  (a reset lands here)
            errors.append(f"client {i}: {e!r}")

    def half_sent(kind):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if kind == "headers":
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        elif kind == "body":
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")  # fmt: skip
        t0 = time.monotonic()
        data = s.recv(4096)  # the server answers 408 and closes, within its time limits
        took = time.monotonic() - t0
        s.close()
        if b"408" not in data.split(b"\r\n")[0] or took > 3:
            errors.append(f"half-sent {kind}: {data[:40]!r} after {took:.1f}s")

    threads = [threading.Thread(target=poll_health)]
    threads += [threading.Thread(target=client, args=(i,)) for i in range(50)]
    threads += [threading.Thread(target=half_sent, args=(k,)) for k in ("idle", "headers", "body")]
    for t in threads:
        t.start()
    big = json.dumps({"model": "tiny", "prompt": "x" * (10 << 20), "max_tokens": 1})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", big, {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 413 and "over" in json.loads(r.read())["error"]["message"]
    conn.close()
    for t in threads[1:]:
        t.join(60)
    stop.set()
    threads[0].join(10)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(health) >= 20, health
    assert sorted(health)[int(0.95 * len(health))] < 1.0 and max(health) < 10.0, sorted(health)
