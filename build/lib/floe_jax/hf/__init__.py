"""Hugging Face interop from local folders, without torch and without a hub.

- `floe_jax.hf.layout`: the error type and module paths every module shares.
- `floe_jax.hf.config`: `config.json` to `ModelConfig` and back (Llama, Qwen2, Qwen3, Mistral,
  Gemma 3 text and multimodal, Phi-3 / Phi-4-mini, SmolLM3).
- `floe_jax.hf.checkpoint`: `load_hf` / `save_hf`, safetensors checkpoints (sharded or not).
- `floe_jax.hf.peft`: `load_peft` / `save_peft`, PEFT LoRA adapters.

Bad input raises `CheckpointError`, whose message names the file and the tensor or field.
"""

from floe_jax.hf.checkpoint import INDEX_FILE, WEIGHTS_FILE, hf_tensor_names, load_hf, save_hf
from floe_jax.hf.config import CONFIG_FILE, config_from_hf, config_to_hf
from floe_jax.hf.layout import CheckpointError
from floe_jax.hf.peft import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_peft, save_peft

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "CONFIG_FILE",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "hf_tensor_names",
    "load_hf",
    "load_peft",
    "save_hf",
    "save_peft",
]
