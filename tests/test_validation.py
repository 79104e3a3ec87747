"""Every setting and file is validated where it enters, with an error naming it: non-finite
settings, impossible counts, out-of-vocabulary token ids, unreadable or unaccounted-for
checkpoint tensors, PEFT fields honoured or refused, aggregation weights that would overflow."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import floe_jax.hf as hf
from floe_jax.config import ConfigError, LoRAConfig, ModelConfig, RopeScaling
from floe_jax.decode import SamplingConfig, pad_prompts
from floe_jax.federated import aggregate as ag
from floe_jax.federated.checks import check_round
from floe_jax.federated.config import AggregationConfig, FedConfig
from floe_jax.federated.rounds import init_server_state
from floe_jax.federated.types import client_data
from floe_jax.inference.fused import FusedDecodeConfig
from floe_jax.inference.router import FusionConfig
from floe_jax.lora import init_lora
from floe_jax.overrides import apply_overrides

NONFINITE = ("nan", "inf", "-inf")


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Eval:  # a preset group with a float that has no finiteness check of its own
    tau_ms: float = 250.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Preset:
    eval: _Eval = _Eval()
    fed: FedConfig = FedConfig()


@pytest.mark.parametrize("value", NONFINITE)
def test_parser_refuses_nonfinite_floats_naming_the_setting(value):
    with pytest.raises(ConfigError, match=r"eval\.tau_ms.*finite"):
        apply_overrides(_Preset(), [f"eval.tau_ms={value}"])
    with pytest.raises(ConfigError, match=r"fed\.lr.*finite"):
        apply_overrides(_Preset(), [f"fed.lr={value}"])
    with pytest.raises(ConfigError, match=r"fed\.agg\.max_norm.*finite"):
        apply_overrides(_Preset(), [f"fed.agg.max_norm={value}"])
    # `none` stays the way to say "no limit"
    assert apply_overrides(_Preset(), ["fed.agg.max_norm=none"]).fed.agg.max_norm is None


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda x: FedConfig(lr=x), "FedConfig.lr"),
        (lambda x: FedConfig(weight_decay=x), "FedConfig.weight_decay"),
        (lambda x: FedConfig(max_grad_norm=x), "FedConfig.max_grad_norm"),
        (lambda x: FedConfig(max_update_norm=x), "FedConfig.max_update_norm"),
        (lambda x: AggregationConfig(max_norm=x), "AggregationConfig.max_norm"),
        (lambda x: LoRAConfig(alpha=x), "LoRAConfig.alpha"),
        (lambda x: RopeScaling(rope_type="linear", factor=x), "factor"),
        (lambda x: _model(rms_norm_eps=x), "rms_norm_eps"),
        (lambda x: _model(rope_theta=x), "rope_theta"),
        (lambda x: SamplingConfig(temperature=x), "temperature"),
        (lambda x: FusionConfig(temperature=x), "FusionConfig.temperature"),
        (lambda x: FusedDecodeConfig(max_new_tokens=1, real_timeout_s=x), "real_timeout_s"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_configs_refuse_nonfinite_values_naming_the_field(make, field, value):
    with pytest.raises(ConfigError, match=field):
        make(value)


def test_fused_deadline_may_be_infinite_but_not_nan():
    assert FusedDecodeConfig(max_new_tokens=1, deadline_s=math.inf).deadline_s == math.inf
    with pytest.raises(ConfigError, match="deadline_s"):
        FusedDecodeConfig(max_new_tokens=1, deadline_s=math.nan)


def _model(**kw):
    base = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
    return ModelConfig(**{**base, **kw})


def test_lora_rank_zero_names_lora_rank():
    with pytest.raises(ConfigError, match=r"fed\.lora\.rank"):
        apply_overrides(_Preset(), ["fed.lora.rank=0"])
    with pytest.raises(ConfigError, match=r"LoRAConfig\.rank"):
        LoRAConfig(rank=0)


def _data(N, T=8, vocab=16, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(N):
        t = rng.integers(0, vocab, (3, T)).astype(np.int32)
        rows.append((t, np.ones(t.shape, np.float32), np.ones(t.shape, np.float32)))
    return rows


def test_clients_per_round_above_the_clients_names_both(tiny_cfg):
    fed = FedConfig(clients_per_round=50, seq_len=8, lora=LoRAConfig(rank=2))
    data = client_data(_data(3))
    state = init_server_state(tiny_cfg, fed, ranks=np.full(3, 2))
    with pytest.raises(ConfigError, match=r"clients_per_round=50.*3 clients"):
        check_round(fed, data, state)


def test_out_of_vocabulary_tokens_name_the_client_and_row(tiny_cfg):
    rows = _data(3, vocab=tiny_cfg.vocab_size)
    rows[2][0][1, 4] = tiny_cfg.vocab_size  # client 2, example 1
    with pytest.raises(ValueError, match=r"client 2.*row 1.*vocab_size=96"):
        client_data(rows, vocab_size=tiny_cfg.vocab_size)
    rows[2][0][1, 4] = -1
    with pytest.raises(ValueError, match=r"client 2.*row 1"):
        client_data(rows)  # negative ids are never token ids
    rows[2][0][1, 4] = tiny_cfg.vocab_size
    fed = FedConfig(clients_per_round=2, seq_len=8, lora=LoRAConfig(rank=2))
    data = client_data(rows)  # vocabulary unknown here
    state = init_server_state(tiny_cfg, fed, ranks=np.full(3, 2))
    check_round(fed, data, state)  # the model is not known either
    with pytest.raises(ValueError, match=r"client 2.*row 1.*vocab_size=96"):
        check_round(fed, data, state, cfg=tiny_cfg)


def test_train_federated_checks_token_ids_before_clustering_trains(tiny_cfg, tmp_path):
    """Update-based clustering trains every client before round 0: the data is checked first."""
    from floe_jax.federated.loop import train_federated
    from floe_jax.model import init_params

    rows = _data(3, vocab=tiny_cfg.vocab_size)
    rows[1][0][0, 3] = tiny_cfg.vocab_size + 5
    fed = FedConfig(num_rounds=1, clients_per_round=2, seq_len=8, lora=LoRAConfig(rank=2),
                    clustering="updates", num_clusters=2)  # fmt: skip
    params = init_params(tiny_cfg, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"client data: .*client 1.*row 0"):
        train_federated(params, client_data(rows), cfg=tiny_cfg, fed=fed, run_dir=str(tmp_path))
    assert not (tmp_path / "clusters.json").exists()


@pytest.mark.parametrize("value", [math.nan, -1.0])
def test_bad_masks_name_the_client_and_row(value):
    rows = _data(2)
    rows[1][2][2, 0] = value
    with pytest.raises(ValueError, match=r"client 1: row 2 of loss_mask"):
        client_data(rows)


def test_out_of_vocabulary_prompt_is_named():
    with pytest.raises(ValueError, match=r"prompt 1.*token id 99.*vocab_size=50"):
        pad_prompts([[1, 2], [3, 99]], vocab_size=50)
    with pytest.raises(ValueError, match=r"prompt 0.*-3"):
        pad_prompts([[1, -3]])
    tokens, _ = pad_prompts([[1, 2], [3, 49]], vocab_size=50)
    assert tokens.max() == 49


# ----------------------------------------------------------------------------- aggregation


def _clients(cfg, C=3, r=2, seed=0):
    loras = [
        init_lora(cfg, LoRAConfig(rank=r, alpha=4.0, targets=("q",)), key=jax.random.key(seed + k))
        for k in range(C)
    ]
    rng = np.random.default_rng(seed)
    loras = [
        dataclasses.replace(l, b={m: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
                                  for m, v in l.b.items()})
        for l in loras
    ]  # fmt: skip
    return jax.tree.map(lambda *xs: jnp.stack(xs), *loras)


@pytest.mark.parametrize("scale", [1e39, 1e300, 1e-300])
def test_aggregate_weights_that_overflow_float32_are_normalised_first(tiny_cfg, scale):
    clients = _clients(tiny_cfg)
    ranks = np.full(3, 2)
    ref = ag.aggregate("fedit", clients, weights=np.array([1.0, 2.0, 3.0]), ranks=ranks)
    out = ag.aggregate("fedit", clients, weights=np.array([1.0, 2.0, 3.0]) * scale, ranks=ranks)
    assert np.asarray(out.included).all()
    for m in ref.global_lora.b:
        assert np.abs(np.asarray(ref.global_lora.b[m])).max() > 0
        np.testing.assert_allclose(out.global_lora.b[m], ref.global_lora.b[m], rtol=1e-5)


def test_screen_normalises_huge_example_counts(tiny_cfg):
    clients = _clients(tiny_cfg)
    w, reason = ag.screen(clients, jnp.asarray([3e38, 3e38, 3e38], jnp.float32))
    assert np.all(np.asarray(reason) == ag.REASON_OK)
    assert np.isfinite(float(jnp.sum(w)))
    assert float(w[0]) == float(w[1]) == float(w[2]) and 0.5 <= float(w[0]) < 1
    # a weight that already overflowed is left out, never spread as NaN
    w, reason = ag.screen(clients, jnp.asarray([jnp.inf, 1.0, 1.0], jnp.float32))
    assert int(reason[0]) != ag.REASON_OK and float(w[0]) == 0.0
    assert float(w[1]) == float(w[2]) > 0


# ----------------------------------------------------------------------------- HF checkpoints


@pytest.fixture()
def ckpt(tmp_path, tiny_cfg, tiny_params):
    hf.save_hf(tiny_cfg, tiny_params, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _add_tensor(path, name, arr):
    t = safetensors.numpy.load_file(str(path))
    t[name] = arr
    safetensors.numpy.save_file(t, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_safetensors_names_the_file(ckpt, damage):
    path = ckpt / hf.WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage]
    )
    with pytest.raises(hf.CheckpointError, match=hf.WEIGHTS_FILE):
        hf.load_hf(ckpt)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.2.self_attn.q_proj.weight", (32, 32)),  # a layer past num_layers=2
        ("model.layers.0.self_attn.q_proj.bias", (32,)),  # a bias the config disables
        ("model.layers.0.mlp.down_proj.bias", (32,)),
        ("model.extra_head.weight", (4, 32)),  # a tensor no config has
    ],
)
def test_checkpoint_tensors_the_config_does_not_account_for_are_refused(ckpt, name, shape):
    _add_tensor(ckpt / hf.WEIGHTS_FILE, name, np.zeros(shape, np.float32))
    with pytest.raises(hf.CheckpointError, match=name.replace(".", r"\.")):
        hf.load_hf(ckpt)


def test_checkpoint_rotary_buffers_are_ignored(ckpt, tiny_cfg):
    """Old Llama checkpoints store RoPE's inverse frequencies, which the config determines."""
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _add_tensor(ckpt / hf.WEIGHTS_FILE, name, np.zeros((4,), np.float32))
    assert hf.load_hf(ckpt)[0] == tiny_cfg


