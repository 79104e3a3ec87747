"""GGUF export (`floe_jax.hf.gguf`): a client's model over a quantized base, adapter merged,
written in q8_0 and q4_0 and read back with the `gguf` package: names, shapes, types, metadata
and dequantized values against floe_jax's merged float weights."""

import dataclasses

import jax
import numpy as np
import pytest

from floe_jax import quant
from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.hf.gguf import gguf_tensors, read_gguf, save_gguf
from floe_jax.lora import init_lora, merge_lora
from floe_jax.model import init_params

CFG = ModelConfig(
    model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
    num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
)  # fmt: skip
LLAMA = dataclasses.replace(CFG, model_type="llama", qkv_bias=False, tie_word_embeddings=False)


def _client(cfg):
    base = quant.quantize(
        init_params(cfg, key=jax.random.key(0)),
        cfg,
        quant.QuantConfig(format="int4", group_size=32),
    )
    lora = init_lora(cfg, LoRAConfig(rank=4, alpha=8), key=jax.random.key(1))
    b = {m: v + 0.02 * lora.mask[m][..., None] for m, v in lora.b.items()}
    return base, dataclasses.replace(lora, b=b)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["qwen2", "llama"])
def test_written_file_reads_back(tmp_path, cfg, qtype):
    base, lora = _client(cfg)
    path = save_gguf(base, cfg, tmp_path / "edge.gguf", lora=lora, qtype=qtype)
    meta, got = read_gguf(path)
    want = gguf_tensors(merge_lora(quant.dequantize_params(base), lora), cfg)
    arch = cfg.model_type
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == cfg.num_layers
    assert meta[f"{arch}.attention.head_count_kv"] == cfg.kv_heads
    assert meta[f"{arch}.embedding_length"] == cfg.hidden_size
    names = {"token_embd.weight", "output_norm.weight"} | (
        set() if cfg.tie_word_embeddings else {"output.weight"}
    )
    for i in range(cfg.num_layers):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k",
                  "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
        if cfg.qkv_bias:
            names |= {f"blk.{i}.attn_{p}.bias" for p in "qkv"}
    assert set(got) == set(want) == names
    # error bound over the block's absmax: q8_0 half a step (1/127) plus the float16 scale's
    # rounding; q4_0 (scale absmax / 8, codes clipped at 7) one step of 1/8, plus the same
    bound = {"q8_0": 0.6 / 127, "q4_0": 1.05 / 8}[qtype]
    for name, (kind, vals) in got.items():
        ref = want[name]
        assert vals.shape == ref.shape, name
        if ref.ndim == 1:
            assert kind == "F32", name
            np.testing.assert_array_equal(vals, ref, err_msg=name)
        else:
            assert kind == qtype.upper(), name
            amax = np.abs(ref.reshape(ref.shape[0], -1, 32)).max(-1, keepdims=True)
            err = np.abs(vals - ref).reshape(amax.shape[0], -1, 32)
            assert (err <= bound * amax + 1e-7).all(), name
    q = jax.device_get(merge_lora(quant.dequantize_params(base), lora)["layers"]["q_proj"]["w"])
    q0 = np.asarray(q[0], np.float32).T  # [out, in]
    if arch == "llama":  # rows regrouped to GGML's interleaved RoPE: undo it
        h, o, i = cfg.num_heads, *q0.shape
        unperm = want["blk.0.attn_q.weight"].reshape(h, o // h // 2, 2, i).swapaxes(1, 2)
        np.testing.assert_array_equal(unperm.reshape(o, i), q0)
    else:
        np.testing.assert_array_equal(want["blk.0.attn_q.weight"], q0)


def test_unsupported_family_and_type_errors(tmp_path):
    base, _ = _client(CFG)
    with pytest.raises(ValueError, match="qtype"):
        save_gguf(base, CFG, tmp_path / "x.gguf", qtype="q3_k")
    gemma = dataclasses.replace(CFG, model_type="gemma3_text")
    with pytest.raises(NotImplementedError, match="gemma3_text"):
        gguf_tensors(quant.dequantize_params(base), gemma)
