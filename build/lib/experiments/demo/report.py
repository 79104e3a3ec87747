"""The demo's report: the Markdown table of every method (`format_report`) and its plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from experiments.presets import CENTRAL, FLOE
from floe_jax.data.benchmark import SLOT_KINDS

QTYPES = ("general", "personal", "both")


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def _privacy_sections(result: dict) -> list[str]:
    """Extraction by cluster peers, and the ε of a differentially private run."""
    lines = []
    if result.get("extraction"):
        lines += ["", "## What cluster peers can read out of the adapters", "",
                  "A peer's downloaded adapter asked (greedy) for each client's training "
                  "contacts' phone and email; a hit is the value past the part the prompt gives "
                  "away. Control: the same question about held-out contacts no one trained on.",
                  "", "| run | hits / questions | rate | control rate |",
                  "|---|---|---|---|"]  # fmt: skip
        for name, e in result["extraction"].items():
            if not sum(e["queries"]):
                lines.append(f"| {name} | no peers: every cluster has one client | — | — |")
                continue
            lines.append(f"| {name} | {sum(e['hits'])} / {sum(e['queries'])} | {e['rate']:.3f} | "
                         f"{e['control_rate']:.3f} |")  # fmt: skip
    for name, d in result.get("dp", {}).items():
        eps = "∞ (no noise)" if d["epsilon"] is None else f"{d['epsilon']:.3g}"
        lines += ["", f"Run `{name}`: client-level DP, ε = {eps} at δ = {d['delta']:g} "
                  f"(noise multiplier {d['noise_multiplier']:g}, clip {d['clip_norm']:g}, "
                  f"{d['sampling']} sampling); its accuracy is the `Floe + client-level DP` row. "
                  "Update-based clustering reads the clients' un-noised first updates, which ε "
                  "does not cover."]  # fmt: skip
    return lines


def _speculative_section(rows: list[dict]) -> list[str]:
    """Floe's latency queries decoded token by token and speculatively (`eval.speculate`)."""
    r = next((r for r in rows if r.get("speculative")), None)
    if r is None:
        return []
    s = r["speculative"]
    return [
        "", "## Speculative fused decoding", "",
        f"Floe's {s['queries']} latency queries again, one cloud call per draft of up to "
        f"{s['speculate']} edge tokens (`FusedDecodeConfig(speculate=k)`, k adapted; the same "
        "network, router, guard and deadline):", "",
        "| mode | ms/token mean | speed-up | tokens per cloud call | acceptance | "
        "same output as token by token |",
        "|---|---|---|---|---|---|",
        f"| token by token | {r['latency_ms_mean']:.1f} | 1.00x | 1 | | |",
        f"| speculative | {s['latency_ms_mean']:.1f} | "
        f"{r['latency_ms_mean'] / s['latency_ms_mean']:.2f}x | {s['tokens_per_call']:.2f} | "
        f"{s['acceptance']:.2f} | {s['same_output']} of {s['queries']} queries |",
        "",
        "Greedy speculation emits the token-by-token tokens while the cloud's replies are in "
        "time; the two modes call the cloud at different times, so a reply can miss the "
        f"deadline in one and not the other. Queries that differ with every reply in time in "
        f"both modes: {s['differ_in_time']}.",
    ]  # fmt: skip


def _scores_section(result: dict) -> list[str]:
    """A real-model run's answer quality: ROUGE-L per method, overall and per task, and exact
    match over the closed tasks (`floe_jax.data.metrics.task_scores`); then the data's counts."""
    rows = [r for r in result["rows"] if r.get("scores")]
    if not rows:
        return []
    tasks = list(rows[0]["scores"]["per_task"])
    closed = "exact_match" in rows[0]["scores"]["overall"]
    lines = ["", "## Answer quality (ROUGE-L F; exact match on closed tasks)", "",
             "| id | ROUGE-L | " + ("exact match | " if closed else "")
             + " | ".join(f"{t} (n={rows[0]['scores']['per_task'][t]['n']})" for t in tasks)
             + " |", "|---" * (2 + closed + len(tasks)) + "|"]  # fmt: skip
    for r in rows:
        sc, per = r["scores"]["overall"], r["scores"]["per_task"]
        cells = []
        for t in tasks:
            em = per[t].get("exact_match")
            cells.append(f"{per[t]['rouge_l']:.3f}" + ("" if em is None else f" / EM {em:.2f}"))
        lines.append(f"| `{r['id']}` | **{sc['rouge_l']:.3f}** | "
                     + (f"{sc['exact_match']:.2f} | " if closed else "")
                     + " | ".join(cells) + " |")  # fmt: skip
    d = result.get("data")
    if d:
        trains = [c["train"] for c in d["clients"]]
        lines += ["", f"Data: {d['rows']} examples read, {d['longer_than_seq_len']} longer than "
                  f"seq_len={d['seq_len']} ({d['long_examples']}: {d['truncated']} cut, "
                  f"{d['dropped']} dropped), {d['used']} used over {len(trains)} clients; "
                  f"training examples per client {min(trains)}–{max(trains)} "
                  f"(median {int(np.median(trains))}); tasks: "
                  + ", ".join(f"{k} {v}" for k, v in d["tasks"].items()) + "."]  # fmt: skip
    return lines


