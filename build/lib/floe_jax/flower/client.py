"""A device's side of Floe as a Flower `ClientApp`: it answers the server's hello with its
client id and rank, trains what the server sends with floe_jax's own local update
(`rounds.train_sampled`, the function the fused round calls), and keeps the per-cluster adapter
the server hands back at the end of the run.

The device holds its base model and its own examples; it receives its starting adapter's live
factors and its round keys, and sends back the trained live factors and three sums
(`loss_sum`, `tokens`, `examples`), never its data.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from floe_jax.config import ModelConfig
from floe_jax.federated.config import FedConfig
from floe_jax.federated.rounds import train_sampled
from floe_jax.federated.run_folder import tree_digest
from floe_jax.federated.types import ClientData
from floe_jax.flower.wire import (
    WireError,
    array_record,
    client_template,
    from_live,
    live_factors,
    message_arrays,
    message_config,
)

PHASE_HELLO = "hello"  # query: who are you (client id, rank, examples)
PHASE_CLUSTER = "cluster"  # train: Floe's clustering update (`cluster.clustering_plan`)
PHASE_ROUND = "round"  # train: one federated round (`rounds.plan_round`)
PHASE_FINAL = "final"  # query: the client's adapter after the run

_train = jax.jit(train_sampled, static_argnames=("cfg", "fed", "frozen"))


@dataclasses.dataclass
class FloeClient:
    """One device: its base model, its own examples and its rank.

    Attributes:
      params: the frozen base params (the same base as the server's run).
      data: this client's examples as a one-client `ClientData` ([1, E, T]); for results equal
        to the fused loop's, E is the run's padded example count.
      cfg, fed: the base model and the run's config.
      client_id: this client's index in the run (Flower's `partition-id`).
      rank: this client's true LoRA rank (from its device profile, `client_ranks`).
      final: the adapter [1] the server sent at the end of the run (None before).
    """

    params: dict
    data: ClientData
    cfg: ModelConfig
    fed: FedConfig
    client_id: int
    rank: int
    final: object = None

    def __post_init__(self):
        if self.data.num_clients != 1:
            raise ValueError(
                f"client {self.client_id}: FloeClient.data holds {self.data.num_clients} "
                "clients; give it this client's examples only ([1, E, T])"
            )
        if not 1 <= self.rank <= self.fed.max_rank:
            raise ValueError(
                f"client {self.client_id}: rank {self.rank} is outside [1, the padded rank "
                f"FedConfig.lora.max_rank={self.fed.max_rank}]"
            )

    def hello(self) -> dict:
        """What the server learns at the start: id, rank, real examples, data digest."""
        return {
            "client_id": self.client_id,
            "rank": self.rank,
            "examples": int(np.asarray(self.data.num_examples)[0]),
            "data_digest": tree_digest(self.data),
        }

    def _adapter(self, arrays: dict, rank: int):
        if not 1 <= rank <= self.rank:
            raise WireError(
                f"client {self.client_id}: the server sent rank {rank}, outside [1, this "
                f"device's rank {self.rank}]"
            )
        return from_live(
            arrays, client_template(self.cfg, self.fed, rank), who=f"client {self.client_id}"
        )

    def train(self, arrays: dict, config: dict) -> tuple[dict, dict]:
        """One local update: the received starting adapter trained on this client's rows.

        Args:
          arrays: the live factors (`wire.live_factors`) plus `data_key` and `train_key`
            (uint32 [2] each).
          config: `rank` (the rank the server trains this client at this round) and `frozen`
            (comma-separated factors the rule never trains).

        Returns:
          `(trained live factors, {"loss_sum", "tokens", "examples", "steps"})`.
        """
        arrays = dict(arrays)
        keys = {k: jnp.asarray(arrays.pop(k), jnp.uint32)[None] for k in ("data_key", "train_key")}
        start = self._adapter(arrays, int(config["rank"]))
        frozen = tuple(f for f in str(config.get("frozen", "")).split(",") if f)
        trained, cm = _train(
            self.params, start, self.data, jnp.zeros((1,), jnp.int32), keys["data_key"],
            keys["train_key"], cfg=self.cfg, fed=self.fed, frozen=frozen,
        )  # fmt: skip
        return live_factors(trained), {k: float(np.asarray(v)[0]) for k, v in cm.items()}

    def keep_final(self, arrays: dict, config: dict) -> None:
        """Stores the per-cluster adapter the server sends after the last round."""
        self.final = self._adapter(arrays, int(config["rank"]))


_CLIENTS: dict[tuple, FloeClient] = {}  # per process: the simulation pickles the app per message
_CLIENTS_LOCK = threading.Lock()


def _cached_client(key: tuple, load: Callable, context: Context) -> FloeClient:
    """`load(context)` once per `key` and process. Module-level, so a pickled app refers to
    this module's cache instead of carrying a copy of it."""
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = load(context)
        return _CLIENTS[key]


def client_app(load: Callable[[Context], FloeClient], name: str | None = None) -> ClientApp:
    """A Flower `ClientApp` running `FloeClient`s.

    Args:
      load: `(context) -> FloeClient` for the node this app runs on (its `node_config` names
        the client: `partition-id`, and optionally its `rank`); called once per client and
        process, its result kept in the process (the base model and data load once). Flower's
        simulation ships the app to its workers by pickling, so `load` must pickle.
      name: tells apart the clients of different `load`s in one process (default: `load`'s
        qualified name, or its repr for a `functools.partial`).
    """
    app = ClientApp()
    tag = name or getattr(load, "__qualname__", None) or repr(load)

    def get(context: Context) -> FloeClient:
        key = (tag, *sorted((str(k), str(v)) for k, v in context.node_config.items()))
        return _cached_client(key, load, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        client = get(context)
        config = message_config(msg)
        phase = config.get("phase")
        if phase == PHASE_HELLO:
            return Message(RecordDict({"config": ConfigRecord(client.hello())}), reply_to=msg)
        if phase == PHASE_FINAL:
            client.keep_final(message_arrays(msg), config)
            return Message(RecordDict({"config": ConfigRecord({"kept": 1})}), reply_to=msg)
        raise WireError(f"client {client.client_id}: unknown query phase {phase!r}")

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = get(context)
        trained, metrics = client.train(message_arrays(msg), message_config(msg))
        content = RecordDict(
            {
                "arrays": array_record(trained),
                "metrics": MetricRecord(metrics),
                "config": ConfigRecord({"client_id": client.client_id}),
            }
        )
        return Message(content, reply_to=msg)

    return app
