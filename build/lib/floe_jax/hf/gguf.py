"""A client's edge model, adapter merged, written as GGUF for on-device runtimes (llama.cpp and
the runtimes that read its format), through the `gguf` package of the llama.cpp project.

Tensor names, metadata keys and layouts are those of llama.cpp's `convert_hf_to_gguf.py` for the
families written here: `llama` (Llama and Mistral, whose q/k rows are permuted to GGML's
interleaved RoPE as the converter does), `qwen2` and `qwen3` (rotate-half RoPE, rows as they
are; Qwen3's q/k norms as `attn_q_norm`/`attn_k_norm`). Weights are written in `q8_0`, `q4_0`
(blocks of 32 along the input axis, one float16 scale each), `f16` or `f32`; norms and biases in
float32, as llama.cpp's quantizer leaves them. A quantized floe_jax base is dequantized and the
adapter merged in float32 before the GGUF types are formed: GGUF's block formats are not
floe_jax's, so the file is requantized from the merged float weights.

The file carries no tokenizer unless `tokens` are given (`tokenizer.ggml.model` is then
`"gpt2"`, a byte-level BPE vocabulary; without them `"none"`); add the client's tokenizer with
llama.cpp's tools to run text through it.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import numpy as np

from floe_jax.config import ModelConfig
from floe_jax.lora import LoRA, merge_lora
from floe_jax.quant import dequantize_params

QTYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "f16": gguf.GGMLQuantizationType.F16,
    "f32": gguf.GGMLQuantizationType.F32,
}
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PROJ = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}  # fmt: skip
_NORMS = {"input_norm": "attn_norm", "post_norm": "ffn_norm", "q_norm": "attn_q_norm",
          "k_norm": "attn_k_norm"}  # fmt: skip


def _permute_rope(w_OI: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q/k regrouped from rotate-half to GGML's interleaved RoPE (`LlamaModel.permute`
    in llama.cpp's converter)."""
    o, i = w_OI.shape
    return w_OI.reshape(heads, 2, o // heads // 2, i).swapaxes(1, 2).reshape(o, i)


def gguf_tensors(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 array in GGUF's (PyTorch) [out, in] layout} of float params in
    floe_jax's canonical layout."""
    arch = ARCHES.get(cfg.model_type)
    if arch is None:
        raise NotImplementedError(
            f"GGUF export of model_type={cfg.model_type!r} is not written; it supports "
            f"{sorted(ARCHES)}"
        )
    f32 = lambda x: np.asarray(jax.device_get(x), np.float32)
    out = {"token_embd.weight": f32(params["embed"]), "output_norm.weight": f32(params["norm"])}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = f32(params["lm_head"]).T
    layers = params["layers"]
    for i in range(cfg.num_layers):
        for m, g in _PROJ.items():
            w = f32(layers[m]["w"][i]).T
            if arch == "llama" and m in ("q_proj", "k_proj"):
                w = _permute_rope(w, cfg.num_heads if m == "q_proj" else cfg.kv_heads)
            out[f"blk.{i}.{g}.weight"] = w
            if "b" in layers[m]:
                b = f32(layers[m]["b"][i])
                if arch == "llama" and m in ("q_proj", "k_proj"):
                    heads = cfg.num_heads if m == "q_proj" else cfg.kv_heads
                    b = _permute_rope(b[:, None], heads)[:, 0]
                out[f"blk.{i}.{g}.bias"] = b
        for n, g in _NORMS.items():
            if n in layers:
                out[f"blk.{i}.{g}.weight"] = f32(layers[n][i])
    return out


def save_gguf(
    params: dict,
    cfg: ModelConfig,
    path: str | Path,
    *,
    lora: LoRA | None = None,
    qtype: str = "q8_0",
    name: str = "floe_jax edge model",
    tokens: list[str] | None = None,
) -> Path:
    """Writes `params` (float or quantized, canonical layout) with `lora` merged as GGUF.

    Args:
      params: the base; a quantized one (`floe_jax.quant`) is dequantized first.
      cfg: its config (static).
      path: the .gguf file to write.
      lora: one client's adapter, merged into the weights (`merge_lora`), or None.
      qtype: the weights' GGUF type, one of `QTYPES`. Matrices whose input width is not a
        multiple of the block (32) are written float16.
      name: `general.name`.
      tokens: the vocabulary's token strings (V of them), or None.

    Returns:
      the path written.
    """
    if qtype not in QTYPES:
        raise ValueError(f"qtype={qtype!r} is not one of {sorted(QTYPES)}")
    if tokens is not None and len(tokens) != cfg.vocab_size:
        raise ValueError(f"tokens has {len(tokens)} entries, the model's vocab_size is "
                         f"{cfg.vocab_size}")  # fmt: skip
    params = dequantize_params(params)
    if lora is not None:
        params = merge_lora(params, lora)
    tensors = gguf_tensors(params, cfg)
    arch = ARCHES[cfg.model_type]
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.dim_head)
    w.add_value_length(cfg.dim_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type({"q8_0": 7, "q4_0": 2, "f16": 1, "f32": 0}[qtype])  # LLAMA_FTYPE_MOSTLY_*
    if tokens is None:
        w.add_tokenizer_model("none")
    else:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
    block = gguf.GGML_QUANT_SIZES[QTYPES[qtype]][0]
    for tname, x in tensors.items():
        if x.ndim == 1:
            w.add_tensor(tname, x)
        elif qtype == "f32":
            w.add_tensor(tname, x)
        elif qtype == "f16" or x.shape[-1] % block:
            w.add_tensor(tname, x.astype(np.float16))
        else:
            t = QTYPES[qtype]
            w.add_tensor(tname, gguf.quants.quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_gguf(path: str | Path) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """(metadata {key: value} for scalar and string fields, {tensor name: (GGUF type name, float32
    values [out, in] dequantized)}) of a GGUF file."""
    r = gguf.GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or len(f.types) != 1:
            continue
        meta[k] = f.contents()
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne[0] (the inner axis) first
        vals = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        tensors[t.name] = (t.tensor_type.name, vals)
    return meta, tensors
