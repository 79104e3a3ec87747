"""Real-scale rows of `bench decode`: a Qwen2.5-0.5B-shaped checkpoint (the public config's
shapes, random weights, built locally by transformers and loaded by `floe_jax.load_hf`), greedy
decoding at batch 1 and 8 with float32, bfloat16, int8 and int4 weights (`floe_jax.quant`),
beside transformers' `generate` in float32 and bfloat16 and beside the bandwidth bound.

The bound of a format is the bytes one decode step reads (every weight once: codes and scales;
the tied embedding is the head) over the read bandwidth, measured in the same run as the rate of
float32 matrix-vector products over 512 MB of MLP-shaped matrices (`_bandwidth_probe`).
"ms/token-step" is a whole call (the prompt's prefill included) over the N new tokens, on every
side; each side also generates 1 token in the same loop ("prefill ms"; its cache has P + 1 slots
instead of P + N, a small difference in the prefill's attention), and "step ms" is the N - 1
steps after it, which the bound is compared with again ("step % of bound").
Every side (and the bandwidth probe) runs in one alternating loop, so all see the same machine;
figures are medians. On an accelerator transformers runs on the same device where torch has
CUDA (TF32 matmuls allowed, as JAX's default precision takes them), the probe reads 4 GiB, and
the quantized sides run XLA's multiply-reduce (the decode-step path there), and on a GPU the
"(pallas)" sides the Pallas kernel (`kernels.gpu_qmatvec`, `gpu_kernel=True`). On a CPU the
quantized sides run the fused matvec kernel (`kernels.cpu_qmatvec`) unless `cpu_kernel` is
False (`QuantConfig.cpu_kernel`; the command line's FLOE_JAX_CPU_KERNELS=0); the "(XLA m-r)"
sides run XLA's multiply-reduce in the same loop (their weights carry `cpu_kernel=False`), the
"(int8 act)" sides the kernel with int8 activations (`QuantConfig.activations="int8"`, where the
kernel has an int8 path: AVX-512 VNNI, or AVX2), and a `matvec` column says which path each side
ran.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import machine, print_table, timeit_alternating
from experiments.profile import MODEL_PRESETS
from floe_jax.config import ModelConfig
from kernels import cpu_qmatvec

# Qwen/Qwen2.5-0.5B's config.json shapes (`experiments.profile.MODEL_PRESETS`), in float32: the
# reference format, cast to each of `FORMATS` by the benchmark.
QWEN25_05B = dataclasses.replace(MODEL_PRESETS["qwen2.5-0.5b"], dtype="float32")
FORMATS = ("float32", "bf16", "int8", "int4")


def _bandwidth_probe(nbytes: int | None = None, k: int = 896, n: int = 4864):
    """(a blocking call, bytes it reads): float32 matrix-vector products through XLA over
    separate [k, n] matrices (a 0.5B model's MLP shape) totalling `nbytes` (512 MiB on a CPU, 4
    GiB on an accelerator, which reads 512 MiB in about the time of a few dispatches), the read
    pattern of a float32 decode step. One huge matrix is no probe: XLA:CPU's product over a
    [1024, 131072] matrix ran far below the rate it reaches on a model's matrices."""
    nbytes = nbytes or (512 * 2**20 if jax.default_backend() == "cpu" else 4 * 2**30)
    count = max(1, nbytes // (4 * k * n))
    ws = [jnp.full((k, n), 0.5 + i, jnp.float32) for i in range(count)]
    x = jnp.ones((1, k), jnp.float32)
    f = jax.jit(lambda x, ws: sum(jnp.sum(x @ w) for w in ws))
    return (lambda: jax.block_until_ready(f(x, ws))), count * k * n * 4


def run(
    quick: bool = False,
    cfg: ModelConfig = QWEN25_05B,
    batches=(1, 8),
    prompt_len: int = 32,
    new: int | None = None,
    repeats: int | None = None,
    xla_formats=("int8", "int4"),
    hf_bf16: bool = True,
    cpu_kernel: bool = True,
    int8_act_formats=("int8", "int4"),
) -> list[dict]:
    """Times every format at each batch (`new` tokens, `repeats` alternating calls per side;
    defaults 32 and 5, or 8 and 2 when `quick`) and returns one row per (batch, side). The
    quantized formats run the CPU matvec kernel when it is available (`kernels.cpu_qmatvec`),
    and `xla_formats` also with XLA's multiply-reduce ("(XLA m-r)" sides); the `matvec` column
    says which path each side ran. `hf_bf16=False` leaves out transformers' bfloat16 side;
    `cpu_kernel` is the quantized sides' `QuantConfig.cpu_kernel`; `int8_act_formats` also run
    with int8 activations ("(int8 act)" sides) where the kernel has an int8 path. On an
    accelerator the quantized sides already run XLA's multiply-reduce, so `xla_formats` adds
    nothing there."""
    import torch
    import transformers

    import floe_jax as fj
    from floe_jax import quant
    from floe_jax.decode import generate
    from floe_jax.hf import config_to_hf
    from floe_jax.model import unstack_layers

    torch.set_num_threads(os.cpu_count() or 1)
    on_cpu = jax.default_backend() == "cpu"
    tdev = "cpu" if on_cpu or not torch.cuda.is_available() else "cuda"
    if tdev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    xla_formats = xla_formats if on_cpu else ()
    new = new or (8 if quick else 32)
    if new < 2:
        raise ValueError(f"bench decode: new={new}; a step is timed as (N tokens - 1 token) / "
                         "(N - 1), so N must be at least 2")  # fmt: skip
    repeats = repeats or (2 if quick else 5)
    d = config_to_hf(cfg)
    torch.manual_seed(0)
    hc = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf32 = transformers.AutoModelForCausalLM.from_config(hc, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf32.save_pretrained(tmp)
        cfg, params = fj.load_hf(tmp)
    if hf_bf16:  # optional: 1 GB more resident on a small host
        hf16 = transformers.AutoModelForCausalLM.from_config(hc, dtype=torch.bfloat16).eval()
        hf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf32.state_dict().items()})
        hf16.to(tdev)
    hf32.to(tdev)
    bases = {"float32": params}
    for fmt in FORMATS[1:]:
        qcfg = quant.QuantConfig(format=fmt, cpu_kernel=cpu_kernel)
        bases[fmt] = quant.quantize(params, cfg, qcfg)
    bytes_read = {f: quant.param_bytes(p) for f, p in bases.items()}
    bases = {f: unstack_layers(p) for f, p in bases.items()}  # the decode layout, once
    del params
    gen = jax.jit(generate, static_argnames=("cfg", "max_new_tokens"))
    probe, probe_bytes = _bandwidth_probe()

    rows = []
    for batch in batches:
        ids = np.random.RandomState(batch).randint(0, cfg.vocab_size, (batch, prompt_len))
        tokens, mask = ids.astype(np.int32), np.ones_like(ids, np.int32)
        key = jax.random.key(0)

        def fj_side(p, tokens=tokens, mask=mask, key=key, n=new):
            # Compiled ahead; the matvec path is the weights' static `cpu_kernel` field.
            comp = gen.lower(p, tokens, mask, cfg=cfg, max_new_tokens=n, key=key).compile()
            return lambda: np.asarray(comp(p, tokens, mask, key=key)[0])

        ids_t = torch.from_numpy(ids).to(tdev)
        kw = dict(
            attention_mask=torch.ones_like(ids_t), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip

        def hf_side(model, ids_t=ids_t, kw=kw, n=new):
            kw = kw | dict(max_new_tokens=n, min_new_tokens=n)

            def call():
                with torch.no_grad():
                    return model.generate(ids_t, **kw)[:, prompt_len:].cpu().numpy()

            return call

        models = {f"floe_jax {f}": p for f, p in bases.items()}
        models |= {f"floe_jax {f} (XLA m-r)": quant.with_options(bases[f], cpu_kernel=False)
                   for f in xla_formats}  # fmt: skip
        if jax.default_backend() == "gpu":
            models |= {f"floe_jax {f} (pallas)": quant.with_options(bases[f], gpu_kernel=True)
                       for f in ("int8", "int4")}  # fmt: skip
        if on_cpu and cpu_kernel and cpu_qmatvec.available() and cpu_qmatvec.int8_activations():
            models |= {f"floe_jax {f} (int8 act)": quant.with_options(bases[f], activations="int8")
                       for f in int8_act_formats}  # fmt: skip
        models["transformers float32"] = hf32
        if hf_bf16:
            models["transformers bf16"] = hf16
        # Each side also generates 1 token (the prefill and token 0) in the same loop, so the
        # N - 1 steps after it are timed apart from the prefill: the bandwidth bound is a step's.
        side = {True: fj_side, False: hf_side}
        sides = {k: side[k.startswith("floe_jax")](m) for k, m in models.items()}
        firsts = {k: side[k.startswith("floe_jax")](m, n=1) for k, m in models.items()}
        sides["bandwidth probe"] = probe
        calls = list(sides.values()) + list(firsts.values())
        all_times = timeit_alternating(*calls, repeats=repeats)
        times = dict(zip(sides, all_times[: len(sides)], strict=True))
        first_times = dict(zip(firsts, all_times[len(sides) :], strict=True))
        bw = probe_bytes / times.pop("bandwidth probe")
        out = {name: fn() for name, fn in sides.items() if name != "bandwidth probe"}
        # ms per token-step is a whole call (prefill included) over `new`, on both sides.
        hf_ms = 1e3 * times["transformers float32"] / new
        ref = out["floe_jax float32"]
        for name, sec in times.items():
            fmt = name.split()[1] if name.startswith("floe_jax") else name.split()[-1]
            ms = 1e3 * sec / new
            # A difference of medians: NaN where noise outweighs the N - 1 steps (tiny models).
            first = first_times[name]
            step = 1e3 * (sec - first) / (new - 1) if first < sec else np.nan
            row = {
                "batch": batch,
                "side": name,
                "ms/token-step": ms,
                "tok/s": batch * new / sec,
                "× transformers f32": hf_ms / ms,
                "prefill ms": 1e3 * first,
                "step ms": step,
                "greedy = floe_jax f32": float((out[name] == ref).mean()),
                "matvec": _path(name, fmt, cpu_kernel, on_cpu, tdev),
            }
            if name.startswith("floe_jax"):
                bound = 1e3 * bytes_read[fmt] / bw
                row |= {"weights MB": bytes_read[fmt] / 1e6, "bound ms": bound,
                        "% of bound": 100 * bound / ms,
                        "step % of bound": 100 * bound / step}  # fmt: skip
            rows.append(row)
        rows.append({"batch": batch, "side": "read bandwidth (GB/s)", "ms/token-step": bw / 1e9})
    print_table(
        rows,
        title=f"bench decode, {cfg.model_type} {cfg.num_params / 1e6:.0f}M shapes (random "
        f"weights): prompt {prompt_len}, {new} new tokens, medians of {repeats} interleaved — "
        f"{machine()}, load average {os.getloadavg()[0]:.1f}",
    )
    return rows


def _path(side: str, fmt: str, cpu_kernel: bool, on_cpu: bool = True, tdev: str = "cpu") -> str:
    if not side.startswith("floe_jax"):
        return f"torch ({tdev})"
    if fmt == "float32":
        return "XLA dot"
    if not on_cpu:
        return "pallas (kernels.gpu_qmatvec)" if "(pallas)" in side else "XLA multiply-reduce"
    act = "int8" if "(int8 act)" in side else "float32"
    return cpu_qmatvec.path(cpu_kernel and "(XLA m-r)" not in side, act)


def small_config() -> ModelConfig:
    """A tiny config of the same family, for tests of this benchmark's code."""
    return dataclasses.replace(
        QWEN25_05B, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2,
    )  # fmt: skip
