"""Weight-only quantized bases: bfloat16, int8 and int4 / NF4 weights that `forward`, cached and
fused decode and LoRA training take in place of float ones.

Formats (`QuantConfig`): `bf16` (a cast); `int8`, symmetric, one scale per output channel (or per
group of `group_size` inputs); `int4`, symmetric, one scale per group of `group_size` inputs
(GPTQ / llama.cpp Q4_0-style); `nf4`, QLoRA's 4-bit NormalFloat codes with an absmax scale per
group (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

`quantize(params, cfg, qcfg)` replaces every projection weight and the vocabulary matrices
(`embed`, `lm_head`) by a `QuantizedTensor`, a pytree whose codes are stored `[..., N, K]`, the
contracted axis K last and grouped (the row-major block layout GGUF and llama.cpp use). Norms
and biases stay float. The matmuls dequantize inside the compiled step (`linear`, `linear_t`,
`take_rows`; the products over codes, and the kernels they run, are `floe_jax.qmatmul`'s): no
float copy of the weights is kept between steps.

Why not a library: qwix rewrites Flax modules by intercepting their calls and aqtp injects
quantized `dot_general`s through configured Flax layers; floe_jax's model is pure functions over
a params pytree, and STYLE rules out interception, so the small quantizer lives here.

Shapes: M rows of activations, K contracted width, N outputs, G = K / group_size groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from floe_jax import qmatmul
from floe_jax.config import ConfigError, ModelConfig
from floe_jax.qmatmul import NF4_CODES
from kernels import cpu_qmatvec

FORMATS = ("bf16", "int8", "int4", "nf4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How a base is quantized.

    Attributes:
      format: `"bf16"`, `"int8"`, `"int4"` or `"nf4"`.
      group_size: inputs sharing one scale (4-bit: required, default 64; int8: None is one
        scale per output channel).
      embeddings: also quantize `embed` and `lm_head` (the largest matrices of a small model).
      cpu_kernel: on CPUs, contract decode steps' few rows in the fused C++ kernel
        (`kernels.cpu_qmatvec`; `bench qmatvec` times it beside XLA's multiply-reduce) when it
        builds; False keeps XLA's paths (to compare them, or where no C++
        compiler should run). Stored on each `QuantizedTensor` as a static field, so jitted
        functions retrace when it changes. The command line sets it from
        `FLOE_JAX_CPU_KERNELS` (`experiments.cli`); the library reads no environment.
      activations: what the CPU kernel multiplies the codes with. `"float32"` (default): x as it
        is, results equal to the dequantize-then-float reference up to float rounding.
        `"int8"` (int8 and int4 weights; groups a multiple of 32): x quantized per block of 32
        inputs (llama.cpp's Q8_0: scale max|x| / 127, round half to even,
        `kernels.cpu_qmatvec.quantize_activations` is the exact rule) and contracted with exact
        integer dot products (AVX-512 VNNI, or AVX2), several times fewer instructions per
        code, at the cost of the activations' rounding (README, "Quantized bases"). It applies
        where the kernel runs (decode steps and short prefills on CPUs with AVX-512 VNNI, or
        AVX2 without AVX-512; elsewhere, and for gradients, x stays float32). nf4's codes are
        not integers and bf16 is a float, so they keep float32 activations. Static on each
        `QuantizedTensor`, like `cpu_kernel`.
    """

    format: str = "int8"
    group_size: int | None = None
    embeddings: bool = True
    cpu_kernel: bool = True
    activations: str = "float32"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"QuantConfig.format={self.format!r} is not one of {FORMATS}")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"QuantConfig.group_size must be positive, got {self.group_size}")
        if self.group_size is not None and self.group_size % 2:
            raise ConfigError(f"QuantConfig.group_size must be even, got {self.group_size}")
        if self.format == "bf16" and self.group_size is not None:
            raise ConfigError("QuantConfig.group_size does not apply to format='bf16'")
        if not isinstance(self.cpu_kernel, bool):
            raise ConfigError(f"QuantConfig.cpu_kernel must be a bool, got {self.cpu_kernel!r}")
        try:
            cpu_qmatvec.check_activations(self.format, self.groups, self.activations)
        except ValueError as e:
            raise ConfigError(f"QuantConfig: {e}") from None

    @property
    def groups(self) -> int | None:
        """The effective group size (None: one group per row)."""
        if self.format in ("int4", "nf4"):
            return self.group_size or 64
        return self.group_size


