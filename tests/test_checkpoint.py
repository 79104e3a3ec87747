"""Tests of floe_jax/checkpoint.py and of exact resume (federated/loop.py, run_folder.py)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax import checkpoint
from floe_jax.config import LoRAConfig
from floe_jax.federated.aggregate import Rule, make_rule, register_rule, unregister_rule
from floe_jax.federated.config import AggregationConfig, FedConfig
from floe_jax.federated.loop import train_federated
from floe_jax.federated.rounds import init_server_state
from floe_jax.federated.types import client_data

# A read of a damaged step fails inside orbax's event loop and leaves a callback that fires after
# the loop closed; pytest reports it, at garbage collection, against whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

T = 10
FED = FedConfig(
    num_rounds=4,
    clients_per_round=3,
    local_steps=2,
    batch_size=2,
    seq_len=T,
    lr=1e-2,
    lora=LoRAConfig(rank=8, targets=("q", "v")),
    checkpoint_every=2,  # odd rounds' metrics are fetched one round late
    max_to_keep=1,
)
RANKS = [2, 4, 8, 4, 2]


def _data(vocab, bad=None):
    rng = np.random.default_rng(0)
    ex = []
    for i in range(len(RANKS)):
        n = 2 + i % 3
        t = rng.integers(0, vocab - 1, (n, T)).astype(np.int32)
        if i == bad:  # the one client that reads token vocab - 1 (NaN in `_nan_token`'s base)
            t[0, 3] = vocab - 1
        ex.append((t, np.ones((n, T), np.float32), np.ones((n, T), np.float32)))
    return client_data(ex)


def test_save_restore_roundtrip_and_mismatch(tmp_path, tiny_cfg):
    state = init_server_state(
        tiny_cfg, FED, ranks=RANKS, assignment=[0, 1, 0, 1, 0], num_clusters=2
    )
    state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)
    checkpoint.save(str(tmp_path), 3, state, {"note": "x"})
    assert checkpoint.latest_step(str(tmp_path)) == 3
    like = init_server_state(tiny_cfg, FED, ranks=RANKS, assignment=[0] * 5, num_clusters=2)
    got, meta = checkpoint.restore(str(tmp_path), like)
    assert meta == {"note": "x"}
    assert type(got) is type(state)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(state), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    register_rule("test-folding-ckpt")(lambda: _folding(tiny_cfg))
    try:
        fed = dataclasses.replace(FED, agg=AggregationConfig(method="test-folding-ckpt"))
        other = init_server_state(tiny_cfg, fed, ranks=RANKS, num_clusters=2)
    finally:
        unregister_rule("test-folding-ckpt")
    with pytest.raises(ValueError, match="only in template"):
        checkpoint.restore(str(tmp_path), other)
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(str(tmp_path / "none"), like)


def _folding(cfg):
    fedavg = make_rule("fedavg")
    L, (I, O) = cfg.num_layers, cfg.proj_shape("q_proj")

    def apply(state, loras, weights, ranks, *, key):
        out, state = fedavg.apply(state, loras, weights, ranks, key=key)
        return dataclasses.replace(out, base_delta={"q_proj": jnp.zeros((L, I, O))}), state

    return Rule(fedavg.init, apply, init_base=lambda g: {"q_proj": jnp.zeros((L, I, O))})


def _rows(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        r.pop("seconds")
    return rows


def _nan_token(params, cfg):
    """The base with a NaN embedding for the last token id: a client whose data holds it trains
    a NaN update (an out-of-vocabulary id, the old way to get one, is now refused up front)."""
    return {**params, "embed": params["embed"].at[cfg.vocab_size - 1].set(jnp.nan)}


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tiny_cfg, tiny_params):
    data = _data(tiny_cfg.vocab_size, bad=3)
    tiny_params = _nan_token(tiny_params, tiny_cfg)
    kw = dict(cfg=tiny_cfg, fed=FED, ranks=RANKS, eval_data=data, progress=False)
    full, _ = train_federated(tiny_params, data, run_dir=str(tmp_path / "a"), **kw)
    part, _ = train_federated(tiny_params, data, run_dir=str(tmp_path / "b"), stop_after=2, **kw)
    assert int(part.round) == 2
    # A new loop (as after a kill) resumes from the checkpoint dir, not from `part`.
    os.remove(tmp_path / "b" / "metrics.jsonl")  # lost log lines are restored from the checkpoint
    resumed, rows = train_federated(tiny_params, data, run_dir=str(tmp_path / "b"), **kw)
    assert [r["round"] for r in rows] == [2, 3]
    assert int(resumed.round) == 4
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ra, rb = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["round"] for r in rb] == [1, 2, 3]  # round 0's line was lost with the file
    assert ra[1:] == rb
    with_bad = [r for r in ra if 3 in r["clients"]]
    assert with_bad and all("non-finite" in r["dropped"]["3"] for r in with_bad)
    assert all(set(r["dropped"]) <= {"3"} for r in ra)
    assert all(np.isfinite(r["loss"]) for r in ra)


# ----------------------------------------------------------------------------- integrity


def _random_state(seed):
    """Random floats: they do not compress, so a flipped byte still decodes (silently)."""
    rng = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32),
        "step": jnp.asarray(seed, jnp.int32),
    }


def _two_steps(path):
    checkpoint.save(str(path), 1, _random_state(1), {"step": 1}, max_to_keep=3)
    checkpoint.save(str(path), 2, _random_state(2), {"step": 2}, max_to_keep=3)


def _data_files(step_dir):
    """A step's array data files (OCDBT keeps them in `d/` folders; a file may hold bytes that
    no array reads)."""
    return [
        os.path.join(r, f)
        for r, _, fs in os.walk(step_dir / "state")
        if os.path.basename(r) == "d"
        for f in fs
    ]


def _largest_file(step_dir):
    return max(_data_files(step_dir), key=os.path.getsize)


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _flip(path, n=16):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    with open(path, "wb") as f:
        f.write(bytes(data))


def _assert_state(got, want):
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_names_each_leaf_whose_shape_or_dtype_differs(tmp_path, tiny_cfg, kernel_cfg):
    """A template from a wider model fails before any array is read, naming the leaf with the
    saved and the expected shape (restore used to compare leaf names only)."""
    state = init_server_state(tiny_cfg, FED, ranks=RANKS)
    checkpoint.save(str(tmp_path), 1, state)
    wide = init_server_state(kernel_cfg, FED, ranks=RANKS)  # hidden 32 -> 64
    with pytest.raises(ValueError, match=r"global_loras\.a\['q_proj'\]: saved \[1, 2, 32, 8\] "
                       r"float32, expected \[1, 2, 64, 8\] float32"):  # fmt: skip
        checkpoint.restore(str(tmp_path), wide)
    as_int = jax.tree.map(lambda x: x.astype(jnp.int32) if x.dtype == jnp.float32 else x, state)
    with pytest.raises(ValueError, match=r"scale: saved \[1\] float32, expected \[1\] int32"):
        checkpoint.restore(str(tmp_path), as_int)


def test_checksums_detect_flipped_bytes_and_fall_back(tmp_path):
    """16 flipped bytes in the newest step's data decode without error in orbax; the leaf's
    SHA-256 catches them and the previous step is restored, with a warning naming step 2."""
    _two_steps(tmp_path)
    _flip(_largest_file(tmp_path / "2"))
    with pytest.warns(UserWarning, match=r"step 2 is damaged.*\['a'\] fails its SHA-256"):
        got, meta = checkpoint.restore(str(tmp_path), _random_state(0))
    assert meta == {"step": 1}
    _assert_state(got, _random_state(1))


@pytest.mark.parametrize("damage", ["truncated data", "broken manifest", "broken metadata"])
def test_damaged_newest_step_falls_back_to_the_previous(tmp_path, damage):
    _two_steps(tmp_path)
    if damage == "truncated data":
        _truncate(_largest_file(tmp_path / "2"))
    elif damage == "broken manifest":
        (tmp_path / "2" / "state" / "manifest.ocdbt").write_bytes(b"not a manifest")
    else:
        (tmp_path / "2" / "meta" / "metadata").write_text('{"paths": [')
    with pytest.warns(UserWarning, match=f"{tmp_path} step 2 is damaged and skipped"):
        got, meta = checkpoint.restore(str(tmp_path), _random_state(0))
    assert meta == {"step": 1}
    _assert_state(got, _random_state(1))
    # an explicit step is restored or refused, never swapped for another
    with pytest.raises(checkpoint.CorruptCheckpointError, match="step 2"):
        checkpoint.restore(str(tmp_path), _random_state(0), step=2)


def test_no_intact_step_is_an_error_naming_the_folder(tmp_path):
    _two_steps(tmp_path)
    _truncate(_largest_file(tmp_path / "2"))
    _flip(_largest_file(tmp_path / "1"))
    with (
        pytest.warns(UserWarning, match="step 2"),
        pytest.raises(
            checkpoint.CorruptCheckpointError,
            match=f"no intact checkpoint in {tmp_path}: step 2: .*; step 1: .*SHA-256",
        ),
    ):
        checkpoint.restore(str(tmp_path), _random_state(0))


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, tiny_cfg, tiny_params):
    """A run whose newest checkpoint was truncated resumes from the one before it, with a
    warning, redoes the lost round and ends equal to the uninterrupted run."""
    data = _data(tiny_cfg.vocab_size)
    fed = dataclasses.replace(FED, checkpoint_every=1, max_to_keep=2)
    kw = dict(cfg=tiny_cfg, fed=fed, ranks=RANKS, progress=False)
    full, _ = train_federated(tiny_params, data, run_dir=str(tmp_path / "a"), **kw)
    train_federated(tiny_params, data, run_dir=str(tmp_path / "b"), stop_after=3, **kw)
    for path in _data_files(tmp_path / "b" / "checkpoints" / "3"):
        _truncate(path)
    with pytest.warns(UserWarning, match="step 3 is damaged"):
        resumed, rows = train_federated(tiny_params, data, run_dir=str(tmp_path / "b"), **kw)
    assert [r["round"] for r in rows] == [2, 3]
    _assert_state(resumed, full)
    ra, rb = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert ra == rb
