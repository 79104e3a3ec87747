"""What every `floe_jax.hf` module shares about the Hugging Face layout: the error type
(`CheckpointError`), the JSON reader whose errors name the file, and the module path of each
projection (`model.layers.{i}.self_attn.q_proj`, or the fused module that holds it), after which
both checkpoint tensors and PEFT adapter tensors are named.
"""

from __future__ import annotations

import json
from pathlib import Path

from floe_jax.config import FUSED_TARGETS, ModelConfig

# Families whose checkpoints fuse projections: {fused tensor: the projections it concatenates}.
FUSED_TENSORS = {"phi3": FUSED_TARGETS}
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
    `target` may be a fused module of `FUSED_TENSORS` (`qkv_proj`, `gate_up_proj`).

    Raises:
      KeyError: `target` is not one of `floe_jax.config.LORA_TARGETS` nor a fused module.
    """
    sub = PROJ_SUBMODULE.get(target) or PROJ_SUBMODULE[_fused_parts(target)[0]]
    return f"model.layers.{layer}.{sub}.{target}"


def _fused_parts(name: str) -> tuple[str, ...]:
    for groups in FUSED_TENSORS.values():
        if name in groups:
            return groups[name]
    raise KeyError(name)


def hf_module(cfg: ModelConfig, target: str) -> str:
    """The Hugging Face module that holds projection `target` for `cfg`'s family: `target`
    itself, or the fused module that holds it (`q_proj` is in Phi-3's `qkv_proj`)."""
    for fused, parts in FUSED_TENSORS.get(cfg.model_type, {}).items():
        if target in parts:
            return fused
    return target
