"""floe_jax.hf.checkpoint and floe_jax.model against Hugging Face transformers (PyTorch) on tiny
random local checkpoints."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers.models.llama import modeling_llama

import floe_jax.hf as hf
from floe_jax.model import attention, block, rms_norm
from floe_jax.rope import apply_rope, rope_inv_freq
from tests import _hf_utils as U

ATOL, forward, _tokens = U.ATOL, U.forward, U.random_tokens
CASES = sorted(U.CASES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved checkpoint per parity case: {case: (folder, torch model)}."""
    root = tmp_path_factory.mktemp("ckpt")
    return {c: (root / c, U.save_hf_model(c, root / c, seed=i)) for i, c in enumerate(CASES)}


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("case", CASES)
def test_config_matches_hf(case, checkpoints):
    folder, model = checkpoints[case]
    cfg, params = hf.load_hf(folder)
    hc = model.config
    assert cfg.model_type == hc.model_type
    assert (cfg.num_heads, cfg.kv_heads) == (hc.num_attention_heads, hc.num_key_value_heads)
    assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
    assert cfg.tie_word_embeddings == ("lm_head" not in params) == hc.tie_word_embeddings
    np.testing.assert_allclose(
        rope_inv_freq(cfg), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6
    )


@pytest.mark.parametrize("case", CASES)
def test_config_round_trip(case, checkpoints):
    cfg, _ = hf.load_hf(checkpoints[case][0])
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


# ----------------------------------------------------------------------------- components


def test_rms_norm_matches_llama_rms_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32) * 3
    w = (1 + 0.1 * rng.standard_normal(32)).astype(np.float32)
    ref = modeling_llama.LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5), want, atol=1e-6)


@pytest.mark.parametrize(
    "case", ["llama-gqa", "llama-headdim16", "llama-rope-linear", "llama-rope-llama3"]
)
def test_rope_matches_hf_rotary_embedding(case):
    hc = U.hf_config(case)
    cfg = hf.config_from_hf(hc.to_dict())
    rng = np.random.default_rng(1)
    B, T, H, K = 2, 7, hc.num_attention_heads, cfg.dim_head
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    pos = np.stack([np.arange(T), np.arange(T) * 37 + 5]).astype(np.int32)  # large angles too
    rotary = modeling_llama.LlamaRotaryEmbedding(hc)
    q_t = torch.from_numpy(q).transpose(1, 2)  # HF layout [B, H, T, K]
    cos, sin = rotary(q_t, torch.from_numpy(pos).long())
    want, _ = modeling_llama.apply_rotary_pos_emb(q_t, q_t, cos, sin)
    got = apply_rope(jnp.asarray(q), jnp.asarray(pos), rope_inv_freq(cfg))
    np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), atol=2e-5)


