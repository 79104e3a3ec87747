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
import torch
import transformers

import floe_jax.hf as hf
from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.decode import generate, pad_prompts
from floe_jax.lora import init_lora, true_rank
from floe_jax.model import init_cache, unstack_layers
from tests import _hf_utils as U

ATOL, forward, _hf_model = U.ATOL, U.forward, U.load_hf_model
CASES = sorted(U.FAMILY_CASES)
LONGROPE = U.FAMILY_CASES["phi4mini-partial-longrope"][1]["rope_parameters"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (folder, torch model, cfg, params)}, one saved random checkpoint per family."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, case in enumerate(CASES):
        model = U.save_hf_model(case, root / case, seed=20 + i)
        out[case] = (root / case, model, *hf.load_hf(root / case))
    return out


def _tokens(cfg, b=2, t=13, seed=0):  # longer than every window
    return U.random_tokens(cfg, b, t, seed)


def test_every_case_slides_and_its_family_loads(checkpoints):
    got = {checkpoints[c][2].model_type for c in CASES}
    assert checkpoints["phi4mini-partial-longrope"][2].partial_rotary_factor == 0.75
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
    U.assert_logits_match_hf(params, cfg, model, tokens)
    # a left-padded batch: HF's attention mask and position ids against floe's token mask
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    U.assert_logits_match_hf(params, cfg, model, tokens, mask)


@pytest.mark.parametrize("case", CASES)
def test_save_hf_loads_in_transformers(case, tmp_path):
    U.assert_save_hf_loads_in_transformers(case, tmp_path)


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
    of the full forward (with longrope, whose factors follow the length: of each prefix)."""
    _, model, cfg, params = checkpoints[case]
    tokens = jnp.asarray(_tokens(cfg, t=16, seed=1))
    mask = jnp.ones_like(tokens).at[1, :2].set(0)
    full = np.asarray(forward(params, tokens, cfg, mask=mask))
    cache = init_cache(cfg, batch=2, max_len=20)
    slots = [k.shape[1] for k in cache.k]
    assert slots == [20 if w is None else w for w in cfg.layer_windows]  # rings for windows
    dec = unstack_layers(params)
    outs, want = [], []
    for lo, hi in [(0, 5), (5, 11), *[(t, t + 1) for t in range(11, 16)]]:
        logits, cache = forward(dec, tokens[:, lo:hi], cfg, cache=cache, mask=mask[:, lo:hi])
        outs.append(np.asarray(logits))
        # longrope's factors follow the forward's length: transformers on this prefix
        ref = U.hf_logits(model, tokens[:, :hi], mask[:, :hi]) if cfg.rope_switches else full
        want.append(np.asarray(ref)[:, lo:hi])
    got, want = np.concatenate(outs, axis=1), np.concatenate(want, axis=1)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)  # logits up to ~50


def test_longrope_switches_to_long_factors_past_the_original_length_as_transformers(checkpoints):
    """Phi-4-mini's RoPE: a forward of at most original_max_position_embeddings=8 tokens uses
    the short factors, a longer one the long factors at every position (transformers'
    `dynamic_rope_update`); cached decode across the switch recomputes the cache, as
    transformers' Phi-3 does, so each step's logits are transformers' on that prefix."""
    _, model, cfg, params = checkpoints["phi4mini-partial-longrope"]
    sc = cfg.rope_scaling
    assert (cfg.rotary_dim, cfg.dim_head, sc.original_max_position_embeddings) == (12, 16, 8)
    assert sc.attention_scaling == pytest.approx(model.model.rotary_emb.attention_scaling)
    assert sc.attention_scaling == pytest.approx(2**0.5)  # sqrt(1 + ln 8 / ln 8)
    tokens = _tokens(cfg, t=12, seed=7)
    for t in (8, 9):  # the last short length and the first long one
        want = U.hf_logits(model, tokens[:, :t])
        np.testing.assert_allclose(
            forward(params, jnp.asarray(tokens[:, :t]), cfg), want, atol=ATOL
        )
    # the switch is real: the first 8 positions' logits change when a 9th token comes
    short, long = U.hf_logits(model, tokens[:, :8]), U.hf_logits(model, tokens[:, :9])[:, :8]
    assert np.abs(short - long).max() > 0.1
    cache = init_cache(cfg, batch=2, max_len=16)
    dec = unstack_layers(params)
    _, cache = forward(dec, jnp.asarray(tokens[:, :6]), cfg, cache=cache)
    for t in range(6, 12):  # steps at positions 6..11: the forward reaches 9 tokens at t = 8
        logits, cache = forward(dec, jnp.asarray(tokens[:, t : t + 1]), cfg, cache=cache)
        assert bool(cache.rope_long) == (t + 1 > 8)
        want = U.hf_logits(model, tokens[:, : t + 1])[:, -1]
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want, atol=ATOL, rtol=0)


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


