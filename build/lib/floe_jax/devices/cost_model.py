"""An analytic cost model of LoRA fine-tuning and decoding on an edge device.

    train_mem(c)  ~ bytes(base) + activations(batch, seq, layers, width) + P_lora(c) * 16 bytes
    decode_ms(c)  ~ max(FLOPs / peak_flops, bytes moved / bandwidth)      (unmerged LoRA included)

The roofline needs only a `DeviceProfile` and the model's shapes, so it prices configurations of
models and devices that are not at hand; where a device is at hand, `floe_jax.cost_table`
measures the same quantities, and rank assignment prefers the measurement.

Units: bytes, FLOP/s, bytes/s, watts, milliseconds.
"""

from __future__ import annotations

from floe_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig
from floe_jax.devices.profiles import DeviceProfile
from floe_jax.quant import FORMATS as QUANT_FORMATS
from floe_jax.quant import weight_bytes_per_param

# Bytes per weight of each float storage type. The quantized formats of `floe_jax.quant` ("bf16",
# "int8", "int4", "nf4") are priced with their scales (`quant.weight_bytes_per_param`), so a
# device's rank assignment sees the footprint of the base it actually runs (QLoRA).
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_STATE_BYTES = 16  # per LoRA parameter: fp32 value + grad + two Adam moments


def _bytes_of(dtype: str | None, cfg: ModelConfig) -> float:
    dtype = dtype or cfg.dtype
    if dtype in QUANT_FORMATS:
        return weight_bytes_per_param(dtype)
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {(*_DTYPE_BYTES, *QUANT_FORMATS)}")
    return _DTYPE_BYTES[dtype]


def adapted_layers(model_cfg: ModelConfig, lora_cfg: LoRAConfig) -> int:
    """How many decoder layers `lora_cfg` adapts (all when `lora_cfg.layers` is None)."""
    if lora_cfg.layers is None:
        return model_cfg.num_layers
    bad = [i for i in lora_cfg.layers if not 0 <= i < model_cfg.num_layers]
    if bad:
        raise ValueError(f"LoRA layers {bad} are outside [0, {model_cfg.num_layers})")
    return len(lora_cfg.layers)


def lora_param_count(model_cfg: ModelConfig, lora_cfg: LoRAConfig | None) -> int:
    """Trainable LoRA parameters: sum over adapted layers and targets of `r * (d_in + d_out)`."""
    if lora_cfg is None:
        return 0
    per_layer = sum(lora_cfg.rank * sum(model_cfg.proj_shape(m)) for m in lora_cfg.targets)
    return adapted_layers(model_cfg, lora_cfg) * per_layer


def train_memory_breakdown(
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig | None,
    *,
    batch: int,
    seq_len: int,
    weight_dtype: str | None = None,
    act_dtype: str | None = None,
) -> dict[str, int]:
    """Bytes of one LoRA fine-tuning step, by part.

    `base`: frozen weights at `weight_dtype` (default the model's). `activations`: what the backward
    pass keeps, per token and layer: two norm inputs and outputs (4D), q/k/v (Q + 2KV), the
    attention output (Q), softmax probabilities (H * seq_len, no flash attention), gate, up and
    their product (3F), the LoRA bottlenecks (r per adapted target); plus float32 logits, their
    log-softmax and its gradient (3V per token; with a large vocabulary this term dominates).
    The model's memory options change both terms: with `remat` every layer keeps only its input
    (D per token) and one layer's full set is live at a time; with `loss_chunk = k` the logits
    term is that of k tokens (`floe_jax.loss`), not of every token.
    `lora_state`: value, gradient and two Adam moments in float32.

    It slightly underestimates a compiled step, which also holds XLA's fusion temporaries;
    `floe_jax.cost_table` measures the compiled figure where the device is at hand.
    """
    c = model_cfg
    w_bytes = _bytes_of(weight_dtype, c)
    a_bytes = _bytes_of(act_dtype, c)
    per_tok_layer = (
        4 * c.hidden_size
        + 2 * c.q_size
        + 2 * c.kv_size
        + c.num_heads * seq_len
        + 3 * c.intermediate_size
    )
    tokens = batch * seq_len
    kept_layers = 1 if c.remat else c.num_layers  # layers whose full activation set is kept
    act = tokens * kept_layers * per_tok_layer * a_bytes
    if c.remat:
        act += tokens * c.num_layers * c.hidden_size * a_bytes  # each layer's saved input
    logit_rows = min(c.loss_chunk, tokens) if c.loss_chunk > 0 else tokens
    act += logit_rows * 3 * c.vocab_size * 4
    p_lora = lora_param_count(c, lora_cfg)
    if lora_cfg is not None:
        lora_layers = 1 if c.remat else adapted_layers(c, lora_cfg)
        act += tokens * lora_layers * len(lora_cfg.targets) * lora_cfg.rank * 4
    out = {
        "base": int(c.num_params * w_bytes),
        "activations": int(act),
        "lora_state": int(p_lora * LORA_STATE_BYTES),
    }
    out["total"] = sum(out.values())
    return out


