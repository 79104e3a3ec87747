"""Named presets of the embedded demo: frozen dataclasses in code, `key=value` overrides.

`get_preset("default", ["cloud.num_layers=6", "bench.seed=3"])` returns the preset with the
overrides applied by `floe_jax.config.apply_overrides` (dotted keys reach nested configs; an
unknown key or a value of the wrong type raises `ConfigError` naming it).

Sizes of `default` are chosen so the whole demo fits in about 10 minutes on a 2-core CPU, its
pretraining part (both models) in about 4; `smoke` runs in seconds for CI.
"""

from __future__ import annotations

import dataclasses

from floe_jax.config import ConfigError, LoRAConfig, ModelConfig, apply_overrides
from floe_jax.data.benchmark import BenchmarkConfig
from floe_jax.pretrain import PretrainConfig

VOCAB_SIZE = 768


def _model(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB_SIZE,
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoFed:
    """Federated LoRA rounds of the demo (one run per compared rule, same data and ranks).

    Attributes:
      num_rounds, clients_per_round, local_steps, batch_size, lr: the rounds.
      seq_len: padded example length (0: the longest private example, rounded up to 16).
      lora_rank: the largest (padded) rank; lora_alpha: the scale numerator.
      rank_candidates: ranks a device may get (`floe_jax.devices.assign_ranks`).
      devices: catalog profiles cycled over the clients (one per client).
      deadline_ms: per-token decode deadline the devices' ranks must meet.
      num_clusters: Floe's K (0: the number of task families).
      rules: the unclustered baselines trained besides Floe (aggregation rule names).
      floe_rule: the aggregation rule inside each of Floe's clusters.
      client_chunk: clients trained at once (`FedConfig.client_chunk`; none: 1 on a CPU, all
        of them vmapped on a GPU or TPU).
      seed: seeds every round.
    """

    num_rounds: int = 8
    clients_per_round: int = 6
    local_steps: int = 8
    batch_size: int = 8
    lr: float = 3e-3
    seq_len: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    rank_candidates: tuple[int, ...] = (4, 8, 16)
    devices: tuple[str, ...] = (
        "jetson-orin-nano-8gb",
        "raspberry-pi-5-8gb",
        "apple-a17-pro",
        "ryzen-7-7840u",
    )
    deadline_ms: float = 100.0
    num_clusters: int = 0
    rules: tuple[str, ...] = ("fedit", "hetlora", "flexlora")
    floe_rule: str = "hetlora"
    client_chunk: int | None = None
    seed: int = 0

    def __post_init__(self):
        from floe_jax.federated.aggregate import available_rules

        for r in (*self.rules, self.floe_rule):
            if r not in available_rules():
                raise ConfigError(
                    f"fed: unknown aggregation rule {r!r}; known: {available_rules()}"
                )
        if not self.rank_candidates or max(self.rank_candidates) > self.lora_rank:
            raise ConfigError(
                f"fed.rank_candidates={self.rank_candidates} must be non-empty and <= lora_rank"
            )
        if not self.devices:
            raise ConfigError("fed.devices must name at least one catalog device")
        if self.num_clusters < 0:
            raise ConfigError(f"fed.num_clusters must be >= 0, got {self.num_clusters}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoEval:
    """Inference settings of the demo's evaluation.

    Attributes:
      rtt_ms, sigma: the simulated network (lognormal round trip with mean `rtt_ms`).
      tau_ms: Floe's per-token deadline (a later cloud reply is not used: the edge decodes alone).
      gate, temperature, space: the router (`floe_jax.inference.FusionConfig`).
      privacy: the detector's action on a request with private spans: `redact` (send it with
        placeholders) or `edge_only` (send nothing: the edge decodes that request alone).
      placeholder: how the privacy detector redacts a span (`{kind}` is its type).
      latency_queries: queries decoded one at a time (batch 1) for the per-token latency, the
        same number of each query type.
      ablations: also run Floe with fixed w=0.5 and without the deadline.
    """

    rtt_ms: float = 150.0
    sigma: float = 0.25
    tau_ms: float = 250.0
    gate: str = "entropy"
    temperature: float = 1.0
    space: str = "prob"
    privacy: str = "edge_only"
    placeholder: str = "[{kind}]"
    latency_queries: int = 9
    ablations: bool = True

    def __post_init__(self):
        if self.rtt_ms < 0 or self.tau_ms <= 0:
            raise ConfigError("eval.rtt_ms must be >= 0 and eval.tau_ms > 0")
        if self.privacy not in ("redact", "edge_only"):
            raise ConfigError(f"eval.privacy must be redact or edge_only, got {self.privacy!r}")
        if self.latency_queries < 0:
            raise ConfigError(f"eval.latency_queries must be >= 0, got {self.latency_queries}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoPreset:
    """Everything the embedded demo is sized by.

    Attributes:
      name: the preset's name (recorded in run folders).
      bench: benchmark sizes and seed.
      vocab_size: BPE vocabulary of the locally trained tokenizer (= both models' vocab_size).
      edge: the edge base model (small).
      cloud: the cloud model (larger; sees the whole public corpus).
      edge_pretrain, cloud_pretrain: pretraining of each.
      finetune: the centralized LoRA check of the edge model.
      max_new_tokens: generation budget per query (the longest answer fits).
      fed: the federated rounds (`demo`, `federate`).
      eval: the evaluation (`demo`, `evaluate`).
      cache_dir: where pretrained models and the tokenizer are cached.
    """

    name: str
    bench: BenchmarkConfig
    vocab_size: int = VOCAB_SIZE
    edge: ModelConfig
    cloud: ModelConfig
    edge_pretrain: PretrainConfig
    cloud_pretrain: PretrainConfig
    finetune: FinetuneConfig = FinetuneConfig()
    max_new_tokens: int = 32
    fed: DemoFed = DemoFed()
    eval: DemoEval = DemoEval()
    cache_dir: str = ".cache/floe_jax"

    def __post_init__(self):
        for which in ("edge", "cloud"):
            m = getattr(self, which)
            if m.vocab_size != self.vocab_size:
                raise ConfigError(
                    f"{which}.vocab_size={m.vocab_size} differs from vocab_size={self.vocab_size}"
                    " (both models share the benchmark tokenizer)"
                )
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


PRESETS: dict[str, DemoPreset] = {
    "default": DemoPreset(
        name="default",
        bench=BenchmarkConfig(),
        edge=_model(layers=2, hidden=96, heads=4, kv_heads=2, ffn=256),
        cloud=_model(layers=4, hidden=160, heads=4, kv_heads=2, ffn=448),
        edge_pretrain=PretrainConfig(steps=300, batch_size=16, seq_len=128, lr=3e-3),
        cloud_pretrain=PretrainConfig(steps=400, batch_size=16, seq_len=128, lr=3e-3),
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
        edge=dataclasses.replace(
            _model(layers=1, hidden=32, heads=2, kv_heads=1, ffn=64), vocab_size=320
        ),
        cloud=dataclasses.replace(
            _model(layers=2, hidden=32, heads=2, kv_heads=1, ffn=64), vocab_size=320
        ),
        edge_pretrain=PretrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1),
        cloud_pretrain=PretrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1),
        finetune=FinetuneConfig(steps=4, batch_size=2),
        max_new_tokens=8,
        fed=DemoFed(
            num_rounds=2,
            clients_per_round=3,
            local_steps=2,
            batch_size=2,
            lora_rank=4,
            rank_candidates=(2, 4),
            rules=("fedit",),
        ),  # fmt: skip
        eval=DemoEval(latency_queries=1, ablations=False),
    ),
}


def get_preset(
    name: str = "default", overrides: list[str] | tuple[str, ...] = ()
) -> DemoPreset | RealPreset:
    """The named preset with `key=value` overrides applied."""
    known = {**PRESETS, **REAL_PRESETS}
    if name not in known:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(known)}")
    return apply_overrides(known[name], list(overrides))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RealPreset:
    """A real-model run (GPU/TPU): pretrained Hugging Face checkpoints from local folders and an
    instruction dataset with a task-label column, through the same demo code as the embedded
    benchmark (`experiments.demo`). Clients hold one task each (examples of one task label,
    drawn without replacement by `experiments.demo.setup_real`); test queries are held-out
    examples of each client, scored by exact match per task.

    Attributes:
      name: the preset's name.
      edge_path, cloud_path: local HF folders (config.json + safetensors) of the edge SLM and the
        cloud LLM; both must share the tokenizer and vocabulary (one model family).
      tokenizer_path: the tokenizer folder ("" = `edge_path`).
      dataset: a local json/jsonl/csv/parquet file or a `datasets` hub id (already cached).
      prompt_column, response_column, task_column, input_column: its columns ("" = none).
      prompt_format: how an example's prompt is shown to the models (`{prompt}` is replaced).
      num_clients: edge devices; each gets one task.
      examples_per_client, test_per_client: private training examples / held-out test queries.
      max_new_tokens: generation budget per query.
      dtype: parameter dtype of both models.
      fed, eval: as in `DemoPreset`.
      seed: seeds the split.
    """

    name: str
    edge_path: str
    cloud_path: str
    tokenizer_path: str = ""
    dataset: str
    prompt_column: str = "instruction"
    response_column: str = "response"
    task_column: str = "category"
    input_column: str = ""
    prompt_format: str = "{prompt}\nAnswer: "
    num_clients: int = 8
    examples_per_client: int = 64
    test_per_client: int = 8
    max_new_tokens: int = 32
    dtype: str = "bfloat16"
    fed: DemoFed = DemoFed(lora_rank=16, rank_candidates=(4, 8, 16), num_rounds=10)
    eval: DemoEval = DemoEval()
    seed: int = 0

    def __post_init__(self):
        for f in ("num_clients", "examples_per_client", "test_per_client", "max_new_tokens"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f} must be >= 1, got {getattr(self, f)}")
        if "{prompt}" not in self.prompt_format:
            raise ConfigError("prompt_format must contain {prompt}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


# Real-model presets: only the demo commands (`demo`, `federate`, `evaluate`) take them.
REAL_PRESETS: dict[str, RealPreset] = {}
REAL_PRESETS["qwen"] = RealPreset(
    name="qwen",
    edge_path="models/Qwen2.5-0.5B-Instruct",
    cloud_path="models/Qwen2.5-1.5B-Instruct",
    dataset="databricks/databricks-dolly-15k",
    prompt_column="instruction",
    response_column="response",
    task_column="category",
    input_column="context",
)