@pytest.mark.parametrize("case", ["llama-gqa", "llama-mqa-tied", "llama-mha-bias-theta"])
def test_attention_matches_hf_eager_attention(case, checkpoints):
    """floe `attention` (GQA by reshaping) vs HF's eager attention (GQA by `repeat_kv`)."""
    module = checkpoints[case][1].model.layers[0].self_attn
    cfg = hf.config_from_hf(U.hf_config(case).to_dict())
    rng = np.random.default_rng(2)
    B, T, H, N, K = 2, 6, cfg.num_heads, cfg.kv_heads, cfg.dim_head
    q, k, v = (rng.standard_normal((B, T, n, K)).astype(np.float32) for n in (H, N, N))
    causal = np.tril(np.ones((T, T), bool))
    additive = torch.from_numpy(np.where(causal, 0.0, -np.inf).astype(np.float32))[None, None]
    t = lambda x: torch.from_numpy(x).transpose(1, 2)
    want, _ = modeling_llama.eager_attention_forward(
        module, t(q), t(k), t(v), additive, scaling=K**-0.5
    )
    mask = jnp.broadcast_to(jnp.asarray(causal), (B, T, T))
    merged = lambda x: jnp.asarray(x).transpose(0, 2, 1, 3).reshape(B * N, T, K)  # [B·N, S, K]
    got = attention(jnp.asarray(q), merged(k), merged(v), mask)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    # One query step against every key (a decode step takes its own matrix-vector path).
    last = attention(jnp.asarray(q[:, -1:]), merged(k), merged(v), mask[:, -1:])
    np.testing.assert_allclose(last, want.numpy()[:, -1:], atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_decoder_layer_matches_hf(case, checkpoints):
    """floe's transformer block vs `LlamaDecoderLayer` / `Qwen2DecoderLayer` (layer 1)."""
    folder, model = checkpoints[case]
    cfg, params = hf.load_hf(folder)
    rng = np.random.default_rng(3)
    B, T = 2, 9
    x = rng.standard_normal((B, T, cfg.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    x_t = torch.from_numpy(x)
    cos_sin = model.model.rotary_emb(x_t, torch.from_numpy(pos).long())
    causal = np.tril(np.ones((T, T), bool))
    additive = torch.from_numpy(np.where(causal, 0.0, -np.inf).astype(np.float32))[None, None]
    with torch.no_grad():
        want = model.model.layers[1](x_t, attention_mask=additive, position_embeddings=cos_sin)
    lp = jax.tree.map(lambda a: a[1], params["layers"])
    mask = jnp.broadcast_to(jnp.asarray(causal), (B, T, T))
    got, _, _ = block(
        cfg, rope_inv_freq(cfg), jnp.asarray(x), lp, None, jnp.asarray(pos), mask, None
    )
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL)


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case, checkpoints):
    folder, model = checkpoints[case]
    cfg, params = hf.load_hf(folder)
    U.assert_logits_match_hf(params, cfg, model, _tokens(cfg))


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2-mqa-tied-theta", "llama-rope-llama3"])
def test_left_padded_batch_matches_hf_attention_mask(case, checkpoints):
    folder, model = checkpoints[case]
    cfg, params = hf.load_hf(folder)
    tokens = _tokens(cfg, b=3, t=10, seed=4)
    mask = np.ones_like(tokens)
    mask[0, :4] = 0
    mask[2, :7] = 0
    U.assert_logits_match_hf(params, cfg, model, tokens, mask)


@pytest.mark.parametrize("case", CASES)
def test_save_hf_loads_in_transformers(case, tmp_path):
    U.assert_save_hf_loads_in_transformers(case, tmp_path)


def test_save_hf_sharded_loads_in_transformers_and_back(checkpoints, tmp_path):
    cfg, params = hf.load_hf(checkpoints["qwen2-gqa"][0])
    hf.save_hf(cfg, params, tmp_path)  # an earlier unsharded save must not shadow the shards
    hf.save_hf(cfg, params, tmp_path, max_shard_bytes=16_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / hf.WEIGHTS_FILE).exists()
    U.assert_logits_match_hf(params, cfg, U.load_hf_model(tmp_path), _tokens(cfg, seed=7))
    cfg2, params2 = hf.load_hf(tmp_path)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)


def test_load_sharded_checkpoint_written_by_transformers(checkpoints, tmp_path):
    folder, model = checkpoints["llama-mha-bias-theta"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / hf.INDEX_FILE).is_file() and not (tmp_path / hf.WEIGHTS_FILE).exists()
    cfg_s, params_s = hf.load_hf(tmp_path)
    cfg, params = hf.load_hf(folder)
    assert cfg_s == cfg
    chex.assert_trees_all_equal(params_s, params)


