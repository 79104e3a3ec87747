"""Heterogeneity-aware LoRA rank assignment: per device, the largest LoRA configuration that fits.

Floe (Tian et al., arXiv 2602.14302) gives each edge device the LoRA configuration (rank, target
modules, layers) that fits its memory and its per-token deadline. The paper does not publish its
rule; floe_jax's: per client, the largest candidate configuration, ordered by LoRA parameter
count, whose fine-tuning memory is within the device's budget and whose decode step is within the
deadline. Costs come from `floe_jax.devices.cost_model`, except where a measured `CostTable` (see
`floe_jax.cost_table`) holds an entry for the device, model and configuration: measured values
replace the model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from floe_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig, normalize_targets
from floe_jax.cost_table import CostEntry, CostTable
from floe_jax.devices.cost_model import (
    adapted_layers,
    decode_ms_per_token,
    lora_param_count,
    train_memory_bytes,
)
from floe_jax.devices.profiles import DeviceProfile, GiB


class RankAssignmentError(ValueError):
    """No candidate LoRA configuration fits a device; the message names it and the need."""


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
        adapted_layers(model_cfg, lora_cfg),
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
      weight_dtype: storage of the base weights on the device: a float dtype (default the
        model's) or a `floe_jax.quant` format ("bf16", "int8", "int4", "nf4"; QLoRA).
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


def toy_budgets(
    model_cfg: ModelConfig,
    devices: Sequence[DeviceProfile],
    candidates: Sequence[LoRAConfig],
    *,
    batch: int,
    seq_len: int,
) -> list[DeviceProfile]:
    """`devices` with their memory budgets mapped into the span a *toy* model's candidates need,
    for stand-in models only: a model of a few MB fits the largest rank on every real device, so
    its ranks would all be equal. Each budget becomes `need(no LoRA) + (memory / largest memory)
    x (need(largest candidate) - need(no LoRA))` (+1 byte), so ranks follow the devices' real
    memory ratios. A real-scale model takes `devices` as they are (`assign_ranks(model_cfg,
    devices, ...)`): its needs are real bytes, and so are the budgets.
    """
    if not candidates:
        raise ValueError("toy_budgets needs at least one candidate")
    kw = dict(batch=batch, seq_len=seq_len)
    base = train_memory_bytes(model_cfg, None, **kw)
    top = max(train_memory_bytes(model_cfg, c, **kw) for c in candidates)
    biggest = max(d.memory_bytes for d in devices)
    return [
        dataclasses.replace(d, memory_bytes=int(base + d.memory_bytes / biggest * (top - base)) + 1)
        for d in devices
    ]
