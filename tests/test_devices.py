"""Tests for floe_jax/devices/ and floe_jax/cost_table.py (and experiments/profile.py)."""

import dataclasses
import json

import jax
import pytest

from floe_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig
from floe_jax.cost_table import (
    CostEntry,
    CostTable,
    local_memory_bytes,
    measure_bandwidth_and_flops,
    measure_cost_table,
    model_key,
)
from floe_jax.devices import (
    CATALOG,
    DeviceProfile,
    RankAssignmentError,
    assign_ranks,
    candidate_costs,
    decode_energy_j_per_token,
    decode_ms_per_token,
    default_candidates,
    get_device,
    lora_param_count,
    toy_budgets,
    train_memory_breakdown,
    train_memory_bytes,
)
from floe_jax.lora import init_lora, num_lora_params

# Qwen2.5-0.5B's shapes: the cost model never allocates, so a real size costs nothing.
QWEN = ModelConfig(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    qkv_bias=True,
    tie_word_embeddings=True,
    dtype="bfloat16",
)
WORK = dict(batch=4, seq_len=256)


def _device(name="test-dev", mem=64 * 2**30, **kw):
    base = dict(peak_flops=10e12, mem_bandwidth_bytes_per_s=100e9, power_watts=10.0)
    return DeviceProfile(name=name, memory_bytes=int(mem), **{**base, **kw})


def _key(c):
    return (c.rank, c.targets, c.layers)


# ----------------------------------------------------------------------------- catalog


def test_catalog_and_get_device():
    for name in (
        "jetson-orin-nano-8gb",
        "jetson-orin-nx-16gb",
        "jetson-agx-orin-64gb",
        "raspberry-pi-5-8gb",
        "apple-a17-pro",
        "ryzen-7-7840u",
        "rtx-4090",
    ):
        assert get_device(name).name == name
    # Orin Nano: FP16 dense tensor rate is a quarter of the datasheet's 40 sparse INT8 TOPS.
    assert get_device("jetson-orin-nano-8gb").peak_flops * 4 == pytest.approx(40.96e12)
    assert get_device("rtx-4090").mem_bandwidth_bytes_per_s == 1008e9
    with pytest.raises(KeyError, match="raspberry-pi-5-8gb"):
        get_device("jetson-nano-classic")
    with pytest.raises(ValueError, match="memory_bytes"):
        _device(mem=0)
    assert len(CATALOG) >= 7


# ----------------------------------------------------------------------------- cost model


def test_lora_param_count_by_hand(tiny_cfg):
    # tiny: D=32, F=64, Q=32, KV=16. q: 32+32, v: 32+16 -> rank 4, one layer: 4 * (64 + 48).
    cfg = LoRAConfig(rank=4, targets=("q", "v"), layers=(1,))
    assert lora_param_count(tiny_cfg, cfg) == 448
    # All seven, both layers, rank 2: 2 * 2 * (64 + 48 + 48 + 64 + 96 + 96 + 96).
    full = LoRAConfig(rank=2)
    assert lora_param_count(tiny_cfg, full) == 2048
    for c in (cfg, full):
        assert lora_param_count(tiny_cfg, c) == num_lora_params(
            init_lora(tiny_cfg, c, key=jax.random.key(0))
        )
    assert lora_param_count(tiny_cfg, None) == 0


def test_train_memory_parts_by_hand(tiny_cfg):
    b = train_memory_breakdown(tiny_cfg, LoRAConfig(rank=2), batch=1, seq_len=4)
    assert b["base"] == tiny_cfg.num_params * 4
    assert b["lora_state"] == 2048 * 16
    assert b["total"] == b["base"] + b["activations"] + b["lora_state"]
    half = train_memory_breakdown(
        tiny_cfg, LoRAConfig(rank=2), batch=1, seq_len=4, weight_dtype="bfloat16"
    )
    assert half["base"] == tiny_cfg.num_params * 2


