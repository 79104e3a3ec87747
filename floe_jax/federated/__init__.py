"""Federated LoRA: one client's local update lifted over the client axis, aggregation rules,
task clustering and the round loop with checkpoints."""

from floe_jax.federated.aggregate import Aggregated
from floe_jax.federated.client import local_update, local_update_clients, make_optimizer, token_loss
from floe_jax.federated.loop import train_federated
from floe_jax.federated.rounds import (
    FedConfig,
    ServerState,
    drop_reasons,
    fedavg,
    init_server_state,
    round_step,
    run_round,
)
from floe_jax.federated.types import ClientData, client_data

__all__ = [
    "Aggregated",
    "ClientData",
    "FedConfig",
    "ServerState",
    "client_data",
    "drop_reasons",
    "fedavg",
    "init_server_state",
    "local_update",
    "local_update_clients",
    "make_optimizer",
    "round_step",
    "run_round",
    "token_loss",
    "train_federated",
]
