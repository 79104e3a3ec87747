"""Tests of floe_jax/federated: client update, its lift over clients, the round."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.federated import rounds
from floe_jax.federated.aggregate import (
    Aggregated,
    Rule,
    make_rule,
    register_rule,
    unregister_rule,
)
from floe_jax.federated.checks import check_round, drop_reasons
from floe_jax.federated.client import (
    default_client_chunk,
    local_update,
    local_update_clients,
    make_optimizer,
    token_loss,
)
from floe_jax.federated.config import AggregationConfig, ConfigError, FedConfig
from floe_jax.federated.loop import train_federated
from floe_jax.federated.rounds import init_server_state, round_step, tensor_names
from floe_jax.federated.types import client_data
from floe_jax.lora import init_lora, stack_loras
from floe_jax.model import forward, init_params
from floe_jax.overrides import apply_overrides

S, B, T, R = 2, 2, 12, 8
OPT = make_optimizer("adamw", lr=1e-2, weight_decay=0.01)
TARGETS = ("q", "v", "down")  # attention and MLP; fewer tensors keep compiles short


def _batches(key, vocab, *, s=S, b=B, t=T):
    tok = jax.random.randint(key, (s, b, t), 0, vocab)
    ones = jnp.ones((s, b, t), jnp.float32)
    return {"tokens": tok, "mask": ones, "loss_mask": ones}


def _lora(cfg, rank, seed):
    return init_lora(
        cfg, LoRAConfig(rank=rank, alpha=16, max_rank=R, targets=TARGETS), key=jax.random.key(seed)
    )


@pytest.fixture(scope="module")
def update(tiny_cfg):
    return jax.jit(lambda p, l, b: local_update(p, l, b, cfg=tiny_cfg, opt=OPT))


@pytest.fixture(scope="module")
def lifted(tiny_cfg):
    """Jitted `local_update_clients` per chunk mode, compiled once for the module."""
    fns = {}

    def get(chunk):
        if chunk not in fns:
            fns[chunk] = jax.jit(
                lambda p, l, b, k: local_update_clients(
                    p, l, b, cfg=tiny_cfg, opt=OPT, keys=k, client_chunk=chunk
                )
            )
        return fns[chunk]

    return get


@pytest.fixture(scope="module")
def loss_fn(tiny_cfg):
    return jax.jit(lambda p, l, t, m, lm: token_loss(p, l, t, m, lm, cfg=tiny_cfg))


def test_trained_lora_changes_logits_and_lowers_loss(tiny_cfg, tiny_params, update, loss_fn):
    lora = _lora(tiny_cfg, 4, 0)
    one = _batches(jax.random.key(1), tiny_cfg.vocab_size, s=1)
    batches = jax.tree.map(lambda x: jnp.repeat(x, S, axis=0), one)  # one batch, S steps
    new, m = update(tiny_params, lora, batches)
    args = (one["tokens"][0], one["mask"][0], one["loss_mask"][0])
    before = loss_fn(tiny_params, lora, *args)
    after = loss_fn(tiny_params, new, *args)
    assert float(after[0]) < float(before[0]) - 0.05
    assert float(m["tokens"]) == S * B * (T - 1)
    assert float(m["steps"]) == S
    fwd = jax.jit(lambda l: forward(tiny_params, one["tokens"][0], tiny_cfg, lora=l))
    l0, l1 = fwd(lora), fwd(new)
    assert float(jnp.max(jnp.abs(l1 - l0))) > 1e-3


def test_padded_slots_stay_zero(tiny_cfg, tiny_params, lifted):
    ranks = [2, 4, 8]
    loras = stack_loras([_lora(tiny_cfg, r, i) for i, r in enumerate(ranks)])
    batches = jax.vmap(lambda k: _batches(k, tiny_cfg.vocab_size))(
        jax.random.split(jax.random.key(2), 3)
    )
    keys = jax.random.split(jax.random.key(3), 3)
    new, _ = lifted(0)(tiny_params, loras, batches, keys)
    for c, r in enumerate(ranks):
        for m in new.a:
            assert np.all(np.asarray(new.a[m][c, :, :, r:]) == 0), (m, r)
            assert np.all(np.asarray(new.b[m][c, :, r:, :]) == 0), (m, r)
            assert np.any(np.asarray(new.b[m][c, :, :r, :]) != 0), (m, r)


@pytest.mark.parametrize("chunk", [0, 1, None])
def test_lifted_update_equals_loop(tiny_cfg, tiny_params, update, lifted, chunk):
    ranks = [2, 4, 8]
    loras = [_lora(tiny_cfg, r, 10 + i) for i, r in enumerate(ranks)]
    ks = jax.random.split(jax.random.key(4), 3)
    batches = [_batches(k, tiny_cfg.vocab_size) for k in ks]
    batches[2]["loss_mask"] = batches[2]["loss_mask"].at[1:].set(0.0)  # a short client
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
    out, m = lifted(chunk)(tiny_params, stack_loras(loras), stacked, ks)
    for c in range(3):
        ref, rm = update(tiny_params, loras[c], batches[c])
        got = jax.tree.map(lambda x, c=c: x[c], out)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4)
        for k in rm:
            np.testing.assert_allclose(float(m[k][c]), float(rm[k]), rtol=1e-5)
    assert float(m["steps"][2]) == 1.0


def test_loss_ignores_padding_and_prompt_targets(tiny_cfg, tiny_params, loss_fn):
    lora = _lora(tiny_cfg, 4, 5)
    tok = jax.random.randint(jax.random.key(6), (1, T), 0, tiny_cfg.vocab_size)
    ones = jnp.ones((1, T), jnp.float32)
    resp = ones.at[:, : T // 2].set(0.0)  # prompt = first half, response = second half
    loss = lambda t, m, l: loss_fn(tiny_params, lora, t, m, l)
    s, n = loss(tok, ones, resp)
    assert float(n) == T - T // 2
    # The prompt's *targets* carry no loss, but prompt tokens are context for the response.
    s2, _ = loss(tok.at[0, 1].set((tok[0, 1] + 1) % tiny_cfg.vocab_size), ones, resp)
    assert abs(float(s2) - float(s)) > 1e-6
    # The last token is a target only: outside loss_mask, changing it changes nothing.
    last_off = resp.at[0, -1].set(0.0)
    a, _ = loss(tok, ones, last_off)
    b, _ = loss(tok.at[0, -1].set((tok[0, -1] + 1) % tiny_cfg.vocab_size), ones, last_off)
    assert float(a) == float(b)
    # Left padding (any pad ids) gives the loss of the unpadded row.
    pad = 3
    for fill in (0, 7):
        tp = jnp.concatenate([jnp.full((1, pad), fill, tok.dtype), tok], axis=1)
        mp = jnp.concatenate([jnp.zeros((1, pad)), ones], axis=1)
        lp = jnp.concatenate([jnp.ones((1, pad)), resp], axis=1)  # loss_mask 1 on pads: ignored
        sp, np_ = loss(tp, mp, lp)
        np.testing.assert_allclose(float(sp), float(s), rtol=1e-5)
        assert float(np_) == float(n)


def test_masked_rows_and_steps_change_nothing(tiny_cfg, tiny_params, update):
    lora = _lora(tiny_cfg, 4, 7)
    b = _batches(jax.random.key(8), tiny_cfg.vocab_size)
    b["batch_mask"] = jnp.ones((S, B)).at[:, 1].set(0.0).at[S - 1].set(0.0)  # row 1, last step
    other = dict(b, tokens=b["tokens"].at[:, 1].set(5).at[S - 1].set(9))
    (x, mx), (y, my) = update(tiny_params, lora, b), update(tiny_params, lora, other)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert float(mx["steps"]) == S - 1 and float(mx["examples"]) == S - 1
    assert float(mx["loss_sum"]) == float(my["loss_sum"])


def test_fed_config_names_the_field():
    with pytest.raises(ConfigError, match="FedConfig.local_steps"):
        FedConfig(local_steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        FedConfig(optimizer="lion?")
    assert hash(FedConfig()) == hash(FedConfig())


def test_fed_config_nests_lora_and_aggregation_and_takes_dotted_overrides():
    fed = apply_overrides(
        FedConfig(), ["agg.method=hetlora", "agg.prune_threshold=0.1", "lora.rank=16"]
    )
    assert fed.agg == AggregationConfig(method="hetlora", prune_threshold=0.1)
    assert fed.lora.rank == 16 and fed.max_rank == 16
    assert fed.agg.options == {"norm_weighting": False, "prune_threshold": 0.1}
    # the overrides of one nested config validate together, in any order
    assert apply_overrides(FedConfig(), ["agg.prune_threshold=0.1", "agg.method=hetlora"]) == (
        apply_overrides(FedConfig(), ["agg.method=hetlora", "agg.prune_threshold=0.1"])
    )
    with pytest.raises(ConfigError, match="AggregationConfig.prune_threshold"):
        apply_overrides(FedConfig(), ["agg.prune_threshold=0.1"])  # fedavg takes no pruning
    with pytest.raises(ConfigError, match="AggregationConfig.method"):
        AggregationConfig(method="fedprox")
    with pytest.raises(ConfigError, match="max_rank"):
        apply_overrides(FedConfig(lora=LoRAConfig(rank=8, max_rank=8)), ["lora.rank=16"])
    assert AggregationConfig.from_string(" flexlora") == AggregationConfig(method="flexlora")
    grown = apply_overrides(FedConfig(lora=LoRAConfig(rank=8, max_rank=8)),
                            ["lora.rank=16", "lora.max_rank=16"])  # fmt: skip
    assert grown.max_rank == 16


def test_fedavg_equal_ranks_is_mean(tiny_cfg):
    loras = stack_loras([_lora(tiny_cfg, 8, i) for i in range(3)])
    out, _ = make_rule("fedavg").apply(
        (), loras, jnp.array([1.0, 1.0, 2.0]), jnp.array([8, 8, 8]), key=None
    )
    assert isinstance(out, Aggregated)
    want = (loras.a["q_proj"][0] + loras.a["q_proj"][1] + 2 * loras.a["q_proj"][2]) / 4
    np.testing.assert_allclose(np.asarray(out.global_lora.a["q_proj"]), np.asarray(want), 1e-6)
    assert np.all(np.asarray(out.included))


# ----------------------------------------------------------------------------- the round

ROUND_FED = FedConfig(
    num_rounds=2,
    clients_per_round=5,
    local_steps=2,
    batch_size=2,
    seq_len=T,
    lr=1e-2,
    lora=LoRAConfig(rank=R, targets=TARGETS),
    max_to_keep=1,
)


def _client_examples(vocab, n_clients=5, bad=None, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_clients):
        n = 2 + i % 3
        t = rng.integers(0, vocab, (n, T)).astype(np.int32)
        if i == bad:
            t[0, 4] = vocab + 100  # out-of-range id: the embedding gather fills NaN
        out.append((t, np.ones((n, T), np.float32), np.ones((n, T), np.float32)))
    return out


@pytest.fixture(scope="module")
def round_fn(tiny_cfg):
    return jax.jit(lambda s, p, d: round_step(s, p, d, cfg=tiny_cfg, fed=ROUND_FED))


@pytest.fixture
def register():
    """Registers a test's own rules by name, and removes them after the test."""
    names = []

    def reg(name, factory):
        register_rule(name)(factory)
        names.append(name)

    yield reg
    unregister_rule(*names)


