"""Tests for floe_jax/data/batching.py, hf_datasets.py and splits.py."""

import json

import jax
import numpy as np
import pytest

from floe_jax.data.batching import (
    client_batches,
    encode_example,
    pad_examples,
    tokenize_examples,
    truncate,
)
from floe_jax.data.hf_datasets import load_instruction_dataset
from floe_jax.data.splits import split_by_task, split_dirichlet, task_histogram

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "what", "is", "two", "plus", "four"]
WORDS += [".", "?", "say", "hi", "three"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


class WordTok:
    """A minimal tokenizer: `encode(text)` only, no special tokens, no chat template."""

    vocab = {w: i for i, w in enumerate(WORDS)}

    def encode(self, text):
        return [self.vocab[w] for w in text.split()]


@pytest.fixture(scope="module")
def hf_tok():
    """A tiny word-level tokenizer built locally, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]}
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ----------------------------------------------------------------------------- batching


def test_padding_and_masks_exact_on_hand_example():
    tok = WordTok()
    out = tokenize_examples(
        tok, ["what is two", "say hi"], ["four", "hello world ."], max_len=7, eos_id=2, pad_id=0
    )
    # "what is two" = 6 7 8 | "four" 10 + EOS 2; "say hi" = 13 14 | 4 5 11 + EOS 2.
    np.testing.assert_array_equal(out["tokens"], [[6, 7, 8, 10, 2, 0, 0], [13, 14, 4, 5, 11, 2, 0]])
    np.testing.assert_array_equal(out["mask"], [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out["length"], [5, 6])
    assert out["tokens"].dtype == np.int32 and not out["truncated"].any()
    # Without an EOS id the plain tokenizer appends nothing.
    bare = tokenize_examples(tok, ["say"], ["hi"], max_len=3)
    np.testing.assert_array_equal(bare["tokens"], [[13, 14, 0]])
    np.testing.assert_array_equal(bare["loss_mask"], [[0, 1, 0]])


def test_truncation_policies():
    p, r = [1, 6, 7, 8, 9], [10, 11, 2]
    # prompt_left: the response survives whole; the prompt loses its start but keeps BOS.
    assert truncate(p, r, 6, bos_id=1) == ([1, 8, 9], r)
    assert truncate(p, r, 6) == ([7, 8, 9], r)
    # A response too long for the budget is cut from its end; min_prompt_tokens of prompt stay.
    assert truncate(p, r, 3, min_prompt_tokens=1) == ([9], [10, 11])
    assert truncate(p, r, 3, min_prompt_tokens=0) == ([], [10, 11, 2])
    # right: cut the concatenation at max_len.
    assert truncate(p, r, 6, truncation="right") == (p, [10])
    assert truncate(p, r, 4, truncation="right") == ([1, 6, 7, 8], [])
    assert truncate(p, r, 8) == (p, r)
    with pytest.raises(ValueError, match="truncation"):
        truncate(p, r, 4, truncation="middle")
    with pytest.raises(ValueError, match="max_len"):
        pad_examples([(p, r)], 4)


def test_loss_mask_covers_response_only(hf_tok):
    prompts = ["what is two plus two ?", "say hi"]
    responses = ["four .", "hello world"]
    out = tokenize_examples(hf_tok, prompts, responses, max_len=12)
    for i, (prompt, resp) in enumerate(zip(prompts, responses, strict=True)):
        want = hf_tok.encode(resp, add_special_tokens=False) + [hf_tok.eos_token_id]
        got = out["tokens"][i][out["loss_mask"][i] == 1].tolist()
        assert got == want
        # The prompt starts with BOS (the tokenizer's post-processor adds it).
        assert out["tokens"][i, 0] == hf_tok.bos_token_id
        n_prompt = len(hf_tok.encode(prompt))
        assert out["loss_mask"][i, :n_prompt].sum() == 0
    assert (out["loss_mask"] <= out["mask"]).all()
    assert (out["tokens"][out["mask"] == 0] == hf_tok.pad_token_id).all()
    # Truncated: the BOS and the end of the prompt survive, the response stays whole.
    cut = tokenize_examples(hf_tok, prompts[:1], responses[:1], max_len=6)
    assert cut["truncated"].all()
    ids = cut["tokens"][0].tolist()
    assert ids[0] == 1 and ids[-3:] == [10, 11, 2] and ids[1:3] == [8, 12]


def test_chat_template_path(hf_tok):
    p_ids, r_ids = encode_example(hf_tok, "what is two", "four .", chat=True, system="hi")
    head = "<|system|> hi <|end|> <|user|> what is two <|end|> <|assistant|> "
    assert p_ids == hf_tok.encode(head, add_special_tokens=False)
    assert r_ids == hf_tok.encode("four . <|end|>", add_special_tokens=False)
    out = tokenize_examples(hf_tok, ["what is two"], ["four ."], max_len=16, chat=True)
    ids = out["tokens"][0][out["loss_mask"][0] == 1].tolist()
    assert hf_tok.convert_ids_to_tokens(ids) == ["four", ".", "<|end|>"]
    n = len(hf_tok.encode("<|user|> what is two <|end|> <|assistant|> ", add_special_tokens=False))
    assert out["loss_mask"][0, :n].sum() == 0 and out["loss_mask"][0, n] == 1
    # No template on a plain tokenizer: chat=True falls back to the plain format.
    assert encode_example(WordTok(), "say", "hi", chat=True) == ([13], [14])


def test_client_batches_shapes_sampling_and_padding():
    n, t = 10, 4
    data = {
        "tokens": np.arange(n * t, dtype=np.int32).reshape(n, t),
        "mask": np.ones((n, t), np.int32),
        "loss_mask": np.ones((n, t), np.int32),
    }
    clients = [np.arange(0, 6), np.arange(6, 9), np.array([], np.int64)]
    key = jax.random.key(3)
    out = client_batches(data, clients, steps=2, batch=2, key=key)
    assert out["tokens"].shape == (3, 2, 2, t) and out["example_mask"].shape == (3, 2, 2)
    np.testing.assert_array_equal(out["num_examples"], [6, 3, 0])
    rows = out["tokens"][..., 0].reshape(3, -1) // t
    # Client 0: 4 distinct examples of its own (one pass, no repeats).
    assert len(set(rows[0])) == 4 and set(rows[0]) <= set(range(6))
    # Client 1: 3 examples, then a reshuffled second pass fills the 4th slot.
    assert set(rows[1][:3]) == {6, 7, 8} and rows[1][3] in {6, 7, 8}
    # The empty client is all padding.
    assert out["example_mask"][2].sum() == 0 and out["mask"][2].sum() == 0
    assert out["loss_mask"][2].sum() == 0
    # Same key, same batches; another key, other batches.
    again = client_batches(data, clients, steps=2, batch=2, key=key)
    np.testing.assert_array_equal(again["tokens"], out["tokens"])
    other = client_batches(data, clients, steps=2, batch=2, key=jax.random.key(4))
    assert not np.array_equal(other["tokens"][:2], out["tokens"][:2])
    # One epoch cap: client 1 has 3 real examples and one zero-mask slot.
    capped = client_batches(data, clients, steps=2, batch=2, key=key, epochs=1)
    np.testing.assert_array_equal(capped["example_mask"][1].reshape(-1), [1, 1, 1, 0])
    assert capped["mask"][1].reshape(4, t)[3].sum() == 0
    with pytest.raises(ValueError, match="client 0"):
        client_batches(data, [np.array([10])], steps=1, batch=1, key=key)


# ----------------------------------------------------------------------------- datasets


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


# ----------------------------------------------------------------------------- splits


TASKS = np.repeat(np.arange(4), [30, 20, 25, 25])


def _check_partition(parts, n):
    assert all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) and allidx.max() < n


def test_split_by_task_pure_deterministic_nonempty():
    parts = split_by_task(TASKS, 6, seed=1)
    _check_partition(parts, len(TASKS))
    assert all(len(np.unique(TASKS[p])) == 1 for p in parts)
    # Every task is used when clients >= tasks; its examples are all assigned.
    assert len(np.concatenate(parts)) == len(TASKS)
    for a, b in zip(parts, split_by_task(TASKS, 6, seed=1), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(parts, split_by_task(TASKS, 6, seed=2), strict=True)
    )
    two = split_by_task(TASKS, 4, tasks_per_client=2, seed=0)
    assert all(len(np.unique(TASKS[p])) == 2 for p in two)
    with pytest.raises(ValueError, match="tasks_per_client"):
        split_by_task(TASKS, 2, tasks_per_client=5)
    with pytest.raises(ValueError, match="task 1 has 2 examples but 3 clients"):
        split_by_task(np.array([0, 0, 0, 1, 1]), 6)


def test_split_dirichlet_deterministic_nonempty_and_concentration():
    n = len(TASKS)
    a = split_dirichlet(TASKS, 8, alpha=0.5, seed=0)
    _check_partition(a, n)
    assert len(np.concatenate(a)) == n
    for x, y in zip(a, split_dirichlet(TASKS, 8, alpha=0.5, seed=0), strict=True):
        np.testing.assert_array_equal(x, y)

    def skew(alpha):
        # Mean over clients and seeds of the largest task share: 1 is one task per client.
        vals = []
        for seed in range(5):
            h = task_histogram(TASKS, split_dirichlet(TASKS, 8, alpha=alpha, seed=seed), 4)
            vals.append((h.max(1) / h.sum(1)).mean())
        return float(np.mean(vals))

    s_small, s_mid, s_big = skew(0.05), skew(1.0), skew(100.0)
    assert s_small > s_mid > s_big
    assert s_small > 0.7 and s_big < 0.4  # IID gives 0.3 here (the largest task share)
    with pytest.raises(ValueError, match="cannot give 200 clients"):
        split_dirichlet(TASKS, 200, alpha=1.0)
    with pytest.raises(ValueError, match="alpha=0.001"):
        split_dirichlet(TASKS, 90, alpha=0.001, max_tries=3)