def test_cost_model_monotone_in_rank_targets_and_work():
    dev = get_device("jetson-orin-nano-8gb")
    for targets in (("q", "v"), LORA_TARGETS):
        mems, times = [], []
        for r in (2, 4, 8, 16, 32, 64):
            c = LoRAConfig(rank=r, targets=targets)
            mems.append(train_memory_bytes(QWEN, c, **WORK))
            times.append(decode_ms_per_token(QWEN, c, dev))
        assert mems == sorted(mems) and len(set(mems)) == len(mems)
        assert times == sorted(times) and len(set(times)) == len(times)
    c = LoRAConfig(rank=8)
    assert train_memory_bytes(QWEN, c, batch=8, seq_len=256) > train_memory_bytes(QWEN, c, **WORK)
    assert decode_ms_per_token(QWEN, c, dev, context=2048) > decode_ms_per_token(QWEN, c, dev)
    # Merged adapters cost nothing extra at decode time.
    assert decode_ms_per_token(QWEN, c, dev, merged=True) == decode_ms_per_token(QWEN, None, dev)
    # A faster device is faster.
    assert decode_ms_per_token(QWEN, c, get_device("rtx-4090")) < decode_ms_per_token(QWEN, c, dev)


def test_decode_roofline_and_energy_by_hand(tiny_cfg):
    # Bandwidth-bound toy device: time = bytes / bandwidth.
    dev = _device(peak_flops=1e30, mem_bandwidth_bytes_per_s=1e9, power_watts=5.0)
    linear = sum(a * b for a, b in map(tiny_cfg.proj_shape, LORA_TARGETS)) * 2
    head = 32 * 96
    kv = 2 * 2 * 16 * 10  # 2 (k, v) * L * KV * context
    want_ms = 1e3 * (linear + head + kv) * 4 / 1e9
    assert decode_ms_per_token(tiny_cfg, None, dev, context=10) == pytest.approx(want_ms)
    e = decode_energy_j_per_token(tiny_cfg, None, dev, context=10)
    assert e == pytest.approx(5.0 * want_ms / 1e3)
    assert decode_energy_j_per_token(tiny_cfg, None, dev, batch=2, decode_ms=4.0) == 0.01


# ----------------------------------------------------------------------------- assignment


def _assert_largest_fitting(choice, device, deadline, cands):
    costs = candidate_costs(QWEN, device, cands, **WORK)
    idx = [i for i, c in enumerate(costs) if _key(c.lora_cfg) == _key(choice)]
    assert len(idx) == 1
    i = idx[0]
    assert costs[i].fits(device, deadline)
    larger = costs[i + 1 :]
    assert larger, "the test needs a larger candidate that does not fit"
    assert not any(c.fits(device, deadline) for c in larger)
    return costs, i