def test_nan_client_dropped_with_reason(tiny_cfg, tiny_params, round_fn):
    data = client_data(_client_examples(tiny_cfg.vocab_size, bad=1))
    state = init_server_state(
        tiny_cfg, ROUND_FED, ranks=[2, 4, 8, 2, 4], assignment=[0, 1, 0, 1, 0], num_clusters=2
    )
    names = tensor_names(state.global_loras)
    new, m = round_fn(state, tiny_params, data)
    reasons = drop_reasons(jax.device_get(m), names, ROUND_FED)
    assert list(reasons) == [1]
    assert reasons[1].startswith("non-finite update in ") and "b['q_proj']" in reasons[1]
    assert bool(m["global_finite"]) and int(np.sum(m["included"])) == 4
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new))
    assert np.isfinite(float(m["loss_sum"]))


def test_drop_reason_names_the_tensor(tiny_cfg):
    names = tensor_names(_lora(tiny_cfg, 4, 0))
    assert names[0] == "a['down_proj']" and len(names) == 6
    finite = np.ones((2, 6), bool)
    finite[1, names.index("b['v_proj']")] = False
    m = {
        "client_ids": np.array([7, 9]),
        "included": np.array([True, False]),
        "finite": finite,
        "update_norm": np.array([1.0, np.nan]),
        "examples": np.array([2.0, 2.0]),
    }
    assert drop_reasons(m, names, ROUND_FED) == {9: "non-finite update in b['v_proj']"}
    m["finite"][1] = True
    m["update_norm"][1] = 5.0
    fed = dataclasses.replace(ROUND_FED, max_update_norm=1.5)
    assert drop_reasons(m, names, fed) == {9: "update norm 5 > max_update_norm=1.5"}


