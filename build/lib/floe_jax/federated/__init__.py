"""Federated LoRA: one client's local update lifted over the client axis, aggregation rules,
task clustering, client-level differential privacy (`dp`), extraction measurement (`extraction`)
and the round loop with checkpoints."""

from floe_jax.federated import rules  # noqa: F401  (registers the built-in aggregation rules)
from floe_jax.federated.aggregate import Aggregated, Rule, register_rule
from floe_jax.federated.checks import drop_reasons
from floe_jax.federated.client import local_update, local_update_clients, make_optimizer, token_loss
from floe_jax.federated.config import AggregationConfig, DPConfig, FedConfig
from floe_jax.federated.loop import train_federated
from floe_jax.federated.rounds import (
    ServerState,
    init_server_state,
    round_step,
    run_round,
)
from floe_jax.federated.types import ClientData, client_data

__all__ = [
    "Aggregated",
    "AggregationConfig",
    "ClientData",
    "DPConfig",
    "FedConfig",
    "Rule",
    "ServerState",
    "client_data",
    "drop_reasons",
    "init_server_state",
    "local_update",
    "local_update_clients",
    "make_optimizer",
    "register_rule",
    "round_step",
    "run_round",
    "token_loss",
    "train_federated",
]
