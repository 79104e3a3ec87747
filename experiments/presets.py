"""Named presets of the embedded demo: frozen dataclasses in code, `key=value` overrides.

`get_preset("default", ["cloud.num_layers=6", "bench.seed=3"])` returns the preset with the
overrides applied by `floe_jax.overrides.apply_overrides` (dotted keys reach nested configs; an
unknown key or a value of the wrong type raises `ConfigError` naming it).

Sizes of `default` are what the benchmark needs: the cloud must learn its facts and the edge to
copy card values in pretraining. The cloud learns its facts in 650 steps at lr 6e-3 (twice the
edge's); the edge takes 1200 steps of 12 sequences at 3e-3 (with 800 steps of 16 at 6e-3, or
8 sequences a step, it copies card values far less).
The measurements and the run time on a 2-core CPU are in REPRODUCTION.md. `smoke` runs in
seconds for CI. The real-model presets (`qwen`) are in `experiments.real_presets`; `get_preset`
knows both.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from floe_jax.config import ConfigError, LoRAConfig, ModelConfig, require_finite
from floe_jax.data.benchmark import BenchmarkConfig
from floe_jax.federated.config import DP_METHODS, AggregationConfig, DPConfig, FedConfig
from floe_jax.inference.fused import FusedDecodeConfig
from floe_jax.inference.privacy import PrivacyPolicy
from floe_jax.inference.router import FusionConfig
from floe_jax.overrides import apply_overrides
from floe_jax.pretrain import PretrainConfig

if TYPE_CHECKING:
    from experiments.real_presets import RealPreset

VOCAB_SIZE = 768  # the edge tokenizer's
# The cloud's own tokenizer (alignment maps it onto the edge's), larger than the edge's as a real
# cloud's is: every capital and currency is one token in both, so a fact the cloud knows is one
# aligned token. With 640 the cloud spelt most capitals in pieces (` P` `anbas`) that the edge's
# whole-word tokens cannot take up, and fusion stalled mid-word (alignment maps tokens, not words).
CLOUD_VOCAB_SIZE = 1024
FLOE = "floe"  # the name of Floe's run beside the baselines'
FLOE_DP = "floe-dp"  # Floe's run with client-level differential privacy (`DemoFed.dp`)
LOCAL = "local"  # every client trains alone (its own cluster): the local-only baseline
CENTRAL = "centralized"  # one adapter per task family on its clients' data pooled: not private
CLOUD_BACKENDS = ("http", "local")


def _model(
    layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int = VOCAB_SIZE
) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A centralized LoRA fine-tune (the calibration check; the federated loop has its own)."""

    lora: LoRAConfig = LoRAConfig(rank=16, alpha=32.0)
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0


DEMO_ROUNDS = FedConfig(
    num_rounds=8,
    clients_per_round=6,
    local_steps=8,
    batch_size=8,
    seq_len=None,  # the demo pads to its longest example (`experiments.demo.setup.private_data`)
    lr=3e-3,
    lora=LoRAConfig(rank=16, alpha=32.0),
    agg=AggregationConfig(method="hetlora"),
    clustering="updates",
    checkpoint_every=8,
    max_to_keep=1,
)
"""Floe's rounds in the demo: update-based task clustering, HetLoRA's zero-padded average inside
each cluster."""

BASELINES = (
    AggregationConfig(method="fedit"),
    AggregationConfig(method="hetlora", norm_weighting=True, prune_threshold=0.05),
    AggregationConfig(method="flexlora"),
)
"""The unclustered rules the demo trains beside Floe. HetLoRA runs with its norm weighting and rank
self-pruning on: a client drops the trailing slots that hold at most 5% of its update's energy,
which on the default demo does lower the ranks (the report's client table shows the ranks each
run ends with)."""


