"""Traffic for tests/test_server_load.py, run in child processes so that neither the 50 client
threads nor the `/health` poller share the server's process and GIL (as with a deployed server,
the latencies measured are the server's).

  python _load_traffic.py health PORT STOPFILE   polls /health every 20 ms until STOPFILE exists
                                                 (at most 3000 polls)
  python _load_traffic.py clients PORT           50 clients x 3 completions on one connection each,
                                                 and three connections that send half a request

Each prints one JSON line: `{"latencies": [...], "errors": [...]}` for the poller,
`{"errors": [...]}` for the clients; loops are bounded, sockets time out."""

import http.client
import json
import os
import socket
import sys
import threading
import time


def _completion(conn, i):
    body = json.dumps({"model": "tiny", "prompt": f"the dog {i}", "max_tokens": 1,
                       "logprobs": 5, "temperature": 0})  # fmt: skip
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def health(port: int, stopfile: str) -> dict:
    latencies, errors = [], []
    while not os.path.exists(stopfile) and len(latencies) < 3000:
        t0 = time.monotonic()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            status = c.getresponse().status
            c.close()
            if status != 200:
                errors.append(f"health: {status}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"health: {e!r}")
        latencies.append(time.monotonic() - t0)
        time.sleep(0.02)
    return {"latencies": latencies, "errors": errors}


def clients(port: int) -> dict:
    errors: list[str] = []

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

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    threads += [threading.Thread(target=half_sent, args=(k,)) for k in ("idle", "headers", "body")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    errors += [f"{t.name} still running after 90 s" for t in threads if t.is_alive()]
    return {"errors": errors}


if __name__ == "__main__":
    mode, port = sys.argv[1], int(sys.argv[2])
    out = health(port, sys.argv[3]) if mode == "health" else clients(port)
    print(json.dumps(out), flush=True)
