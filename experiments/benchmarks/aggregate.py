"""Aggregation benchmark: every rule's jitted round, FlexLoRA against a NumPy loop, and one local
training step of the same model for scale.

Setup: Qwen2.5-0.5B's shapes (hidden 896, 24 layers, intermediate 4864, 14 heads, 2 KV heads,
head dim 64), LoRA on all seven projections, 64 clients with ranks cycling 4/8/16/32 padded to
R = 32, random factors with nonzero B (~4.5 GB float32). The NumPy competitor does what public
FlexLoRA code does: loop over layers and modules, form each full ΔW = Σ p_k s_k A_k B_k from the
true-rank factors, take the dense `np.linalg.svd`, and slice each client's rank out of it.
`quick=True` runs 1 layer and 4 clients (one per rank).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import block, machine, print_table, timeit
from floe_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig
from floe_jax.federated import aggregate as agg
from floe_jax.federated.client import make_optimizer, optimized_factors, train_step
from floe_jax.lora import LoRA, delta_weight, init_lora
from floe_jax.model import init_params

RANK_CYCLE = (4, 8, 16, 32)
ALPHA = 16.0


def qwen_shapes(num_layers: int = 24, vocab_size: int = 151936) -> ModelConfig:
    return ModelConfig(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=num_layers,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        qkv_bias=True,
        tie_word_embeddings=True,
    )


def random_clients(cfg: ModelConfig, ranks: np.ndarray, max_rank: int, *, key) -> LoRA:
    """Stacked random adapters (A and B nonzero on live slots), built on the device in one jit."""
    C, L = len(ranks), cfg.num_layers

    @jax.jit
    def build(ranks, key):
        live = (jnp.arange(max_rank)[None] < ranks[:, None]).astype(jnp.float32)  # [C, R]
        mask_CLR = jnp.broadcast_to(live[:, None], (C, L, max_rank))
        a, b, mask = {}, {}, {}
        for m, k in zip(LORA_TARGETS, jax.random.split(key, len(LORA_TARGETS)), strict=True):
            i, o = cfg.proj_shape(m)
            ka, kb = jax.random.split(k)
            a[m] = jax.random.uniform(ka, (C, L, i, max_rank), jnp.float32, -1, 1) / np.sqrt(i)
            a[m] = a[m] * mask_CLR[:, :, None, :]
            b[m] = 0.01 * jax.random.normal(kb, (C, L, max_rank, o), jnp.float32)
            b[m] = b[m] * mask_CLR[..., None]
            mask[m] = mask_CLR
        return LoRA(a=a, b=b, mask=mask, scale=ALPHA / ranks.astype(jnp.float32))

    return block(build(jnp.asarray(ranks, jnp.int32), key))


def numpy_flexlora(lora: LoRA, weights: np.ndarray, ranks: np.ndarray) -> dict:
    """FlexLoRA as public code does it: per layer and module, dense ΔW and full `np.linalg.svd`."""
    p = weights / weights.sum()
    scale = np.asarray(lora.scale)
    out = {}
    for m in lora.a:
        a_all, b_all = np.asarray(lora.a[m]), np.asarray(lora.b[m])  # one module on the host
        a_new = np.zeros_like(a_all)
        b_new = np.zeros_like(b_all)
        for layer in range(a_all.shape[1]):
            dw = sum(
                p[k] * scale[k] * a_all[k, layer, :, : ranks[k]] @ b_all[k, layer, : ranks[k]]
                for k in range(len(ranks))
            )
            u, s, vh = np.linalg.svd(dw, full_matrices=False)
            for k, r in enumerate(ranks):
                root = np.sqrt(s[:r] / scale[k])
                a_new[k, layer, :, :r] = u[:, :r] * root
                b_new[k, layer, :r] = root[:, None] * vh[:r]
        out[m] = (a_new, b_new)
    return out


def train_step_seconds(cfg: ModelConfig, *, rank: int = 8, seq: int = 64) -> float:
    """One jitted local training step (`client.train_step`, the round's own) of one client."""
    params = init_params(cfg, key=jax.random.key(0))
    lora = init_lora(cfg, LoRAConfig(rank=rank, alpha=ALPHA), key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (1, seq + 1), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "mask": jnp.ones_like(tokens), "loss_mask": jnp.ones_like(tokens)}
    opt = make_optimizer("adamw", lr=1e-3)
    opt_state = opt.init(optimized_factors(lora))
    step = jax.jit(functools.partial(train_step, cfg=cfg, opt=opt))
    return timeit(lambda: block(step(params, lora, opt_state, batch)), repeats=5)


def run(quick: bool = False) -> list[dict]:
    layers, clients = (1, 4) if quick else (24, 64)
    cfg = qwen_shapes(num_layers=layers, vocab_size=4096 if quick else 151936)
    R = max(RANK_CYCLE)
    ranks = np.array([RANK_CYCLE[k % len(RANK_CYCLE)] for k in range(clients)], np.int32)
    weights = np.random.default_rng(0).integers(50, 500, clients).astype(np.float32)
    print(
        f"# aggregate: {machine()}; {clients} clients, ranks {RANK_CYCLE} padded to {R}, "
        f"{layers} layers, LoRA on {len(LORA_TARGETS)} projections",
        flush=True,
    )
    t0 = time.perf_counter()
    lora = random_clients(cfg, ranks, R, key=jax.random.key(0))
    gib = sum(x.nbytes for x in jax.tree.leaves(lora)) / 2**30
    print(f"# built clients: {gib:.2f} GiB in {time.perf_counter() - t0:.1f}s", flush=True)
    w, r = agg.validate(lora, weights, ranks)
    rows = []
    reps = 3 if quick else 2

    labels, key = np.zeros(r.shape, np.int32), jax.random.key(0)

    def jitted(method, **options):
        opts = tuple(sorted(options.items()))
        first = jax.tree.map(lambda x: x[0], lora)
        state = agg.init_states(agg.make_rule(method, **options), first, 1, key=key)
        fn = lambda: block(agg.aggregate_jit(method, opts, None, 1, state, lora, w, r, labels, key))
        t = time.perf_counter()
        fn()
        compile_s = time.perf_counter() - t
        return timeit(fn, repeats=reps, warmup=0), compile_s

    for method in ("fedit", "hetlora", "ffa", "fedsa", "flora", "fedex"):
        sec, comp = jitted(method)
        rows.append({"rule": method, "floe_jax_s": sec, "first_call_s": comp})
        print(rows[-1], flush=True)
    flex = {}
    for name, opts in (("flexlora", {}), ("flexlora total_rank", {"total_rank": int(ranks.sum())})):
        flex[name], comp = jitted("flexlora", **opts)
        rows.append({"rule": name, "floe_jax_s": flex[name], "first_call_s": comp})
        print(rows[-1], flush=True)

    t = time.perf_counter()
    ref = numpy_flexlora(lora, weights, ranks)
    numpy_s = time.perf_counter() - t
    # agreement: each client's s_k A_k B_k, layer 0, every module (singular vectors may flip sign)
    out = agg.aggregate_jit("flexlora", (), None, 1, ((),), lora, w, r, labels, key)
    ours = out[0].client_loras
    err = 0.0
    for m in LORA_TARGETS:
        for k in range(min(4, clients)):
            one = jax.tree.map(lambda x, k=k: x[k, :1] if x.ndim > 1 else x[k], ours)
            got = np.asarray(delta_weight(one, m))
            a_np, b_np = ref[m][0][k, :1], ref[m][1][k, :1]
            want = np.einsum("lir,lro->lio", a_np, b_np) * float(lora.scale[k])
            err = max(err, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)))
    del ours, ref
    rows.append({"rule": "flexlora numpy loop", "floe_jax_s": numpy_s})
    for name, sec in flex.items():
        rows.append({"rule": f"{name} speed-up vs numpy", "ratio": numpy_s / sec})
    rows.append({"rule": "flexlora vs numpy max rel. diff (layer 0)", "ratio": err})
    train_cfg = qwen_shapes(num_layers=layers, vocab_size=4096 if quick else 151936)
    rows.append(
        {
            "rule": "one local train step (1x64 tok, rank 8)",
            "floe_jax_s": train_step_seconds(train_cfg),
        }
    )
    print_table(rows, title=f"Aggregation, {clients} clients ({machine()})")
    return rows