def baseline_name(agg: AggregationConfig) -> str:
    """A run's name for an aggregation config: the method, then each option set away from its
    default (`hetlora-norm_weighting-prune_threshold0.05`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(AggregationConfig)}
    parts = [agg.method]
    for name in ("max_norm", *agg.options):
        value = getattr(agg, name)
        if value != defaults[name]:
            parts.append(name if value is True else f"{name}{value}")
    return "-".join(parts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoFed:
    """Federated LoRA rounds of the demo: Floe's run and one run per baseline rule, with the same
    data and ranks.

    Attributes:
      rounds: Floe's rounds (`FedConfig`: sizes, adapters, Floe's rule inside each cluster,
        clustering). `seq_len=None` lets the demo pad examples to the longest one.
      rank_candidates: ranks a device may get (`floe_jax.devices.assign_ranks`); the largest must
        fit `rounds.lora`'s padded rank.
      devices: catalog profiles cycled over the clients (one per client).
      deadline_ms: per-token decode deadline the devices' ranks must meet.
      baselines: the unclustered rules trained beside Floe; each runs `rounds` with
        `agg=<baseline>, clustering="none"` and is named by `baseline_name`.
      known_k: Floe's K is the number of task families; False (default) leaves it to
        `rounds.num_clusters` (None: picked from the data by silhouette).
      local: also train the local-only baseline (`LOCAL`: each client its own cluster).
      centralized: also train the non-private upper bound (`CENTRAL`): one adapter per task
        family on the pooled data of the family's clients (a server that sees every example and
        knows which client, and so which task, it came from), at the largest rank, each family
        taking `num_clients // num_tasks` times the local steps (its clients' steps together
        when the families are of one size, as the embedded benchmark's are).
      dp: with `dp.enabled`, one more run (`FLOE_DP`): Floe's rounds with client-level
        differential privacy (`FedConfig.dp`), FedIT inside each cluster when Floe's rule takes no
        DP (`DP_METHODS`); it is evaluated beside Floe, so the report shows DP's accuracy cost
        and its ε. Off by default (`fed.dp.enabled=true fed.dp.noise_multiplier=...`).
    """

    rounds: FedConfig = DEMO_ROUNDS
    rank_candidates: tuple[int, ...] = (4, 8, 16)
    devices: tuple[str, ...] = (
        "jetson-orin-nano-8gb",
        "raspberry-pi-5-8gb",
        "apple-a17-pro",
        "ryzen-7-7840u",
    )
    deadline_ms: float = 100.0
    baselines: tuple[AggregationConfig, ...] = BASELINES
    known_k: bool = False
    local: bool = True
    centralized: bool = True
    dp: DPConfig = DPConfig()

    def __post_init__(self):
        R = self.rounds.max_rank
        if (
            not self.rank_candidates
            or not 1 <= min(self.rank_candidates) <= max(self.rank_candidates) <= R
        ):
            raise ConfigError(
                f"fed.rank_candidates={self.rank_candidates} must be non-empty, each in "
                f"[1, fed.rounds.lora's padded rank {R}]"
            )
        if not self.devices:
            raise ConfigError("fed.devices must name at least one catalog device")
        if self.deadline_ms <= 0:
            raise ConfigError(f"fed.deadline_ms must be > 0, got {self.deadline_ms}")
        if self.rounds.dp.enabled:
            raise ConfigError(
                "fed.rounds.dp is not how the demo takes DP (every run would inherit it): set "
                "fed.dp.enabled=true, which adds a Floe run with DP beside the others"
            )
        names = self.baseline_runs()
        if len(set(names)) != len(names) or {FLOE, FLOE_DP, LOCAL, CENTRAL} & set(names):
            raise ConfigError(
                f"fed.baselines must have distinct names other than {FLOE}, {FLOE_DP}, {LOCAL} "
                f"and {CENTRAL}: {names}"
            )

    def baseline_runs(self) -> list[str]:
        """The run names of the unclustered baselines (`baseline_name` of each rule)."""
        return [baseline_name(b) for b in self.baselines]

    def runs(self, num_tasks: int, num_clients: int) -> dict[str, FedConfig]:
        """The `FedConfig` of every compared run by name: Floe's, each baseline's, the local-only
        and centralized ones. The local-only run takes `clustering="given"` (each client its own
        cluster, passed by the caller); so does the centralized one, whose clients are the
        `num_tasks` task families, each holding its clients' pooled data and taking
        `num_clients // num_tasks` times the local steps (one number for every family: its
        clients' steps together when the families are of one size)."""
        k = num_tasks if self.known_k else self.rounds.num_clusters
        out = {FLOE: dataclasses.replace(self.rounds, num_clusters=k)}
        for b in self.baselines:
            out[baseline_name(b)] = dataclasses.replace(
                self.rounds, agg=b, clustering="none", num_clusters=None
            )
        plain = AggregationConfig(method="fedit")
        if self.local:
            out[LOCAL] = dataclasses.replace(
                self.rounds, agg=plain, clustering="given", num_clusters=None
            )
        if self.centralized:
            out[CENTRAL] = dataclasses.replace(
                self.rounds, agg=plain, clustering="given", num_clusters=None,
                clients_per_round=num_tasks,
                local_steps=self.rounds.local_steps * max(1, num_clients // num_tasks),
            )  # fmt: skip
        if self.dp.enabled:
            floe = out[FLOE]
            agg = floe.agg if floe.agg.method in DP_METHODS else AggregationConfig(method="fedit")
            out[FLOE_DP] = dataclasses.replace(floe, agg=agg, dp=self.dp)
        return out


DEMO_DECODE = FusedDecodeConfig(
    max_new_tokens=32, deadline_s=0.25, fusion=FusionConfig(gate="edge")
)
"""How the demo decodes (the eos and pad ids come from the tokenizer at run time). The router is
the edge-certainty gate: on the embedded benchmark the cloud answers the redacted prompts
confidently where it cannot know (the app formats), so the two-sided entropy gate hands it those
tokens; it runs beside Floe as the `floe-gate-entropy` ablation."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoEval:
    """Inference settings of the demo's evaluation.

    Attributes:
      decode: fused decoding (`FusedDecodeConfig`: max_new_tokens, Floe's deadline `deadline_s`
        (a later cloud reply is not used: the edge decodes alone), the router in `fusion`).
      rtt_ms, sigma: the simulated network (lognormal round trip with mean `rtt_ms`).
      policy: the privacy guard of every method that reaches the cloud (`PrivacyPolicy`): its
        `action` on a request with private spans is `redact` (send it with placeholders) or
        `edge_only` (send nothing: the edge decodes that request alone); `placeholder`,
        `pending` and `region` as the library's. `pending="edge"` (default): while a private
        span may still be under way the edge decides the token (the cloud, shown the text
        without that tail, would answer for an earlier position). The cloud-only rows take the
        policy with action `redact` and `pending="redact"` (theirs must reach the cloud) and,
        for the privacy-violating reference, `allow`.
      latency_queries: queries decoded one at a time (batch 1) for the per-token latency, the
        same number of each query type.
      speculate: Floe's latency queries are also decoded with speculative fused decoding, one
        cloud call per draft of up to this many edge tokens (`FusedDecodeConfig.speculate`; 0:
        not measured). The accuracy rows decode token by token.
      ablations: also run Floe without the deadline.
      oracle: also run the token oracle (the ceiling of any token-level mixer).
      cloud: `http` (default: the run starts `serve-cloud` on a loopback port and reaches it with
        `HTTPCloud`, top-k log-probs by token string) or `local` (the same top-k back end
        in-process, for tests and speed).
      server_ms: the cloud's compute time per request as the simulated network charges it (a
        fixed figure keeps the deadline's decisions independent of the machine's load).
      extraction: measure what each run's cluster peers can read out of the adapter they
        download about a client's private contacts (`floe_jax.federated.extraction`; the
        embedded benchmark only).
    """

    decode: FusedDecodeConfig = DEMO_DECODE
    rtt_ms: float = 150.0
    sigma: float = 0.25
    policy: PrivacyPolicy = PrivacyPolicy(action="redact", pending="edge")
    latency_queries: int = 9
    speculate: int = 8
    ablations: bool = True
    oracle: bool = True
    extraction: bool = True
    cloud: str = "http"
    server_ms: float = 20.0

    def __post_init__(self):
        require_finite("eval", rtt_ms=self.rtt_ms, sigma=self.sigma, server_ms=self.server_ms)
        if self.cloud not in CLOUD_BACKENDS:
            raise ConfigError(f"eval.cloud={self.cloud!r} is not one of {CLOUD_BACKENDS}")
        if self.server_ms < 0:
            raise ConfigError(f"eval.server_ms must be >= 0, got {self.server_ms}")
        if self.rtt_ms < 0 or self.sigma < 0:
            raise ConfigError(
                f"eval.rtt_ms and eval.sigma must be >= 0, got {self.rtt_ms}, {self.sigma}"
            )
        if self.policy.action not in ("redact", "edge_only"):
            raise ConfigError(
                f"eval.policy.action must be redact or edge_only (the guarded methods' guard), "
                f"got {self.policy.action!r}"
            )
        if self.speculate < 0:
            raise ConfigError(f"eval.speculate must be >= 0, got {self.speculate}")
        if self.latency_queries < 0:
            raise ConfigError(f"eval.latency_queries must be >= 0, got {self.latency_queries}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoPreset:
    """Everything the embedded demo is sized by.

    Attributes:
      name: the preset's name (recorded in run folders).
      bench: benchmark sizes and seed.
      vocab_size: BPE vocabulary of the edge's locally trained tokenizer (= `edge.vocab_size`).
      cloud_vocab_size: the cloud's own tokenizer's (= `cloud.vocab_size`).
      edge: the edge base model (small).
      cloud: the cloud model (larger; sees the whole public corpus).
      edge_pretrain, cloud_pretrain: pretraining of each.
      finetune: the centralized LoRA check of the edge model.
      fed: the federated rounds (`demo`, `federate`).
      eval: the evaluation (`demo`, `evaluate`).
      cache_dir: where pretrained models and the tokenizer are cached.
    """

    name: str
    bench: BenchmarkConfig
    vocab_size: int = VOCAB_SIZE
    cloud_vocab_size: int = CLOUD_VOCAB_SIZE
    edge: ModelConfig
    cloud: ModelConfig
    edge_pretrain: PretrainConfig
    cloud_pretrain: PretrainConfig
    finetune: FinetuneConfig = FinetuneConfig()
    fed: DemoFed = DemoFed()
    eval: DemoEval = DemoEval()
    cache_dir: str = ".cache/floe_jax"

    def __post_init__(self):
        for which, field in (("edge", "vocab_size"), ("cloud", "cloud_vocab_size")):
            m, v = getattr(self, which), getattr(self, field)
            if m.vocab_size != v:
                raise ConfigError(
                    f"{which}.vocab_size={m.vocab_size} differs from {field}={v} (the size of "
                    f"the {which}'s tokenizer)"
                )


PRESETS: dict[str, DemoPreset] = {
    "default": DemoPreset(
        name="default",
        bench=BenchmarkConfig(),
        edge=_model(layers=3, hidden=128, heads=4, kv_heads=2, ffn=320),
        cloud=_model(layers=4, hidden=160, heads=4, kv_heads=2, ffn=448, vocab=CLOUD_VOCAB_SIZE),
        edge_pretrain=PretrainConfig(steps=1200, batch_size=12, seq_len=128, lr=3e-3),
        cloud_pretrain=PretrainConfig(steps=650, batch_size=16, seq_len=128, lr=6e-3),
    ),
    "smoke": DemoPreset(
        name="smoke",
        bench=BenchmarkConfig(
            num_countries=6,
            public_repeats=2,
            num_clients=3,
            contacts_per_client=2,
            test_contacts_per_client=1,
            examples_per_client=6,
            queries_per_type=3,
            format_samples=8,
        ),
        vocab_size=320,
        cloud_vocab_size=300,
        edge=dataclasses.replace(
            _model(layers=1, hidden=32, heads=2, kv_heads=1, ffn=64), vocab_size=320
        ),
        cloud=dataclasses.replace(
            _model(layers=2, hidden=32, heads=2, kv_heads=1, ffn=64), vocab_size=300
        ),
        edge_pretrain=PretrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1),
        cloud_pretrain=PretrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1),
        finetune=FinetuneConfig(steps=4, batch_size=2),
        fed=DemoFed(
            rounds=dataclasses.replace(
                DEMO_ROUNDS,
                num_rounds=2,
                clients_per_round=3,
                local_steps=2,
                batch_size=2,
                lora=LoRAConfig(rank=4, alpha=32.0),
                checkpoint_every=2,
            ),
            rank_candidates=(2, 4),
            baselines=(AggregationConfig(method="fedit"),),
        ),  # fmt: skip
        eval=DemoEval(
            decode=dataclasses.replace(DEMO_DECODE, max_new_tokens=8),
            latency_queries=1,
            ablations=False,
        ),
    ),
}


def get_preset(
    name: str = "default", overrides: list[str] | tuple[str, ...] = ()
) -> DemoPreset | RealPreset:
    """The named preset with `key=value` overrides applied."""
    from experiments.real_presets import REAL_PRESETS  # it builds on this module's configs

    known = {**PRESETS, **REAL_PRESETS}
    if name not in known:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(known)}")
    return apply_overrides(known[name], list(overrides))
