"""Configuration of a federated LoRA run: the rounds, the adapters (`LoRAConfig`), the
aggregation rule with its options (`AggregationConfig`) and client-level differential privacy
(`DPConfig`).

The nested configs are reachable by dotted overrides (`fed.agg.method=hetlora`,
`fed.agg.prune_threshold=0.1`, `fed.lora.rank=16`, `fed.dp.enabled=true`;
`floe_jax.overrides.apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import math

from floe_jax.config import ConfigError, LoRAConfig, require_finite
from floe_jax.federated.aggregate import Rule, available_rules, make_rule, rule_options
from floe_jax.federated.client import make_optimizer

_AGG_DEFAULTS = {
    "norm_weighting": False,
    "prune_threshold": None,
    "path": "auto",
    "total_rank": None,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AggregationConfig:
    """An aggregation rule by name and its options (`floe_jax.federated.rules`).

    Every option belongs to the methods that register it; setting one the method does not take
    fails, naming the field (set `method` before its options in a list of overrides).

    Attributes:
      method: a registered rule (`aggregate.available_rules()`; register your own with
        `aggregate.register_rule`).
      max_norm: screening, every method: a client whose update has ‖ΔW‖_F above it is left out;
        None = no limit.
      norm_weighting: hetlora: weight client k by `p_k ‖ΔW_k‖_F`.
      prune_threshold: hetlora: rank self-pruning; a client keeps the fewest leading slots whose
        discarded tail energy is at most this fraction of its total. None = no pruning.
      path: flexlora: `"auto"`, `"factored"` or `"dense"` SVD.
      total_rank: flexlora: static bound on the sum of the aggregated clients' ranks. None: a
        federated run takes the largest rank sum of a round's clients (`rounds.round_config`),
        `aggregate` the padded C x R.
    """

    method: str = "fedavg"
    max_norm: float | None = None
    norm_weighting: bool = False
    prune_threshold: float | None = None
    path: str = "auto"
    total_rank: int | None = None

    def __post_init__(self):
        if self.method not in available_rules():
            raise ConfigError(
                f"AggregationConfig.method={self.method!r} is not one of "
                f"{', '.join(available_rules())}"
            )
        require_finite(
            "AggregationConfig", max_norm=self.max_norm, prune_threshold=self.prune_threshold
        )
        if self.max_norm is not None and not self.max_norm > 0:
            raise ConfigError(f"AggregationConfig.max_norm must be > 0, got {self.max_norm}")
        takes = rule_options(self.method)
        for name, default in _AGG_DEFAULTS.items():
            if getattr(self, name) != default and name not in takes:
                raise ConfigError(
                    f"AggregationConfig.{name} is not an option of method={self.method!r} "
                    f"(its options: {', '.join(takes) or 'none'})"
                )
        if self.prune_threshold is not None and not 0 <= self.prune_threshold < 1:
            raise ConfigError(
                f"AggregationConfig.prune_threshold must lie in [0, 1), got {self.prune_threshold}"
            )
        if self.total_rank is not None and self.total_rank < 1:
            raise ConfigError(f"AggregationConfig.total_rank must be >= 1, got {self.total_rank}")
        self.rule()  # a rule's own checks (flexlora's path) fail here, not inside a jit

    @classmethod
    def from_string(cls, method: str) -> AggregationConfig:
        """The method's config with default options: how a command line names a rule in a list
        (`fed.baselines=fedit,flexlora`)."""
        return cls(method=method.strip())

    @property
    def options(self) -> dict:
        """The rule options the method takes (screening's `max_norm` is not one)."""
        return {name: getattr(self, name) for name in rule_options(self.method)}

    def rule(self) -> Rule:
        return make_rule(self.method, **self.options)


DP_METHODS = ("fedavg", "fedit", "ffa")  # rules whose global adapter is an average of factors
DP_SAMPLING = ("fixed", "poisson")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPConfig:
    """Client-level differential privacy of the federated rounds (DP-FedAvg; `federated.dp`).

    Off by default; on with `enabled=True` (`fed.dp.enabled=true` on the command line: a field
    that is None cannot be built by overrides, so DP is a flag on a config that always exists).
    Each sampled client's change of its trained LoRA factors is clipped to `clip_norm` (L2 over
    the whole tree), the clipped changes of a cluster are summed, Gaussian noise of std
    `noise_multiplier * clip_norm` is added, and the sum is divided by the cluster's expected
    number of sampled clients. Only `DP_METHODS` take it.

    Attributes:
      enabled: run the rounds with DP; when False the other fields are ignored.
      clip_norm: S > 0, the bound on one client's update (L2 norm of its change of A and B).
      noise_multiplier: σ >= 0; the noise std on each cluster's sum is σ·S (0: clipping only,
        no privacy, ε = inf).
      delta: δ in (0, 1) at which ε is reported; take it below 1 / num_clients.
      sampling: how ε is accounted (`dp.epsilon`): `"fixed"` (the round's own sampler, C of N
        without replacement, replace-one adjacency) or `"poisson"` (each client independently
        with q = C / N, add-or-remove adjacency: the approximation DP-FedAvg papers report).
    """

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    sampling: str = "fixed"

    def __post_init__(self):
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"DPConfig.clip_norm must be finite and > 0, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(
                f"DPConfig.noise_multiplier must be finite and >= 0, got {self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"DPConfig.delta must lie in (0, 1), got {self.delta}")
        if self.sampling not in DP_SAMPLING:
            raise ConfigError(
                f"DPConfig.sampling={self.sampling!r} is not one of {', '.join(DP_SAMPLING)}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedConfig:
    """A federated LoRA training run.

    Attributes:
      num_rounds: rounds to run.
      clients_per_round: C clients sampled (without replacement) each round.
      local_steps: S optimizer steps per client per round.
      batch_size: B examples per step.
      seq_len: T; client data must have this sequence length. None takes the client data's
        length (a caller that pads its own examples, such as the demo).
      lr, weight_decay, optimizer: the client optimizer (`adamw`, `adam`, `sgd`), fresh per round.
      max_grad_norm: clip each step's gradient to this global norm; None = no clipping.
      lora: the adapters: `max_rank` (or `rank` when it is None) is the padded rank R every
        client shares; `rank` is a client's rank when the run is given none; alpha, rslora,
        targets and layers as in `LoRAConfig` (each client's scale uses its true rank).
      agg: the aggregation rule and its options.
      client_chunk: 0 vmaps all sampled clients; k > 0 trains k at a time (`lax.map`); None
        picks by backend: 1 on a CPU, 0 on a GPU or TPU (`client.default_client_chunk`);
        `"auto"` picks from the compiled program's memory (`client.auto_client_chunk`).
      seed: seeds the server key: every random choice derives from it and the round index.
      checkpoint_every: save the server state every this many rounds (and at the end).
      max_update_norm: screening: drop a client whose adapter moved more than this (Frobenius
        norm of the change of its trainable tree); None = no limit.
      eval_batch_size: rows of each sampled client's eval split scored after aggregation.
      max_to_keep: checkpoints kept on disk.
      clustering: `"none"` (one global adapter), `"updates"` (Floe's task clustering: before
        round 0 every client trains once from a shared fresh adapter and the server clusters
        the updates by cosine similarity of their ΔW, see `cluster.cluster_by_updates`), or
        `"given"` (the caller passes `assignment`, e.g. task labels).
      num_clusters: K for `"updates"`; None picks K by silhouette (`cluster.cluster_clients`).
      cluster_method: `"spectral"` (k-means on a spectral embedding) or `"agglomerative"`.
      dp: client-level differential privacy of the rounds (off unless `dp.enabled`).
    """

    num_rounds: int = 10
    clients_per_round: int = 8
    local_steps: int = 4
    batch_size: int = 8
    seq_len: int | None = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    max_grad_norm: float | None = None
    lora: LoRAConfig = LoRAConfig(rank=32, alpha=16.0)
    agg: AggregationConfig = AggregationConfig()
    client_chunk: int | str | None = None  # by backend, or "auto"; see local_update_clients
    seed: int = 0
    checkpoint_every: int = 1
    max_update_norm: float | None = None
    eval_batch_size: int = 8
    max_to_keep: int = 2
    clustering: str = "none"
    num_clusters: int | None = None
    cluster_method: str = "spectral"
    dp: DPConfig = DPConfig()

    def __post_init__(self):
        for name in (
            "num_rounds",
            "clients_per_round",
            "local_steps",
            "batch_size",
            "checkpoint_every",
            "eval_batch_size",
            "max_to_keep",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"FedConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"FedConfig.seq_len must be >= 1 or None, got {self.seq_len}")
        if self.clustering not in ("none", "updates", "given"):
            raise ConfigError(
                f"FedConfig.clustering={self.clustering!r} is not one of none, updates, given"
            )
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ConfigError(f"FedConfig.num_clusters must be >= 1, got {self.num_clusters}")
        if (
            self.client_chunk is not None
            and self.client_chunk != "auto"
            and (not isinstance(self.client_chunk, int) or self.client_chunk < 0)
        ):
            raise ConfigError(
                f"FedConfig.client_chunk must be an int >= 0, 'auto' or None, got "
                f"{self.client_chunk!r}"
            )
        require_finite(
            "FedConfig",
            lr=self.lr,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            max_update_norm=self.max_update_norm,
        )
        if self.lr <= 0:
            raise ConfigError(f"FedConfig.lr must be > 0, got {self.lr}")
        if self.max_update_norm is not None and self.max_update_norm <= 0:
            raise ConfigError(f"FedConfig.max_update_norm must be > 0, got {self.max_update_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"FedConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"FedConfig.max_grad_norm must be > 0, got {self.max_grad_norm}")
        make_optimizer(self.optimizer, lr=self.lr)  # raises on an unknown name
        if self.dp.enabled and self.agg.method not in DP_METHODS:
            raise ConfigError(
                f"FedConfig.dp is enabled but FedConfig.agg.method={self.agg.method!r} does not "
                f"average factors; DP rounds take {', '.join(DP_METHODS)}"
            )

    @property
    def max_rank(self) -> int:
        """R, the padded rank every client's adapter shares."""
        return self.lora.padded_rank

    @property
    def opt(self):
        return make_optimizer(
            self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )
