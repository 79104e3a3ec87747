"""floe_jax.config: validation names the field; overrides parse by type."""

import dataclasses

import pytest

from floe_jax.config import ConfigError, LoRAConfig, ModelConfig, RopeScaling
from floe_jax.overrides import apply_overrides

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4)


def test_derived_sizes():
    cfg = ModelConfig(**BASE, num_kv_heads=2)
    assert (cfg.dim_head, cfg.q_size, cfg.kv_size) == (8, 32, 16)
    assert cfg.proj_shape("k_proj") == (32, 16) and cfg.proj_shape("down_proj") == (48, 32)
    # per layer: q 32*32, k/v 32*16 each, o 32*32, gate/up 32*48 each, down 48*32, 2 norms of 32
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 32 * 48 * 3 + 2 * 32
    assert cfg.num_params == 2 * per_layer + 2 * 64 * 32 + 32
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    assert cfg.num_params - tied.num_params == 64 * 32
    assert cfg.num_nonembedding_params == tied.num_nonembedding_params == 2 * per_layer + 32


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(dtype="float16"), "dtype"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_model_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**BASE, **change})


def test_rope_and_lora_errors():
    with pytest.raises(ConfigError, match="rope_type"):
        RopeScaling(rope_type="yarn")
    with pytest.raises(ConfigError, match="max_rank"):
        LoRAConfig(rank=8, max_rank=4)
    with pytest.raises(ConfigError, match="target"):
        LoRAConfig(targets=("q", "qkv"))


def test_lora_config_normalises_targets_and_scale():
    c = LoRAConfig(rank=4, alpha=8, targets=("v", "q_proj"), layers=(3, 1, 1))
    assert c.targets == ("q_proj", "v_proj") and c.layers == (1, 3)
    assert c.scale == 2.0 and LoRAConfig(rank=4, alpha=8, rslora=True).scale == 4.0


def test_overrides_parse_by_type():
    cfg = ModelConfig(**BASE)
    out = apply_overrides(
        cfg, ["num_layers=3", "rope_theta=1e5", "tie_word_embeddings=true", "num_kv_heads=none"]
    )
    assert (out.num_layers, out.rope_theta, out.tie_word_embeddings) == (3, 1e5, True)
    lora = apply_overrides(LoRAConfig(), ["targets=q,v", "layers=0,2", "rank=4"])
    assert lora.targets == ("q_proj", "v_proj") and lora.layers == (0, 2) and lora.rank == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("nope=1", "unknown setting 'nope'"),
        ("num_layers=x", "num_layers: expected int"),
        ("tie_word_embeddings=maybe", "boolean"),
        ("num_layers", "key=value"),
        ("dtype=float16", "dtype"),
        ("rope_scaling.factor=2", "has no sub-settings"),
        ("num_layers=2,num_layers=3", "given twice"),
    ],
)
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ModelConfig(**BASE), override.split(","))
