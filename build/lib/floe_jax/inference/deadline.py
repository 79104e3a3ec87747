"""Waiting for the cloud under a per-token deadline: clocks, a simulated network, the worker that
calls the cloud and the collection of its replies.

Fused decoding sends each token's cloud requests to a thread pool (`call_cloud`), runs the edge
meanwhile, and gathers what arrived in time (`collect`). The loop runs on a clock: `RealClock`
(wall time; waiting really waits) or `SimClock` (virtual time the loop advances, so tests and
benchmarks never sleep). `SimulatedNetwork` draws round-trip times from a seed: a delay is slept
in the worker under a real clock, and added to virtual time under `SimClock`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import threading
import time

import numpy as np

from floe_jax.inference.cloud import CloudDistribution, Draft, Prefix


class RealClock:
    """Wall time (`time.perf_counter`); waiting on a future really waits."""

    simulated = False

    def now(self) -> float:
        return time.perf_counter()


class SimClock:
    """Virtual time in seconds, advanced by the generation loop; nothing sleeps."""

    simulated = True

    def __init__(self, start: float = 0.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"a clock cannot go back ({dt})")
        self.t += dt


@dataclasses.dataclass
class SimulatedNetwork:
    """Round trips between edge and cloud, deterministic from `seed`.

    One request's delay is `lognormal(mean=rtt_ms, shape=sigma) + |N(0, jitter_ms)| +
    8 * bytes / bandwidth`; with probability `loss` it never arrives.

    Attributes:
      rtt_ms: mean round-trip time.
      sigma: lognormal shape (0 gives a constant RTT).
      jitter_ms: scale of extra half-normal jitter.
      loss: probability a request is lost.
      bandwidth_mbps: link rate for the payload term (inf: none).
      server_ms: under `SimClock`, the cloud's compute time per request is taken as this instead
        of measured (None: measured), which makes a simulated run fully deterministic.
      seed: the draws are a function of the seed and the call order.
    """

    rtt_ms: float = 50.0
    sigma: float = 0.25
    jitter_ms: float = 0.0
    loss: float = 0.0
    bandwidth_mbps: float = math.inf
    server_ms: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.rtt_ms < 0 or self.sigma < 0 or self.jitter_ms < 0:
            raise ValueError("SimulatedNetwork: rtt_ms, sigma and jitter_ms must be >= 0")
        if not 0 <= self.loss <= 1:
            raise ValueError(f"SimulatedNetwork.loss must be in [0, 1], got {self.loss}")
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()

    @property
    def server_s(self) -> float | None:
        """`server_ms` in seconds (None: the cloud's compute is measured)."""
        return None if self.server_ms is None else self.server_ms / 1e3

    def sample(self, payload_bytes: int = 0) -> float | None:
        """Delay in seconds of one request, or None when it is lost."""
        with self._lock:
            lost = self._rng.random() < self.loss
            if self.sigma > 0 and self.rtt_ms > 0:
                mu = math.log(self.rtt_ms) - self.sigma**2 / 2  # mean exactly rtt_ms
                rtt = float(self._rng.lognormal(mu, self.sigma))
            else:
                rtt = self.rtt_ms
            jit = abs(float(self._rng.normal(0.0, self.jitter_ms))) if self.jitter_ms else 0.0
        wire = 8 * payload_bytes / (self.bandwidth_mbps * 1e6) if payload_bytes else 0.0
        return None if lost else (rtt + jit) / 1e3 + wire


def call_cloud(guard, prefix: Prefix, delay_s: float | None, sleep: bool):
    """Worker: asks `guard` (a `GuardedCloud`) for one prefix, or to score one `Draft` (one row
    per position). Returns (distribution, compute seconds) and never raises: a lost request
    (`delay_s is None`) or a broken back end is missing. `sleep`: wait out `delay_s` first (a
    simulated network under a real clock)."""
    rows = prefix.positions if isinstance(prefix, Draft) else 1
    if delay_s is None:
        return CloudDistribution.missing(rows, "lost"), 0.0
    if sleep and delay_s > 0:
        time.sleep(delay_s)
    t0 = time.perf_counter()
    try:
        d = guard.score(prefix) if rows > 1 else guard.next_token([prefix])
        d = d.sanitized()
    except Exception as e:  # noqa: BLE001  (a broken back end degrades to the edge)
        d = CloudDistribution.missing(rows, f"{type(e).__name__}: {e}")
    return d, time.perf_counter() - t0


def collect_simulated(futures, delays, deadline_s, real_timeout_s, server_s=None):
    """Gathers replies under `SimClock`: waits for each in wall time (up to `real_timeout_s`),
    then judges its virtual arrival (network delay + compute, or `server_s` in place of the
    measured compute) against the deadline; late rows become missing (`deadline`).

    Returns ({row: distribution}, virtual wait in seconds, slowest cloud compute seconds)."""
    got, wait_s, slowest = {}, 0.0, 0.0
    for b, fut in futures.items():
        try:
            d, c_s = fut.result(timeout=real_timeout_s)
        except cf.TimeoutError:
            d, c_s = CloudDistribution.missing(1, "hung"), math.inf
        if server_s is not None and math.isfinite(c_s):
            c_s = server_s
        arrival = math.inf if delays[b] is None else delays[b] + c_s
        if d.errors and d.errors[0] == "privacy":
            arrival = 0.0  # withheld on the device: nothing to wait for
        wait_s = max(wait_s, min(arrival, deadline_s))
        slowest = max(slowest, c_s if math.isfinite(c_s) else 0.0)
        if arrival > deadline_s and d.ok[0]:
            d = CloudDistribution.missing(d.batch, "deadline")
        got[b] = d
    return got, wait_s, slowest


def collect_real(futures, t_start, deadline_s, clock):
    """Gathers replies in wall time until `t_start + deadline_s`; rows not back by then are
    missing (`deadline`); an infinite deadline waits for every reply. Returns ({row:
    distribution}, slowest cloud compute seconds)."""
    got, slowest = {}, 0.0
    for b, fut in futures.items():
        left = t_start + deadline_s - clock.now()
        # `result(timeout=inf)` overflows the platform's timer: no deadline is no timeout
        wait = None if left >= threading.TIMEOUT_MAX else max(left, 0.0)
        try:
            d, c_s = fut.result(timeout=wait)
            slowest = max(slowest, c_s)
        except cf.TimeoutError:
            d = CloudDistribution.missing(1, "deadline")
        got[b] = d
    return got, slowest