def test_config_json_with_nonfinite_value_is_refused(ckpt):
    d = json.loads((ckpt / hf.CONFIG_FILE).read_text())
    d["rms_norm_eps"] = float("nan")
    (ckpt / hf.CONFIG_FILE).write_text(json.dumps(d))
    with pytest.raises(hf.CheckpointError, match="rms_norm_eps"):
        hf.load_hf(ckpt)


# ----------------------------------------------------------------------------- PEFT adapters


@pytest.fixture()
def adapter(tmp_path, tiny_cfg):
    lora = init_lora(
        tiny_cfg, LoRAConfig(rank=2, alpha=4, targets=("q", "v")), key=jax.random.key(0)
    )
    lora = dataclasses.replace(lora, b={m: v + 0.5 for m, v in lora.b.items()})
    hf.save_peft(lora, tiny_cfg, tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit(folder, **changes):
    path = folder / hf.ADAPTER_CONFIG_FILE
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_adapter_names_the_file(adapter, tiny_cfg, damage):
    path = adapter / hf.ADAPTER_WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7] if damage == "truncated" else b"not safetensors")
    with pytest.raises(hf.CheckpointError, match=hf.ADAPTER_WEIGHTS_FILE):
        hf.load_peft(adapter, tiny_cfg)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, "16"])
