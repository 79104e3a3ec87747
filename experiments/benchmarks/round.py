"""One federated LoRA round: floe_jax against PyTorch + PEFT done the way PyTorch federated
frameworks do it, side by side in one process.

floe_jax: `run_round`, one jitted program that samples, trains every client (`lax.map` chunks
or `vmap` over the client axis, the base broadcast) and aggregates.

PyTorch + PEFT: one transformers `LlamaForCausalLM` with random weights built from the same
config; one PEFT adapter per distinct rank; per client: `set_peft_model_state_dict` with its
adapter, a fresh `torch.optim.AdamW`, its local steps, `get_peft_model_state_dict` to collect the
update; then zero-padded weighted averaging to the largest rank and truncation back to each rank.

Model FJ-REF: Llama, vocab 2048, hidden 256, 4 layers, 8 heads, 4 KV heads, intermediate 704,
float32, untied; LoRA on q,k,v,o,gate,up,down, alpha 16, ranks 4/8/16/32 cycling over clients,
AdamW lr 1e-3. Workloads: `ref` (16 clients x 4 steps x batch 8 x 128 tokens) and `xdev`
(64 clients x 2 steps x batch 2 x 64 tokens); on an accelerator (or with `FLOE_BENCH_SCALE=1`)
also `xdev-64` and `xdev-256` (xdev's clients, 64 and 256 per round, vmapped at once), each row
with clients per second. On a GPU, PyTorch runs on the same GPU where its build has CUDA.

Utilisation printed = 4 * N_nonembedding * tokens/s / measured float32 matmul FLOP/s (`util
(4N)`, the issue's figure): LoRA training runs the forward (2N) and the backward through
activations (2N) of the frozen base but never forms base weight gradients. It leaves out the
lm_head, attention's score and value products and the adapters, which here are not small: per
token the lm_head adds 18% to 4N, causal attention 7% at 128 tokens, and the adapters at the
clients' true ranks (mean 15) 14% (floe_jax pads them to rank 32 and so computes 30%). `util
(all)` counts all of it for both sides alike (the same useful work: attention over the causal
half, adapters at their true ranks; `useful_flops`), so it says how close each side runs to the
machine's matmul rate.

The rounds alternate between the implementations (floe_jax, PyTorch 1 thread, PyTorch 2 threads,
then again), and each figure is the median of its rounds: on the shared 2-core development
machine the speed of either side drifts by up to 2x over minutes, so back-to-back blocks would
measure the drift. The README holds the latest figures and the machine they came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import (
    FJ_REF,
    fj_ref_torch,
    machine,
    matmul_gflops,
    print_table,
    timeit_alternating,
)
from floe_jax import sharding
from floe_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig
from floe_jax.federated.client import default_client_chunk
from floe_jax.federated.config import FedConfig
from floe_jax.federated.rounds import init_server_state, run_round
from floe_jax.federated.types import ClientData
from floe_jax.model import init_params

RANKS = (4, 8, 16, 32)
ALPHA = 16.0
LR = 1e-3


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    steps: int
    batch: int
    seq: int
    client_chunk: int  # floe_jax client chunking on this CPU (see client.local_update_clients)
    target: float | None  # wanted floe_jax / PyTorch tokens/s

    @property
    def tokens(self) -> int:
        return self.clients * self.steps * self.batch * self.seq


WORKLOADS = (
    Workload("ref", 16, 4, 8, 128, client_chunk=1, target=1.3),
    Workload("xdev", 64, 2, 2, 64, client_chunk=8, target=3.0),
)
# On an accelerator: the xdev clients at 64 and 256 per round, all vmapped at once (chunk 0),
# reported as clients per second against the PyTorch loop.
SCALE_WORKLOADS = (
    Workload("xdev-64", 64, 2, 2, 64, client_chunk=0, target=None),
    Workload("xdev-256", 256, 2, 2, 64, client_chunk=0, target=None),
)


def workloads(quick: bool = False, scale: bool = False) -> tuple[Workload, ...]:
    """The workloads `run` times: `ref` and `xdev` (tiny stand-ins with `quick`), then the
    64- and 256-client scale runs when `scale`."""
    base = WORKLOADS
    if quick:
        base = (
            Workload("ref-quick", 4, 1, 2, 32, client_chunk=1, target=1.3),
            Workload("xdev-quick", 8, 1, 2, 16, client_chunk=4, target=3.0),
        )
    if not scale:
        return base
    extra = SCALE_WORKLOADS
    if quick:
        extra = tuple(
            dataclasses.replace(w, name=f"{w.name}-quick", clients=w.clients // 16, seq=16)
            for w in extra
        )
    return base + extra


def client_ranks(w: Workload) -> list[int]:
    """Each client's LoRA rank: `RANKS` in turn."""
    return [RANKS[i % len(RANKS)] for i in range(w.clients)]


