"""floe_jax.sharding: a federated round over a mesh equals the round on one device, on 8 virtual
CPU devices and across two `jax.distributed` processes (which also resume after a kill), and the
mesh and cloud sharding rules.

The multi-device runs are subprocesses (`tests/_sharding_worker.py`): this session's jax is
already initialised with one device. Every subprocess is bounded by a timeout and killed in
`finally`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from floe_jax import sharding
from floe_jax.config import ConfigError
from floe_jax.model import init_params, unstack_layers

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharding_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))
TIMEOUT_S = 420


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(args: list[str], devices: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WORKER, *args], env=_env(devices), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _wait(procs, logs, deadline: float) -> None:
    for p, log in zip(procs, logs, strict=True):
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        if rc != 0:
            with open(log) as f:
                tail = f.read()[-3000:]
            raise AssertionError(f"worker exited {rc}:\n{tail}")


def _load(path: str) -> dict:
    z = np.load(path)
    out = {k: z[k] for k in z.files if k.startswith("leaf")}
    return {"leaves": out, "rows": json.loads(str(z["rows"])), "reduces": bool(z["reduces"])}


def _assert_same_run(got: dict, want: dict) -> None:
    assert sorted(got["leaves"]) == sorted(want["leaves"])
    for k, x in want["leaves"].items():
        np.testing.assert_allclose(got["leaves"][k], x, rtol=0, atol=1e-5, err_msg=k)
    for r, q in zip(got["rows"], want["rows"], strict=True):
        assert r["clients"] == q["clients"] and r["included"] == q["included"]
        assert r["tokens"] == q["tokens"]
        assert r["loss"] == pytest.approx(q["loss"], rel=0, abs=1e-5)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """The same two-round run with no mesh, with `clients=8` and with `clients=4,fsdp=2`, in
    one subprocess of 8 virtual CPU devices."""
    tmp = tmp_path_factory.mktemp("eight")
    log = str(tmp / "log.txt")
    specs = ["none", "clients=8", "clients=4,fsdp=2"]
    with open(log, "w") as f:
        p = _start(
            [str(tmp), str(tmp / "runs"), "--mesh", ";".join(specs), "--cloud", "--memory"], 8, f
        )
    try:
        _wait([p], [log], time.monotonic() + TIMEOUT_S)
    finally:
        _stop([p])
    runs = [_load(str(tmp / f"{i}.npz")) for i in range(len(specs))]
    with open(tmp / "memory.json") as f:
        memory = json.load(f)
    return runs, dict(np.load(str(tmp / "cloud.npz"))), memory, tmp / "runs"


@pytest.mark.slow
def test_a_round_on_eight_devices_equals_one_device(eight_devices):
    one, clients, fsdp = eight_devices[0]
    assert len(one["rows"]) == 2 and not one["reduces"]
    for run in (clients, fsdp):
        # The clients really are split: the aggregation reduces across devices.
        assert run["reduces"]
        _assert_same_run(run, one)


@pytest.mark.slow
def test_a_cloud_split_over_two_devices_serves_the_same_logprobs(eight_devices):
    cloud = eight_devices[1]
    assert cloud["whole_devices"] == 1 and not cloud["whole_split"]
    assert cloud["model2_devices"] == 2 and cloud["model2_split"]  # q/k/v really split
    # A prefill and two decode steps extending its stream, whole and tensor-parallel.
    np.testing.assert_allclose(cloud["model2"], cloud["whole"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_round_bytes_per_device_counts_each_devices_shards(eight_devices):
    mem = eight_devices[2]
    state, params, data = mem["state"], mem["params"], mem["data"]
    # One device holds everything; a clients axis of 8 splits only the data eight ways.
    assert mem["clients=1"]["arguments"] == state + params + data
    assert mem["clients=8"]["arguments"] == state + params + data // 8
    # fsdp=2 halves the base's matrices (vectors stay whole): less than `clients=8`'s.
    fsdp = mem["clients=4,fsdp=2"]["arguments"]
    assert state + params // 2 + data // 4 <= fsdp < state + params + data // 4
    for m in (mem["clients=1"], mem["clients=8"]):
        assert m["total"] == m["arguments"] + m["temporaries"] + m["outputs"] > m["arguments"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster(tmp, name: str, extra: list[str]):
    """Two processes of 4 virtual CPU devices each joined on the loopback interface."""
    port = _free_port()
    out = tmp / name
    out.mkdir()
    procs, logs = [], []
    for i in range(2):
        logs.append(str(out / f"log{i}.txt"))
        args = [str(out / f"p{i}"), str(tmp / "runs"), "--mesh", "clients=8",
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i), *extra]  # fmt: skip
        os.makedirs(args[0])
        with open(logs[-1], "w") as f:
            procs.append(_start(args, 4, f))
    return procs, logs, out


@pytest.mark.slow
def test_two_processes_equal_one_device_and_resume_after_a_kill(eight_devices, tmp_path):
    one = eight_devices[0][0]
    procs = []
    try:
        # Both processes checkpoint round 1 of 2, then one of them is killed.
        procs, logs, out = _cluster(tmp_path, "killed", ["--stop-after", "1", "--then-wait"])
        deadline = time.monotonic() + TIMEOUT_S
        while not all("CHECKPOINTED" in open(x).read() for x in logs):
            for p, log in zip(procs, logs, strict=True):
                assert p.poll() is None, open(log).read()[-3000:]
            assert time.monotonic() < deadline, "the cluster never checkpointed round 1"
            time.sleep(0.2)
        os.killpg(procs[1].pid, signal.SIGKILL)
        assert procs[1].wait(timeout=30) == -signal.SIGKILL
        _stop(procs)  # a cluster restarts all its processes
        loaded = [json.loads(open(x).read().splitlines()[0]) for x in logs]
        # Each process loaded only its own half of the 16 clients.
        assert loaded[0]["loaded"] == list(range(8)) and loaded[1]["loaded"] == list(range(8, 16))

        # Restarted, both resume from the checkpoint and finish the run.
        procs, logs, out = _cluster(tmp_path, "resumed", [])
        _wait(procs, logs, time.monotonic() + TIMEOUT_S)

        # Another rule into the finished run's folder: process 0 alone claims the folder and
        # finds the mismatch; both processes stop with an error, neither waits at a barrier.
        bad, bad_logs, _ = _cluster(tmp_path, "mismatch", ["--agg", "fedit"])
        procs = bad
        codes = [p.wait(timeout=120) for p in bad]
        texts = [open(x).read() for x in bad_logs]
        assert codes[0] != 0 and "RunMismatchError" in texts[0], texts[0][-3000:]
        assert codes[1] != 0, texts[1][-3000:]
        assert "ProcessFailedError" in texts[1] and "claim_run_dir" in texts[1], texts[1][-3000:]
    finally:
        _stop(procs)
    runs = [_load(str(out / f"p{i}" / "0.npz")) for i in range(2)]
    for run in runs:
        assert [r["round"] for r in run["rows"]] == [1]  # resumed, not started over
        assert run["reduces"]
        _assert_same_run(run, {**one, "rows": one["rows"][1:]})
    with open(tmp_path / "runs" / "0" / "metrics.jsonl") as f:
        assert [json.loads(x)["round"] for x in f] == [0, 1]  # written once, by process 0
    # Floe's update clustering, computed before round 0 from every process's clients.
    with open(tmp_path / "runs" / "0" / "clusters.json") as f:
        got = json.load(f)
    with open(eight_devices[3] / "0" / "clusters.json") as f:
        want = json.load(f)
    assert got["assignment"] == want["assignment"]
    np.testing.assert_allclose(got["similarity"], want["similarity"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- rules


def test_together_stops_every_process_when_one_fails(monkeypatch):
    """`together` as seen from one process of two (the agreement, `process_allgather`, stubbed
    with what each process reports): the process whose step failed raises its own error, every
    other one a `ProcessFailedError` naming the step and the failed process; `primary_only`
    runs the step on process 0 alone."""
    from jax.experimental import multihost_utils

    reported = []
    monkeypatch.setattr(sharding.jax, "process_count", lambda: 2)
    monkeypatch.setattr(
        multihost_utils, "process_allgather",
        lambda flag: reported.append(int(flag)) or np.asarray(flags),
    )  # fmt: skip

    def as_process(i):
        monkeypatch.setattr(sharding.jax, "process_index", lambda: i)

    flags = [0, 0]
    as_process(1)
    assert sharding.together("step", lambda: "done") == "done"  # every process runs it
    assert sharding.together("step", lambda: "done", primary_only=True) is None
    flags = [0, 1]  # process 1's step fails: it re-raises its own error after the agreement

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sharding.together("write", broken)
    assert reported[-1] == 1
    as_process(0)  # process 0 ran its step fine and learns of process 1's failure
    with pytest.raises(sharding.ProcessFailedError, match=r"\[1\] failed at 'write'"):
        sharding.together("write", lambda: "done")
    assert reported[-1] == 0


def test_mesh_specs_name_what_is_wrong():
    assert sharding.parse_mesh_spec("clients=4,fsdp=2") == {"clients": 4, "fsdp": 2}
    for bad, why in [
        ("clients", "AXIS=SIZE"),
        ("gpus=2", "AXIS=SIZE"),
        ("clients=2,clients=2", "twice"),
        ("clients=x", "not an int"),
        ("clients=0", ">= 1"),
    ]:
        with pytest.raises(ConfigError, match=why):
            sharding.parse_mesh_spec(bad)
    n = len(jax.devices())
    with pytest.raises(ConfigError, match=f"{n + 1} devices, but {n} are present"):
        sharding.make_mesh(f"clients={n + 1}")
    assert dict(sharding.make_mesh("clients=-1").shape) == {"clients": n}


def _abstract_mesh(**axes):
    return jax.sharding.AbstractMesh(
        tuple(axes.values()), tuple(axes), (jax.sharding.AxisType.Auto,) * len(axes)
    )


def test_base_and_cloud_rules_split_the_axes_they_name(tiny_cfg):
    params = jax.eval_shape(lambda: init_params(tiny_cfg, key=jax.random.key(0)))

    def spec(s):  # the PartitionSpec without trailing Nones
        parts = list(s.spec)
        while parts and parts[-1] is None:
            parts.pop()
        return tuple(parts)

    base = sharding.base_sharding(_abstract_mesh(clients=2, fsdp=2), params)
    assert spec(base["layers"]["q_proj"]["w"]) == (None, "fsdp")  # [L, I, O]: I
    assert spec(base["embed"]) == ("fsdp",)  # [V, D]: V
    assert spec(base["norm"]) == ()  # vectors replicated
    tp = sharding.cloud_sharding(_abstract_mesh(model=2), params)
    assert spec(tp["layers"]["q_proj"]["w"]) == (None, None, "model")  # heads
    assert spec(tp["layers"]["up_proj"]["w"]) == (None, None, "model")  # MLP width
    assert spec(tp["embed"]) == ("model",) and spec(tp["lm_head"]) == (None, "model")
    assert spec(tp["layers"]["o_proj"]["w"]) == (None, "model")  # back to D: its input
    assert spec(tp["layers"]["down_proj"]["w"]) == (None, "model")
    assert spec(tp["layers"]["input_norm"]) == ()
    # unstack_layers' decode layout: per-layer dicts with q/k/v fused on the output axis.
    per_layer = jax.eval_shape(unstack_layers, params)
    tp = sharding.cloud_sharding(_abstract_mesh(model=2), per_layer)
    assert spec(tp["layers"][0]["q_proj+k_proj+v_proj"]["w"]) == (None, "model")
    # An axis that divides nothing leaves the leaf whole.
    odd = sharding.cloud_sharding(_abstract_mesh(model=7), params)
    assert spec(odd["layers"]["q_proj"]["w"]) == ()


def test_federate_command_line_refuses_a_bad_mesh_or_half_a_cluster(capsys):
    from experiments.cli import main

    n = len(jax.devices())
    assert main(["federate", "--mesh", f"clients={n + 1}", "--out", "unused"]) == 2
    assert f"{n + 1} devices, but {n} are present" in capsys.readouterr().err
    assert main(["federate", "--coordinator", "127.0.0.1:1", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--coordinator, --num-processes and --process-id" in err
