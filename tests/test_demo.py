"""The demo end to end on the `smoke` preset, the presets and overrides, the command line."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from experiments import cli, demo
from experiments.presets import (
    CENTRAL,
    FLOE,
    LOCAL,
    PRESETS,
    DemoEval,
    baseline_name,
    get_preset,
)
from experiments.real_presets import REAL_PRESETS
from floe_jax import sharding
from floe_jax.config import ConfigError
from floe_jax.federated.config import AggregationConfig


def test_presets_and_overrides_parse():
    for name in [*PRESETS, *REAL_PRESETS]:
        assert get_preset(name).name == name
    p = get_preset(
        "smoke",
        ["fed.rounds.num_rounds=3", "fed.rounds.agg.method=fedit", "eval.decode.deadline_s=0.12",
         "eval.decode.fusion.gate=maxprob", "fed.baselines=", "bench.seed=2"],
    )  # fmt: skip
    assert p.fed.rounds.num_rounds == 3 and p.fed.rounds.agg.method == "fedit"
    assert p.fed.baselines == ()
    assert p.eval.decode.deadline_s == 0.12 and p.eval.decode.fusion.gate == "maxprob"
    assert p.bench.seed == 2
    assert PRESETS["smoke"].fed.rounds.num_rounds != 3  # the preset itself is untouched (frozen)
    redact = get_preset("smoke", ["eval.policy.action=redact", "eval.policy.pending=hold"])
    assert (redact.eval.policy.action, redact.eval.policy.pending) == ("redact", "hold")
    with pytest.raises(ConfigError, match="eval.policy.action"):
        get_preset("smoke", ["eval.policy.action=allow"])  # the guarded methods need a guard
    named = get_preset("smoke", ["fed.baselines=fedit,flexlora"]).fed.baselines
    assert named == (AggregationConfig(method="fedit"), AggregationConfig(method="flexlora"))


def test_demo_runs_nest_the_round_config():
    """Floe's run is `fed.rounds` with K from the data (silhouette) unless `known_k`; each
    baseline is the same rounds unclustered under its own rule (HetLoRA's options on); the
    local-only run gives every client its own cluster, the centralized one a client per task
    family holding the family's pooled data, for as many steps as the family's clients."""
    fed = PRESETS["default"].fed
    runs = fed.runs(num_tasks=3, num_clients=6)
    assert runs[FLOE] == fed.rounds and runs[FLOE].num_clusters is None  # silhouette picks K
    assert runs[FLOE].clustering == "updates" and runs[FLOE].agg.method == "hetlora"
    assert list(runs)[1:] == [*fed.baseline_runs(), LOCAL, CENTRAL]
    for b in fed.baselines:
        run = runs[baseline_name(b)]
        assert run == dataclasses.replace(fed.rounds, agg=b, clustering="none", num_clusters=None)
    het = runs["hetlora-norm_weighting-prune_threshold0.05"].agg
    assert het.norm_weighting and het.prune_threshold == 0.05
    assert runs[LOCAL].clustering == "given" and runs[LOCAL].agg.method == "fedit"
    assert runs[CENTRAL].clients_per_round == 3 and runs[CENTRAL].clustering == "given"
    assert runs[CENTRAL].local_steps == 2 * fed.rounds.local_steps
    known = dataclasses.replace(fed, known_k=True, local=False, centralized=False)
    assert known.runs(num_tasks=3, num_clients=6)[FLOE].num_clusters == 3
    assert set(known.runs(num_tasks=3, num_clients=6)) == {FLOE, *fed.baseline_runs()}
    with pytest.raises(ConfigError, match="fed.baselines"):
        dataclasses.replace(fed, baselines=(AggregationConfig(method="fedit"),) * 2)
    with pytest.raises(ConfigError, match="fed.rank_candidates"):
        dataclasses.replace(fed, rank_candidates=(4, 32))


def test_methods_have_stable_ids():
    """Every compared method of the issue is there under its id, in a fixed order."""
    p = PRESETS["default"]
    runs = {FLOE, LOCAL, CENTRAL, *p.fed.baseline_runs()}
    ms = demo.methods(p, runs)
    ids = [m.id for m in ms]
    assert len(set(ids)) == len(ids)
    for need in (
        "floe",
        "query-router",
        "edge-fed",
        "cloud-redacted",
        "centralized",
        "oracle",
        "edge-base",
        "edge-local",
        "cloud-full",
        "proxy-tuning",
        "mix-0.5",
        "floe-w0",
        "fedit-fusion",
        "flexlora-fusion",
        "floe-edge-only",
        "floe-no-deadline",
    ):
        assert need in ids, need
    by = {m.id: m for m in ms}
    assert by["floe"].cloud == "redact" and by["floe-edge-only"].cloud == "edge_only"
    assert by["cloud-full"].cloud == "allow" and by["cloud-full"].reference
    assert by["edge-fed"].cloud is None and by["edge-fed"].run == FLOE
    assert by["query-router"].kind == "router" and by["oracle"].kind == "oracle"
    assert (
        by["floe-w0"].decode.fusion.fixed_w == 0.0
        and by["proxy-tuning"].decode.fusion.gate == "proxy"
    )
    assert "centralized" not in [m.id for m in demo.methods(p, {FLOE})]


@pytest.mark.parametrize(
    "override, match",
    [
        ("fed.nope=1", "nope"),
        ("fed.rounds.num_rounds=many", "num_rounds"),
        ("fed.rounds.agg.method=bogus", "bogus"),
        ("eval.decode.deadline_s=-1", "deadline_s"),
        ("eval.rtt_ms=-1", "rtt_ms"),
        ("eval.rtt_ms=nan", "eval.rtt_ms: expected a finite number"),
        ("eval.decode.deadline_s=nan", "deadline_s"),
        ("no_equals_sign", "key=value"),
    ],
)
def test_bad_overrides_are_clear(override, match):
    with pytest.raises(ConfigError, match=match):
        get_preset("smoke", [override])


def test_demo_eval_built_in_code_refuses_nan():
    with pytest.raises(ConfigError, match="eval.sigma must be a finite number"):
        DemoEval(sigma=float("nan"))


def test_clients_per_round_above_the_clients_is_an_error(tmp_path):
    """No silent clamp: the round names the field when it asks for more clients than there are."""
    preset = get_preset(
        "smoke", [f"cache_dir={tmp_path / 'cache'}", "fed.rounds.clients_per_round=4"]
    )
    with pytest.raises(ConfigError, match="FedConfig.clients_per_round=4"):
        demo.run_federate(preset, str(tmp_path / "run"), progress=False)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")


def test_cli_help_and_errors(capsys):
    assert cli.DEFAULT_COMMAND == "demo"
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    for command in ("demo", "federate", "evaluate"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
    assert cli.main(["demo", "smoke", "fed.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert cli.main(["nonsense"]) == 2


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # with the optional DP run, so its row, its ε and the extraction table are checked too
    preset = get_preset("smoke", [f"cache_dir={root / 'cache'}", "fed.dp.enabled=true",
                                  "fed.dp.noise_multiplier=1.0", "fed.dp.delta=0.1"])  # fmt: skip
    assert preset.eval.cloud == "http"  # the cloud behind serve-cloud on a loopback port
    run_dir = root / "run"
    return demo.run_demo(preset, str(run_dir), progress=False), run_dir


def test_smoke_demo_writes_run_folder(smoke_run):
    result, run_dir = smoke_run
    for name in ("config.json", "clients.json", "eval.jsonl", "results.json", "report.md",
                 "accuracy.png", "rounds.png", "latency.png", "router.png"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    for method in ("floe", "fedit", LOCAL, CENTRAL):
        lines = (run_dir / "fed" / method / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == get_preset("smoke").fed.rounds.num_rounds
    assert (run_dir / "fed" / "floe" / "clusters.json").is_file()
    report = (run_dir / "report.md").read_text()
    for plot in ("accuracy.png", "router.png", "latency.png", "rounds.png"):
        assert f"]({plot})" in report  # embedded
    assert "## Speculative fused decoding" in report
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["eval"]["policy"]["action"] == "redact"  # the eval settings travel with it
    ids = [r["id"] for r in saved["rows"]]
    assert {"floe", "query-router", "edge-fed", "cloud-redacted", "centralized", "oracle"} <= set(
        ids
    )
    for r in saved["rows"]:
        assert f"`{r['id']}`" in report
        assert {"general", "personal", "both", "overall"} <= set(r["accuracy"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["name"] == "smoke" and config["fed"]["rounds"]["num_rounds"] >= 1
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["id"] for e in evals] == [r["id"] for r in result["rows"]]


def test_smoke_demo_reports_dp_and_extraction(smoke_run):
    """The optional DP run is trained (FedIT in each cluster: HetLoRA takes no DP), evaluated
    beside Floe, and its ε reported; every run's extraction by cluster peers is measured."""
    result, run_dir = smoke_run
    assert (run_dir / "fed" / "floe-dp" / "fingerprint.json").is_file()
    rows = [json.loads(x) for x in (run_dir / "fed" / "floe-dp" / "metrics.jsonl").open()]
    assert rows[-1]["dp_epsilon"] is not None and rows[-1]["dp_epsilon"] > 0
    assert result["dp"]["floe-dp"]["epsilon"] == rows[-1]["dp_epsilon"]
    assert "floe-dp" in [r["id"] for r in result["rows"]]
    assert set(result["extraction"]) == set(result["clusters"]) >= {"floe", "floe-dp"}
    for name, e in result["extraction"].items():
        assert 0 <= e["rate"] <= 1 and 0 <= e["control_rate"] <= 1
        sizes = np.bincount(result["clusters"][name])
        assert (sum(e["queries"]) > 0) == bool((sizes > 1).any()), name  # peers, when any
    report = (run_dir / "report.md").read_text()
    assert "client-level DP, ε =" in report and "read out of the adapters" in report


def test_a_run_folder_is_never_silently_reused(smoke_run, tmp_path, capsys):
    """Other settings on a finished run folder: an error listing them (config.json untouched),
    until --restart; `evaluate` on a folder without trained runs is an error, never a training."""
    _, run_dir = smoke_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cache = f"cache_dir={run_dir.parent / 'cache'}"
    dp = ["fed.dp.enabled=true", "fed.dp.noise_multiplier=1.0", "fed.dp.delta=0.1"]
    before = (run / "config.json").read_text()
    assert cli.main(["federate", "smoke", cache, *dp, "fed.rounds.lr=0.5", "--out", str(run),
                     "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "other settings" in err and "lr" in err and "--restart" in err
    assert (run / "config.json").read_text() == before
    empty = tmp_path / "empty"
    assert cli.main(["evaluate", "smoke", cache, "--out", str(empty), "--no-progress"]) == 2
    assert "fed" in capsys.readouterr().err
    assert not (empty / "fed" / "floe" / "checkpoints").exists()


def test_smoke_demo_no_private_span_reaches_the_cloud(smoke_run):
    result, _ = smoke_run
    rows = {r["id"]: r for r in result["rows"]}
    guarded = [r for r in rows.values() if r["guarded"]]
    assert guarded and all(r["cloud_requests"] > 0 for r in guarded)
    assert all(r["private_spans_to_cloud"] == 0 for r in guarded), [
        (r["method"], r.get("leak_examples")) for r in guarded
    ]
    assert all(r["partial_spans_to_cloud"] == 0 for r in guarded)  # counted in the total too
    # ... and the server, which counts what it received on its own, agrees
    assert all(r["spans_at_server"] == 0 for r in guarded if r["id"] != "query-router")
    # the recorder does see spans when the guard lets them through (the privacy-violating ref)
    ref = rows["cloud-full"]
    assert ref["reference"] and ref["private_spans_to_cloud"] > 0
    assert ref["spans_at_server"] > 0
    assert rows["floe"]["fused_share"] > 0  # fusion on every query type: redact, not edge_only


def test_smoke_demo_latency_and_ranks(smoke_run):
    result, _ = smoke_run
    rows = {r["id"]: r for r in result["rows"]}
    for name in ("edge-fed", "cloud-redacted", "floe"):
        assert rows[name]["latency_ms_mean"] > 0
    # the cloud-only request waits for the simulated round trip on every token
    assert rows["cloud-redacted"]["latency_ms_mean"] > 50
    # Floe's latency queries also run speculatively: whole rounds of drafted tokens per call
    spec = rows["floe"]["speculative"]
    assert spec["queries"] == 1 and spec["latency_ms_mean"] > 0
    assert spec["tokens_per_call"] >= 1 and 0 <= spec["same_output"] <= 1
    assert spec["differ_in_time"] == 0  # greedy: the token-by-token output, replies in time
    ranks = result["clients"]["ranks"]
    assert len(set(ranks)) > 1 and max(ranks) <= get_preset("smoke").fed.rounds.max_rank


def test_client_ranks_differ_on_default_devices():
    p = get_preset("default")
    devices, ranks = demo.client_ranks(p.fed, p.bench.num_clients, p.edge, seq_len=128)
    assert len(devices) == len(ranks) == get_preset("default").bench.num_clients
    assert len(set(ranks)) > 1


# ----------------------------------------------------------------------------- real-model path


def _tiny_real_preset(root):
    """The `qwen` preset's code path on tiny local stand-ins (`experiments.standins`): a random
    Llama edge and a random Qwen2 cloud written by transformers, each with its family's
    tokenizer layout (special tokens, chat template, a list of stop ids in
    `generation_config.json`) trained locally at its own size (340 and 300 tokens: other merges,
    other ids), and a Dolly-shaped jsonl of three categories split Dirichlet over six clients,
    some of its examples past `seq_len`."""
    from _hf_utils import save_hf_model

    from experiments.standins import dolly_jsonl, standin_tokenizer, write_standin

    cats = ("classification", "closed_qa", "open_qa")
    rows = dolly_jsonl(root / "dolly.jsonl", 48, categories=cats)
    texts = [f"{r['instruction']} {r['context']} {r['response']}" for r in rows]
    for name, family, case, vocab, seed in (
        ("edge", "llama3", "llama-gqa", 340, 0),
        ("cloud", "qwen2", "qwen2-gqa", 300, 1),
    ):
        tok = standin_tokenizer(family, vocab, texts, seed=seed)
        ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)  # fmt: skip
        save_hf_model(case, root / name, seed=seed, overrides=ids)
        write_standin(
            root / name, family, tok, json.loads((root / name / "config.json").read_text())
        )
    smoke = PRESETS["smoke"]
    return dataclasses.replace(
        REAL_PRESETS["qwen"], edge_path=str(root / "edge"), cloud_path=str(root / "cloud"),
        dataset=str(root / "dolly.jsonl"), num_clients=6, dirichlet_alpha=1.0, test_per_client=1,
        max_train_per_client=4, dtype="float32", max_new_tokens=3,
        max_new_tokens_by_task="classification=2", closed_tasks=("classification",),
        fed=dataclasses.replace(
            smoke.fed, rounds=dataclasses.replace(smoke.fed.rounds, clients_per_round=3,
                                                  seq_len=56),
            baselines=(), local=False, centralized=False,
            devices=("jetson-orin-nano-8gb", "raspberry-pi-5-8gb"),
        ),
        eval=dataclasses.replace(
            smoke.eval, latency_queries=1, oracle=False, cloud="http",
        ),
    )  # fmt: skip


def test_real_model_preset_on_tiny_stand_ins(tmp_path):
    """A Llama edge with a Qwen2 cloud of another family and vocabulary, both chat-templated,
    on Dolly-shaped data split over more clients than tasks: the whole demo runs and reports
    ROUGE-L per category (exact match on the closed one) in report.md and results.json."""
    preset = _tiny_real_preset(tmp_path)
    setup = demo.setup_real(preset)
    assert setup.edge_cfg.vocab_size == 340 and setup.cloud_cfg.vocab_size == 300
    edge_tok, cloud_tok = setup.tokenizer, setup.cloud_tokenizer
    # every stop id of generation_config.json, on each side
    assert setup.real.eos_ids == tuple(
        edge_tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    )
    stops = {cloud_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert set(setup.real.cloud_eos_ids) == stops
    # each side's prompt in its own chat template, the same question inside
    q, cloud_prompt = setup.bench.queries[0], setup.real.cloud_prompts[0]
    assert q.prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert q.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert cloud_prompt.startswith("<|im_start|>system\n") and cloud_prompt.endswith(
        "<|im_start|>assistant\n"
    )
    question = q.prompt.split("<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    assert f"<|im_start|>user\n{question}<|im_end|>" in cloud_prompt
    # Dirichlet: six clients over three categories, each with a test query and training data
    data = setup.real.data
    assert len(data["clients"]) == 6 and all(c["test"] == 1 and c["train"] >= 1
                                             for c in data["clients"])  # fmt: skip
    assert data["rows"] == 48 and data["used"] == 48 - data["dropped"]
    # seq_len=56 cuts some examples (trained on their head) and drops the ones whose prompt fills it
    assert (
        data["truncated"] > 0 and data["longer_than_seq_len"] == data["truncated"] + data["dropped"]
    )
    assert max(len(c["tasks"]) for c in data["clients"]) > 1  # a mix, not one task each
    assert setup.real.budgets == tuple(2 if q.task == "classification" else 3
                                       for q in setup.bench.queries)  # fmt: skip

    result = demo.run_demo(preset, str(tmp_path / "run"), progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Answer quality (ROUGE-L F; exact match on closed tasks)" in report
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["data"] == json.loads(json.dumps(data))
    rows = {r["id"]: r for r in result["rows"]}
    for r in saved["rows"]:
        sc = r["scores"]
        assert sc["overall"]["n"] == 6 and set(sc["per_task"]) <= set(
            ("classification", "closed_qa", "open_qa")
        )
        assert ("exact_match" in sc["per_task"].get("classification", {"exact_match": 0})
                and "exact_match" not in sc["per_task"].get("open_qa", {}))  # fmt: skip
    # the scores are those of the predictions written to eval.jsonl (rouge-score on them)
    from floe_jax.data.metrics import rouge_l

    lines = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    floe = next(x for x in lines if x["id"] == "floe")
    want = np.mean([rouge_l(p["pred"], p["answer"]) for p in floe["predictions"]])
    assert rows["floe"]["scores"]["overall"]["rouge_l"] == pytest.approx(want)
    assert all(r["private_spans_to_cloud"] == 0 for r in rows.values() if r["guarded"])


def test_real_model_preset_refuses_a_tokenizer_past_its_models_vocabulary(tmp_path):
    preset = _tiny_real_preset(tmp_path)  # edge tokenizer 340 tokens, cloud model vocab 300
    bad = dataclasses.replace(preset, cloud_tokenizer_path=preset.edge_path)
    with pytest.raises(ValueError, match=r"the cloud tokenizer .* 340 tokens, more than .* 300"):
        demo.setup_real(bad)


def test_qwen_preset_parses_with_paths():
    p = get_preset("qwen", ["edge_path=/m/edge", "cloud_path=/m/cloud", "fed.rounds.num_rounds=2"])
    assert p.edge_path == "/m/edge" and p.fed.rounds.num_rounds == 2
    with pytest.raises(ConfigError, match="dtype"):
        get_preset("qwen", ["dtype=float16"])


def test_multi_host_demo_setup_runs_on_process_0_first(monkeypatch):
    """In a multi-host `federate`, process 0 sets up (pretrains into the cache) before the
    others, which then load its weights; no two processes write the cache at once."""
    from jax.experimental import multihost_utils

    from experiments.demo import federate as fed_mod

    calls, failed = [], [0, 0]  # what each process reports to the agreement (process_allgather)
    monkeypatch.setattr(
        fed_mod, "setup", lambda preset, progress, models: calls.append("setup") or "prep"
    )
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda flag: calls.append("sync") or np.asarray(failed))  # fmt: skip
    monkeypatch.setattr(fed_mod.jax, "process_count", lambda: 2)
    for index, want in ((0, ["setup", "sync"]), (1, ["sync", "setup"])):
        calls.clear()
        monkeypatch.setattr(fed_mod.jax, "process_index", lambda index=index: index)
        assert fed_mod._setup_in_turn(PRESETS["smoke"], False) == "prep"
        assert calls == want, index
    # Process 0's setup fails: it raises its own error, process 1 stops instead of waiting.
    failed[0] = 1
    with pytest.raises(sharding.ProcessFailedError, match=r"\[0\] failed at 'floe_jax:demo_setup'"):
        fed_mod._setup_in_turn(PRESETS["smoke"], False)  # as process 1 (the index left above)

    def full_disk(preset, progress, models):
        raise OSError("no space left on the cache's disk")

    monkeypatch.setattr(fed_mod, "setup", full_disk)  # as process 0: its own error, after the sync
    monkeypatch.setattr(fed_mod.jax, "process_index", lambda: 0)
    calls.clear()
    with pytest.raises(OSError, match="no space left"):
        fed_mod._setup_in_turn(PRESETS["smoke"], False)
    assert calls == ["sync"]


def test_centralized_pools_each_task_family():
    """`task_families` numbers families by first client; `pooled` gives family g every real row
    of its clients in client order (no padding rows); indexing by the families maps each
    family's adapter back to its clients."""
    from experiments.demo.federate import pooled, task_families
    from floe_jax.federated.types import client_data

    fam = task_families(["mail", "sms", "mail", "call", "sms"])
    np.testing.assert_array_equal(fam, [0, 1, 0, 2, 1])
    rows = [np.full((n, 4), k, np.int32) for k, n in enumerate([2, 1, 3, 1, 2])]
    data = client_data(
        [(r, np.ones_like(r, np.float32), np.ones_like(r, np.float32)) for r in rows]
    )
    got = pooled(data, fam)
    assert got.num_clients == 3 and list(np.asarray(got.num_examples)) == [5, 3, 1]
    np.testing.assert_array_equal(np.asarray(got.tokens)[0, :5, 0], [0, 0, 2, 2, 2])
    np.testing.assert_array_equal(np.asarray(got.tokens)[1, :3, 0], [1, 4, 4])
    np.testing.assert_array_equal(np.asarray(got.tokens)[2, :1, 0], [3])
    adapters = np.asarray([10, 11, 12])
    np.testing.assert_array_equal(adapters[fam], [10, 11, 10, 12, 11])