def test_assign_ranks_respects_memory_and_deadline():
    cands = default_candidates()
    ordered = candidate_costs(QWEN, _device(), cands, **WORK)
    # The grid has cost ties (q/v rank 32 and q/k/v/o rank 16 have equal parameter counts);
    # pick a middle candidate whose successor costs strictly more.
    k = next(
        i
        for i in range(len(ordered) // 2, len(ordered) - 1)
        if ordered[i + 1].train_mem_bytes > ordered[i].train_mem_bytes
        and ordered[i + 1].decode_ms > ordered[i].decode_ms
    )
    mid = ordered[k]
    # Memory-bound device: budget exactly the middle candidate's need, deadline generous.
    mem_dev = _device("mem-bound", mem=mid.train_mem_bytes)
    # Deadline-bound device: plenty of memory, deadline exactly the middle candidate's time.
    time_dev = _device("time-bound", mem=1e12)
    deadline = [1e9, mid.decode_ms]
    out = assign_ranks(QWEN, [mem_dev, time_dev], deadline_ms=deadline, **WORK, pad_to_max=False)
    for choice, dev, dl in zip(out, [mem_dev, time_dev], deadline, strict=True):
        _, i = _assert_largest_fitting(choice, dev, dl, cands)
        assert i == k
    # The cost model orders the default grid by parameter count: q/v rank 64 beats all-7 rank 2.
    assert _key(ordered[-1].lora_cfg) == (64, LORA_TARGETS, None)


def test_assign_ranks_pads_and_keeps_template():
    tmpl = LoRAConfig(alpha=32.0, rslora=True)
    cands = default_candidates((2, 4), [("q", "v")], template=tmpl)
    small = _device("small", mem=train_memory_bytes(QWEN, cands[0], **WORK))
    big = _device("big")
    out = assign_ranks(QWEN, [small, big], deadline_ms=1e9, candidates=cands, **WORK)
    assert [c.rank for c in out] == [2, 4]
    assert all(c.max_rank == 4 and c.alpha == 32.0 and c.rslora for c in out)


def test_assign_ranks_error_names_device_and_need():
    dev = _device("tiny-box", mem=2**30, mem_bandwidth_bytes_per_s=1e9)
    need = train_memory_bytes(QWEN, LoRAConfig(rank=2, targets=("q", "v")), **WORK)
    with pytest.raises(RankAssignmentError) as err:
        assign_ranks(QWEN, [_device("ok"), dev], deadline_ms=50.0, **WORK)
    msg = str(err.value)
    assert "client 1" in msg and "'tiny-box'" in msg and "rank=2" in msg and "q/v" in msg
    assert f"{need / 2**30:.2f} GiB" in msg and "budget 1.00 GiB" in msg
    ms = decode_ms_per_token(QWEN, LoRAConfig(rank=2, targets=("q", "v")), dev)
    assert f"{ms:.2f} ms/token" in msg and "deadline 50 ms" in msg


def test_cost_table_round_trip_and_lookup_precedence(tmp_path, tiny_cfg):
    cands = default_candidates((2, 4), [("q", "v")])
    work = dict(batch=1, seq_len=8)

    def entry(c, mem, ms):
        return CostEntry(
            rank=c.rank,
            targets=c.targets,
            layers=c.layers,
            decode_batch=1,
            context=16,
            train_mem_bytes=mem,
            train_step_ms=1.0,
            decode_mem_bytes=1,
            decode_ms=ms,
            **work,
        )

    # Measured: rank 4 needs far more memory than the model says; rank 2 is cheap.
    table = CostTable(
        device="box",
        machine="test",
        model=model_key(tiny_cfg),
        entries=(entry(cands[0], 100, 0.1), entry(cands[1], 10**12, 0.1)),
    )
    path = tmp_path / "table.json"
    table.save(path)
    loaded = CostTable.load(path)
    assert loaded == table
    assert json.loads(path.read_text())["entries"][0]["targets"] == ["q_proj", "v_proj"]
    hit = loaded.lookup(
        tiny_cfg, LoRAConfig(rank=2, alpha=99, targets=("v", "q")), context=16, **work
    )
    assert hit == table.entries[0]
    assert loaded.lookup(tiny_cfg, cands[0], context=32, **work) is None
    other = dataclasses.replace(tiny_cfg, num_layers=3)
    assert loaded.lookup(other, cands[0], context=16, **work) is None

    box = _device("box", mem=10**9)
    kw = dict(deadline_ms=1e9, candidates=cands, context=16, pad_to_max=False, **work)
    assert assign_ranks(tiny_cfg, [box], **kw)[0].rank == 4  # model only
    assert assign_ranks(tiny_cfg, [box], cost_table=loaded, **kw)[0].rank == 2  # measured wins
    costs = candidate_costs(tiny_cfg, box, cands, cost_table=[loaded], context=16, **work)
    assert [c.source for c in costs] == ["measured", "measured"]
    # A table measured on another device does not apply.
    elsewhere = dataclasses.replace(loaded, device="other")
    assert assign_ranks(tiny_cfg, [box], cost_table=elsewhere, **kw)[0].rank == 4
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1}')
    with pytest.raises(ValueError, match="bad.json"):
        CostTable.load(bad)