def test_round_moves_only_the_sampled_clusters(tiny_cfg, tiny_params, round_fn):
    data = client_data(_client_examples(tiny_cfg.vocab_size))
    state = init_server_state(
        tiny_cfg, ROUND_FED, ranks=[2, 4, 8, 2, 4], assignment=[0] * 5, num_clusters=2
    )
    before = jax.device_get(state)
    new, m = round_fn(state, tiny_params, data)
    ids = np.asarray(m["client_ids"])
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 4] and int(new.round) == 1
    g = new.global_loras
    assert np.any(np.asarray(g.b["q_proj"][0]) != 0)  # cluster 0 trained
    for x, y in zip(
        jax.tree.leaves(jax.tree.map(lambda v: v[1], g)),
        jax.tree.leaves(jax.tree.map(lambda v: v[1], before.global_loras)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # no client in cluster 1
    # Same state and key: the round is deterministic.
    again, m2 = round_fn(before, tiny_params, data)
    np.testing.assert_array_equal(np.asarray(m2["client_ids"]), ids)
    np.testing.assert_array_equal(
        np.asarray(again.global_loras.b["q_proj"]), np.asarray(g.b["q_proj"])
    )


def test_base_delta_from_rule_is_folded_into_the_base(tiny_cfg, tiny_params, register):
    fedavg = make_rule("fedavg")
    L, (I, O) = tiny_cfg.num_layers, tiny_cfg.proj_shape("q_proj")

    def apply(state, loras, weights, ranks, *, key):
        out, state = fedavg.apply(state, loras, weights, ranks, key=key)
        return dataclasses.replace(out, base_delta={"q_proj": jnp.full((L, I, O), 0.01)}), state

    init_base = lambda g: {"q_proj": jnp.zeros((L, I, O))}
    register("test-folding", lambda: Rule(fedavg.init, apply, init_base=init_base))
    fed = dataclasses.replace(ROUND_FED, agg=AggregationConfig(method="test-folding"))
    data = client_data(_client_examples(tiny_cfg.vocab_size))
    state = init_server_state(tiny_cfg, fed, ranks=[8] * 5)
    assert set(state.base_delta) == {"q_proj"}
    step = jax.jit(lambda s, p, d: round_step(s, p, d, cfg=tiny_cfg, fed=fed))
    state, _ = step(state, tiny_params, data)
    state, _ = step(state, tiny_params, data)
    np.testing.assert_allclose(np.asarray(state.base_delta["q_proj"]), 0.02, rtol=1e-6)


def test_frozen_factor_never_moves_and_the_other_trains_as_before(tiny_cfg, tiny_params):
    """FFA-LoRA's local update: A stays bit-identical (weight decay included) while B's first
    AdamW step equals the unfrozen update's (per-parameter optimizer, same gradient for B)."""
    lora = _lora(tiny_cfg, 4, 0)
    lora = dataclasses.replace(lora, b=jax.tree.map(lambda x: x + 0.1, lora.b))  # A gets grads
    one = _batches(jax.random.key(1), tiny_cfg.vocab_size, s=1)
    run = lambda frozen: local_update(tiny_params, lora, one, cfg=tiny_cfg, opt=OPT, frozen=frozen)
    ffa, _ = run(("a",))
    free, _ = run(())
    for m in lora.a:
        np.testing.assert_array_equal(np.asarray(ffa.a[m]), np.asarray(lora.a[m]))
        assert np.any(np.asarray(free.a[m]) != np.asarray(lora.a[m]))  # it would have moved
        np.testing.assert_allclose(np.asarray(ffa.b[m]), np.asarray(free.b[m]), atol=1e-7)
    with pytest.raises(ValueError, match="'c'"):
        run(("c",))
    seen = []  # the optimizer is built over B alone: no AdamW moments kept for A

    def init(tree):
        seen.append(sorted(tree))
        return OPT.init(tree)

    spy = optax.GradientTransformation(init, OPT.update)
    local_update(tiny_params, lora, one, cfg=tiny_cfg, opt=spy, frozen=("a",))
    assert seen == [["b"]]


def test_rule_state_is_initialised_once_per_cluster_and_carried_between_rounds(
    tiny_cfg, tiny_params, register
):
    fedavg, inits = make_rule("fedavg"), []

    def init(lora, *, key):
        inits.append(key)
        return {"applied": jnp.zeros((), jnp.int32)}

    def apply(state, loras, weights, ranks, *, key):
        out, _ = fedavg.apply((), loras, weights, ranks, key=key)
        return out, {"applied": state["applied"] + 1}

    register("test-counting", lambda: Rule(init, apply))
    fed = dataclasses.replace(
        ROUND_FED, agg=AggregationConfig(method="test-counting"), clients_per_round=2
    )
    data = client_data(_client_examples(tiny_cfg.vocab_size, n_clients=4))
    state = init_server_state(tiny_cfg, fed, ranks=[8] * 4, assignment=[0, 1, 0, 1], num_clusters=2)
    step = jax.jit(lambda s, p, d: round_step(s, p, d, cfg=tiny_cfg, fed=fed))
    for _ in range(2):
        state, _ = step(state, tiny_params, data)
    assert len(inits) == 2  # init ran once per cluster, in init_server_state
    # each cluster's own state, applied every round: two clusters never share (mix) a state
    assert [int(s["applied"]) for s in state.rule_state] == [2, 2]


def _spied_rounds(monkeypatch, tiny_cfg, tiny_params, fed, n_rounds, **state_kw):
    """Runs `n_rounds` of `round_step` eagerly, recording each round's (start, trained)."""
    seen = []
    real = rounds.local_update_clients

    def spy(params, loras, batches, **kw):
        out = real(params, loras, batches, **kw)
        seen.append((loras, out[0]))
        return out

    monkeypatch.setattr(rounds, "local_update_clients", spy)
    data = client_data(_client_examples(tiny_cfg.vocab_size, n_clients=4))
    state = init_server_state(tiny_cfg, fed, **state_kw)
    states, metrics = [state], []
    for _ in range(n_rounds):
        state, m = round_step(state, tiny_params, data, cfg=tiny_cfg, fed=fed)
        states.append(state)
        metrics.append(m)
    return states, metrics, seen


def test_fedsa_clients_keep_their_own_b_between_rounds(monkeypatch, tiny_cfg, tiny_params):
    fed = dataclasses.replace(ROUND_FED, agg=AggregationConfig(method="fedsa"), clients_per_round=3)
    states, metrics, seen = _spied_rounds(
        monkeypatch, tiny_cfg, tiny_params, fed, 2, ranks=[8, 4, 8, 2]
    )
    s0, s1 = states[0], states[1]
    assert set(s0.personal) == {"b"} and fed.agg.method == "fedsa"
    assert all(np.all(np.asarray(v) == 0) for v in s0.personal["b"].values())  # LoRA's B init
    ids1, ids2 = (np.asarray(m["client_ids"]) for m in metrics)
    assert bool(np.all(metrics[0]["included"]))
    for m in s1.personal["b"]:
        own = np.asarray(s1.personal["b"][m])
        # round 1: each sampled client keeps the B it trained; the others keep theirs (zeros)
        np.testing.assert_array_equal(own[ids1], np.asarray(seen[0][1].b[m]))
        rest = np.setdiff1d(np.arange(4), ids1)
        assert np.all(own[rest] == 0)
        # personal, not averaged: two clients' B differ
        assert np.any(own[ids1[0]] != own[ids1[1]])
        # round 2 starts every sampled client from its own B and the new global A
        start2 = seen[1][0]
        np.testing.assert_array_equal(
            np.asarray(start2.b[m]), own[ids2] * start2.mask[m][..., None]
        )
        g_a = np.asarray(s1.global_loras.a[m][0])
        np.testing.assert_array_equal(
            np.asarray(start2.a[m]), g_a[None] * np.asarray(start2.mask[m])[:, :, None, :]
        )
    # The fedavg path is unchanged by this: no personal state.
    assert init_server_state(tiny_cfg, ROUND_FED, ranks=[8] * 4).personal is None


def test_fedsa_client_left_out_keeps_its_previous_b(tiny_cfg, tiny_params):
    """A sampled FedSA client the screening leaves out (here: every client, its adapter moved
    more than max_update_norm) keeps the personal B it had, not the one it just trained."""
    fed = dataclasses.replace(ROUND_FED, agg=AggregationConfig(method="fedsa"), clients_per_round=4)
    data = client_data(_client_examples(tiny_cfg.vocab_size, n_clients=4))
    state = init_server_state(tiny_cfg, fed, ranks=[8, 4, 8, 2])
    state, m = round_step(state, tiny_params, data, cfg=tiny_cfg, fed=fed)
    assert bool(np.all(m["included"]))
    before = jax.tree.map(np.asarray, state.personal["b"])
    assert all(np.any(v != 0) for v in before.values())  # trained: no longer LoRA's zero init
    strict = dataclasses.replace(fed, max_update_norm=1e-12)
    after, m = round_step(state, tiny_params, data, cfg=tiny_cfg, fed=strict)
    assert not np.any(np.asarray(m["included"]))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, after.personal["b"]), before)