def useful_flops(cfg: ModelConfig, w: Workload, ranks: list[int]) -> float:
    """Matmul FLOPs of one round's training, counted the same for every implementation: per
    token the frozen base's forward and input gradient (4 per non-embedding weight), the
    lm_head's (4·D·V), attention's score and value products over the causal half (forward
    2 x 2·H·K per key a query sees, backward twice that), and each client's adapters at its
    true rank r (forward 2·r·(I + O) per adapted projection, backward twice that: the input
    gradient and both factors' gradients). Clients train equal token counts."""
    L, D, V, H, K = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.dim_head
    keys_seen = (w.seq + 1) / 2  # mean keys per query under the causal mask
    per_token = 4 * cfg.num_nonembedding_params + 4 * D * V + 3 * 4 * H * K * keys_seen * L
    io = sum(sum(cfg.proj_shape(m)) for m in LORA_TARGETS)  # sum of I + O over projections
    lora = sum(3 * 2 * r * io * L for r in ranks) / len(ranks)
    return w.tokens * (per_token + lora)


def _tokens(w: Workload, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, FJ_REF.vocab_size, (w.clients, w.steps * w.batch, w.seq), np.int32)


# ----------------------------------------------------------------------------- floe_jax


def _jax_round(w: Workload, tokens: np.ndarray, mesh=None):
    """Builds floe_jax's round; returns `one()`, which runs (and blocks on) one round and
    returns its state. With a `mesh`, the round's clients are split over its devices
    (`floe_jax.sharding`)."""
    fed = FedConfig(
        num_rounds=1,
        clients_per_round=w.clients,
        local_steps=w.steps,
        batch_size=w.batch,
        seq_len=w.seq,
        lr=LR,
        weight_decay=0.0,
        optimizer="adamw",
        client_chunk=w.client_chunk,
        lora=LoRAConfig(rank=max(RANKS), alpha=ALPHA),
    )
    params = init_params(FJ_REF, key=jax.random.key(0))
    ranks = client_ranks(w)
    ones = jnp.ones(tokens.shape, jnp.float32)
    data = ClientData(
        tokens=jnp.asarray(tokens),
        mask=ones,
        loss_mask=ones,
        num_examples=jnp.full((w.clients,), tokens.shape[1], jnp.int32),
    )
    state = init_server_state(FJ_REF, fed, ranks=ranks)
    step, in_mesh = run_round, contextlib.nullcontext
    if mesh is not None:
        state, params, data, _ = sharding.place_round_inputs(mesh, state, params, data)
        step, in_mesh = sharding.round_program(mesh), functools.partial(jax.set_mesh, mesh)
    box = [state]

    def one():
        with in_mesh():
            box[0], m = step(box[0], params, data, cfg=FJ_REF, fed=fed)
        jax.block_until_ready((box[0], m))
        return box[0]

    return one


# ----------------------------------------------------------------------------- PyTorch + PEFT


