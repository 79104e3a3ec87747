"""Edge device profiles, an analytic cost model, and heterogeneity-aware LoRA rank assignment.

Floe (Tian et al., arXiv 2602.14302) gives each edge device the LoRA configuration (rank, target
modules, layers) that fits its memory and its per-token deadline. The paper does not publish its
rule; floe_jax's: per client, the largest configuration c, ordered by LoRA parameter count,
with

    train_mem(c)  ~ bytes(base) + activations(batch, seq, layers, width) + P_lora(c) * 16 bytes
    decode_ms(c)  ~ max(FLOPs / peak_flops, bytes moved / bandwidth)      (unmerged LoRA included)

below the device's memory budget and the deadline. Where a measured `CostTable` (see
`floe_jax.cost_table`) holds an entry for the device, model and configuration, the measured values
replace the model's.

Units: bytes, FLOP/s, bytes/s, watts, milliseconds. `peak_flops` is the dense half-precision
(FP16/BF16) matmul rate a framework can use, except where a profile's `flops_precision` says
otherwise (x86 CPUs without native FP16 arithmetic give FP32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from floe_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig, normalize_targets
from floe_jax.cost_table import CostEntry, CostTable

GiB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}
LORA_STATE_BYTES = 16  # per LoRA parameter: fp32 value + grad + two Adam moments


class RankAssignmentError(ValueError):
    """No candidate LoRA configuration fits a device; the message names it and the need."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """What the cost model needs to know about one device.

    Attributes:
      name: catalog key, e.g. `"jetson-orin-nano-8gb"`.
      memory_bytes: memory usable for fine-tuning (total minus what the OS and other work keep).
      peak_flops: dense matmul rate in FLOP/s at `flops_precision`.
      mem_bandwidth_bytes_per_s: peak DRAM bandwidth.
      power_watts: typical power under sustained load (for energy estimates).
      flops_precision: the precision `peak_flops` is quoted at.
      description: one line for reports.
    """

    name: str
    memory_bytes: int
    peak_flops: float
    mem_bandwidth_bytes_per_s: float
    power_watts: float
    flops_precision: str = "fp16"
    description: str = ""

    def __post_init__(self):
        for f in ("memory_bytes", "peak_flops", "mem_bandwidth_bytes_per_s", "power_watts"):
            if not getattr(self, f) > 0:
                raise ValueError(f"DeviceProfile {self.name!r}: {f} must be > 0")


def _usable(total_gib: float, fraction: float) -> int:
    return int(total_gib * GiB * fraction)


# Figures from vendor spec sheets where the vendor publishes them; derived figures show their
# arithmetic; estimates not on a spec sheet say so. Jetson FP16 dense tensor rates are derived
# as SMs x 2048 dense FP16 FLOP/clk/SM (4 third-gen tensor cores x 256 FMA x 2) x GPU clock;
# the result is exactly 1/4 of the INT8 sparse TOPS NVIDIA quotes for the GPU, which checks it.
CATALOG: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="jetson-orin-nano-8gb",
            # NVIDIA Jetson Orin Nano Series datasheet: 8GB 128-bit LPDDR5, 68 GB/s; 1024 CUDA
            # cores / 32 tensor cores (8 SMs) at 625 MHz max; 7-15 W module power; 40 sparse INT8
            # TOPS. FP16 dense = 8 SM * 2048 FLOP/clk * 625 MHz = 10.24 TFLOPS (= 40.96 TOPS / 4).
            # (JetPack 6.1 "Super" mode: 1020 MHz, 102 GB/s, 25 W.) Usable: 75% of unified memory.
            memory_bytes=_usable(8, 0.75),
            peak_flops=8 * 2048 * 625e6,
            mem_bandwidth_bytes_per_s=68e9,
            power_watts=15.0,
            description="NVIDIA Jetson Orin Nano 8GB (Ampere GPU, 15 W mode)",
        ),
        DeviceProfile(
            name="jetson-orin-nx-16gb",
            # NVIDIA Jetson Orin NX Series datasheet: 16GB 128-bit LPDDR5, 102.4 GB/s; 1024 CUDA /
            # 32 tensor cores at 918 MHz max; 10-25 W; 100 sparse INT8 TOPS (GPU 60 + 2 DLA 40).
            # FP16 dense = 8 SM * 2048 * 918 MHz = 15.04 TFLOPS.
            memory_bytes=_usable(16, 0.75),
            peak_flops=8 * 2048 * 918e6,
            mem_bandwidth_bytes_per_s=102.4e9,
            power_watts=25.0,
            description="NVIDIA Jetson Orin NX 16GB (Ampere GPU, 25 W mode)",
        ),
        DeviceProfile(
            name="jetson-agx-orin-64gb",
            # NVIDIA Jetson AGX Orin Series technical brief / datasheet: 64GB 256-bit LPDDR5,
            # 204.8 GB/s; 2048 CUDA / 64 tensor cores (16 SMs) at 1.3 GHz; 5.3 FP32 TFLOPS;
            # 170 sparse INT8 TOPS (GPU); 15-60 W. FP16 dense = 16 * 2048 * 1.3 GHz = 42.6 TFLOPS.
            memory_bytes=_usable(64, 0.75),
            peak_flops=16 * 2048 * 1.3e9,
            mem_bandwidth_bytes_per_s=204.8e9,
            power_watts=60.0,
            description="NVIDIA Jetson AGX Orin 64GB (Ampere GPU, MAXN 60 W)",
        ),
        DeviceProfile(
            name="raspberry-pi-5-8gb",
            # Raspberry Pi 5 product brief: BCM2712, 4x Cortex-A76 at 2.4 GHz, LPDDR4X-4267
            # (32-bit bus: 4267 MT/s * 4 B = 17.1 GB/s). Cortex-A76 has two 128-bit NEON FMA
            # pipes: 8 FP16 lanes * 2 pipes * 2 FLOP = 32 FLOP/clk/core -> 4 * 2.4 GHz * 32 =
            # 307 GFLOPS FP16. Power: the brief specifies a 5 V / 5 A supply; ~8 W at full CPU
            # load is an estimate from public measurements, not a spec-sheet figure.
            memory_bytes=_usable(8, 0.75),
            peak_flops=4 * 2.4e9 * 32,
            mem_bandwidth_bytes_per_s=4267e6 * 4,
            power_watts=8.0,
            description="Raspberry Pi 5 8GB (4x Cortex-A76 CPU, NEON FP16)",
        ),
        DeviceProfile(
            name="apple-a17-pro",
            # iPhone 15 Pro (Apple A17 Pro). Apple publishes no FLOPS or bandwidth figures:
            # 8GB LPDDR5-6400 on a 64-bit bus (teardowns) -> 51.2 GB/s; 6-core GPU ~2.15 TFLOPS
            # FP32 at the same FP16 rate (third-party figures: 768 ALUs * 2 * ~1.4 GHz). Apps may
            # use ~50% of RAM; ~6 W sustained SoC power is an estimate, not a spec-sheet figure.
            memory_bytes=_usable(8, 0.5),
            peak_flops=2.15e12,
            mem_bandwidth_bytes_per_s=51.2e9,
            power_watts=6.0,
            description="Apple A17 Pro phone SoC (iPhone 15 Pro, GPU)",
        ),
        DeviceProfile(
            name="ryzen-7-7840u",
            # AMD Ryzen 7 7840U product page: 8 Zen 4 cores, 3.3 GHz base (5.1 boost), 28 W default
            # TDP (15-30 W), LPDDR5x-7500 (128-bit: 7500 MT/s * 16 B = 120 GB/s). Zen 4 runs
            # AVX-512 on two 256-bit FMA pipes: 16 FP32 FMA = 32 FLOP/clk/core -> 8 * 3.3 GHz * 32
            # = 845 GFLOPS FP32 at base clock. Laptop with 16 GB; 75% usable.
            memory_bytes=_usable(16, 0.75),
            peak_flops=8 * 3.3e9 * 32,
            mem_bandwidth_bytes_per_s=120e9,
            power_watts=28.0,
            flops_precision="fp32",
            description="AMD Ryzen 7 7840U laptop CPU (8x Zen 4, AVX-512)",
        ),
        DeviceProfile(
            name="rtx-4090",
            # NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 24 GB GDDR6X, 1008 GB/s;
            # peak FP16 tensor TFLOPS with FP32 accumulate 165.2 dense (330.4 sparse); 450 W TGP.
            # ~1.5 GiB kept for the CUDA context and display.
            memory_bytes=int(22.5 * GiB),
            peak_flops=165.2e12,
            mem_bandwidth_bytes_per_s=1008e9,
            power_watts=450.0,
            description="NVIDIA GeForce RTX 4090 24GB (Ada)",
        ),
    )
}


def get_device(name: str) -> DeviceProfile:
    """The catalog profile `name`; raises KeyError listing the known names."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(
            f"unknown device {name!r}; known devices: {', '.join(sorted(CATALOG))}"
        ) from None


