"""floe_jax's clients and Floe's server as a Flower app (`flwr`, the optional `flower` extra).

`client.client_app` wraps `client.FloeClient` (a device: base model, own examples, rank) in a
Flower `ClientApp`; `server.server_app` wraps `server.FloeServer` (floe_jax's aggregation
rules, Floe's task clustering, the loop's run folder) in a `ServerApp`. Both run the functions
floe_jax's own loop runs (`rounds.plan_round`, `rounds.train_sampled`, `rounds.finish_round`,
`cluster.clustering_plan`, `cluster.labels_from_updates`), in Flower's simulation engine or on
a SuperLink with SuperNodes on separate hosts (`experiments/flower.py`, README "Flower").
"""

from floe_jax.flower.client import FloeClient, client_app
from floe_jax.flower.server import ClientsMissingError, FloeServer, server_app
from floe_jax.flower.wire import WireError, client_template, from_live, live_factors

__all__ = [
    "ClientsMissingError",
    "FloeClient",
    "FloeServer",
    "WireError",
    "client_app",
    "client_template",
    "from_live",
    "live_factors",
    "server_app",
]
