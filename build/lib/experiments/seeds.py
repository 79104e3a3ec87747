"""`python -m experiments seeds`: the whole demo over several seeds, reported as mean ± sd.

Seed s sets the benchmark's generator (`bench.seed`: the world, the contacts, the queries), both
base models' pretraining (`edge_pretrain.seed`, `cloud_pretrain.seed`: init and batches) and the
federated rounds (`fed.rounds.seed`: client sampling and adapter init). Each seed is a complete
run folder `OUT/seed-<s>/` (resumable like `demo`); `OUT/summary.json` and `OUT/summary.md` hold
every method's mean and sample standard deviation by stable id, and `OUT/seeds.png` plots them.

A difference between two methods counts as reproduced only where it exceeds the spread: the
summary's `beats` lists, for each pair the Floe claims are about, the mean difference and its
sample sd over seeds (paired: the same seed's runs share data and base models).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

CLAIMS = (  # (method, compared with, metric): what REPRODUCTION.md states Floe does
    ("floe", "query-router", "both"),
    ("floe", "query-router", "overall"),
    ("floe", "edge-fed", "overall"),
    ("floe", "cloud-redacted", "overall"),
    ("floe", "floe-w0", "overall"),
    ("floe", "mix-0.5", "overall"),
)
METRICS = ("general", "personal", "both", "overall", "slot_format", "slot_personal",
           "slot_general")  # fmt: skip


def seeded(preset, seed: int):
    """`preset` with every seed of the pipeline set to `seed`."""
    from floe_jax.overrides import apply_overrides

    return apply_overrides(
        preset,
        [
            f"bench.seed={seed}",
            f"edge_pretrain.seed={seed}",
            f"cloud_pretrain.seed={seed}",
            f"fed.rounds.seed={seed}",
        ],
    )


def summarize(results: dict[int, dict]) -> dict:
    """Mean and sd by method id and metric over the seeds' `results.json`, and the paired
    differences of `CLAIMS` (plus every `<rule>-fusion` baseline and `centralized` against
    Floe where the runs have them)."""
    by_id: dict[str, dict[str, list[float]]] = {}
    names: dict[str, str] = {}
    for res in results.values():
        for r in res["rows"]:
            names[r["id"]] = r["method"]
            d = by_id.setdefault(r["id"], {})
            for k in METRICS:
                if r["accuracy"].get(k) is not None:
                    d.setdefault(k, []).append(float(r["accuracy"][k]))
            d.setdefault("private_spans_to_cloud", []).append(float(r["private_spans_to_cloud"]))
    table = {i: {"name": names[i], **{k: dict(mean=float(np.mean(v)), sd=_sd(v), n=len(v))
                                      for k, v in d.items()}}
             for i, d in by_id.items()}  # fmt: skip
    pairs = list(CLAIMS) + [("floe", i, "overall") for i in by_id if i.endswith("-fusion")]
    pairs += [("floe", "centralized", "overall")] if "centralized" in by_id else []
    beats = []
    for a, b, k in pairs:
        diffs = []
        for res in results.values():
            rows = {r["id"]: r["accuracy"] for r in res["rows"]}
            if a in rows and b in rows and k in rows[a] and k in rows[b]:
                diffs.append(rows[a][k] - rows[b][k])
        if diffs:
            m, sd = float(np.mean(diffs)), _sd(diffs)
            beyond = bool(m > sd and min(diffs) > 0)
            beats.append(dict(method=a, versus=b, metric=k, diff_mean=m, diff_sd=sd,
                              n=len(diffs), beyond_spread=beyond))  # fmt: skip
    return dict(seeds=sorted(results), methods=table, beats=beats)


def _sd(v) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def format_summary(s: dict) -> str:
    """The Markdown of a `summarize` result."""
    cols = ("general", "personal", "both", "overall", "slot_format", "slot_personal",
            "slot_general", "private_spans_to_cloud")  # fmt: skip
    lines = [
        f"# Floe demo over seeds {', '.join(map(str, s['seeds']))} (mean ± sd)",
        "",
        "| id | method | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for i, row in s["methods"].items():
        cells = [f"{row[k]['mean']:.2f} ± {row[k]['sd']:.2f}" if k in row else "—" for k in cols]
        lines.append(f"| `{i}` | {row['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences (same seed), mean ± sd; *beyond spread*: the mean exceeds "
        "the sd and every seed's difference is positive.",
        "",
        "| method | versus | metric | difference | beyond spread |",
        "|---|---|---|---|---|",
    ]
    for b in s["beats"]:
        lines.append(f"| `{b['method']}` | `{b['versus']}` | {b['metric']} | "
                     f"{b['diff_mean']:+.2f} ± {b['diff_sd']:.2f} | "
                     f"{'yes' if b['beyond_spread'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(s["methods"])
    keys = ("general", "personal", "both", "overall")
    fig, ax = plt.subplots(figsize=(14, 5))
    width = 0.85 / len(keys)
    for j, k in enumerate(keys):
        m = [s["methods"][i].get(k, {}).get("mean", 0.0) for i in ids]
        e = [s["methods"][i].get(k, {}).get("sd", 0.0) for i in ids]
        ax.bar(np.arange(len(ids)) + j * width, m, width, yerr=e, capsize=2, label=k)
    ax.set_xticks(np.arange(len(ids)) + 0.425 - width / 2, ids, rotation=45, ha="right")
    ax.set_ylabel("exact match (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"every method over seeds {', '.join(map(str, s['seeds']))}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str], attention_impl: str = "reference") -> int:
    from experiments import demo
    from experiments.cli import check_out_dir, with_attention_impl
    from experiments.presets import get_preset

    p = argparse.ArgumentParser(prog="python -m experiments seeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("preset", nargs="?", default="default")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default=None, help="folder (default runs/seeds-<preset>)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if "=" in args.preset:
        args.overrides, args.preset = [args.preset, *args.overrides], "default"
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    out = args.out or os.path.join("runs", f"seeds-{args.preset}")
    check_out_dir(out)
    base = with_attention_impl(get_preset(args.preset, args.overrides), attention_impl)
    results = {}
    for s in seeds:
        run_dir = os.path.join(out, f"seed-{s}")
        print(f"== seed {s}: {run_dir}")
        results[s] = demo.run_demo(seeded(base, s), run_dir, progress=not args.no_progress)
    summary = summarize(results)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = format_summary(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n![seeds](seeds.png)\n")
    plot(summary, os.path.join(out, "seeds.png"))
    print(text)
    return 0
