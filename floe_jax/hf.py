"""Hugging Face checkpoints in and out, and PEFT LoRA adapters in and out.

Reads and writes local folders only (nothing is fetched from a hub), without torch:

- `load_hf` / `save_hf`: `config.json` plus `model.safetensors`, or shards
  `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, as transformers writes for
  `LlamaForCausalLM` and `Qwen2ForCausalLM`. Linear weights are stored `[out, in]` there and
  `[in, out]` here; per-layer tensors are stacked on a leading L axis (see `floe_jax.model`).
- `save_peft` / `load_peft`: `adapter_config.json` plus `adapter_model.safetensors` as PEFT writes
  them (Hu et al., 2021, "LoRA"; rsLoRA: Kalajdzievski, 2023): `lora_A.weight [r, in]`,
  `lora_B.weight [out, r]`, scale `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`).

Bad input raises `CheckpointError`, whose message names the file and the tensor or field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from floe_jax.config import (
    LORA_TARGETS,
    ROPE_TYPES,
    ConfigError,
    ModelConfig,
    RopeScaling,
    normalize_targets,
)
from floe_jax.lora import LoRA
from floe_jax.model import param_shapes, stack_layers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_SUBMODULE = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_NORMS = {"input_norm": "input_layernorm", "post_norm": "post_attention_layernorm"}
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


class CheckpointError(ValueError):
    """A checkpoint or adapter folder is unusable; the message names the file, tensor or field."""


# ----------------------------------------------------------------------------- config


def _rope_from_hf(d: Mapping, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5 `rope_parameters` or older keys."""
    if d.get("rope_parameters") is not None:
        field, rp = "rope_parameters", dict(d["rope_parameters"])
    elif d.get("rope_scaling") is not None:
        field, rp = "rope_scaling", dict(d["rope_scaling"])
    else:
        field, rp = "rope_parameters", {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: {field}.rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}"
        )
    prf = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise CheckpointError(f"{source}: partial_rotary_factor={prf} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
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
    return theta, RopeScaling(**kw)


def _first_id(x):
    """Token ids may be lists (Llama 3 lists several EOS ids); ModelConfig keeps the first."""
    if isinstance(x, list | tuple):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def config_from_hf(d: Mapping, *, source: str = CONFIG_FILE) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face `config.json` dict (Llama or Qwen2).

    Args:
      d: the parsed `config.json`.
      source: the file name to cite in errors.

    Raises:
      CheckpointError: naming the field and `source` for anything floe_jax cannot run exactly.
    """
    model_type = d.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise CheckpointError(
            f"{source}: model_type={model_type!r} is not supported; "
            f"supported: {tuple(_ARCHITECTURES)}"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    if model_type == "qwen2" and d.get("use_sliding_window", False):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if key not in d:
            raise CheckpointError(f"{source}: required field {key!r} is missing")
    if "num_attention_heads" not in d:
        raise CheckpointError(f"{source}: required field 'num_attention_heads' is missing")
    theta, scaling = _rope_from_hf(d, source)
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(d.get("attention_bias", False))
        mlp_bias = bool(d.get("mlp_bias", False))
    dtype = d.get("dtype", d.get("torch_dtype")) or "float32"
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) * int(d["num_attention_heads"]) == d["hidden_size"]:
        head_dim = None  # the default: keep one spelling so configs compare equal
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=d.get("num_key_value_heads"),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            dtype=_HF_DTYPES.get(str(dtype), "float32"),
            bos_token_id=_first_id(d.get("bos_token_id")),
            eos_token_id=_first_id(d.get("eos_token_id")),
            pad_token_id=_first_id(d.get("pad_token_id")),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` dict transformers 5 reads for `cfg` (`rope_parameters` format).

    Raises:
      CheckpointError: when the bias pattern has no Hugging Face equivalent (Llama ties q/k/v/o
        bias to one `attention_bias` flag; Qwen2 always has q/k/v bias and no o/mlp bias).
    """
    if cfg.model_type == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError(
            f"llama has one attention_bias flag, but qkv_bias={cfg.qkv_bias} != o_bias={cfg.o_bias}"
        )
    if cfg.model_type == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise CheckpointError(
            "qwen2 needs qkv_bias=True, o_bias=False, mlp_bias=False; got "
            f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}"
        )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    sc = cfg.rope_scaling
    if sc is not None and sc.rope_type != "default":
        rope.update(rope_type=sc.rope_type, factor=sc.factor)
        if sc.rope_type == "llama3":
            rope.update(
                low_freq_factor=sc.low_freq_factor,
                high_freq_factor=sc.high_freq_factor,
                original_max_position_embeddings=sc.original_max_position_embeddings,
            )
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
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "dtype": cfg.dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if cfg.model_type == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        d.update(use_sliding_window=False)
    return d


