"""Floe's server as a Flower `ServerApp`: floe_jax's round, with the clients' local updates run
on Flower SuperNodes instead of inside one compiled program.

Each round is the fused loop's round (`rounds.round_step`) cut where the clients train:
`plan_round` samples the clients and builds their starting adapters and keys, each sampled
client's device runs `train_sampled` on its own examples (`floe_jax.flower.client`), and
`finish_round` screens, aggregates every cluster with the run's rule and updates the server
state. Floe's task clustering (`fed.clustering == "updates"`) is `cluster.clustering_plan` sent
to every device and `cluster.labels_from_updates` on the replies. With the same seeds, clients
and rule the adapters equal the loop's (tests/test_flower.py).

A client that fails or does not answer within `timeout` seconds is left out of that round: the
round aggregates the clients that replied (the aggregate over the remaining clients) and its
metrics row names the missing one under `dropped`. The run folder is the loop's
(`floe_jax.federated.run_folder`): `fingerprint.json`, `fed_config.json`, `clusters.json`,
`metrics.jsonl` and orbax checkpoints of the `ServerState`; a run resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from floe_jax.config import ConfigError, ModelConfig
from floe_jax.federated import loop, run_folder
from floe_jax.federated.cluster import clustering_plan, labels_from_updates
from floe_jax.federated.config import FedConfig
from floe_jax.federated.rounds import (
    ServerState,
    client_start,
    finish_round,
    init_server_state,
    plan_round,
    round_config,
    tensor_names,
)
from floe_jax.flower.client import (
    PHASE_CLUSTER,
    PHASE_FINAL,
    PHASE_HELLO,
    PHASE_ROUND,
)
from floe_jax.flower.wire import (
    array_record,
    from_live,
    live_factors,
    message_arrays,
    message_config,
    nbytes,
)

log = logging.getLogger(__name__)

_plan = jax.jit(plan_round, static_argnames=("fed", "num_clients"))
_finish = jax.jit(finish_round, static_argnames=("cfg", "fed"))
CLIENT_METRICS = ("loss_sum", "tokens", "steps", "examples")


class ClientsMissingError(RuntimeError):
    """Clients the run cannot do without (at the start, or for Floe's clustering) did not
    answer; the message lists them."""


def _row(x, c: int):
    """Client `c` of a stacked pytree, keeping a leading axis of 1."""
    return jax.tree.map(lambda v: v[c : c + 1], x)


def _first_error(reason: str) -> str:
    """The first `SomeError: message` line of a client's error report (Flower's simulation
    wraps the client's exception in Ray's traceback), else its last line; at most 300 chars."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(reason).splitlines()]
    lines = [x for x in lines if x]
    hit = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*: ", x)]
    return (hit[0] if hit else lines[-1] if lines else "unknown error")[:300]


def _concat(loras: list):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *loras)