@pytest.mark.parametrize("targets", [("qkv_proj", "down_proj"), ("gate_up_proj", "o_proj")])
def test_phi3_lora_targets_by_peft_names_round_trip_both_ways(targets, checkpoints, tmp_path):
    """LoRAConfig takes PEFT's Phi-3 module names: `qkv_proj` adapts q/k/v, `gate_up_proj`
    gate/up. floe -> PEFT writes those names; PEFT -> floe with them gives the same targets;
    the logits agree with PEFT's both ways."""
    folder, _, cfg, params = checkpoints["phi3-fused-window6"]
    lcfg = LoRAConfig(rank=2, alpha=4, targets=targets)
    want_targets = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }
    expanded = {p for t in targets for p in want_targets.get(t, (t,))}
    assert set(lcfg.targets) == expanded
    lora = init_lora(cfg, lcfg, key=jax.random.key(3))
    b = {m: 0.3 * jax.random.normal(jax.random.key(4), v.shape) for m, v in lora.b.items()}
    lora = type(lora)(a=lora.a, b=b, mask=lora.mask, scale=lora.scale)
    hf.save_peft(lora, cfg, tmp_path / "out", alpha=4)
    written = json.loads((tmp_path / "out" / hf.ADAPTER_CONFIG_FILE).read_text())
    assert sorted(written["target_modules"]) == sorted(targets)
    model = peft.PeftModel.from_pretrained(_hf_model(folder), tmp_path / "out").eval()
    tokens = _tokens(cfg, seed=8)
    got = forward(params, jnp.asarray(tokens), cfg, lora=lora)
    np.testing.assert_allclose(got, U.hf_logits(model, tokens), atol=ATOL, rtol=0)

    pconf = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=list(targets), init_lora_weights=False
    )
    pmodel = peft.get_peft_model(_hf_model(folder), pconf).eval()
    pmodel.save_pretrained(tmp_path / "in")
    back = hf.load_peft(tmp_path / "in", cfg, targets=lcfg.targets)
    assert set(back.targets) == expanded and int(true_rank(back)) == 3
    got = forward(params, jnp.asarray(tokens), cfg, lora=back)
    assert np.abs(got - forward(params, jnp.asarray(tokens), cfg)).max() > 1e-2
    np.testing.assert_allclose(got, U.hf_logits(pmodel, tokens), atol=ATOL, rtol=0)


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
            "qwen3-window-headdim16",
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            "rope_parameters.rope_type='longrope' is not supported for qwen3",
        ),
        (
            "mistral-window5-headdim16",
            {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor=0.5 is not supported for mistral",
        ),
        (
            "phi4mini-partial-longrope",
            {"rope_parameters": {**LONGROPE, "short_factor": [1.0, 2.0], "long_factor": [1, 2]}},
            "short_factor has 2 entries; rotary_dim=12 needs 6",
        ),
        (
            "phi4mini-partial-longrope",
            {"rope_parameters": {**LONGROPE, "long_factor": "x"}},
            "rope_parameters.long_factor='x' must be a list of numbers",
        ),
        (
            "phi4mini-partial-longrope",
            {"rope_parameters": {**LONGROPE, "original_max_position_embeddings": 16}},
            "original_max_position_embeddings=16 disagrees",
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


# ----------------------------------------------------------------------------- Gemma 3 multimodal


def _gemma3_multimodal(seed: int):
    """A tiny random `Gemma3ForConditionalGeneration`: the gemma3-interleaved text model with a
    one-layer SigLIP vision tower."""
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    config = transformers.Gemma3Config(
        text_config=U.hf_config("gemma3-interleaved").to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    return U.randomize_(model, seed).eval()


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """The published checkpoints' layout (`language_model.model.*`, `vision_tower.*`, which
    transformers 5 still writes) and transformers' module names (`model.language_model.*`,
    `model.vision_tower.*`, `lm_head`) load the same text model, whose logits are the
    multimodal model's on text; `save_hf` writes it as a text-only `Gemma3ForCausalLM`."""
    model = _gemma3_multimodal(seed=9)
    model.save_pretrained(tmp_path / "published")
    saved = safetensors.numpy.load_file(tmp_path / "published" / hf.WEIGHTS_FILE)
    assert any(n.startswith("language_model.model.layers.") for n in saved)
    assert any(n.startswith("vision_tower.") for n in saved)
    cfg, params = hf.load_hf(tmp_path / "published")
    assert cfg == hf.config_from_hf(U.hf_config("gemma3-interleaved").to_dict())
    tokens = _tokens(cfg, seed=10)
    want = U.assert_logits_match_hf(params, cfg, model, tokens)

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / hf.CONFIG_FILE).write_text((tmp_path / "published" / hf.CONFIG_FILE).read_text())
    tensors = {
        (n if n.startswith("language_model.") else "model." + n).replace(
            "language_model.model.", "model.language_model."
        ): v
        for n, v in saved.items()
    }
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"]
    safetensors.numpy.save_file(tensors, renamed / hf.WEIGHTS_FILE, metadata={"format": "pt"})
    cfg2, params2 = hf.load_hf(renamed)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)

    hf.save_hf(cfg, params, tmp_path / "text")
    text = _hf_model(tmp_path / "text")
    assert type(text).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_allclose(U.hf_logits(text, tokens), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"text_config": None}, "text_config=None"),
        ({"text_config": {"model_type": "llama"}}, "text_config.model_type='llama'"),
        (
            {"text_config": {"final_logit_softcapping": 30.0}},
            "text_config: final_logit_softcapping",
        ),
    ],
)
def test_gemma3_multimodal_refusals_name_the_field(changes, field):
    d = _gemma3_multimodal(seed=0).config.to_dict()
    if isinstance(changes["text_config"], dict):
        changes = {"text_config": {**d["text_config"], **changes["text_config"]}}
    with pytest.raises(hf.CheckpointError, match=field.replace("(", r"\(")):
        hf.config_from_hf({**d, **changes})
