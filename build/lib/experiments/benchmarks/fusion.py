"""Fusion benchmark: the cost of fusing, and per-token latency under a simulated network.

1. Step time of the fused decode step (edge forward + alignment + router + fusion + sampling, one
   program, cloud distribution precomputed) against the edge-only decode step
   (`floe_jax.decode.decode_step`), for the FJ-REF model at batch 1 and 8: the fusion overhead.
2. End-to-end per-token latency of edge-only, cloud-only and fused decoding under a simulated
   50 ms and 150 ms mean round trip (`SimClock`: measured edge and cloud compute, simulated
   network), with the share of tokens the cloud made in time.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import FJ_REF, block, machine, print_table
from floe_jax.config import LoRAConfig
from floe_jax.decode import (
    SamplingConfig,
    decode_step_jit,
    first_token_jit,
    pad_prompts,
    prefill_jit,
)
from floe_jax.inference.cloud import LocalCloud
from floe_jax.inference.deadline import SimClock, SimulatedNetwork
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.replies import CloudInput
from floe_jax.inference.router import FusionConfig
from floe_jax.inference.step import fuse_sample_jit, fused_step_jit, rows_lora
from floe_jax.lora import init_lora, stack_loras
from floe_jax.model import init_params, unstack_layers


def _dense_input(B: int, V: int, key) -> CloudInput:
    z = np.zeros((B, 0))
    lp = jax.nn.log_softmax(jax.random.normal(key, (B, V)) * 3)
    return CloudInput(jnp.ones(B, bool), lp, jnp.zeros((0,), jnp.int32), z.astype(np.int32),
                      z.astype(np.float32), z.astype(bool))  # fmt: skip


def _sparse_input(B: int, V: int, K: int, key) -> CloudInput:
    lp = jax.nn.log_softmax(jax.random.normal(key, (B, V)) * 3)
    top, ids = jax.lax.top_k(lp, K)
    return CloudInput(jnp.ones(B, bool), jnp.zeros((B, 0)), jnp.zeros((0,), jnp.int32),
                      ids.astype(jnp.int32), top, jnp.ones((B, K), bool))  # fmt: skip


def _fused_state(params, cfg, tokens, mask, key, N, lora):
    B = tokens.shape[0]
    st, lg = prefill_jit(params, tokens, mask, cfg, max_new_tokens=N, key=key, lora=lora,
                         done=jnp.zeros(B, bool))  # fmt: skip
    st, _ = fuse_sample_jit(st, lg, _dense_input(B, cfg.vocab_size, key), fusion=FusionConfig(),
                            sampling=SamplingConfig(), eos_id=None, pad_id=0)  # fmt: skip
    return st


def _once(variants, states, name, steps) -> float:
    fn, s = variants[name][0], states[name]
    t0 = time.perf_counter()
    for _ in range(steps):
        s = fn(s)
    block(s.token)
    states[name] = s
    return (time.perf_counter() - t0) / steps


def step_rows(quick: bool, attention_impl: str = "reference") -> list[dict]:
    """Edge-only and fused steps timed in interleaved rounds (a busy machine drifts: each round
    measures every variant back to back, and the median over rounds is reported)."""
    cfg = dataclasses.replace(FJ_REF, attention_impl=attention_impl)
    params = unstack_layers(init_params(cfg, key=jax.random.key(0)))
    greedy = SamplingConfig()
    steps = 10 if quick else 40
    rounds = 5 if quick else 15
    rows = []
    for B in (1, 8):
        prompts = [list(range(1 + b, 13 + b)) for b in range(B)]
        tokens, mask = pad_prompts(prompts)
        N = 128  # cache slots P + N; indices past the end clamp, which keeps every step's shape
        key = jax.random.key(1)
        dense, sparse = (
            _dense_input(B, cfg.vocab_size, key),
            _sparse_input(B, cfg.vocab_size, 20, key),
        )
        fused = lambda fusion, ci, lora=None: (
            lambda s: fused_step_jit(params, s, ci, cfg, fusion=fusion, sampling=greedy,
                                     lora=lora, eos_id=None, pad_id=0)[0]
        )  # fmt: skip
        logits = jnp.zeros((B, cfg.vocab_size))
        fresh = functools.partial(_fused_state, params, cfg, tokens, mask, key, N)
        variants = {
            "edge-only decode_step": (
                lambda s: decode_step_jit(params, s, cfg=cfg, sampling=greedy, eos_id=None)[0],
                first_token_jit(params, tokens, mask, max_new_tokens=N, key=key, cfg=cfg,
                                sampling=greedy, eos_id=None, lora=None),
            ),
            "fused, dense cloud, entropy gate, prob space": (
                fused(FusionConfig(), dense), fresh(None)),
            "fused, top-20 cloud, entropy gate, prob space": (
                fused(FusionConfig(), sparse), fresh(None)),
            "fused, dense cloud, entropy gate, log space": (
                fused(FusionConfig(space="log"), dense),
                _fused_state(params, cfg, tokens, mask, key, N, None)),
            "fusion part alone (align+route+fuse+sample)": (
                lambda s, lg=logits, ci=dense: fuse_sample_jit(
                    s, lg, ci, fusion=FusionConfig(), sampling=greedy, eos_id=None, pad_id=0)[0],
                _fused_state(params, cfg, tokens, mask, key, N, None)),
        }  # fmt: skip
        if B == 8:  # per-row adapters (each row a client with its own LoRA), for reference
            loras = [init_lora(cfg, LoRAConfig(rank=r, max_rank=8), key=jax.random.key(r))
                     for r in (2, 4, 8, 8, 4, 2, 8, 4)]  # fmt: skip
            lora = rows_lora(stack_loras(loras))
            variants["fused + per-row LoRA r<=8, all targets"] = (
                fused(FusionConfig(), dense, lora),
                _fused_state(params, cfg, tokens, mask, key, N, lora),
            )
        states = {k: v[1] for k, v in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in variants}

        for name in variants:  # compile and warm up
            _once(variants, states, name, steps)
        for _ in range(rounds):
            for name in variants:
                times[name].append(_once(variants, states, name, steps))
        edge = statistics.median(times["edge-only decode_step"])
        for name, ts in times.items():
            t = statistics.median(ts)
            over = "" if name.startswith("edge-only") else f"{t / edge - 1:+.1%}"
            if name.startswith("fusion part"):
                over = f"{t / edge:.1%} of edge step"
            rows.append(dict(batch=B, step=name, ms=t * 1e3, overhead=over))
    return rows


def latency_rows(quick: bool, attention_impl: str = "reference") -> list[dict]:
    edge_cfg = dataclasses.replace(FJ_REF, attention_impl=attention_impl)
    cloud_cfg = dataclasses.replace(edge_cfg, num_layers=8)  # a bigger (simulated) cloud
    edge = init_params(edge_cfg, key=jax.random.key(0))
    cloud_params = init_params(cloud_cfg, key=jax.random.key(1))
    N = 8 if quick else 32
    prompts = [list(range(3, 40))]
    allow = PrivacyDetector(PrivacyPolicy(action="allow"))
    modes = [
        ("edge-only", None, None),
        ("cloud-only (no deadline)", FusionConfig(gate="fixed", fixed_w=0.0), float("inf")),
        ("fused, tau=100 ms", FusionConfig(), 0.1),
        ("fused, tau=200 ms", FusionConfig(), 0.2),
    ]
    rows = []
    for rtt in (50.0, 150.0):
        for name, fusion, tau in modes:
            cloud = None
            if fusion is not None:
                cloud = GuardedCloud(LocalCloud(cloud_params, cloud_cfg, headroom=N + 8), allow)
            config = FusedDecodeConfig(max_new_tokens=N, fusion=fusion or FusionConfig(),
                                       deadline_s=tau or 0.0)  # fmt: skip
            for warm in (True, False):  # the first run compiles
                net = SimulatedNetwork(rtt_ms=rtt, sigma=0.25, seed=0)
                res = generate_fused(edge, edge_cfg, prompts, cloud=cloud, config=config,
                                     clock=SimClock(), network=net)  # fmt: skip
                if warm:
                    continue
                dec = res.latency_s[1:] * 1e3
                rows.append(dict(
                    rtt_ms=rtt, mode=name, first_token_ms=float(res.latency_s[0] * 1e3),
                    ms_per_token=float(dec.mean()), p95_ms=float(np.percentile(dec, 95)),
                    edge_ms=float(res.edge_s[1:].mean() * 1e3),
                    cloud_compute_ms=float(res.cloud_s[1:].mean() * 1e3),
                    share_fused=res.share_fused if fusion is not None else 0.0,
                ))  # fmt: skip
    return rows


def run(quick: bool = False, attention_impl: str = "reference") -> list[dict]:
    print(f"machine: {machine()}  (numbers on a busy machine are provisional)", flush=True)
    print(f"decode attention: {attention_impl}", flush=True)
    steps = step_rows(quick, attention_impl)
    print_table(steps, "Fused step vs edge-only step (FJ-REF, float32, cloud precomputed)")
    lat = latency_rows(quick, attention_impl)
    print_table(lat, "Per-token latency under a simulated network (SimClock, lognormal RTT)")
    return [dict(table="step", **r) for r in steps] + [dict(table="latency", **r) for r in lat]


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)


# ----------------------------------------------------------------------------- bench latency

RTTS_MS = (20.0, 50.0, 150.0, 300.0)


def related_cloud(edge_cfg, edge_params, *, extra_layers: int = 4, scale: float = 0.5, seed=1):
    """A deeper cloud that agrees with the edge the way a model and its distilled edge do: the
    edge's embedding, head and layers, then `extra_layers` random layers whose residual writes
    (`o_proj`, `down_proj`) are scaled by `scale`. Random weights give no such pair (a random
    edge and a random cloud agree on almost no greedy token), and speculation is only worth
    measuring on a pair that agrees as real ones do; the acceptance rate is reported beside."""
    cfg = dataclasses.replace(edge_cfg, num_layers=edge_cfg.num_layers + extra_layers)
    fresh = init_params(cfg, key=jax.random.key(seed))
    L = edge_cfg.num_layers

    def layer(path, e, f):
        tail = f[L:] * (scale if any(k in ("o_proj", "down_proj") for k in path) else 1.0)
        return jnp.concatenate([e, tail.astype(e.dtype)])

    layers = jax.tree_util.tree_map_with_path(
        lambda p, e, f: layer([getattr(k, "key", None) for k in p], e, f),
        edge_params["layers"], fresh["layers"],
    )  # fmt: skip
    return cfg, {**edge_params, "layers": layers}


def _timing(res) -> tuple[float, float]:
    """(first-token ms, ms per token after the first) of one generation."""
    lat = np.asarray(res.latency_s)
    n = sum(len(t) for t in res.tokens)
    first = float(lat[0])
    return first * 1e3, float((lat.sum() - first) / max(n - 1, 1) * 1e3)


def mode_latency_rows(quick: bool = False, repeats: int | None = None) -> list[dict]:
    """Edge-only, cloud-only, token-by-token fused and speculative fused decoding at each RTT
    (`SimClock`: measured compute, simulated lognormal network), greedy, no deadline misses.
    Modes are interleaved in time and repeated; medians are reported."""
    edge_cfg = FJ_REF
    edge = init_params(edge_cfg, key=jax.random.key(0))
    edge = {**edge, "norm": edge["norm"] * 6}  # peaked distributions, as trained models have
    cloud_cfg, cloud_params = related_cloud(edge_cfg, edge, scale=0.3)
    N = 16 if quick else 48
    k = 8
    repeats = repeats or (1 if quick else 3)
    prompts = [list(range(3, 40))]
    allow = PrivacyDetector(PrivacyPolicy(action="allow"))
    inf = float("inf")
    modes = {
        "edge-only": (FusionConfig(gate="fixed", fixed_w=1.0), 0, False),
        "cloud-only": (FusionConfig(gate="fixed", fixed_w=0.0), 0, True),
        "fused, token by token": (FusionConfig(), 0, True),
        f"fused, speculative k<={k}": (FusionConfig(), k, True),
    }

    def once(rtt, fusion, spec, with_cloud, adapt=True):
        cloud = None
        if with_cloud:
            cloud = GuardedCloud(LocalCloud(cloud_params, cloud_cfg, headroom=2 * N + k + 8), allow)
        config = FusedDecodeConfig(max_new_tokens=N, fusion=fusion, deadline_s=inf, speculate=spec,
                                   adapt_k=adapt)  # fmt: skip
        net = SimulatedNetwork(rtt_ms=rtt, sigma=0.25, seed=0)
        return generate_fused(edge, edge_cfg, prompts, cloud=cloud, config=config,
                              clock=SimClock(), network=net)  # fmt: skip

    for fusion, spec, with_cloud in modes.values():  # compile
        once(50.0, fusion, spec, with_cloud)
    for kk in (1, 2, 4, k):  # every length bucket of the cloud's draft forward
        once(50.0, FusionConfig(), kk, True, adapt=False)
    runs: dict[tuple, list] = {}
    for _ in range(repeats):
        for rtt in RTTS_MS:
            for name, m in modes.items():
                runs.setdefault((rtt, name), []).append(once(rtt, *m))
    rows = []
    for rtt in RTTS_MS:
        base = runs[(rtt, "fused, token by token")][0].tokens[0]
        ref_ms = statistics.median(_timing(r)[1] for r in runs[(rtt, "fused, token by token")])
        for name in modes:
            rs = runs[(rtt, name)]
            first = statistics.median(_timing(r)[0] for r in rs)
            per = statistics.median(_timing(r)[1] for r in rs)
            s = rs[0].speculation
            toks = rs[0].tokens[0]
            agree = np.mean([a == b for a, b in zip(toks, base, strict=False)])
            rows.append(dict(
                rtt_ms=rtt, mode=name, first_token_ms=first, ms_per_token=per,
                vs_token_by_token=f"{ref_ms / per:.2f}x" if "fused" in name else "",
                acceptance=s.get("acceptance", float("nan")),
                tokens_per_call=s.get("tokens_per_call", 1.0 if "only" not in name
                                      or name == "cloud-only" else 0.0),
                mean_k=s.get("mean_k", float("nan")), ahead=s.get("ahead", float("nan")),
                greedy_agreement=float(agree) if "fused" in name else float("nan"),
            ))  # fmt: skip
    return rows


class _IdTokenizer:
    """Token i is spelled `<i>`: a tokenizer for a random model served and asked by id."""

    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(self.vocab_size)}

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(x) for x in re.findall(r"<(\d+)>", text)]

    chat_template = "the messages' contents, concatenated"

    def apply_chat_template(self, messages, *, tokenize=False, add_generation_prompt=True,
                            continue_final_message=False) -> str:  # fmt: skip
        """No markup: a chat request reads the same ids as a completions prompt of its text."""
        return "".join(m["content"] for m in messages)


LOOPBACK_RTTS_MS = (0.0, 20.0, 150.0)


def loopback_rows(quick: bool = False, repeats: int | None = None) -> list[dict]:
    """Token-by-token and speculative fused decoding against the real `serve_cloud` over
    loopback (`HTTPCloud`, token ids; a draft scored with `echo`; a chat cloud's proposal with
    one chat call of k tokens), in wall time (`RealClock`):
    the RTT on top of loopback is slept by the request's worker (0: bare loopback). Greedy, no
    deadline; modes interleaved, medians of the repeats."""
    from floe_jax.inference.deadline import RealClock
    from floe_jax.inference.http_cloud import HTTPCloud
    from floe_jax.inference.server import serve_cloud

    edge_cfg = FJ_REF
    edge = init_params(edge_cfg, key=jax.random.key(0))
    edge = {**edge, "norm": edge["norm"] * 6}
    cloud_cfg, cloud_params = related_cloud(edge_cfg, edge, scale=0.3)
    N, k = (16 if quick else 32), 8
    repeats = repeats or (1 if quick else 3)
    prompts = [list(range(3, 40))]
    allow = PrivacyDetector(PrivacyPolicy(action="allow"))
    modes = {"fused, token by token (loopback)": 0, f"fused, speculative k<={k} (loopback)": k,
             f"fused, chat cloud proposes k={k} (loopback)": -k}  # fmt: skip
    tok = _IdTokenizer(cloud_cfg.vocab_size)
    with serve_cloud(cloud_params, cloud_cfg, tok) as srv:

        def once(rtt, spec):
            if spec < 0:  # chat: text in, the cloud proposes
                client = HTTPCloud(srv.url, api="chat", top_k=20, token_ids=True, timeout_s=60)
            else:
                client = HTTPCloud(srv.url, top_k=20, prompt="ids", token_ids=True, timeout_s=60)
            config = FusedDecodeConfig(max_new_tokens=N, fusion=FusionConfig(), deadline_s=1e6,
                                       speculate=abs(spec), propose=spec < 0)  # fmt: skip
            net = SimulatedNetwork(rtt_ms=rtt, sigma=0.25 if rtt else 0.0, seed=0)
            try:
                return generate_fused(edge, edge_cfg, prompts, config=config, clock=RealClock(),
                                      cloud=GuardedCloud(client, allow), network=net,
                                      decode=tok.decode if spec < 0 else None)  # fmt: skip
            finally:
                client.close()

        for spec in modes.values():  # compile, both sides
            once(0.0, spec)
        runs: dict[tuple, list] = {}
        for _ in range(repeats):
            for rtt in LOOPBACK_RTTS_MS:
                for name, spec in modes.items():
                    runs.setdefault((rtt, name), []).append(once(rtt, spec))
    rows = []
    for rtt in LOOPBACK_RTTS_MS:
        tbt = runs[(rtt, next(iter(modes)))]
        base = tbt[0].tokens[0]
        ref_ms = statistics.median(_timing(r)[1] for r in tbt)
        for name in modes:
            rs = runs[(rtt, name)]
            per = statistics.median(_timing(r)[1] for r in rs)
            s = rs[0].speculation
            agree = np.mean([a == b for a, b in zip(rs[0].tokens[0], base, strict=False)])
            rows.append(dict(
                rtt_ms=rtt, mode=name,
                first_token_ms=statistics.median(_timing(r)[0] for r in rs), ms_per_token=per,
                vs_token_by_token=f"{ref_ms / per:.2f}x",
                acceptance=s.get("acceptance", float("nan")),
                tokens_per_call=s.get("tokens_per_call", 1.0), greedy_agreement=float(agree),
                share_fused=float(np.mean([r.share_fused for r in rs])),
            ))  # fmt: skip
    return rows


def run_latency(quick: bool = False) -> list[dict]:
    print(f"machine: {machine()}  (numbers on a busy machine are provisional)", flush=True)
    rows = mode_latency_rows(quick)
    print_table(rows, "Latency by mode and RTT (SimClock: measured compute, lognormal RTT, "
                      "greedy, no deadline misses; medians of interleaved repeats)")  # fmt: skip
    loop = loopback_rows(quick)
    print_table(loop, "Over the real loopback serve-cloud (RealClock; RTT slept per request on "
                      "top of loopback; greedy; medians of interleaved repeats)")  # fmt: skip
    return rows + [dict(table="loopback", **r) for r in loop]