# ----------------------------------------------------------------------------- tensor names


def _hf_names(cfg: ModelConfig) -> dict:
    """A params-shaped tree of HF tensor names; per-layer leaves are functions `layer -> name`."""
    layers: dict = {k: (lambda i, n=n: f"model.layers.{i}.{n}.weight") for k, n in _NORMS.items()}
    for m in LORA_TARGETS:
        base = lambda i, m=m: f"model.layers.{i}.{_SUBMODULE[m]}.{m}"
        layers[m] = {"w": lambda i, base=base: base(i) + ".weight"}
        layers[m]["b"] = lambda i, base=base: base(i) + ".bias"
    return {
        "embed": "model.embed_tokens.weight",
        "norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
        "layers": layers,
    }


def _flat_params(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(path, shape) of every params leaf of `cfg`, in a fixed order."""
    out = []

    def walk(tree, path):
        for k in sorted(tree):
            if isinstance(tree[k], dict):
                walk(tree[k], (*path, k))
            else:
                out.append(((*path, k), tuple(tree[k])))

    walk(param_shapes(cfg), ())
    return out


def _lookup(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _is_linear_weight(path: tuple[str, ...]) -> bool:
    return len(path) == 3 and path[0] == "layers" and path[2] == "w"


# ----------------------------------------------------------------------------- loading


def _weight_map(folder: Path) -> tuple[dict[str, str], list[str]]:
    """({tensor name: file}, files searched) from the index, `model.safetensors`, or every
    `*.safetensors` in the folder."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(
                    f"{index} names shard {shard!r}, which is missing from {folder}"
                )
        return weight_map, [INDEX_FILE, *shards]
    if (folder / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {others}; only safetensors is supported)" if others else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights{hint}")
    weight_map = {}
    for file in files:
        with safetensors.safe_open(folder / file, framework="numpy") as f:
            for name in f.keys():
                weight_map.setdefault(name, file)
    return weight_map, files