@struct.dataclass
class QuantizedTensor:
    """A quantized matrix (or a stack of them on leading axes).

    Attributes:
      q: codes [..., N, K] (`bf16`: uint16, the bit patterns of bfloat16 values; `int8`: int8;
        `int4`/`nf4`: uint8 holding
        two 4-bit codes, element 2j in the low nibble and 2j+1 in the high one: [..., N, K/2]).
      scale: float32 [..., N, G] (`bf16`: [..., N, 0], unused).
      format: as in `QuantConfig` (static).
      transposed: the logical matrix is the storage transposed ([..., K, N], a projection's
        [in, out]) rather than [..., N, K] (an embedding table) (static).
      cpu_kernel: `QuantConfig.cpu_kernel` (static: the jit cache keys on it).
      gpu_kernel: on GPUs, contract decode steps' few rows of int8/int4 codes in the Pallas
        kernel `kernels.gpu_qmatvec` where its shapes allow, instead of XLA's multiply-reduce
        (static; off by default, `with_options(params, gpu_kernel=True)` turns it on).
      activations: `QuantConfig.activations` (static).
    """

    q: jax.Array
    scale: jax.Array
    format: str = struct.field(pytree_node=False)
    transposed: bool = struct.field(pytree_node=False)
    cpu_kernel: bool = struct.field(pytree_node=False, default=True)
    activations: str = struct.field(pytree_node=False, default="float32")
    gpu_kernel: bool = struct.field(pytree_node=False, default=False)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        *lead, n, k = self.q.shape
        return (*lead, n, 2 * k if self.format in ("int4", "nf4") else k)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (float) shape."""
        *lead, n, k = self.stored_shape
        return (*lead, k, n) if self.transposed else (*lead, n, k)

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * 4)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float matrix in its logical layout."""
        w = qmatmul.decode(self.q, self.scale, self.format, dtype)
        return jnp.swapaxes(w, -1, -2) if self.transposed else w


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedTensor)


# ----------------------------------------------------------------------------- codes


def _bf16_bits(w):
    """uint16 bit patterns of `w` rounded to bfloat16."""
    return jax.lax.bitcast_convert_type(jnp.asarray(w).astype(jnp.bfloat16), jnp.uint16)


