"""floe_jax.hf.peft: the errors of PEFT adapter loading and saving (parity with PEFT itself is
tested in tests/test_lora.py)."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy

import floe_jax.hf as hf
from tests import _hf_utils as U


@pytest.fixture()
def adapter(tmp_path):
    """A valid adapter folder written by save_peft for the llama-gqa config."""
    from floe_jax.config import LoRAConfig
    from floe_jax.lora import init_lora

    cfg = hf.config_from_hf(U.hf_config("llama-gqa").to_dict())
    lora = init_lora(cfg, LoRAConfig(rank=2, alpha=4, targets=("q", "v")), key=jax.random.key(0))
    hf.save_peft(lora, cfg, tmp_path / "adapter")
    return cfg, lora, tmp_path / "adapter"


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"use_dora": True}, "use_dora"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_error_load_peft_unsupported_setting(adapter, changes, field):
    cfg, _, folder = adapter
    _edit_json(folder / hf.ADAPTER_CONFIG_FILE, **changes)
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_peft(folder, cfg)
    assert field in str(e.value) and hf.ADAPTER_CONFIG_FILE in str(e.value)


def test_error_load_peft_missing_files(adapter, tmp_path):
    cfg, _, folder = adapter
    with pytest.raises(hf.CheckpointError, match="does not exist"):
        hf.load_peft(tmp_path / "nope", cfg)
    (folder / hf.ADAPTER_WEIGHTS_FILE).unlink()
    with pytest.raises(hf.CheckpointError, match=hf.ADAPTER_WEIGHTS_FILE):
        hf.load_peft(folder, cfg)
    (folder / hf.ADAPTER_CONFIG_FILE).unlink()
    with pytest.raises(hf.CheckpointError, match=hf.ADAPTER_CONFIG_FILE):
        hf.load_peft(folder, cfg)


def test_error_load_peft_bad_tensors(adapter):
    cfg, _, folder = adapter
    path = folder / hf.ADAPTER_WEIGHTS_FILE
    tensors = safetensors.numpy.load_file(path)
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    bad = {**tensors, name: tensors[name][:, :1]}
    safetensors.numpy.save_file(bad, path)
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_peft(folder, cfg)
    assert name in str(e.value) and "(16, 1)" in str(e.value) and "(16, 2)" in str(e.value)

    extra = "base_model.model.lm_head.lora_A.weight"
    safetensors.numpy.save_file({**tensors, extra: np.zeros((2, 32), np.float32)}, path)
    with pytest.raises(hf.CheckpointError, match=extra.replace(".", r"\.")):
        hf.load_peft(folder, cfg)


def test_error_load_peft_max_rank_below_r_and_stacked_save(adapter, tmp_path):
    cfg, lora, folder = adapter
    with pytest.raises(hf.CheckpointError, match="max_rank=1 is below the adapter's r=2"):
        hf.load_peft(folder, cfg, max_rank=1)
    from floe_jax.lora import stack_loras

    with pytest.raises(hf.CheckpointError, match="one client"):
        hf.save_peft(stack_loras([lora, lora]), cfg, tmp_path / "stacked")
    with pytest.raises(hf.CheckpointError, match="lora_alpha=3"):
        hf.save_peft(lora, cfg, tmp_path / "x", alpha=3)
