"""Hugging Face checkpoints in and out: `config.json` plus safetensors weights, without torch.

`load_hf` / `save_hf` read and write local folders only (nothing is fetched from a hub) as
transformers writes them for the `*ForCausalLM` of every family in `floe_jax.hf.config`:
`model.safetensors`, or shards `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json`. A family whose checkpoints fuse projections (Phi-3's `qkv_proj`
and `gate_up_proj`) is split into q/k/v and gate/up at load and fused again at save. Linear
weights are stored `[out, in]` there and `[in, out]` here; per-layer tensors are stacked on a
leading L axis (see `floe_jax.model`). A params leaf is addressed by its `/`-joined path
(`layers/q_proj/w`, from `flax.traverse_util.flatten_dict`), which `hf_tensor_names` maps to a
Hugging Face tensor name.

Bad input raises `CheckpointError`, whose message names the file and the tensor or field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from floe_jax.config import LORA_TARGETS, ConfigError, ModelConfig
from floe_jax.hf.config import CONFIG_FILE, MULTIMODAL_GEMMA3, config_from_hf, config_to_hf
from floe_jax.hf.layout import FUSED_TENSORS, CheckpointError, module_name, read_json
from floe_jax.model import param_shapes, stack_layers

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SEP = "/"
_NORMS = {
    "input_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
}
# Gemma 3 normalises the attention and MLP outputs too, and names its norms by their place.
_SANDWICH_NORMS = {
    "input_norm": "input_layernorm",
    "attn_out_norm": "post_attention_layernorm",
    "post_norm": "pre_feedforward_layernorm",
    "mlp_out_norm": "post_feedforward_layernorm",
}


def hf_tensor_names(cfg: ModelConfig | None = None) -> dict[str, str]:
    """{params path: Hugging Face tensor name} for every leaf `cfg` can have (Llama's layout
    when `cfg` is None).

    Paths are `/`-joined params keys (`layers/q_proj/w`). Names of per-layer leaves are
    templates with an `{i}` field for the layer index (`model.layers.{i}.self_attn.q_proj.weight`).
    A projection a family fuses is named by its fused tensor (see `fused_rows`).
    """
    names = {
        "embed": "model.embed_tokens.weight",
        "norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }
    norms = dict(_NORMS)
    if cfg is not None and cfg.sandwich_norms:
        norms.update(_SANDWICH_NORMS)
    for key, norm in norms.items():
        names[f"layers/{key}"] = f"model.layers.{{i}}.{norm}.weight"
    fused = {} if cfg is None else FUSED_TENSORS.get(cfg.model_type, {})
    owner = {m: f for f, parts in fused.items() for m in parts}
    for m in LORA_TARGETS:
        module = module_name(owner.get(m, m), "{i}")
        names[f"layers/{m}/w"] = module + ".weight"
        names[f"layers/{m}/b"] = module + ".bias"
    return names


def fused_rows(cfg: ModelConfig, path: str) -> tuple[int, int, int] | None:
    """For a params leaf stored inside a fused tensor (`layers/k_proj/w` in Phi-3's `qkv_proj`),
    `(start, stop, total)`: its rows of the fused tensor's output axis; None for other leaves."""
    parts = path.split(_SEP)
    for group in FUSED_TENSORS.get(cfg.model_type, {}).values():
        if len(parts) == 3 and parts[1] in group:
            outs = [cfg.proj_shape(m)[1] for m in group]
            start = sum(outs[: group.index(parts[1])])
            return start, start + cfg.proj_shape(parts[1])[1], sum(outs)
    return None


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
        with open_safetensors(folder / file) as f:
            for name in f.keys():
                weight_map.setdefault(name, file)
    return weight_map, files


def open_safetensors(path: Path):
    """`safetensors.safe_open(path)` (numpy), whose failure on a truncated, empty or garbage
    file is a `CheckpointError` naming the file (safetensors' own message names none)."""
    try:
        return safetensors.safe_open(path, framework="numpy")
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def get_tensor(handle, name: str, path: Path) -> np.ndarray:
    """`handle.get_tensor(name)`; a tensor that cannot be read is a `CheckpointError` naming it
    and the file."""
    try:
        return handle.get_tensor(name)
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"tensor {name!r} in {path} cannot be read ({e})") from e


