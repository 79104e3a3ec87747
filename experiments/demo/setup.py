"""The demo's inputs: benchmark, tokenizer and base models; each client's device, rank and data.

Ranks on the tiny demo model: its training memory is a few tens of MB, so every catalog device fits
the largest rank. `client_ranks` therefore scales each device's memory budget into the range the
demo model spans: budget = base need + (device memory / largest device memory) x (need at the
largest rank - base need). Ranks then follow the devices' real memory ratios. A real-model preset
takes the devices' real budgets, with its edge's `remat` and `loss_chunk` priced in.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from experiments.calibrate import MODELS, prepare
from experiments.presets import DemoFed, DemoPreset
from experiments.real_presets import RealPreset
from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.data.benchmark import Benchmark, Example, Query
from floe_jax.data.hf_datasets import InstructionData, load_instruction_dataset
from floe_jax.data.splits import split_by_task, split_dirichlet
from floe_jax.data.tokenizer import encode_examples, load_tokenizer, long_examples
from floe_jax.devices import assign_ranks, get_device, toy_budgets
from floe_jax.federated.types import ClientData, client_data
from floe_jax.hf import load_hf
from floe_jax.hf.config import CONFIG_FILE, config_from_hf, eos_ids
from floe_jax.hf.layout import read_json
from floe_jax.model import init_params


@dataclasses.dataclass
class Setup:
    """The benchmark (embedded, or built from an instruction dataset), the edge's and the
    cloud's tokenizers, and both models (the cloud's params None when `setup` was asked for the
    edge only: the federated rounds need no cloud).

    `real` holds what only a real-model preset has (`RealSetup`): the stop ids, the cloud's own
    prompt of each query, the per-task answer budgets and the data counts."""

    bench: Benchmark
    tokenizer: object
    cloud_tokenizer: object
    edge_cfg: ModelConfig
    edge_params: dict
    cloud_cfg: ModelConfig
    cloud_params: dict | None
    times: dict
    real: RealSetup | None = None


@dataclasses.dataclass
class RealSetup:
    """A real-model preset's decoding and data facts.

    Attributes:
      eos_ids, cloud_eos_ids: every id that ends an answer, on each side (`generation_config.json`
        lists several: Qwen2.5's `<|im_end|>` and `<|endoftext|>`; Llama 3's three), with the
        tokenizer's and the config's own eos.
      cloud_prompts: query index -> the prompt in the cloud's own chat template (the edge's is
        `Query.prompt`): a request to the cloud carries this text and the answer so far.
      budgets: query index -> its answer budget (`RealPreset.budget` of its task).
      data: counts of the data's journey (rows read, cut or dropped for length, per client and
        task), for `clients.json` and the report.
    """

    eos_ids: tuple[int, ...]
    cloud_eos_ids: tuple[int, ...]
    cloud_prompts: tuple[str, ...]
    budgets: tuple[int, ...]
    data: dict


def setup(
    preset: DemoPreset | RealPreset, *, progress: bool = True, models: tuple[str, ...] = MODELS
) -> Setup:
    """Embedded benchmark + cached pretraining of `models` (`calibrate.prepare`; the edge at
    least), or the real-model preset's checkpoints and data (both models, whatever `models`
    says)."""
    if isinstance(preset, RealPreset):
        return setup_real(preset)
    if "edge" not in models:
        raise ValueError(f"setup needs the edge model, got models={models}")
    prep = prepare(preset, progress=progress, models=models)
    cloud = prep.cloud.params if prep.cloud is not None else None
    return Setup(prep.bench, prep.tokenizer, prep.cloud_tokenizer, preset.edge, prep.edge.params,
                 preset.cloud, cloud, prep.times)  # fmt: skip


def chat_prompt(tokenizer, text: str, *, system: str = "") -> str:
    """`text` as one user turn in `tokenizer`'s chat template, ready for the answer
    (`add_generation_prompt`), with `system` as the system turn when set."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer {tokenizer.name_or_path} has no chat template: set "
            "chat_template=false (prompt_format is used instead) or use an instruct checkpoint"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _load_model(path: str, dtype: str, shapes_only: bool):
    """`load_hf`, or with `shapes_only` the config and the params' abstract shapes (no weights
    read or allocated: `jax.eval_shape` of `init_params`)."""
    if not shapes_only:
        return load_hf(path, dtype=dtype)
    cfg = dataclasses.replace(
        config_from_hf(read_json(Path(path, CONFIG_FILE)), source=path), dtype=dtype
    )
    return cfg, jax.eval_shape(lambda: init_params(cfg, key=jax.random.key(0)))