def test_nonfinite_or_non_numeric_lora_alpha_is_refused(adapter, tiny_cfg, alpha):
    _edit(adapter, lora_alpha=alpha)
    with pytest.raises(hf.CheckpointError, match="lora_alpha"):
        hf.load_peft(adapter, tiny_cfg)


def test_save_peft_refuses_a_nonfinite_scale(tmp_path, tiny_cfg):
    lora = init_lora(tiny_cfg, LoRAConfig(rank=2, alpha=4), key=jax.random.key(0))
    lora = dataclasses.replace(lora, scale=jnp.asarray(jnp.nan))
    with pytest.raises(hf.CheckpointError, match="scale"):
        hf.save_peft(lora, tiny_cfg, tmp_path / "adapter")


@pytest.mark.parametrize("r", [0, -1, 2.5, None])
def test_bad_r_is_refused(adapter, tiny_cfg, r):
    _edit(adapter, r=r)
    with pytest.raises(hf.CheckpointError, match=r"\br\b"):
        hf.load_peft(adapter, tiny_cfg)


def _live_layers(lora, m):
    return sorted(int(i) for i in np.flatnonzero(np.asarray(lora.mask[m]).any(-1)))


def test_layers_to_transform_is_honoured(adapter, tiny_cfg):
    _edit(adapter, layers_to_transform=[1])
    with pytest.raises(hf.CheckpointError, match=r"layers\.0\..*layers_to_transform"):
        hf.load_peft(adapter, tiny_cfg)  # the file adapts layer 0, which PEFT would not
    t = safetensors.numpy.load_file(str(adapter / hf.ADAPTER_WEIGHTS_FILE))
    t = {k: v for k, v in t.items() if ".layers.0." not in k}
    safetensors.numpy.save_file(t, str(adapter / hf.ADAPTER_WEIGHTS_FILE))
    lora = hf.load_peft(adapter, tiny_cfg)
    assert _live_layers(lora, "q_proj") == [1] == _live_layers(lora, "v_proj")
    _edit(adapter, layers_to_transform=1)  # PEFT takes a single int too
    assert _live_layers(hf.load_peft(adapter, tiny_cfg), "q_proj") == [1]
    for bad in ([5], ["x"], [1, -1]):
        _edit(adapter, layers_to_transform=bad)
        with pytest.raises(hf.CheckpointError, match="layers_to_transform"):
            hf.load_peft(adapter, tiny_cfg)


