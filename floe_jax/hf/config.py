"""Hugging Face `config.json` to `ModelConfig` and back, for Llama and Qwen2.

Also holds what every `floe_jax.hf` module shares about the Hugging Face layout: the error type
(`CheckpointError`), the JSON reader whose errors name the file, and the module path of each
projection (`model.layers.{i}.self_attn.q_proj`), after which both checkpoint tensors and PEFT
adapter tensors are named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from floe_jax.config import ROPE_TYPES, ConfigError, ModelConfig, RopeScaling

CONFIG_FILE = "config.json"

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# the submodule of a decoder layer that holds each projection
PROJ_SUBMODULE = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


class CheckpointError(ValueError):
    """A checkpoint or adapter folder is unusable; the message names the file, tensor or field."""


def read_json(path: Path) -> dict:
    """The parsed JSON file at `path`; a `CheckpointError` naming it when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def module_name(target: str, layer: int | str) -> str:
    """The Hugging Face module path of projection `target` in decoder layer `layer`, e.g.
    `model.layers.3.self_attn.q_proj`; `layer="{i}"` gives a template to `.format(i=...)`.

    Raises:
      KeyError: `target` is not one of `floe_jax.config.LORA_TARGETS`.
    """
    return f"model.layers.{layer}.{PROJ_SUBMODULE[target]}.{target}"


def _rope_from_hf(d: Mapping, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5 `rope_parameters` or older keys."""
    if d.get("rope_parameters") is not None:
        field, rp = "rope_parameters", dict(d["rope_parameters"])
    elif d.get("rope_scaling") is not None:
        field, rp = "rope_scaling", dict(d["rope_scaling"])
    else:
        field, rp = "rope_parameters", {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: {field}.rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}"
        )
    prf = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise CheckpointError(f"{source}: partial_rotary_factor={prf} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    if "factor" not in rp:
        raise CheckpointError(f"{source}: {field}.factor is missing for rope_type={rope_type!r}")
    kw = {"rope_type": rope_type, "factor": float(rp["factor"])}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rp:
                raise CheckpointError(f"{source}: {field}.{key} is missing for rope_type='llama3'")
        kw["low_freq_factor"] = float(rp["low_freq_factor"])
        kw["high_freq_factor"] = float(rp["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(rp["original_max_position_embeddings"])
    return theta, RopeScaling(**kw)


def _first_id(x):
    """Token ids may be lists (Llama 3 lists several EOS ids); ModelConfig keeps the first."""
    if isinstance(x, list | tuple):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def config_from_hf(d: Mapping, *, source: str = CONFIG_FILE) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict (Llama or Qwen2).

    Args:
      d: the parsed `config.json`.
      source: the file name to cite in errors.

    Raises:
      CheckpointError: naming the field and `source` for anything floe_jax cannot run exactly.
    """
    model_type = d.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise CheckpointError(
            f"{source}: model_type={model_type!r} is not supported; "
            f"supported: {tuple(_ARCHITECTURES)}"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    if model_type == "qwen2" and d.get("use_sliding_window", False):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if key not in d:
            raise CheckpointError(f"{source}: required field {key!r} is missing")
    if "num_attention_heads" not in d:
        raise CheckpointError(f"{source}: required field 'num_attention_heads' is missing")
    theta, scaling = _rope_from_hf(d, source)
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(d.get("attention_bias", False))
        mlp_bias = bool(d.get("mlp_bias", False))
    dtype = d.get("dtype", d.get("torch_dtype")) or "float32"
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) * int(d["num_attention_heads"]) == d["hidden_size"]:
        head_dim = None  # the default: keep one spelling so configs compare equal
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=d.get("num_key_value_heads"),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            dtype=_HF_DTYPES.get(str(dtype), "float32"),
            bos_token_id=_first_id(d.get("bos_token_id")),
            eos_token_id=_first_id(d.get("eos_token_id")),
            pad_token_id=_first_id(d.get("pad_token_id")),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` dict transformers 5 reads for `cfg` (`rope_parameters` format).

    Raises:
      CheckpointError: when the bias pattern has no Hugging Face equivalent (Llama ties q/k/v/o
        bias to one `attention_bias` flag; Qwen2 always has q/k/v bias and no o/mlp bias).
    """
    if cfg.model_type == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError(
            f"llama has one attention_bias flag, but qkv_bias={cfg.qkv_bias} != o_bias={cfg.o_bias}"
        )
    if cfg.model_type == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise CheckpointError(
            "qwen2 needs qkv_bias=True, o_bias=False, mlp_bias=False; got "
            f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}"
        )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    sc = cfg.rope_scaling
    if sc is not None and sc.rope_type != "default":
        rope.update(rope_type=sc.rope_type, factor=sc.factor)
        if sc.rope_type == "llama3":
            rope.update(
                low_freq_factor=sc.low_freq_factor,
                high_freq_factor=sc.high_freq_factor,
                original_max_position_embeddings=sc.original_max_position_embeddings,
            )
    d = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "dtype": cfg.dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if cfg.model_type == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        d.update(use_sliding_window=False)
    return d