def format_report(result: dict) -> str:
    """The Markdown report of a `run_evaluate` result."""
    lines = [f"# Floe demo — preset `{result['preset']}`", ""]
    lines += [
        "| id | method | general | personal | both | overall | format | personal slots | "
        "general slots | private spans to cloud (client / server) | ms/token mean | ms/token p95 | "
        "fused share |",
        "|---" * 13 + "|",
    ]
    for r in result["rows"]:
        a = r["accuracy"]
        spans = r["private_spans_to_cloud"] if r["cloud_requests"] else "— (no cloud)"
        if r.get("partial_spans_to_cloud"):
            spans = f"{spans} ({r['partial_spans_to_cloud']} partial)"
        if r.get("spans_at_server") is not None and r["cloud_requests"]:
            spans = f"{spans} / {r['spans_at_server']}"
        if r["reference"] and r["cloud_requests"] and not r["guarded"]:
            spans = f"{spans} (not guarded)"
        lines.append(
            f"| `{r['id']}` | {r['method']} | "
            + " | ".join(_fmt(a.get(t)) for t in QTYPES)
            + f" | **{a['overall']:.2f}** | "
            + " | ".join(_fmt(a.get(f"slot_{k}")) for k in SLOT_KINDS)
            + f" | {spans} | {_fmt(r.get('latency_ms_mean'), '.1f')} | "
            f"{_fmt(r.get('latency_ms_p95'), '.1f')} | {r['fused_share']:.2f} |"
        )
    lines += _speculative_section(result["rows"])
    lines += _scores_section(result)
    lines += ["", "## The router's edge weight by answer token kind", "",
              "Mean w (1 = the edge decides, 0 = the cloud) over the generated tokens that follow "
              "the gold answer, split by what the gold answer has there: format, a value copied "
              "from the private card, a general fact. Tokens counted in brackets.", "",
              "| id | format | personal | general |", "|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        w = r.get("router_w")
        if w and r["cloud_requests"]:
            lines.append(f"| `{r['id']}` | " + " | ".join(
                f"{_fmt(w[k][0])} ({w[k][1]})" for k in SLOT_KINDS) + " |")  # fmt: skip
    c = result["clients"]
    # runs that end with other ranks than they started with (HetLoRA's self-pruning)
    pruned = {
        m: r for m, r in result.get("final_ranks", {}).items() if r != c["ranks"] and m != CENTRAL
    }  # the pooled run has its own rank
    lines += ["", "## Clients", "",
              "| client | task | device | LoRA rank | Floe cluster |"
              + "".join(f" rank after {m} |" for m in pruned),
              "|---|---|---|---|---|" + "---|" * len(pruned)]  # fmt: skip
    for i, (t, d, r) in enumerate(zip(c["client_tasks"], c["devices"], c["ranks"], strict=True)):
        lines.append(f"| {i} | {t} | {d} | {r} | {result['clusters'][FLOE][i]} |"
                     + "".join(f" {ranks[i]} |" for ranks in pruned.values()))  # fmt: skip
    lines += _privacy_sections(result)
    lines += ["", "## Energy per token (device model, roofline)", "",
              "| device | rank | edge ms/token | edge J/token | cloud-bound J/token (cloud model "
              "on rtx-4090) |", "|---|---|---|---|---|"]  # fmt: skip
    for e in result["energy"]:
        lines.append(f"| {e['device']} | {e['rank']} | {e['edge_ms']:.4f} | {e['edge_j']:.2e} | "
                     f"{e['cloud_j']:.2e} |")  # fmt: skip
    lines += [
        "",
        "Notes: accuracy is exact match per query type; the slot columns score the answer's "
        "parts (`floe_jax.data.benchmark.score_slots`): its format, the values copied from the "
        "private card, the general facts. Private spans are counted by a recorder "
        "between the privacy guard and the cloud back end (every request text, every query's "
        "private spans, `count_private_spans`): complete ones, and partial ones (a request that "
        "ends in the start of a span, cut short while the edge generated it); after the slash, "
        "the complete spans the cloud server itself found in the prompts it accepted "
        "(`serve_cloud`'s `on_prompt` hook; the http cloud only). "
        "Latency: queries decoded one at a time "
        "under a simulated network "
        "(lognormal RTT), measured compute; token 0 (prefill) excluded; token by token, as the "
        "accuracy rows decode (speculative fused decoding: its own section). Ranks: device memory "
        "budgets scaled into the tiny demo model's range (see `experiments/demo/setup.py`).",
    ]
    rows = result["rows"]
    shown = ["accuracy.png"]
    if any(r.get("router_w") and r["cloud_requests"] for r in rows):
        shown.append("router.png")
    if any(r.get("latency_ms") for r in rows):
        shown.append("latency.png")
    lines += ["", "## Plots", ""] + [f"![{p.removesuffix('.png')}]({p})" for p in
                                     [*shown, "rounds.png"]]  # fmt: skip
    if "times" in result:
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in result["times"].items()]
    return "\n".join(lines) + "\n"


