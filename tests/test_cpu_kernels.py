"""The CPU dequantize-matvec kernel (`kernels/cpu_qmatvec`): every format against the
dequantize-then-float reference, under jit, vmap (batch folded into rows, weights never
broadcast) and grad; greedy decode with the kernel equals XLA's multiply-reduce path; decode feeds
it the weight buffers without copies; a failed build warns and falls back; a corrupt cached
library is rebuilt; the command line's environment reaches the configs and the build."""

import ctypes
import dataclasses
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax import qmatmul, quant
from floe_jax.config import ConfigError, ModelConfig
from floe_jax.decode import generate, pad_prompts
from floe_jax.model import forward, init_cache, init_params, unstack_layers
from kernels import cpu_qmatvec as cq

# The kernel's own tests; the switch and XLA-path tests run without it, the build-failure test
# on any CPU with the kernel's vector instructions (elsewhere no build is tried).
needs_vector = pytest.mark.skipif(
    not cq.vectorized(), reason="no AVX-512 F/BW/VL or AVX2: the kernel is never built here"
)
needs_kernel = pytest.mark.skipif(not cq.available(), reason="the CPU kernel is not available")
needs_int8_act = pytest.mark.skipif(
    not (cq.available() and cq.int8_activations()),
    reason="no kernel or no int8 path (AVX-512 without VNNI)",
)

# (format, group size, K): odd K where groups allow it (scalar tails), groups whose width is not a
# multiple of 16 (masked tails inside a group), 4-bit groups of 32 and 64, per-row 4-bit scales.
CASES = [
    ("bf16", None, 131),
    ("int8", None, 131),
    ("int8", None, 140),  # AVX2 row1: four vectors at a time, then one, then one by one
    ("int8", 10, 130),
    ("int4", 32, 192),
    ("int4", 64, 192),
    ("int4", 34, 204),
    ("int4", None, 202),
    ("nf4", None, 224),
    ("nf4", 32, 192),
    ("nf4", 64, 192),
]
N = 37  # not a multiple of the kernel's 4-row tiles


def _weight(fmt, gs, k, n=N, seed=0):
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    return quant.quantize_matrix(w, fmt, gs, transposed=True)


def _ref(x, qt):
    """float64 x @ dequantize(): the reference up to float32 rounding."""
    return np.asarray(x, np.float64) @ np.asarray(qt.dequantize(), np.float64)


def _close(got, want, rtol=1e-5):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 6, 16])
@pytest.mark.parametrize(("fmt", "gs", "k"), CASES)
def test_kernel_equals_dequantized_reference(fmt, gs, k, m):
    qt = _weight(fmt, gs, k)
    x = np.random.default_rng(m).normal(size=(m, k)).astype(np.float32)
    got = jax.jit(quant.linear)(x, qt)
    _close(got, _ref(x, qt))


