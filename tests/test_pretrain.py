"""floe_jax.pretrain: the loss falls, the cache skips training, holds Hugging Face checkpoints and
is keyed by the code; the demo presets and their overrides parse, bad overrides fail clearly."""

import concurrent.futures
import dataclasses
import threading
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import floe_jax.loss
import floe_jax.model
import floe_jax.pretrain
import kernels.decode_attention
from floe_jax.config import ConfigError, ModelConfig
from floe_jax.data.tokenizer import encode_docs
from floe_jax.hf import load_hf
from floe_jax.loss import token_loss
from floe_jax.model import init_params
from floe_jax.pretrain import (
    PretrainConfig,
    cache_key,
    pretrain,
    pretrain_cached,
    sample_windows,
)

CFG = ModelConfig(
    vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1
)
TCFG = PretrainConfig(steps=30, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=3)


def _stream(n=400, seed=0):
    """A learnable corpus: a repeated 8-token pattern with some noise."""
    rng = np.random.default_rng(seed)
    s = np.tile(np.arange(3, 11), n // 8)
    noise = rng.random(s.shape) < 0.05
    s[noise] = rng.integers(0, 16, noise.sum())
    return s.astype(np.int32)


def _loss_sums(params, toks, loss_mask, cfg):
    """Pretraining's loss: every token real, the targets where `loss_mask` is 1."""
    return token_loss(params, None, toks, jnp.ones_like(toks), loss_mask, cfg=cfg)


def _mean_loss(params, stream):
    toks = jnp.asarray(sample_windows(stream, 8, 17, np.random.default_rng(123)))
    s, n = _loss_sums(params, toks, jnp.ones_like(toks), CFG)
    return float(s / n)


def test_pretraining_lowers_the_loss():
    stream = _stream()
    before = _mean_loss(init_params(CFG, key=jax.random.key(0)), stream)
    params, losses = pretrain(CFG, stream, TCFG, progress=False)
    assert len(losses) == TCFG.steps
    after = _mean_loss(params, stream)
    assert after < 0.5 * before, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_loss_mask_counts_only_masked_targets():
    params = init_params(CFG, key=jax.random.key(0))
    toks = jnp.asarray(_stream()[:20].reshape(2, 10))
    mask = jnp.zeros_like(toks).at[:, 5:].set(1)
    s, n = _loss_sums(params, toks, mask, CFG)
    assert float(n) == 10.0
    s_all, n_all = _loss_sums(params, toks, jnp.ones_like(toks), CFG)
    assert float(n_all) == 18.0 and float(s) < float(s_all)


def test_cache_hit_skips_training_and_returns_the_same_params(tmp_path):
    stream = _stream()
    tcfg = dataclasses.replace(TCFG, steps=3)
    first = pretrain_cached(CFG, stream, tcfg, cache_dir=tmp_path, name="m", progress=False)
    assert not first.cache_hit and len(first.losses) == 3
    second = pretrain_cached(CFG, stream, tcfg, cache_dir=tmp_path, name="m", progress=False)
    assert second.cache_hit and second.path == first.path
    assert second.losses == first.losses
    chex.assert_trees_all_close(second.params, first.params)
    # any change of data, model or training settings is a different cache entry
    other = pretrain_cached(
        CFG, stream, dataclasses.replace(tcfg, seed=1), cache_dir=tmp_path, name="m",
        progress=False,
    )  # fmt: skip
    assert not other.cache_hit and other.path != first.path


def test_cache_key_covers_data_model_and_training():
    s = _stream()
    k = cache_key(CFG, TCFG, s)
    assert k == cache_key(CFG, TCFG, s.copy())
    assert k != cache_key(CFG, TCFG, _stream(seed=1))
    assert k != cache_key(dataclasses.replace(CFG, hidden_size=64), TCFG, s)
    assert k != cache_key(CFG, dataclasses.replace(TCFG, lr=1e-3), s)
    assert k != cache_key(CFG, TCFG, s, tag="bench-seed-1")
    # the decode kernel is not part of what pretraining trains
    assert k == cache_key(dataclasses.replace(CFG, attention_impl="pallas"), TCFG, s)


@pytest.mark.parametrize("module", [floe_jax.model, kernels.decode_attention, floe_jax.loss])
def test_cache_key_follows_the_code(monkeypatch, tmp_path, module):
    """An edit to the model's source (the model module, or the attention code it imports) or to
    the loss is a new fingerprint, and a new fingerprint a new entry: a warm cache never serves a
    model the current code would train differently."""
    fingerprint = floe_jax.pretrain.code_fingerprint.__wrapped__  # uncached
    before = fingerprint()
    edited = tmp_path / Path(module.__file__).name
    edited.write_text(Path(module.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(module, "__file__", str(edited))
    assert fingerprint() != before
    s = _stream()
    k = cache_key(CFG, TCFG, s)
    monkeypatch.setattr(floe_jax.pretrain, "code_fingerprint", lambda: "edited")
    assert cache_key(CFG, TCFG, s) != k


def test_cached_model_is_a_hugging_face_checkpoint(tmp_path):
    """The cache folder is written by save_hf and read back through load_hf, bit for bit."""
    tcfg = dataclasses.replace(TCFG, steps=2, warmup_steps=1)
    first = pretrain_cached(CFG, _stream(), tcfg, cache_dir=tmp_path, name="m", progress=False)
    cfg2, params2 = load_hf(first.path)
    assert cfg2 == CFG
    chex.assert_trees_all_equal(params2, first.params)


def test_sample_windows_shape_and_short_stream():
    rng = np.random.default_rng(0)
    w = sample_windows(np.arange(5), 3, 12, rng)
    assert w.shape == (3, 12) and w.dtype == np.int32
    with pytest.raises(ValueError, match="non-empty 1-D"):
        sample_windows(np.zeros((0,)), 1, 4, rng)


def test_token_ids_outside_vocab_are_rejected():
    with pytest.raises(ValueError, match="vocab_size=16"):
        pretrain(CFG, np.array([1, 2, 99]), TCFG, progress=False)


def test_bad_pretrain_config_names_the_field():
    with pytest.raises(ConfigError, match="steps"):
        PretrainConfig(steps=0)
    with pytest.raises(ConfigError, match="warmup_steps"):
        PretrainConfig(steps=10, warmup_steps=20)


# ----------------------------------------------------------------------------- presets


def test_presets_parse_and_overrides_apply():
    from experiments.presets import PRESETS, get_preset

    for name in PRESETS:
        p = get_preset(name)
        assert p.name == name
        assert p.edge.num_params < p.cloud.num_params  # the edge model is the smaller one
    p = get_preset(
        "default",
        ["bench.seed=3", "cloud.num_layers=6", "cloud_pretrain.lr=1e-3", "finetune.lora.rank=4"],
    )
    assert p.bench.seed == 3 and p.cloud.num_layers == 6
    assert p.cloud_pretrain.lr == 1e-3 and p.finetune.lora.rank == 4
    assert hash(p)  # frozen and hashable


def test_bad_overrides_are_clear_errors():
    from experiments.presets import get_preset

    with pytest.raises(ConfigError, match="unknown setting 'bench.sed'"):
        get_preset("default", ["bench.sed=3"])
    with pytest.raises(ConfigError, match="cloud.num_layers: expected int"):
        get_preset("default", ["cloud.num_layers=four"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        get_preset("default", ["bench.seed"])
    with pytest.raises(ConfigError, match="edge.vocab_size"):
        get_preset("default", ["edge.vocab_size=512"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_smoke_preset_runs_end_to_end_and_second_run_hits_the_cache(tmp_path):
    from experiments import calibrate
    from experiments.presets import get_preset

    preset = get_preset("smoke", [f"cache_dir={tmp_path}"])
    result = calibrate.run(preset, progress=False)
    assert result["cache_hit"] == {"edge": False, "cloud": False}
    assert set(result["rows"]) == {"cloud base", "edge base", "edge + pooled LoRA"}
    for row in result["rows"].values():
        assert 0.0 <= row["overall"] <= 1.0 and row["n_overall"] == 9
    assert "| cloud base |" in calibrate.format_report(result)
    again = calibrate.prepare(preset, progress=False)
    assert again.edge.cache_hit and again.cloud.cache_hit


def test_prepare_trains_both_models_at_once_as_one_after_the_other(tmp_path):
    """`prepare` trains the cloud and the edge in two threads at once: each model must come out
    bit for bit as `pretrain` trains it alone."""
    from experiments import calibrate
    from experiments.presets import get_preset

    preset = get_preset("smoke", [f"cache_dir={tmp_path}", "edge_pretrain.steps=8",
                                  "cloud_pretrain.steps=8"])  # fmt: skip
    prep = calibrate.prepare(preset, progress=False)
    for which, docs, tk in (
        ("cloud", prep.bench.public_docs, prep.cloud_tokenizer),
        ("edge", prep.bench.edge_docs, prep.tokenizer),
    ):
        stream = np.asarray(encode_docs(tk, docs), np.int32)
        params, losses = pretrain(
            getattr(preset, which), stream, getattr(preset, f"{which}_pretrain"), progress=False
        )
        got = getattr(prep, which)
        assert not got.cache_hit and got.losses == tuple(losses)
        jax.tree.map(np.testing.assert_array_equal, got.params, params)


def _watch_pretraining(monkeypatch, calibrate) -> tuple[dict, threading.Event]:
    """Patches `calibrate.pretrain_cached` to record the error each model's training ends with
    (`seen[name]`), and sets `started` once five training batches have been drawn."""
    seen, started = {}, threading.Event()
    sample = floe_jax.pretrain.sample_windows

    def counted(*args, calls=[]):  # noqa: B006 (the call count)
        calls.append(1)
        if len(calls) == 5:
            started.set()
        return sample(*args)

    monkeypatch.setattr(floe_jax.pretrain, "sample_windows", counted)

    def cached(cfg, stream, tcfg, *, name, **kw):
        try:
            return pretrain_cached(cfg, stream, tcfg, name=name, **kw)
        except BaseException as e:
            seen[name] = e
            raise

    monkeypatch.setattr(calibrate, "pretrain_cached", cached)
    return seen, started


@pytest.mark.parametrize("error", [FloatingPointError, KeyboardInterrupt])
def test_prepare_stops_the_other_training_when_one_fails(tmp_path, monkeypatch, error):
    """A failing training (or Ctrl-C) ends `prepare` with its own error, and the training running
    beside it stops within a few steps (`PretrainStopped`) instead of running to its end."""
    from experiments import calibrate
    from experiments.presets import get_preset

    preset = get_preset("smoke", [f"cache_dir={tmp_path}", "cloud_pretrain.steps=3000"])
    seen, started = _watch_pretraining(monkeypatch, calibrate)
    watched = calibrate.pretrain_cached

    def cached(cfg, stream, tcfg, *, name, **kw):
        if name == "edge":  # fails once the cloud is training
            assert started.wait(timeout=120)
            raise error("edge failed")
        return watched(cfg, stream, tcfg, name=name, **kw)

    monkeypatch.setattr(calibrate, "pretrain_cached", cached)
    with pytest.raises(error, match="edge failed"):
        calibrate.prepare(preset, progress=False)
    assert isinstance(seen["cloud"], floe_jax.pretrain.PretrainStopped), seen
    stopped_at = int(str(seen["cloud"]).split("stopped at step ")[1].split()[0])
    assert 5 <= stopped_at < 3000, seen["cloud"]


def test_the_demo_trains_the_cloud_beside_the_edge_only_setup(tmp_path):
    """`run_demo` trains the cloud in a thread while the federated rounds set up the edge alone
    (`prepare(models=("edge",))`): on exit both models are in the cache, bit for bit as
    `prepare` trains them."""
    from experiments import calibrate
    from experiments.demo import _cloud_beside
    from experiments.presets import get_preset

    steps = ["edge_pretrain.steps=8", "cloud_pretrain.steps=8"]
    preset = get_preset("smoke", [f"cache_dir={tmp_path}", *steps])
    with _cloud_beside(preset, progress=False):
        edge_only = calibrate.prepare(preset, progress=False, models=("edge",))
    assert edge_only.cloud is None and not edge_only.edge.cache_hit
    both = calibrate.prepare(preset, progress=False)
    assert both.edge.cache_hit and both.cloud.cache_hit
    fresh = calibrate.prepare(
        get_preset("smoke", [f"cache_dir={tmp_path}/fresh", *steps]), progress=False
    )
    for which in ("cloud", "edge"):
        jax.tree.map(
            np.testing.assert_array_equal, getattr(both, which).params, getattr(fresh, which).params
        )
    with pytest.raises(ValueError, match="subset"):
        calibrate.prepare(preset, progress=False, models=("server",))


@pytest.mark.parametrize(
    "where, error",
    [("body", FloatingPointError), ("body", KeyboardInterrupt), ("wait", KeyboardInterrupt)],
)
def test_the_cloud_beside_stops_when_the_rounds_fail_and_raises_its_own_error(
    tmp_path, monkeypatch, where, error
):
    """An error in the body, or Ctrl-C while the body's end waits for the cloud, stops the cloud's
    training at its next step and is raised as is; an error of the cloud's training is raised
    when the body ends."""
    from experiments import calibrate, demo
    from experiments.presets import get_preset

    preset = get_preset("smoke", [f"cache_dir={tmp_path}", "cloud_pretrain.steps=3000"])
    seen, started = _watch_pretraining(monkeypatch, calibrate)
    if where == "wait":  # the body ends at once; Ctrl-C arrives while waiting for the cloud
        wait = concurrent.futures.wait

        def interrupted(futures, *args, **kw):
            assert started.wait(timeout=120)
            raise KeyboardInterrupt("rounds failed")

        monkeypatch.setattr(concurrent.futures, "wait", interrupted)
    with pytest.raises(error, match="rounds failed") as info:
        with demo._cloud_beside(preset, progress=False):
            if where == "body":
                assert started.wait(timeout=120)
                raise error("rounds failed")
    if where == "wait":
        monkeypatch.setattr(concurrent.futures, "wait", wait)
    assert not getattr(info.value, "__notes__", None)
    assert isinstance(seen["cloud"], floe_jax.pretrain.PretrainStopped), seen

    def failing(*args, **kw):
        raise OSError("cloud cache unwritable")

    monkeypatch.setattr(calibrate, "pretrain_cached", failing)
    with pytest.raises(OSError, match="cloud cache unwritable"):
        with demo._cloud_beside(preset, progress=False):
            pass


def test_run_demo_trains_the_rounds_on_the_edge_alone_beside_the_cloud(tmp_path, monkeypatch):
    """`run_demo` on one process runs the federated stage inside `_cloud_beside`, asking it for
    the edge only, and evaluates after the cloud is done."""
    import contextlib

    from experiments import demo
    from experiments.presets import get_preset

    calls = []

    @contextlib.contextmanager
    def beside(preset, progress):
        calls.append("cloud starts")
        yield
        calls.append("cloud done")

    monkeypatch.setattr(demo, "_cloud_beside", beside)
    monkeypatch.setattr(demo, "run_federate", lambda *a, **kw: calls.append(kw["models"]))
    monkeypatch.setattr(demo, "run_evaluate", lambda *a, **kw: calls.append("evaluate") or {})
    monkeypatch.setattr(demo, "format_report", lambda result: "")
    demo.run_demo(get_preset("smoke", [f"cache_dir={tmp_path}"]), str(tmp_path), progress=False)
    assert calls == ["cloud starts", ("edge",), "cloud done", "evaluate"]