def test_ffa_round_trains_b_only(monkeypatch, tiny_cfg, tiny_params):
    fed = dataclasses.replace(ROUND_FED, agg=AggregationConfig(method="ffa"), clients_per_round=2)
    states, _, seen = _spied_rounds(monkeypatch, tiny_cfg, tiny_params, fed, 1, ranks=[8] * 4)
    start, trained = seen[0]
    for m in start.a:
        np.testing.assert_array_equal(np.asarray(trained.a[m]), np.asarray(start.a[m]))
        assert np.any(np.asarray(trained.b[m]) != np.asarray(start.b[m]))
        np.testing.assert_allclose(  # the shared A is still the initial one
            np.asarray(states[1].global_loras.a[m]),
            np.asarray(states[0].global_loras.a[m]),
            atol=1e-6,
        )
    assert states[1].personal is None


def test_hetlora_pruned_rank_is_kept_for_the_next_round(tiny_cfg, tiny_params):
    # keep few slots: most tail energy may go
    pruning = AggregationConfig(method="hetlora", prune_threshold=0.9)
    data = client_data(_client_examples(tiny_cfg.vocab_size, n_clients=4))
    fed = dataclasses.replace(ROUND_FED, agg=pruning, clients_per_round=4)
    state = init_server_state(tiny_cfg, fed, ranks=[8] * 4)
    new, m = round_step(state, tiny_params, data, cfg=tiny_cfg, fed=fed)
    ranks = np.asarray(new.ranks)
    assert np.all(ranks >= 1) and np.all(ranks < 8), ranks  # every client pruned, none to zero
    assert bool(np.all(m["included"]))
    again, _ = round_step(new, tiny_params, data, cfg=tiny_cfg, fed=fed)
    assert np.all(np.asarray(again.ranks) <= ranks)  # a pruned client never grows back


