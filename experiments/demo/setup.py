"""The demo's inputs: benchmark, tokenizer and base models; each client's device, rank and data.

Ranks on the tiny demo model: its training memory is a few tens of MB, so every catalog device fits
the largest rank. `client_ranks` therefore scales each device's memory budget into the range the
demo model spans: budget = base need + (device memory / largest device memory) x (need at the
largest rank - base need). Ranks then follow the devices' real memory ratios.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from experiments.calibrate import prepare
from experiments.presets import DemoFed, DemoPreset, RealPreset
from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.data.benchmark import Benchmark, Example, Query
from floe_jax.data.tokenizer import encode_examples, load_tokenizer
from floe_jax.devices import assign_ranks, get_device, train_memory_bytes
from floe_jax.federated.types import ClientData, client_data


@dataclasses.dataclass
class Setup:
    """The benchmark (embedded, or built from an instruction dataset), the edge's and the
    cloud's tokenizers, and both models."""

    bench: Benchmark
    tokenizer: object
    cloud_tokenizer: object
    edge_cfg: ModelConfig
    edge_params: dict
    cloud_cfg: ModelConfig
    cloud_params: dict
    times: dict


def setup(preset: DemoPreset | RealPreset, *, progress: bool = True) -> Setup:
    """Embedded benchmark + cached pretraining, or the real-model preset's checkpoints and data."""
    if isinstance(preset, RealPreset):
        return setup_real(preset)
    prep = prepare(preset, progress=progress)
    return Setup(prep.bench, prep.tokenizer, prep.cloud_tokenizer, preset.edge, prep.edge.params,
                 preset.cloud, prep.cloud.params, prep.times)  # fmt: skip


def setup_real(preset: RealPreset) -> Setup:
    """Loads both HF checkpoints, each one's tokenizer and the dataset; one task per client
    (clients cycle over the tasks), `examples_per_client` training examples and `test_per_client`
    held-out test queries each (type `general`: instruction data has no personal/both split). The
    two models may be of different families and vocabularies: fused decoding aligns them by
    token strings, as it does the embedded benchmark's edge and cloud."""
    from floe_jax.data.hf_datasets import load_instruction_dataset
    from floe_jax.hf import load_hf

    t0 = time.perf_counter()
    edge_cfg, edge_params = load_hf(preset.edge_path, dtype=preset.dtype)
    cloud_cfg, cloud_params = load_hf(preset.cloud_path, dtype=preset.dtype)
    tok = load_tokenizer(preset.tokenizer_path or preset.edge_path)
    cloud_tok = load_tokenizer(preset.cloud_tokenizer_path or preset.cloud_path)
    for side, t, cfg in (("edge", tok, edge_cfg), ("cloud", cloud_tok, cloud_cfg)):
        if len(t) > cfg.vocab_size:
            raise ValueError(
                f"the {side} tokenizer ({t.name_or_path}) has {len(t)} tokens, more than its "
                f"model's vocab_size {cfg.vocab_size}"
            )
    data = load_instruction_dataset(
        preset.dataset, prompt_column=preset.prompt_column,
        response_column=preset.response_column, task_column=preset.task_column or None,
        input_column=preset.input_column or None,
    )  # fmt: skip
    if data.task_ids is None:
        raise ValueError(f"{preset.dataset}: the real-model demo needs a task column")
    rng = np.random.default_rng(preset.seed)
    by_task = {t: list(rng.permutation(np.flatnonzero(data.task_ids == t)))
               for t in range(len(data.task_names))}  # fmt: skip
    order = list(rng.permutation(len(data.task_names)))
    need = preset.examples_per_client + preset.test_per_client
    tasks, examples, queries = [], [], []
    for c in range(preset.num_clients):
        t = order[c % len(order)]
        idx, by_task[t] = by_task[t][:need], by_task[t][need:]
        if len(idx) <= preset.test_per_client:
            raise ValueError(f"task {data.task_names[t]!r} has too few examples for client {c}")
        name = data.task_names[t]
        tasks.append(name)
        fmt = [preset.prompt_format.format(prompt=data.prompts[i]) for i in idx]
        resp = [data.responses[i] for i in idx]
        k = preset.test_per_client
        examples.append(tuple(Example(p, r, name) for p, r in zip(fmt[k:], resp[k:], strict=True)))
        queries += [
            Query(p, r, "general", name, c, ()) for p, r in zip(fmt[:k], resp[:k], strict=True)
        ]
    bench = Benchmark(
        config=None, countries=(), local_countries=(), public_docs=(), edge_docs=(),
        client_tasks=tuple(tasks), client_contacts=((),) * preset.num_clients,
        client_examples=tuple(examples), queries=tuple(queries), format_docs=(),
    )  # fmt: skip
    times = {"load checkpoints + data": time.perf_counter() - t0}
    return Setup(bench, tok, cloud_tok, edge_cfg, edge_params, cloud_cfg, cloud_params, times)


def client_ranks(
    fed: DemoFed, num_clients: int, edge_cfg: ModelConfig, *, seq_len: int
) -> tuple[list[str], list[int]]:
    """(device name, LoRA rank) per client: devices cycle through `fed.devices`; memory budgets
    are scaled into the demo model's range (module docstring) so ranks really differ."""
    cfg, n = edge_cfg, num_clients
    devices = [get_device(fed.devices[i % len(fed.devices)]) for i in range(n)]
    kw = dict(batch=fed.rounds.batch_size, seq_len=seq_len)
    base = train_memory_bytes(cfg, None, **kw)
    top = train_memory_bytes(cfg, LoRAConfig(rank=max(fed.rank_candidates)), **kw)
    biggest = max(d.memory_bytes for d in devices)
    scaled = [
        dataclasses.replace(d, memory_bytes=int(base + d.memory_bytes / biggest * (top - base)) + 1)
        for d in devices
    ]
    cands = [LoRAConfig(rank=r) for r in sorted(fed.rank_candidates)]
    got = assign_ranks(cfg, scaled, deadline_ms=fed.deadline_ms, candidates=cands, **kw)
    return [d.name for d in devices], [c.rank for c in got]


def private_data(fed: DemoFed, bench: Benchmark, tok, vocab_size: int) -> ClientData:
    """Every client's private examples, encoded and padded to one length T: `fed.rounds.seq_len`,
    or (None) the longest example of any client rounded up to 16 tokens. A token id outside the
    edge model's vocabulary (`vocab_size`) is an error naming the client and row."""
    pairs = [[(e.prompt, e.response) for e in ex] for ex in bench.client_examples]
    T = fed.rounds.seq_len
    if T is None:
        T = encode_examples(tok, [p for ps in pairs for p in ps])["tokens"].shape[1]
    try:
        arrays = [encode_examples(tok, ps, seq_len=T) for ps in pairs]
    except ValueError as e:
        raise ValueError(f"{e}: raise fed.rounds.seq_len (or set it to none)") from None
    return client_data(
        [(a["tokens"], a["mask"], a["loss_mask"]) for a in arrays], vocab_size=vocab_size
    )