def _tensor_reader(folder: Path, stack: contextlib.ExitStack):
    """`(read, weight_map)`: `read(name) -> (array, file)` over the folder's safetensors, each
    file opened once, and `{tensor name: file}` of every tensor the folder holds."""
    weight_map, searched = _weight_map(folder)
    handles = {}

    def read(name: str) -> tuple[np.ndarray, str]:
        if name not in weight_map:
            raise CheckpointError(f"tensor {name!r} is missing; searched {searched} in {folder}")
        file = weight_map[name]
        if file not in handles:
            f = stack.enter_context(open_safetensors(folder / file))
            handles[file] = f, set(f.keys())
        handle, holds = handles[file]
        if name not in holds:  # the index names a tensor its shard lacks
            raise CheckpointError(
                f"tensor {name!r} is missing from {file} (named there by {INDEX_FILE})"
            )
        return get_tensor(handle, name, folder / file), file

    return read, weight_map


# Tensors a checkpoint may hold that the config determines: RoPE's inverse frequencies, which
# older transformers saved as a buffer of every attention layer.
_DERIVED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# Where a Gemma 3 multimodal checkpoint keeps its language model: (the text model's `model.`,
# its `lm_head.`) as transformers 5 saves it, and as the published checkpoints hold it (which
# transformers renames at load, `conversion_mapping.py`'s "llava" rules).
_MULTIMODAL_TEXT = (
    ("model.language_model.", "lm_head."),
    ("language_model.model.", "language_model.lm_head."),
)
# ... and the parts floe_jax does not run: the vision tower and its projector into the text model.
_MULTIMODAL_VISION = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def _text_model_names(names: dict[str, str], weight_map: dict, source: str) -> dict[str, str]:
    """`hf_tensor_names` as a Gemma 3 multimodal checkpoint names its language model."""
    for body, head in _MULTIMODAL_TEXT:
        if any(n.startswith(body) for n in weight_map):
            return {
                k: body + v.removeprefix("model.") if v.startswith("model.") else
                head + v.removeprefix("lm_head.")
                for k, v in names.items()
            }  # fmt: skip
    raise CheckpointError(
        f"{source}: model_type='gemma3', but the checkpoint holds no language model tensor "
        f"({' or '.join(b + '*' for b, _ in _MULTIMODAL_TEXT)})"
    )


def _unaccounted(name: str, file: str, cfg: ModelConfig, source: str) -> CheckpointError:
    """The error for a checkpoint tensor that `cfg` has no place for: loading it would drop it
    silently, and with it whatever it computes."""
    layer = _LAYER.match(name)
    if layer and int(layer[1]) >= cfg.num_layers:
        why = f"layer {layer[1]} is past num_hidden_layers={cfg.num_layers}"
    elif name.endswith(".bias") and (".self_attn." in name or ".mlp." in name):
        why = "the config disables this bias (attention_bias / o_bias / mlp_bias)"
    else:
        why = f"it is not a parameter of a {cfg.model_type} model"
    return CheckpointError(f"tensor {name!r} in {file} is not accounted for by {source}: {why}")


def _checked(read, name: str, shape: tuple, path: str, rows=None) -> np.ndarray:
    """Reads one tensor, checks its shape in HF layout, returns it in floe layout (`rows`: the
    leaf's `fused_rows` inside a fused tensor)."""
    arr, file = read(name)
    transpose = _transposed(path)
    hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
    if rows is not None:
        hf_shape = (rows[2], *hf_shape[1:])
    if tuple(arr.shape) != hf_shape:
        raise CheckpointError(
            f"tensor {name!r} in {file} has shape {tuple(arr.shape)}, expected {hf_shape}"
        )
    if rows is not None:
        arr = arr[rows[0] : rows[1]]
    return arr.T if transpose else arr


