"""One client's local training step, adapter by adapter: where `bench round`'s time goes.

Both sides train one client of `bench round`'s `ref` workload (FJ-REF, batch 8 x 128 tokens,
AdamW lr 1e-3, loss on every token), side by side in one process:

- floe_jax: `local_update` (its `lax.scan` over 4 local steps, jitted), timed per step;
- PyTorch + PEFT: a transformers `LlamaForCausalLM` with a PEFT adapter, per step forward,
  backward and `AdamW.step`.

Adapters: `base`, rank 1 on q_proj only, so nearly all of the step is the frozen base's forward
and its backward through the activations: the floor under any LoRA step; `r4` ... `r32`, LoRA on
all seven projections at that rank (floe_jax unpadded: the adapter's padded rank is its rank);
`forward`, the loss alone without a gradient. The summary lines put `bench round` in these terms:
in a round floe_jax trains every client at the padded rank 32 (one compiled program for all
ranks), PyTorch each at its own rank, so `ref`'s speed-up is PyTorch's mean step over ranks 4 /
8 / 16 / 32 against floe_jax's rank-32 step, and the step time a target speed-up asks for can be
set against floe_jax's base floor.
"""

from __future__ import annotations

import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import (
    FJ_REF,
    fj_ref_torch,
    machine,
    print_table,
    timeit_alternating,
)
from experiments.benchmarks.round import ALPHA, LR, RANKS, WORKLOADS
from floe_jax.config import LORA_TARGETS, LoRAConfig
from floe_jax.federated.client import local_update, make_optimizer
from floe_jax.lora import init_lora
from floe_jax.loss import token_loss
from floe_jax.model import init_params

ROUND_RANKS = tuple(f"r{r}" for r in RANKS)  # `bench round`'s clients cycle over these
ADAPTERS = {"base": (1, ("q_proj",)), **{f"r{r}": (r, LORA_TARGETS) for r in RANKS}}
REF = next(w for w in WORKLOADS if w.name == "ref")  # one of its clients is timed here
STEPS = REF.steps  # local steps per timed call


def _tokens(batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, FJ_REF.vocab_size, (STEPS, batch, seq), np.int32)


def _jax_steps(tokens: np.ndarray):
    """`{adapter: one()}`; each `one()` runs STEPS local steps and blocks; plus `forward`."""
    params = init_params(FJ_REF, key=jax.random.key(0))
    toks = jnp.asarray(tokens)
    ones = jnp.ones(toks.shape, jnp.float32)
    batches = {"tokens": toks, "mask": ones, "loss_mask": ones}
    opt = make_optimizer("adamw", lr=LR)
    out = {}
    for name, (rank, targets) in ADAPTERS.items():
        lcfg = LoRAConfig(rank=rank, alpha=ALPHA, targets=targets)
        lora = init_lora(FJ_REF, lcfg, key=jax.random.key(1))
        step = jax.jit(lambda p, lo, b: local_update(p, lo, b, cfg=FJ_REF, opt=opt))
        jax.block_until_ready(step(params, lora, batches))  # compile
        out[name] = lambda step=step, lora=lora: jax.block_until_ready(step(params, lora, batches))
    loss = jax.jit(lambda p, t, m: token_loss(p, None, t, m, m, cfg=FJ_REF))
    jax.block_until_ready(loss(params, toks[0], ones[0]))
    out["forward"] = lambda: jax.block_until_ready(
        [loss(params, toks[s], ones[s]) for s in range(STEPS)]
    )
    return out


def _torch_steps(tokens: np.ndarray, threads: int):
    """The same as `_jax_steps` with PyTorch + PEFT on `threads` threads."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(threads)
    data = torch.from_numpy(tokens.astype(np.int64))
    plain = fj_ref_torch()  # `forward`: the base alone, as on floe_jax's side
    out = {}
    for name, (rank, targets) in ADAPTERS.items():
        base = fj_ref_torch(seed=1)
        lcfg = LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0)
        model = get_peft_model(base, lcfg)
        model.train()

        def one(model=model):
            opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
            )
            for s in range(STEPS):
                model(input_ids=data[s], labels=data[s]).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        one()  # warm up kernels and the allocator
        out[name] = one

    def forward():
        with torch.no_grad():
            for s in range(STEPS):
                plain(input_ids=data[s], labels=data[s])  # logits and loss, as token_loss

    out["forward"] = forward
    return out


def run(quick: bool = False) -> list[dict]:
    """Times every adapter's step on both sides, alternating; prints and returns the table."""
    batch, seq = (2, 32) if quick else (REF.batch, REF.seq)
    repeats = 1 if quick else 5
    threads = os.cpu_count() or 1
    tokens = _tokens(batch, seq)
    mine, theirs = _jax_steps(tokens), _torch_steps(tokens, threads)
    fns = [f for name in mine for f in (mine[name], theirs[name])]
    secs = timeit_alternating(*fns, repeats=repeats, warmup=1, pause=0.1)
    rows = []
    for i, name in enumerate(mine):
        jax_ms, torch_ms = (1e3 * secs[2 * i + j] / STEPS for j in (0, 1))
        rows.append(
            {
                "adapter": name,
                "floe_jax ms/step": jax_ms,
                f"torch+peft {threads} thr ms/step": torch_ms,
                "speed-up": torch_ms / jax_ms,
            }
        )
    print_table(
        rows,
        title=f"one client's local step, FJ-REF, batch {batch} x {seq}, {machine()}",
    )
    ms = {
        r["adapter"]: (r["floe_jax ms/step"], r[f"torch+peft {threads} thr ms/step"]) for r in rows
    }
    torch_round = statistics.mean(ms[n][1] for n in ROUND_RANKS)
    need = torch_round / REF.target
    print(
        f"bench round's ref in these terms{' (quick: not its shapes)' if quick else ''}: "
        f"PyTorch's mean step over ranks 4/8/16/32 "
        f"{torch_round:.1f} ms against floe_jax's padded rank-32 step {ms['r32'][0]:.1f} ms "
        f"({torch_round / ms['r32'][0]:.2f}x); floe_jax's mean at the clients' own ranks would "
        f"be {statistics.mean(ms[n][0] for n in ROUND_RANKS):.1f} ms. {REF.target}x asks for "
        f"{need:.1f} ms per step; floe_jax's base floor (no adapter to speak of) is "
        f"{ms['base'][0]:.1f} ms.",
        flush=True,
    )
    return rows


if __name__ == "__main__":
    run(quick=bool(int(os.environ.get("QUICK", "0"))))