def _tensor_reader(folder: Path, stack: contextlib.ExitStack):
    """`read(name) -> (array, file)` over the folder's safetensors, each file opened once."""
    weight_map, searched = _weight_map(folder)
    handles = {}

    def read(name: str) -> tuple[np.ndarray, str]:
        if name not in weight_map:
            raise CheckpointError(f"tensor {name!r} is missing; searched {searched} in {folder}")
        file = weight_map[name]
        if file not in handles:
            handles[file] = stack.enter_context(
                safetensors.safe_open(folder / file, framework="numpy")
            )
        try:
            return handles[file].get_tensor(name), file
        except safetensors.SafetensorError as e:  # the index names a tensor its shard lacks
            raise CheckpointError(
                f"tensor {name!r} is missing from {file} (named there by {INDEX_FILE})"
            ) from e

    return read


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def load_hf(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Loads a local Hugging Face Llama / Qwen2 checkpoint folder.

    Args:
      path: folder with `config.json` and `model.safetensors` (or shards plus
        `model.safetensors.index.json`).
      dtype: `"float32"` or `"bfloat16"` to cast every param to; defaults to the checkpoint's
        `dtype` (float16 checkpoints load as float32).

    Returns:
      `(cfg, params)` with params in the layout of `floe_jax.model` (weights `[in, out]`, layers
      stacked on a leading L axis; no `lm_head` when embeddings are tied).

    Raises:
      CheckpointError: missing folder, config or tensor, unsupported config, wrong shape.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing")
    cfg = config_from_hf(_read_json(cfg_path), source=str(cfg_path))
    if dtype is not None:
        try:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
    np_dtype = np.dtype(jnp.dtype(cfg.dtype))
    names = _hf_names(cfg)
    params: dict = {}
    with contextlib.ExitStack() as stack:
        read = _tensor_reader(folder, stack)
        for leaf_path, shape in _flat_params(cfg):
            name = _lookup(names, leaf_path)
            if leaf_path[0] == "layers":
                arr = np.stack(
                    [_checked(read, name(i), shape[1:], leaf_path) for i in range(shape[0])]
                )
            else:
                arr = _checked(read, name, shape, leaf_path)
            node = params
            for k in leaf_path[:-1]:
                node = node.setdefault(k, {})
            node[leaf_path[-1]] = jnp.asarray(arr.astype(np_dtype))
    return cfg, params


def _checked(read, name: str, shape: tuple, leaf_path: tuple) -> np.ndarray:
    """Reads one tensor, checks its shape in HF layout, returns it in floe layout."""
    arr, file = read(name)
    transpose = _is_linear_weight(leaf_path) or leaf_path == ("lm_head",)
    hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
    if tuple(arr.shape) != hf_shape:
        raise CheckpointError(
            f"tensor {name!r} in {file} has shape {tuple(arr.shape)}, expected {hf_shape}"
        )
    return arr.T if transpose else arr


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a local folder, via `transformers.AutoTokenizer` (no hub access)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# ----------------------------------------------------------------------------- saving


def _write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(path),
        metadata={"format": "pt"},
    )


