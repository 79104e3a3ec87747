"""Qwen3, Mistral, Gemma 3, Phi-3 and SmolLM3 against transformers (PyTorch) and PEFT on tiny
random local checkpoints, with sequences longer than every sliding window; and the ring-buffer
cache of sliding layers against the full forward."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import transformers

import floe_jax.hf as hf
from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.decode import generate, pad_prompts
from floe_jax.lora import init_lora, true_rank
from floe_jax.model import forward as _forward
from floe_jax.model import init_cache, unstack_layers
from tests import _hf_utils as U

ATOL = 1e-4
forward = jax.jit(_forward, static_argnames="cfg")
CASES = sorted(U.FAMILY_CASES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (folder, torch model, cfg, params)}, one saved random checkpoint per family."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, case in enumerate(CASES):
        model = U.save_hf_model(case, root / case, seed=20 + i)
        out[case] = (root / case, model, *hf.load_hf(root / case))
    return out


def _tokens(cfg, b=2, t=13, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


def test_every_case_slides_and_its_family_loads(checkpoints):
    got = {checkpoints[c][2].model_type for c in CASES}
    assert got == {"qwen3", "mistral", "gemma3_text", "phi3", "smollm3"}
    for c in CASES:
        cfg = checkpoints[c][2]
        assert any(w is not None and w < 13 for w in cfg.layer_windows), c
    assert checkpoints["smollm3-nope-window4"][2].nope_layers == (1,)
    assert checkpoints["qwen3-window-headdim16"][2].q_size != 32  # head dim of its own


@pytest.mark.parametrize("case", CASES)
def test_config_round_trip(case, checkpoints):
    cfg = checkpoints[case][2]
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf_past_the_window(case, checkpoints):
    _, model, cfg, params = checkpoints[case]
    tokens = _tokens(cfg)
    want = U.hf_logits(model, tokens)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(forward(params, jnp.asarray(tokens), cfg), want, atol=ATOL, rtol=0)
    # a left-padded batch: HF's attention mask and position ids against floe's token mask
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    got = np.asarray(forward(params, jnp.asarray(tokens), cfg, mask=jnp.asarray(mask)))
    want = U.hf_logits(model, tokens, mask)
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_save_hf_loads_in_transformers(case, tmp_path):
    cfg = hf.config_from_hf(U.hf_config(case).to_dict())
    params = U.random_params(cfg, seed=5)
    hf.save_hf(cfg, unstack_layers(params), tmp_path)  # the decode layout saves the same
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    tokens = _tokens(cfg, seed=6)
    np.testing.assert_allclose(
        forward(params, jnp.asarray(tokens), cfg), U.hf_logits(model, tokens), atol=ATOL, rtol=0
    )
    cfg2, params2 = hf.load_hf(tmp_path)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)


def test_phi3_fused_tensors_are_split_at_load_and_fused_at_save(checkpoints, tmp_path):
    _, model, cfg, params = checkpoints["phi3-fused-window6"]
    qkv = model.model.layers[1].self_attn.qkv_proj.weight.detach().numpy()
    q, k = cfg.q_size, cfg.kv_size
    np.testing.assert_array_equal(np.asarray(params["layers"]["k_proj"]["w"][1]), qkv[q : q + k].T)
    hf.save_hf(cfg, params, tmp_path)
    names = set(safetensors.numpy.load_file(tmp_path / hf.WEIGHTS_FILE))
    assert "model.layers.1.self_attn.qkv_proj.weight" in names
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any("q_proj" in n or ".up_proj" in n for n in names)


@pytest.mark.parametrize("case", CASES)
def test_cached_decode_equals_full_forward(case, checkpoints):
    """A left-padded prefill, a 6-token extension (as long as the longest window: it overwrites
    the ring while reading it), then single steps, through ring buffers of W slots: the logits
    of the full forward."""
    _, _, cfg, params = checkpoints[case]
    tokens = jnp.asarray(_tokens(cfg, t=16, seed=1))
    mask = jnp.ones_like(tokens).at[1, :2].set(0)
    full = np.asarray(forward(params, tokens, cfg, mask=mask))
    cache = init_cache(cfg, batch=2, max_len=20)
    slots = [k.shape[1] for k in cache.k]
    assert slots == [20 if w is None else w for w in cfg.layer_windows]  # rings for windows
    dec = unstack_layers(params)
    outs = []
    for lo, hi in [(0, 5), (5, 11), *[(t, t + 1) for t in range(11, 16)]]:
        logits, cache = forward(dec, tokens[:, lo:hi], cfg, cache=cache, mask=mask[:, lo:hi])
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(got[real], full[real], atol=ATOL, rtol=0)  # logits up to ~50


def test_generate_with_rings_equals_greedy_full_forward(checkpoints):
    _, _, cfg, params = checkpoints["gemma3-interleaved"]
    prompts = [[5, 9, 11, 2, 7, 1, 3], [3, 4]]
    tokens, mask = pad_prompts(prompts, buckets=(8,))
    out, _ = generate(params, tokens, mask, cfg, max_new_tokens=8, key=jax.random.key(0))
    for i, p in enumerate(prompts):
        seq = list(p)
        for _ in range(8):  # right-padded to one length: causal, so one compile serves all
            logits = forward(params, jnp.asarray([seq + [0] * (15 - len(seq))], jnp.int32), cfg)
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert np.asarray(out[i]).tolist() == seq[len(p) :]


# ----------------------------------------------------------------------------- PEFT


def _hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("case", CASES)
def test_save_peft_loads_in_peft_with_same_logits(case, checkpoints, tmp_path):
    folder, _, cfg, params = checkpoints[case]
    lora = init_lora(cfg, LoRAConfig(rank=2, alpha=4, targets="all"), key=jax.random.key(1))
    b = {m: 0.3 * jax.random.normal(jax.random.key(2), v.shape) for m, v in lora.b.items()}
    lora = type(lora)(a=lora.a, b=b, mask=lora.mask, scale=lora.scale)
    hf.save_peft(lora, cfg, tmp_path, alpha=4)
    written = json.loads((tmp_path / hf.ADAPTER_CONFIG_FILE).read_text())
    model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path).eval()
    tokens = _tokens(cfg, seed=3)
    got = forward(params, jnp.asarray(tokens), cfg, lora=lora)
    assert np.abs(got - forward(params, jnp.asarray(tokens), cfg)).max() > 1e-2
    np.testing.assert_allclose(got, U.hf_logits(model, tokens), atol=ATOL, rtol=0)
    if cfg.model_type == "phi3":  # PEFT's names; q/k/v's own A's written block-diagonally
        assert sorted(written["target_modules"]) == [
            "down_proj", "gate_up_proj", "o_proj", "qkv_proj"
        ]  # fmt: skip
        assert written["r"] == 6 and written["lora_alpha"] == 12
    else:
        assert written["r"] == 2 and written["lora_alpha"] == 4
    back = hf.load_peft(tmp_path, cfg)
    np.testing.assert_allclose(forward(params, jnp.asarray(tokens), cfg, lora=back), got, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_created_adapter_loads_with_same_logits(case, checkpoints, tmp_path):
    folder, _, cfg, params = checkpoints[case]
    pconf = peft.LoraConfig(r=3, lora_alpha=5, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(_hf_model(folder), pconf).eval()
    model.save_pretrained(tmp_path)
    lora = hf.load_peft(tmp_path, cfg)
    assert set(lora.a) == set(LoRAConfig().targets) and int(true_rank(lora)) == 3
    tokens = _tokens(cfg, seed=4)
    got = forward(params, jnp.asarray(tokens), cfg, lora=lora)
    assert np.abs(got - forward(params, jnp.asarray(tokens), cfg)).max() > 1e-2
    np.testing.assert_allclose(got, U.hf_logits(model, tokens), atol=ATOL, rtol=0)
    # and back out: a shared A on a fused module is written once, at the same rank
    hf.save_peft(lora, cfg, tmp_path / "again")
    again = json.loads((tmp_path / "again" / hf.ADAPTER_CONFIG_FILE).read_text())
    assert again["r"] == 3 and again["lora_alpha"] == 5


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "case, changes, field",
    [
        ("gemma3-interleaved", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("gemma3-interleaved", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("gemma3-interleaved", {"use_bidirectional_attention": True}, "use_bidirectional"),
        ("gemma3-interleaved", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ("gemma3-interleaved", {"model_type": "gemma3"}, "model_type='gemma3'"),
        (
            "phi3-fused-window6",
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            "rope_parameters.rope_type",
        ),
        (
            "phi3-fused-window6",
            {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.75}},
            "partial_rotary_factor",
        ),
        ("smollm3-nope-window4", {"head_dim": 16}, "head_dim=16"),
    ],
)
def test_unsupported_variants_are_refused_with_the_field_named(case, changes, field):
    d = {**U.hf_config(case).to_dict(), **changes}
    with pytest.raises(hf.CheckpointError, match=field.replace("(", r"\(")):
        hf.config_from_hf(d)


def test_config_to_hf_refuses_what_the_family_cannot_say():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2)
    with pytest.raises(hf.CheckpointError, match="qk_norm"):
        hf.config_to_hf(ModelConfig(**base, qk_norm=True))
    mixed = ModelConfig(
        **base,
        model_type="mistral",
        sliding_window=4,
        layer_types=("sliding_attention", "full_attention"),
    )
    with pytest.raises(hf.CheckpointError, match="layer_types"):
        hf.config_to_hf(mixed)
