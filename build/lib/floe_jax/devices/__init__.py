"""Edge devices: their profiles, the cost of LoRA on them, and the rank each one gets.

- `floe_jax.devices.profiles`: `DeviceProfile`, the `CATALOG` of real devices, `local_device`.
- `floe_jax.devices.cost_model`: analytic fine-tuning memory and roofline decode time and energy.
- `floe_jax.devices.assignment`: `assign_ranks`, the largest LoRA configuration that fits each
  device's memory and per-token deadline (Floe's heterogeneity-aware LoRA).

Measured costs, which replace the model's where present, live in `floe_jax.cost_table`.
"""

from floe_jax.cost_table import CostEntry, CostTable
from floe_jax.devices.assignment import (
    DEFAULT_RANKS,
    DEFAULT_TARGET_SETS,
    CandidateCost,
    RankAssignmentError,
    assign_ranks,
    candidate_costs,
    candidate_order_key,
    default_candidates,
    toy_budgets,
)
from floe_jax.devices.cost_model import (
    LORA_STATE_BYTES,
    adapted_layers,
    decode_energy_j_per_token,
    decode_flops_and_bytes,
    decode_ms_per_token,
    lora_param_count,
    train_memory_breakdown,
    train_memory_bytes,
)
from floe_jax.devices.profiles import CATALOG, DeviceProfile, GiB, get_device, local_device

__all__ = [
    "CATALOG",
    "DEFAULT_RANKS",
    "DEFAULT_TARGET_SETS",
    "LORA_STATE_BYTES",
    "CandidateCost",
    "CostEntry",
    "CostTable",
    "DeviceProfile",
    "GiB",
    "RankAssignmentError",
    "adapted_layers",
    "assign_ranks",
    "candidate_costs",
    "candidate_order_key",
    "decode_energy_j_per_token",
    "decode_flops_and_bytes",
    "decode_ms_per_token",
    "default_candidates",
    "get_device",
    "local_device",
    "lora_param_count",
    "train_memory_breakdown",
    "toy_budgets",
    "train_memory_bytes",
]
