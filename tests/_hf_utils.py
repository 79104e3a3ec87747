"""Tiny random Hugging Face checkpoints and adapters, made locally with transformers + torch.

Weights are drawn at scales that make activations and logits O(1) (embeddings N(0, 1), linear
weights N(0, 1/d_in), norms 1 + N(0, 0.1^2), biases N(0, 0.1^2)), so an absolute tolerance on the
logits is a meaningful test, unlike with Hugging Face's N(0, 0.02) init.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import floe_jax.hf as hf
from floe_jax.model import forward as _forward
from floe_jax.model import unstack_layers

# Logits parity tolerance, float32 at highest matmul precision (tests/conftest.py).
ATOL = 1e-4
# jitted once per (config, shapes): eager calls would recompile the layer scan on every call
forward = jax.jit(_forward, static_argnames="cfg")

# Parity cases: (id, model_type, HF config kwargs). Each names what it exercises.
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
CASES = {
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mqa-tied": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    ),
    "llama-mha-bias-theta": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    ),
    "llama-headdim16": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "llama-rope-linear": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        ),
    ),
    "llama-rope-llama3": (
        "llama",
        dict(
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2-gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-mqa-tied-theta": (
        "qwen2",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
}


# The newer families, each with what sets it apart; every sliding window is shorter than the
# test sequences (11 tokens and more), and head dims differ from hidden_size / heads where the
# family allows it. Kept apart from CASES, whose tests assume one RoPE for every layer.
FAMILY_CASES = {
    "qwen3-window-headdim16": (
        "qwen3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,  # layer 0 full, layer 1 sliding
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "mistral-window5-headdim16": (
        "mistral",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5),
    ),
    "gemma3-interleaved": (
        "gemma3_text",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
    "phi3-fused-window6": (
        "phi3",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=6, pad_token_id=0),
    ),
    # Phi-4-mini's RoPE: 3/4 of each head rotated, longrope factors that switch from short to
    # long once a forward's sequence passes original_max_position_embeddings=8 (factor 64/8:
    # cos and sin scaled by sqrt(2)); tied embeddings, GQA.
    "phi4mini-partial-longrope": (
        "phi3",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            partial_rotary_factor=0.75,  # head_dim 16: 12 dims rotated, 6 factors
            max_position_embeddings=64,
            original_max_position_embeddings=8,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.05, 1.3, 1.8, 2.5, 3.0],
                "long_factor": [1.0, 1.6, 3.5, 9.0, 20.0, 41.0],
            },
            sliding_window=6,
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
    "smollm3-nope-window4": (
        "smollm3",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            no_rope_layer_interval=2,  # layer 1 has no RoPE, and slides
            use_sliding_window=True,
            sliding_window=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}
_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
    "gemma3_text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
    "smollm3": "SmolLM3Config",
}


def hf_config(case: str, overrides: dict | None = None) -> transformers.PreTrainedConfig:
    """The case's config; `overrides` replace its fields (a tokenizer's vocab_size, say)."""
    model_type, kw = CASES[case] if case in CASES else FAMILY_CASES[case]
    cls = getattr(transformers, _CONFIG_CLASSES[model_type])
    return cls(
        **{**BASE, **kw, **(overrides or {})}, rms_norm_eps=1e-5, attn_implementation="eager"
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraws every parameter in place at O(1) activation scales (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * z)
            elif name.endswith("bias"):
                p.copy_(0.1 * z)
            elif "embed_tokens" in name:
                p.copy_(z)
            else:  # Linear weight [out, in]
                p.copy_(z / np.sqrt(p.shape[1]))
    return model


def make_hf_model(
    case: str, seed: int = 0, overrides: dict | None = None
) -> transformers.PreTrainedModel:
    """A random float32 `*ForCausalLM` in eval mode with eager attention."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(case, overrides), attn_implementation="eager", dtype=torch.float32
    )
    return randomize_(model, seed).eval()


def save_hf_model(
    case: str, path, seed: int = 0, overrides: dict | None = None, **save_kw
) -> transformers.PreTrainedModel:
    model = make_hf_model(case, seed, overrides)
    model.save_pretrained(path, **save_kw)
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [B, T, V] from a PyTorch model; with a left-padding `mask`, position ids count real
    tokens only (as `generate` does)."""
    ids = torch.as_tensor(np.array(tokens), dtype=torch.long)
    kw = {}
    if mask is not None:
        m = torch.as_tensor(np.array(mask), dtype=torch.long)
        kw = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float().numpy()


def random_params(cfg, seed: int = 0) -> dict:
    """floe params for `cfg` drawn with numpy at the same O(1) scales as `randomize_` (biases
    and norms included); no JAX compilation, unlike `init_params`."""
    from floe_jax.model import param_shapes

    rng = np.random.default_rng(seed)

    def draw(path, shape):
        key = path[-1].key
        z = rng.standard_normal(shape).astype(np.float32)
        if "norm" in key:
            z = 1.0 + 0.1 * z
        elif key == "b":
            z = 0.1 * z
        elif key != "embed":
            z = z / np.sqrt(shape[-2])  # weights [.., in, out]
        return jnp.asarray(z, jnp.dtype(cfg.dtype))

    return jax.tree_util.tree_map_with_path(
        draw, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )


def random_tokens(cfg_or_vocab, b: int = 2, t: int = 11, seed: int = 0) -> np.ndarray:
    """int32 [b, t] uniform over the vocabulary (of a `ModelConfig`, or a size)."""
    v = cfg_or_vocab if isinstance(cfg_or_vocab, int) else cfg_or_vocab.vocab_size
    return np.random.default_rng(seed).integers(0, v, (b, t)).astype(np.int32)


def load_hf_model(folder) -> transformers.PreTrainedModel:
    """`AutoModelForCausalLM` from a local folder, eager attention, eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()


def assert_logits_match_hf(params, cfg, model, tokens, mask=None, *, lora=None) -> np.ndarray:
    """floe's logits equal the PyTorch model's within `ATOL` (with a left-padding `mask`: at
    real tokens). The reference must reach |logit| > 1, so the tolerance means something.
    Returns floe's logits."""
    want = hf_logits(model, tokens, mask)
    assert np.abs(want).max() > 1.0
    m = None if mask is None else jnp.asarray(mask)
    got = np.asarray(forward(params, jnp.asarray(tokens), cfg, lora=lora, mask=m))
    real = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask) > 0
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
    return got


def assert_save_hf_loads_in_transformers(case: str, path, seed: int = 5):
    """floe params (random, biases included) of `case` -> `save_hf` -> `AutoModelForCausalLM`:
    the same logits; `load_hf` gives the config and params back; the decode layout
    (`unstack_layers`: per-layer, q/k/v and gate/up fused) saves the same checkpoint."""
    cfg = hf.config_from_hf(hf_config(case).to_dict())
    params = random_params(cfg, seed=seed)
    hf.save_hf(cfg, params, path)
    model = load_hf_model(path)
    assert model.dtype == torch.float32
    assert_logits_match_hf(params, cfg, model, random_tokens(cfg, seed=seed + 1))
    cfg2, params2 = hf.load_hf(path)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)
    hf.save_hf(cfg, unstack_layers(params), path / "decode")
    chex.assert_trees_all_equal(hf.load_hf(path / "decode")[1], params)
