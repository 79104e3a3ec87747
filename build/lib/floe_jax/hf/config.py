"""Hugging Face `config.json` to `ModelConfig` and back, for Llama, Qwen2, Qwen3, Mistral,
Gemma 3 (text; a multimodal config gives its text model), Phi-3 / Phi-4-mini and SmolLM3.

Each family is one `ModelConfig` with its fields set (`FAMILY_FIELDS`): what a family fixes is
set on the way in and checked on the way out, so a config no `config.json` can express is an
error naming the field, not a checkpoint that computes something else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from floe_jax.config import (
    ACTIVATIONS,
    ROPE_TYPES,
    ConfigError,
    ModelConfig,
    RopeScaling,
)
from floe_jax.hf.layout import CheckpointError

CONFIG_FILE = "config.json"

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
_PLAIN = dict(
    partial_rotary_factor=1.0,
    qk_norm=False,
    norm_unit_offset=False,
    sandwich_norms=False,
    query_pre_attn_scalar=None,
    scale_embeddings=False,
    rope_local_theta=None,
    nope_layers=(),
)
_GEMMA = dict(qk_norm=True, norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True)
# The `ModelConfig` fields each family fixes; the others come from `config.json`.
FAMILY_FIELDS = {
    "llama": dict(_PLAIN, sliding_window=None),
    "qwen2": dict(_PLAIN, sliding_window=None, qkv_bias=True, o_bias=False, mlp_bias=False),
    "qwen3": dict(_PLAIN, qk_norm=True, mlp_bias=False),
    "mistral": dict(_PLAIN, qkv_bias=False, o_bias=False, mlp_bias=False),
    "gemma3_text": dict(nope_layers=(), mlp_bias=False, partial_rotary_factor=1.0, **_GEMMA),
    "phi3": {
        **{k: v for k, v in _PLAIN.items() if k != "partial_rotary_factor"},
        **dict(qkv_bias=False, o_bias=False, mlp_bias=False, head_dim=None),
    },
    "smollm3": {**{k: v for k, v in _PLAIN.items() if k != "nope_layers"}, "head_dim": None},
}
# Families whose `config.json` keys differ from the defaults `config_from_hf` assumes.
_HEAD_DIM_DEFAULT = {"qwen3": 128, "gemma3_text": 256}
# what each family's transformers config class assumes when config.json leaves a key out
_WINDOW_DEFAULT = {"mistral": 4096, "gemma3_text": 4096, "qwen3": 4096}
_KV_HEADS_DEFAULT = {"gemma3_text": 4}
_TIED_DEFAULT = {"gemma3_text": True, "smollm3": True}
_MAX_POS_DEFAULT = {"phi3": 4096}
# Gemma3TextConfig's defaults (transformers 5.23) for the keys whose defaults differ from those
# `config_from_hf` assumes; the multimodal checkpoints' `text_config` leaves most keys out.
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    max_position_embeddings=131_072,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
# A Gemma 3 multimodal checkpoint (`Gemma3ForConditionalGeneration`): its text model loads.
MULTIMODAL_GEMMA3 = "gemma3"
_PHI3_ORIGINAL_MAX = 4096  # Phi3Config.original_max_position_embeddings
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


def _rope_from_hf(
    d: Mapping, source: str, model_type: str = "llama"
) -> tuple[float, RopeScaling | None, float]:
    """(rope_theta, scaling, partial_rotary_factor) from transformers 5 `rope_parameters` or
    older keys. Only Phi-3 (Phi-4-mini) takes a partial rotary factor and `longrope`."""
    if d.get("rope_parameters") is not None:
        field, rp = "rope_parameters", dict(d["rope_parameters"])
    elif d.get("rope_scaling") is not None:
        field, rp = "rope_scaling", dict(d["rope_scaling"])
    else:
        field, rp = "rope_parameters", {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config's old names
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES or (rope_type == "longrope" and model_type != "phi3"):
        supported = ROPE_TYPES if model_type == "phi3" else ROPE_TYPES[:-1]
        raise CheckpointError(
            f"{source}: {field}.rope_type={rope_type!r} is not supported for {model_type}; "
            f"supported: {supported}"
        )
    prf = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    prf = 1.0 if prf is None else prf
    if prf != 1.0 and model_type != "phi3":
        raise CheckpointError(
            f"{source}: partial_rotary_factor={prf} is not supported for {model_type} (only 1.0)"
        )
    if rope_type == "default":
        return theta, None, float(prf)
    if rope_type == "longrope":
        return theta, _longrope_from_hf(d, rp, field, source), float(prf)
    if "factor" not in rp:
        raise CheckpointError(f"{source}: {field}.factor is missing for rope_type={rope_type!r}")
    kw = {"rope_type": rope_type, "factor": float(rp["factor"])}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rp:
                raise CheckpointError(f"{source}: {field}.{key} is missing for rope_type='llama3'")
        kw["low_freq_factor"] = float(rp["low_freq_factor"])
        kw["high_freq_factor"] = float(rp["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(rp["original_max_position_embeddings"])
    return theta, RopeScaling(**kw), float(prf)


def _longrope_from_hf(d: Mapping, rp: dict, field: str, source: str) -> RopeScaling:
    """Phi-3's `longrope` scaling as transformers resolves it (`Phi3Config`,
    `_compute_longrope_parameters`): the switch point is the top-level
    `original_max_position_embeddings` (Phi3Config's default 4096), `factor` defaults to
    `max_position_embeddings / original_max_position_embeddings`, `attention_factor` to a
    function of it (`RopeScaling.attention_scaling`)."""
    for key in ("short_factor", "long_factor"):
        v = rp.get(key)
        if not isinstance(v, list | tuple) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in v
        ):
            raise CheckpointError(f"{source}: {field}.{key}={v!r} must be a list of numbers")
    orig = int(d.get("original_max_position_embeddings", _PHI3_ORIGINAL_MAX))
    if rp.get("original_max_position_embeddings", orig) != orig:
        raise CheckpointError(
            f"{source}: {field}.original_max_position_embeddings="
            f"{rp['original_max_position_embeddings']} disagrees with "
            f"original_max_position_embeddings={orig} (transformers' Phi-3 uses the latter)"
        )
    factor = rp.get("factor")
    if factor is None:
        factor = int(d.get("max_position_embeddings", _MAX_POS_DEFAULT["phi3"])) / orig
    attention = rp.get("attention_factor")
    try:
        return RopeScaling(
            rope_type="longrope",
            factor=float(factor),
            short_factor=tuple(rp["short_factor"]),
            long_factor=tuple(rp["long_factor"]),
            original_max_position_embeddings=orig,
            attention_factor=None if attention is None else float(attention),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {field}: {e}") from e


def _first_id(x):
    """Token ids may be lists (Llama 3 lists several EOS ids); ModelConfig keeps the first."""
    if isinstance(x, list | tuple):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def _layer_types(d: Mapping, model_type: str, window, n: int, source: str):
    """(sliding_window, layer_types) as each family's config class derives them."""
    if model_type in ("llama", "qwen2"):
        if model_type == "qwen2" and d.get("use_sliding_window", False):
            raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
        return None, None
    if model_type in ("mistral", "phi3"):  # one window for every layer (layer_types ignored)
        return window, None
    if model_type in ("qwen3", "smollm3") and not d.get("use_sliding_window", False):
        return None, None
    if window is None:
        return None, None
    types = d.get("layer_types")
    if types is None and model_type == "qwen3":
        first = int(d.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    elif types is None and model_type == "gemma3_text":
        every = int(d.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    elif types is None:  # smollm3: the layers without RoPE slide
        nope = _nope_layers(d, n)
        types = ["sliding_attention" if i in nope else "full_attention" for i in range(n)]
    return window, tuple(types)


def _nope_layers(d: Mapping, n: int) -> tuple[int, ...]:
    """SmolLM3's `no_rope_layers` (1 where a layer uses RoPE) as the indices of the others."""
    flags = d.get("no_rope_layers")
    if flags is None:
        every = int(d.get("no_rope_layer_interval", 4))
        flags = [int((i + 1) % every != 0) for i in range(n)]
    return tuple(i for i, f in enumerate(flags) if not f)


def _gemma_rope(d: Mapping, source: str) -> tuple[float, RopeScaling | None, float]:
    """(full-attention theta, its scaling, sliding-layer theta) of a Gemma 3 config, from
    `rope_parameters` by layer type (transformers 5) or `rope_theta` / `rope_local_base_freq`."""
    rp = d.get("rope_parameters")
    if isinstance(rp, Mapping) and "full_attention" in rp:
        full = {"rope_parameters": rp["full_attention"]}
        local = dict(rp.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(
                f"{source}: rope_parameters.sliding_attention.rope_type="
                f"{local['rope_type']!r} is not supported (only 'default')"
            )
        local_theta = float(local.get("rope_theta", 10000.0))
        full["rope_parameters"] = {"rope_theta": 1_000_000.0, **full["rope_parameters"]}
    else:
        full = {"rope_theta": 1_000_000.0, **d}
        local_theta = float(d.get("rope_local_base_freq", 10000.0))
    theta, scaling, _ = _rope_from_hf(full, source, "gemma3_text")
    return theta, scaling, local_theta


def _gemma3_text_config(d: Mapping, source: str) -> dict:
    """The text model's `config.json` of a Gemma 3 multimodal one (`MULTIMODAL_GEMMA3`): its
    `text_config`, with the head tied or not as the top level says (transformers ties
    `Gemma3ForConditionalGeneration`'s `lm_head` by the top-level `tie_word_embeddings`)."""
    text = d.get("text_config")
    if not isinstance(text, Mapping):
        raise CheckpointError(
            f"{source}: model_type='gemma3' needs a text_config object (its language model); "
            f"got text_config={text!r}"
        )
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise CheckpointError(
            f"{source}: text_config.model_type={text['model_type']!r} is not 'gemma3_text'"
        )
    dtype = text.get("dtype", text.get("torch_dtype")) or d.get("dtype", d.get("torch_dtype"))
    return {
        **text,
        "model_type": "gemma3_text",
        "tie_word_embeddings": d.get("tie_word_embeddings", True),
        "dtype": dtype,
    }


def config_from_hf(d: Mapping, *, source: str = CONFIG_FILE) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict (a family of `FAMILY_FIELDS`).

    A Gemma 3 multimodal config (`model_type="gemma3"`, `Gemma3ForConditionalGeneration`)
    gives its text model, a `gemma3_text` config from `text_config` (see `load_hf`).

    Args:
      d: the parsed `config.json`.
      source: the file name to cite in errors.

    Raises:
      CheckpointError: naming the field and `source` for anything floe_jax cannot run exactly.
    """
    model_type = d.get("model_type")
    if model_type == MULTIMODAL_GEMMA3:
        d, source = _gemma3_text_config(d, source), f"{source} text_config"
        model_type = "gemma3_text"
    if model_type not in _ARCHITECTURES:
        raise CheckpointError(
            f"{source}: model_type={model_type!r} is not supported; supported: "
            f"{(*_ARCHITECTURES, MULTIMODAL_GEMMA3)}"
        )
    if model_type == "gemma3_text":
        d = {**_GEMMA3_TEXT_DEFAULTS, **d}
    act_key = "hidden_activation" if model_type == "gemma3_text" else "hidden_act"
    act = d.get(act_key, "gelu_pytorch_tanh" if model_type == "gemma3_text" else "silu")
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"{source}: {act_key}={act!r} is not supported; supported: {ACTIVATIONS}"
        )
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(key) is not None:
            raise CheckpointError(f"{source}: {key}={d[key]} is not supported (only null)")
    if d.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention=true is not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if key not in d:
            raise CheckpointError(f"{source}: required field {key!r} is missing")
    if "num_attention_heads" not in d:
        raise CheckpointError(f"{source}: required field 'num_attention_heads' is missing")
    n = int(d["num_hidden_layers"])
    family = dict(FAMILY_FIELDS[model_type])
    if model_type == "gemma3_text":
        theta, scaling, family["rope_local_theta"] = _gemma_rope(d, source)
        family["query_pre_attn_scalar"] = float(d.get("query_pre_attn_scalar", 256))
    else:
        theta, scaling, family["partial_rotary_factor"] = _rope_from_hf(d, source, model_type)
    if model_type == "smollm3":
        family["nope_layers"] = _nope_layers(d, n)
    window = d.get("sliding_window", _WINDOW_DEFAULT.get(model_type))
    family["sliding_window"], family["layer_types"] = _layer_types(
        d, model_type, None if window is None else int(window), n, source
    )
    if model_type in ("llama", "qwen3", "gemma3_text", "smollm3"):
        family.setdefault("qkv_bias", bool(d.get("attention_bias", False)))
        family.setdefault("o_bias", bool(d.get("attention_bias", False)))
    family.setdefault("mlp_bias", bool(d.get("mlp_bias", False)))
    dtype = d.get("dtype", d.get("torch_dtype")) or "float32"
    head_dim = d.get("head_dim", _HEAD_DIM_DEFAULT.get(model_type))
    if "head_dim" in family:  # the family derives it from hidden_size / heads
        derived = int(d["hidden_size"]) // int(d["num_attention_heads"])
        if head_dim is not None and int(head_dim) != derived:
            raise CheckpointError(
                f"{source}: head_dim={head_dim} is not supported for {model_type} (it uses "
                f"hidden_size / num_attention_heads = {derived})"
            )
        head_dim = family.pop("head_dim")
    if head_dim is not None and int(head_dim) * int(d["num_attention_heads"]) == d["hidden_size"]:
        head_dim = None  # the default: keep one spelling so configs compare equal
    tied = d.get("tie_word_embeddings", _TIED_DEFAULT.get(model_type, False))
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=n,
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=d.get("num_key_value_heads", _KV_HEADS_DEFAULT.get(model_type)),
            head_dim=None if head_dim is None else int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            hidden_act=act,
            tie_word_embeddings=bool(tied),
            max_position_embeddings=int(
                d.get("max_position_embeddings", _MAX_POS_DEFAULT.get(model_type, 2048))
            ),
            dtype=_HF_DTYPES.get(str(dtype), "float32"),
            bos_token_id=_first_id(d.get("bos_token_id")),
            eos_token_id=_first_id(d.get("eos_token_id")),
            pad_token_id=_first_id(d.get("pad_token_id")),
            **family,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _check_family(cfg: ModelConfig) -> None:
    """Raises naming the first field `cfg` sets that its family's `config.json` cannot say."""
    for field, want in FAMILY_FIELDS[cfg.model_type].items():
        if getattr(cfg, field) != want:
            raise CheckpointError(
                f"{cfg.model_type} checkpoints have {field}={want!r}; this config has "
                f"{field}={getattr(cfg, field)!r}"
            )
    if cfg.model_type == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError(
            f"llama has one attention_bias flag, but qkv_bias={cfg.qkv_bias} != o_bias={cfg.o_bias}"
        )
    if cfg.qkv_bias != cfg.o_bias and cfg.model_type in ("qwen3", "gemma3_text", "smollm3"):
        raise CheckpointError(
            f"{cfg.model_type} has one attention_bias flag, but qkv_bias={cfg.qkv_bias} != "
            f"o_bias={cfg.o_bias}"
        )
    uniform = cfg.layer_types is None or len(set(cfg.layer_types)) == 1
    if cfg.model_type in ("mistral", "phi3") and not uniform:
        raise CheckpointError(
            f"{cfg.model_type} slides every layer or none; layer_types={cfg.layer_types} mixes them"
        )
    if cfg.model_type != "phi3" and cfg.rope_scaling is not None:
        if cfg.rope_scaling.rope_type == "longrope":
            raise CheckpointError(f"{cfg.model_type} checkpoints have no rope_type='longrope'")
    if cfg.model_type == "gemma3_text":
        for field in ("query_pre_attn_scalar", "rope_local_theta"):
            if getattr(cfg, field) is None:
                raise CheckpointError(f"gemma3_text checkpoints set {field}; it is None")


def _int_if_whole(x: float) -> int | float:
    """Gemma3TextConfig types `query_pre_attn_scalar` as an int; write whole values as one."""
    return int(x) if float(x).is_integer() else x


def _rope_to_hf(theta: float, sc: RopeScaling | None) -> dict:
    rope = {"rope_type": "default", "rope_theta": theta}
    if sc is not None and sc.rope_type != "default":
        rope.update(rope_type=sc.rope_type, factor=sc.factor)
        if sc.rope_type == "longrope":
            rope.update(
                short_factor=list(sc.short_factor),
                long_factor=list(sc.long_factor),
                original_max_position_embeddings=sc.original_max_position_embeddings,
            )
            if sc.attention_factor is not None:
                rope["attention_factor"] = sc.attention_factor
        if sc.rope_type == "llama3":
            rope.update(
                low_freq_factor=sc.low_freq_factor,
                high_freq_factor=sc.high_freq_factor,
                original_max_position_embeddings=sc.original_max_position_embeddings,
            )
    return rope


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` dict transformers 5 reads for `cfg` (`rope_parameters` format).

    Raises:
      CheckpointError: naming the field, when `cfg` sets something its family's config cannot
        express (a bias pattern, qk-norm on Llama, mixed layer types on Mistral, ...).
    """
    _check_family(cfg)
    types = list(
        cfg.layer_types
        or ["sliding_attention" if w else "full_attention" for w in cfg.layer_windows]
    )
    window = cfg.sliding_window if "sliding_attention" in types else None
    d = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": _rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "dtype": cfg.dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    m = cfg.model_type
    if m in ("llama", "qwen3", "gemma3_text", "smollm3"):
        d["attention_bias"] = cfg.qkv_bias
    if m in ("llama", "smollm3"):
        d["mlp_bias"] = cfg.mlp_bias
    if m == "qwen2":
        d["use_sliding_window"] = False
    if m in ("qwen3", "smollm3"):
        d.update(use_sliding_window=window is not None, sliding_window=window, layer_types=types)
    if m == "qwen3":
        d["max_window_layers"] = cfg.num_layers  # unused: layer_types says which layers slide
    if m in ("mistral", "phi3"):
        d["sliding_window"] = window
    if m == "phi3":
        d["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
        sc = cfg.rope_scaling
        longrope = sc is not None and sc.rope_type == "longrope"
        d["original_max_position_embeddings"] = (
            sc.original_max_position_embeddings if longrope else cfg.max_position_embeddings
        )
        del d["head_dim"]
    if m == "smollm3":
        d["no_rope_layers"] = [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)]
        del d["head_dim"]
    if m == "gemma3_text":
        local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
        d.update(
            hidden_activation=d.pop("hidden_act"),
            query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
            sliding_window=window,
            layer_types=types,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            use_bidirectional_attention=False,
            rope_parameters={
                "full_attention": d["rope_parameters"],
                "sliding_attention": {"rope_type": "default", "rope_theta": local},
            },
        )
    return d


def eos_ids(folder: str, tokenizer, cfg: ModelConfig) -> tuple[int, ...]:
    """Every stop id of a checkpoint: `generation_config.json`'s `eos_token_id` (an id or a
    list), the config's and the tokenizer's eos, in that order, without repeats. Instruct
    checkpoints list their turn end there (Qwen's `<|im_end|>`, Llama 3's `<|eot_id|>`), which
    the config alone does not name."""
    ids: list[int] = []
    gen = Path(folder, "generation_config.json")
    if gen.is_file():
        listed = json.loads(gen.read_text()).get("eos_token_id")
        for i in listed if isinstance(listed, list) else [listed]:
            if i is not None and not isinstance(i, int):
                raise ValueError(f"{gen}: eos_token_id {listed!r} is not an id or a list of ids")
            ids.append(i)
    ids += [cfg.eos_token_id, getattr(tokenizer, "eos_token_id", None)]
    out = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
    if not out:
        raise ValueError(f"{folder}: no eos id in generation_config.json, config or tokenizer")
    return out