def test_hetlora_from_the_config_differs_from_fedit(tiny_cfg, tiny_params, tmp_path):
    """HetLoRA by name with its rank self-pruning and norm weighting is a different rule from
    FedIT in a real federated run: other ranks and other global adapters."""
    data = client_data(_client_examples(tiny_cfg.vocab_size, n_clients=4))
    het = AggregationConfig(method="hetlora", prune_threshold=0.5, norm_weighting=True)
    out = {}
    for name, agg in (("fedit", AggregationConfig(method="fedit")), ("hetlora", het)):
        fed = dataclasses.replace(ROUND_FED, agg=agg, clients_per_round=4, num_rounds=2)
        out[name], _ = train_federated(
            tiny_params, data, cfg=tiny_cfg, fed=fed, run_dir=str(tmp_path / name),
            ranks=[8] * 4, progress=False,
        )  # fmt: skip
    fedit, het_state = out["fedit"], out["hetlora"]
    assert np.all(np.asarray(fedit.ranks) == 8)
    assert np.all(np.asarray(het_state.ranks) < 8)
    assert not np.allclose(
        np.asarray(fedit.global_loras.b["q_proj"]), np.asarray(het_state.global_loras.b["q_proj"])
    )


def _forwarding_flora():  # a caller's own rule passing the key on through **kwargs
    flora = make_rule("flora")
    apply = lambda state, loras, weights, ranks, **kwargs: flora.apply(
        state, loras, weights, ranks, **kwargs
    )
    return flora._replace(apply=apply)


