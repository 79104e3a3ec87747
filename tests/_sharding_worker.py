"""One federated run on this process's devices, for tests/test_sharding.py (run as a subprocess,
so its device count and `jax.distributed` cluster are its own).

    python tests/_sharding_worker.py OUT RUN_DIR [--mesh "none;clients=8;..."] [--rounds N]
        [--stop-after K --then-wait] [--coordinator HOST:PORT --num-processes P --process-id I]

For each mesh spec (`none`: no mesh) in turn, runs the same federated run in RUN_DIR/<i> and
writes the final server state's leaves, the metric rows this call wrote and whether the round's
compiled program reduces across devices to OUT/<i>.npz. With a cluster, each process loads only
its share of clients (`place_client_data(load=...)`). With `--then-wait`, after `--stop-after`
rounds it prints `CHECKPOINTED` and sleeps: a live process for the test to kill.
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def run(args) -> None:
    import jax

    from floe_jax import sharding

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

    if args.coordinator:
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from floe_jax.config import LoRAConfig, ModelConfig
    from floe_jax.federated import AggregationConfig, FedConfig, client_data, train_federated
    from floe_jax.model import init_params

    cfg = ModelConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    fed = FedConfig(
        num_rounds=args.rounds, clients_per_round=8, local_steps=2, batch_size=2, seq_len=12,
        lora=LoRAConfig(rank=4, targets=("q", "v")), agg=AggregationConfig(method=args.agg),
        checkpoint_every=1, client_chunk=1, clustering=args.clustering,
    )  # fmt: skip
    N = 16
    rng = np.random.default_rng(0)
    examples = [
        (
            rng.integers(0, cfg.vocab_size, (3 + i % 3, 12)).astype(np.int32),
            np.ones((3 + i % 3, 12), np.float32),
            (rng.random((3 + i % 3, 12)) < 0.7).astype(np.float32),
        )
        for i in range(N)
    ]
    ranks = [1 + i % 4 for i in range(N)]
    params = init_params(cfg, key=jax.random.key(0))
    for i, spec in enumerate(args.mesh.split(";")):
        mesh = None if spec == "none" else sharding.make_mesh(spec)
        if args.coordinator:  # each process builds only its own clients' rows
            seen = []

            def load(ids, seen=seen):
                seen.extend(int(c) for c in ids)
                return client_data([examples[c] for c in ids], min_examples=5)

            data = sharding.place_client_data(mesh, load=load, num_clients=N)
            print(json.dumps({"process": jax.process_index(), "loaded": seen}), flush=True)
        else:
            data = client_data(examples, min_examples=5)
        state, rows = train_federated(
            params, data, cfg=cfg, fed=fed, run_dir=os.path.join(args.run_dir, str(i)),
            ranks=ranks, progress=False, stop_after=args.stop_after, mesh=mesh,
        )  # fmt: skip
        if args.then_wait:
            print("CHECKPOINTED", flush=True)
            time.sleep(600)
        reduces = False
        if mesh is not None:  # the aggregation's sums over clients: cross-device reductions
            with jax.set_mesh(mesh):
                placed = sharding.place_round_inputs(mesh, state, params, data)
                hlo = sharding.round_program(mesh).lower(*placed, cfg=cfg, fed=fed)
                reduces = "all-reduce" in hlo.compile().as_text()
        leaves = {f"leaf{j}": np.asarray(x) for j, x in enumerate(jax.tree.leaves(state))}
        out = os.path.join(args.out, f"{i}.npz")
        np.savez(out, rows=json.dumps(rows), reduces=reduces, **leaves)

    if args.cloud:
        cloud_logprobs(args, cfg, params)
    if args.memory:  # one device's round memory under each mesh, and the bytes it holds
        data = client_data(examples, min_examples=5)
        nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
        mem = {"state": nbytes(state), "params": nbytes(params), "data": nbytes(data)}
        for spec in ("clients=1", "clients=8", "clients=4,fsdp=2"):
            n = int(np.prod(list(sharding.parse_mesh_spec(spec).values())))
            mesh = sharding.make_mesh(spec, jax.devices()[:n])
            got = sharding.round_bytes_per_device(mesh, state, params, data, cfg=cfg, fed=fed)
            mem[spec] = got
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump(mem, f)


def cloud_logprobs(args, cfg, params) -> None:
    """`LocalCloud`'s log-probs (a prefill, then a stream extended by decode steps) with the
    params whole and split tensor-parallel over `model=2`, to OUT/cloud.npz."""
    from floe_jax.inference.cloud import LocalCloud

    out = {}
    for name, mesh in (("whole", None), ("model2", "model=2")):
        cloud = LocalCloud(params, cfg, inputs="ids", headroom=8, mesh=mesh)
        first = cloud.logprobs([5, 9, 11], stream="s")
        later = cloud.logprobs([5, 9, 11, 3, 7], stream="s")
        assert cloud.stats["extends"] == 2, cloud.stats
        out[name] = np.stack([first, later])
        w = cloud.params["layers"][0]["q_proj+k_proj+v_proj"]["w"]
        out[name + "_devices"] = len(w.sharding.device_set)
        out[name + "_split"] = w.addressable_shards[0].data.shape[-1] < w.shape[-1]
    np.savez(os.path.join(args.out, "cloud.npz"), **out)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("run_dir")
    p.add_argument("--mesh", default="none")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stop-after", type=int)
    p.add_argument("--then-wait", action="store_true")
    p.add_argument("--cloud", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--agg", default="fedavg")
    p.add_argument("--clustering", default="updates")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    run(p.parse_args(sys.argv[1:]))