def load_hf(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Loads a local Hugging Face checkpoint folder of a family in `floe_jax.hf.config`.

    Args:
      path: folder with `config.json` and `model.safetensors` (or shards plus
        `model.safetensors.index.json`). A Gemma 3 multimodal checkpoint
        (`Gemma3ForConditionalGeneration`) loads as its text model: the language model's
        tensors (`model.language_model.*`, or `language_model.model.*` as the published
        checkpoints name them) and its head; the vision tower and projector are not loaded.
        `save_hf` then writes a text-only `Gemma3ForCausalLM`.
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
    raw = read_json(cfg_path)
    cfg = config_from_hf(raw, source=str(cfg_path))
    multimodal = raw.get("model_type") == MULTIMODAL_GEMMA3
    if dtype is not None:
        try:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
    np_dtype = np.dtype(jnp.dtype(cfg.dtype))
    names = hf_tensor_names(cfg)
    flat = {}
    with contextlib.ExitStack() as stack:
        read, weight_map = _tensor_reader(folder, stack)
        if multimodal:
            names = _text_model_names(names, weight_map, str(cfg_path))
        used = set()
        for path, shape in _param_shapes(cfg):
            name = names[path]
            layer_names = [name.format(i=i) for i in range(shape[0])]
            if path.startswith("layers/"):
                rows = fused_rows(cfg, path)
                arr = np.stack([_checked(read, n, shape[1:], path, rows) for n in layer_names])
                used.update(layer_names)
            else:
                arr = _checked(read, name, shape, path)
                used.add(name)
            flat[path] = jnp.asarray(arr.astype(np_dtype))
        for name in sorted(set(weight_map) - used):
            if _DERIVED.match(name) or (multimodal and _MULTIMODAL_VISION.match(name)):
                continue
            if name == names["lm_head"] and cfg.tie_word_embeddings:
                _check_tied_head(read, name, names["embed"], str(cfg_path))
                continue
            raise _unaccounted(name, weight_map[name], cfg, str(cfg_path))
    return cfg, traverse_util.unflatten_dict(flat, sep=_SEP)


def _check_tied_head(read, name: str, embed_name: str, source: str) -> None:
    """A checkpoint of tied embeddings may still store the head; it must be the embedding."""
    (arr, file), (embed, _) = read(name), read(embed_name)
    if arr.shape != embed.shape or not np.array_equal(arr, embed):
        raise CheckpointError(
            f"tensor {name!r} in {file} differs from the input embedding, but {source} sets "
            "tie_word_embeddings=true (the head would be dropped)"
        )


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
    names = hf_tensor_names(cfg)
    out: dict[str, np.ndarray] = {}
    fused_parts: dict[str, list] = {}
    for leaf, shape in _param_shapes(cfg):
        if leaf not in flat_params:
            raise CheckpointError(f"params has no leaf {leaf}")
        arr = np.asarray(jax.device_get(flat_params[leaf]))
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"params leaf {leaf} has shape {arr.shape}, expected {shape}")
        if _transposed(leaf):
            arr = np.swapaxes(arr, -1, -2)
        if fused_rows(cfg, leaf) is not None:  # concatenated below, in the group's order
            fused_parts.setdefault(names[leaf], []).append((fused_rows(cfg, leaf)[0], arr))
        elif leaf.startswith("layers/"):
            out.update({names[leaf].format(i=i): arr[i] for i in range(shape[0])})
        else:
            out[names[leaf]] = arr
    for name, parts in fused_parts.items():
        stacked = np.concatenate([a for _, a in sorted(parts, key=lambda p: p[0])], axis=-2)
        out.update({name.format(i=i): stacked[i] for i in range(cfg.num_layers)})
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