def test_bf16_checkpoint(checkpoints, tmp_path):
    _, model = checkpoints["llama-gqa"]
    model_bf16 = U.make_hf_model("llama-gqa", seed=CASES.index("llama-gqa")).to(torch.bfloat16)
    model_bf16.save_pretrained(tmp_path)
    cfg, params = hf.load_hf(tmp_path)
    assert cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    want_q = model_bf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["q_proj"]["w"][1], np.float32), want_q
    )
    np.testing.assert_array_equal(
        np.asarray(params["embed"], np.float32),
        model_bf16.model.embed_tokens.weight.detach().float().numpy(),
    )
    # dtype override: exact upcast of the bf16 values
    cfg32, params32 = hf.load_hf(tmp_path, dtype="float32")
    assert cfg32.dtype == "float32" and params32["embed"].dtype == jnp.float32
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x.astype(jnp.float32), params), params32)
    # the bf16 model computes close to the f32 one
    tokens = _tokens(cfg, seed=8)
    got = forward(params, jnp.asarray(tokens), cfg)
    want = U.hf_logits(model, tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.25, rtol=0)


# ----------------------------------------------------------------------------- errors


def _copy_ckpt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **changes):
    path = folder / hf.CONFIG_FILE
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_error_missing_folder(tmp_path):
    with pytest.raises(hf.CheckpointError, match="does not exist"):
        hf.load_hf(tmp_path / "nope")


def test_error_missing_config(checkpoints, tmp_path):
    folder = _copy_ckpt(checkpoints["llama-gqa"][0], tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(hf.CheckpointError, match=r"config\.json is missing"):
        hf.load_hf(folder)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters.rope_type"),
        (
            {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope_scaling",
        ),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_error_unsupported_config(checkpoints, tmp_path, changes, field):
    folder = _copy_ckpt(checkpoints["llama-gqa"][0], tmp_path / "c")
    _edit_config(folder, **changes)
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_hf(folder)
    assert field in str(e.value) and "config.json" in str(e.value)


def _rewrite_weights(folder, fn, file=hf.WEIGHTS_FILE):
    tensors = safetensors.numpy.load_file(folder / file)
    safetensors.numpy.save_file(fn(tensors), folder / file, metadata={"format": "pt"})


def test_error_missing_tensor(checkpoints, tmp_path):
    folder = _copy_ckpt(checkpoints["llama-gqa"][0], tmp_path / "c")
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_hf(folder)
    assert name in str(e.value) and "model.safetensors" in str(e.value)


def test_error_missing_lm_head_when_untied(checkpoints, tmp_path):
    folder = _copy_ckpt(checkpoints["qwen2-gqa"][0], tmp_path / "c")
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(hf.CheckpointError, match="'lm_head.weight' is missing"):
        hf.load_hf(folder)


def test_error_wrong_shape(checkpoints, tmp_path):
    folder = _copy_ckpt(checkpoints["llama-gqa"][0], tmp_path / "c")
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_weights(folder, lambda t: {**t, name: t[name][:8]})
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_hf(folder)
    msg = str(e.value)
    assert name in msg and "model.safetensors" in msg and "(8, 32)" in msg and "(16, 32)" in msg


def test_error_index_names_missing_shard(checkpoints, tmp_path):
    checkpoints["llama-gqa"][1].save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / shard).unlink()
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_hf(tmp_path)
    assert shard in str(e.value) and hf.INDEX_FILE in str(e.value)


def test_error_no_safetensors(checkpoints, tmp_path):
    folder = _copy_ckpt(checkpoints["llama-gqa"][0], tmp_path / "c")
    (folder / hf.WEIGHTS_FILE).rename(folder / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        hf.load_hf(folder)


def test_error_index_names_tensor_missing_from_its_shard(checkpoints, tmp_path):
    checkpoints["llama-gqa"][1].save_pretrained(tmp_path, max_shard_size="20KB")
    path = tmp_path / hf.INDEX_FILE
    index = json.loads(path.read_text())
    name = "model.norm.weight"
    index["weight_map"][name] = next(
        f for k, f in index["weight_map"].items() if k != name and f != index["weight_map"][name]
    )
    path.write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_hf(tmp_path)
    assert name in str(e.value) and index["weight_map"][name] in str(e.value)
