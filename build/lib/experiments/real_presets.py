"""Real-model presets: Hugging Face checkpoints and an instruction dataset from local folders,
through the demo's code (`experiments.demo`; README: "Real models"). `get_preset` in
`experiments.presets` finds them by name, with `key=value` overrides."""

from __future__ import annotations

import dataclasses

from experiments.presets import DEMO_ROUNDS, DemoEval, DemoFed
from floe_jax.config import ConfigError, require_finite

REAL_SPLITS = ("dirichlet", "task")
LONG_EXAMPLES = ("truncate", "filter")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RealPreset:
    """A real-model run (GPU/TPU): pretrained Hugging Face checkpoints from local folders and an
    instruction dataset with a task-label column, through the same demo code as the embedded
    benchmark (`experiments.demo`; `experiments.demo.setup.setup_real` reads it).

    Clients: a Dirichlet(`dirichlet_alpha`) label skew of the tasks over `num_clients` clients
    (`floe_jax.data.splits.split_dirichlet`; many more clients than tasks, so Floe's clusters
    hold several clients each), or `split="task"`: one task per client, clients cycling over the
    tasks. Each client's first `test_per_client` examples are its held-out test queries, the rest
    (at most `max_train_per_client`; 0: all) its private training data. Scores: ROUGE-L of every
    answer and exact match on `closed_tasks`, per task and overall (`floe_jax.data.metrics`).

    Attributes:
      name: the preset's name.
      edge_path, cloud_path: local HF folders (config.json + safetensors) of the edge SLM and the
        cloud LLM, of any two supported families and vocabulary sizes: their vocabularies are
        aligned by token strings (`floe_jax.inference.align`), so a Qwen2.5-0.5B edge (151,936
        rows) pairs with a Qwen2.5-7B cloud (152,064) and a Llama 3.2 edge with a Qwen cloud.
      tokenizer_path: the edge's tokenizer folder ("" = `edge_path`).
      cloud_tokenizer_path: the cloud's tokenizer folder ("" = `cloud_path`).
      dataset: local json/jsonl/csv/parquet file(s) (comma-separated: a multi-task mix, each
        file's task named by `task_column`, or by the file's name when `task_column=""`), or a
        `datasets` hub id already in the cache.
      prompt_column, response_column, task_column, input_column: its columns ("" = none).
      chat_template: wrap each prompt in each model's own chat template
        (`tokenizer.apply_chat_template`, with `system_prompt` when set): the edge sees its
        template, the cloud its own. False: `prompt_format` for both.
      system_prompt: the system message of the chat templates ("" = the template's default).
      prompt_format: how a prompt is shown without chat templates (`{prompt}` is replaced).
      split: `dirichlet` or `task` (above).
      dirichlet_alpha: the split's concentration (small: few tasks per client).
      num_clients: edge devices.
      max_train_per_client: cap on a client's training examples (0: all it holds).
      test_per_client: held-out test queries per client.
      long_examples: an example longer than `fed.rounds.seq_len` tokens (the edge's encoding,
        prompt + response + eos) is cut to it (`truncate`; one whose prompt alone fills it is
        dropped) or dropped (`filter`); the counts are in `clients.json` and the report.
      max_examples: read only the first `max_examples` rows (0: all); of each file in a
        multi-task mix named by file.
      max_new_tokens: the answer budget of a query.
      max_new_tokens_by_task: per-task budgets, `task=n,task=n` (others: `max_new_tokens`).
      closed_tasks: tasks with a closed answer, scored by exact match too.
      dtype: parameter dtype of both models.
      remat, loss_chunk: the edge's training memory options (`ModelConfig.remat`, `loss_chunk`;
        `python -m experiments plan` prices them): on by default, since a real edge's round
        does not fit without them (the values and gradients are the plain step's).
      fed, eval: as in `DemoPreset` (`eval.decode.max_new_tokens` is replaced per task).
      seed: seeds the split.
    """

    name: str
    edge_path: str
    cloud_path: str
    tokenizer_path: str = ""
    cloud_tokenizer_path: str = ""
    dataset: str
    prompt_column: str = "instruction"
    response_column: str = "response"
    task_column: str = "category"
    input_column: str = ""
    chat_template: bool = True
    system_prompt: str = ""
    prompt_format: str = "{prompt}\nAnswer: "
    split: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    num_clients: int = 64
    max_train_per_client: int = 0
    test_per_client: int = 4
    long_examples: str = "truncate"
    max_examples: int = 0
    max_new_tokens: int = 128
    max_new_tokens_by_task: str = ""
    closed_tasks: tuple[str, ...] = ()
    dtype: str = "bfloat16"
    remat: bool = True
    loss_chunk: int = 128
    fed: DemoFed = DemoFed(
        rounds=dataclasses.replace(DEMO_ROUNDS, num_rounds=10, checkpoint_every=10, seq_len=512)
    )
    eval: DemoEval = DemoEval(oracle=False)  # the token oracle decodes every query again
    seed: int = 0

    def __post_init__(self):
        for f in ("num_clients", "test_per_client", "max_new_tokens"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f} must be >= 1, got {getattr(self, f)}")
        for f in ("max_train_per_client", "max_examples"):
            if getattr(self, f) < 0:
                raise ConfigError(f"{f} must be >= 0 (0: no cap), got {getattr(self, f)}")
        if "{prompt}" not in self.prompt_format:
            raise ConfigError("prompt_format must contain {prompt}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.split not in REAL_SPLITS:
            raise ConfigError(f"split={self.split!r} is not one of {REAL_SPLITS}")
        if self.long_examples not in LONG_EXAMPLES:
            raise ConfigError(f"long_examples={self.long_examples!r} is not one of {LONG_EXAMPLES}")
        require_finite("RealPreset", dirichlet_alpha=self.dirichlet_alpha)
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if self.fed.rounds.seq_len is None:
            raise ConfigError(
                "fed.rounds.seq_len must be set for a real-model preset (examples are cut or "
                "dropped to it by long_examples; real data has examples of thousands of tokens)"
            )
        self.task_budgets()  # validates the spelling

    def task_budgets(self) -> dict[str, int]:
        """`max_new_tokens_by_task` parsed: task -> answer budget."""
        out: dict[str, int] = {}
        for item in filter(None, (x.strip() for x in self.max_new_tokens_by_task.split(","))):
            task, eq, n = item.rpartition("=")
            if not eq or not task.strip() or not n.strip().isdigit() or int(n) < 1:
                raise ConfigError(
                    f"max_new_tokens_by_task: {item!r} is not task=n with n >= 1 "
                    "(write task=n,task=n)"
                )
            if task.strip() in out:
                raise ConfigError(f"max_new_tokens_by_task names {task.strip()!r} twice")
            out[task.strip()] = int(n)
        return out

    def budget(self, task: str) -> int:
        """The answer budget (new tokens) of a query of `task`."""
        return self.task_budgets().get(task, self.max_new_tokens)


# Real-model presets: only the demo commands (`demo`, `federate`, `evaluate`) take them.
REAL_PRESETS: dict[str, RealPreset] = {}
REAL_PRESETS["qwen"] = RealPreset(
    name="qwen",
    edge_path="models/Qwen2.5-0.5B-Instruct",
    cloud_path="models/Qwen2.5-7B-Instruct",
    dataset="data/databricks-dolly-15k.jsonl",
    prompt_column="instruction",
    response_column="response",
    task_column="category",
    input_column="context",
    max_new_tokens_by_task="classification=32,closed_qa=64,information_extraction=96",
)
"""Qwen2.5-0.5B-Instruct on 64 devices with Qwen2.5-7B-Instruct as the cloud, on Dolly-15k's 8
categories split Dirichlet(0.5) over the clients (README: "Real models"). Dolly's answers are
free text in every category (its `classification` answers are sentences), so the preset scores
ROUGE-L only; a mix with closed-answer tasks names them in `closed_tasks`."""
