"""Checks of a federated run, each naming the field, client or row: its data and server state
against its settings, on the host before a round is traced (`check_data`, `check_round`); a
base-folding rule with more than one cluster (`check_shared_base`, also when a round is
planned) or over a quantized base (`check_base_format`, also when a round is traced); and why
each sampled client was left out of an aggregate (`drop_reasons`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import numpy as np

from floe_jax.config import ConfigError, ModelConfig
from floe_jax.federated.aggregate import REASONS
from floe_jax.federated.config import FedConfig
from floe_jax.federated.types import ClientData, check_token_ids
from floe_jax.quant import is_quantized

if TYPE_CHECKING:
    from floe_jax.federated.rounds import ServerState


def check_shared_base(fed: FedConfig, num_clusters: int) -> None:
    """A rule that folds updates into the base weights needs one cluster (all share the base)."""
    if fed.agg.rule().init_base is not None and num_clusters > 1:
        raise ConfigError(
            f"FedConfig.agg.method={fed.agg.method!r} folds updates into the base weights, which "
            "the clients of all clusters share; use it with one cluster"
        )


def check_base_format(fed: FedConfig, params: dict) -> None:
    """A rule that folds updates into the base weights (FLoRA, FedEx-LoRA) needs a float base.

    Their round's update is an exact dense sum added to the weights. Added to a quantized base
    (`floe_jax.quant`) it would have to be requantized every round, whose rounding is of the
    order of the update itself (an int4 step is ~1/7 of a group's largest weight), so neither
    the exactness those rules exist for nor the update would survive; a dense float residual
    beside the codes would be a float copy of every adapted weight, the memory QLoRA saves.
    """
    if fed.agg.rule().init_base is None:
        return
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    formats = sorted({w.format for w in leaves if is_quantized(w)})
    if formats:
        raise ConfigError(
            f"FedConfig.agg.method={fed.agg.method!r} folds each round's update into the base "
            f"weights, and this base is quantized ({', '.join(formats)}: floe_jax.quant): the "
            "exact update cannot be added to its codes without requantizing it away. Train "
            "over a float base (floe_jax.quant.dequantize_params) with this rule, or keep the "
            "quantized base with a rule that leaves the base frozen (fedit, fedavg, hetlora, "
            "flexlora, fedsa, ffa)"
        )


def check_data(
    fed: FedConfig,
    data: ClientData,
    *,
    cfg: ModelConfig | None = None,
    eval_data: ClientData | None = None,
) -> None:
    """Host-side checks of a run's client data against its settings, before anything trains
    (update-based clustering trains every client before the first round).

    Args:
      fed, data: the run's config and training data.
      cfg: the base model; when given, every token id of `data` (and `eval_data`) must lie in
        `[0, cfg.vocab_size)` (`types.check_token_ids`), so an out-of-vocabulary id is reported
        as such rather than as a client's non-finite update.
      eval_data: the run's eval examples, checked like `data`.
    """
    vocab = None if cfg is None else cfg.vocab_size
    for what, d in (("client data", data), ("eval data", eval_data)):
        if d is None:
            continue
        try:
            check_token_ids(d.tokens, vocab)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    if fed.seq_len is not None and data.seq_len != fed.seq_len:
        raise ConfigError(
            f"client data has sequence length {data.seq_len}, FedConfig.seq_len={fed.seq_len}"
        )
    if fed.clients_per_round > data.num_clients:
        raise ConfigError(
            f"FedConfig.clients_per_round={fed.clients_per_round} exceeds the "
            f"{data.num_clients} clients"
        )


def check_round(
    fed: FedConfig,
    data: ClientData,
    state: ServerState,
    *,
    cfg: ModelConfig | None = None,
    eval_data: ClientData | None = None,
) -> None:
    """Host-side checks that name the field, client or row, before a round is traced: the data
    (`check_data`, with the same arguments) and the server state against the settings."""
    check_shared_base(fed, state.num_clusters)
    check_data(fed, data, cfg=cfg, eval_data=eval_data)
    if data.num_clients != state.assignment.shape[0]:
        raise ValueError(
            f"client data has {data.num_clients} clients, the server state "
            f"{state.assignment.shape[0]}"
        )
    if state.global_loras.max_rank != fed.max_rank:
        raise ConfigError(
            f"server adapters have rank {state.global_loras.max_rank}, the padded rank of "
            f"FedConfig.lora is {fed.max_rank}"
        )


def drop_reasons(metrics: dict, names: list[str], fed: FedConfig) -> dict[int, str]:
    """`{client id: reason}` for every sampled client left out of the aggregate (host side)."""
    out = {}
    ids, inc = np.asarray(metrics["client_ids"]), np.asarray(metrics["included"])
    fin, norm = np.asarray(metrics["finite"]), np.asarray(metrics["update_norm"])
    ex = np.asarray(metrics["examples"])
    codes = metrics.get("reason")
    for c, cid in enumerate(ids):
        if inc[c]:
            continue
        bad = [names[j] for j in np.flatnonzero(~fin[c])]
        if bad:
            why = "non-finite update in " + ", ".join(bad)
        elif not math.isfinite(float(norm[c])):
            why = "non-finite update norm"
        elif ex[c] <= 0:
            why = "no training examples"
        elif fed.max_update_norm is not None and norm[c] > fed.max_update_norm:
            why = f"update norm {float(norm[c]):.4g} > max_update_norm={fed.max_update_norm}"
        elif codes is not None:
            why = REASONS.get(int(np.asarray(codes)[c]), "excluded by the aggregation rule")
        else:
            why = "excluded by the aggregation rule"
        out[int(cid)] = why
    return out