# Each code path of the source, built with a `-march` that selects it and registered under its
# own target, where this CPU can run it: the kernel this CPU builds is one of them, so the others
# would go untested on it.
# (-march flags, the CPU flags the built code may use, whether it has an int8-activation path):
# x86-64-v3 also implies BMI1/2, LZCNT (abm), MOVBE and F16C; v4 adds AVX-512 CD and DQ.
V3 = ("avx2", "fma", "bmi1", "bmi2", "abm", "movbe", "f16c")
V4 = (*V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
MARCH_PATHS = {
    "scalar": (("-march=x86-64",), (), False),
    "avx2": (("-march=x86-64-v3",), V3, True),
    "avx512": (("-march=x86-64-v4",), V4, False),
    "avx512-vnni": (("-march=x86-64-v4", "-mavx512vnni"), (*V4, "avx512_vnni"), True),
}


@pytest.mark.parametrize("path", list(MARCH_PATHS))
def test_every_code_path_of_the_source_equals_the_reference(path, tmp_path):
    """Every path compiles on any x86-64 host with the compiler (a compile error fails here,
    whatever this CPU runs); the paths this CPU can run are checked against the references."""
    march, flags, int8 = MARCH_PATHS[path]
    if platform.machine() != "x86_64" or shutil.which(cq.DEFAULT_CXX) is None:
        pytest.skip(f"no x86-64 host with {cq.DEFAULT_CXX} to build the {path} path")
    native = [f for f in cq.FLAGS if not f.startswith("-march")]
    so = cq.build(cache_dir=tmp_path, flags=(*native, *march))  # raises on a compile error
    if not set(flags) <= set(cq._cpu_flags().split()):
        pytest.skip(f"built; this CPU cannot run the {path} path")
    lib = ctypes.cdll.LoadLibrary(str(so))
    target = f"floe_qmatvec_test_{path}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, cq.SYMBOL)), platform="cpu")

    def call(x, qt, act):
        out = jax.ShapeDtypeStruct((x.shape[0], qt.q.shape[0]), jnp.float32)
        fmt = np.int32(cq.FORMAT_CODES[qt.format])
        return np.asarray(jax.ffi.ffi_call(target, out)(x, qt.q, qt.scale, fmt=fmt, act=act))

    for fmt, gs, k in CASES:
        qt = _weight(fmt, gs, k)
        for m in (1, 2, 3, 9):  # one pass, two rows, passes or scratch (kernel paths by rows)
            x = np.random.default_rng(m).normal(size=(m, k)).astype(np.float32)
            _close(call(x, qt, np.int32(0)), _ref(x, qt))
    for fmt, gs, k in I8_CASES:
        qt = _weight8(fmt, gs, k)
        x = np.random.default_rng(k).normal(size=(3, k)).astype(np.float32)
        x[0, :5] *= 40  # an outlier block
        if int8:
            _close(call(x, qt, np.int32(1)), _ref_int8(x, qt))
        else:
            with pytest.raises(Exception, match="no int8-activation path"):
                call(x, qt, np.int32(1))


@needs_kernel
def test_short_prefill_runs_the_kernel_and_its_grad_the_dequantized_dot():
    qt = _weight("int4", 64, 192)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 12, 192)).astype(np.float32)  # 24 rows: past SMALL_ROWS
    c = rng.normal(size=(2, 12, N)).astype(np.float32)
    assert qmatmul.SMALL_ROWS < 24 <= qmatmul.KERNEL_ROWS
    fn = jax.jit(quant.linear)
    assert "floe_qmatvec" in fn.lower(x, qt).as_text()
    _close(fn(x, qt), _ref(x, qt))
    g = jax.jit(jax.grad(lambda x: jnp.sum(quant.linear(x, qt) * c)))(x)
    _close(g, c.astype(np.float64) @ np.asarray(qt.dequantize(), np.float64).T)


@needs_kernel
@pytest.mark.parametrize(
    ("fmt", "gs", "act", "m"),
    [("int4", 64, "float32", 2), ("int8", None, "float32", 9), ("int8", 32, "float32", 1),
     ("int4", 64, "int8", 1), ("int8", None, "int8", 3)],
)  # fmt: skip
def test_threaded_product_over_many_rows_equals_reference(fmt, gs, act, m):
    """N * K past the kernel's threading threshold: the rows are split into chunks run on XLA's
    intra-op threads (float passes, one row of int8 codes at a time for one row of x, the scratch
    path past 8 rows, int8 activations)."""
    if act == "int8" and not cq.int8_activations():
        pytest.skip("no int8-activation path on this CPU")
    make, ref = (_weight, _ref) if act == "float32" else (_weight8, _ref_int8)
    qt = make(fmt, gs, 256, n=1031)
    x = np.random.default_rng(1).normal(size=(m, 256)).astype(np.float32)
    fn = jax.jit(functools.partial(cq.qmatvec, fmt=fmt, activations=act))
    _close(fn(x, qt.q, qt.scale), ref(x, qt))


