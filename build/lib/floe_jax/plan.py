"""How many clients of a federated round fit a device, from shapes alone.

`plan` builds the round's one-client program from abstract shapes (`jax.eval_shape` of the base
and the adapter, `jax.ShapeDtypeStruct` batches: nothing is allocated), compiles the vmapped
local update for one and two clients, and reads XLA's memory analysis
(`floe_jax.federated.client.clients_memory`): the base's bytes, the fixed bytes, the bytes each
more client adds, and so the number of clients a memory budget trains at once. It is the same
measure `client_chunk="auto"` decides by.

The figures are the compiling backend's: planned on a CPU, they include what XLA:CPU adds (it
computes bfloat16 matmuls in float32, so a bf16 base's backward holds float32 copies of the
weights it multiplies), which an accelerator's compiler need not; plan on the target device for
its own figure.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.federated.client import ClientsMemory, clients_memory, make_optimizer
from floe_jax.lora import init_lora
from floe_jax.model import init_params

DEFAULT_LORA = LoRAConfig(rank=16, alpha=32.0)  # the demo's and the real presets' adapters


@dataclasses.dataclass(frozen=True)
class Plan:
    """One round's memory on one budget (bytes), and the clients it trains at once."""

    cfg: ModelConfig
    lora: LoRAConfig
    batch: int
    seq_len: int
    local_steps: int
    memory: ClientsMemory
    budget_bytes: int
    clients_at_once: int
    devices: int = 1

    def report(self) -> str:
        """A few lines for a terminal."""
        m, c = self.memory, self.cfg
        gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.2f} MiB"  # noqa: E731
        return "\n".join(
            [
                f"model: {c.model_type} V={c.vocab_size} D={c.hidden_size} L={c.num_layers} "
                f"({c.num_params / 1e6:.0f}M params) dtype={c.dtype} remat={c.remat} "
                f"loss_chunk={c.loss_chunk}",
                f"round: LoRA rank {self.lora.rank} on {'/'.join(self.lora.targets)}, batch "
                f"{self.batch} x seq {self.seq_len}, {self.local_steps} local steps, adamw",
                f"  base (shared) {gib(m.base_bytes)}; fixed {gib(m.fixed_bytes)}; "
                f"per client {gib(m.per_client_bytes)}",
                f"  budget {gib(self.budget_bytes)} ({self.budget_bytes / 1e9:g} GB): "
                f"{self.clients_at_once} clients at once{self.over_devices()}",
            ]
        )

    def over_devices(self, clients_at_once: int | None = None) -> str:
        """What a `clients` mesh axis of `devices` trains at once: each device holds the base
        and trains its own block of clients, so D devices train D times one device's clients."""
        k = self.clients_at_once if clients_at_once is None else clients_at_once
        return "" if self.devices == 1 else f" per device, {k * self.devices} over {self.devices}"


def model_config(spec: str | os.PathLike) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json`, or a folder holding one."""
    from floe_jax.hf.config import CONFIG_FILE, config_from_hf

    path = os.fspath(spec)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model config at {path}: give a config.json or its folder")
    with open(path) as f:
        return config_from_hf(json.load(f), source=path)


def plan(
    cfg: ModelConfig,
    *,
    budget_bytes: int,
    lora: LoRAConfig = DEFAULT_LORA,
    batch: int = 8,
    seq_len: int = 512,
    local_steps: int = 1,
    optimizer: str = "adamw",
    devices: int = 1,
) -> Plan:
    """The memory of a round's local updates of `cfg` (at its dtype, `remat` and `loss_chunk`)
    and how many clients `budget_bytes` trains at once; nothing is allocated.

    Args:
      cfg: the edge model (shapes only).
      budget_bytes: the device memory the round may use, base included.
      lora: each client's adapter.
      batch, seq_len, local_steps: each client's batches (int32 tokens [S, B, T], float32
        masks, as `federated.types.sample_batches` gives them).
      optimizer: the client optimizer (`make_optimizer`); its state is per client.
      devices: devices on a `clients` mesh axis (`floe_jax.sharding`): the figures are one
        device's (its block of clients and its copy of the base), the report adds the total.
        An `fsdp` axis is not planned here: `sharding.round_bytes_per_device` compiles the
        sharded round on the devices themselves.
    """
    for name, v in (("batch", batch), ("seq_len", seq_len), ("local_steps", local_steps),
                    ("devices", devices)):  # fmt: skip
        if v < 1:
            raise ValueError(f"plan: {name} must be >= 1, got {v}")
    params = jax.eval_shape(lambda: init_params(cfg, key=jax.random.key(0)))
    adapter = jax.eval_shape(lambda: init_lora(cfg, lora, key=jax.random.key(0)))
    spec = lambda dt: jax.ShapeDtypeStruct((local_steps, batch, seq_len), dt)  # noqa: E731
    batches = {
        "tokens": spec(jnp.int32),
        "mask": spec(jnp.float32),
        "loss_mask": spec(jnp.float32),
        "batch_mask": jax.ShapeDtypeStruct((local_steps, batch), jnp.float32),
    }
    mem = clients_memory(params, adapter, batches, cfg=cfg, opt=make_optimizer(optimizer))
    return Plan(
        cfg=cfg,
        lora=lora,
        batch=batch,
        seq_len=seq_len,
        local_steps=local_steps,
        memory=mem,
        budget_bytes=int(budget_bytes),
        clients_at_once=mem.max_clients(int(budget_bytes)),
        devices=devices,
    )
