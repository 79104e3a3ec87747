"""Hugging Face checkpoints in and out: `config.json` plus safetensors weights, without torch.

`load_hf` / `save_hf` read and write local folders only (nothing is fetched from a hub) as
transformers writes them for `LlamaForCausalLM` and `Qwen2ForCausalLM`: `model.safetensors`, or
shards `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`. Linear weights are
stored `[out, in]` there and `[in, out]` here; per-layer tensors are stacked on a leading L axis
(see `floe_jax.model`). A params leaf is addressed by its `/`-joined path (`layers/q_proj/w`, from
`flax.traverse_util.flatten_dict`), which `hf_tensor_names` maps to a Hugging Face tensor name.

Bad input raises `CheckpointError`, whose message names the file and the tensor or field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from floe_jax.config import LORA_TARGETS, ConfigError, ModelConfig
from floe_jax.hf.config import (
    CONFIG_FILE,
    CheckpointError,
    config_from_hf,
    config_to_hf,
    module_name,
    read_json,
)
from floe_jax.model import param_shapes, stack_layers

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SEP = "/"
_NORMS = {"input_norm": "input_layernorm", "post_norm": "post_attention_layernorm"}


def hf_tensor_names() -> dict[str, str]:
    """{params path: Hugging Face tensor name} for every leaf any config can have.

    Paths are `/`-joined params keys (`layers/q_proj/w`). Names of per-layer leaves are
    templates with an `{i}` field for the layer index (`model.layers.{i}.self_attn.q_proj.weight`).
    """
    names = {
        "embed": "model.embed_tokens.weight",
        "norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }
    for key, norm in _NORMS.items():
        names[f"layers/{key}"] = f"model.layers.{{i}}.{norm}.weight"
    for m in LORA_TARGETS:
        names[f"layers/{m}/w"] = module_name(m, "{i}") + ".weight"
        names[f"layers/{m}/b"] = module_name(m, "{i}") + ".bias"
    return names


def _param_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of every params leaf of `cfg`, sorted by path."""
    return sorted(traverse_util.flatten_dict(param_shapes(cfg), sep=_SEP).items())


def _transposed(path: str) -> bool:
    """Whether the leaf is stored transposed by Hugging Face (linear weights and the lm_head)."""
    return path == "lm_head" or (path.startswith("layers/") and path.endswith("/w"))


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


def _checked(read, name: str, shape: tuple, path: str) -> np.ndarray:
    """Reads one tensor, checks its shape in HF layout, returns it in floe layout."""
    arr, file = read(name)
    transpose = _transposed(path)
    hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
    if tuple(arr.shape) != hf_shape:
        raise CheckpointError(
            f"tensor {name!r} in {file} has shape {tuple(arr.shape)}, expected {hf_shape}"
        )
    return arr.T if transpose else arr


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
    cfg = config_from_hf(read_json(cfg_path), source=str(cfg_path))
    if dtype is not None:
        try:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
    np_dtype = np.dtype(jnp.dtype(cfg.dtype))
    names = hf_tensor_names()
    flat = {}
    with contextlib.ExitStack() as stack:
        read = _tensor_reader(folder, stack)
        for path, shape in _param_shapes(cfg):
            name = names[path]
            if path.startswith("layers/"):
                arr = np.stack(
                    [_checked(read, name.format(i=i), shape[1:], path) for i in range(shape[0])]
                )
            else:
                arr = _checked(read, name, shape, path)
            flat[path] = jnp.asarray(arr.astype(np_dtype))
    return cfg, traverse_util.unflatten_dict(flat, sep=_SEP)


# ----------------------------------------------------------------------------- saving


def write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Writes `tensors` as transformers and PEFT do (contiguous, `format: pt` metadata)."""
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
    flat_params = traverse_util.flatten_dict(stack_layers(params, cfg), sep=_SEP)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    names = hf_tensor_names()
    out: dict[str, np.ndarray] = {}
    for leaf, shape in _param_shapes(cfg):
        if leaf not in flat_params:
            raise CheckpointError(f"params has no leaf {leaf}")
        arr = np.asarray(jax.device_get(flat_params[leaf]))
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"params leaf {leaf} has shape {arr.shape}, expected {shape}")
        if _transposed(leaf):
            arr = np.swapaxes(arr, -1, -2)
        if leaf.startswith("layers/"):
            out.update({names[leaf].format(i=i): arr[i] for i in range(shape[0])})
        else:
            out[names[leaf]] = arr
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
        write_safetensors(out, folder / WEIGHTS_FILE)
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
        write_safetensors(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in out.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