@needs_kernel
def test_independent_threaded_products_in_one_program_equal_reference():
    """Independent products of one program, each splitting its rows over the same intra-op
    threads: XLA may run them at once (jaxlib 0.10.2 ran them one after another on the calling
    thread here), and each must still finish, exactly."""
    qts = [_weight("int4", 64, 256, n=1031, seed=s) for s in range(6)]
    x = np.random.default_rng(2).normal(size=(1, 256)).astype(np.float32)
    fn = jax.jit(lambda x, qs: [cq.qmatvec(x, q.q, q.scale, "int4") for q in qs])
    for got, qt in zip(fn(x, qts), qts, strict=True):
        _close(got, _ref(x, qt))


def _custom_calls(text):
    return re.findall(r"stablehlo\.custom_call @floe_qmatvec\(([^)]*)\).*?:\s*\(([^)]*)\)", text)


@needs_kernel
def test_vmap_folds_clients_into_rows_and_never_broadcasts_the_weight():
    qt = _weight("int8", None, 131)
    x = np.random.default_rng(2).normal(size=(3, 2, 131)).astype(np.float32)  # 3 clients, 2 rows
    fn = jax.jit(jax.vmap(quant.linear, in_axes=(0, None)))
    _close(fn(x, qt), np.stack([_ref(xi, qt) for xi in x]))
    text = fn.lower(x, qt).as_text()
    calls = _custom_calls(text)
    assert len(calls) == 1 and "tensor<6x131xf32>, tensor<37x131xi8>" in calls[0][1], calls
    assert "broadcast_in_dim" not in text or "x37x131xi8" not in text


@needs_kernel
def test_vmap_over_separate_weights_equals_a_loop():
    qts = [_weight("nf4", 32, 192, seed=s) for s in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qts)
    x = np.random.default_rng(3).normal(size=(2, 1, 192)).astype(np.float32)
    got = jax.jit(jax.vmap(quant.linear))(x, stacked)
    _close(got, np.stack([_ref(xi, q) for xi, q in zip(x, qts, strict=True)]))


@needs_kernel
@pytest.mark.parametrize(("fmt", "gs", "k"), [CASES[2], CASES[4]])
def test_grad_wrt_x_is_the_dequantized_transpose(fmt, gs, k):
    qt = _weight(fmt, gs, k)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, k)).astype(np.float32)
    c = rng.normal(size=(3, N)).astype(np.float32)
    g = jax.jit(jax.grad(lambda x: jnp.sum(quant.linear(x, qt) * c)))(x)
    _close(g, c.astype(np.float64) @ np.asarray(qt.dequantize(), np.float64).T)


CFG = ModelConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, tie_word_embeddings=True, model_type="qwen2", qkv_bias=True,
)  # fmt: skip


def _decode(qp):
    """(greedy tokens of `generate`, logits of a prefill and 3 cached steps, generate's jitted
    function and arguments) for params `qp` (whose weights' `cpu_kernel` picks the path)."""
    tokens, mask = pad_prompts([[5, 9, 11, 2], [3, 7]])
    gen = jax.jit(lambda p, t, m: generate(p, t, m, CFG, max_new_tokens=6, key=jax.random.key(0)))
    step = jax.jit(lambda p, t, c: forward(p, t, CFG, cache=c))
    toks = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 7)).astype(np.int32)
    logits, cache = step(qp, toks[:, :4], init_cache(CFG, 2, 7))
    steps = [logits]
    for t in range(4, 7):
        logits, cache = step(qp, toks[:, t : t + 1], cache)
        steps.append(logits)
    return gen(qp, tokens, mask)[0], np.concatenate(steps, axis=1), gen, (qp, tokens, mask)