def _torch_round(w: Workload, tokens: np.ndarray, threads: int, device: str = "cpu"):
    """Builds the PyTorch + PEFT round on `device` ("cpu" or "cuda"); returns `one()`, which
    runs one round (on `threads` CPU threads) and waits for the device. On a GPU torch's float32
    matmuls take TF32 inputs, as JAX's do at its default precision (torch's own default there
    is full float32)."""
    import torch
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )

    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base = fj_ref_torch().to(device)
    lcfg = lambda r: LoraConfig(
        r=r, lora_alpha=ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0
    )
    model = get_peft_model(base, lcfg(RANKS[0]), adapter_name=f"r{RANKS[0]}")
    for r in RANKS[1:]:
        model.add_adapter(f"r{r}", lcfg(r))
    model.train()
    r_max = max(RANKS)
    ranks = client_ranks(w)
    # Server state: one global adapter at r_max (PEFT layout: lora_A [r, in], lora_B [out, r]).
    model.set_adapter(f"r{r_max}")
    glob = {
        k: v.detach().clone()
        for k, v in get_peft_model_state_dict(model, None, f"r{r_max}").items()
    }
    data = torch.from_numpy(tokens.astype(np.int64)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def truncate(sd, r):
        out = {}
        for k, v in sd.items():
            out[k] = v[:r].clone() if "lora_A" in k else v[:, :r].clone()
        return out

    def one():
        nonlocal glob
        torch.set_num_threads(threads)
        updates, weights = [], []
        for c in range(w.clients):
            r = ranks[c]
            name = f"r{r}"
            model.set_adapter(name)
            set_peft_model_state_dict(model, truncate(glob, r), adapter_name=name)
            params = [p for n, p in model.named_parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
            x = data[c].view(w.steps, w.batch, w.seq)
            for s in range(w.steps):
                loss = model(input_ids=x[s], labels=x[s]).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sd = get_peft_model_state_dict(model, None, name)
            updates.append({k: v.detach().clone() for k, v in sd.items()})
            weights.append(float(w.steps * w.batch))
        # Zero-padded weighted averaging to r_max.
        tot = sum(weights)
        new = {}
        for k, g in glob.items():
            acc = torch.zeros_like(g)
            for u, p in zip(updates, weights, strict=True):
                v = u[k]
                if "lora_A" in k:
                    acc[: v.shape[0]] += v * (p / tot)
                else:
                    acc[:, : v.shape[1]] += v * (p / tot)
            new[k] = acc
        glob = new
        sync()

    # Warm up kernels and allocator with one step (a whole round would double the run time).
    model.set_adapter(f"r{r_max}")
    model(input_ids=data[0, : w.batch], labels=data[0, : w.batch]).loss.backward()
    model.zero_grad(set_to_none=True)
    sync()
    return one


# ----------------------------------------------------------------------------- devices


def devices_rows(quick: bool = False, repeats: int = 2) -> list[dict]:
    """Clients per second of the `xdev` round against the number of devices (1, 2, 4, 8 where
    present), the round's clients split over a `clients` mesh axis, at a fixed number of
    clients per device (64 on an accelerator: weak scaling), and the scaling efficiency
    `clients/s(n) / (n * clients/s(1))`. On a CPU each row also gives the largest difference
    of the round's global adapters from the same round on one device.

    On a CPU the devices are virtual (`--xla_force_host_platform_device_count`) and share the
    host's cores: the rows check the sharded path, they do not measure scaling (the table
    says so)."""
    accelerator = jax.default_backend() != "cpu"
    per_device = 64 if accelerator else (2 if quick else 4)
    counts = [n for n in (1, 2, 4, 8) if n <= len(jax.devices())]
    rows, first = [], None
    for n in counts:
        w = Workload(f"xdev-{n}dev", per_device * n, 2, 2, 16 if quick else 64,
                     client_chunk=default_client_chunk(), target=None)  # fmt: skip
        toks = _tokens(w)
        one = _jax_round(w, toks, sharding.make_mesh({"clients": n}, jax.devices()[:n]))
        got = [np.asarray(x) for x in jax.tree.leaves(one().global_loras)]  # compiles
        sec = float(np.median([timeit(one) for _ in range(repeats)]))
        first = w.clients / sec if first is None else first
        row = {"devices": n, "clients": w.clients, "round s": sec, "clients/s": w.clients / sec,
               "efficiency": w.clients / sec / (n * first)}  # fmt: skip
        if not accelerator and n > 1:  # the same round on one device
            want = jax.tree.leaves(_jax_round(w, toks)().global_loras)
            row["max abs diff vs 1 device"] = max(
                float(np.max(np.abs(x - np.asarray(y)))) for x, y in zip(got, want, strict=True)
            )
        rows.append(row)
        print(row, flush=True)
    what = (
        f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
        if accelerator
        else "CPU virtual devices: the sharded path's correctness only, not a scaling "
        "measurement (the devices share this host's cores)"
    )
    print_table(rows, title=f"federated round vs devices, xdev shape, {per_device} clients per "
                f"device, {what}")  # fmt: skip
    return rows


def _torch_sides(accelerator: bool) -> list[tuple[str, int, str]]:
    """The PyTorch configurations `run` times by default, as (label, CPU threads, device): on a
    GPU with a CUDA build of torch, torch on that GPU; otherwise torch on the CPU with every core,
    and also with one thread where there are more (OpenMP threads that spin-wait can make the
    multi-threaded run several times slower on a machine shared with other jobs)."""
    import torch

    cores = os.cpu_count() or 1
    if accelerator and torch.cuda.is_available():
        return [("torch+peft cuda", cores, "cuda")]
    return [(f"torch+peft {th} thr", th, "cpu") for th in sorted({cores, 1})]


def timeit(one) -> float:
    t0 = time.perf_counter()
    one()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- driver


def run(
    quick: bool = False,
    torch_threads: tuple[int, ...] | None = None,
    scale: bool | None = None,
) -> list[dict]:
    """Times one round per workload for both implementations; prints and returns the table.

    PyTorch runs in the configurations `_torch_sides` names (`torch_threads` replaces them
    with CPU runs at those thread counts), and the speedup is quoted against the fastest.

    `scale` adds the 64- and 256-client runs (`SCALE_WORKLOADS`); None adds them when JAX's
    default backend is an accelerator, or when the environment sets `FLOE_BENCH_SCALE=1`.
    With JAX on a GPU and a CUDA build of torch, PyTorch runs on the same GPU (one
    configuration, `torch+peft cuda`); the pinned wheel is CPU-only, and with it the PyTorch
    loop runs on the host's CPU.
    """
    if scale is None:
        scale = jax.default_backend() != "cpu" or os.environ.get("FLOE_BENCH_SCALE") == "1"
    accelerator = jax.default_backend() != "cpu"
    sides = [(f"torch+peft {th} thr", th, "cpu") for th in torch_threads or ()]
    if not sides:
        sides = _torch_sides(accelerator)
    repeats = 1 if quick else 2
    peak = matmul_gflops() * 1e9
    n = FJ_REF.num_nonembedding_params
    rows = []
    for w in workloads(quick, scale):
        if accelerator:  # chunking is a CPU cache measure; an accelerator vmaps every client
            w = dataclasses.replace(w, client_chunk=default_client_chunk())
        toks = _tokens(w)
        useful = useful_flops(FJ_REF, w, client_ranks(w))
        impls = [("floe_jax", _jax_round(w, toks))]
        impls += [(label, _torch_round(w, toks, th, dev)) for label, th, dev in sides]
        impls[0][1]()  # compile (a whole PyTorch warm-up round would double the run time)
        medians = timeit_alternating(
            *(one for _, one in impls), repeats=repeats, warmup=0, pause=0.2
        )
        mine = []
        for (impl, _), sec in zip(impls, medians, strict=True):
            mine.append(
                {
                    "workload": w.name,
                    "impl": impl,
                    "C x S x B x T": f"{w.clients}x{w.steps}x{w.batch}x{w.seq}",
                    "round s": sec,
                    "tokens/s": w.tokens / sec,
                    "clients/s": w.clients / sec,
                    "util (4N)": 4 * n * w.tokens / sec / peak,
                    "util (all)": useful / sec / peak,
                }
            )
            print(mine[-1], flush=True)
        best_torch = min(r["round s"] for r in mine[1:])
        mine[0]["speedup"] = best_torch / mine[0]["round s"]
        if w.target is not None:
            mine[0]["target"] = w.target
        rows += mine
    where = ""
    if accelerator:
        where = (
            "; PyTorch on the same GPU" if sides[0][2] == "cuda" else "; PyTorch on the host CPU"
        )
    print_table(
        rows,
        title=f"federated round, FJ-REF, {machine()}, matmul {peak / 1e9:.1f} GFLOP/s{where}",
    )
    return rows + devices_rows(quick, repeats)


if __name__ == "__main__":
    threads = os.environ.get("TORCH_THREADS")  # e.g. "1,2"
    run(
        quick=bool(int(os.environ.get("QUICK", "0"))),
        torch_threads=tuple(int(t) for t in threads.split(",")) if threads else None,
    )