@pytest.mark.parametrize("exclude", [["v_proj"], ["self_attn.v_proj"], ".*v_proj"])
def test_exclude_modules_is_honoured(adapter, tiny_cfg, exclude):
    _edit(adapter, exclude_modules=exclude)
    with pytest.raises(hf.CheckpointError, match=r"v_proj.*exclude_modules"):
        hf.load_peft(adapter, tiny_cfg)
    t = safetensors.numpy.load_file(str(adapter / hf.ADAPTER_WEIGHTS_FILE))
    t = {k: v for k, v in t.items() if "v_proj" not in k}
    safetensors.numpy.save_file(t, str(adapter / hf.ADAPTER_WEIGHTS_FILE))
    assert set(hf.load_peft(adapter, tiny_cfg).a) == {"q_proj"}


def test_tensors_outside_target_modules_are_refused(adapter, tiny_cfg):
    _edit(adapter, target_modules=["q_proj"])
    with pytest.raises(hf.CheckpointError, match=r"v_proj.*target_modules"):
        hf.load_peft(adapter, tiny_cfg)
    _edit(adapter, target_modules=r".*\.(q_proj|v_proj)")  # a regex, as PEFT takes it
    assert set(hf.load_peft(adapter, tiny_cfg).a) == {"q_proj", "v_proj"}
    _edit(adapter, target_modules="all-linear")
    assert set(hf.load_peft(adapter, tiny_cfg).a) == {"q_proj", "v_proj"}


