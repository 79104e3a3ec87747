"""floe_jax.lora invariants, and adapters against PEFT (save_peft / load_peft round trips)."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest

import floe_jax.hf as hf
from floe_jax.config import ConfigError, LoRAConfig
from floe_jax.lora import (
    LoRA,
    freeze_padding,
    init_lora,
    lora_delta,
    merge_lora,
    stack_loras,
    true_rank,
    unstack_loras,
)
from tests import _hf_utils as U

ATOL, forward, _hf_model = U.ATOL, U.forward, U.load_hf_model


@pytest.fixture(scope="module")
def base_params(tiny_cfg):
    """Random O(1)-scale params (the shared fixture's N(0, 0.02) weights barely move logits)."""
    return U.random_params(tiny_cfg, seed=0)


def _tokens(vocab, b=2, t=9, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


@jax.jit
def _with_random_b(lora: LoRA, seed: int, std: float = 0.3) -> LoRA:
    """Nonzero B in live slots (padded slots stay zero), so the adapter changes the output."""
    keys = jax.random.split(jax.random.key(seed), len(lora.b))
    items = zip(keys, lora.b.items(), strict=True)
    b = {m: std * jax.random.normal(k, v.shape) for k, (m, v) in items}
    return freeze_padding(dataclasses.replace(lora, b=b))


# ----------------------------------------------------------------------------- invariants


def test_zero_b_lora_changes_nothing(tiny_cfg, base_params):
    lora = init_lora(tiny_cfg, LoRAConfig(rank=4, alpha=8), key=jax.random.key(1))
    tokens = _tokens(tiny_cfg.vocab_size)
    np.testing.assert_array_equal(
        forward(base_params, tokens, tiny_cfg, lora=lora), forward(base_params, tokens, tiny_cfg)
    )


@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_lora_delta_gradients_match_autodiff_of_the_formula(lead):
    """`lora_delta` has a hand-written VJP (for XLA:CPU layouts); its gradients for every input
    equal plain autodiff through `((x @ a) * mask) @ b * scale`."""
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (*lead, 6))
    a, b = jax.random.normal(ks[1], (6, 4)), jax.random.normal(ks[2], (4, 3))
    mask, scale = jnp.array([1.0, 1.0, 0.0, 1.0]), jnp.asarray(0.7)
    w = jax.random.normal(ks[3], (*lead, 3))  # a random cotangent
    plain = lambda x, a, b, m, s: jnp.sum(w * (((x @ a) * m) @ b * s))
    mine = lambda x, a, b, m, s: jnp.sum(w * lora_delta(x, a, b, m, s))
    np.testing.assert_allclose(mine(x, a, b, mask, scale), plain(x, a, b, mask, scale), rtol=1e-6)
    got = jax.jit(jax.grad(mine, argnums=(0, 1, 2, 3, 4)))(x, a, b, mask, scale)
    want = jax.grad(plain, argnums=(0, 1, 2, 3, 4))(x, a, b, mask, scale)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # under vmap (clients stacked) too
    xs = jnp.stack([x, 2 * x])
    per = jax.vmap(jax.grad(mine, argnums=1), in_axes=(0, None, None, None, None))
    np.testing.assert_allclose(
        per(xs, a, b, mask, scale)[1], jax.grad(plain, argnums=1)(2 * x, a, b, mask, scale),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_merged_equals_unmerged(tiny_cfg, base_params):
    lcfg = LoRAConfig(rank=3, alpha=8, rslora=True, targets=("q", "v", "down"), max_rank=5)
    lora = _with_random_b(init_lora(tiny_cfg, lcfg, key=jax.random.key(2)), seed=3)
    tokens = _tokens(tiny_cfg.vocab_size)
    adapted = forward(base_params, tokens, tiny_cfg, lora=lora)
    assert np.abs(adapted - forward(base_params, tokens, tiny_cfg)).max() > 1e-3
    merged = forward(merge_lora(base_params, lora), tokens, tiny_cfg)
    np.testing.assert_allclose(merged, adapted, atol=1e-5)


def test_init_lora_padded_slots_zero(tiny_cfg):
    lcfg = LoRAConfig(rank=3, alpha=6, targets=("q", "o"), layers=(1,), max_rank=8)
    lora = init_lora(tiny_cfg, lcfg, key=jax.random.key(4))
    assert lora.max_rank == 8 and int(true_rank(lora)) == 3
    assert float(lora.scale) == pytest.approx(6 / 3)
    for m in ("q_proj", "o_proj"):
        np.testing.assert_array_equal(lora.a[m][:, :, 3:], 0)
        np.testing.assert_array_equal(lora.a[m][0], 0)  # layer 0 is not adapted
        np.testing.assert_array_equal(lora.b[m], 0)
        np.testing.assert_array_equal(lora.mask[m], [[0] * 8, [1] * 3 + [0] * 5])
        assert np.abs(lora.a[m][1, :, :3]).min() > 0


def test_stack_unstack_round_trip(tiny_cfg):
    targets = ("q", "down")
    loras = [
        _with_random_b(
            init_lora(
                tiny_cfg,
                LoRAConfig(rank=r, alpha=2 * r, targets=targets, max_rank=6),
                key=jax.random.key(r),
            ),
            seed=r,
        )
        for r in (1, 4, 6)
    ]
    stacked = stack_loras(loras)
    assert stacked.a["q_proj"].shape == (3, tiny_cfg.num_layers, tiny_cfg.hidden_size, 6)
    np.testing.assert_array_equal(true_rank(stacked), [1, 4, 6])
    for got, want in zip(unstack_loras(stacked), loras, strict=True):
        chex.assert_trees_all_equal(got, want)


def test_lora_targets_take_peft_names_of_fused_modules():
    """PEFT names Phi-3's adapted modules `qkv_proj` and `gate_up_proj`; each stands for the
    projections it fuses, beside the short and canonical names."""
    assert LoRAConfig(targets=("qkv_proj",)).targets == ("q_proj", "k_proj", "v_proj")
    assert LoRAConfig(targets=("gate_up_proj", "o")).targets == ("o_proj", "gate_proj", "up_proj")
    both = LoRAConfig(targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]).targets
    assert both == LoRAConfig(targets="all").targets
    with pytest.raises(ConfigError, match="'qkvo_proj'.*qkv_proj"):
        LoRAConfig(targets=("qkvo_proj",))


def test_heterogeneous_targets_share_a_structure(tiny_cfg, base_params):
    union = ("q", "v", "o", "down")
    c1 = LoRAConfig(rank=2, alpha=4, targets=("q", "v"), max_rank=4)
    c2 = LoRAConfig(rank=4, alpha=4, targets=("o", "down"), max_rank=4)
    l1 = _with_random_b(init_lora(tiny_cfg, c1, key=jax.random.key(5), targets=union), seed=6)
    l2 = _with_random_b(init_lora(tiny_cfg, c2, key=jax.random.key(7), targets=union), seed=8)
    stacked = stack_loras([l1, l2])  # same tree structure despite different targets
    assert set(stacked.a) == {"q_proj", "v_proj", "o_proj", "down_proj"}
    for m in ("o_proj", "down_proj"):  # client 1 does not adapt these: all masked and zero
        np.testing.assert_array_equal(l1.mask[m], 0)
        np.testing.assert_array_equal(l1.a[m], 0)
        np.testing.assert_array_equal(l1.b[m], 0)
    # the union tree computes what the client's own targets compute
    own = LoRA(
        a={m: l1.a[m] for m in ("q_proj", "v_proj")},
        b={m: l1.b[m] for m in ("q_proj", "v_proj")},
        mask={m: l1.mask[m] for m in ("q_proj", "v_proj")},
        scale=l1.scale,
    )
    tokens = _tokens(tiny_cfg.vocab_size, seed=9)
    np.testing.assert_allclose(
        forward(base_params, tokens, tiny_cfg, lora=l1),
        forward(base_params, tokens, tiny_cfg, lora=own),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="not in the tree targets"):
        init_lora(tiny_cfg, c2, key=jax.random.key(0), targets=("q", "v"))


# ----------------------------------------------------------------------------- PEFT parity

# (case, rank, alpha, rslora, targets, layers, max_rank)
PEFT_CASES = {
    "llama-all-targets": ("llama-gqa", 4, 8, False, "all", None, 8),
    "qwen2-rslora-layer1-qv": ("qwen2-gqa", 3, 5, True, ("q", "v"), (1,), 6),
    "llama-bias-mlp-o-layer0": (
        "llama-mha-bias-theta",
        2,
        16,
        False,
        ("o", "gate", "down"),
        (0,),
        2,
    ),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{case: (folder, cfg, params)} of saved random HF checkpoints."""
    root = tmp_path_factory.mktemp("base")
    out = {}
    for i, case in enumerate(sorted({c[0] for c in PEFT_CASES.values()})):
        U.save_hf_model(case, root / case, seed=10 + i)
        out[case] = (root / case, *hf.load_hf(root / case))
    return out


@pytest.mark.parametrize("name", sorted(PEFT_CASES))
def test_save_peft_loads_in_peft_with_same_logits(name, bases, tmp_path):
    case, rank, alpha, rslora, targets, layers, max_rank = PEFT_CASES[name]
    folder, cfg, params = bases[case]
    lcfg = LoRAConfig(
        rank=rank, alpha=alpha, rslora=rslora, targets=targets, layers=layers, max_rank=max_rank
    )
    lora = _with_random_b(init_lora(cfg, lcfg, key=jax.random.key(11)), seed=12)
    hf.save_peft(lora, cfg, tmp_path, rslora=rslora, alpha=alpha, base_model_name_or_path="base")

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == rank  # the true rank, not the padded one
    assert written["lora_alpha"] == alpha and written["use_rslora"] == rslora
    assert written["layers_to_transform"] == (None if layers is None else list(layers))
    assert sorted(written["target_modules"]) == sorted(lcfg.targets)

    model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path).eval()
    tokens = _tokens(cfg.vocab_size, seed=13)
    got = forward(params, tokens, cfg, lora=lora)
    assert np.abs(got - forward(params, tokens, cfg)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, U.hf_logits(model, tokens), atol=ATOL, rtol=0)

    # and back: load_peft gives the same adapter (padded to the same max rank)
    back = hf.load_peft(tmp_path, cfg, max_rank=max_rank)
    assert set(back.a) == set(lcfg.targets)
    np.testing.assert_allclose(float(back.scale), float(lora.scale), rtol=1e-6)
    np.testing.assert_allclose(forward(params, tokens, cfg, lora=back), got, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PEFT_CASES))
def test_peft_created_adapter_loads_with_same_logits(name, bases, tmp_path):
    case, rank, alpha, rslora, targets, layers, max_rank = PEFT_CASES[name]
    folder, cfg, params = bases[case]
    target_modules = list(LoRAConfig(targets=targets).targets)
    pconf = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=target_modules,
        layers_to_transform=None if layers is None else list(layers),
        init_lora_weights=False,  # random B too, so the adapter is not a no-op
    )
    model = peft.get_peft_model(_hf_model(folder), pconf).eval()
    model.save_pretrained(tmp_path)

    lora = hf.load_peft(tmp_path, cfg, max_rank=max_rank)
    assert lora.max_rank == max_rank and int(true_rank(lora)) == rank
    assert float(lora.scale) == pytest.approx(alpha / (rank**0.5 if rslora else rank))
    tokens = _tokens(cfg.vocab_size, seed=14)
    got = forward(params, tokens, cfg, lora=lora)
    assert np.abs(got - forward(params, tokens, cfg)).max() > 1e-2
    np.testing.assert_allclose(got, U.hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_save_peft_writes_true_rank_of_heterogeneous_tree(bases, tmp_path):
    """A client in a union tree: only its live targets, layers and rank slots are written."""
    folder, cfg, params = bases["llama-gqa"]
    lcfg = LoRAConfig(rank=2, alpha=4, targets=("k",), layers=(0,), max_rank=8)
    lora = init_lora(cfg, lcfg, key=jax.random.key(15), targets="all")
    lora = _with_random_b(lora, seed=16)
    hf.save_peft(lora, cfg, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["target_modules"], written["layers_to_transform"]) == (
        2,
        ["k_proj"],
        [0],
    )
    assert written["lora_alpha"] == 4 and written["use_rslora"] is False
    # loading into the same union tree and padded rank gives back exactly the same adapter
    chex.assert_trees_all_equal(hf.load_peft(tmp_path, cfg, max_rank=8, targets="all"), lora)
    with pytest.raises(hf.CheckpointError, match="not in targets"):
        hf.load_peft(tmp_path, cfg, targets=("q", "v"))
    model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path).eval()
    tokens = _tokens(cfg.vocab_size, seed=17)
    np.testing.assert_allclose(
        forward(params, tokens, cfg, lora=lora), U.hf_logits(model, tokens), atol=ATOL, rtol=0
    )
