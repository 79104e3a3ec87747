"""The demo's evaluation: every method answers the same test queries (each query by its own
client's adapter) under a simulated network, through a privacy guard whose back end is wrapped by
a recorder (`SpanRecorder`) that checks every request for the queries' private spans.

`run_evaluate` restores every run's adapters from the run folder's checkpoints and writes
`eval.jsonl`, `results.json`, `report.md` and plots.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import time
from pathlib import Path

import jax
import numpy as np

from experiments.demo.federate import federate
from experiments.demo.report import format_report, plots
from experiments.demo.setup import Setup, setup
from experiments.presets import FLOE, FLOE_DP, DemoPreset, RealPreset, baseline_name
from floe_jax.config import LoRAConfig
from floe_jax.data.benchmark import score
from floe_jax.data.tokenizer import encode_prompt
from floe_jax.devices import decode_energy_j_per_token, decode_ms_per_token, get_device
from floe_jax.federated.extraction import extraction_rate
from floe_jax.federated.loop import FINGERPRINT_FILE, UntrainedRunError
from floe_jax.inference import (
    FusionConfig,
    GuardedCloud,
    LocalCloud,
    PrivacyDetector,
    SimClock,
    SimulatedNetwork,
    generate_fused,
)
from floe_jax.inference.privacy import count_private_spans

NO_DEADLINE_S = 1e6  # methods that always wait for the cloud
LATENCY_METHODS = (
    "edge-only (Floe federated LoRA)",
    "cloud-only (redacted prompt)",
    "Floe (full)",
)


class SpanRecorder:
    """A cloud back end wrapper (placed behind the guard) that checks every request it receives
    for the given private values with `count_private_spans`: complete occurrences, and a request
    that ends in the start of one (a span cut short while the edge was still generating it)."""

    def __init__(self, backend, spans, decode):
        self._backend, self.decode = backend, decode
        self._lock = threading.Lock()  # fused decoding calls the cloud from a thread pool
        self.values = tuple(sorted({s for s in spans if s}, key=len, reverse=True))
        self.requests = self.leaked_requests = self.leaked_spans = self.partial_spans = 0
        self.examples: list[str] = []

    @property
    def kind(self):
        return self._backend.kind

    @property
    def vocab_size(self):
        return self._backend.vocab_size

    def next_token(self, prefixes):
        for p in prefixes:
            text = p.text if p.text is not None else self.decode(list(p.ids))
            found = count_private_spans(text, self.values)
            with self._lock:
                self.requests += 1
                if found.total:
                    self.leaked_requests += 1
                    self.leaked_spans += found.complete
                    self.partial_spans += found.partial
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
    policy = dataclasses.replace(ctx.preset.eval.policy, action=action)
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


def _run_fused(ctx: _Ctx, idx, *, lora, cloud: str | None, decode, net_seed=0):
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
    config = dataclasses.replace(decode, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    res = generate_fused(
        ctx.prep.edge_params, ctx.prep.edge_cfg, [ctx.prompts[i] for i in idx], cloud=guard,
        config=config, lora=rows, clock=SimClock(),
        network=SimulatedNetwork(rtt_ms=ev.rtt_ms, sigma=ev.sigma, seed=net_seed),
        decode=ctx.decode,
    )  # fmt: skip
    return res, rec


def methods(preset: DemoPreset | RealPreset, fed: dict) -> list[dict]:
    """Every evaluated method: its name, adapters, cloud access (None: edge only; else the
    guard's action) and `FusedDecodeConfig`."""
    ev = preset.eval
    guard, floe, fused = ev.policy.action, fed[FLOE][0], ev.decode
    waits = dataclasses.replace(fused, deadline_s=NO_DEADLINE_S)
    cloud_only = dataclasses.replace(waits, fusion=FusionConfig(gate="fixed", fixed_w=0.0))
    ms = [
        dict(name="edge-only (base)", lora=None, cloud=None, decode=waits),
        dict(name="edge-only (Floe federated LoRA)", lora=floe, cloud=None, decode=waits),
        dict(name="cloud-only (redacted prompt)", lora=None, cloud="redact", decode=cloud_only),
        dict(name="cloud-only (full private context; violates privacy)", lora=None,
             cloud="allow", decode=cloud_only, reference=True),
    ]  # fmt: skip
    for b in preset.fed.baselines:
        name = baseline_name(b)
        ms.append(dict(name=f"{name} LoRA + fusion", lora=fed[name][0], cloud=guard, decode=fused))
    ms.append(dict(name="Floe (full)", lora=floe, cloud=guard, decode=fused))
    if FLOE_DP in fed:
        ms.append(dict(name="Floe + client-level DP", lora=fed[FLOE_DP][0], cloud=guard,
                       decode=fused))  # fmt: skip
    if ev.ablations:
        fixed = dataclasses.replace(fused, fusion=FusionConfig(gate="fixed", fixed_w=0.5))
        ms.append(dict(name="Floe, fixed w=0.5", lora=floe, cloud=guard, decode=fixed))
        ms.append(dict(name="Floe, no deadline", lora=floe, cloud=guard, decode=waits))
    return ms


def latency_queries(bench, n: int) -> list[int]:
    """`n` query indices, as many of each query type as `n` allows (round robin over the types,
    each shuffled with a fixed seed), sorted."""
    all_idx = range(len(bench.queries))
    rng = np.random.default_rng(0)
    types = sorted({q.qtype for q in bench.queries})
    shuffled = [list(rng.permutation([j for j in all_idx if bench.queries[j].qtype == t]))
                for t in types]  # fmt: skip
    interleaved = [
        int(i) for group in itertools.zip_longest(*shuffled) for i in group if i is not None
    ]
    return sorted(interleaved[:n])


def evaluate(preset: DemoPreset | RealPreset, prep: Setup, fed: dict, run_dir: str, *,
             progress: bool) -> list[dict]:  # fmt: skip
    """Runs every method over every test query; writes `run_dir/eval.jsonl`. Returns the rows."""
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
    lat_idx = latency_queries(bench, preset.eval.latency_queries)
    rows, eval_lines = [], []
    bar = tqdm(methods(preset, fed), desc="evaluate", disable=not progress)
    for m in bar:
        bar.set_postfix_str(m["name"][:30])
        t0 = time.perf_counter()
        res, rec = _run_fused(ctx, all_idx, lora=m["lora"], cloud=m["cloud"], decode=m["decode"])
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
                   private_spans_to_cloud=rec.leaked_spans + rec.partial_spans if rec else 0,
                   partial_spans_to_cloud=rec.partial_spans if rec else 0,
                   leaked_requests=rec.leaked_requests if rec else 0,
                   fused_share=res.share_fused if m["cloud"] else 0.0,
                   failures=dict(res.failures), privacy=res.privacy,
                   seconds=time.perf_counter() - t0)  # fmt: skip
        if rec and rec.examples and row["guarded"]:
            row["leak_examples"] = rec.examples
        if m["name"] in LATENCY_METHODS and lat_idx:
            lat = []
            for i in lat_idx:  # one query at a time: per-token latency of one request
                for _ in range(2):  # the first run compiles this prompt bucket; keep the second
                    r1, _ = _run_fused(ctx, [i], lora=m["lora"], cloud=m["cloud"],
                                       decode=m["decode"], net_seed=int(i))  # fmt: skip
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
    """Per device: the device model's decode time and energy per token at the device's rank,
    against cloud-bound decoding, charged the cloud model's decode on a server GPU (`rtx-4090`
    profile); the device's radio is not modelled."""
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
    floe_dir = Path(run_dir, "fed", FLOE)
    if not (floe_dir / "checkpoints").is_dir() or not (floe_dir / FINGERPRINT_FILE).is_file():
        # before `setup`, which may pretrain the base models for minutes on a cold cache
        raise UntrainedRunError(
            f"run folder {run_dir} holds no trained federated runs ({floe_dir} has no "
            "checkpoints); run `federate` (or `demo`) with the same preset first"
        )
    prep = setup(preset, progress=progress)
    fed = federate(preset, prep, run_dir, progress=False, train=False)  # finished runs only
    rows = evaluate(preset, prep, fed, run_dir, progress=progress)
    with open(os.path.join(run_dir, "clients.json")) as f:
        clients = json.load(f)
    extraction = {}
    if preset.eval.extraction and any(prep.bench.client_contacts):
        for name, (loras, info) in fed.items():  # what each run's cluster peers can read out
            extraction[name] = extraction_rate(
                prep.edge_params, prep.edge_cfg, loras, prep.bench, prep.tokenizer,
                assignment=info["assignment"], ranks=info["ranks"],
            ).to_json()  # fmt: skip
    result = dict(
        preset=preset.name, eval=dataclasses.asdict(preset.eval), rows=rows, clients=clients,
        extraction=extraction,
        dp={m: info["dp"] for m, (_, info) in fed.items() if info.get("dp")},
        clusters={m: info["assignment"] for m, (_, info) in fed.items()},
        final_ranks={m: info["ranks"] for m, (_, info) in fed.items()},
        energy=energy_table(prep, clients["devices"], clients["ranks"]),
        eval_seconds=time.perf_counter() - t0,
    )  # fmt: skip
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plots(result, run_dir)
    Path(run_dir, "report.md").write_text(format_report(result))
    return result
