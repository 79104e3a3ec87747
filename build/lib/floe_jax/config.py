"""Frozen, keyword-only, hashable configuration dataclasses.

Configs are passed to jitted functions as static arguments and never traced. Variants are made with
`dataclasses.replace`; validation happens in `__post_init__` so a bad value fails where it is
written, with the field named.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3", "smollm3")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("reference", "pallas")  # kernels.decode_attention.IMPLS
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TARGET_ALIASES = {t.removesuffix("_proj"): (t,) for t in LORA_TARGETS}
# PEFT's names for the modules Phi-3 fuses (`target_modules=["qkv_proj", "gate_up_proj"]`): each
# adapts the projections it concatenates.
FUSED_TARGETS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def require_finite(owner: str, **values) -> None:
    """Raises `ConfigError` naming `owner.name` for the first value that is NaN or infinite.

    Comparisons alone let NaN through (`nan <= 0` is False), so every float setting that must be
    a number is checked here first. None (an unset optional) passes.
    """
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{owner}.{name} must be a finite number, got {v}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face writes it under `rope_parameters`.

    `linear` divides every frequency by `factor`; `llama3` (Llama 3.1/3.2) rescales only the low
    frequencies, smoothly between `low_freq_factor` and `high_freq_factor`. `longrope` (Phi-3.5,
    Phi-4-mini; Ding et al., 2024, "LongRoPE") divides frequency i by `short_factor[i]` while a
    forward's sequence (its largest position + 1) is at most `original_max_position_embeddings`
    and by `long_factor[i]` beyond, and scales cos and sin by `attention_scaling`.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None

    def __post_init__(self):
        _require(
            self.rope_type in ROPE_TYPES,
            f"rope_type={self.rope_type!r} is not supported; supported: {ROPE_TYPES}",
        )
        require_finite(
            "RopeScaling",
            factor=self.factor,
            low_freq_factor=self.low_freq_factor,
            high_freq_factor=self.high_freq_factor,
        )
        _require(self.factor > 0, f"rope factor must be > 0, got {self.factor}")
        object.__setattr__(self, "short_factor", tuple(float(x) for x in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(x) for x in self.long_factor))
        require_finite("RopeScaling", attention_factor=self.attention_factor)
        for name in ("short_factor", "long_factor"):
            require_finite(
                "RopeScaling", **{f"{name}[{i}]": x for i, x in enumerate(getattr(self, name))}
            )
        if self.rope_type == "longrope":
            n = len(self.short_factor)
            _require(
                n > 0 and len(self.long_factor) == n,
                f"longrope needs short_factor and long_factor of one length, got {n} and "
                f"{len(self.long_factor)}",
            )
            _require(
                min(self.short_factor + self.long_factor) > 0,
                "longrope short_factor and long_factor must be > 0",
            )
            _require(
                self.original_max_position_embeddings > 0,
                "original_max_position_embeddings must be > 0, got "
                f"{self.original_max_position_embeddings}",
            )
        else:
            _require(
                not self.short_factor and not self.long_factor and self.attention_factor is None,
                f"short_factor, long_factor and attention_factor are longrope's; rope_type="
                f"{self.rope_type!r} takes none",
            )

    @property
    def attention_scaling(self) -> float:
        """What cos and sin are multiplied by: 1, or for `longrope` `attention_factor`, else
        `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))` when `factor` > 1, as
        transformers' `_compute_longrope_parameters` sets it."""
        if self.rope_type != "longrope":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(
            1 + math.log(self.factor) / math.log(self.original_max_position_embeddings)
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer: one architecture whose fields cover the families below.

    Covers Llama 2/3, TinyLlama, SmolLM2 (`model_type="llama"`), Qwen2/Qwen2.5 (`"qwen2"`, which
    always has q/k/v bias and no o bias), Qwen3 (`"qwen3"`: `qk_norm`), Mistral (`"mistral"`:
    `sliding_window` on every layer), Gemma 3 text models (`"gemma3_text"`: `qk_norm`,
    `norm_unit_offset`, `sandwich_norms`, `query_pre_attn_scalar`, `scale_embeddings`, GeGLU,
    interleaved `layer_types` with `rope_local_theta` on the sliding layers), Phi-3 and Phi-4-mini
    (`"phi3"`: the checkpoint fuses q/k/v and gate/up, split at load; `partial_rotary_factor` and
    `longrope` scaling) and SmolLM3 (`"smollm3"`:
    `nope_layers`). The fields' defaults are Llama's, so a feature costs nothing where unused.

    Family fields:
      qk_norm: RMSNorm over the head dim of every query and key head, before RoPE.
      norm_unit_offset: every RMSNorm scales by `1 + w`, in float32 (Gemma's norms).
      sandwich_norms: extra RMSNorms on the attention and MLP outputs before each residual add.
      query_pre_attn_scalar: attention scores scale by `query_pre_attn_scalar ** -0.5` instead of
        `head_dim ** -0.5`.
      scale_embeddings: input embeddings are multiplied by `sqrt(hidden_size)` (not the tied
        output head).
      hidden_act: the MLP's gate activation, `silu` (SwiGLU) or `gelu_pytorch_tanh` (GeGLU).
      sliding_window: W, the keys a sliding-window layer sees (itself and the W - 1 before it).
      layer_types: per layer `"full_attention"` or `"sliding_attention"`; None means every layer
        slides when `sliding_window` is set, none otherwise.
      rope_local_theta: the RoPE base of sliding layers (None: `rope_theta`); `rope_scaling`
        then applies to full-attention layers only, as Gemma 3 does.
      nope_layers: indices of layers that use no rotary embedding at all (SmolLM3's NoPE).
      partial_rotary_factor: RoPE rotates the first `rotary_dim = int(head_dim * factor)` dims
        of each query and key head and passes the rest (Phi-4-mini: 0.75).

    `attention_impl` picks a decode step's attention (`kernels.decode_attention`): `"reference"`
    (plain jnp) or `"pallas"` (the kernel wherever its shapes and backend allow, the reference
    elsewhere). It is part of the config, so a jitted step compiles once per choice; checkpoints
    do not record it (loading one gives the default).

    Training memory (not recorded by checkpoints either; variants by `dataclasses.replace`):
      remat: rematerialise each layer's activations in the backward pass (`jax.checkpoint`
        around each layer, see `model.hidden_states`): the backward keeps one [B, T, D] input
        per layer and recomputes the rest, for one more forward pass of compute.
      loss_chunk: tokens per chunk of the next-token loss (`floe_jax.loss.token_loss`); 0
        projects every position to the vocabulary at once (float32 [B, T, V] logits), k > 0
        projects k tokens at a time under a checkpointed scan, so neither pass holds more than
        [k, V] of logits.
    """

    model_type: Literal["llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3", "smollm3"] = (
        "llama"
    )
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    attention_impl: str = "reference"
    qk_norm: bool = False
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    scale_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    nope_layers: tuple[int, ...] = ()
    partial_rotary_factor: float = 1.0
    remat: bool = False
    loss_chunk: int = 0

    def __post_init__(self):
        _require(
            self.model_type in MODEL_TYPES,
            f"model_type={self.model_type!r} is not supported; supported: {MODEL_TYPES}",
        )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        require_finite("ModelConfig", rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta)
        _require(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _require(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _require(self.kv_heads > 0, f"num_kv_heads must be > 0, got {self.num_kv_heads}")
        _require(
            self.num_heads % self.kv_heads == 0,
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}",
        )
        _require(
            self.head_dim is not None or self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
            "set head_dim",
        )
        _require(self.dim_head % 2 == 0, f"head_dim must be even for RoPE, got {self.dim_head}")
        _require(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {DTYPES}")
        _require(
            self.attention_impl in ATTENTION_IMPLS,
            f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}",
        )
        _require(self.loss_chunk >= 0, f"loss_chunk must be >= 0, got {self.loss_chunk}")
        self._check_family_fields()

    def _check_family_fields(self):
        _require(
            self.hidden_act in ACTIVATIONS,
            f"hidden_act={self.hidden_act!r} is not supported; supported: {ACTIVATIONS}",
        )
        require_finite(
            "ModelConfig",
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            rope_local_theta=self.rope_local_theta,
        )
        for name in ("query_pre_attn_scalar", "rope_local_theta", "sliding_window"):
            v = getattr(self, name)
            _require(v is None or v > 0, f"{name} must be > 0 (or None), got {v}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            _require(
                len(self.layer_types) == self.num_layers,
                f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}",
            )
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            _require(not bad, f"layer_types holds {bad[:1]}; each must be one of {LAYER_TYPES}")
            _require(
                self.sliding_window is not None or "sliding_attention" not in self.layer_types,
                "layer_types has sliding_attention layers but sliding_window is None",
            )
        object.__setattr__(self, "nope_layers", tuple(sorted({int(i) for i in self.nope_layers})))
        bad = [i for i in self.nope_layers if not 0 <= i < self.num_layers]
        _require(not bad, f"nope_layers names layer {bad[:1]}, outside [0, {self.num_layers})")
        self._check_rotary()

    def _check_rotary(self):
        prf = self.partial_rotary_factor
        require_finite("ModelConfig", partial_rotary_factor=prf)
        _require(0 < prf <= 1, f"partial_rotary_factor must be in (0, 1], got {prf}")
        _require(
            self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
            f"partial_rotary_factor={prf} gives rotary_dim={self.rotary_dim} of head_dim="
            f"{self.dim_head}; it must be even and >= 2",
        )
        sc = self.rope_scaling
        if sc is not None and sc.rope_type == "longrope":
            _require(
                len(sc.short_factor) == self.rotary_dim // 2,
                f"longrope short_factor has {len(sc.short_factor)} entries; rotary_dim="
                f"{self.rotary_dim} needs {self.rotary_dim // 2}",
            )
            _require(
                self.rope_local_theta is None and not self.nope_layers,
                "longrope scaling with rope_local_theta or nope_layers is not supported",
            )

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """The dims of each head that RoPE rotates (the first ones; see `partial_rotary_factor`)."""
        return int(self.dim_head * self.partial_rotary_factor)

    @property
    def rope_switches(self) -> bool:
        """Whether the RoPE frequencies depend on the sequence length (`longrope`): short factors
        while a forward's largest position + 1 is at most `original_max_position_embeddings`,
        long ones beyond, for every position of that forward (transformers'
        `dynamic_rope_update`)."""
        return self.rope_scaling is not None and self.rope_scaling.rope_type == "longrope"

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, its sliding window W, or None for full attention."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(
            self.sliding_window if t == "sliding_attention" else None for t in self.layer_types
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.dim_head

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.dim_head

    def proj_shape(self, name: str) -> tuple[int, int]:
        """(d_in, d_out) of the linear map `name` in one layer."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (d, self.q_size),
            "k_proj": (d, self.kv_size),
            "v_proj": (d, self.kv_size),
            "o_proj": (self.q_size, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }[name]

    @property
    def num_params(self) -> int:
        """Parameter count, embeddings included."""
        per_layer = sum(a * b for a, b in map(self.proj_shape, LORA_TARGETS)) + 2 * self.hidden_size
        per_layer += 2 * self.dim_head * self.qk_norm + 2 * self.hidden_size * self.sandwich_norms
        per_layer += (
            self.q_size + 2 * self.kv_size
        ) * self.qkv_bias + self.hidden_size * self.o_bias
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + self.hidden_size

    @property
    def num_nonembedding_params(self) -> int:
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_params - emb


def normalize_targets(targets) -> tuple[str, ...]:
    """Maps `("q", "v")` or `("q_proj", "v_proj")` or `"all"` to canonical, ordered names.

    PEFT's names of fused modules (`FUSED_TARGETS`: Phi-3's `qkv_proj`, `gate_up_proj`) stand
    for the projections they fuse.
    """
    if targets == "all" or targets == "all-linear":
        return LORA_TARGETS
    if isinstance(targets, str):
        targets = (targets,)
    out = []
    for t in targets:
        names = _TARGET_ALIASES.get(t) or FUSED_TARGETS.get(t) or (t,)
        _require(
            all(n in LORA_TARGETS for n in names),
            f"LoRA target {t!r} is not one of {LORA_TARGETS} nor {tuple(FUSED_TARGETS)}",
        )
        out.extend(names)
    _require(len(out) > 0, "LoRA targets must not be empty")
    return tuple(t for t in LORA_TARGETS if t in out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """One client's LoRA adapter configuration (Hu et al., 2021; rsLoRA: Kalajdzievski, 2023).

    Attributes:
      rank: the client's true rank r.
      alpha: scale numerator; the update is `x @ a @ b * alpha / r` (or `alpha / sqrt(r)`).
      rslora: use `alpha / sqrt(r)`.
      targets: projections to adapt, among q/k/v/o/gate/up/down (`_proj` suffix optional), or
        PEFT's fused-module names `qkv_proj` / `gate_up_proj` for the projections they hold.
      layers: indices of adapted layers; None means all.
      max_rank: padded rank R >= rank so clients of different ranks stack; None means `rank`.
      init: `"kaiming"` (PEFT's default: `a ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`) or `"gaussian"`
        (`a ~ N(0, 1/r)`); `b` always starts at zero so a fresh adapter is a no-op.
    """

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = LORA_TARGETS
    layers: tuple[int, ...] | None = None
    max_rank: int | None = None
    init: str = "kaiming"

    def __post_init__(self):
        _require(self.rank >= 1, f"LoRAConfig.rank must be >= 1, got {self.rank}")
        require_finite("LoRAConfig", alpha=self.alpha)
        _require(
            self.max_rank is None or self.max_rank >= self.rank,
            f"LoRAConfig.max_rank={self.max_rank} is below rank={self.rank}",
        )
        _require(self.init in ("kaiming", "gaussian"), f"LoRAConfig.init={self.init!r} is unknown")
        object.__setattr__(self, "targets", normalize_targets(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))

    @property
    def padded_rank(self) -> int:
        return self.rank if self.max_rank is None else self.max_rank

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)
