"""`python -m experiments seeds`: every seed of the pipeline set, mean ± sd by method id, and paired
differences judged against their spread (hand-computed)."""

import pytest

from experiments.presets import get_preset
from experiments.seeds import format_summary, seeded, summarize


def _result(floe_both, router_both):
    def row(i, both):
        acc = {"general": 1.0, "personal": 1.0, "both": both, "overall": (2 + both) / 3}
        return {"id": i, "method": i, "accuracy": acc, "private_spans_to_cloud": 0}

    return {"rows": [row("floe", floe_both), row("query-router", router_both)]}


def test_seeded_sets_every_seed_of_the_pipeline():
    p = seeded(get_preset("smoke"), 3)
    assert (p.bench.seed, p.edge_pretrain.seed, p.cloud_pretrain.seed, p.fed.rounds.seed) == (
        3, 3, 3, 3,
    )  # fmt: skip


def test_summary_means_sds_and_paired_differences():
    s = summarize({0: _result(0.5, 0.1), 1: _result(0.7, 0.1), 2: _result(0.6, 0.4)})
    both = s["methods"]["floe"]["both"]
    assert both["mean"] == pytest.approx(0.6) and both["sd"] == pytest.approx(0.1)
    (b,) = [b for b in s["beats"] if b["metric"] == "both"]
    assert b["diff_mean"] == pytest.approx(0.4) and b["diff_sd"] == pytest.approx(0.2)
    assert b["beyond_spread"]  # 0.4 > 0.2 and every seed's difference is positive
    s = summarize({0: _result(0.5, 0.1), 1: _result(0.1, 0.2)})
    (b,) = [b for b in s["beats"] if b["metric"] == "both"]
    assert not b["beyond_spread"]  # one seed goes the other way
    assert "`floe`" in format_summary(s) and "± " in format_summary(s)
