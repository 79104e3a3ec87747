"""The demo's report: the Markdown table of every method (`format_report`) and its plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from experiments.presets import FLOE

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
        if r.get("partial_spans_to_cloud"):
            spans = f"{spans} ({r['partial_spans_to_cloud']} partial)"
        if r["reference"]:
            spans = f"{spans} (not guarded)"
        lines.append(
            f"| {r['method']} | "
            + " | ".join(_fmt(a.get(t)) for t in QTYPES)
            + f" | **{a['overall']:.2f}** | {spans} | {_fmt(r.get('latency_ms_mean'), '.1f')} | "
            f"{_fmt(r.get('latency_ms_p95'), '.1f')} | {r['fused_share']:.2f} |"
        )
    c = result["clients"]
    # runs that end with other ranks than they started with (HetLoRA's self-pruning)
    pruned = {m: r for m, r in result.get("final_ranks", {}).items() if r != c["ranks"]}
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
        "Notes: accuracy is exact match per query type. Private spans are counted by a recorder "
        "between the privacy guard and the cloud back end (every request text, every query's "
        "private spans, `count_private_spans`): complete ones, and partial ones (a request that "
        "ends in the start of a span, cut short while the edge generated it). "
        "Latency: queries decoded one at a time "
        "under a simulated network "
        "(lognormal RTT), measured compute; token 0 (prefill) excluded. Ranks: device memory "
        "budgets scaled into the tiny demo model's range (see `experiments/demo/setup.py`).",
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
