"""The Flower app (floe_jax/flower) in Flower's own simulation engine (`flwr.simulation`, Ray)
against floe_jax's own loop: the same adapters, a failing client left out of its round, the
`flower` command. A tiny model and a handful of clients keep it to seconds of training; most of
the time is Ray starting."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")
from flwr.simulation import run_simulation  # noqa: E402

from floe_jax.config import LoRAConfig, ModelConfig  # noqa: E402
from floe_jax.federated.aggregate import aggregate  # noqa: E402
from floe_jax.federated.config import FedConfig  # noqa: E402
from floe_jax.federated.loop import load_trained, train_federated  # noqa: E402
from floe_jax.federated.rounds import init_server_state, plan_round, train_sampled  # noqa: E402
from floe_jax.federated.run_folder import run_fingerprint  # noqa: E402
from floe_jax.federated.types import client_data  # noqa: E402
from floe_jax.flower import FloeClient, FloeServer, client_app, server_app  # noqa: E402
from floe_jax.model import init_params  # noqa: E402

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)  # fmt: skip
T = 8
RANKS = [2, 4, 3, 4]
FED = FedConfig(
    num_rounds=2,
    clients_per_round=3,
    local_steps=2,
    batch_size=2,
    seq_len=T,
    lr=1e-2,
    lora=LoRAConfig(rank=4, targets=("q", "v")),
    clustering="updates",
    num_clusters=2,
)
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
           "init_args": {"num_cpus": 1, "log_to_driver": False}}  # fmt: skip


def _data():
    """Four clients of two tasks: clients 0, 2 draw tokens from the lower half of the
    vocabulary, 1, 3 from the upper half."""
    rng = np.random.default_rng(0)
    ex = []
    for k, n in enumerate([3, 4, 2, 4]):
        lo = 0 if k % 2 == 0 else CFG.vocab_size // 2
        t = rng.integers(lo, lo + CFG.vocab_size // 2, (n, T)).astype(np.int32)
        ex.append((t, np.ones((n, T), np.float32), np.ones((n, T), np.float32)))
    return client_data(ex)


def _params():
    return init_params(CFG, key=jax.random.key(0))


def _client(context, fed=FED, fail=None):
    """The device of `partition-id`: its own row of the run's data; `fail` raises in training
    (a client that dies mid-round)."""
    k = int(context.node_config["partition-id"])
    one = jax.tree.map(lambda x: x[k : k + 1], _data())
    client = FloeClient(_params(), one, CFG, fed, client_id=k, rank=RANKS[k])
    if k == fail:

        def boom(arrays, config):
            raise RuntimeError(f"client {k} killed mid-round")

        client.train = boom
    return client


def _simulate(run_dir, fed, fail=None, **server_kw):
    """One Flower simulation; returns the final ServerState the ServerApp ended with."""
    params, data = _params(), _data()
    fp = run_fingerprint(params, data, cfg=CFG, fed=fed, ranks=RANKS)
    out = []
    server = lambda ctx: FloeServer(CFG, fed, str(run_dir), len(RANKS), fp, ranks=RANKS,
                                    connect_timeout=600, **server_kw)  # fmt: skip
    run_simulation(
        server_app=server_app(server, done=out.append),
        client_app=client_app(lambda ctx: _client(ctx, fed, fail)),
        num_supernodes=len(RANKS),
        backend_config=BACKEND,
    )
    assert len(out) == 1, "the ServerApp did not finish"
    return out[0]


def _close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loop")
    state, _ = train_federated(_params(), _data(), cfg=CFG, fed=FED, run_dir=str(run_dir),
                               ranks=RANKS, progress=False)  # fmt: skip
    return state, run_dir


def test_flower_simulation_gives_the_loops_adapters(tmp_path, loop_run):
    ref, ref_dir = loop_run
    state = _simulate(tmp_path, FED)
    # Floe's clustering put the clients in the same two clusters, every client ends at the
    # same rank
    assert sorted(set(np.asarray(ref.assignment).tolist())) == [0, 1]
    np.testing.assert_array_equal(np.asarray(state.assignment), np.asarray(ref.assignment))
    np.testing.assert_array_equal(np.asarray(state.ranks), np.asarray(ref.ranks))
    _close(state.global_loras, ref.global_loras)
    assert float(np.abs(np.asarray(ref.global_loras.b["q_proj"])).max()) > 1e-4  # it trained
    # the run folder is the loop's: load_trained reads it with the loop's arguments
    loaded = load_trained(_params(), _data(), cfg=CFG, fed=FED, run_dir=str(tmp_path),
                          ranks=RANKS)  # fmt: skip
    _close(loaded.global_loras, ref.global_loras)
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.jsonl"))]
    ref_rows = [json.loads(x) for x in open(os.path.join(ref_dir, "metrics.jsonl"))]
    for row, want in zip(rows, ref_rows, strict=True):
        assert row["clients"] == want["clients"] and row["dropped"] == {}
        assert row["bytes_up"] == want["bytes_up"] and row["bytes_down"] == want["bytes_down"]
        assert row["loss"] == pytest.approx(want["loss"], abs=1e-5)
        # what travelled up is exactly the live factors floe_jax counts
        assert row["wire_bytes_up"] == row["bytes_up"]
    clusters = json.load(open(os.path.join(tmp_path, "clusters.json")))
    want = json.load(open(os.path.join(ref_dir, "clusters.json")))
    assert clusters["assignment"] == want["assignment"]
    assert clusters["num_clusters"] == want["num_clusters"] == 2
    np.testing.assert_allclose(clusters["similarity"], want["similarity"], atol=1e-5)


def test_a_client_killed_mid_round_is_left_out(tmp_path):
    fed = dataclasses.replace(FED, clustering="none", num_clusters=None, num_rounds=1)
    params, data = _params(), _data()
    state0 = init_server_state(CFG, fed, ranks=RANKS)
    plan = plan_round(state0, fed, len(RANKS))
    ids = np.asarray(plan.ids_C).tolist()
    victim = ids[1]
    state = _simulate(tmp_path, fed, fail=victim)
    row = json.loads(open(os.path.join(tmp_path, "metrics.jsonl")).readline())
    assert row["clients"] == ids and row["included"] == 2
    assert list(row["dropped"]) == [str(victim)]
    assert (
        row["dropped"][str(victim)]
        == f"client error: RuntimeError: client {victim} killed mid-round"
    )
    # floe_jax's own aggregation over the clients that replied
    trained, cm = train_sampled(params, plan.start, data, plan.ids_C, plan.data_keys,
                                plan.train_keys, cfg=CFG, fed=fed)  # fmt: skip
    keep = np.asarray([c for c in range(len(ids)) if ids[c] != victim])
    ref = aggregate(fed.agg.method, jax.tree.map(lambda x: x[keep], trained),
                    weights=np.asarray(cm["examples"])[keep],
                    ranks=np.asarray(plan.rank_C)[keep])  # fmt: skip
    _close(jax.tree.map(lambda x: x[0], state.global_loras), ref.global_lora)
    # and not the aggregate over all three
    full = aggregate(fed.agg.method, trained, weights=cm["examples"], ranks=plan.rank_C)
    diff = np.abs(
        np.asarray(full.global_lora.b["q_proj"]) - np.asarray(state.global_loras.b["q_proj"][0])
    )
    assert diff.max() > 1e-4


def test_flower_command_runs_the_demo_preset(tmp_path):
    """`python -m experiments flower` on a two-client smoke preset: a run folder the loop's
    `load_trained` accepts as the run `federate` would have written."""
    from experiments import cli
    from experiments.flower import demo_run
    from experiments.presets import get_preset

    overrides = [f"cache_dir={tmp_path / 'cache'}", "bench.num_clients=2",
                 "fed.rounds.clients_per_round=2", "fed.rounds.num_rounds=1"]  # fmt: skip
    out = tmp_path / "run"
    assert cli.main(["flower", "smoke", *overrides, "--out", str(out), "--num-cpus", "1"]) == 0
    run_dir = out / "fed" / "floe"
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["included"] == 2 and rows[0]["dropped"] == {}
    assert rows[0]["wire_bytes_up"] == rows[0]["bytes_up"] > 0
    run = demo_run(get_preset("smoke", overrides))
    state = load_trained(run.prep.edge_params, run.data, cfg=run.prep.edge_cfg, fed=run.fed,
                         run_dir=str(run_dir), ranks=run.ranks)  # fmt: skip
    assert int(state.round) == 1
    # The rounds need only the edge: the command pretrained no cloud.
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").glob("*-*") if p.is_dir()
            and not p.name.startswith("tokenizers")] == ["edge"]  # fmt: skip


def test_flower_command_refuses_a_run_without_federation(tmp_path, capsys):
    from experiments import cli

    argv = ["flower", "smoke", f"cache_dir={tmp_path / 'cache'}", "--run", "centralized"]
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "run 'centralized' cannot run on Flower" in capsys.readouterr().err


def test_the_wire_holds_the_live_factors_only():
    """A client's adapter travels as its live factors (its layers, its first r slots) and comes
    back bit for bit; a wrong shape is an error naming the client and tensor."""
    from floe_jax.federated.rounds import client_start
    from floe_jax.flower import WireError, client_template, from_live, live_factors

    fed = dataclasses.replace(FED, lora=LoRAConfig(rank=4, targets=("q", "v"), layers=(1,)))
    state = init_server_state(CFG, fed, ranks=RANKS)
    g = jax.tree.map(lambda x: x + 0.5, state.global_loras)  # nonzero a and b everywhere
    lora = client_start(g, np.zeros(1, np.int32), np.asarray([3], np.int32), fed)
    wire = live_factors(lora)
    I, O = CFG.hidden_size, lora.b["q_proj"].shape[-1]
    assert wire["a.q_proj"].shape == (1, I, 3) and wire["b.q_proj"].shape == (1, 3, O)
    back = from_live(wire, client_template(CFG, fed, 3), who="client 7")
    _close(back, lora, atol=0)
    with pytest.raises(WireError, match=r"client 7: tensor b.v_proj is float32\[1, 2, "):
        from_live({**wire, "b.v_proj": wire["b.v_proj"][:, :2]}, back, who="client 7")
    with pytest.raises(WireError, match="client 7: adapter tensors a.q_proj missing"):
        from_live({k: v for k, v in wire.items() if k != "a.q_proj"}, back, who="client 7")