@pytest.mark.parametrize("method", ["flora", "test-forwarding-flora"])
def test_flora_rounds_restart_from_new_fresh_factors(tiny_cfg, tiny_params, method, register):
    """FLoRA folds each round into the base and restarts the adapters: from a new draw each
    round (the round passes its own key to the rule, also through `**kwargs`), not the same A
    every time."""
    register("test-forwarding-flora", _forwarding_flora)
    fed = dataclasses.replace(ROUND_FED, agg=AggregationConfig(method=method), clients_per_round=2)
    data = client_data(_client_examples(tiny_cfg.vocab_size, n_clients=4))
    state = init_server_state(tiny_cfg, fed, ranks=[8] * 4)
    step = jax.jit(lambda s, p, d: round_step(s, p, d, cfg=tiny_cfg, fed=fed))
    a1 = np.asarray((s1 := step(state, tiny_params, data)[0]).global_loras.a["q_proj"])
    a2 = np.asarray(step(s1, tiny_params, data)[0].global_loras.a["q_proj"])
    assert np.all(np.asarray(s1.global_loras.b["q_proj"]) == 0) and np.any(a1 != 0)
    assert np.any(a1 != a2)  # a new draw each round
    assert np.any(np.asarray(s1.base_delta["q_proj"]) != 0)  # the round's update went to the base


