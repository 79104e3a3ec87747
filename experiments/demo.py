"""The embedded Floe demo end to end: pretrain, federate, evaluate, report.

`run_demo(preset, run_dir)` is `run_federate` then `run_evaluate` on one run folder:

- `run_federate`: tokenizer + pretrained base models (cached, `calibrate.prepare`), one device
  profile per client (cycling `fed.devices`) and its LoRA rank from `floe_jax.devices.assign_ranks`,
  each client's private examples as `ClientData`, then federated rounds for Floe (clustered by
  client updates, `fed.floe_rule` inside each cluster) and for each unclustered baseline rule in
  `fed.rules`. Each method writes `run_dir/fed/<method>/` (checkpoints, metrics.jsonl).
- `run_evaluate`: restores every method's adapters from its checkpoints and answers the same test
  queries with each method (every query by its own client's adapter), through a privacy guard
  whose back end is wrapped by a recorder that checks every request for the queries' private
  spans. Writes `eval.jsonl`, `results.json`, `report.md` and plots.

Ranks on the tiny demo model: its training memory is a few tens of MB, so every catalog device fits
the largest rank. The demo therefore scales each device's memory budget into the range the demo
model spans: budget = base need + (device memory / largest device memory) x (need at the largest
rank - base need). Ranks then follow the devices' real memory ratios (documented in the report).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.calibrate import prepare
from experiments.presets import DemoPreset, RealPreset
from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.data.benchmark import Benchmark, Example, Query, score
from floe_jax.data.tokenizer import encode_example, encode_prompt, load_tokenizer
from floe_jax.devices import (
    assign_ranks,
    decode_energy_j_per_token,
    decode_ms_per_token,
    get_device,
    train_memory_bytes,
)
from floe_jax.federated import train_federated
from floe_jax.federated.config import AggregationConfig, FedConfig
from floe_jax.federated.rounds import client_start
from floe_jax.federated.types import client_data
from floe_jax.inference import (
    FusedDecodeConfig,
    FusionConfig,
    GuardedCloud,
    LocalCloud,
    PrivacyDetector,
    PrivacyPolicy,
    SimClock,
    SimulatedNetwork,
    generate_fused,
)

QTYPES = ("general", "personal", "both")
FLOE = "floe"


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """The benchmark (embedded, or built from an instruction dataset), tokenizer and models."""

    bench: Benchmark
    tokenizer: object
    edge_cfg: ModelConfig
    edge_params: dict
    cloud_cfg: ModelConfig
    cloud_params: dict
    times: dict


def setup(preset: DemoPreset | RealPreset, *, progress: bool = True) -> Setup:
    """Embedded benchmark + cached pretraining, or the real-model preset's checkpoints and data."""
    if isinstance(preset, RealPreset):
        return setup_real(preset)
    prep = prepare(preset, progress=progress)
    return Setup(prep.bench, prep.tokenizer, preset.edge, prep.edge.params, preset.cloud,
                 prep.cloud.params, prep.times)  # fmt: skip


def setup_real(preset: RealPreset) -> Setup:
    """Loads both HF checkpoints, the tokenizer and the dataset; one task per client (clients
    cycle over the tasks), `examples_per_client` training examples and `test_per_client` held-out
    test queries each (type `general`: instruction data has no personal/both split)."""
    from floe_jax.data.hf_datasets import load_instruction_dataset
    from floe_jax.hf import load_hf

    t0 = time.perf_counter()
    edge_cfg, edge_params = load_hf(preset.edge_path, dtype=preset.dtype)
    cloud_cfg, cloud_params = load_hf(preset.cloud_path, dtype=preset.dtype)
    if cloud_cfg.vocab_size != edge_cfg.vocab_size:
        raise ValueError(
            f"edge vocab {edge_cfg.vocab_size} != cloud vocab {cloud_cfg.vocab_size}: the demo "
            "needs two checkpoints of one family with the same vocabulary"
        )
    tok = load_tokenizer(preset.tokenizer_path or preset.edge_path)
    data = load_instruction_dataset(
        preset.dataset, prompt_column=preset.prompt_column,
        response_column=preset.response_column, task_column=preset.task_column or None,
        input_column=preset.input_column or None,
    )  # fmt: skip
    if data.task_ids is None:
        raise ValueError(f"{preset.dataset}: the real-model demo needs a task column")
    rng = np.random.default_rng(preset.seed)
    by_task = {t: list(rng.permutation(np.flatnonzero(data.task_ids == t)))
               for t in range(len(data.task_names))}  # fmt: skip
    order = list(rng.permutation(len(data.task_names)))
    need = preset.examples_per_client + preset.test_per_client
    tasks, examples, queries = [], [], []
    for c in range(preset.num_clients):
        t = order[c % len(order)]
        idx, by_task[t] = by_task[t][:need], by_task[t][need:]
        if len(idx) <= preset.test_per_client:
            raise ValueError(f"task {data.task_names[t]!r} has too few examples for client {c}")
        name = data.task_names[t]
        tasks.append(name)
        fmt = [preset.prompt_format.format(prompt=data.prompts[i]) for i in idx]
        resp = [data.responses[i] for i in idx]
        k = preset.test_per_client
        examples.append(tuple(Example(p, r, name) for p, r in zip(fmt[k:], resp[k:], strict=True)))
        queries += [
            Query(p, r, "general", name, c, ()) for p, r in zip(fmt[:k], resp[:k], strict=True)
        ]
    bench = Benchmark(
        config=None, countries=(), local_countries=(), public_docs=(), edge_docs=(),
        client_tasks=tuple(tasks), client_contacts=((),) * preset.num_clients,
        client_examples=tuple(examples), queries=tuple(queries), format_docs=(),
    )  # fmt: skip
    times = {"load checkpoints + data": time.perf_counter() - t0}
    return Setup(bench, tok, edge_cfg, edge_params, cloud_cfg, cloud_params, times)