def plots(result: dict, run_dir: str) -> None:
    """accuracy.png (per query type and per slot), router.png (the router's edge weight by answer
    token kind), rounds.png (loss per round), latency.png (per-token latency, log scale);
    `report.md` embeds them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for ax, keys, title in (
        (axes[0], [*QTYPES, "overall"], "exact match by query type"),
        (axes[1], [f"slot_{k}" for k in SLOT_KINDS], "answer parts right (slots)"),
    ):
        width = 0.85 / len(rows)
        for j, r in enumerate(rows):
            ax.bar(np.arange(len(keys)) + j * width, [r["accuracy"].get(k) or 0.0 for k in keys],
                   width, label=r["id"])  # fmt: skip
        ax.set_xticks(np.arange(len(keys)) + 0.425 - width / 2,
                      [k.removeprefix("slot_") for k in keys])  # fmt: skip
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(title)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "accuracy.png"), dpi=100)
    plt.close(fig)

    routed = [r for r in rows if r.get("router_w") and r["cloud_requests"]]
    if routed:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.85 / len(routed)
        for j, r in enumerate(routed):
            ax.bar(
                np.arange(len(SLOT_KINDS)) + j * width,
                [r["router_w"][k][0] or 0.0 for k in SLOT_KINDS],
                width,
                label=r["id"],
            )
        ax.set_xticks(np.arange(len(SLOT_KINDS)) + 0.425 - width / 2, SLOT_KINDS)
        ax.set_ylabel("mean edge weight w (1 = edge, 0 = cloud)")
        ax.set_ylim(0, 1)
        ax.set_title("who decides each answer token, by what the token is")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, "router.png"), dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    fed_dir = Path(run_dir, "fed")
    for d in sorted(fed_dir.iterdir()) if fed_dir.is_dir() else []:
        path = d / "metrics.jsonl"
        if path.is_file():
            ms = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            ax.plot([m["round"] for m in ms], [m["loss"] for m in ms], marker="o", label=d.name)
    ax.set_xlabel("round")
    ax.set_ylabel("client training loss (nats/token)")
    ax.set_title("federated rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "rounds.png"), dpi=100)
    plt.close(fig)

    timed = [r for r in rows if r.get("latency_ms")]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 4))
        lo = max(min(min(r["latency_ms"]) for r in timed), 1e-3)
        hi = max(max(r["latency_ms"]) for r in timed)
        bins = np.geomspace(lo, hi * 1.01, 40)
        for r in timed:
            ax.hist(r["latency_ms"], bins=bins, alpha=0.5, label=r["id"])
        ax.set_xscale("log")
        ax.set_xlabel("per-token latency (ms, log scale; simulated network)")
        ax.set_ylabel("tokens")
        ax.set_title("per-token latency, one query at a time")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, "latency.png"), dpi=100)
        plt.close(fig)


PLOTS = ("accuracy.png", "router.png", "latency.png", "rounds.png")