def quantize_matrix(
    w: jax.Array,
    fmt: str,
    group_size: int | None,
    *,
    transposed: bool,
    name: str = "",
    cpu_kernel: bool = True,
    activations: str = "float32",
) -> QuantizedTensor:
    """A `QuantizedTensor` of float `w` (logical [..., K, N] when `transposed`, else [..., N, K]);
    `cpu_kernel` and `activations` as in `QuantConfig`.

    Scales are absmax / qmax per group of `group_size` along K (one group per row when None);
    codes are round-to-nearest (int8: [-127, 127]; int4: [-8, 7]; nf4: the nearest code).
    """
    try:
        cpu_qmatvec.check_activations(fmt, group_size, activations)
    except ValueError as e:
        raise ValueError(f"{name or 'weight'}: {e}") from None
    w = jnp.asarray(w, jnp.float32)
    if transposed:
        w = jnp.swapaxes(w, -1, -2)
    *lead, n, k = w.shape
    if fmt == "bf16":
        return QuantizedTensor(
            q=_bf16_bits(w), scale=jnp.zeros((*lead, n, 0), jnp.float32), format=fmt,
            transposed=transposed, cpu_kernel=cpu_kernel, activations=activations,
        )  # fmt: skip
    gs = group_size or k
    if k % gs:
        raise ValueError(f"{name or 'weight'}: contracted width {k} is not a multiple of "
                         f"QuantConfig.group_size={gs}")  # fmt: skip
    wg = w.reshape(*lead, n, k // gs, gs)
    amax = jnp.max(jnp.abs(wg), axis=-1)
    qmax = {"int8": 127.0, "int4": 7.0, "nf4": 1.0}[fmt]
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    x = wg / scale[..., None]
    if fmt == "int8":
        q = jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8).reshape(*lead, n, k)
    else:
        if fmt == "int4":
            c = jnp.clip(jnp.round(x), -8, 7).astype(jnp.int32) + 8
        else:
            c = jnp.argmin(jnp.abs(x[..., None] - jnp.asarray(NF4_CODES)), axis=-1)
        c = c.astype(jnp.uint8).reshape(*lead, n, k // 2, 2)
        q = c[..., 0] | (c[..., 1] << 4)
    return QuantizedTensor(
        q=q, scale=scale, format=fmt, transposed=transposed, cpu_kernel=cpu_kernel,
        activations=activations,
    )  # fmt: skip


# ----------------------------------------------------------------------------- matmuls


def linear(x: jax.Array, w, out_dtype=None) -> jax.Array:
    """`x [..., I] @ w [I, O]` for a float array or a transposed `QuantizedTensor`, in
    `out_dtype` (default x's)."""
    if is_quantized(w):
        return qmatmul.contract(x, w, out_dtype)
    y = jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def linear_t(x: jax.Array, w) -> jax.Array:
    """`x [..., K] @ w.T` in float32 for `w [N, K]` a float array or an untransposed
    `QuantizedTensor` (the tied head: logits from the embedding table)."""
    if is_quantized(w):
        return qmatmul.contract(x, w, jnp.float32)
    return jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def take_rows(w, ids: jax.Array, dtype) -> jax.Array:
    """Rows `w[ids]` of an embedding table (float, or an untransposed `QuantizedTensor`),
    dequantized: only the gathered rows are decoded."""
    if not is_quantized(w):
        return jnp.take(w, ids, axis=0).astype(dtype)
    q = jnp.take(w.q, ids, axis=0)
    scale = jnp.take(w.scale, ids, axis=0)
    return qmatmul.decode(q, scale, w.format, dtype)


def concat_outputs(ws: list) -> jax.Array | QuantizedTensor:
    """Weights (or biases) of projections that read the same input, joined on the output axis."""
    if not is_quantized(ws[0]):
        return jnp.concatenate(ws, axis=-1)
    cat = lambda *xs: jnp.concatenate(xs, axis=-2)  # storage [..., N, K]: N is the output axis
    return jax.tree.map(cat, *ws)


def split_outputs(w, ends) -> list:
    """Inverse of `concat_outputs` at output offsets `ends`."""
    if not is_quantized(w):
        return jnp.split(w, ends, axis=-1)
    qs, ss = jnp.split(w.q, ends, axis=-2), jnp.split(w.scale, ends, axis=-2)
    return [dataclasses.replace(w, q=q, scale=s) for q, s in zip(qs, ss, strict=True)]


# ----------------------------------------------------------------------------- params


def _map_weights(params: dict, fn_w, fn_vocab) -> dict:
    def proj(p):
        return {**p, "w": fn_w(p["w"])} if isinstance(p, dict) and "w" in p else p

    def layer(lp):
        return {k: proj(v) for k, v in lp.items()}

    layers = params["layers"]
    layers = tuple(map(layer, layers)) if isinstance(layers, tuple | list) else layer(layers)
    out = {**params, "layers": layers}
    for name in ("embed", "lm_head"):
        if name in out:
            out[name] = fn_vocab(name, out[name])
    return out


def quantize(params: dict, cfg: ModelConfig, qcfg: QuantConfig) -> dict:
    """`params` (canonical or decode layout) with every projection weight, and with
    `qcfg.embeddings` the vocabulary matrices, as `QuantizedTensor`s; all else unchanged.
    Quantizing quantized params is an error (dequantize first)."""
    del cfg  # the params carry their shapes; kept so callers pass the config they run with

    def w(x, name="projection"):
        if is_quantized(x):
            raise ValueError(f"{name} is already quantized; dequantize_params first")
        return quantize_matrix(x, qcfg.format, qcfg.groups, transposed=True, name=name,
                               cpu_kernel=qcfg.cpu_kernel,
                               activations=qcfg.activations)  # fmt: skip

    def vocab(name, x):
        if not qcfg.embeddings:
            return x
        if is_quantized(x):
            raise ValueError(f"{name} is already quantized; dequantize_params first")
        # embed [V, D] is stored as is (rows gathered, contracted over D by a tied head);
        # lm_head [D, V] transposed, like a projection.
        return quantize_matrix(x, qcfg.format, qcfg.groups, transposed=name == "lm_head",
                               name=name, cpu_kernel=qcfg.cpu_kernel,
                               activations=qcfg.activations)  # fmt: skip

    return _map_weights(params, w, vocab)


def with_options(params, **changes):
    """`params` with the static options `changes` (`cpu_kernel`, `activations`, `gpu_kernel`)
    on every `QuantizedTensor` in it, checked as `QuantConfig` checks them; the codes are shared,
    not copied."""
    unknown = sorted(set(changes) - {"cpu_kernel", "activations", "gpu_kernel"})
    if unknown:
        raise ValueError(f"with_options: {unknown} are not options of a quantized base "
                         "(cpu_kernel, activations, gpu_kernel)")  # fmt: skip
    for flag in ("cpu_kernel", "gpu_kernel"):
        if not isinstance(changes.get(flag, True), bool):
            raise ValueError(f"with_options: {flag} must be a bool, got {changes[flag]!r}")

    def fix(x):
        if not is_quantized(x):
            return x
        new = dataclasses.replace(x, **changes)
        groups, k = new.scale.shape[-1], new.stored_shape[-1]
        try:
            cpu_qmatvec.check_activations(
                new.format, k // groups if groups > 1 else None, new.activations
            )
        except ValueError as e:
            raise ValueError(
                f"with_options: a {new.format} weight of shape {new.shape}: {e}"
            ) from None
        return new

    return jax.tree.map(fix, params, is_leaf=is_quantized)


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
    """Float params from quantized ones (the reference the quantized matmuls equal up to float
    rounding); float leaves are returned as they are."""
    deq = lambda x: x.dequantize(dtype) if is_quantized(x) else x
    return _map_weights(params, deq, lambda _, x: deq(x))


def param_bytes(params) -> int:
    """Bytes the params occupy (codes and scales for quantized leaves)."""
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    return sum(x.nbytes if is_quantized(x) else x.size * x.dtype.itemsize for x in leaves)


def weight_bytes_per_param(fmt: str, group_size: int | None = None) -> float:
    """Storage per weight of a format, scales included (float32 scale per group)."""
    qcfg = QuantConfig(format=fmt, group_size=group_size)
    base = {"bf16": 2.0, "int8": 1.0, "int4": 0.5, "nf4": 0.5}[fmt]
    return base + (4.0 / qcfg.groups if qcfg.groups else 0.0)
