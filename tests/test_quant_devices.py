"""The quantized footprint in the device cost model and rank assignment (QLoRA on devices)."""

import pytest

from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.devices import (
    DeviceProfile,
    RankAssignmentError,
    assign_ranks,
    decode_flops_and_bytes,
    train_memory_breakdown,
)

WORK = dict(batch=1, seq_len=128)
QWEN25_05B = ModelConfig(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
    num_layers=24, num_heads=14, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
)  # fmt: skip


def _device(mem):
    return DeviceProfile(
        name="phone", memory_bytes=int(mem), peak_flops=1e12, mem_bandwidth_bytes_per_s=50e9,
        power_watts=5.0,
    )  # fmt: skip


def test_cost_model_prices_the_quantized_base():
    n = QWEN25_05B.num_params
    lora = LoRAConfig(rank=8)
    base = {f: train_memory_breakdown(QWEN25_05B, lora, **WORK, weight_dtype=f)["base"]
            for f in ("float32", "bf16", "int8", "int4", "nf4")}  # fmt: skip
    assert base == {"float32": 4 * n, "bf16": 2 * n, "int8": n, "int4": int(0.5625 * n),
                    "nf4": int(0.5625 * n)}  # fmt: skip
    _, moved32 = decode_flops_and_bytes(QWEN25_05B, None, weight_dtype="float32")
    _, moved4 = decode_flops_and_bytes(QWEN25_05B, None, weight_dtype="int4")
    assert moved4 < 0.2 * moved32
    with pytest.raises(ValueError, match="int3"):
        train_memory_breakdown(QWEN25_05B, lora, **WORK, weight_dtype="int3")


def test_a_device_too_small_for_float32_trains_over_an_int4_base():
    lora = LoRAConfig(rank=8)
    need4 = train_memory_breakdown(QWEN25_05B, lora, **WORK, weight_dtype="int4")["total"]
    dev = _device(need4 * 1.05)
    with pytest.raises(RankAssignmentError, match="phone"):
        assign_ranks(QWEN25_05B, [dev], deadline_ms=1e9, **WORK, weight_dtype="float32")
    (got,) = assign_ranks(QWEN25_05B, [dev], deadline_ms=1e9, **WORK, weight_dtype="int4")
    assert got.rank >= 1