# ----------------------------------------------------------------------------- memory


def test_client_axis_does_not_replicate_the_base():
    """From XLA's memory analysis: going from 1 to C clients adds far less than (C-1) copies of
    the base weights (the base is broadcast with in_axes=None, not copied per client)."""
    cfg = ModelConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4
    )
    params = init_params(cfg, key=jax.random.key(0))
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    lcfg = LoRAConfig(rank=2, alpha=16, targets=("q",))

    def total(C, chunk):
        loras = stack_loras([init_lora(cfg, lcfg, key=jax.random.key(i)) for i in range(C)])
        tok = jnp.zeros((C, 1, 1, 4), jnp.int32)
        b = {"tokens": tok, "mask": jnp.ones(tok.shape), "loss_mask": jnp.ones(tok.shape)}
        keys = jax.random.split(jax.random.key(0), C)
        f = jax.jit(
            lambda p, l, b, k: local_update_clients(
                p, l, b, cfg=cfg, opt=OPT, keys=k, client_chunk=chunk
            )
        )
        ma = f.lower(params, loras, b, keys).compile().memory_analysis()
        return ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes

    C = 8
    for chunk in (0, 2):
        grow = total(C, chunk) - total(1, chunk)
        assert grow < 0.25 * (C - 1) * base_bytes, (chunk, grow, base_bytes)


def test_client_chunk_default_follows_the_backend(monkeypatch):
    """No chunk given: one client at a time on a CPU (measured fastest), all of them vmapped on
    an accelerator, where the client axis is what fills the device."""
    assert FedConfig().client_chunk is None
    assert default_client_chunk() == 1  # the test machine's CPU
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert default_client_chunk() == 0
    with pytest.raises(ConfigError, match="FedConfig.client_chunk"):
        FedConfig(client_chunk=-1)


def test_bad_inputs_name_the_field(tiny_cfg):
    data = client_data(_client_examples(tiny_cfg.vocab_size))
    state = init_server_state(tiny_cfg, ROUND_FED, ranks=[2, 4, 8, 2, 4])
    with pytest.raises(ConfigError, match="FedConfig.seq_len"):
        check_round(dataclasses.replace(ROUND_FED, seq_len=T + 1), data, state)
    with pytest.raises(ConfigError, match="FedConfig.clients_per_round"):
        check_round(dataclasses.replace(ROUND_FED, clients_per_round=6), data, state)
    with pytest.raises(ConfigError, match="client 2 has rank 9"):
        init_server_state(tiny_cfg, ROUND_FED, ranks=[2, 4, 9, 2, 4])
    with pytest.raises(ValueError, match="different sequence lengths"):
        client_data([(np.zeros((1, 4), np.int32),) * 3, (np.zeros((1, 5), np.int32),) * 3])