def _split(preset: RealPreset, data: InstructionData) -> list[np.ndarray]:
    """Each client's example indices (`preset.split`), each list shuffled with the seed."""
    need = preset.test_per_client + 1  # a test query and at least one training example
    if preset.split == "dirichlet":
        parts = split_dirichlet(data.task_ids, preset.num_clients, alpha=preset.dirichlet_alpha,
                                seed=preset.seed, min_size=need)  # fmt: skip
    else:
        parts = split_by_task(data.task_ids, preset.num_clients, seed=preset.seed)
    rng = np.random.default_rng(preset.seed)
    parts = [rng.permutation(p) for p in parts]
    for c, p in enumerate(parts):
        if len(p) < need:
            raise ValueError(
                f"client {c} holds {len(p)} examples of {data.source}: fewer than "
                f"test_per_client + 1 = {need}; use fewer clients or more data"
            )
    return parts


def setup_real(preset: RealPreset, *, shapes_only: bool = False) -> Setup:
    """Loads both HF checkpoints, each one's tokenizer and the dataset; splits the examples over
    the clients (`RealPreset`: Dirichlet label skew or one task per client), holds out
    `test_per_client` test queries of each client (type `general`: instruction data has no
    personal/both split) and cuts or drops the examples longer than `fed.rounds.seq_len`.

    Prompts are written in each side's chat template (`chat_prompt`): `Query.prompt` in the
    edge's, `RealSetup.cloud_prompts` in the cloud's; answers stop at any of each side's eos ids.
    The two models may be of different families and vocabulary sizes: fused decoding aligns them
    by token strings (`floe_jax.inference.align`).

    `shapes_only`: both models as their configs and abstract parameter shapes (nothing read or
    allocated), for checking a real pair's setup where its weights do not fit
    (`experiments/benchmarks/real_setup.py`); the result cannot be trained or decoded.
    """
    t0 = time.perf_counter()
    edge_cfg, edge_params = _load_model(preset.edge_path, preset.dtype, shapes_only)
    edge_cfg = dataclasses.replace(edge_cfg, remat=preset.remat, loss_chunk=preset.loss_chunk)
    cloud_cfg, cloud_params = _load_model(preset.cloud_path, preset.dtype, shapes_only)
    tok = load_tokenizer(preset.tokenizer_path or preset.edge_path)
    cloud_tok = load_tokenizer(preset.cloud_tokenizer_path or preset.cloud_path)
    for side, t, cfg in (("edge", tok, edge_cfg), ("cloud", cloud_tok, cloud_cfg)):
        if len(t) > cfg.vocab_size:
            raise ValueError(
                f"the {side} tokenizer ({t.name_or_path}) has {len(t)} tokens, more than its "
                f"model's vocab_size {cfg.vocab_size}"
            )
        if t.pad_token_id is None:
            raise ValueError(f"the {side} tokenizer ({t.name_or_path}) has no pad token")
    files = [f.strip() for f in preset.dataset.split(",") if f.strip()]
    data = load_instruction_dataset(
        files if len(files) > 1 else files[0], prompt_column=preset.prompt_column,
        response_column=preset.response_column, task_column=preset.task_column or None,
        input_column=preset.input_column or None, limit=preset.max_examples or None,
        task_from_file=len(files) > 1 and not preset.task_column,
    )  # fmt: skip
    if data.task_ids is None:
        raise ValueError(f"{preset.dataset}: the real-model demo needs a task column")
    for field, named in (("max_new_tokens_by_task", preset.task_budgets()),
                         ("closed_tasks", preset.closed_tasks)):  # fmt: skip
        unknown = sorted(set(named) - set(data.task_names))
        if unknown:  # a misspelt task would silently get the default budget, or no exact match
            raise ValueError(
                f"RealPreset.{field} names tasks {unknown} that {data.source} does not have "
                f"(its tasks: {list(data.task_names)})"
            )

    def edge_text(p: str) -> str:
        if preset.chat_template:
            return chat_prompt(tok, p, system=preset.system_prompt)
        return preset.prompt_format.format(prompt=p)

    def cloud_text(p: str) -> str:
        if preset.chat_template:
            return chat_prompt(cloud_tok, p, system=preset.system_prompt)
        return preset.prompt_format.format(prompt=p)

    # length: every example as the edge trains on it, against fed.rounds.seq_len
    T = preset.fed.rounds.seq_len
    prompts = [edge_text(p) for p in data.prompts]
    long, no_room = long_examples(tok, list(zip(prompts, data.responses, strict=True)), T)
    drop = no_room if preset.long_examples == "truncate" else long
    counts = dict(rows=len(data), seq_len=T, long_examples=preset.long_examples,
                  longer_than_seq_len=int(long.sum()), dropped=int(drop.sum()),
                  truncated=int((long & ~drop).sum()) if preset.long_examples == "truncate"
                  else 0)  # fmt: skip
    keep = np.flatnonzero(~drop)
    if keep.size == 0:
        raise ValueError(f"{data.source}: every example is longer than seq_len={T}")
    data, prompts = data.subset(keep), [prompts[i] for i in keep]
    parts = _split(preset, data)

    tasks, examples, queries, cloud_prompts, budgets = [], [], [], [], []
    per_client = []
    k = preset.test_per_client
    for c, idx in enumerate(parts):
        test, train = idx[:k], idx[k:]
        if preset.max_train_per_client:
            train = train[: preset.max_train_per_client]
        names = [data.task_names[data.task_ids[i]] for i in idx]
        tasks.append(max(set(names), key=lambda n: (names.count(n), n)))  # its main task
        task_of = [data.task_names[data.task_ids[i]] for i in train]
        examples.append(tuple(Example(prompts[i], data.responses[i], t)
                              for i, t in zip(train, task_of, strict=True)))  # fmt: skip
        for i in test:
            task = data.task_names[data.task_ids[i]]
            queries.append(Query(prompts[i], data.responses[i], "general", task, c, ()))
            cloud_prompts.append(cloud_text(data.prompts[i]))
            budgets.append(preset.budget(task))
        per_client.append(dict(train=len(train), test=len(test), unused=len(idx) - k - len(train),
                               tasks={n: names.count(n) for n in sorted(set(names))}))  # fmt: skip
    counts |= dict(used=len(data), clients=per_client,
                   tasks={n: int((data.task_ids == t).sum()) for t, n in
                          enumerate(data.task_names)})  # fmt: skip
    bench = Benchmark(
        config=None, countries=(), local_countries=(), public_docs=(), edge_docs=(),
        client_tasks=tuple(tasks), client_contacts=((),) * preset.num_clients,
        client_examples=tuple(examples), queries=tuple(queries), format_docs=(),
    )  # fmt: skip
    real = RealSetup(
        eos_ids=eos_ids(preset.edge_path, tok, edge_cfg),
        cloud_eos_ids=eos_ids(preset.cloud_path, cloud_tok, cloud_cfg),
        cloud_prompts=tuple(cloud_prompts), budgets=tuple(budgets), data=counts,
    )  # fmt: skip
    times = {"load checkpoints + data": time.perf_counter() - t0}
    return Setup(bench, tok, cloud_tok, edge_cfg, edge_params, cloud_cfg, cloud_params, times,
                 real)  # fmt: skip


