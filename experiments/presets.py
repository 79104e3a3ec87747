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
    ),
}


def get_preset(name: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> DemoPreset:
    """The named preset with `key=value` overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[name], list(overrides))