def test_seq_len_none_takes_the_data_length(tiny_cfg):
    """`FedConfig.seq_len=None` accepts client data of any padded length; a set one must match."""
    data = client_data(_client_examples(tiny_cfg.vocab_size))
    state = init_server_state(tiny_cfg, ROUND_FED, ranks=[2, 4, 8, 2, 4])
    check_round(dataclasses.replace(ROUND_FED, seq_len=None), data, state)
    with pytest.raises(ConfigError, match="FedConfig.seq_len"):
        FedConfig(seq_len=0)


def _task_examples(vocab, task, n=6, seed=0):
    """Sequences following a task's rule: task 0 counts up by one, task 1 counts down by two."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, (n, 1))
    steps = np.arange(T)[None, :]
    t = (start + steps) % vocab if task == 0 else (start - 2 * steps) % vocab
    t = np.ascontiguousarray(t, np.int32)
    return t, np.ones((n, T), np.float32), np.ones((n, T), np.float32)


def test_clustering_by_updates_recovers_planted_tasks(tiny_cfg, tiny_params, tmp_path):
    tasks = [0, 1, 0, 1, 0, 1]
    data = client_data(
        [_task_examples(tiny_cfg.vocab_size, k, seed=i) for i, k in enumerate(tasks)]
    )
    fed = dataclasses.replace(
        ROUND_FED,
        num_rounds=1,
        clients_per_round=6,
        local_steps=8,
        clustering="updates",
        num_clusters=2,
    )
    state, _ = train_federated(
        tiny_params, data, cfg=tiny_cfg, fed=fed, run_dir=str(tmp_path), ranks=[2, 4, 8] * 2,
        progress=False,
    )  # fmt: skip
    assignment = np.asarray(state.assignment)
    assert state.global_loras.scale.shape == (2,)  # one global adapter per cluster
    np.testing.assert_array_equal(assignment, [0, 1, 0, 1, 0, 1])
    # a resumed run reads the stored clusters instead of probing again
    saved = json.loads((tmp_path / "clusters.json").read_text())
    assert saved["assignment"] == [0, 1, 0, 1, 0, 1] and saved["num_clusters"] == 2
    sim = np.asarray(saved["similarity"])
    same = np.equal.outer(tasks, tasks) & ~np.eye(6, dtype=bool)
    assert sim[same].min() > sim[~np.equal.outer(tasks, tasks)].max() - 0.05


def test_flexlora_rounds_take_the_live_rank_bound_and_the_same_update(tiny_cfg, tiny_params):
    """`rounds.round_config`: FlexLoRA without `total_rank` gets the largest rank sum of a
    round's clients, and a round with it computes the padded round's ΔW (live columns only)."""
    data = client_data(_client_examples(tiny_cfg.vocab_size, n_clients=4))
    ranks = [2, 4, 8, 8]
    fed = dataclasses.replace(
        ROUND_FED, agg=AggregationConfig(method="flexlora"), clients_per_round=3
    )
    live = rounds.round_config(fed, ranks)
    assert live.agg.total_rank == 8 + 8 + 4
    given = dataclasses.replace(fed, agg=dataclasses.replace(fed.agg, total_rank=30))
    assert rounds.round_config(given, ranks) is given
    short = dataclasses.replace(fed, agg=dataclasses.replace(fed.agg, total_rank=19))
    with pytest.raises(ConfigError, match="total_rank=19 is below 20"):
        rounds.round_config(short, ranks)  # a round would drop live columns
    assert rounds.round_config(ROUND_FED, ranks) is ROUND_FED  # not FlexLoRA
    out = {}
    for name, f in (("padded", fed), ("live", live)):
        state = init_server_state(tiny_cfg, fed, ranks=ranks)
        out[name], m = round_step(state, tiny_params, data, cfg=tiny_cfg, fed=f)
        assert int(m["included"].sum()) == 3
    for mod in out["live"].global_loras.a:  # every adapted module, square or not
        dw = {
            name: np.einsum(
                "klir,klro->klio",
                np.asarray(s.global_loras.a[mod]),
                np.asarray(s.global_loras.b[mod]),
            )  # fmt: skip
            for name, s in out.items()
        }
        assert np.abs(dw["padded"]).max() > 0
        np.testing.assert_allclose(dw["live"], dw["padded"], rtol=1e-4, atol=1e-6)