# ----------------------------------------------------------------------------- federate


def client_ranks(
    preset: DemoPreset | RealPreset, num_clients: int, edge_cfg: ModelConfig
) -> tuple[list[str], list[int]]:
    """(device name, LoRA rank) per client: devices cycle through `fed.devices`; memory budgets
    are scaled into the demo model's range (module docstring) so ranks really differ."""
    f, cfg, n = preset.fed, edge_cfg, num_clients
    devices = [get_device(f.devices[i % len(f.devices)]) for i in range(n)]
    kw = dict(batch=f.batch_size, seq_len=f.seq_len or 128)
    base = train_memory_bytes(cfg, None, **kw)
    top = train_memory_bytes(cfg, LoRAConfig(rank=max(f.rank_candidates)), **kw)
    biggest = max(d.memory_bytes for d in devices)
    scaled = [
        dataclasses.replace(d, memory_bytes=int(base + d.memory_bytes / biggest * (top - base)) + 1)
        for d in devices
    ]
    cands = [LoRAConfig(rank=r) for r in sorted(f.rank_candidates)]
    got = assign_ranks(cfg, scaled, deadline_ms=f.deadline_ms, candidates=cands, **kw)
    return [d.name for d in devices], [c.rank for c in got]


def seq_len(preset, bench: Benchmark, tok) -> int:
    """`fed.seq_len`, or (0) the longest private example rounded up to 16 tokens."""
    longest = max(
        len(encode_example(tok, e.prompt, e.response)[0]) for e in bench.pooled_examples()
    )
    T = preset.fed.seq_len or -(-longest // 16) * 16
    if longest > T:
        raise ValueError(f"an example has {longest} tokens > fed.seq_len={T}; raise fed.seq_len")
    return T


def _client_arrays(tok, examples, T: int):
    enc = [encode_example(tok, e.prompt, e.response) for e in examples]
    tokens = np.full((len(enc), T), tok.pad_token_id, np.int32)
    mask = np.zeros((len(enc), T), np.float32)
    loss = np.zeros((len(enc), T), np.float32)
    for i, (t, m) in enumerate(enc):
        tokens[i, : len(t)], mask[i, : len(t)], loss[i, : len(m)] = t, 1, m
    return tokens, mask, loss


def fed_configs(preset, bench: Benchmark, T: int) -> dict[str, FedConfig]:
    """The FedConfig of each compared method: Floe (clustered) and each unclustered rule."""
    f = preset.fed
    k = f.num_clusters or len(set(bench.client_tasks))
    common = dict(
        num_rounds=f.num_rounds,
        clients_per_round=min(f.clients_per_round, bench.num_clients),
        local_steps=f.local_steps,
        batch_size=f.batch_size,
        seq_len=T,
        lr=f.lr,
        lora=LoRAConfig(rank=f.lora_rank, alpha=f.lora_alpha),
        seed=f.seed,
        client_chunk=f.client_chunk,
        checkpoint_every=f.num_rounds,
        max_to_keep=1,
    )
    floe_agg = AggregationConfig(method=f.floe_rule)
    out = {FLOE: FedConfig(agg=floe_agg, clustering="updates", num_clusters=k, **common)}
    for rule in f.rules:
        out[rule] = FedConfig(agg=AggregationConfig(method=rule), **common)
    return out


def _federate(preset, prep: Setup, run_dir: str, *, progress: bool) -> dict:
    """Trains (or restores) every method's adapters. Returns {method: (loras [N], info)}."""
    bench, tok = prep.bench, prep.tokenizer
    devices, ranks = client_ranks(preset, bench.num_clients, prep.edge_cfg)
    T = seq_len(preset, bench, tok)
    data = client_data([_client_arrays(tok, ex, T) for ex in bench.client_examples])
    ranks_a = np.asarray(ranks, np.int32)
    out = {}
    for method, fed in fed_configs(preset, bench, T).items():
        t0 = time.perf_counter()
        if progress:
            print(f"federated rounds: {method} ({fed.agg.method}, clustering={fed.clustering})")
        state, _ = train_federated(
            prep.edge_params, data, cfg=prep.edge_cfg, fed=fed,
            run_dir=os.path.join(run_dir, "fed", method), ranks=ranks_a,
            num_clusters=fed.num_clusters or 1, progress=progress,
        )  # fmt: skip
        assignment = np.asarray(state.assignment)
        loras = client_start(state.global_loras, jnp.asarray(assignment), jnp.asarray(ranks_a), fed)
        out[method] = (
            loras,
            {"assignment": assignment.tolist(), "seconds": time.perf_counter() - t0},
        )
    info = {"devices": devices, "ranks": ranks, "client_tasks": list(bench.client_tasks)}
    with open(os.path.join(run_dir, "clients.json"), "w") as f:
        json.dump(info, f, indent=1)
    return out


def run_federate(preset: DemoPreset | RealPreset, run_dir: str, *, progress: bool = True) -> dict:
    """Pretraining (cached) and the federated rounds of every method; writes the run folder."""
    os.makedirs(run_dir, exist_ok=True)
    _write_config(preset, run_dir)
    prep = setup(preset, progress=progress)
    fed = _federate(preset, prep, run_dir, progress=progress)
    return {m: info for m, (_, info) in fed.items()}


# ----------------------------------------------------------------------------- evaluate


class SpanRecorder:
    """A cloud back end wrapper (placed behind the guard) that checks every request it receives
    for the given private spans (case-insensitive, on word boundaries) and counts them."""

    def __init__(self, backend, spans, decode):
        self._backend, self.decode = backend, decode
        spans = sorted({s for s in spans if s}, key=len, reverse=True)
        self._re = (
            re.compile("|".join(rf"\b{re.escape(s)}\b" for s in spans), re.I) if spans else None
        )
        self.requests = self.leaked_requests = self.leaked_spans = 0
        self.examples: list[str] = []

    @property
    def kind(self):
        return self._backend.kind

    @property
    def vocab_size(self):
        return self._backend.vocab_size

    def next_token(self, prefixes):
        for p in prefixes:
            self.requests += 1
            text = p.text if p.text is not None else self.decode(list(p.ids))
            hits = self._re.findall(text) if self._re is not None else []
            if hits:
                self.leaked_requests += 1
                self.leaked_spans += len(hits)
                if len(self.examples) < 3:
                    self.examples.append(text)
        return self._backend.next_token(prefixes)


@dataclasses.dataclass
class _Ctx:
    preset: DemoPreset | RealPreset
    prep: Setup
    prompts: list[list[int]]
    decode: object
    encode: object


def _guard(ctx: _Ctx, queries, *, action: str):
    tok, bench = ctx.prep.tokenizer, ctx.prep.bench
    backend = LocalCloud(ctx.prep.cloud_params, ctx.prep.cloud_cfg, inputs="ids",
                         pad_id=tok.pad_token_id)  # fmt: skip
    spans = [s for q in queries for s in q.private_spans]
    rec = SpanRecorder(backend, spans, ctx.decode)
    policy = PrivacyPolicy(action=action,
                           placeholder=ctx.preset.eval.placeholder)  # fmt: skip
    det = PrivacyDetector(policy)
    for c in sorted({q.client for q in queries}):
        # Each client registers its own private strings: its contacts' names (which no pattern
        # can know), and their phones and emails too (the patterns catch those as well; a
        # registered string is matched even where its pattern would not be).
        det.register_terms(v for ct in bench.client_contacts[c] for v in ct.private_values)
    return GuardedCloud(rec, det, decode=ctx.decode, encode=ctx.encode), rec


def _answers(ctx: _Ctx, tokens) -> list[str]:
    tok = ctx.prep.tokenizer
    out = []
    for ids in tokens:
        ids = [t for t in ids if t != tok.eos_token_id]
        out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


def _run_fused(ctx: _Ctx, idx, *, lora, cloud: str | None, fusion, tau_ms, net_seed=0):
    """generate_fused over queries `idx`. cloud: None (edge only) or the guard's action."""
    ev, tok = ctx.preset.eval, ctx.prep.tokenizer
    qs = [ctx.prep.bench.queries[i] for i in idx]
    guard = rec = None
    if cloud is not None:
        guard, rec = _guard(ctx, qs, action=cloud)
    rows = (
        None
        if lora is None
        else jax.tree.map(lambda x: x[np.asarray([q.client for q in qs])], lora)
    )
    config = FusedDecodeConfig(
        max_new_tokens=ctx.preset.max_new_tokens, fusion=fusion, deadline_s=tau_ms / 1e3,
        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
    )  # fmt: skip
    res = generate_fused(
        ctx.prep.edge_params, ctx.prep.edge_cfg, [ctx.prompts[i] for i in idx], cloud=guard,
        config=config, lora=rows, clock=SimClock(),
        network=SimulatedNetwork(rtt_ms=ev.rtt_ms, sigma=ev.sigma, seed=net_seed),
        decode=ctx.decode,
    )  # fmt: skip
    return res, rec


def _methods(preset, fed: dict) -> list[dict]:
    """Every evaluated method: its adapter, cloud access, router and deadline."""
    ev = preset.eval
    guard = ev.privacy
    router = FusionConfig(gate=ev.gate, temperature=ev.temperature, space=ev.space)
    cloud_only = FusionConfig(gate="fixed", fixed_w=0.0)
    inf = 1e9
    floe = fed[FLOE][0]
    ms = [
        dict(name="edge-only (base)", lora=None, cloud=None, fusion=router, tau=inf),
        dict(name="edge-only (Floe federated LoRA)", lora=floe, cloud=None, fusion=router, tau=inf),
        dict(name="cloud-only (redacted prompt)", lora=None, cloud="redact", fusion=cloud_only,
             tau=inf),
        dict(name="cloud-only (full private context; violates privacy)", lora=None, cloud="allow",
             fusion=cloud_only, tau=inf, reference=True),
    ]  # fmt: skip
    for rule in preset.fed.rules:
        ms.append(dict(name=f"{rule} LoRA + fusion", lora=fed[rule][0], cloud=guard,
                       fusion=router, tau=ev.tau_ms))  # fmt: skip
    ms.append(dict(name="Floe (full)", lora=floe, cloud=guard, fusion=router, tau=ev.tau_ms))
    if ev.ablations:
        ms.append(
            dict(
                name="Floe, fixed w=0.5",
                lora=floe,
                cloud=guard,
                fusion=FusionConfig(gate="fixed", fixed_w=0.5),
                tau=ev.tau_ms,
            )
        )
        ms.append(dict(name="Floe, no deadline", lora=floe, cloud=guard, fusion=router, tau=inf))
    return ms


_LATENCY_METHODS = (
    "edge-only (Floe federated LoRA)",
    "cloud-only (redacted prompt)",
    "Floe (full)",
)


def _evaluate(preset, prep: Setup, fed: dict, run_dir: str, *, progress: bool):
    from tqdm.auto import tqdm

    tok, bench = prep.tokenizer, prep.bench
    ctx = _Ctx(
        preset, prep, [encode_prompt(tok, q.prompt) for q in bench.queries],
        decode=lambda ids: tok.decode(
            [i for i in ids if i not in (tok.bos_token_id, tok.pad_token_id)],
            skip_special_tokens=True,
        ),
        encode=lambda text: encode_prompt(tok, text),
    )  # fmt: skip
    all_idx = list(range(len(bench.queries)))
    rng = np.random.default_rng(0)
    types = sorted({q.qtype for q in bench.queries})
    shuffled = [list(rng.permutation([j for j in all_idx if bench.queries[j].qtype == t]))
                for t in types]  # fmt: skip
    # round robin over the query types: as many of each type as `latency_queries` allows
    interleaved = [
        int(i) for group in itertools.zip_longest(*shuffled) for i in group if i is not None
    ]
    lat_idx = sorted(interleaved[: preset.eval.latency_queries])
    rows, eval_lines = [], []
    methods = _methods(preset, fed)
    bar = tqdm(methods, desc="evaluate", disable=not progress)
    for m in bar:
        bar.set_postfix_str(m["name"][:30])
        t0 = time.perf_counter()
        res, rec = _run_fused(ctx, all_idx, lora=m["lora"], cloud=m["cloud"],
                              fusion=m["fusion"], tau_ms=m["tau"])  # fmt: skip
        preds = _answers(ctx, res.tokens)
        acc = score(preds, bench.queries)
        per_task = {}
        for task in sorted({q.task for q in bench.queries}):
            sel = [i for i, q in enumerate(bench.queries) if q.task == task]
            if sel:
                per_task[task] = score([preds[i] for i in sel], [bench.queries[i] for i in sel])[
                    "overall"
                ]
        row = dict(method=m["name"], accuracy=acc, per_task=per_task,
                   guarded=m["cloud"] in ("redact", "edge_only"),
                   reference=bool(m.get("reference")),
                   cloud_requests=rec.requests if rec else 0,
                   private_spans_to_cloud=rec.leaked_spans if rec else 0,
                   leaked_requests=rec.leaked_requests if rec else 0,
                   fused_share=res.share_fused if m["cloud"] else 0.0,
                   failures=dict(res.failures), privacy=res.privacy,
                   seconds=time.perf_counter() - t0)  # fmt: skip
        if rec and rec.examples and row["guarded"]:
            row["leak_examples"] = rec.examples
        if m["name"] in _LATENCY_METHODS and lat_idx:
            lat = []
            for i in lat_idx:  # one query at a time: per-token latency of one request
                for _ in range(2):  # the first run compiles this prompt bucket; keep the second
                    r1, _ = _run_fused(
                        ctx, [i], lora=m["lora"], cloud=m["cloud"], fusion=m["fusion"],
                        tau_ms=m["tau"], net_seed=int(i),
                    )  # fmt: skip
                lat += list(r1.latency_s[1:] * 1e3)  # token 0 includes the prefill
            row["latency_ms"] = lat
            row["latency_ms_mean"] = float(np.mean(lat))
            row["latency_ms_p95"] = float(np.percentile(lat, 95))
        rows.append(row)
        eval_lines.append({k: v for k, v in row.items() if k != "latency_ms"} | {
            "predictions": [{"q": i, "pred": preds[i], "answer": bench.queries[i].answer,
                             "qtype": bench.queries[i].qtype} for i in all_idx[:50]]
        })  # fmt: skip
    with open(os.path.join(run_dir, "eval.jsonl"), "w") as f:
        for line in eval_lines:
            f.write(json.dumps(line) + "\n")
    return rows


def energy_table(prep: Setup, devices: list[str], ranks: list[int]) -> list[dict]:
    """Per device: the device model's energy per token of edge decoding vs the same device's
    radio-idle share is not modelled; cloud-bound decoding is charged the cloud model's decode on
    a server GPU (`rtx-4090` profile)."""
    server = get_device("rtx-4090")
    cloud_j = decode_energy_j_per_token(prep.cloud_cfg, None, server)
    out = []
    for name in sorted(set(devices)):
        r = ranks[devices.index(name)]
        d = get_device(name)
        lc = LoRAConfig(rank=r)
        out.append(dict(device=name, rank=r, edge_ms=decode_ms_per_token(prep.edge_cfg, lc, d),
                        edge_j=decode_energy_j_per_token(prep.edge_cfg, lc, d),
                        cloud_j=cloud_j))  # fmt: skip
    return out


def run_evaluate(preset: DemoPreset | RealPreset, run_dir: str, *, progress: bool = True) -> dict:
    """Evaluates the adapters of an existing run folder (`run_federate`); writes the report."""
    t0 = time.perf_counter()
    prep = setup(preset, progress=progress)
    fed = _federate(preset, prep, run_dir, progress=False)  # restores the finished runs
    rows = _evaluate(preset, prep, fed, run_dir, progress=progress)
    with open(os.path.join(run_dir, "clients.json")) as f:
        clients = json.load(f)
    result = dict(
        preset=preset.name, rows=rows, clients=clients,
        clusters={m: info["assignment"] for m, (_, info) in fed.items()},
        energy=energy_table(prep, clients["devices"], clients["ranks"]),
        eval_seconds=time.perf_counter() - t0,
    )  # fmt: skip
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({**result, "rows": [{k: v for k, v in r.items()} for r in rows]}, f, indent=1)
    plots(result, run_dir)
    Path(run_dir, "report.md").write_text(format_report(result))
    return result


def run_demo(preset: DemoPreset | RealPreset, run_dir: str, *, progress: bool = True) -> dict:
    """The whole demo into `run_dir`: pretraining (cached), federated rounds, evaluation, report."""
    t0 = time.perf_counter()
    times = {}
    run_federate(preset, run_dir, progress=progress)
    times["pretrain + federate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = run_evaluate(preset, run_dir, progress=progress)
    times["evaluate"] = time.perf_counter() - t1
    times["total"] = time.perf_counter() - t0
    result["times"] = times
    Path(run_dir, "report.md").write_text(format_report(result))
    return result


# ----------------------------------------------------------------------------- outputs


def _write_config(preset, run_dir: str) -> None:
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(preset), f, indent=1, default=str)


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def format_report(result: dict) -> str:
    """The Markdown report of a `run_evaluate` result."""
    lines = [f"# Floe demo — preset `{result['preset']}`", ""]
    lines += [
        "| method | general | personal | both | overall | private spans to cloud | "
        "ms/token mean | ms/token p95 | fused share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        a = r["accuracy"]
        spans = r["private_spans_to_cloud"] if r["cloud_requests"] else "— (no cloud)"
        if r["reference"]:
            spans = f"{spans} (not guarded)"
        lines.append(
            f"| {r['method']} | "
            + " | ".join(_fmt(a.get(t)) for t in QTYPES)
            + f" | **{a['overall']:.2f}** | {spans} | {_fmt(r.get('latency_ms_mean'), '.1f')} | "
            f"{_fmt(r.get('latency_ms_p95'), '.1f')} | {r['fused_share']:.2f} |"
        )
    c = result["clients"]
    lines += ["", "## Clients", "", "| client | task | device | LoRA rank | Floe cluster |",
              "|---|---|---|---|---|"]  # fmt: skip
    for i, (t, d, r) in enumerate(zip(c["client_tasks"], c["devices"], c["ranks"], strict=True)):
        lines.append(f"| {i} | {t} | {d} | {r} | {result['clusters'][FLOE][i]} |")
    lines += ["", "## Energy per token (device model, roofline)", "",
              "| device | rank | edge ms/token | edge J/token | cloud-bound J/token (cloud model "
              "on rtx-4090) |", "|---|---|---|---|---|"]  # fmt: skip
    for e in result["energy"]:
        lines.append(f"| {e['device']} | {e['rank']} | {e['edge_ms']:.4f} | {e['edge_j']:.2e} | "
                     f"{e['cloud_j']:.2e} |")  # fmt: skip
    lines += [
        "",
        "Notes: accuracy is exact match per query type. Private spans are counted by a recorder "
        "between the privacy guard and the cloud back end (every request text, every query's "
        "private spans). Latency: queries decoded one at a time under a simulated network "
        "(lognormal RTT), measured compute; token 0 (prefill) excluded. Ranks: device memory "
        "budgets scaled into the tiny demo model's range (see `experiments/demo.py`).",
    ]
    if "times" in result:
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in result["times"].items()]
    return "\n".join(lines) + "\n"


def plots(result: dict, run_dir: str) -> None:
    """accuracy.png (per query type and task), rounds.png (loss per round), latency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, keys, get in (
        (axes[0], [*QTYPES, "overall"], lambda r, k: r["accuracy"].get(k, 0.0)),
        (axes[1], sorted(rows[0]["per_task"]), lambda r, k: r["per_task"].get(k, 0.0)),
    ):
        width = 0.8 / len(rows)
        for j, r in enumerate(rows):
            ax.bar(np.arange(len(keys)) + j * width, [get(r, k) for k in keys], width,
                   label=r["method"])  # fmt: skip
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(0, 1)
    axes[0].set_title("by query type")
    axes[1].set_title("by task family")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "accuracy.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    fed_dir = Path(run_dir, "fed")
    for d in sorted(fed_dir.iterdir()) if fed_dir.is_dir() else []:
        path = d / "metrics.jsonl"
        if path.is_file():
            ms = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            ax.plot([m["round"] for m in ms], [m["loss"] for m in ms], marker="o", label=d.name)
    ax.set_xlabel("round")
    ax.set_ylabel("client training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "rounds.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.get("latency_ms"):
            ax.hist(r["latency_ms"], bins=30, alpha=0.5, label=r["method"])
    ax.set_xlabel("per-token latency (ms, simulated network)")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "latency.png"), dpi=100)
    plt.close(fig)
