"""Tests for floe_jax/data/hf_datasets.py: local files through Hugging Face `datasets`."""

import json

import numpy as np
import pytest

from floe_jax.data.hf_datasets import load_instruction_dataset

ROWS = [
    {"instruction": "say hi", "output": "hello", "input": "", "cat": "greet"},
    {"instruction": "what is two plus two ?", "output": "four", "input": "x", "cat": "math"},
    {"instruction": "say hello", "output": "hi", "input": "", "cat": "greet"},
]


def test_load_local_jsonl_and_csv(tmp_path):
    jl = tmp_path / "train.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in ROWS))
    cache = str(tmp_path / "cache")
    d = load_instruction_dataset(
        jl,
        prompt_column="instruction",
        response_column="output",
        task_column="cat",
        input_column="input",
        cache_dir=cache,
    )
    assert len(d) == 3 and d.task_names == ("greet", "math")
    assert d.prompts == ("say hi", "what is two plus two ?\n\nx", "say hello")
    assert d.responses == ("hello", "four", "hi")
    np.testing.assert_array_equal(d.task_ids, [0, 1, 0])
    assert d.subset([2]).prompts == ("say hello",)

    csv = tmp_path / "train.csv"
    csv.write_text("prompt,response\nsay hi,hello\nsay hello,hi\n")
    d2 = load_instruction_dataset(str(csv), cache_dir=cache, limit=1)
    assert d2.prompts == ("say hi",) and d2.responses == ("hello",) and d2.task_ids is None


def test_missing_column_and_file_errors(tmp_path):
    jl = tmp_path / "data.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in ROWS))
    with pytest.raises(ValueError, match=r"data\.jsonl: column 'response' \(response_column\)"):
        load_instruction_dataset(jl, prompt_column="instruction", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="'label'.*columns: .*'cat'"):
        load_instruction_dataset(
            jl,
            prompt_column="instruction",
            response_column="output",
            task_column="label",
            cache_dir=str(tmp_path / "c"),
        )
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_instruction_dataset(tmp_path / "nope.jsonl")