@needs_kernel
def test_greedy_decode_with_the_kernel_equals_the_xla_path():
    qcfg = quant.QuantConfig(format="nf4", group_size=32)
    qp = unstack_layers(quant.quantize(init_params(CFG, key=jax.random.key(0)), CFG, qcfg))
    toks_k, logits_k, gen_k, args = _decode(qp)
    # Decode passes each layer's own weight buffers to the kernel: the compiled program copies
    # or slices no array of a weight's codes' shape (the prefill's wide matmuls decode codes
    # inside fusions, which is not a copy).
    hlo = gen_k.lower(*args).compile().as_text()
    assert 'custom_call_target="floe_qmatvec"' in hlo
    shapes = {x.q.shape for x in jax.tree.leaves(qp, is_leaf=quant.is_quantized)
              if quant.is_quantized(x)}  # fmt: skip
    ops = {op for dims, op in re.findall(r"= u8\[(\d+,\d+)\]\S* (\S+)\(", hlo)
           if tuple(map(int, dims.split(","))) in shapes}  # fmt: skip
    assert "parameter" in ops and not ops & {"copy", "copy-start", "slice", "dynamic-slice"}, ops
    # The same codes with `cpu_kernel=False` (as `QuantConfig(cpu_kernel=False)` makes them):
    # the jitted function retraces (a static field) onto XLA's multiply-reduce.
    qx = quant.with_options(qp, cpu_kernel=False)
    toks_x, logits_x, gen_x, args_x = _decode(qx)
    assert "floe_qmatvec" not in gen_x.lower(*args_x).as_text()
    assert "floe_qmatvec" in gen_k.lower(*args).as_text()  # the first trace is still cached
    np.testing.assert_array_equal(toks_k, toks_x)
    np.testing.assert_allclose(logits_k, logits_x, atol=1e-5)


def test_quant_config_cpu_kernel_reaches_every_weight():
    params = init_params(CFG, key=jax.random.key(0))
    qp = quant.quantize(params, CFG, quant.QuantConfig(format="int8", cpu_kernel=False))
    flags = {w.cpu_kernel for w in jax.tree.leaves(qp, is_leaf=quant.is_quantized)
             if quant.is_quantized(w)}  # fmt: skip
    assert flags == {False}
    w = next(v for v in jax.tree.leaves(qp, is_leaf=quant.is_quantized)
             if quant.is_quantized(v) and v.transposed)  # fmt: skip
    w = jax.tree.map(lambda a: a[0], w) if w.q.ndim == 3 else w  # one layer of a stack
    x = np.ones((1, w.shape[0]), np.float32)
    assert "floe_qmatvec" not in jax.jit(quant.linear).lower(x, w).as_text()
    if cq.available():
        w_on = quant.with_options(w, cpu_kernel=True)
        assert "floe_qmatvec" in jax.jit(quant.linear).lower(x, w_on).as_text()
    with pytest.raises(ConfigError, match="cpu_kernel must be a bool"):
        quant.QuantConfig(cpu_kernel="0")


@pytest.mark.parametrize(("fmt", "gs", "k"), CASES)
def test_xla_multiply_reduce_equals_dequantized_reference(fmt, gs, k):
    """The path GPUs, TPUs and CPUs without the kernel take for a decode step."""
    qt = _weight(fmt, gs, k)
    for m in (1, 5):
        x = np.random.default_rng(m).normal(size=(m, k)).astype(np.float32)
        got = jax.jit(qmatmul.multiply_reduce, static_argnums=3)(x, qt.q, qt.scale, fmt)
        _close(np.asarray(got), _ref(x, qt))


def test_a_cpu_without_the_vector_instructions_keeps_xla(monkeypatch):
    """The kernel's scalar fallback is slower than XLA's vectorized multiply-reduce: a CPU
    with neither AVX-512 F/BW/VL nor AVX2 + FMA never selects it, and `path()` says why; int8
    activations run on the AVX2 path, and on the AVX-512 path only with VNNI."""
    monkeypatch.setattr(cq, "_cpu_flags", lambda: "flags : fpu sse2 avx fma avx512f")
    assert not cq.vectorized() and not cq.available() and not cq.int8_activations()
    assert "lacks avx512f/avx512bw/avx512vl and avx2/fma" in cq.path()
    monkeypatch.setattr(cq, "_cpu_flags", lambda: "flags : fpu sse2 avx avx2 fma")
    assert cq.vectorized() and cq.int8_activations()
    monkeypatch.setattr(cq, "_cpu_flags", lambda: "flags : avx2 fma avx512f avx512bw avx512vl")
    assert cq.vectorized() and not cq.int8_activations()
    monkeypatch.setattr(cq, "_cpu_flags", lambda: "flags : avx512f avx512bw avx512vl avx512_vnni")
    assert cq.vectorized() and cq.int8_activations()


