"""One federated run on this process's devices, for tests/test_sharding.py (run as a subprocess,
so its device count and `jax.distributed` cluster are its own).

    python tests/_sharding_worker.py OUT.npz RUN_DIR [--mesh SPEC] [--rounds N]
        [--stop-after K] [--coordinator HOST:PORT --num-processes P --process-id I]

Writes the final server state's leaves and the metric rows this call wrote to OUT.npz. With a
cluster, each process loads only its share of clients (`place_client_data(load=...)`).
"""

import argparse
import json
import sys

import numpy as np


def run(args) -> None:
    import jax

    from floe_jax import sharding

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
        checkpoint_every=1, client_chunk=1,
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
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    if args.coordinator:  # each process builds only its own clients' rows
        seen = []

        def load(ids):
            seen.extend(int(i) for i in ids)
            return client_data([examples[i] for i in ids], min_examples=5)

        data = sharding.place_client_data(mesh, load=load, num_clients=N)
        print(json.dumps({"process": jax.process_index(), "loaded": seen}), flush=True)
    else:
        data = client_data(examples, min_examples=5)
    state, rows = train_federated(
        params, data, cfg=cfg, fed=fed, run_dir=args.run_dir, ranks=ranks, progress=False,
        stop_after=args.stop_after, mesh=mesh,
    )  # fmt: skip
    leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    np.savez(args.out, rows=json.dumps(rows), **leaves)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("run_dir")
    p.add_argument("--mesh")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stop-after", type=int)
    p.add_argument("--agg", default="fedavg")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    run(p.parse_args(sys.argv[1:]))