def save_hf(
    cfg: ModelConfig,
    params: dict,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Args:
      cfg: the model config.
      params: params of `cfg` (any dtype; written as they are), canonical or in the decode
        layout of `unstack_layers`.
      path: output folder (created).
      max_shard_bytes: when set, tensors are split into shards of at most this many bytes (a
        tensor larger than that gets a shard of its own) with `model.safetensors.index.json`.
    """
    params = stack_layers(params, cfg)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    names = _hf_names(cfg)
    out: dict[str, np.ndarray] = {}
    for leaf_path, shape in _flat_params(cfg):
        try:
            arr = np.asarray(jax.device_get(_lookup(params, leaf_path)))
        except KeyError as e:
            raise CheckpointError(f"params has no leaf {'/'.join(leaf_path)}") from e
        if tuple(arr.shape) != shape:
            raise CheckpointError(
                f"params leaf {'/'.join(leaf_path)} has shape {arr.shape}, expected {shape}"
            )
        transpose = _is_linear_weight(leaf_path) or leaf_path == ("lm_head",)
        name = _lookup(names, leaf_path)
        if leaf_path[0] == "layers":
            for i in range(shape[0]):
                out[name(i)] = arr[i].T if transpose else arr[i]
        else:
            out[name] = arr.T if transpose else arr
    hf = config_to_hf(cfg)
    hf["dtype"] = str(np.dtype(out["model.embed_tokens.weight"].dtype))
    (folder / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    # weights of an earlier save here would shadow or mix with these ones
    for old in [
        folder / WEIGHTS_FILE,
        folder / INDEX_FILE,
        *folder.glob("model-*-of-*.safetensors"),
    ]:
        old.unlink(missing_ok=True)
    if max_shard_bytes is None:
        _write_safetensors(out, folder / WEIGHTS_FILE)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(out):
        nbytes = out[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = out[name]
        size += nbytes
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        _write_safetensors(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in out.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------- PEFT adapters

_PEFT_KEY = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
# adapter_config.json fields whose non-default value changes the computation; floe_jax refuses
# them rather than load something that computes differently.
_PEFT_UNSUPPORTED = (
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "lora_bias",
    "fan_in_fan_out",
)

# initialisations that also rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA): such an
# adapter is only right on top of the rewritten base, which floe_jax does not have.
_PEFT_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")


def save_peft(
    lora: LoRA,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    rslora: bool = False,
    alpha: float | None = None,
) -> None:
    """Writes one client's adapter as PEFT does, for `peft.PeftModel.from_pretrained`.

    Only live slots are written: the true rank r is the largest live slot count over targets and
    layers (a (target, layer) with fewer live slots is zero-padded to r, which PEFT computes the
    same); targets with no live slot are dropped, and `layers_to_transform` lists the live layers
    when not all are. `lora_alpha` is chosen so that PEFT's scale equals `lora.scale` exactly:
    `alpha` when given (checked), else `scale * r` (or `scale * sqrt(r)` with `rslora`).

    Args:
      lora: one client's adapter (no client axis).
      cfg: the base model config.
      out_dir: output folder (created).
      base_model_name_or_path: written to `adapter_config.json`.
      rslora: write `use_rslora=true` (scale `alpha / sqrt(r)`).
      alpha: the client's `lora_alpha`; must agree with `lora.scale` at the true rank.
    """
    if np.ndim(lora.scale) != 0:
        raise CheckpointError(
            f"save_peft takes one client's adapter; got scale of shape {np.shape(lora.scale)}"
        )
    scale = float(lora.scale)
    masks = {m: np.asarray(lora.mask[m]) > 0 for m in lora.a}
    live_targets = [m for m in LORA_TARGETS if m in masks and masks[m].any()]
    if not live_targets:
        raise CheckpointError("save_peft: the adapter has no live rank slot")
    r = max(int(masks[m].sum(-1).max()) for m in live_targets)
    live_layers = sorted({int(i) for m in live_targets for i in np.nonzero(masks[m].any(-1))[0]})
    denom = math.sqrt(r) if rslora else r
    if alpha is None:
        alpha = scale * denom
        if abs(alpha - round(alpha)) < 1e-6 * max(1.0, abs(alpha)):
            alpha = round(alpha)
    elif not math.isclose(alpha / denom, scale, rel_tol=1e-6):
        raise CheckpointError(
            f"save_peft: lora_alpha={alpha} at rank {r} (rslora={rslora}) gives scale "
            f"{alpha / denom}, but the adapter's scale is {scale}"
        )
    tensors = {}
    for m in live_targets:
        a = np.asarray(lora.a[m], np.float32)
        b = np.asarray(lora.b[m], np.float32)
        mask = np.asarray(lora.mask[m], np.float32)
        d_in, d_out = cfg.proj_shape(m)
        for i in live_layers:
            slots = np.nonzero(mask[i] > 0)[0]
            a_out = np.zeros((r, d_in), np.float32)
            b_out = np.zeros((d_out, r), np.float32)
            a_out[: len(slots)] = (a[i][:, slots] * mask[i][slots]).T
            b_out[:, : len(slots)] = b[i][slots, :].T
            prefix = f"base_model.model.model.layers.{i}.{_SUBMODULE[m]}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = a_out
            tensors[f"{prefix}.lora_B.weight"] = b_out
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": bool(rslora),
        "target_modules": live_targets,
        "layers_to_transform": None if len(live_layers) == cfg.num_layers else live_layers,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    _write_safetensors(tensors, folder / ADAPTER_WEIGHTS_FILE)


def load_peft(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    *,
    max_rank: int | None = None,
    targets: tuple[str, ...] | None = None,
) -> LoRA:
    """Reads a PEFT LoRA adapter folder into a `LoRA` padded to `max_rank`.

    Args:
      out_dir: folder with `adapter_config.json` and `adapter_model.safetensors`.
      cfg: the base model config the adapter was trained on.
      max_rank: padded rank R (>= the adapter's r); defaults to r.
      targets: tree targets, a superset of the adapter's, so adapters with different targets
        share one structure (as `init_lora(targets=...)`); defaults to the adapter's targets.

    Raises:
      CheckpointError: missing files, unsupported PEFT settings (the field is named), tensors
        that do not fit `cfg` (the tensor is named).
    """
    folder = Path(out_dir)
    cfg_path, w_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} does not exist")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing")
    pc = _read_json(cfg_path)
    if pc.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type={pc.get('peft_type')!r} is not 'LORA'")
    for key in _PEFT_UNSUPPORTED:
        if pc.get(key) not in (None, False, {}, []):
            raise CheckpointError(f"{cfg_path}: {key}={pc[key]!r} is not supported")
    init = pc.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_PEFT_BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{cfg_path}: init_lora_weights={init!r} adapters expect a modified base model; "
            "convert them to plain LoRA with PEFT first"
        )
    if pc.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: bias={pc['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        if key not in pc:
            raise CheckpointError(f"{cfg_path}: required field {key!r} is missing")
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    scale = alpha / (math.sqrt(r) if pc.get("use_rslora", False) else r)
    r_pad = r if max_rank is None else int(max_rank)
    if r_pad < r:
        raise CheckpointError(f"max_rank={r_pad} is below the adapter's r={r} ({cfg_path})")
    if not w_path.is_file():
        hint = (
            " (adapter_model.bin is not supported)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise CheckpointError(f"{w_path} is missing{hint}")

    found: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    with safetensors.safe_open(w_path, framework="numpy") as f:
        for key in f.keys():
            match = _PEFT_KEY.match(key)
            if match is None:
                raise CheckpointError(f"tensor {key!r} in {w_path} is not a supported LoRA weight")
            layer, sub, m, ab = int(match[1]), match[2], match[3], match[4]
            if _SUBMODULE.get(m) != sub:
                raise CheckpointError(f"tensor {key!r} in {w_path}: unknown module {sub}.{m}")
            if not 0 <= layer < cfg.num_layers:
                raise CheckpointError(
                    f"tensor {key!r} in {w_path}: layer {layer} is outside [0, {cfg.num_layers})"
                )
            d_in, d_out = cfg.proj_shape(m)
            expected = (r, d_in) if ab == "A" else (d_out, r)
            arr = f.get_tensor(key)
            if tuple(arr.shape) != expected:
                raise CheckpointError(
                    f"tensor {key!r} in {w_path} has shape {tuple(arr.shape)}, expected {expected}"
                )
            found.setdefault((m, layer), {})[ab] = arr.astype(np.float32)
    for (m, layer), ab in found.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise CheckpointError(f"{w_path}: lora_{missing} of layer {layer} {m} is missing")
    file_targets = tuple(t for t in LORA_TARGETS if any(k[0] == t for k in found))
    if not file_targets:
        raise CheckpointError(f"{w_path} holds no LoRA weights")
    tree_targets = file_targets
    if targets is not None:
        tree_targets = normalize_targets(targets)
        extra = set(file_targets) - set(tree_targets)
        if extra:
            raise CheckpointError(
                f"{w_path} adapts {sorted(extra)}, which are not in targets={tree_targets}"
            )
    L = cfg.num_layers
    a, b, mask = {}, {}, {}
    for m in tree_targets:
        d_in, d_out = cfg.proj_shape(m)
        a_m = np.zeros((L, d_in, r_pad), np.float32)
        b_m = np.zeros((L, r_pad, d_out), np.float32)
        mask_m = np.zeros((L, r_pad), np.float32)
        for layer in range(L):
            if (m, layer) in found:
                a_m[layer, :, :r] = found[(m, layer)]["A"].T
                b_m[layer, :r, :] = found[(m, layer)]["B"].T
                mask_m[layer, :r] = 1.0
        a[m], b[m], mask[m] = jnp.asarray(a_m), jnp.asarray(b_m), jnp.asarray(mask_m)
    return LoRA(a=a, b=b, mask=mask, scale=jnp.asarray(scale, jnp.float32))


__all__ = [
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "load_peft",
    "load_tokenizer",
    "save_hf",
    "save_peft",
]
