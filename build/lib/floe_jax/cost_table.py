"""Costs of LoRA configurations measured on the current machine, saved as JSON.

For each candidate LoRA configuration, `measure_cost_table` compiles and times

- one decode step: `floe_jax.model.forward` on one new token per row against a KV cache of
  `context` filled slots (the adapter unmerged, as a client serves it), and
- one fine-tuning step: `floe_jax.federated.client.train_step`, the step a client's local update
  runs, with an Adam update (optax), adapter and optimizer state donated,

and reads each compiled program's memory from XLA (`.compile().memory_analysis()`). The result is
a `CostTable` labelled with the device profile name it stands for; `floe_jax.devices.assign_ranks`
uses its entries instead of the analytic model for that device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import LoRAConfig, ModelConfig, normalize_targets

TABLE_VERSION = 1


def model_key(cfg: ModelConfig) -> str:
    """The shape signature costs depend on (weights do not matter)."""
    return (
        f"{cfg.model_type}-V{cfg.vocab_size}-D{cfg.hidden_size}-F{cfg.intermediate_size}"
        f"-L{cfg.num_layers}-H{cfg.num_heads}-N{cfg.kv_heads}-K{cfg.dim_head}"
        f"-tie{int(cfg.tie_word_embeddings)}-{cfg.dtype}"
    )


def lora_key(lora_cfg: LoRAConfig) -> tuple:
    """What costs depend on: rank, targets, layers (alpha and padding do not matter)."""
    return (lora_cfg.rank, tuple(lora_cfg.targets), lora_cfg.layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostEntry:
    """Measured costs of one LoRA configuration at one workload shape.

    Attributes:
      rank, targets, layers: the configuration (layers None: all).
      batch, seq_len: fine-tuning batch shape.
      decode_batch, context: decode rows and filled KV slots.
      train_mem_bytes: compiled memory of the training step (arguments, outputs, temporaries).
      train_step_ms: median wall time of one training step.
      decode_mem_bytes: compiled memory of the decode step.
      decode_ms: median wall time of one decode step.
    """

    rank: int
    targets: tuple[str, ...]
    layers: tuple[int, ...] | None
    batch: int
    seq_len: int
    decode_batch: int
    context: int
    train_mem_bytes: int
    train_step_ms: float
    decode_mem_bytes: int
    decode_ms: float

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(tuple(self.targets)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def lora_cfg(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, targets=self.targets, layers=self.layers)

    def key(self) -> tuple:
        return (
            (self.rank, self.targets, self.layers),
            self.batch,
            self.seq_len,
            self.decode_batch,
            self.context,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostTable:
    """Measured costs for one model on one device.

    Attributes:
      device: the `DeviceProfile.name` these costs stand for (`"local"` for this machine).
      machine: free text naming the hardware that measured them.
      model: `model_key` of the model measured.
      entries: one per (configuration, workload shape).
    """

    device: str
    machine: str
    model: str
    entries: tuple[CostEntry, ...] = ()

    def lookup(
        self,
        model_cfg: ModelConfig,
        lora_cfg: LoRAConfig,
        *,
        batch: int,
        seq_len: int,
        context: int,
        decode_batch: int = 1,
    ) -> CostEntry | None:
        """The entry for this model, configuration and workload, or None."""
        if model_key(model_cfg) != self.model:
            return None
        want = (lora_key(lora_cfg), batch, seq_len, decode_batch, context)
        for e in self.entries:
            if e.key() == want:
                return e
        return None

    def to_json(self) -> dict:
        return {
            "version": TABLE_VERSION,
            "device": self.device,
            "machine": self.machine,
            "model": self.model,
            "entries": [dataclasses.asdict(e) for e in self.entries],
        }

    @classmethod
    def from_json(cls, obj: dict, *, source: str = "<dict>") -> CostTable:
        try:
            if obj.get("version") != TABLE_VERSION:
                raise ValueError(f"version {obj.get('version')!r}, expected {TABLE_VERSION}")
            entries = []
            for e in obj["entries"]:
                e = dict(e)
                e["targets"] = tuple(e["targets"])
                e["layers"] = None if e["layers"] is None else tuple(e["layers"])
                entries.append(CostEntry(**e))
            return cls(
                device=obj["device"],
                machine=obj["machine"],
                model=obj["model"],
                entries=tuple(entries),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: not a floe_jax cost table: {err!r}") from err

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostTable:
        with open(path) as f:
            return cls.from_json(json.load(f), source=str(path))

    def rows(self) -> list[dict]:
        """One flat dict per entry, for printing."""
        return [
            {
                "rank": e.rank,
                "targets": "/".join(t.removesuffix("_proj") for t in e.targets),
                "layers": "all" if e.layers is None else len(e.layers),
                "train_MiB": round(e.train_mem_bytes / 2**20, 2),
                "train_ms": round(e.train_step_ms, 3),
                "decode_MiB": round(e.decode_mem_bytes / 2**20, 2),
                "decode_ms": round(e.decode_ms, 3),
            }
            for e in self.entries
        ]


# ----------------------------------------------------------------------------- measuring


def _compiled_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:  # some backends do not report
        return 0
    peak = getattr(m, "peak_memory_in_bytes", 0) or 0
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(max(peak, total))


def _median_ms(fn, state, repeats: int):
    """Runs `state = fn(*state)` once to warm up, then `repeats` times; median ms."""
    state = jax.block_until_ready(fn(*state))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = jax.block_until_ready(fn(*state))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), state


def measure_cost_table(
    model_cfg: ModelConfig,
    candidates: Sequence[LoRAConfig],
    *,
    batch: int = 1,
    seq_len: int = 128,
    context: int = 256,
    decode_batch: int = 1,
    params: dict | None = None,
    repeats: int = 3,
    device_name: str = "local",
    machine: str | None = None,
    key: jax.Array | None = None,
    progress=None,
) -> CostTable:
    """Compiles and times a decode step and a training step for each candidate.

    Args:
      model_cfg: the model (random weights are used when `params` is None: costs depend on
        shapes only).
      candidates: LoRA configurations to measure.
      batch, seq_len: fine-tuning batch shape (the step trains on `seq_len - 1` predictions).
      context: filled KV-cache slots before the decoded token.
      decode_batch: rows decoded together.
      params: base params to use; default `init_params(model_cfg, key=key)`.
      repeats: timed runs per step (the median is kept) after one warm-up run.
      device_name: the `DeviceProfile.name` the table stands for.
      machine: free text naming the hardware; default the first JAX device's kind.
      key: PRNG key for weights, adapters and tokens; default `jax.random.key(0)`.
      progress: optional callable receiving each finished `CostEntry`.
    """
    from floe_jax.decode import greedy
    from floe_jax.federated.client import make_optimizer, optimized_factors, train_step
    from floe_jax.lora import init_lora
    from floe_jax.model import forward, init_cache, init_params

    key = jax.random.key(0) if key is None else key
    k_params, k_lora, k_tok = jax.random.split(key, 3)
    if params is None:
        params = init_params(model_cfg, key=k_params)
    if machine is None:
        d = jax.devices()[0]
        machine = f"{d.device_kind} ({d.platform})"
    tokens = jax.random.randint(k_tok, (batch, seq_len), 0, model_cfg.vocab_size, jnp.int32)
    mask = jnp.ones((batch, seq_len), jnp.int32)
    train_batch = {"tokens": tokens, "mask": mask, "loss_mask": mask}
    opt = make_optimizer("adam", lr=1e-4)
    tok_B1 = (
        tokens[:decode_batch, :1]
        if decode_batch <= batch
        else jnp.zeros((decode_batch, 1), jnp.int32)
    )

    def decode(params, lora, tok, cache):
        logits, cache = forward(params, tok, model_cfg, lora=lora, cache=cache)
        nxt = greedy(logits[:, -1])[:, None]  # as `generate` picks it
        # Rewind the cache index so every timed step sees the same `context` filled slots.
        cache = dataclasses.replace(cache, index=cache.index - 1, pos=cache.pos - 1)
        return nxt, cache

    decode_jit = jax.jit(decode, donate_argnames=("cache",))
    step_jit = jax.jit(
        train_step, static_argnames=("cfg", "opt"), donate_argnames=("lora", "opt_state")
    )
    entries = []
    for cand in candidates:
        lora = init_lora(model_cfg, cand, key=k_lora)
        # Decode: a cache whose first `context` slots are valid; one slot left to write.
        cache = init_cache(model_cfg, decode_batch, context + 1)
        cache = dataclasses.replace(
            cache,
            valid=cache.valid.at[:, :context].set(True),
            index=jnp.asarray(context, jnp.int32),
            pos=jnp.full((decode_batch,), context, jnp.int32),
        )
        dec_compiled = decode_jit.lower(params, lora, tok_B1, cache).compile()
        dec_mem = _compiled_bytes(dec_compiled)
        dec_ms, _ = _median_ms(
            lambda tok, cache, f=dec_compiled, lora=lora: f(params, lora, tok, cache),
            (tok_B1, cache),
            repeats,
        )
        # Train: the round's `train_step`, adapter and Adam state donated, base broadcast.
        opt_state = opt.init(optimized_factors(lora))
        tr_compiled = step_jit.lower(
            params, lora, opt_state, train_batch, cfg=model_cfg, opt=opt
        ).compile()
        tr_mem = _compiled_bytes(tr_compiled)
        tr_ms, _ = _median_ms(
            lambda lo, o, f=tr_compiled: f(params, lo, o, train_batch)[:2],
            (lora, opt_state),
            repeats,
        )
        entry = CostEntry(
            rank=cand.rank,
            targets=cand.targets,
            layers=cand.layers,
            batch=batch,
            seq_len=seq_len,
            decode_batch=decode_batch,
            context=context,
            train_mem_bytes=tr_mem,
            train_step_ms=tr_ms,
            decode_mem_bytes=dec_mem,
            decode_ms=dec_ms,
        )
        entries.append(entry)
        if progress is not None:
            progress(entry)
    return CostTable(
        device=device_name, machine=machine, model=model_key(model_cfg), entries=tuple(entries)
    )


def measure_bandwidth_and_flops(n: int = 1024, mib: int = 64, repeats: int = 5) -> tuple:
    """Measured matmul FLOP/s (float32, n x n) and copy bandwidth (bytes/s) of the default device.

    Used to build a `DeviceProfile` for the current machine; rough by design.
    """
    x = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm_ms, _ = _median_ms(lambda a: (mm(a),), (x,), repeats)
    flops = 2 * n**3 / (mm_ms / 1e3)
    y = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    cp = jax.jit(lambda a: a * 1.0001)
    cp_ms, _ = _median_ms(lambda a: (cp(a),), (y,), repeats)
    bw = 2 * y.nbytes / (cp_ms / 1e3)  # read + write
    return float(flops), float(bw)


def local_memory_bytes() -> int:
    """Memory of the default device: the accelerator's limit, or the host's available RAM."""
    d = jax.devices()[0]
    try:
        stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends differ in what they implement
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(np.iinfo(np.int64).max // 2)
