"""floe_jax.hf.config: Hugging Face `config.json` to `ModelConfig` and back."""

import numpy as np
import pytest
import transformers
from transformers.models.llama import modeling_llama

import floe_jax.hf as hf
from floe_jax.config import ModelConfig, RopeScaling
from floe_jax.rope import rope_inv_freq
from tests import _hf_utils as U


def test_legacy_rope_keys_equal_rope_parameters():
    base = {**U.BASE, "num_hidden_layers": 2, "num_attention_heads": 4, "model_type": "llama"}
    new = hf.config_from_hf(
        {**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
    )
    old = hf.config_from_hf(
        {**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert new == old
    assert new.rope_theta == 5e5 and new.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)


def test_transformers4_style_llama3_config():
    """A Llama 3.2-style config.json as transformers 4 wrote it (top-level rope_theta,
    rope_scaling, torch_dtype, a list of EOS ids)."""
    d = {
        **U.BASE,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "torch_dtype": "bfloat16",
        "eos_token_id": [128001, 128008, 128009],
        "bos_token_id": 128000,
        "tie_word_embeddings": True,
    }
    cfg = hf.config_from_hf(d)
    assert cfg.rope_theta == 500000.0 and cfg.dtype == "bfloat16" and cfg.tie_word_embeddings
    assert cfg.rope_scaling == RopeScaling(
        rope_type="llama3", factor=32.0, original_max_position_embeddings=8192
    )
    assert (cfg.bos_token_id, cfg.eos_token_id) == (128000, 128001)
    hc = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    np.testing.assert_allclose(
        rope_inv_freq(cfg), modeling_llama.LlamaRotaryEmbedding(hc).inv_freq.numpy(), rtol=1e-6
    )


def test_error_config_to_hf_unrepresentable_bias():
    cfg = ModelConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, qkv_bias=True
    )
    with pytest.raises(hf.CheckpointError, match="attention_bias"):
        hf.config_to_hf(cfg)


def test_keys_a_config_leaves_out_take_the_family_defaults_of_transformers():
    """A config.json without `sliding_window` (or Gemma 3's `num_key_value_heads`) means what its
    transformers config class defaults to, not full attention or one KV head per query head."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    for model_type, cls in (("mistral", transformers.MistralConfig),
                            ("gemma3_text", transformers.Gemma3TextConfig)):  # fmt: skip
        d = {**base, "model_type": model_type, "head_dim": 8}
        want = cls(**{k: v for k, v in d.items() if k != "model_type"})
        assert hf.config_from_hf(d).sliding_window == want.sliding_window == 4096
    d = {**base, "model_type": "gemma3_text", "head_dim": 8}
    del d["num_key_value_heads"]
    assert hf.config_from_hf(d).kv_heads == transformers.Gemma3TextConfig().num_key_value_heads
    assert hf.config_from_hf(d).kv_heads == 4
