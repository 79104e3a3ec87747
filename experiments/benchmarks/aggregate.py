"""Aggregation benchmark: every rule's jitted call against its hardware bound, FedIT and FlexLoRA
beside NumPy references (interleaved in time), and the share of a round each rule takes.

Setup: Qwen2.5-0.5B's shapes (hidden 896, 24 layers, intermediate 4864, 14 heads, 2 KV heads,
head dim 64), LoRA on all seven projections, 64 clients with ranks cycling 4/8/16/32 padded to
R = 32, random factors with nonzero B (~4.5 GB float32). The NumPy competitor does what public
FlexLoRA code does: loop over layers and modules, form each full ΔW = Σ p_k s_k A_k B_k from the
true-rank factors, take the dense `np.linalg.svd`, and slice each client's rank out of it.
`quick=True` runs 1 layer and 4 clients (one per rank). `flexlora` takes the `total_rank` a
federated round takes (`rounds.round_config`: the live-rank bound of the round's clients, K = 960
at 64 clients), `flexlora, padded` the same rule over all C x R columns (K = 2048).

Bounds, measured in the same run on the same machine: a rule must read the clients' factors
(`bytes_read`) and write its result (`bytes_written`, every leaf of the jitted call's output);
the bandwidth bound prices the read at a jitted full-array sum's read rate (a read-only pass
is bound by the read rate) and the write at the in-place (donated) `x * c`'s rate per byte moved
(its read and write together run faster than a read alone, so that rate would price a read too
cheaply to bound a read-only pass; the README gives the measured rates). A factored rule also
pays the FLOPs of its factorizations (`flops`: the stacked products, Gram matrices, tridiagonal
reductions of the eigenproblems, counted on the program's static shapes, padding included),
priced at a jitted 2048² matmul's rate (8192² on an accelerator). `bound_s` is the larger of
the two, `pct_of_bound` = bound_s / measured. `fresh_bound_s` prices the write instead at a
copy into a newly allocated array, which is what XLA:CPU pays for each output it allocates (one
page fault per 4 KiB page on first touch).

The `round path` rows time what a federated round runs (`aggregate_jit(..., downloads=False)`):
no per-client copies of the global adapter, so an averaging rule reads the factors and writes
1/C of them. Their program screens in one pass (`aggregate.screen_aggregate`: the rule's own
read of the factors finds a NaN/Inf); each runs interleaved with the two-pass program it
replaced (`one_pass=False`: the screening's read, then the rule's; alternating calls, medians),
the `round path, two-pass` rows, priced at the same bound, `vs_two_pass` their ratio. FedIT's
round path also runs interleaved with the same average in NumPy. The factored rules' round
paths (FLoRA, FedEx, FlexLoRA) keep the two-pass screening and run alone; FLoRA's draws fresh
factors for the global adapter only, which every client restarts from, where its downloads
draw one fresh adapter per client. `round_path_only=True` runs
the rates and the round-path rows alone (no train step, so no `round_share_pct`).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import block, machine, print_table, timeit, timeit_alternating
from floe_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig
from floe_jax.federated import aggregate as agg
from floe_jax.federated.client import make_optimizer, optimized_factors, train_step
from floe_jax.federated.config import AggregationConfig, FedConfig
from floe_jax.federated.linalg import dense_gram_flops, lapack_threads
from floe_jax.federated.rounds import round_config
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


def numpy_fedit(lora: LoRA, weights: np.ndarray, ranks: np.ndarray) -> dict:
    """FedIT in NumPy: masked weighted average of A and B, sent back in each client's slots."""
    p = weights / weights.sum()
    live = (np.arange(lora.max_rank)[None] < ranks[:, None]).astype(np.float32)  # [C, R]
    out = {}
    for m in lora.a:
        a, b = np.asarray(lora.a[m]), np.asarray(lora.b[m])
        g_a = np.tensordot(p, a * live[:, None, None, :], axes=1)
        g_b = np.tensordot(p, b * live[:, None, :, None], axes=1)
        out[m] = (g_a[None] * live[:, None, None, :], g_b[None] * live[:, None, :, None])
    return out


def numpy_fedit_global(lora: LoRA, weights: np.ndarray, ranks: np.ndarray) -> dict:
    """The round's FedIT in NumPy: only the global average of A and B (no per-client copies)."""
    p = weights / weights.sum()
    live = (np.arange(lora.max_rank)[None] < ranks[:, None]).astype(np.float32)  # [C, R]
    return {
        m: (
            np.tensordot(p, np.asarray(lora.a[m]) * live[:, None, None, :], axes=1),
            np.tensordot(p, np.asarray(lora.b[m]) * live[:, None, :, None], axes=1),
        )
        for m in lora.a
    }


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