def test_command_line_reads_the_kernel_environment_once(monkeypatch):
    """`FLOE_JAX_CPU_KERNELS` becomes `QuantConfig.cpu_kernel` on the configs a command builds
    (a bad value is an error naming it); `CXX` and `FLOE_JAX_KERNEL_CACHE` go to
    `cpu_qmatvec.configure`; the library itself reads none of them."""
    from experiments import cli

    monkeypatch.delenv(cli.CPU_KERNELS_ENV, raising=False)
    assert cli.CommandEnv.from_environ().cpu_kernel is True
    monkeypatch.setenv(cli.CPU_KERNELS_ENV, "0")
    env = cli.CommandEnv.from_environ()

    @dataclasses.dataclass(frozen=True)
    class Preset:
        quant: quant.QuantConfig
        edge: ModelConfig
        steps: int = 3

    got = env.apply(Preset(quant=quant.QuantConfig(format="int4"), edge=CFG))
    assert got.quant == quant.QuantConfig(format="int4", cpu_kernel=False) and got.steps == 3
    monkeypatch.setenv(cli.CPU_KERNELS_ENV, "yes")
    with pytest.raises(ConfigError, match="FLOE_JAX_CPU_KERNELS='yes'"):
        cli.CommandEnv.from_environ()

    seen = []
    monkeypatch.setattr(cq, "configure", lambda **kw: seen.append(kw))
    monkeypatch.setenv(cli.CXX_ENV, "clang++ -v")
    monkeypatch.setenv(cli.KERNEL_CACHE_ENV, "/tmp/kc")
    cli.configure_kernel_build_from_env()
    monkeypatch.delenv(cli.CXX_ENV)
    monkeypatch.setenv(cli.KERNEL_CACHE_ENV, "")
    cli.configure_kernel_build_from_env()
    assert seen == [{"cxx": "clang++ -v", "cache_dir": "/tmp/kc"}, {"cxx": None, "cache_dir": None}]


