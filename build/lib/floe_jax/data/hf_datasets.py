"""Instruction data through Hugging Face `datasets`: local json/jsonl/csv/parquet files or a hub id.

Column names are configurable, so Alpaca-style (`instruction` / `input` / `output`), Dolly-style
(`instruction` / `context` / `response` / `category`) and plain `prompt` / `response` / `task`
files all load without conversion; a list of files of one task each loads as a multi-task mix
with the tasks named by file (`task_from_file`, FedIT's mix of instruction sets). Tests use local
files only; a hub id is for real runs (it downloads unless the dataset is already in the
`datasets` cache).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class InstructionData:
    """N instruction examples.

    Attributes:
      prompts, responses: N strings each.
      task_ids: [N] int32 index into `task_names`, or None without a task column.
      task_names: sorted distinct task labels (as strings).
      source: where the data came from, for messages.
    """

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    task_ids: np.ndarray | None
    task_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Sequence[int]) -> InstructionData:
        idx = np.asarray(idx, np.int64)
        return dataclasses.replace(
            self,
            prompts=tuple(self.prompts[i] for i in idx),
            responses=tuple(self.responses[i] for i in idx),
            task_ids=None if self.task_ids is None else self.task_ids[idx],
        )


def _builder_for(path: str) -> str | None:
    for ext, builder in _BUILDERS.items():
        if path.endswith(ext) or path.endswith(ext + ".gz"):
            return builder
    return None


def load_instruction_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    task_column: str | None = None,
    input_column: str | None = None,
    split: str = "train",
    name: str | None = None,
    data_format: str | None = None,
    limit: int | None = None,
    cache_dir: str | None = None,
    task_from_file: bool = False,
) -> InstructionData:
    """Loads instruction examples.

    Args:
      source: a local file (or list of files) ending in .json, .jsonl, .csv or .parquet, or a
        hub dataset id (anything that is not an existing path).
      prompt_column, response_column: text columns.
      task_column: optional task label column (per-client tasks and per-task metrics).
      input_column: optional extra prompt context (Alpaca's `input`, Dolly's `context`); when
        non-empty it is appended to the prompt after a blank line.
      split: the split to read (local files load as `train`).
      name: hub dataset configuration.
      data_format: `json`, `csv` or `parquet`, when the file name does not say.
      limit: keep the first `limit` examples.
      cache_dir: the `datasets` cache folder.
      task_from_file: a multi-task mix of local files (FedIT's mix of instruction sets), each
        file one task named by its file name without extensions (`closed_qa.jsonl` is task
        `closed_qa`); `task_column` must then be None. `limit` applies to each file.

    Raises:
      FileNotFoundError: a local-looking path does not exist.
      ValueError: a column is missing (the message names the source, the column and the columns
        present) or the format is unknown.
    """
    import datasets

    if task_from_file:
        return _task_mix(
            source, task_column=task_column, prompt_column=prompt_column,
            response_column=response_column, input_column=input_column,
            data_format=data_format, limit=limit, cache_dir=cache_dir,
        )  # fmt: skip
    files = [os.fspath(s) for s in source] if isinstance(source, list | tuple) else None
    src = os.fspath(source) if files is None else files[0]
    label = src if files is None or len(files) == 1 else f"{src} (+{len(files) - 1} files)"
    local = files is not None or os.path.exists(src) or _builder_for(src) is not None
    if local:
        paths = files or [src]
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"instruction data file {p!r} does not exist")
        builder = data_format or _builder_for(paths[0])
        if builder is None:
            raise ValueError(
                f"{label}: cannot tell the format from the name; pass data_format= one of "
                f"{sorted(set(_BUILDERS.values()))}"
            )
        ds = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir)
    else:
        ds = datasets.load_dataset(src, name=name, split=split, cache_dir=cache_dir)

    columns = list(ds.column_names)
    wanted = {
        "prompt_column": prompt_column,
        "response_column": response_column,
        "task_column": task_column,
        "input_column": input_column,
    }
    for arg, col in wanted.items():
        if col is not None and col not in columns:
            raise ValueError(f"{label}: column {col!r} ({arg}) not found; columns: {columns}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))

    def text(col, i, row):
        v = row[col]
        if v is None:
            raise ValueError(f"{label}: row {i} has no value in column {col!r}")
        return str(v)

    prompts, responses, tasks = [], [], []
    for i, row in enumerate(ds):
        p = text(prompt_column, i, row)
        if input_column is not None and row[input_column]:
            p = f"{p}\n\n{row[input_column]}"
        prompts.append(p)
        responses.append(text(response_column, i, row))
        if task_column is not None:
            tasks.append(text(task_column, i, row))
    if task_column is not None:
        names = tuple(sorted(set(tasks)))
        lookup = {n: k for k, n in enumerate(names)}
        task_ids = np.asarray([lookup[t] for t in tasks], np.int32)
    else:
        names, task_ids = (), None
    return InstructionData(
        prompts=tuple(prompts),
        responses=tuple(responses),
        task_ids=task_ids,
        task_names=names,
        source=label,
    )


def _task_mix(source, *, task_column, **kwargs) -> InstructionData:
    """`load_instruction_dataset` of each file, labelled by its file name (`task_from_file`)."""
    if task_column is not None:
        raise ValueError("task_from_file names tasks by file: task_column must be None")
    files = [os.fspath(s) for s in source] if isinstance(source, list | tuple) else [source]
    parts, names = [], []
    for f in files:
        name = os.path.basename(f).split(".")[0]
        if not name or name in names:
            raise ValueError(f"task_from_file: {f!r} gives task name {name!r} twice or empty")
        parts.append(load_instruction_dataset(f, **kwargs))
        names.append(name)
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = {i: r for r, i in enumerate(order)}
    return InstructionData(
        prompts=tuple(p for d in parts for p in d.prompts),
        responses=tuple(r for d in parts for r in d.responses),
        task_ids=np.concatenate([np.full(len(d), rank[i], np.int32) for i, d in enumerate(parts)]),
        task_names=tuple(names[i] for i in order),
        source=f"{files[0]} (+{len(files) - 1} files)" if len(files) > 1 else files[0],
    )