def client_ranks(
    fed: DemoFed, num_clients: int, edge_cfg: ModelConfig, *, seq_len: int, toy: bool = True
) -> tuple[list[str], list[int]]:
    """(device name, LoRA rank) per client: devices cycle through `fed.devices`. For the embedded
    benchmark's tiny models (`toy`) memory budgets are scaled into the model's range
    (`floe_jax.devices.toy_budgets`; module docstring) so ranks really differ; a real model is
    assigned from the devices' real budgets."""
    devices = [get_device(fed.devices[i % len(fed.devices)]) for i in range(num_clients)]
    kw = dict(batch=fed.rounds.batch_size, seq_len=seq_len)
    cands = [LoRAConfig(rank=r) for r in sorted(fed.rank_candidates)]
    budgets = toy_budgets(edge_cfg, devices, cands, **kw) if toy else devices
    got = assign_ranks(edge_cfg, budgets, deadline_ms=fed.deadline_ms, candidates=cands, **kw)
    return [d.name for d in devices], [c.rank for c in got]


def private_data(
    fed: DemoFed, bench: Benchmark, tok, vocab_size: int, *, truncate: bool = False
) -> ClientData:
    """Every client's private examples, encoded and padded to one length T: `fed.rounds.seq_len`,
    or (None) the longest example of any client rounded up to 16 tokens; `truncate` cuts longer
    ones to T (a real-model preset's `long_examples="truncate"`), else they are an error. A token
    id outside the edge model's vocabulary (`vocab_size`) is an error naming the client and row."""
    pairs = [[(e.prompt, e.response) for e in ex] for ex in bench.client_examples]
    T = fed.rounds.seq_len
    if T is None:
        T = encode_examples(tok, [p for ps in pairs for p in ps])["tokens"].shape[1]
    try:
        arrays = [encode_examples(tok, ps, seq_len=T, truncate=truncate) for ps in pairs]
    except ValueError as e:
        raise ValueError(f"{e}: raise fed.rounds.seq_len (or set it to none)") from None
    return client_data(
        [(a["tokens"], a["mask"], a["loss_mask"]) for a in arrays], vocab_size=vocab_size
    )