def test_measured_table_on_tiny_model(tmp_path, tiny_cfg):
    from experiments.profile import main

    out = tmp_path / "costs.json"
    cfg_json = json.dumps(
        {k: getattr(tiny_cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size")}
        | {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
    )
    table = main(
        [
            "--model-json",
            cfg_json,
            "--ranks",
            "2,8",
            "--targets",
            "qv",
            "--seq-len",
            "8",
            "--context",
            "4",
            "--repeats",
            "1",
            "--device",
            "box",
            "--out",
            str(out),
        ]
    )
    assert CostTable.load(out) == table
    assert table.model == model_key(tiny_cfg) and table.device == "box"
    small, large = table.entries
    assert (small.rank, large.rank) == (2, 8)
    for e in table.entries:
        assert e.train_mem_bytes > 0 and e.decode_mem_bytes > 0
        assert e.train_step_ms > 0 and e.decode_ms > 0
    # Larger adapters and their Adam state take more compiled memory.
    assert large.train_mem_bytes > small.train_mem_bytes
    # The measured table plugs into assignment.
    got = assign_ranks(
        tiny_cfg,
        [_device("box")],
        deadline_ms=1e6,
        candidates=[small.lora_cfg, large.lora_cfg],
        cost_table=table,
        batch=1,
        seq_len=8,
        context=4,
    )
    assert got[0].rank == 8


def test_measure_cost_table_default_args(tiny_cfg, tiny_params):
    table = measure_cost_table(
        tiny_cfg,
        [LoRAConfig(rank=2, layers=(0,))],
        params=tiny_params,
        seq_len=6,
        context=3,
        decode_batch=2,
        repeats=1,
    )
    (e,) = table.entries
    assert e.layers == (0,) and e.decode_batch == 2 and table.device == "local"
    flops, bw = measure_bandwidth_and_flops(n=64, mib=1, repeats=1)
    assert flops > 0 and bw > 0 and local_memory_bytes() > 0


def test_train_memory_follows_remat_and_loss_chunk():
    """The analytic memory model prices the model's memory options by hand: `loss_chunk = k`
    keeps k tokens' logits terms instead of every token's; `remat` keeps one layer's activation
    set and every layer's input instead of every layer's set."""
    kw = dict(batch=8, seq_len=512)
    tokens, a = 8 * 512, 2  # bf16 activations
    plain = train_memory_breakdown(QWEN, None, **kw)["activations"]
    chunked = train_memory_breakdown(dataclasses.replace(QWEN, loss_chunk=128), None, **kw)
    assert plain - chunked["activations"] == (tokens - 128) * 3 * QWEN.vocab_size * 4
    remat = train_memory_breakdown(dataclasses.replace(QWEN, remat=True), None, **kw)
    c = QWEN
    per_tok_layer = (
        4 * c.hidden_size + 2 * c.q_size + 2 * c.kv_size + c.num_heads * 512
        + 3 * c.intermediate_size
    )  # fmt: skip
    L, D = c.num_layers, c.hidden_size
    assert plain - remat["activations"] == tokens * a * ((L - 1) * per_tok_layer - L * D)


def test_real_scale_ranks_use_real_budgets():
    """A Qwen2.5-0.5B edge (batch 8 x 512) on the catalog's real budgets: without the memory
    options not even the 6 GiB of a Jetson Orin Nano holds the smallest adapter (the error
    names it); with `remat` and a chunked loss every device gets a rank from its real budget.
    `toy_budgets` (stand-in models only) maps budgets into a toy model's span instead."""
    devices = [get_device("jetson-orin-nano-8gb"), get_device("rtx-4090")]
    cands = [LoRAConfig(rank=r) for r in (2, 8, 64)]
    kw = dict(batch=8, seq_len=512, deadline_ms=1e9, candidates=cands)
    with pytest.raises(RankAssignmentError, match="jetson-orin-nano-8gb.*6.00 GiB"):
        assign_ranks(QWEN, devices, **kw)
    fits = dataclasses.replace(QWEN, remat=True, loss_chunk=128)
    assert [c.rank for c in assign_ranks(fits, devices, **kw)] == [64, 64]
    need64 = train_memory_bytes(fits, cands[-1], batch=8, seq_len=512)
    assert need64 < devices[0].memory_bytes  # real bytes against a real budget
    tiny = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2)  # fmt: skip
    toy = toy_budgets(tiny, devices, cands, batch=8, seq_len=512)
    assert [c.rank for c in assign_ranks(tiny, devices, **kw)] == [64, 64]
    got = [c.rank for c in assign_ranks(tiny, toy, **kw)]
    assert got[0] < got[1] == 64
