"""HTTP POSTs under one total deadline each, cancellable (standard library `http.client`).

Each worker thread keeps one keep-alive connection per host (a run sends thousands of small
requests). A request registers its socket with a `Reaper` thread, which shuts the socket down
when the request's deadline passes or when `cancel_all()` is called (`HTTPCloud.close()`): a
server that hangs, or drip-feeds its answer a byte at a time, cannot hold a request (or the
process, at exit) past its deadline. Socket timeouts are set to the time left as well, so a
connect or a read never waits past it either. An infinite deadline (`math.inf`) is no limit:
no socket timeout, and only `cancel_all()` ends the request.
"""

from __future__ import annotations

import http.client
import math
import socket
import threading
import time
import urllib.parse


def socket_timeout(left: float) -> float | None:
    """A socket timeout for `left` seconds: None (block) when `left` is infinite or past what
    the platform's timers hold (`settimeout(math.inf)` is an OverflowError), else at least 1 ms
    (0 would make the socket non-blocking)."""
    if not math.isfinite(left) or left >= threading.TIMEOUT_MAX:
        return None
    return max(left, 0.001)


class Cancelled(Exception):
    """The request's deadline passed, or the client was closed, while it was in flight."""


class Reaper:
    """Shuts down the sockets of requests past their deadline (one thread for a client)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._live: dict[int, tuple[float, socket.socket]] = {}
        self._next = 0
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, sock: socket.socket) -> int:
        with self._cv:
            if self._stopped:
                raise Cancelled("the client is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="httpcloud-reaper")  # fmt: skip
                self._thread.start()
            self._next += 1
            self._live[self._next] = (deadline, sock)
            self._cv.notify()
            return self._next

    def remove(self, token: int) -> None:
        with self._cv:
            self._live.pop(token, None)

    def cancel_all(self) -> None:
        """Shuts down every socket in flight and refuses new ones."""
        with self._cv:
            self._stopped = True
            live, self._live = list(self._live.values()), {}
            self._cv.notify()
        for _, sock in live:
            _shutdown(sock)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _run(self) -> None:
        with self._cv:
            while not self._stopped:
                now = time.monotonic()
                for tok, (dl, sock) in list(self._live.items()):
                    if dl <= now:
                        del self._live[tok]
                        _shutdown(sock)
                nxt = min((dl for dl, _ in self._live.values()), default=math.inf)
                self._cv.wait(socket_timeout(nxt - now))  # inf: until a change


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Response:
    """Status, headers (lower-case names) and body of one answer."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body


class Transport:
    """POSTs JSON to one base URL over per-thread keep-alive connections."""

    def __init__(self, url: str, headers: dict[str, str]):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"HTTPCloud needs an http(s) URL, got {url!r}")
        self.scheme, self.host = u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base_path = u.path.rstrip("/")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json",
                        "Connection": "keep-alive", **headers}  # fmt: skip
        self.reaper = Reaper()
        self._local = threading.local()

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = (
                http.client.HTTPSConnection
                if self.scheme == "https"
                else http.client.HTTPConnection
            )
            conn = cls(self.host, self.port, timeout=timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def post(self, path: str, data: bytes, deadline: float) -> Response:
        """One POST that ends by `deadline` (`time.monotonic()`), raising `Cancelled` when it
        does not, and `OSError` / `http.client.HTTPException` on a broken connection. A kept-alive
        connection the server has closed meanwhile is replaced once, at no retry's cost."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None:
            try:
                return self._post(path, data, deadline)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                pass  # stale keep-alive connection: _post dropped it, try a fresh one
        return self._post(path, data, deadline)

    def _post(self, path: str, data: bytes, deadline: float) -> Response:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Cancelled("deadline passed before the request was sent")
        conn = self._conn(socket_timeout(left))
        token = None
        try:
            if conn.sock is None:
                conn.timeout = socket_timeout(left)
                conn.connect()
            conn.sock.settimeout(socket_timeout(deadline - time.monotonic()))
            token = self.reaper.add(deadline, conn.sock)
            conn.request("POST", self.base_path + path, body=data, headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                self._drop()
            return Response(resp.status, headers, body)
        except (OSError, http.client.HTTPException, Cancelled):
            self._drop()
            if self.reaper.stopped:
                raise Cancelled("the client was closed") from None
            if time.monotonic() >= deadline:
                raise Cancelled("deadline passed in flight") from None
            raise
        finally:
            if token is not None:
                self.reaper.remove(token)
