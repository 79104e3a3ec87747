"""`python -m experiments bench decode`: greedy decoding, floe_jax against transformers.

The same FJ-REF checkpoint (Llama, vocab 2048, hidden 256, 4 layers, 8 heads, 4 KV heads,
intermediate 704, untied, float32) is built by transformers, saved as safetensors and loaded by
`floe_jax.load_hf`, so both sides decode identical weights. Prompt 32 tokens, 96 new tokens,
batch 1 and 8, KV cache on for both; tokens/s, the ratio, and the share of greedy tokens on which
the two agree (a check that the comparison is like for like).

Then one row per other family (batch 1), FJ-REF's sizes with that family's features: Qwen3
(qk-norm), Mistral and Phi-3 (a sliding window of 64 on every layer; Phi-3's checkpoint fuses
q/k/v and gate/up), Gemma 3 (three sliding layers of window 64 to one global, qk-norm, sandwich
norms, GeGLU, scaled and tied embeddings), SmolLM3 (no RoPE in the last layer) and Phi-4-mini's
RoPE (3/4 of each head rotated, longrope factors switching from short to long once the text
passes 40 tokens: both sides recompute their cache there). The windows are shorter than the 128
tokens decoded, so the ring-buffer caches wrap.

Then the real-scale rows (`_decode_scale`): Qwen2.5-0.5B shapes, batch 1 and 8, float32, bf16,
int8 and int4 weights beside transformers float32 and bfloat16 and the bandwidth bound.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import numpy as np

from experiments.benchmarks._decode_scale import run as real_scale
from experiments.benchmarks._util import (
    FJ_REF,
    fj_ref_torch,
    machine,
    matmul_gflops,
    print_table,
    timeit_alternating,
)
from floe_jax.config import RopeScaling


def _hf_model(path: str, family: str = "llama"):
    import torch
    import transformers

    from floe_jax.hf import config_to_hf

    if family == "llama":
        model = fj_ref_torch().eval()
    else:
        d = config_to_hf(FAMILIES[family])
        torch.manual_seed(0)
        hc = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        model = transformers.AutoModelForCausalLM.from_config(hc, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


_WINDOW = 64
_LONGROPE_SWITCH = 40  # shorter than the prompt + new tokens, quick or not
FAMILIES = {
    "qwen3": dataclasses.replace(FJ_REF, model_type="qwen3", qk_norm=True),
    "mistral": dataclasses.replace(FJ_REF, model_type="mistral", sliding_window=_WINDOW),
    "gemma3_text": dataclasses.replace(
        FJ_REF,
        model_type="gemma3_text",
        qk_norm=True,
        norm_unit_offset=True,
        sandwich_norms=True,
        scale_embeddings=True,
        query_pre_attn_scalar=32.0,
        hidden_act="gelu_pytorch_tanh",
        sliding_window=_WINDOW,
        rope_local_theta=1e4,
        layer_types=("sliding_attention",) * 3 + ("full_attention",),
        tie_word_embeddings=True,
    ),  # fmt: skip
    "phi3": dataclasses.replace(FJ_REF, model_type="phi3", sliding_window=_WINDOW),
    "phi3 (Phi-4-mini RoPE)": dataclasses.replace(
        FJ_REF,
        model_type="phi3",
        tie_word_embeddings=True,
        partial_rotary_factor=0.75,  # 24 of 32 dims rotated
        max_position_embeddings=4096,
        rope_scaling=RopeScaling(
            rope_type="longrope",
            factor=4096 / _LONGROPE_SWITCH,
            original_max_position_embeddings=_LONGROPE_SWITCH,
            short_factor=tuple(1.0 + 0.1 * i for i in range(12)),
            long_factor=tuple(1.0 + 2.0 * i for i in range(12)),
        ),
    ),
    "smollm3": dataclasses.replace(
        FJ_REF, model_type="smollm3", nope_layers=(3,), tie_word_embeddings=True
    ),
}


def run(
    quick: bool = False, attention_impl: str = "reference", cpu_kernel: bool = True
) -> list[dict]:
    import torch

    import floe_jax as fj
    from floe_jax.decode import generate

    torch.set_num_threads(os.cpu_count() or 1)
    prompt_len, new = (32, 16) if quick else (32, 96)
    repeats = 2 if quick else 9
    rows = []
    for family, batch in [("llama", 1), ("llama", 8), *((f, 1) for f in FAMILIES)]:
        with tempfile.TemporaryDirectory() as d:
            hf = _hf_model(d, family)
            cfg, params = fj.load_hf(d)
        cfg = dataclasses.replace(cfg, attention_impl=attention_impl)
        ids = np.random.RandomState(batch).randint(0, cfg.vocab_size, (batch, prompt_len))
        tokens, mask = ids.astype(np.int32), np.ones_like(ids, np.int32)

        def run_fj(tokens=tokens, mask=mask, params=params, cfg=cfg):
            return jax.block_until_ready(
                generate(params, tokens, mask, cfg, max_new_tokens=new, key=jax.random.key(0))
            )[0]

        ids_t = torch.from_numpy(ids)
        kw = dict(
            attention_mask=torch.ones_like(ids_t), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip

        def run_hf(ids_t=ids_t, kw=kw, hf=hf):
            with torch.no_grad():
                return hf.generate(ids_t, **kw)[:, prompt_len:]

        t_fj, t_hf = timeit_alternating(run_fj, run_hf, repeats=repeats)
        agree = float((np.asarray(run_fj()) == run_hf().numpy()).mean())
        fj_tps, hf_tps = batch * new / t_fj, batch * new / t_hf
        rows.append(
            {
                "family": family if family != "llama" else "llama (FJ-REF)",
                "batch": batch,
                "floe_jax tok/s": fj_tps,
                "transformers tok/s": hf_tps,
                "ratio": fj_tps / hf_tps,
                "floe_jax ms/token-step": 1e3 * t_fj / new,
                "transformers ms/token-step": 1e3 * t_hf / new,
                "greedy agreement": agree,
            }
        )
    print_table(
        rows,
        title=f"bench decode: prompt {prompt_len}, {new} new tokens, attention {attention_impl} — "
        f"{machine()}",
    )
    print(f"float32 matmul through XLA: {matmul_gflops():.1f} GFLOP/s")
    return rows + real_scale(quick=quick, cpu_kernel=cpu_kernel)
