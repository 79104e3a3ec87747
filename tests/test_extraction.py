"""Tests of floe_jax/federated/extraction.py: what a peer reads out of a cluster's adapter about
another client's private contacts, with a positive control that memorises on purpose."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.data.benchmark import BenchmarkConfig, make_benchmark
from floe_jax.data.tokenizer import benchmark_tokenizers, encode_example, encode_examples
from floe_jax.data.world import APP_FIELD, Contact, contact_example
from floe_jax.federated.client import make_optimizer, optimized_factors, train_step
from floe_jax.federated.config import DPConfig, FedConfig
from floe_jax.federated.extraction import extraction_rate, given_away, is_hit, peers
from floe_jax.federated.loop import train_federated
from floe_jax.federated.rounds import client_start
from floe_jax.federated.types import client_data
from floe_jax.lora import init_lora, stack_loras
from floe_jax.model import init_params

# The smoke preset's benchmark sizes (experiments/presets.py), and its edge model's shape.
SMOKE = BenchmarkConfig(
    num_countries=6, public_repeats=2, num_clients=3, contacts_per_client=2,
    test_contacts_per_client=1, examples_per_client=6, queries_per_type=3, format_samples=8,
)  # fmt: skip
ALL = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module")
def world():
    bench = make_benchmark(SMOKE)
    tok, _ = benchmark_tokenizers(bench, edge_vocab_size=320, cloud_vocab_size=300)
    cfg = ModelConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
        num_kv_heads=1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return bench, tok, cfg, init_params(cfg, key=jax.random.key(0))


def test_hit_needs_the_part_the_prompt_does_not_give_away():
    c = Contact("Mira", "Okafor", "555-0142", "mira.okafor@example.com", "Zorbia")
    assert given_away(c, "phone") == 4 and given_away(c, "email") == len("mira.okafor@")
    assert is_hit(" 555-0142", c, "phone", None) and is_hit("A: 555-014", c, "phone")
    assert not is_hit(" 555-01", c, "phone") and not is_hit(" 555-014", c, "phone", None)
    assert not is_hit(" mira.okafor@", c, "email")  # derivable from the name in the prompt
    assert is_hit(" mira.okafor@exa", c, "email") and is_hit("mira.okafor@example.com", c, "email")
    assert is_hit("call  555-0142 now", c, "phone", None)


def test_peer_is_the_richest_other_member_of_the_cluster():
    assert peers([0, 0, 1, 0, 2], [2, 8, 4, 8, 4]) == [1, 3, -1, 1, -1]


def _overfit(world, client: int, steps: int = 300, show_app: bool = True):
    """An adapter trained on nothing but client `client`'s contact facts (with the app hidden,
    the one its app copies)."""
    bench, tok, cfg, params = world
    fields = ("phone", "email") if show_app else (APP_FIELD[bench.client_tasks[client]],)
    pairs = [
        (p, f" {r}")
        for c in bench.client_contacts[client][: SMOKE.contacts_per_client]
        for p, r in (contact_example(c, f, show_app=show_app) for f in fields)
    ]
    batch = {k: jnp.asarray(v) for k, v in encode_examples(tok, pairs).items()}
    lora = init_lora(cfg, LoRAConfig(rank=8, alpha=16, targets=ALL), key=jax.random.key(1))
    opt = make_optimizer("adam", lr=1e-2)
    step = jax.jit(lambda l, s: train_step(params, l, s, batch, cfg=cfg, opt=opt)[:2])
    state = opt.init(optimized_factors(lora))
    for _ in range(steps):
        lora, state = step(lora, state)
    return lora


@pytest.mark.parametrize("show_app", [True, False])
def test_positive_control_counts_a_memorised_adapter(world, show_app):
    """An adapter overfit on client 0's facts, downloaded by everyone: client 0's peer reads
    every fact out; nobody else's and no held-out contact's are there to read. With the app in
    the prompts, phone and email are each asked; without it, the probe is laid out as the
    clients' prompts (no `App:` line) and asks for the value the victim's app copies."""
    bench, tok, cfg, params = world
    bench = dataclasses.replace(bench, config=dataclasses.replace(SMOKE, app_in_prompt=show_app))
    loras = stack_loras([_overfit(world, 0, show_app=show_app)] * 3)
    res = extraction_rate(params, cfg, loras, bench, tok, assignment=[0, 0, 0], ranks=[8] * 3,
                          max_new_tokens=24)  # fmt: skip
    per = 2 if show_app else 1
    n = per * SMOKE.contacts_per_client
    assert res.peer == (1, 0, 0) and res.queries == (n, n, n)
    assert res.hits[0] >= n - 1 and res.hits[1:] == (0, 0)  # all of them on the CPU
    assert res.control_queries == (per,) * 3 and res.control_hits == (0, 0, 0)
    assert res.rate == pytest.approx(res.hits[0] / (3 * n)) and {x[0] for x in res.leaks} == {0}
    # Nobody to ask: a client alone in its cluster is not counted.
    alone = extraction_rate(params, cfg, loras, bench, tok, assignment=[0, 1, 2], ranks=[8] * 3)
    assert alone.peer == (-1, -1, -1) and sum(alone.queries) == 0 and alone.rate == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("private", [False, True])
def test_extraction_after_a_federated_run(world, tmp_path, private):
    """A federated run on the smoke benchmark (one cluster, so every client has peers), with
    and without DP; the measurement runs on what each client downloads. The tiny random model
    memorises next to nothing in two rounds either way (the positive control shows what a
    memorised fact looks like); the held-out control must stay at zero."""
    bench, tok, cfg, params = world
    T = max(len(encode_example(tok, e.prompt, e.response)[0]) for e in bench.pooled_examples())
    T = -(-T // 16) * 16
    pairs = [[(e.prompt, e.response) for e in ex] for ex in bench.client_examples]
    enc = [encode_examples(tok, p, seq_len=T) for p in pairs]
    data = client_data([(e["tokens"], e["mask"], e["loss_mask"]) for e in enc])
    fed = FedConfig(
        num_rounds=2, clients_per_round=3, local_steps=2, batch_size=2, seq_len=T, lr=1e-2,
        lora=LoRAConfig(rank=4, alpha=8), max_to_keep=1, clustering="given",
        dp=DPConfig(enabled=private, clip_norm=0.1, noise_multiplier=1.0, delta=1e-3),
    )  # fmt: skip
    ranks = np.asarray([4, 2, 4], np.int32)
    state, rows = train_federated(
        params, data, cfg=cfg, fed=fed, run_dir=str(tmp_path), ranks=ranks, progress=False
    )
    assert ("dp_epsilon" in rows[-1]) == private
    loras = client_start(state.global_loras, state.assignment, jnp.asarray(ranks), fed)
    res = extraction_rate(params, cfg, loras, bench, tok, assignment=[0, 0, 0], ranks=ranks)
    n = SMOKE.contacts_per_client  # the app is not in the prompts: one value per contact
    assert res.peer == (2, 0, 0) and res.queries == (n, n, n)
    assert res.control_hits == (0, 0, 0)
    assert res.rate == sum(res.hits) / sum(res.queries)  # the rate is hits over questions asked
    assert all(0 <= h <= q for h, q in zip(res.hits, res.queries, strict=True))
    assert dataclasses.asdict(res).keys() >= {"hits", "leaks"} and res.to_json()["rate"] == res.rate


@pytest.mark.parametrize("show_app", [True, False])
def test_probe_is_laid_out_as_the_clients_prompts(show_app):
    """The probe is a welcome back as the clients' prompts write it, with or without the
    `App:` line as they have it, its card naming the contact only."""
    bench = make_benchmark(dataclasses.replace(SMOKE, app_in_prompt=show_app))
    welcome = next(e for ex in bench.client_examples for e in ex  # an app the probe names
                   if "is back home" in e.prompt and e.task in ("sms", "mail"))  # fmt: skip
    contact = next(c for c in bench.client_contacts[0] if c.first in welcome.prompt)
    probe, value = contact_example(contact, APP_FIELD[welcome.task], show_app=show_app)
    card, *rest = welcome.prompt.split("\n")
    assert probe.split("\n")[1:] == rest  # the same lines after the card
    assert probe.split("\n")[0] == f"Contact: {contact.name} | home {contact.home}"
    assert value in card and value not in probe