@dataclasses.dataclass
class FloeServer:
    """The Floe server of one federated run over Flower.

    Attributes:
      cfg, fed: the base model and the run's config (`fed.agg`, `fed.clustering`, rounds...).
      run_dir: the run folder (the loop's format; resumed when it holds this run).
      num_clients: N, the clients the run expects (SuperNodes with `partition-id` 0..N-1).
      fingerprint: the run's settings (`run_folder.run_fingerprint`), written to and checked against
        `run_dir/fingerprint.json`; its `ranks` are replaced by the ranks the devices report.
      ranks: [N] ranks the devices must report (an error names a client that reports another);
        None takes the devices' ranks as they report them (a device may set its own).
      assignment, num_clusters: given clusters (`fed.clustering != "updates"`).
      timeout: seconds a round waits for its clients' replies; a client not answering by then
        is left out of the round. None waits for every reply.
      connect_timeout: seconds to wait for N SuperNodes to connect and answer the hello (a
        device loads its base model on its first message).
      restart: clear a run folder holding another run (`loop.train_federated`'s `restart`).
      stop_after: return after this many rounds (a deliberate interruption).
    """

    cfg: ModelConfig
    fed: FedConfig
    run_dir: str
    num_clients: int
    fingerprint: dict
    ranks: object = None
    assignment: object = None
    num_clusters: int = 1
    timeout: float | None = None
    connect_timeout: float = 600.0
    restart: bool = False
    stop_after: int | None = None

    def __post_init__(self):
        rule = self.fed.agg.rule()
        if rule.init_base is not None:
            raise ConfigError(
                f"FedConfig.agg.method={self.fed.agg.method!r} folds updates into the base "
                "weights, which would have to travel to every device; the Flower app sends "
                "adapters only"
            )
        self.frozen = ",".join(rule.frozen)

    # ------------------------------------------------------------------ messaging

    def _exchange(self, grid: Grid, sends: dict, message_type: str, group: str, timeout):
        """Sends `{client id: (node, arrays, config)}`; returns `(replies {client id:
        Message}, failed {client id: reason})`."""
        msgs, who = [], {}
        for cid, (node, arrays, config) in sends.items():
            content = RecordDict({"arrays": array_record(arrays), "config": ConfigRecord(config)})
            msgs.append(Message(content, dst_node_id=node, message_type=message_type,
                                group_id=group))  # fmt: skip
            who[node] = cid
        got, failed = {}, {}
        for rep in grid.send_and_receive(msgs, timeout=timeout):
            cid = who.get(rep.metadata.src_node_id)
            if cid is None:
                continue
            if rep.has_error():
                log.debug("client %s failed: %s", cid, rep.error.reason)
                failed[cid] = f"client error: {_first_error(rep.error.reason)}"
            else:
                got[cid] = rep
        for cid in sends:
            if cid not in got and cid not in failed:
                failed[cid] = f"no reply within timeout={timeout}s"
        return got, failed

    def _connect(self, grid: Grid) -> tuple[dict[int, int], np.ndarray]:
        """`({client id: node id}, ranks [N])` from every SuperNode's hello."""
        t0 = time.monotonic()
        while len(nodes := list(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() - t0 > self.connect_timeout:
                raise ClientsMissingError(
                    f"{len(nodes)} of {self.num_clients} SuperNodes connected within "
                    f"connect_timeout={self.connect_timeout}s"
                )
            time.sleep(1.0)
        sends = {n: (n, {}, {"phase": PHASE_HELLO}) for n in nodes}
        got, failed = self._exchange(grid, sends, MessageType.QUERY, "hello", self.connect_timeout)
        node_of, rank = {}, {}
        for n, rep in got.items():
            info = message_config(rep)
            cid = int(info["client_id"])
            if not 0 <= cid < self.num_clients:
                raise ConfigError(
                    f"node {n} says it is client {cid}, outside [0, {self.num_clients})"
                )
            if cid in node_of:
                raise ConfigError(f"nodes {node_of[cid]} and {n} both say they are client {cid}")
            node_of[cid], rank[cid] = n, int(info["rank"])
        missing = sorted(set(range(self.num_clients)) - set(node_of))
        if missing:
            raise ClientsMissingError(
                f"clients {missing} did not answer the hello (failed nodes: {failed})"
            )
        ranks = np.asarray([rank[c] for c in range(self.num_clients)], np.int32)
        if self.ranks is not None:
            want = np.asarray(self.ranks, np.int32)
            for c in np.flatnonzero(want != ranks):
                raise ConfigError(
                    f"client {c} reports rank {ranks[c]}, the run was set up with {want[c]}"
                )
        return node_of, ranks

    def _send_adapter(self, lora_1, keys: dict, config: dict) -> tuple[dict, dict]:
        arrays = live_factors(lora_1)
        arrays.update({k: np.asarray(v, np.uint32) for k, v in keys.items()})
        return arrays, config

    # ------------------------------------------------------------------ phases

    def _cluster(self, grid: Grid, node_of: dict, ranks: np.ndarray):
        """Floe's clustering over the devices: every client trains from one fresh adapter
        (`clustering_plan`), the server clusters the replies (`labels_from_updates`)."""
        start, dkeys, tkeys = clustering_plan(self.cfg, self.fed, ranks)
        sends = {}
        for c in range(self.num_clients):
            arrays, config = self._send_adapter(
                _row(start, c), {"data_key": dkeys[c], "train_key": tkeys[c]},
                {"phase": PHASE_CLUSTER, "rank": int(ranks[c]), "frozen": ""},
            )  # fmt: skip
            sends[c] = (node_of[c], arrays, config)
        got, failed = self._exchange(grid, sends, MessageType.TRAIN, "cluster", self.timeout)
        if failed:
            raise ClientsMissingError(
                "Floe's clustering needs every client's update; missing: "
                + "; ".join(f"client {c}: {why}" for c, why in sorted(failed.items()))
            )
        trained = _concat(
            [from_live(message_arrays(got[c]), _row(start, c), who=f"client {c}")
             for c in range(self.num_clients)]
        )  # fmt: skip
        return labels_from_updates(trained, self.fed)

    def _round(self, grid: Grid, state: ServerState, node_of: dict):
        """One round: `(state, metrics row)`."""
        t0 = time.perf_counter()
        fed, N = self.fed, self.num_clients
        plan = _plan(state, fed=fed, num_clients=N)
        rnd = int(state.round)
        ids, rank = np.asarray(plan.ids_C), np.asarray(plan.rank_C)
        sends, down = {}, 0
        for c, cid in enumerate(ids.tolist()):
            arrays, config = self._send_adapter(
                _row(plan.start, c),
                {"data_key": plan.data_keys[c], "train_key": plan.train_keys[c]},
                {"phase": PHASE_ROUND, "round": rnd, "rank": int(rank[c]), "frozen": self.frozen},
            )  # fmt: skip
            down += nbytes({k: v for k, v in arrays.items() if not k.endswith("_key")})
            sends[cid] = (node_of[cid], arrays, config)
        got, failed = self._exchange(grid, sends, MessageType.TRAIN, f"round {rnd}", self.timeout)
        for cid, why in sorted(failed.items()):
            log.warning("round %d: client %d left out: %s", rnd, cid, why)
        rows = [c for c, cid in enumerate(ids.tolist()) if cid in got]
        if not rows:
            new_state = dataclasses.replace(state, round=state.round + 1)
            row = {"round": rnd, "loss": None, "tokens": 0.0, "included": 0,
                   "bytes_up": 0.0, "bytes_down": 0.0}  # fmt: skip
        else:
            received = [message_arrays(got[int(ids[c])]) for c in rows]
            trained = _concat(
                [from_live(a, _row(plan.start, c), who=f"client {int(ids[c])}")
                 for a, c in zip(received, rows, strict=True)]
            )  # fmt: skip
            metrics = [got[int(ids[c])].content.metric_records["metrics"] for c in rows]
            cm = {k: jnp.asarray([m[k] for m in metrics], jnp.float32) for k in CLIENT_METRICS}
            new_state, m = _finish(state, plan.take(rows), trained, cm, cfg=self.cfg,
                                   fed=self._program_fed)  # fmt: skip
            m = jax.device_get(m)
            row = loop.round_row(m, self.names, fed, 0.0, num_clients=N)
            row["wire_bytes_up"] = float(sum(nbytes(a) for a in received))
        row["clients"] = [int(x) for x in ids]
        row["dropped"] = {**row.get("dropped", {}), **{str(c): w for c, w in failed.items()}}
        row["wire_bytes_down"] = float(down)
        row["seconds"] = time.perf_counter() - t0
        return new_state, row

    def _final(self, grid: Grid, state: ServerState, node_of: dict) -> dict:
        """Sends every client its cluster's adapter at its rank; `{client id: reason}` of the
        clients that did not take it."""
        ids = jnp.arange(self.num_clients)
        loras = client_start(state.global_loras, state.assignment, state.ranks, self.fed,
                             state.personal, ids)  # fmt: skip
        ranks = np.asarray(state.ranks)
        sends = {
            c: (node_of[c], live_factors(_row(loras, c)),
                {"phase": PHASE_FINAL, "rank": int(ranks[c])})
            for c in range(self.num_clients)
        }  # fmt: skip
        _, failed = self._exchange(grid, sends, MessageType.QUERY, "final", self.timeout)
        for c, why in sorted(failed.items()):
            log.warning("client %d did not take its final adapter: %s", c, why)
        return failed

    # ------------------------------------------------------------------ the run

    def run(self, grid: Grid) -> ServerState:
        """Connects the clients, clusters them (once per run folder), runs the remaining
        rounds, checkpoints and logs them as the loop does, and hands each client its final
        adapter. Returns the final server state."""
        fed = self.fed
        node_of, ranks = self._connect(grid)
        self._program_fed = round_config(fed, ranks)  # as `train_federated`'s rounds
        fingerprint = {**self.fingerprint, "ranks": ranks.tolist()}  # the ranks the run trains
        run_folder.claim_run_dir(self.run_dir, fingerprint, restart=self.restart)
        digest = run_folder.fingerprint_digest(fingerprint)
        assignment, K = loop.resolve_clusters(
            None, None, cfg=self.cfg, fed=fed, ranks=ranks, assignment=self.assignment,
            num_clusters=self.num_clusters, run_dir=self.run_dir,
            updates=lambda: self._cluster(grid, node_of, ranks),
        )  # fmt: skip
        state = init_server_state(self.cfg, fed, ranks=ranks, assignment=assignment,
                                  num_clusters=K)  # fmt: skip
        state = run_folder.resume_or_start(self.run_dir, state, digest, fed)
        self.names = tensor_names(state.global_loras)
        first = int(state.round)
        last = fed.num_rounds
        if self.stop_after is not None:
            last = min(last, first + self.stop_after)
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        for r in range(first, last):
            state, row = self._round(grid, state, node_of)
            log.info("round %d: loss %s, %d included, dropped %s", r, row["loss"],
                     row["included"], row["dropped"])  # fmt: skip
            if (r + 1) % fed.checkpoint_every == 0 or r + 1 == last:
                run_folder.save_round(self.run_dir, r + 1, state, fed, digest, row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if int(state.round) == fed.num_rounds:
            run_folder.check_trained(self.run_dir)
            self._final(grid, state, node_of)
        return state


def server_app(load: Callable[[Context], FloeServer], done: Callable | None = None) -> ServerApp:
    """A Flower `ServerApp` running the `FloeServer` that `load(context)` returns; `done`, when
    given, receives the final `ServerState` (the simulation command reports from it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        state = load(context).run(grid)
        if done is not None:
            done(state)

    return app


__all__ = ["ClientsMissingError", "FloeServer", "server_app"]