def test_build_failure_names_the_command(tmp_path):
    with pytest.raises(cq.KernelBuildError, match=r"failed \(exit 1\): /bin/false -O3"):
        cq.build(cxx="/bin/false", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_a_stuck_compiler_times_out_naming_the_command(tmp_path):
    stuck = tmp_path / "stuck-cxx"
    stuck.write_text("#!/bin/sh\nexec sleep 30\n")
    stuck.chmod(0o755)
    with pytest.raises(cq.KernelBuildError, match=r"timed out after 0.5 s: .*stuck-cxx"):
        cq.build(cxx=str(stuck), cache_dir=tmp_path / "cache", timeout=0.5)


@needs_kernel
def test_a_corrupt_cached_library_is_rebuilt(tmp_path):
    """A truncated or corrupted library in the cache is compiled again, not loaded (here with a
    stand-in compiler that copies the real library, so the test does not compile)."""
    real = cq.build(cq._settings[0].cxx, cq._settings[0].cache_dir)
    fake = tmp_path / "fake-cxx"
    fake.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = --version ] && {{ echo fake 1.0; exit 0; }}
        while [ $# -gt 1 ]; do [ "$1" = -o ] && cp {real} "$2"; shift; done
    """)
    )
    fake.chmod(0o755)
    settings = cq.BuildSettings(cxx=str(fake), cache_dir=str(tmp_path / "cache"))
    so = cq.build(settings.cxx, settings.cache_dir)
    good = so.read_bytes()
    assert good == real.read_bytes() and cq.build(settings.cxx, settings.cache_dir) == so
    so.write_bytes(good[:1000])  # truncated (loading it could crash the process: not tried)
    lib = cq.load(settings)
    assert hasattr(lib, cq.SYMBOL) and so.read_bytes() == good
    so.write_bytes(good[:500] + bytes(500) + good[1000:])  # same size, bytes zeroed
    assert cq.build(settings.cxx, settings.cache_dir) == so and so.read_bytes() == good


def test_bad_operands_name_shapes_and_dtypes():
    qt = _weight("int4", 32, 192)
    x = np.ones((2, 190), np.float32)
    with pytest.raises(ValueError, match=r"K=190.*x float32\[2, 190\], q uint8\[37, 96\]"):
        cq.qmatvec(x, qt.q, qt.scale, "int4")
    with pytest.raises(ValueError, match=r"format int8 needs q of dtype int8.*q uint8\[37, 96\]"):
        cq.qmatvec(np.ones((2, 192), np.float32), qt.q, qt.scale, "int8")


@needs_vector
def test_failed_build_warns_and_falls_back_to_xla(tmp_path):
    """A compiler that fails, passed through `cpu_qmatvec.configure` (as the command line does
    with `CXX`): the first quantized matmul warns with the command and runs XLA's path."""
    code = textwrap.dedent(f"""
        import json, warnings, numpy as np, jax
        from floe_jax import quant
        from kernels import cpu_qmatvec
        cpu_qmatvec.configure(cxx="/bin/false", cache_dir={str(tmp_path)!r})
        w = np.arange(12, dtype=np.float32).reshape(4, 3)
        qt = quant.quantize_matrix(w, "int8", None, transposed=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = quant.linear(np.ones((1, 4), np.float32), qt)
        print("WARN", *[str(c.message) for c in caught])
        want = np.ones((1, 4)) @ np.asarray(qt.dequantize())
        print("Y", json.dumps([np.asarray(y).tolist(), want.tolist()]))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "FLOE_JAX_KERNEL_CACHE")}
    env |= {"PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "failed (exit 1): /bin/false -O3" in out.stdout and "falls back" in out.stdout
    y_line = next(ln for ln in out.stdout.splitlines() if ln.startswith("Y "))
    got, want = json.loads(y_line[2:])
    np.testing.assert_allclose(got, want, rtol=1e-6)


# int8 activations: (format, group size, K): per-row int8 with odd K (a partial last block and a
# partial last 64-byte vector), int8 groups of 32 and 64, int4 groups of 32, 64, 96 and 128,
# per-row int4 with K = 202 (a partial block) and 160, K past one 128-input vector.
I8_CASES = [
    ("int8", None, 131),
    ("int8", 32, 192),
    ("int8", 64, 256),
    ("int8", 32, 160),  # K % 64 == 32: the last 64-byte vector holds one group
    ("int8", 96, 288),  # AVX2: an odd whole block after a pair, in every group
    ("int8", None, 100),  # AVX2: a pair, an odd whole block, then a partial one
    ("int8", None, 20),  # K < 32: a partial block only
    ("int4", 32, 192),
    ("int4", 64, 192),
    ("int4", 128, 384),
    ("int4", None, 202),
    ("int4", 32, 160),  # AVX2: a partial last 64-input vector with its own group's scale
    ("int4", 96, 288),  # AVX2: a group boundary inside a 64-input vector
    ("int4", None, 160),  # AVX2: per-row scales, K % 64 == 32
    ("int4", None, 40),  # AVX2: per-row scales, K < 64: a partial vector only
]


def _codes(qt):
    """The weight's integer codes c [N, K] (int8 as stored; int4: nibble - 8)."""
    q = np.asarray(qt.q)
    if qt.format == "int8":
        return q.astype(np.int64)
    return np.stack([q & 15, q >> 4], axis=-1).reshape(q.shape[0], -1).astype(np.int64) - 8


def _ref_int8(x, qt):
    """x quantized per block (`quantize_activations`), exact integer dot products per block,
    then the block's x scale and the weight's scale, in float64."""
    xq, d = cq.quantize_activations(x)
    c, s = _codes(qt), np.asarray(qt.scale, np.float64)
    k, g = x.shape[1], s.shape[1]
    y = np.zeros((x.shape[0], c.shape[0]))
    for b0 in range(0, k, cq.BLOCK):
        b1 = min(k, b0 + cq.BLOCK)
        isum = xq[:, b0:b1].astype(np.int64) @ c[:, b0:b1].T  # exact
        w_scale = 1.0 if g == 1 else s[:, b0 // (k // g)][None]
        y += d[:, b0 // cq.BLOCK, None].astype(np.float64) * isum * w_scale
    return y * s[:, 0][None] if g == 1 else y


def _weight8(fmt, gs, k, n=N, seed=0):
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    return quant.quantize_matrix(w, fmt, gs, transposed=True, activations="int8")


@needs_int8_act
@pytest.mark.parametrize("m", [1, 6])
@pytest.mark.parametrize(("fmt", "gs", "k"), I8_CASES)
def test_int8_activations_equal_the_integer_reference(fmt, gs, k, m):
    qt = _weight8(fmt, gs, k)
    x = np.random.default_rng(m).normal(size=(m, k)).astype(np.float32)
    x[0, :5] *= 40  # an outlier block
    fn = jax.jit(quant.linear)
    assert "act = 1 : i32" in fn.lower(x, qt).as_text()
    got = fn(x, qt)
    _close(got, _ref_int8(x, qt))
    # Not the float reference: the activations' rounding is visible, and small.
    diff = np.abs(np.asarray(got) - _ref(x, qt)).max() / np.abs(_ref(x, qt)).max()
    assert 1e-5 < diff < 3e-2


def test_activation_quantization_rule():
    """`quantize_activations` by hand: d = max|x| / 127 per block of 32; rint (half to even)."""
    x = np.zeros((1, 70), np.float32)
    x[0, :4] = [127, -63.5, 0.5, 1.5]  # block 0: d = 1
    x[0, 64:66] = [-2.54, 1.27]  # block 2 (6 inputs): d = 0.02
    xq, d = cq.quantize_activations(x)
    np.testing.assert_array_equal(d[0], np.float32([1, 0, 2.54 / np.float32(127)]))
    np.testing.assert_array_equal(xq[0, :4], [127, -64, 0, 2])
    np.testing.assert_array_equal(xq[0, 64:66], [-127, 64])  # 1.27 / 0.02 = 63.5 -> 64
    assert not xq[0, 4:64].any() and not xq[0, 66:].any()
    x[0, 40] = np.nan
    assert np.isnan(cq.quantize_activations(x)[1][0, 1])


@needs_int8_act
def test_int8_activations_propagate_nan_and_zero_rows():
    qt = _weight8("int4", 64, 192)
    x = np.zeros((3, 192), np.float32)
    x[1, 0] = 1.0
    x[2, 70] = np.nan
    y = np.asarray(jax.jit(quant.linear)(x, qt))
    assert not y[0].any() and np.isfinite(y[1]).all() and np.isnan(y[2]).all()
    _close(y[1], _ref_int8(x[1:2], qt)[0])


@needs_int8_act
def test_int8_activations_under_vmap_and_grad():
    """Clients fold into the kernel's rows; the gradient wrt x is the float path's (QLoRA
    training over such a base trains as with float32 activations)."""
    qt = _weight8("int8", None, 131)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 2, 131)).astype(np.float32)
    fn = jax.jit(jax.vmap(quant.linear, in_axes=(0, None)))
    _close(fn(x, qt), np.stack([_ref_int8(xi, qt) for xi in x]))
    assert len(_custom_calls(fn.lower(x, qt).as_text())) == 1
    c = rng.normal(size=(2, N)).astype(np.float32)
    g = jax.jit(jax.grad(lambda x: jnp.sum(quant.linear(x, qt) * c)))(x[0])
    _close(g, c.astype(np.float64) @ np.asarray(qt.dequantize(), np.float64).T)


@needs_int8_act
def test_greedy_decode_with_int8_activations_runs_the_int8_kernel():
    qcfg = quant.QuantConfig(format="int4", group_size=32, activations="int8")
    qp = unstack_layers(quant.quantize(init_params(CFG, key=jax.random.key(0)), CFG, qcfg))
    toks, logits, gen, args = _decode(qp)
    assert "act = 1 : i32" in gen.lower(*args).as_text()
    _, logits_f, _, _ = _decode(quant.with_options(qp, activations="float32"))
    assert np.isfinite(logits).all() and toks.shape == (2, 6)
    # Activation rounding moves the logits a little, not a lot (random tiny model).
    np.testing.assert_allclose(logits, logits_f, atol=0.05 * np.abs(logits_f).max())


def test_int8_activations_refuse_formats_and_groups_they_do_not_take():
    for kw, match in [
        ({"format": "nf4"}, "not format='nf4'"),
        ({"format": "bf16"}, "not format='bf16'"),
        ({"format": "int8", "group_size": 48}, "multiple of 32"),
        ({"format": "int4", "group_size": 16}, "multiple of 32"),
    ]:
        with pytest.raises(ConfigError, match=match):
            quant.QuantConfig(activations="int8", **kw)
    with pytest.raises(ConfigError, match="activations='fp8'"):
        quant.QuantConfig(activations="fp8")
    with pytest.raises(ValueError, match="gate: activations='int8' needs group_size"):
        quant.quantize_matrix(np.ones((64, 4)), "int8", 16, transposed=True, name="gate",
                              activations="int8")  # fmt: skip
    qt = _weight("nf4", 32, 192)
    with pytest.raises(
        ValueError, match=r"qmatvec: activations='int8' takes formats .*not format='nf4'"
    ):
        cq.qmatvec(np.ones((1, 192), np.float32), qt.q, qt.scale, "nf4", "int8")


@needs_kernel
def test_bench_qmatvec_quick_runs_and_agrees():
    from experiments.benchmarks import qmatvec as bench

    rows = bench.run(quick=True)
    by = {(r["matrix"], r["format"], r["path"]): r for r in rows}
    int8_act = len(cq.INT8_FORMATS) if cq.int8_activations() else 0
    assert len(by) == len(bench.SHAPES) * (1 + 2 * len(bench.FORMATS) + int8_act)
    for (matrix, fmt, path), r in by.items():
        if path == "kernel":  # the same products as XLA's multiply-reduce, both against float32
            other = by[(matrix, fmt, "XLA multiply-reduce")]["rel. diff vs float32"]
            assert abs(r["rel. diff vs float32"] - other) < 1e-4 and r["ms"] > 0
        if path == "kernel, int8 act":  # plus the activations' rounding: small
            other = by[(matrix, fmt, "kernel")]["rel. diff vs float32"]
            assert abs(r["rel. diff vs float32"] - other) < 2e-2 and r["ms"] > 0


def test_with_options_checks_what_quant_config_checks():
    """Switching a quantized base's options validates them as `QuantConfig` does, naming the
    weight: int8 activations take neither nf4 codes nor groups that are no multiple of 32."""
    params = init_params(CFG, key=jax.random.key(0))
    nf4 = quant.quantize(params, CFG, quant.QuantConfig(format="nf4", group_size=32))
    with pytest.raises(ValueError, match=r"with_options: a nf4 weight of shape .*formats"):
        quant.with_options(nf4, activations="int8")
    int4 = quant.quantize(params, CFG, quant.QuantConfig(format="int4", group_size=16))
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.with_options(int4, activations="int8")
    with pytest.raises(ValueError, match="not options"):
        quant.with_options(int4, group_size=32)
    with pytest.raises(ValueError, match="cpu_kernel must be a bool"):
        quant.with_options(int4, cpu_kernel="no")
    int8 = quant.quantize(params, CFG, quant.QuantConfig(format="int8", group_size=32))
    fast = quant.with_options(int8, activations="int8")
    got = {x.activations for x in jax.tree.leaves(fast, is_leaf=quant.is_quantized)
           if quant.is_quantized(x)}  # fmt: skip
    assert got == {"int8"}
