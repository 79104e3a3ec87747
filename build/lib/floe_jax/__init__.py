"""floe_jax: Floe (hybrid federated LLM-SLM inference) as pure JAX functions.

The public functional API is re-exported here explicitly; everything else is importable from its
module (`floe_jax.model`, `floe_jax.lora`, ...).
"""

from floe_jax.config import ConfigError, LoRAConfig, ModelConfig, RopeScaling
from floe_jax.data.tokenizer import load_tokenizer
from floe_jax.decode import SamplingConfig, generate, pad_prompts, stream
from floe_jax.devices import CATALOG, DeviceProfile, assign_ranks, get_device
from floe_jax.federated.aggregate import Aggregated, aggregate, available_rules
from floe_jax.federated.cluster import assign_cluster, cluster_aggregate, cluster_clients
from floe_jax.federated.config import AggregationConfig, DPConfig, FedConfig
from floe_jax.federated.loop import train_federated
from floe_jax.hf import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    load_hf,
    load_peft,
    save_hf,
    save_peft,
)
from floe_jax.hf.gguf import read_gguf, save_gguf
from floe_jax.lora import (
    LoRA,
    delta_weight,
    freeze_padding,
    init_lora,
    merge_lora,
    stack_loras,
    unstack_loras,
)
from floe_jax.model import KVCache, forward, init_cache, init_params
from floe_jax.quant import QuantConfig, QuantizedTensor, dequantize_params, quantize

__all__ = [
    "CATALOG",
    "Aggregated",
    "AggregationConfig",
    "DPConfig",
    "DeviceProfile",
    "FedConfig",
    "SamplingConfig",
    "aggregate",
    "assign_cluster",
    "assign_ranks",
    "available_rules",
    "cluster_aggregate",
    "cluster_clients",
    "generate",
    "get_device",
    "pad_prompts",
    "stream",
    "train_federated",
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "load_peft",
    "load_tokenizer",
    "save_hf",
    "save_peft",
    "ConfigError",
    "KVCache",
    "LoRA",
    "LoRAConfig",
    "ModelConfig",
    "RopeScaling",
    "delta_weight",
    "forward",
    "freeze_padding",
    "init_cache",
    "init_lora",
    "init_params",
    "merge_lora",
    "stack_loras",
    "unstack_loras",
    "QuantConfig",
    "QuantizedTensor",
    "dequantize_params",
    "quantize",
    "read_gguf",
    "save_gguf",
]