def test_peft_agrees_on_layers_to_transform_and_exclude_modules(tmp_path, tiny_cfg, tiny_params):
    """PEFT itself builds the same adapted layers and modules from the same config."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf.save_hf(tiny_cfg, tiny_params, tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    pc = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "k_proj"],
        exclude_modules=["k_proj"], layers_to_transform=[1], init_lora_weights=False,
    )  # fmt: skip
    pm = peft.get_peft_model(model, pc)
    pm.save_pretrained(tmp_path / "adapter")
    lora = hf.load_peft(tmp_path / "adapter", tiny_cfg)
    assert set(lora.a) == {"q_proj", "v_proj"}
    assert _live_layers(lora, "q_proj") == [1] == _live_layers(lora, "v_proj")
    sd = {k: v.detach().numpy() for k, v in pm.state_dict().items() if "lora_A" in k}
    (key,) = [k for k in sd if "layers.1.self_attn.q_proj" in k]
    np.testing.assert_allclose(np.asarray(lora.a["q_proj"][1]), sd[key].T, rtol=1e-6)
    del torch


# ----------------------------------------------------------------------------- experiments


@pytest.mark.parametrize("under", [False, True])
def test_out_under_a_file_is_a_clear_error(tmp_path, capsys, under):
    from experiments import cli

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "run" if under else blocker
    assert cli.main(["federate", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker) in err and "Traceback" not in err


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_base_folding_rules_refuse_a_quantized_base(tiny_cfg, tmp_path, method):
    """FLoRA and FedEx-LoRA add an exact dense update to the base weights each round, which a
    quantized base cannot take: refused before anything trains, and when a round is traced."""
    from floe_jax import quant
    from floe_jax.federated.checks import check_base_format
    from floe_jax.federated.loop import train_federated
    from floe_jax.federated.rounds import round_step
    from floe_jax.model import init_params

    params = init_params(tiny_cfg, key=jax.random.key(0))
    qp = quant.quantize(params, tiny_cfg, quant.QuantConfig(format="int4", group_size=16))
    fed = FedConfig(num_rounds=1, clients_per_round=2, seq_len=8, lora=LoRAConfig(rank=2),
                    agg=AggregationConfig(method=method))  # fmt: skip
    data = client_data(_data(3, vocab=tiny_cfg.vocab_size))
    want = rf"agg.method='{method}'.*quantized \(int4.*dequantize_params.*fedit"
    with pytest.raises(ConfigError, match=want):
        train_federated(qp, data, cfg=tiny_cfg, fed=fed, run_dir=str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()
    state = init_server_state(tiny_cfg, fed, ranks=np.full(3, 2))
    with pytest.raises(ConfigError, match=want):
        jax.eval_shape(lambda s, p: round_step(s, p, data, cfg=tiny_cfg, fed=fed), state, qp)
    check_base_format(fed, params)  # a float base is what these rules fold into
    fedit = dataclasses.replace(fed, agg=AggregationConfig(method="fedit"))
    state = init_server_state(tiny_cfg, fedit, ranks=np.full(3, 2))
    jax.eval_shape(lambda s, p: round_step(s, p, data, cfg=tiny_cfg, fed=fedit), state, qp)