def hardware_rates(nbytes: int, n_matmul: int) -> dict:
    """This machine's rates, measured now: memory bandwidth from an in-place (donated) `x * c`
    (reads and writes nbytes each), a jitted sum's read rate and a copy into a fresh array for
    comparison, and the float32 matmul rate of an `n_matmul`² product at full precision
    (an accelerator's default, TF32 or bfloat16 passes, is faster than what the rules run)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    block(total(x))
    t_read = timeit(lambda: block(total(x)), repeats=5)
    fresh = jax.jit(lambda v: v * 1.0001)
    block(fresh(x))
    t_fresh = timeit(lambda: block(fresh(x)), repeats=5)
    inplace = jax.jit(lambda v: v * 1.0001, donate_argnums=0)
    box = [block(x * 1.0)]

    def step():
        box[0] = block(inplace(box[0]))

    step()
    t_inplace = timeit(step, repeats=5)

    a = jnp.ones((n_matmul, n_matmul), jnp.float32)
    with jax.default_matmul_precision("highest"):  # as the rules run (`aggregate_clusters`)
        mm = jax.jit(lambda v: v @ v)
        block(mm(a))
        t_mm = timeit(lambda: block(mm(a)), repeats=5)
    per_byte = t_inplace / (2 * nbytes)  # the in-place copy moves 2 nbytes
    return {
        "bandwidth_GBps": 1e-9 / per_byte,
        "sum_read_GBps": nbytes / t_read / 1e9,
        "fresh_copy_GBps": 2e-9 * nbytes / t_fresh,
        "matmul_GFLOPs": 2 * n_matmul**3 / t_mm / 1e9,
        "s_per_byte": per_byte,
        "read_s_per_byte": t_read / nbytes,
        "fresh_write_s_per_byte": max(t_fresh / nbytes - per_byte, per_byte),
    }


def _eigh_flops(n: int, r: int) -> float:
    """Tridiagonal reduction (4/3 n³) plus back-transformation of r eigenvectors (2 n² r)."""
    return 4 / 3 * n**3 + 2 * n * n * r


def rule_flops(method: str, lora: LoRA, total_rank: int | None = None) -> float:
    """FLOPs of a rule's products and factorizations on the program's shapes (padding included):
    FLoRA's stacked product `P Q` (K = C R), FedEx's with its R extra residual columns,
    FlexLoRA's dense path (the Gram of ΔW's shorter side by the route `linalg.dense_gram_flops`
    picks, its top-R eigenpairs, the projection back) or factored path (K x K Gram and
    eigenproblems, `floe_jax.federated.linalg`). 0 for the averaging rules (memory-bound)."""
    C, R = lora.scale.shape[0], lora.max_rank
    total = 0.0
    for m in lora.a:
        _, L, I, _ = lora.a[m].shape
        O = lora.b[m].shape[-1]
        K = C * R if total_rank is None else min(total_rank, C * R)
        if method == "flora":
            total += L * 2 * I * K * O
        elif method == "fedex":
            total += L * 2 * I * (K + R) * O
        elif method == "flexlora":
            r = min(R, K, I, O)
            if K < min(I, O):  # top_svd_factored
                per = 2 * I * K * K + _eigh_flops(K, K) + 2 * K * K * O  # pᵀp, eigh, Eᵀq
                per += 2 * K * K * O + _eigh_flops(K, r) + 2 * K * O * r  # M Mᵀ, top eigh, v
                per += 2 * I * K * K + 2 * I * K * r  # p E, then U_core
            else:  # top_svd_dense: the cheaper Gram route, and the n x n eigenproblem
                per = min(dense_gram_flops(I, K, O, r)) + _eigh_flops(min(I, O), r)
            total += L * per
    return total


def run(quick: bool = False, clients: int | None = None, round_path_only: bool = False):
    """The table's rows; `clients` overrides the client count (64, or 4 with `quick`), for a
    machine without memory for 64 clients' factors and the full programs' outputs (about 13
    GiB); `round_path_only` times the round-path rows alone."""
    layers, clients = (1, clients or 4) if quick else (24, clients or 64)
    cmp_layers = 1 if quick else 4  # layers of the side-by-side FlexLoRA comparison
    cfg = qwen_shapes(num_layers=layers, vocab_size=4096 if quick else 151936)
    R = max(RANK_CYCLE)
    ranks = np.array([RANK_CYCLE[k % len(RANK_CYCLE)] for k in range(clients)], np.int32)
    weights = np.random.default_rng(0).integers(50, 500, clients).astype(np.float32)
    load = lambda: "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# aggregate: {machine()}; {clients} clients, ranks {RANK_CYCLE} padded to {R}, "
        f"{layers} layers, LoRA on {len(LORA_TARGETS)} projections; {load()}",
        flush=True,
    )
    # On an accelerator 1 GiB is read in well under a millisecond and a 2048² product takes
    # microseconds: larger probes there, so that dispatch does not count as the rate.
    big = jax.default_backend() != "cpu"
    rates = hardware_rates(
        2**26 if quick else 2**32 if big else 2**30, 512 if quick else 8192 if big else 2048
    )
    print("# rates: " + ", ".join(f"{k} {v:.4g}" for k, v in rates.items()), flush=True)
    t0 = time.perf_counter()
    lora = random_clients(cfg, ranks, R, key=jax.random.key(0))
    factor_bytes = sum(x.nbytes for x in jax.tree.leaves((lora.a, lora.b)))
    print(f"# built clients: {factor_bytes / 2**30:.2f} GiB of factors in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)  # fmt: skip
    w, r = agg.validate(lora, weights, ranks)
    reps = 3 if quick else 2
    labels, key = np.zeros(r.shape, np.int32), jax.random.key(0)

    def program(method, client_loras, downloads=True, one_pass=True, **options):
        opts = tuple(sorted(options.items()))
        first = jax.tree.map(lambda x: x[0], client_loras)
        state = agg.init_states(agg.make_rule(method, **options), first, 1, key=key)
        args = (method, opts, None, 1, state, client_loras, w, r, labels, key)
        call = functools.partial(agg.aggregate_jit, downloads=downloads, one_pass=one_pass)
        written = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
            agg.aggregate_jit.eval_shape(*args, downloads=downloads)))  # fmt: skip
        return (lambda: block(call(*args))), written

    def first_call(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    round_s = None
    if not round_path_only:
        step_s = train_step_seconds(qwen_shapes(num_layers=layers, vocab_size=cfg.vocab_size))
        round_s = clients * step_s  # one local step per client, trained one after another
    rows = []

    def row(name, method, sec, written, **extra):
        flops = rule_flops(method, lora, extra.pop("total_rank", None))
        read_s = factor_bytes * rates["read_s_per_byte"]
        byte_s = read_s + written * rates["s_per_byte"]
        fresh_s = read_s + written * rates["fresh_write_s_per_byte"]
        bound = max(byte_s, flops / (rates["matmul_GFLOPs"] * 1e9))
        rows.append({
            "rule": name, "floe_jax_s": sec, **extra,
            "GiB_read": factor_bytes / 2**30, "GiB_written": written / 2**30,
            "TFLOP": flops / 1e12, "bound_s": bound, "pct_of_bound": 100 * bound / sec,
            "fresh_bound_s": max(fresh_s, flops / (rates["matmul_GFLOPs"] * 1e9)),
        })  # fmt: skip
        if round_s is not None:
            rows[-1]["round_share_pct"] = 100 * sec / (round_s + sec)
        print(rows[-1], flush=True)

    averaging = ("fedit", "hetlora", "ffa", "fedsa")
    cases = [(m, m, {}) for m in (*averaging, "flora", "fedex")]
    # FlexLoRA with a round's `total_rank` (`rounds.round_config`: the live-rank bound of the
    # round's clients), and padded to C x R columns (no `total_rank`)
    flex_k = round_config(
        FedConfig(agg=AggregationConfig(method="flexlora"), clients_per_round=clients), ranks
    ).agg.total_rank
    cases += [
        ("flexlora", "flexlora", {"total_rank": flex_k}),
        ("flexlora, padded", "flexlora", {}),
    ]
    for name, method, options in [] if round_path_only else cases:
        fn, written = program(method, lora, **options)
        first_s = first_call(fn)
        sec = timeit(fn, repeats=reps, warmup=0)
        row(name, method, sec, written, first_call_s=first_s, **options)
    # The round path, one pass against the two-pass program, interleaved (a round-path call
    # takes 0.2-0.4 s at 64 clients: more repeats for a steadier median on a busy host).
    for method in averaging:
        one_fn, written = program(method, lora, downloads=False)
        two_fn, _ = program(method, lora, downloads=False, one_pass=False)
        first_s = first_call(one_fn)
        first_call(two_fn)
        t_one, t_two = timeit_alternating(one_fn, two_fn, repeats=5 if not quick else 3, warmup=0)
        row(f"{method}, round path", method, t_one, written, first_call_s=first_s,
            vs_two_pass=t_two / t_one)  # fmt: skip
        row(f"{method}, round path, two-pass", method, t_two, written)
    # The factored rules' round path: one program each (they keep the two-pass screening).
    # FLoRA's round draws only the global adapter's fresh factors (the clients restart from
    # it), not one fresh adapter per client.
    for name, method, options in [c for c in cases if c[1] not in averaging]:
        fn, written = program(method, lora, downloads=False, **options)
        first_s = first_call(fn)
        sec = timeit(fn, repeats=reps, warmup=0)
        row(f"{name}, round path", method, sec, written, first_call_s=first_s, **options)
    if round_path_only:
        print(f"# {load()}", flush=True)
        print_table(rows, title=f"Aggregation round path, {clients} clients ({machine()})")
        return rows

    # The averaging rules with the clients' factors donated (`aggregate_jit_donating`): outputs
    # go into the clients' buffers instead of new ones. Each call gets a fresh copy, made (and
    # its pages touched) outside the timed region.
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
    for method in ("fedit", "fedsa"):
        state = agg.init_states(
            agg.make_rule(method), jax.tree.map(lambda x: x[0], lora), 1, key=key
        )
        times = []
        for _ in range(reps + 1):  # the first call compiles
            given = block(copy(lora))
            t = time.perf_counter()
            block(agg.aggregate_jit_donating(method, (), None, 1, state, given, w, r, labels, key))
            times.append(time.perf_counter() - t)
            del given
        sec = float(np.median(times[1:]))
        bound = next(row["bound_s"] for row in rows if row["rule"] == method)
        rows.append({"rule": f"{method}, factors donated", "floe_jax_s": sec,
                     "first_call_s": times[0], "bound_s": bound, "pct_of_bound": 100 * bound / sec,
                     "round_share_pct": 100 * sec / (round_s + sec)})  # fmt: skip
        print(rows[-1], flush=True)

    # Side by side, interleaved (alternating calls, medians): FedIT against NumPy at full size,
    # FlexLoRA against the NumPy SVD loop on the first `cmp_layers` layers of the same clients.
    # NumPy runs with OpenBLAS at one thread, as floe_jax's own LAPACK calls do (`lapack_threads`).
    for name, downloads, reference in (
        ("fedit", True, numpy_fedit),
        ("fedit, round path", False, numpy_fedit_global),
    ):
        fedit_fn, _ = program("fedit", lora, downloads=downloads)
        with lapack_threads(1):
            t_jax, t_np = timeit_alternating(
                fedit_fn, lambda ref=reference: ref(lora, weights, ranks), repeats=reps, warmup=0
            )
        rows.append(
            {
                "rule": f"{name}, interleaved",
                "floe_jax_s": t_jax,
                "numpy_s": t_np,
                "speedup": t_np / t_jax,
            }
        )
        print(rows[-1], flush=True)  # fmt: skip
    sub = jax.tree.map(lambda x: x[:, :cmp_layers] if x.ndim > 2 else x, lora)
    sub = block(jax.tree.map(jnp.copy, sub))
    flex_fn, _ = program("flexlora", sub, total_rank=flex_k)
    flex_fn()
    ref = {}
    np_flex = lambda: ref.update(numpy_flexlora(sub, weights, ranks))
    with lapack_threads(1):
        t_jax, t_np = timeit_alternating(flex_fn, np_flex, repeats=1 if quick else reps, warmup=0)
    rows.append({"rule": f"flexlora ({cmp_layers} layers), interleaved", "floe_jax_s": t_jax,
                 "numpy_s": t_np, "speedup": t_np / t_jax})  # fmt: skip
    print(rows[-1], flush=True)
    out = agg.aggregate_jit(
        "flexlora", (("total_rank", flex_k),), None, 1, ((),), sub, w, r, labels, key
    )
    ours = out[0].client_loras
    err = 0.0  # each client's s_k A_k B_k, layer 0, every module (singular vectors may flip sign)
    for m in LORA_TARGETS:
        for k in range(min(4, clients)):
            one = jax.tree.map(lambda x, k=k: x[k, :1] if x.ndim > 1 else x[k], ours)
            got = np.asarray(delta_weight(one, m))
            a_np, b_np = ref[m][0][k, :1], ref[m][1][k, :1]
            want = np.einsum("lir,lro->lio", a_np, b_np) * float(lora.scale[k])
            err = max(err, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)))
    del ours
    ref.clear()
    rows.append({"rule": "flexlora vs numpy max rel. diff (layer 0)", "speedup": err})
    rows.append({"rule": f"one local train step (1x64 tok, rank 8); round = {clients} of them",
                 "floe_jax_s": step_s, "round_s": round_s})  # fmt: skip
    print(f"# {load()}", flush=True)
    print_table(rows, title=f"Aggregation, {clients} clients ({machine()})")
    return rows
