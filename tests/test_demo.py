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
    REAL_PRESETS,
    DemoEval,
    baseline_name,
    get_preset,
)
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
    local-only run gives every client its own cluster, the centralized one trains one client's
    worth of pooled data for as many steps as all clients together."""
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
    assert runs[CENTRAL].clients_per_round == 1
    assert runs[CENTRAL].local_steps == 6 * fed.rounds.local_steps
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
    """The `qwen` preset's code path on tiny local stand-ins of two families: a random Gemma 3
    edge and a random Qwen3 cloud written by transformers, each with its own tiny tokenizer (300
    and 260 tokens: other merges, other ids), and a tiny jsonl instruction dataset with task
    labels."""
    from _hf_utils import save_hf_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = []
    for i in range(24):
        rows.append({"instruction": f"add {i} and one", "response": f"{i + 1}", "category": "math"})
        rows.append({"instruction": f"spell {i}", "response": f"n{i}", "category": "words"})
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name, case, vocab, seed in (
        ("edge", "gemma3-interleaved", 300, 0),
        ("cloud", "qwen3-window-headdim16", 260, 1),
    ):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<pad>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )  # fmt: skip
        tok.train_from_iterator([r["instruction"] + " " + r["response"] for r in rows], trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
        ids = dict(vocab_size=len(fast), eos_token_id=1, pad_token_id=0, bos_token_id=None)
        save_hf_model(case, root / name, seed=seed, overrides=ids)
        fast.save_pretrained(str(root / name))  # no bos token, like Qwen's
    smoke = PRESETS["smoke"]  # two task families, so Floe's K (known_k) is 2
    return dataclasses.replace(
        REAL_PRESETS["qwen"], edge_path=str(root / "edge"), cloud_path=str(root / "cloud"),
        dataset=str(data), input_column="", num_clients=2, examples_per_client=8,
        test_per_client=2, dtype="float32",
        fed=dataclasses.replace(
            smoke.fed, rounds=dataclasses.replace(smoke.fed.rounds, clients_per_round=2),
            baselines=(), local=False, centralized=False,
        ),
        eval=dataclasses.replace(
            smoke.eval, decode=dataclasses.replace(smoke.eval.decode, max_new_tokens=3),
            latency_queries=1, oracle=False,
        ),
    )  # fmt: skip


def test_real_model_preset_on_tiny_stand_ins(tmp_path):
    """A Gemma 3 edge with a Qwen3 cloud of another vocabulary: the whole demo runs."""
    preset = _tiny_real_preset(tmp_path)
    setup = demo.setup_real(preset)
    assert setup.edge_cfg.vocab_size != setup.cloud_cfg.vocab_size
    assert setup.tokenizer.get_vocab() != setup.cloud_tokenizer.get_vocab()
    result = demo.run_demo(preset, str(tmp_path / "run"), progress=False)
    assert (tmp_path / "run" / "report.md").is_file()
    rows = {r["id"]: r for r in result["rows"]}
    assert set(rows["floe"]["per_task"]) == {"math", "words"}
    assert rows["floe"]["accuracy"]["n_overall"] == 4
    assert all(r["private_spans_to_cloud"] == 0 for r in rows.values() if r["guarded"])
    assert result["clients"]["client_tasks"] in (["math", "words"], ["words", "math"])


def test_real_model_preset_refuses_a_tokenizer_past_its_models_vocabulary(tmp_path):
    preset = _tiny_real_preset(tmp_path)  # edge tokenizer 300 tokens, cloud model vocab 260
    bad = dataclasses.replace(preset, cloud_tokenizer_path=preset.edge_path)
    with pytest.raises(ValueError, match=r"the cloud tokenizer .* 300 tokens, more than .* 260"):
        demo.setup_real(bad)


def test_qwen_preset_parses_with_paths():
    p = get_preset("qwen", ["edge_path=/m/edge", "cloud_path=/m/cloud", "fed.rounds.num_rounds=2"])
    assert p.edge_path == "/m/edge" and p.fed.rounds.num_rounds == 2
    with pytest.raises(ConfigError, match="dtype"):
        get_preset("qwen", ["dtype=float16"])
