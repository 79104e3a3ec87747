"""`python -m experiments bench quant`: what weight-only quantization (`floe_jax.quant`) costs
in quality, and what it saves in a QLoRA client's memory.

Quality: a small Llama (hidden 256, 4 layers, vocab 768) pretrained here on the embedded
benchmark's public corpus, its last documents held out. For each format against the float32
model: the largest and mean absolute logit difference on held-out windows, greedy agreement over
64-token continuations of held-out prompts (the share of positions where both pick the same
token; one early flip counts against every later token), the share of held-out positions whose
argmax equals float32's given the same text (teacher-forced: no cascade), and held-out
perplexity. int8 is measured per output channel (the default) and in groups of 32 (llama.cpp
Q8_0's block) and 64 inputs; groups of 128 do not divide this model's FFN width (704). The
"int8 act" rows quantize the activations too (`QuantConfig.activations="int8"`), which only
the CPU kernel's path does (at most `qmatmul.KERNEL_ROWS` rows): so the teacher-forced logits and
perplexity of every row are computed one cached decode step at a time (16 windows per step), the
path decoding takes, and the continuations' steps run it too (their 128-row prefill does not).

Memory: one client's `local_update` (LoRA rank 8 on q/v, 2 steps of batch 1 x 128 tokens) at
Qwen2.5-0.5B's shapes, from XLA's compiled memory analysis (`client_memory_bytes`, nothing
allocated), for a float32 base and each quantized base (QLoRA), as a share of float32's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import machine, print_table

FORMATS = ("bf16", "int8", "int4", "nf4")
# The quality table's rows: (label, QuantConfig arguments).
QUALITY_ROWS = (
    ("bf16", {"format": "bf16"}),
    ("int8 (per channel)", {"format": "int8"}),
    ("int8 (groups of 32)", {"format": "int8", "group_size": 32}),
    ("int8 (groups of 64)", {"format": "int8", "group_size": 64}),
    ("int4 (groups of 64)", {"format": "int4"}),
    ("nf4 (groups of 64)", {"format": "nf4"}),
    ("int8 (per channel), int8 act", {"format": "int8", "activations": "int8"}),
    ("int8 (groups of 32), int8 act", {"format": "int8", "group_size": 32, "activations": "int8"}),
    ("int4 (groups of 64), int8 act", {"format": "int4", "activations": "int8"}),
)


def quality_rows(quick: bool = False, cpu_kernel: bool = True) -> list[dict]:
    from floe_jax import quant
    from floe_jax.config import ModelConfig
    from floe_jax.data.benchmark import make_benchmark
    from floe_jax.data.tokenizer import benchmark_tokenizers, encode_docs
    from floe_jax.decode import generate
    from floe_jax.pretrain import PretrainConfig, pretrain

    bench = make_benchmark()
    tok = benchmark_tokenizers(bench)[0]  # the edge tokenizer (768 tokens)
    docs = list(bench.public_docs)
    held = docs[-64:]
    cfg = ModelConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
        num_kv_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    stream = np.asarray(encode_docs(tok, docs[:-64]), np.int32)
    tcfg = PretrainConfig(steps=60 if quick else 300, batch_size=16, seq_len=128)
    params, _ = pretrain(cfg, stream, tcfg, progress=False)

    held_stream = np.asarray(encode_docs(tok, held), np.int32)
    T = 128
    n = min(16, len(held_stream) // (T + 1))
    win = held_stream[: n * T].reshape(n, T)
    logits = jax.jit(lambda p: jax.nn.log_softmax(_step_logits(p, win, cfg)))

    def ppl(lp):  # next-token perplexity of the windows from their step log-probs
        nll = -np.take_along_axis(lp[:, :-1], win[:, 1:, None], axis=-1)
        return float(np.exp(nll.mean()))

    prompts = held_stream[: 8 * 64].reshape(8, 64)[:, :16]  # 16-token prompts of held-out text
    gen = jax.jit(generate, static_argnames=("cfg", "max_new_tokens"))

    def cont(p):
        out = gen(p, prompts, np.ones_like(prompts), cfg, max_new_tokens=64, key=jax.random.key(0))
        return np.asarray(out[0])

    ref_logits, ref_cont = np.asarray(logits(params)), cont(params)
    rows = [{"format": "float32", "held-out ppl": ppl(ref_logits), "greedy agreement": 1.0,
             "argmax = f32 (teacher-forced)": 1.0}]  # fmt: skip
    from kernels import cpu_qmatvec

    # int8 activations exist only in the CPU kernel's int8 path (VNNI or AVX2); elsewhere such a
    # row would measure float32 activations under another name, so it is left out.
    int8_path = (cpu_kernel and jax.default_backend() == "cpu" and cpu_qmatvec.int8_activations()
            and cpu_qmatvec.available())  # fmt: skip
    for label, kw in QUALITY_ROWS:
        if kw.get("activations") == "int8" and not int8_path:
            continue
        qp = quant.quantize(params, cfg, quant.QuantConfig(**kw, cpu_kernel=cpu_kernel))
        q_logits = np.asarray(logits(qp))
        d = np.abs(q_logits - ref_logits)
        rows.append(
            {
                "format": label,
                "held-out ppl": ppl(q_logits),
                "greedy agreement": float((cont(qp) == ref_cont).mean()),
                "argmax = f32 (teacher-forced)": float(
                    (q_logits.argmax(-1) == ref_logits.argmax(-1)).mean()
                ),
                "max |Δ log p|": float(d.max()),
                "mean |Δ log p|": float(d.mean()),
                "weights MB": quant.param_bytes(qp) / 1e6,
            }
        )
    rows[0]["weights MB"] = quant.param_bytes(params) / 1e6
    ppl0 = rows[0]["held-out ppl"]
    for r in rows:
        r["Δ ppl %"] = 100 * (r["held-out ppl"] / ppl0 - 1)
    return rows


def _step_logits(p, tokens_BT, cfg):
    """Logits [B, T, V] of `tokens` fed one cached decode step at a time (B rows per matmul)."""
    from floe_jax.kv_cache import init_cache
    from floe_jax.model import forward

    b, t = tokens_BT.shape

    def step(cache, tok_B):
        logits, cache = forward(p, tok_B[:, None], cfg, cache=cache)
        return cache, logits[:, 0]

    _, logits_TBV = jax.lax.scan(step, init_cache(cfg, b, t), tokens_BT.T)
    return jnp.swapaxes(logits_TBV, 0, 1)


def memory_rows(num_layers: int | None = None, cpu_kernel: bool = True) -> list[dict]:
    from experiments.benchmarks._decode_scale import QWEN25_05B
    from floe_jax import quant
    from floe_jax.config import LoRAConfig
    from floe_jax.federated.client import client_memory_bytes, make_optimizer
    from floe_jax.lora import init_lora
    from floe_jax.model import init_params

    cfg = QWEN25_05B
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    base = jax.eval_shape(lambda: init_params(cfg, key=jax.random.key(0)))
    lcfg = LoRAConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    lora = jax.eval_shape(lambda: init_lora(cfg, lcfg, key=jax.random.key(0)))
    spec = lambda dt: jax.ShapeDtypeStruct((2, 1, 128), dt)  # noqa: E731
    batches = {"tokens": spec(jnp.int32), "mask": spec(jnp.float32), "loss_mask": spec(jnp.float32)}
    opt = make_optimizer("adamw", lr=1e-4)
    rows = []
    for fmt in ("float32", *FORMATS):
        p = base
        if fmt != "float32":
            qcfg = quant.QuantConfig(format=fmt, cpu_kernel=cpu_kernel)
            p = jax.eval_shape(lambda b, q=qcfg: quant.quantize(b, cfg, q), base)
        m = client_memory_bytes(p, lora, batches, cfg=cfg, opt=opt)
        rows.append({"base": fmt, **{k: v / 2**20 for k, v in m.items()}})
    for r in rows:
        r["share of float32 %"] = 100 * r["total"] / rows[0]["total"]
    return rows


def run(quick: bool = False, cpu_kernel: bool = True) -> list[dict]:
    """`cpu_kernel`: `QuantConfig.cpu_kernel` of every quantized base (the command line's
    `FLOE_JAX_CPU_KERNELS`)."""
    q = quality_rows(quick, cpu_kernel)
    print_table(q, title=f"bench quant: quality against float32 (pretrained Llama 256x4) — "
                f"{machine()}")  # fmt: skip
    m = memory_rows(num_layers=2 if quick else None, cpu_kernel=cpu_kernel)
    print_table(m, title="bench quant: one QLoRA client's compiled memory (MiB), Qwen2.5-0.5B "
                "shapes" + (" (2 layers)" if quick else ""))  # fmt: skip
    return q + m