# ----------------------------------------------------------------------------- cost model


def _bytes_of(dtype: str | None, cfg: ModelConfig) -> float:
    dtype = dtype or cfg.dtype
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {tuple(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[dtype]


def _adapted_layers(model_cfg: ModelConfig, lora_cfg: LoRAConfig) -> int:
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
    return _adapted_layers(model_cfg, lora_cfg) * per_layer


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
    `lora_state`: value, gradient and two Adam moments in float32.

    On a 4-layer SmolLM2-135M-shaped float32 model (batch 2, seq 64) this came within ~10% below
    the XLA-compiled memory of the measured step (which adds fusion temporaries).
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
    act = tokens * c.num_layers * per_tok_layer * a_bytes + tokens * 3 * c.vocab_size * 4
    p_lora = lora_param_count(c, lora_cfg)
    if lora_cfg is not None:
        act += tokens * _adapted_layers(c, lora_cfg) * len(lora_cfg.targets) * lora_cfg.rank * 4
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


# ----------------------------------------------------------------------------- assignment


DEFAULT_RANKS = (2, 4, 8, 16, 32, 64)
DEFAULT_TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), LORA_TARGETS)


def default_candidates(
    ranks: Sequence[int] = DEFAULT_RANKS,
    target_sets: Sequence[Sequence[str]] = DEFAULT_TARGET_SETS,
    *,
    template: LoRAConfig | None = None,
) -> list[LoRAConfig]:
    """The grid ranks x target sets (all layers), built from `template` (alpha, init, ...)."""
    template = template or LoRAConfig()
    return [
        dataclasses.replace(template, rank=r, targets=normalize_targets(t), max_rank=None)
        for t in target_sets
        for r in ranks
    ]


