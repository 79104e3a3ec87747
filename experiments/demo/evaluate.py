"""The demo's evaluation: every method answers the same test queries, each query with its own
client's adapter and behind its own client's privacy guard (the detector holds that client's
contacts), under a simulated network; the cloud is a black box with its own tokenizer, reached
through `experiments.demo.cloud.CloudEndpoint` (serve-cloud over loopback by default), and a
recorder in front of it counts the private spans that reach it.

`run_evaluate` restores every run's adapters from the run folder's checkpoints and writes
`eval.jsonl`, `results.json`, `report.md` and plots. Methods and their ids:
`experiments.demo.methods`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from experiments.demo.cloud import CloudEndpoint, SpanRecorder
from experiments.demo.federate import federate
from experiments.demo.methods import Method, methods
from experiments.demo.oracle import oracle_answers
from experiments.demo.report import format_report, plots
from experiments.demo.setup import Setup, setup
from experiments.presets import FLOE, DemoPreset
from experiments.real_presets import RealPreset
from floe_jax.config import LoRAConfig
from floe_jax.data.benchmark import SLOT_KINDS, score, score_slots
from floe_jax.data.metrics import task_scores
from floe_jax.data.tokenizer import encode_prompt
from floe_jax.devices import decode_energy_j_per_token, decode_ms_per_token, get_device
from floe_jax.federated.extraction import extraction_rate
from floe_jax.federated.run_folder import FINGERPRINT_FILE, UntrainedRunError
from floe_jax.inference import (
    GuardedCloud,
    PrivacyDetector,
    SimClock,
    SimulatedNetwork,
    generate_fused,
)
from floe_jax.inference.privacy import count_private_spans

LATENCY_METHODS = ("edge-fed", "cloud-redacted", FLOE)  # ids timed one query at a time


@dataclasses.dataclass
class _Ctx:
    preset: DemoPreset | RealPreset
    prep: Setup
    cloud: CloudEndpoint
    fed: dict
    prompts: list[list[int]]
    decode: object

    def queries_of(self, client: int) -> list[int]:
        return [i for i, q in enumerate(self.prep.bench.queries) if q.client == client]

    def clients(self) -> list[int]:
        return sorted({q.client for q in self.prep.bench.queries})

    def lora_rows(self, run: str | None, idx):
        if run is None:
            return None
        rows = np.asarray([self.prep.bench.queries[i].client for i in idx])
        return jax.tree.map(lambda x: x[rows], self.fed[run][0])


def detector(preset, bench, client: int, action: str, *, cloud_decides: bool = False
             ) -> PrivacyDetector:  # fmt: skip
    """Client `client`'s privacy detector: the preset's policy with `action`, and the client's
    own private strings registered (its contacts' names, phones and emails: names no pattern can
    find; phones and emails are matched even where their pattern would not be). For a method
    where the cloud decides every token (`cloud_decides`: w = 0), a span under way is redacted,
    not left to the edge (`pending="edge"` would hand those tokens to the edge). Answers are
    memoised (`PrivacyDetector(memo=True)`): every method screens the same prompts and prefixes."""
    policy = dataclasses.replace(preset.eval.policy, action=action)
    if cloud_decides and policy.pending == "edge":
        policy = dataclasses.replace(policy, pending="redact")
    det = PrivacyDetector(policy, memo=True)
    det.register_terms(bench.private_terms(client))
    return det


def _guard(ctx: _Ctx, client: int, m: Method, recorder: SpanRecorder) -> GuardedCloud:
    f = m.decode.fusion
    det = detector(ctx.preset, ctx.prep.bench, client, m.cloud,
                   cloud_decides=f.gate == "fixed" and f.fixed_w == 0.0)  # fmt: skip
    return GuardedCloud(recorder, det, decode=ctx.decode)


class CloudPrompts:
    """Edge ids -> the text a request to the cloud carries: a real-model query's prompt in the
    cloud's own chat template (`RealSetup.cloud_prompts`) where the ids start with that query's
    prompt in the edge's, then the answer so far (the edge's tokens decoded); other ids are
    decoded as they are (`decode`). So each side reads its own template, and the privacy guard
    screens the text the cloud is sent.

    Args:
      decode: edge ids -> text (special tokens skipped).
      prompts: each query's prompt ids (the edge's template).
      cloud_texts: each query's prompt in the cloud's template.
    """

    _TAIL = 8  # prompts are looked up by (length, last ids), then compared whole

    def __init__(self, decode, prompts, cloud_texts):
        self.decode = decode
        self.by_tail: dict[tuple, list[tuple[list[int], str]]] = {}
        for p, t in zip(prompts, cloud_texts, strict=True):
            key = (len(p), tuple(p[-self._TAIL :]))
            self.by_tail.setdefault(key, []).append((list(p), t))
        self.lengths = sorted({len(p) for p in prompts}, reverse=True)

    def __call__(self, ids) -> str:
        ids = list(ids)
        for n in self.lengths:  # the longest prompt that starts `ids`
            if n > len(ids):
                continue
            for p, text in self.by_tail.get((n, tuple(ids[max(n - self._TAIL, 0) : n])), ()):
                if ids[:n] == p:
                    return text + self.decode(ids[n:])
        return self.decode(ids)


def _eos(ctx: _Ctx) -> tuple[int, ...]:
    """The edge's stop ids: every one a real checkpoint lists, else the tokenizer's."""
    return ctx.prep.real.eos_ids if ctx.prep.real else (ctx.prep.tokenizer.eos_token_id,)


def _answers(ctx: _Ctx, tokens) -> list[str]:
    tok, eos = ctx.prep.tokenizer, _eos(ctx)
    out = []
    for ids in tokens:
        ids = [t for t in ids if t not in eos]
        out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


def _run_fused(ctx: _Ctx, m: Method, idx, recorder, *, net_seed: int):
    """generate_fused of method `m` over queries `idx` (one client's)."""
    ev, tok = ctx.preset.eval, ctx.prep.tokenizer
    client = ctx.prep.bench.queries[idx[0]].client
    guard = None
    if m.cloud is not None:
        recorder.rows = [ctx.prep.bench.queries[i].private_spans for i in idx]
        guard = _guard(ctx, client, m, recorder)
    config = dataclasses.replace(m.decode, eos_id=_eos(ctx), pad_id=tok.pad_token_id)
    if ctx.prep.real:  # the largest answer budget of these queries' tasks
        config = dataclasses.replace(
            config, max_new_tokens=max(ctx.prep.real.budgets[i] for i in idx)
        )
    return generate_fused(
        ctx.prep.edge_params, ctx.prep.edge_cfg, [ctx.prompts[i] for i in idx], cloud=guard,
        config=config, lora=ctx.lora_rows(m.run, idx), clock=SimClock(),
        network=SimulatedNetwork(rtt_ms=ev.rtt_ms, sigma=ev.sigma, server_ms=ev.server_ms,
                                 seed=net_seed),
        decode=ctx.decode, mapper=ctx.cloud.mapper,
    )  # fmt: skip


def token_kinds(tokenizer, ids, query) -> list[str]:
    """The answer slot kind (`format`, `personal`, `general`) of each generated token while the
    generated text still spells the start of the gold answer (a token is labelled by its first
    non-space character); the list stops where the text leaves the gold answer."""
    kinds, text, out = query.char_kinds(), "", []
    for t in ids:
        if t == tokenizer.eos_token_id:
            break
        before = len(text.lstrip())
        text += tokenizer.decode([int(t)])
        now = text.lstrip()
        if not query.answer.startswith(now):
            break
        if len(now) > before:
            out.append(kinds[before])
    return out


def _fused_rows(ctx: _Ctx, m: Method):
    """Runs a fused method over every client's queries: (predictions, recorder, stats)."""
    bench, tok = ctx.prep.bench, ctx.prep.tokenizer
    rec = SpanRecorder(ctx.cloud.backend, ctx.decode) if m.cloud else None
    preds = [""] * len(bench.queries)
    w_kind = {k: [] for k in SLOT_KINDS}
    fused, failures, privacy = [], {}, {}
    batches = [(c, ctx.queries_of(c)) for c in ctx.clients()]
    if ctx.prep.real:  # one batch per answer budget: a short task's answers stop at its own
        budgets = ctx.prep.real.budgets
        batches = [(c, [i for i in idx if budgets[i] == n]) for c, idx in batches
                   for n in sorted({budgets[i] for i in idx})]  # fmt: skip
    for client, idx in batches:
        res = _run_fused(ctx, m, idx, rec, net_seed=client)
        for j, (i, answer) in enumerate(zip(idx, _answers(ctx, res.tokens), strict=True)):
            preds[i] = answer
            for t, kind in enumerate(token_kinds(tok, res.tokens[j], bench.queries[i])):
                w_kind[kind].append(float(res.w[t, j]))
        live = ~np.isnan(res.w)
        fused.append((res.fused[live].sum(), live.sum()))
        for k, v in res.failures.items():
            failures[k] = failures.get(k, 0) + v
        for k, v in res.privacy.items():
            if isinstance(v, dict):
                privacy.setdefault(k, {})
                for kk, vv in v.items():
                    privacy[k][kk] = privacy[k].get(kk, 0) + vv
            elif isinstance(v, int | float):
                privacy[k] = privacy.get(k, 0) + v
    share = sum(a for a, _ in fused) / max(sum(b for _, b in fused), 1) if m.cloud else 0.0
    stats = dict(fused_share=float(share), failures=failures, privacy=privacy,
                 router_w={k: (float(np.mean(v)) if v else None, len(v))
                           for k, v in w_kind.items()})  # fmt: skip
    return preds, rec, stats


def _router(ctx: _Ctx, edge_preds, cloud_preds):
    """The query-level router's answers: a query whose prompt the asking client's detector finds
    a private span in goes to the edge, the rest to the cloud. Also returns the private spans its
    cloud queries carried (the detector's misses)."""
    bench = ctx.prep.bench
    preds, leaked, to_cloud = [], 0, 0
    dets = {c: detector(ctx.preset, bench, c, "redact") for c in ctx.clients()}
    for i, q in enumerate(bench.queries):
        if dets[q.client].find(q.prompt):
            preds.append(edge_preds[i])
        else:
            preds.append(cloud_preds[i])
            to_cloud += 1
            leaked += count_private_spans(q.prompt, q.private_spans).total
    return preds, leaked, to_cloud


def _oracle(ctx: _Ctx, m: Method) -> list[bool]:
    bench = ctx.prep.bench
    rec = SpanRecorder(ctx.cloud.backend, ctx.decode)
    ok = [False] * len(bench.queries)
    for client in ctx.clients():
        idx = ctx.queries_of(client)
        rec.rows = [bench.queries[i].private_spans for i in idx]
        got = oracle_answers(
            ctx.prep.edge_params, ctx.prep.edge_cfg, ctx.prep.tokenizer,
            [bench.queries[i] for i in idx], guard=_guard(ctx, client, m, rec),
            mapper=ctx.cloud.mapper, lora=ctx.lora_rows(m.run, idx),
        )  # fmt: skip
        for i, g in zip(idx, got, strict=True):
            ok[i] = g
    return ok, rec


def _accuracy(bench, preds) -> tuple[dict, dict]:
    """Exact match per query type and overall, and per task (`floe_jax.data.benchmark.score`)."""
    acc = score(preds, bench.queries)
    per_task = {}
    for task in sorted({q.task for q in bench.queries}):
        sel = [i for i, q in enumerate(bench.queries) if q.task == task]
        per_task[task] = score([preds[i] for i in sel], [bench.queries[i] for i in sel])["overall"]
    return acc, per_task


def _latency(ctx: _Ctx, m: Method, lat_idx) -> tuple[list[float], list]:
    """Per-token ms of `m` over the queries `lat_idx`, one at a time, and each query's result."""
    lat, results = [], []
    for i in lat_idx:  # one query at a time: per-token latency of one request
        rec = SpanRecorder(ctx.cloud.backend, ctx.decode)
        for _ in range(2):  # the first run compiles this prompt bucket; keep the second
            r1 = _run_fused(ctx, m, [i], rec, net_seed=int(i))
        lat += list(r1.latency_s[1:] * 1e3)  # token 0 includes the prefill
        results.append(r1)
    return lat, results


def _speculative_latency(ctx: _Ctx, m: Method, lat_idx, token_by_token: list) -> dict:
    """Floe's latency queries decoded again with speculative fused decoding
    (`speculate=eval.speculate`, k adapted): ms per token, and how its output compares with the
    token-by-token results `token_by_token` of the same queries: the same greedy tokens unless a
    reply missed the deadline in one mode (the two modes ask at different times);
    `differ_in_time` counts queries that differ with every reply in time in both."""
    spec = dataclasses.replace(
        m, decode=dataclasses.replace(m.decode, speculate=ctx.preset.eval.speculate)
    )
    lat, results = _latency(ctx, spec, lat_idx)
    stats = [r.speculation for r in results]
    pairs = list(zip(results, token_by_token, strict=True))
    same = [a.tokens == b.tokens for a, b in pairs]
    late = [a.failures["deadline"] + b.failures["deadline"] > 0 for a, b in pairs]
    return dict(
        speculate=ctx.preset.eval.speculate,
        latency_ms_mean=float(np.mean(lat)),
        tokens_per_call=float(np.mean([s["tokens_per_call"] for s in stats])),
        acceptance=float(np.mean([s["acceptance"] for s in stats])),
        same_output=int(sum(same)),
        queries=len(same),
        # greedy speculation is token by token unless a reply came too late in either mode
        differ_in_time=int(sum(not s and not t for s, t in zip(same, late, strict=True))),
    )


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
    skip = {tok.bos_token_id, tok.pad_token_id}  # read once: tokenizer properties are slow
    decode = lambda ids: tok.decode([i for i in ids if i not in skip], skip_special_tokens=True)  # noqa: E731
    lat_idx = latency_queries(bench, preset.eval.latency_queries)
    rows, eval_lines, done = [], [], {}
    with CloudEndpoint(prep.cloud_params, prep.cloud_cfg, prep.cloud_tokenizer,
                       edge_tokenizer=tok, how=preset.eval.cloud, top_k=preset.eval.decode.top_k,
                       private_values=[s for q in bench.queries for s in q.private_spans],
                       eos_ids=prep.real.cloud_eos_ids if prep.real else None,
                       ) as cloud:  # fmt: skip
        prompts = [encode_prompt(tok, q.prompt) for q in bench.queries]
        to_cloud = CloudPrompts(decode, prompts, prep.real.cloud_prompts) if prep.real else decode
        ctx = _Ctx(preset, prep, cloud, fed, prompts, to_cloud)
        bar = tqdm(methods(preset, set(fed)), desc="evaluate", disable=not progress)
        for m in bar:
            bar.set_postfix_str(m.id)
            t0 = time.perf_counter()
            at_server = cloud.server_recorder.spans if cloud.server_recorder else None
            row = dict(id=m.id, method=m.name, reference=m.reference, guarded=m.cloud in
                       ("redact", "edge_only"), cloud_requests=0, private_spans_to_cloud=0,
                       partial_spans_to_cloud=0, fused_share=0.0)  # fmt: skip
            if m.kind == "router":
                preds, leaked, to_cloud = _router(ctx, done["edge-fed"], done["cloud-redacted"])
                row |= dict(private_spans_to_cloud=leaked, cloud_requests=to_cloud,
                            fused_share=to_cloud / len(preds))  # fmt: skip
            elif m.kind == "oracle":
                ok, rec = _oracle(ctx, m)
                preds = [q.answer if g else "" for q, g in zip(bench.queries, ok, strict=True)]
                row |= dict(cloud_requests=rec.requests,
                            private_spans_to_cloud=rec.leaked_spans + rec.partial_spans,
                            partial_spans_to_cloud=rec.partial_spans)  # fmt: skip
            else:
                preds, rec, stats = _fused_rows(ctx, m)
                row |= stats
                if rec is not None:
                    row |= dict(cloud_requests=rec.requests,
                                private_spans_to_cloud=rec.leaked_spans + rec.partial_spans,
                                partial_spans_to_cloud=rec.partial_spans,
                                leaked_requests=rec.leaked_requests)  # fmt: skip
                    if rec.examples and row["guarded"]:
                        row["leak_examples"] = rec.examples
            done[m.id] = preds
            if at_server is not None and m.kind != "router":
                row["spans_at_server"] = cloud.server_recorder.spans - at_server
            row["accuracy"], row["per_task"] = _accuracy(bench, preds)
            if isinstance(preset, RealPreset):  # ROUGE-L, and exact match on closed tasks
                row["scores"] = task_scores(preds, [q.answer for q in bench.queries],
                                            [q.task for q in bench.queries],
                                            closed_tasks=preset.closed_tasks)  # fmt: skip
            if m.id in LATENCY_METHODS and lat_idx:
                lat, results = _latency(ctx, m, lat_idx)
                row |= dict(latency_ms=lat, latency_ms_mean=float(np.mean(lat)),
                            latency_ms_p95=float(np.percentile(lat, 95)))  # fmt: skip
                if m.id == FLOE and preset.eval.speculate:
                    row["speculative"] = _speculative_latency(ctx, m, lat_idx, results)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            eval_lines.append({k: v for k, v in row.items() if k != "latency_ms"} | {
                "predictions": [{"q": i, "pred": preds[i], "answer": q.answer, "qtype": q.qtype,
                                 "slots": score_slots(preds[i], q)}
                                for i, q in enumerate(bench.queries)]
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
        data=prep.real.data if prep.real else None,
        eval_seconds=time.perf_counter() - t0,
    )  # fmt: skip
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plots(result, run_dir)
    Path(run_dir, "report.md").write_text(format_report(result))
    return result