def train_memory_bytes(
    model_cfg: ModelConfig, lora_cfg: LoRAConfig | None, *, batch: int, seq_len: int, **kw
) -> int:
    """Total of `train_memory_breakdown` (same arguments)."""
    return train_memory_breakdown(model_cfg, lora_cfg, batch=batch, seq_len=seq_len, **kw)["total"]


def decode_flops_and_bytes(
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig | None,
    *,
    batch: int = 1,
    context: int = 256,
    weight_dtype: str | None = None,
    merged: bool = False,
) -> tuple[float, float]:
    """FLOPs and DRAM bytes of one decode step (one new token for each of `batch` rows).

    FLOPs: `2 * (linear weights + lm_head)` per row, attention `4 * L * Q * context` per row, and
    unmerged LoRA `2 * P_lora` per row. Bytes: every linear weight and the lm_head once (one
    embedding row is negligible), the KV cache `2 * L * KV * context` per row, and the LoRA
    factors once when unmerged (`merged=True` folds them into the base: no overhead).
    """
    c = model_cfg
    w_bytes = _bytes_of(weight_dtype, c)
    linear = sum(a * b for a, b in map(c.proj_shape, LORA_TARGETS)) * c.num_layers
    head = c.hidden_size * c.vocab_size
    p_lora = 0 if merged else lora_param_count(c, lora_cfg)
    flops = batch * (2 * (linear + head) + 4 * c.num_layers * c.q_size * context + 2 * p_lora)
    kv = batch * 2 * c.num_layers * c.kv_size * context * w_bytes
    moved = (linear + head) * w_bytes + kv + p_lora * w_bytes
    return float(flops), float(moved)


def decode_ms_per_token(
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig | None,
    device: DeviceProfile,
    *,
    batch: int = 1,
    context: int = 256,
    weight_dtype: str | None = None,
    merged: bool = False,
) -> float:
    """Roofline time of one decode step: `max(FLOPs / peak, bytes / bandwidth)` in ms."""
    flops, moved = decode_flops_and_bytes(
        model_cfg, lora_cfg, batch=batch, context=context, weight_dtype=weight_dtype, merged=merged
    )
    return 1e3 * max(flops / device.peak_flops, moved / device.mem_bandwidth_bytes_per_s)


def decode_energy_j_per_token(
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig | None,
    device: DeviceProfile,
    *,
    batch: int = 1,
    context: int = 256,
    decode_ms: float | None = None,
    **kw,
) -> float:
    """Energy of one generated token: `power * step time / batch` in joules.

    `decode_ms` (e.g. measured) replaces the roofline step time when given.
    """
    if decode_ms is None:
        decode_ms = decode_ms_per_token(
            model_cfg, lora_cfg, device, batch=batch, context=context, **kw
        )
    return device.power_watts * decode_ms / 1e3 / batch
