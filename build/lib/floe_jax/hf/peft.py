"""PEFT LoRA adapters in and out, as `peft.PeftModel.from_pretrained` reads and `save_pretrained`
writes them, without torch.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (Hu et al., 2021, "LoRA";
rsLoRA: Kalajdzievski, 2023): per adapted projection `lora_A.weight [r, in]` and
`lora_B.weight [out, r]`, scale `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`). Modules
are named as the family names them: Phi-3's adapters sit on its fused `qkv_proj` and
`gate_up_proj`, which load as q/k/v (and gate/up) adapters sharing one A (see `_peft_blocks`).
floe_jax's `LoRA` keeps `a [L, in, R]` and `b [L, R, out]` padded to R with a rank mask; the
conversion writes only live slots and pads on the way back in.

Bad input raises `CheckpointError`, whose message names the file and the tensor or field.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from floe_jax.config import LORA_TARGETS, ModelConfig, normalize_targets
from floe_jax.hf.checkpoint import get_tensor, open_safetensors, write_safetensors
from floe_jax.hf.layout import (
    FUSED_TENSORS,
    PROJ_SUBMODULE,
    CheckpointError,
    hf_module,
    module_name,
    read_json,
)
from floe_jax.lora import LoRA

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT prefixes the base model's module path (`base_model.model.`) and may name the adapter
# (`lora_A.default.weight`); floe_jax accepts any prefix and adapter name.
_PEFT_KEY = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_PEFT_PREFIX = "base_model.model."
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

# PEFT's `target_modules` when a config has none (its default for Llama and Qwen2) and its
# shorthand for every linear layer but the output head.
_PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")
_PEFT_ALL_LINEAR = "all-linear"

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
    `alpha` when given (checked), else `scale * r` (or `scale * sqrt(r)` with `rslora`). A fused
    module whose parts have different A's is written block-diagonally (`_peft_blocks`) at a
    larger r, with `lora_alpha` rescaled to keep the scale.

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
    if not math.isfinite(scale):
        raise CheckpointError(f"save_peft: the adapter's scale is {scale}, not a finite number")
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
    blocks = _peft_blocks(lora, cfg, live_targets, live_layers)
    r_file = max(a_out.shape[0] for a_out, _ in blocks.values())
    if r_file != r:  # block-diagonal fused modules: the same scale at the written rank
        alpha = scale * (math.sqrt(r_file) if rslora else r_file)
        alpha = round(alpha) if abs(alpha - round(alpha)) < 1e-6 * max(1.0, alpha) else alpha
    tensors = {}
    for (module, i), (a_out, b_out) in blocks.items():
        prefix = _PEFT_PREFIX + module_name(module, i)
        tensors[f"{prefix}.lora_A.weight"] = np.pad(a_out, ((0, r_file - a_out.shape[0]), (0, 0)))
        tensors[f"{prefix}.lora_B.weight"] = np.pad(b_out, ((0, 0), (0, r_file - b_out.shape[1])))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_file,
        "lora_alpha": alpha,
        "use_rslora": bool(rslora),
        "target_modules": list(dict.fromkeys(hf_module(cfg, m) for m in live_targets)),
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
    write_safetensors(tensors, folder / ADAPTER_WEIGHTS_FILE)


def _peft_blocks(lora: LoRA, cfg: ModelConfig, targets: list[str], layers: list[int]) -> dict:
    """{(Hugging Face module, layer): (A [r, in], B [out, r])} of the live slots of `targets`
    in `layers` (r may be 0: a target without live slots in that layer is written as zeros).

    Projections a family fuses into one module (Phi-3's `qkv_proj`) become one adapter of that
    module: with one shared A when their live A's are equal (as after `load_peft`), else their
    slots stacked block-diagonally, `[A_q; A_k; A_v]` and `diag(B_q, B_k, B_v)`, which computes
    exactly the same update at the sum of their ranks.
    """
    modules: dict[str, list[str]] = {}
    for m in targets:
        modules.setdefault(hf_module(cfg, m), []).append(m)
    out = {}
    for module, ms in modules.items():
        group = FUSED_TENSORS.get(cfg.model_type, {}).get(module, (module,))
        widths = [cfg.proj_shape(p)[1] for p in group]
        rows = dict(zip(group, np.cumsum([0, *widths])[:-1].tolist(), strict=True))
        d_in = cfg.proj_shape(group[0])[0]
        for i in layers:
            parts = []
            for m in ms:
                mask = np.asarray(lora.mask[m][i], np.float32)
                slots = np.nonzero(mask > 0)[0]
                a = (np.asarray(lora.a[m][i], np.float32)[:, slots] * mask[slots]).T
                parts.append((m, a, np.asarray(lora.b[m][i], np.float32)[slots, :].T))
            shared = all(a.shape == parts[0][1].shape and np.array_equal(a, parts[0][1])
                         for _, a, _ in parts)  # fmt: skip
            a_out = parts[0][1] if shared else np.concatenate([a for _, a, _ in parts])
            b_out = np.zeros((sum(widths), a_out.shape[0]), np.float32)
            col = 0
            for m, a, b in parts:
                b_out[rows[m] : rows[m] + b.shape[0], col : col + b.shape[1]] = b
                col += 0 if shared else a.shape[0]
            out[(module, i)] = (a_out.reshape(-1, d_in), b_out)
    return out


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

    `target_modules`, `exclude_modules`, `layers_to_transform` and `layers_pattern` are
    honoured as PEFT honours them: a tensor of a module PEFT would not adapt is refused (PEFT
    would leave it unloaded), and the modules and layers the file does adapt become the
    adapter's live slots.

    Raises:
      CheckpointError: missing or unreadable files, unsupported PEFT settings, a non-finite
        `lora_alpha` or an `r` that is not a positive integer (the field is named), tensors
        that do not fit `cfg` or that the config keeps out of the adapter (the tensor is named).
    """
    folder = Path(out_dir)
    cfg_path, w_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} does not exist")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing")
    pc = read_json(cfg_path)
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
    r, alpha, rslora = _peft_scalars(pc, cfg_path)
    why_not = _peft_module_filter(pc, cfg, cfg_path)
    scale = alpha / (math.sqrt(r) if rslora else r)
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
    modules = {hf_module(cfg, t) for t in LORA_TARGETS}  # this family's adaptable modules
    with open_safetensors(w_path) as f:
        for key in f.keys():
            match = _PEFT_KEY.match(key)
            if match is None:
                raise CheckpointError(f"tensor {key!r} in {w_path} is not a supported LoRA weight")
            layer, sub, m, ab = int(match[1]), match[2], match[3], match[4]
            group = FUSED_TENSORS.get(cfg.model_type, {}).get(m, (m,))
            if m not in modules or PROJ_SUBMODULE[group[0]] != sub:
                raise CheckpointError(
                    f"tensor {key!r} in {w_path}: unknown module {sub}.{m} for {cfg.model_type}"
                )
            if not 0 <= layer < cfg.num_layers:
                raise CheckpointError(
                    f"tensor {key!r} in {w_path}: layer {layer} is outside [0, {cfg.num_layers})"
                )
            field = why_not(module_name(m, layer))
            if field is not None:
                raise CheckpointError(
                    f"tensor {key!r} in {w_path} adapts {module_name(m, layer)}, which "
                    f"{field}={pc.get(field)!r} in {cfg_path} keeps out of the adapter (PEFT "
                    "would not load it)"
                )
            widths = [cfg.proj_shape(p)[1] for p in group]
            d_in = cfg.proj_shape(group[0])[0]
            expected = (r, d_in) if ab == "A" else (sum(widths), r)
            arr = get_tensor(f, key, w_path)
            if tuple(arr.shape) != expected:
                raise CheckpointError(
                    f"tensor {key!r} in {w_path} has shape {tuple(arr.shape)}, expected {expected}"
                )
            arr = arr.astype(np.float32)
            starts = np.cumsum([0, *widths]).tolist()
            for p, lo, hi in zip(group, starts[:-1], starts[1:], strict=True):
                found.setdefault((p, layer), {})[ab] = arr if ab == "A" else arr[lo:hi]
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


