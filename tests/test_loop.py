"""Tests of floe_jax/federated/loop.py and run_folder.py: run folders that cannot be confused
(fingerprints, restart) and runs that train nothing. Exact resume: tests/test_checkpoint.py."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from floe_jax.config import LoRAConfig
from floe_jax.federated.config import FedConfig
from floe_jax.federated.loop import load_trained, train_federated
from floe_jax.federated.run_folder import (
    FINGERPRINT_FILE,
    NothingTrainedError,
    RunMismatchError,
    UntrainedRunError,
    run_fingerprint,
)
from floe_jax.federated.types import client_data
from floe_jax.model import init_params

T = 8
FED = FedConfig(
    num_rounds=2,
    clients_per_round=3,
    local_steps=1,
    batch_size=2,
    seq_len=T,
    lr=1e-2,
    lora=LoRAConfig(rank=4, targets=("q", "v")),
)
RANKS = [2, 4, 4]


def _data(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ex = []
    for _ in RANKS:
        t = rng.integers(0, vocab, (2, T)).astype(np.int32)
        ex.append((t, np.ones((2, T), np.float32), np.ones((2, T), np.float32)))
    return client_data(ex)


def _run(params, data, run_dir, cfg, fed=FED, **kw):
    return train_federated(
        params, data, cfg=cfg, fed=fed, run_dir=str(run_dir), ranks=RANKS, progress=False, **kw
    )


def _equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_resume_with_another_lr_lists_the_difference(tmp_path, tiny_cfg, tiny_params):
    """`federate --out X` then `federate fed.lr=0.5 --out X` used to reuse the old run."""
    data = _data(tiny_cfg.vocab_size)
    _run(tiny_params, data, tmp_path, tiny_cfg)
    fast = dataclasses.replace(FED, lr=0.5, lora=dataclasses.replace(FED.lora, alpha=8.0))
    with pytest.raises(RunMismatchError, match="restart=True") as err:
        _run(tiny_params, data, tmp_path, tiny_cfg, fed=fast)
    lines = str(err.value).splitlines()[1:]
    assert lines == ["  fed.lora.alpha: saved 16.0, now 8.0", "  fed.lr: saved 0.01, now 0.5"]
    # settings that never change the numbers do not count; a finished run just returns
    same = dataclasses.replace(FED, checkpoint_every=2, max_to_keep=3, client_chunk=0)
    state, rows = _run(tiny_params, data, tmp_path, tiny_cfg, fed=same)
    assert rows == [] and int(state.round) == 2


def test_restart_starts_the_run_over(tmp_path, tiny_cfg, tiny_params):
    data = _data(tiny_cfg.vocab_size)
    _run(tiny_params, data, tmp_path / "x", tiny_cfg)
    fast = dataclasses.replace(FED, lr=0.5)
    state, rows = _run(tiny_params, data, tmp_path / "x", tiny_cfg, fed=fast, restart=True)
    assert [r["round"] for r in rows] == [0, 1]
    fresh, fresh_rows = _run(tiny_params, data, tmp_path / "y", tiny_cfg, fed=fast)
    assert _equal(state, fresh)
    metrics = (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in metrics] == [r["loss"] for r in fresh_rows]
    saved = json.loads((tmp_path / "x" / FINGERPRINT_FILE).read_text())
    assert saved["fed.lr"] == 0.5
    _run(tiny_params, data, tmp_path / "x", tiny_cfg, fed=fast)  # now the folder's run
    # restart keeps a folder's own run: nothing is cleared or retrained
    again, rows = _run(tiny_params, data, tmp_path / "x", tiny_cfg, fed=fast, restart=True)
    assert rows == [] and _equal(again, state)


def test_a_first_start_that_died_before_training_leaves_no_claim(tmp_path, tiny_cfg, tiny_params):
    """A folder with a fingerprint and nothing trained (killed during clustering) is empty."""
    data = _data(tiny_cfg.vocab_size)
    _run(tiny_params, data, tmp_path / "x", tiny_cfg)
    for f in os.listdir(tmp_path / "x"):
        if f != FINGERPRINT_FILE:
            path = tmp_path / "x" / f
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    fast = dataclasses.replace(FED, lr=0.5)
    state, rows = _run(tiny_params, data, tmp_path / "x", tiny_cfg, fed=fast)
    assert [r["round"] for r in rows] == [0, 1]


def test_resume_with_another_model_width_names_the_fields(tmp_path, tiny_cfg, tiny_params):
    """A wider model used to crash deep inside JAX on restore; the fingerprint names the model
    fields (and checkpoint.restore the leaves, tests/test_checkpoint.py)."""
    data = _data(tiny_cfg.vocab_size)
    _run(tiny_params, data, tmp_path, tiny_cfg)
    wide = dataclasses.replace(tiny_cfg, hidden_size=64, intermediate_size=96)
    wide_params = init_params(wide, key=jax.random.key(0))
    with pytest.raises(RunMismatchError) as err:
        _run(wide_params, data, tmp_path, wide)
    msg = str(err.value)
    assert "model.hidden_size: saved 32, now 64" in msg
    assert "model.intermediate_size: saved 64, now 96" in msg
    assert "base_params: saved" in msg


def test_fingerprint_covers_data_ranks_clusters_and_base(tiny_cfg, tiny_params):
    data = _data(tiny_cfg.vocab_size)
    fp = lambda **kw: run_fingerprint(
        kw.pop("params", tiny_params), kw.pop("data", data), cfg=tiny_cfg,
        **{"fed": FED, "ranks": RANKS, **kw},
    )  # fmt: skip
    base = fp()
    assert fp() == base  # deterministic
    changed = {
        "data": fp(data=_data(tiny_cfg.vocab_size, seed=1)),
        "eval_data": fp(eval_data=data),
        "ranks": fp(ranks=[4, 4, 4]),
        "assignment": fp(assignment=[0, 1, 0], num_clusters=2),
        "base_params": fp(params=jax.tree.map(lambda x: x * 2, tiny_params)),
        "fed.seed": fp(fed=dataclasses.replace(FED, seed=1)),
    }
    for key, other in changed.items():
        assert other[key] != base[key], key
    ignored = dataclasses.replace(FED, num_rounds=9, checkpoint_every=3, max_to_keep=5)
    assert fp(fed=ignored) == base
    assert fp(params=tiny_params) == run_fingerprint(
        tiny_params, data, cfg=dataclasses.replace(tiny_cfg, attention_impl="pallas"),
        fed=FED, ranks=RANKS,
    )  # fmt: skip


def test_a_run_can_go_on_past_its_rounds_but_not_back(tmp_path, tiny_cfg, tiny_params):
    data = _data(tiny_cfg.vocab_size)
    longer = dataclasses.replace(FED, num_rounds=3)
    full, _ = _run(tiny_params, data, tmp_path / "a", tiny_cfg, fed=longer)
    _run(tiny_params, data, tmp_path / "b", tiny_cfg)
    more, rows = _run(tiny_params, data, tmp_path / "b", tiny_cfg, fed=longer)
    assert [r["round"] for r in rows] == [2] and _equal(more, full)
    with pytest.raises(RunMismatchError, match="round 3, past FedConfig.num_rounds=2"):
        _run(tiny_params, data, tmp_path / "b", tiny_cfg)


def test_a_folder_with_an_unknown_run_is_refused(tmp_path, tiny_cfg, tiny_params):
    data = _data(tiny_cfg.vocab_size)
    _run(tiny_params, data, tmp_path, tiny_cfg)
    (tmp_path / FINGERPRINT_FILE).unlink()  # a run folder written before fingerprints
    with pytest.raises(RunMismatchError, match="without a fingerprint.json"):
        _run(tiny_params, data, tmp_path, tiny_cfg)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="run_dir=.*file/run.*cannot be a folder"):
        _run(tiny_params, data, tmp_path / "file" / "run", tiny_cfg)


def test_a_run_that_trains_nothing_fails_naming_why(tmp_path, tiny_cfg, tiny_params):
    """Every client's update is over `max_update_norm` in every round: the run used to exit
    normally with the initial adapters."""
    data = _data(tiny_cfg.vocab_size)
    fed = dataclasses.replace(FED, max_update_norm=1e-9)
    with pytest.raises(NothingTrainedError, match="dropped in every one of its 2 rounds") as err:
        _run(tiny_params, data, tmp_path, tiny_cfg, fed=fed)
    msg = str(err.value)
    for cid in range(3):
        assert f"client {cid}: update norm" in msg and "> max_update_norm=1e-09" in msg
    with pytest.raises(NothingTrainedError):  # and again on a rerun of the finished folder
        _run(tiny_params, data, tmp_path, tiny_cfg, fed=fed)
    # a run interrupted before its end is not judged yet
    state, _ = _run(tiny_params, data, tmp_path / "part", tiny_cfg, fed=fed, stop_after=1)
    assert int(state.round) == 1


def test_load_trained_never_trains(tmp_path, tiny_cfg, tiny_params):
    """Evaluation reads a finished run's adapters; an empty or unfinished folder is an error
    (evaluating used to train from scratch silently)."""
    data = _data(tiny_cfg.vocab_size)
    kw = dict(cfg=tiny_cfg, fed=FED, ranks=RANKS)
    with pytest.raises(UntrainedRunError, match="holds no trained adapters"):
        load_trained(tiny_params, data, run_dir=str(tmp_path / "none"), **kw)
    assert not (tmp_path / "none").exists()
    _run(tiny_params, data, tmp_path, tiny_cfg, stop_after=1)
    with pytest.raises(UntrainedRunError, match="holds round 1 of FedConfig.num_rounds=2"):
        load_trained(tiny_params, data, run_dir=str(tmp_path), **kw)
    state, _ = _run(tiny_params, data, tmp_path, tiny_cfg)
    assert _equal(load_trained(tiny_params, data, run_dir=str(tmp_path), **kw), state)
    with pytest.raises(RunMismatchError, match="fed.lr: saved 0.01, now 0.5"):
        fast = dataclasses.replace(FED, lr=0.5)
        load_trained(tiny_params, data, run_dir=str(tmp_path), **{**kw, "fed": fast})