def candidate_order_key(model_cfg: ModelConfig, lora_cfg: LoRAConfig) -> tuple:
    """Candidates are ordered by LoRA parameter count, then rank, targets, adapted layers."""
    return (
        lora_param_count(model_cfg, lora_cfg),
        lora_cfg.rank,
        len(lora_cfg.targets),
        _adapted_layers(model_cfg, lora_cfg),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CandidateCost:
    """A candidate's costs on one device, and where they came from (`"model"` or `"measured"`)."""

    lora_cfg: LoRAConfig
    train_mem_bytes: int
    decode_ms: float
    source: str

    def fits(self, device: DeviceProfile, deadline_ms: float) -> bool:
        return self.train_mem_bytes <= device.memory_bytes and self.decode_ms <= deadline_ms


def _tables_for(device: DeviceProfile, cost_table) -> list[CostTable]:
    if cost_table is None:
        return []
    tables = [cost_table] if isinstance(cost_table, CostTable) else list(cost_table)
    return [t for t in tables if t.device == device.name]


def candidate_costs(
    model_cfg: ModelConfig,
    device: DeviceProfile,
    candidates: Sequence[LoRAConfig],
    *,
    batch: int,
    seq_len: int,
    context: int = 256,
    decode_batch: int = 1,
    cost_table: CostTable | Sequence[CostTable] | None = None,
    weight_dtype: str | None = None,
) -> list[CandidateCost]:
    """Costs of every candidate on `device`, in candidate order (smallest first).

    A measured entry (a table whose `device` is `device.name`, for this model, configuration,
    batch, seq_len, context and decode batch) takes precedence over the analytic model.
    """
    tables = _tables_for(device, cost_table)
    out = []
    for cand in sorted(candidates, key=lambda c: candidate_order_key(model_cfg, c)):
        entry: CostEntry | None = None
        for t in tables:
            entry = t.lookup(
                model_cfg,
                cand,
                batch=batch,
                seq_len=seq_len,
                context=context,
                decode_batch=decode_batch,
            )
            if entry is not None:
                break
        if entry is not None:
            out.append(
                CandidateCost(
                    lora_cfg=cand,
                    train_mem_bytes=entry.train_mem_bytes,
                    decode_ms=entry.decode_ms,
                    source="measured",
                )
            )
            continue
        mem = train_memory_bytes(
            model_cfg, cand, batch=batch, seq_len=seq_len, weight_dtype=weight_dtype
        )
        ms = decode_ms_per_token(
            model_cfg, cand, device, batch=decode_batch, context=context, weight_dtype=weight_dtype
        )
        out.append(CandidateCost(lora_cfg=cand, train_mem_bytes=mem, decode_ms=ms, source="model"))
    return out


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def assign_ranks(
    model_cfg: ModelConfig,
    devices: Sequence[DeviceProfile],
    *,
    deadline_ms: float | Sequence[float],
    batch: int,
    seq_len: int,
    candidates: Sequence[LoRAConfig] | None = None,
    cost_table: CostTable | Sequence[CostTable] | None = None,
    context: int = 256,
    decode_batch: int = 1,
    weight_dtype: str | None = None,
    pad_to_max: bool = True,
) -> list[LoRAConfig]:
    """Per device, the largest candidate that trains within memory and decodes within the deadline.

    Args:
      model_cfg: the edge SLM.
      devices: one profile per client (C).
      deadline_ms: per-token decode deadline, one for all or one per device.
      batch, seq_len: the local fine-tuning batch shape.
      candidates: LoRA configurations to choose from; default `default_candidates()`.
      cost_table: measured costs (one table or several, matched by device name); measured entries
        replace the analytic model.
      context: KV-cache length for the decode cost.
      decode_batch: rows decoded together.
      weight_dtype: storage dtype of the base weights on the device (default the model's).
      pad_to_max: set every returned config's `max_rank` to the largest assigned rank, so the
        clients' adapters stack on one client axis.

    Returns:
      One LoRAConfig per device, in order.

    Raises:
      RankAssignmentError: no candidate fits a device; names the device, the smallest candidate's
        memory and time, and the device's budget.
    """
    candidates = list(candidates) if candidates is not None else default_candidates()
    if not candidates:
        raise ValueError("assign_ranks needs at least one candidate")
    if isinstance(deadline_ms, int | float):
        deadlines = [float(deadline_ms)] * len(devices)
    else:
        deadlines = [float(d) for d in deadline_ms]
        if len(deadlines) != len(devices):
            raise ValueError(f"{len(deadlines)} deadlines for {len(devices)} devices")
    chosen = []
    for i, (dev, dl) in enumerate(zip(devices, deadlines, strict=True)):
        costs = candidate_costs(
            model_cfg,
            dev,
            candidates,
            batch=batch,
            seq_len=seq_len,
            context=context,
            decode_batch=decode_batch,
            cost_table=cost_table,
            weight_dtype=weight_dtype,
        )
        fitting = [c for c in costs if c.fits(dev, dl)]
        if not fitting:
            small = costs[0]
            lc = small.lora_cfg
            raise RankAssignmentError(
                f"client {i}: device {dev.name!r} fits no LoRA candidate; the smallest "
                f"(rank={lc.rank}, targets={'/'.join(t.removesuffix('_proj') for t in lc.targets)}"
                f") needs {_fmt_bytes(small.train_mem_bytes)} training memory (device budget "
                f"{_fmt_bytes(dev.memory_bytes)}) and {small.decode_ms:.2f} ms/token decode "
                f"(deadline {dl:g} ms) [{small.source}]"
            )
        chosen.append(fitting[-1].lora_cfg)
    if pad_to_max:
        r_max = max(c.rank for c in chosen)
        chosen = [dataclasses.replace(c, max_rank=r_max) for c in chosen]
    return chosen


def local_device(name: str = "local", *, power_watts: float = 1.0) -> DeviceProfile:
    """A rough profile of this machine: measured float32 matmul rate and copy bandwidth, and the
    default device's memory limit (or the host's available RAM). `power_watts` is not measured."""
    from floe_jax.cost_table import local_memory_bytes, measure_bandwidth_and_flops

    flops, bw = measure_bandwidth_and_flops()
    return DeviceProfile(
        name=name,
        memory_bytes=local_memory_bytes(),
        peak_flops=flops,
        mem_bandwidth_bytes_per_s=bw,
        power_watts=power_watts,
        flops_precision="fp32 (measured)",
        description="this machine, measured",
    )


__all__ = [
    "CATALOG",
    "CandidateCost",
    "CostEntry",
    "CostTable",
    "DeviceProfile",
    "RankAssignmentError",
    "assign_ranks",
    "candidate_costs",
    "decode_energy_j_per_token",
    "decode_flops_and_bytes",
    "decode_ms_per_token",
    "default_candidates",
    "get_device",
    "local_device",
    "lora_param_count",
    "train_memory_breakdown",
    "train_memory_bytes",
]
