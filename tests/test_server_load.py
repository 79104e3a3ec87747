"""A bounded loopback load test of `serve_cloud`: 50 concurrent clients, connections that send
half a request or nothing, a 10 MB body. No connection is reset, the limits answer 408/413, and
`/health`'s p99 stays under a second throughout. The clients and the poller run in child
processes (tests/_load_traffic.py), so their threads do not share the server's GIL. Only
127.0.0.1; every loop is bounded."""

import http.client
import json
import os
import subprocess
import sys
import time

import pytest
from _serve_util import chat_model, chat_tokenizer

from floe_jax.inference.server import serve_cloud


@pytest.fixture(scope="module")
def server():
    tok = chat_tokenizer()
    cfg, params = chat_model(tok)
    # warmed up, as a deployed server is (`serve-cloud` warms up by default), and loaded only
    # once /health says so: otherwise the first requests' compiles stall the event loop
    with serve_cloud(params, cfg, tok, model_name="tiny", header_timeout_s=1.0,
                     body_timeout_s=1.0, max_body_bytes=1 << 20, warm_up=True,
                     warm_up_prompt_tokens=16) as srv:  # fmt: skip
        deadline = time.monotonic() + 300
        while _health_status(srv) != 200:
            assert time.monotonic() < deadline, "serve_cloud did not finish warming up in 300 s"
            time.sleep(0.2)
        yield srv


def _health_status(srv) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", _port(srv), timeout=10)
    conn.request("GET", "/health")
    status = conn.getresponse().status
    conn.close()
    return status


def _port(srv):
    return int(srv.url.rsplit(":", 1)[1])


def _traffic(*args):
    script = os.path.join(os.path.dirname(__file__), "_load_traffic.py")
    return subprocess.Popen([sys.executable, script, *map(str, args)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip


def _result(proc) -> dict:
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_load_and_bad_traffic(server, tmp_path):
    port = _port(server)
    stopfile = tmp_path / "stop"
    poller = _traffic("health", port, stopfile)
    time.sleep(1.0)  # the poller's interpreter is up before the load starts
    load = _traffic("clients", port)
    try:
        big = json.dumps({"model": "tiny", "prompt": "x" * (10 << 20), "max_tokens": 1})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", big, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 413 and "over" in json.loads(r.read())["error"]["message"]
        conn.close()
        clients = _result(load)
    finally:
        stopfile.touch()  # the poller stops on its own; a child left running is killed
        load.kill()
    try:
        health = _result(poller)
    finally:
        poller.kill()
    assert clients["errors"] == [] and health["errors"] == []
    lat = sorted(health["latencies"])
    assert len(lat) >= 20, lat
    p50, p99 = lat[len(lat) // 2], lat[int(0.99 * len(lat))]
    print(f"/health: {len(lat)} polls, p50 {p50:.3f} s, p99 {p99:.3f} s, max {lat[-1]:.3f} s")
    assert p99 < 1.0, lat  # /health p99 under a second throughout