def _peft_scalars(pc: dict, source: Path) -> tuple[int, float, bool]:
    """`(r, lora_alpha, use_rslora)` of an adapter config, each checked: r a positive integer,
    lora_alpha a finite number (a NaN or infinite alpha makes every output NaN or infinite)."""
    for key in ("r", "lora_alpha"):
        if key not in pc:
            raise CheckpointError(f"{source}: required field {key!r} is missing")
    r, alpha, rslora = pc["r"], pc["lora_alpha"], pc.get("use_rslora", False)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise CheckpointError(f"{source}: r={r!r} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise CheckpointError(f"{source}: lora_alpha={alpha!r} must be a number")
    if not math.isfinite(alpha):
        raise CheckpointError(f"{source}: lora_alpha={alpha!r} must be finite")
    if not isinstance(rslora, bool):
        raise CheckpointError(f"{source}: use_rslora={rslora!r} must be true or false")
    return int(r), float(alpha), rslora


def _str_or_list(pc: dict, key: str, source: Path):
    """The field as PEFT takes it: None, a string (a regex) or a list of strings."""
    v = pc.get(key)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise CheckpointError(f"{source}: {key}={v!r} must be a string or a list of strings")


def _peft_module_filter(pc: dict, cfg: ModelConfig, source: Path) -> Callable[[str], str | None]:
    """Which modules PEFT would adapt under this config, as PEFT decides it
    (`peft.tuners.tuners_utils.check_target_module_exists`): `exclude_modules` (a regex matched
    in full, or names matched as the module path or its suffix), then `target_modules` (a regex
    matched in full; or names, an exact path or a suffix, restricted to `layers_to_transform`,
    whose layer index is the first numbered path segment, or the one after `layers_pattern`).

    Returns `why_not(module path) -> None` when PEFT adapts the module, else the name of the
    field that keeps it out. A tensor of a module PEFT would not adapt is refused by the caller
    rather than loaded into a layer PEFT leaves alone.
    """
    targets = _str_or_list(pc, "target_modules", source)
    exclude = _str_or_list(pc, "exclude_modules", source)
    pattern = _str_or_list(pc, "layers_pattern", source)
    layers = pc.get("layers_to_transform")
    if targets is None:
        targets = list(_PEFT_DEFAULT_TARGETS)
    elif targets == _PEFT_ALL_LINEAR:
        targets = list(dict.fromkeys(hf_module(cfg, t) for t in LORA_TARGETS))
    if isinstance(targets, str) and (layers is not None or pattern is not None):
        raise CheckpointError(
            f"{source}: layers_to_transform / layers_pattern cannot be used with a regex "
            f"target_modules={targets!r} (PEFT refuses it too)"
        )
    if layers is not None:
        items = [layers] if not isinstance(layers, list) else layers
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise CheckpointError(
                f"{source}: layers_to_transform={layers!r} must be a layer index or a list of them"
            )
        bad = [i for i in items if not 0 <= i < cfg.num_layers]
        if bad:
            raise CheckpointError(
                f"{source}: layers_to_transform={layers!r} names layer {bad[0]}, outside "
                f"[0, num_layers={cfg.num_layers})"
            )
    use_layers = layers is not None and layers != []
    patterns = [pattern] if isinstance(pattern, str) else (pattern or [])

    def layer_index(key: str) -> int | None:
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = None
            for p in patterns:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        return None if match is None else int(match["idx"])

    def why_not(key: str) -> str | None:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return "exclude_modules"
        elif exclude and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
            return "exclude_modules"
        if isinstance(targets, str):
            return None if re.fullmatch(targets, key) else "target_modules"
        if key in targets:
            return None
        if not any(key.endswith(f".{t}") for t in targets):
            return "target_modules"
        if use_layers:
            i = layer_index(key)
            if i is None or (i != layers if isinstance(layers, int) else i not in layers):
                return "layers_to_transform"
        return None

    return why_not
