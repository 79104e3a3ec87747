"""Local stand-ins of real checkpoints and data, built without downloading anything.

A stand-in has what `experiments.demo.setup.setup_real` reads from a published checkpoint folder:
`config.json` (the published values, `PUBLISHED`, or a tiny config), a byte-level BPE tokenizer
of the family's layout (its special tokens, its declared bos/eos/pad, its chat template) at an
exact length, and `generation_config.json` with the family's list of stop ids. Weights are the
caller's (the tests write tiny random ones with transformers; `bench real-setup` reads none).
`dolly_jsonl` writes a Dolly-15k-shaped file (`instruction`, `context`, `response`,
`category`).

The BPE is trained on the given texts, then grown to the exact length with merges of existing
tokens (seeded, so two families' vocabularies overlap in part and differ in ids, as Llama 3's and
Qwen2.5's do): what alignment sees is a real tokenizer of the real size, not the real merges.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# The families' chat templates, as their instruct tokenizers ship them, less tool calling.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

FAMILIES = {
    # special tokens in their published id order after the BPE's, then reserved fillers up to
    # `specials` (Qwen2.5's <|im_end|> is 151645, Llama 3's <|eot_id|> 128009, as published)
    "qwen2": dict(
        tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), specials=22, bos=None,
        eos="<|im_end|>", pad="<|endoftext|>", stop=("<|im_end|>", "<|endoftext|>"),
        template=QWEN2_TEMPLATE, filler="<|qwen_reserved_{}|>",
    ),
    "llama3": dict(
        tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
        specials=256, bos="<|begin_of_text|>", eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>", stop=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        template=LLAMA3_TEMPLATE, filler="<|reserved_special_token_{}|>", first_filler=3,
    ),
}  # fmt: skip

# config.json of the published checkpoints (the fields floe_jax reads), vocabulary rows included:
# Qwen2.5's tokenizer has 151,665 tokens (151,643 BPE + 22 special), Llama 3's 128,256.
PUBLISHED = {
    "Qwen2.5-0.5B-Instruct": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=21,
        rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
        tie_word_embeddings=True, vocab_size=151936, bos_token_id=151643, eos_token_id=151645,
        hidden_act="silu", torch_dtype="bfloat16",
    ),
    "Qwen2.5-7B-Instruct": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, max_window_layers=28,
        rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False,
        tie_word_embeddings=False, vocab_size=152064, bos_token_id=151643, eos_token_id=151645,
        hidden_act="silu", torch_dtype="bfloat16",
    ),
    "Llama-3.2-1B-Instruct": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(factor=32.0, high_freq_factor=4.0,
        low_freq_factor=1.0, original_max_position_embeddings=8192, rope_type="llama3"),
        tie_word_embeddings=True, vocab_size=128256, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], hidden_act="silu", attention_bias=False,
        mlp_bias=False, torch_dtype="bfloat16",
    ),
}  # fmt: skip
TOKENIZER_SIZES = {"qwen2": 151665, "llama3": 128256}
FAMILY_OF = {"Qwen2.5-0.5B-Instruct": "qwen2", "Qwen2.5-7B-Instruct": "qwen2",
             "Llama-3.2-1B-Instruct": "llama3"}  # fmt: skip


def _grow(tokenizer_json: dict, size: int, seed: int) -> None:
    """Adds merges of two existing tokens (in a seeded order, from the earliest tokens out)
    to a BPE model until it holds `size` tokens."""
    vocab, merges = tokenizer_json["model"]["vocab"], tokenizer_json["model"]["merges"]
    rng = np.random.default_rng(seed)
    m = 8
    while len(vocab) < size:
        pool = sorted(vocab, key=vocab.__getitem__)
        m = min(2 * m, len(pool))
        for k in rng.permutation(m * m):
            a, b = pool[k // m], pool[k % m]
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append([a, b])
                if len(vocab) == size:
                    return


def standin_tokenizer(family: str, size: int, texts, *, seed: int = 0):
    """A `PreTrainedTokenizerFast` of `family`'s layout with exactly `size` tokens: a byte-level
    BPE trained on `texts` (and grown, `_grow`) to `size - specials` tokens, then the family's
    special tokens and reserved fillers, its declared bos/eos/pad and its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    n_special = min(fam["specials"], max(len(fam["tokens"]), size // 16))
    n_bpe = size - n_special
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(list(texts), trainer)
    if tok.get_vocab_size() > n_bpe:
        raise ValueError(f"a {family} stand-in of {size} tokens has no room for its BPE")
    data = json.loads(tok.to_str())
    _grow(data, n_bpe, seed)
    tok = Tokenizer.from_str(json.dumps(data))
    specials = list(fam["tokens"])
    first = fam.get("first_filler", 0)
    specials += [fam["filler"].format(first + i) for i in range(n_special - len(specials))]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=fam["bos"], eos_token=fam["eos"], pad_token=fam["pad"],
        clean_up_tokenization_spaces=False,
    )  # fmt: skip
    fast.chat_template = fam["template"]
    if len(fast) != size:
        raise AssertionError(f"{family} stand-in has {len(fast)} tokens, not {size}")
    return fast


def write_standin(folder: str | os.PathLike, family: str, tokenizer, config: dict) -> Path:
    """Writes `config.json` (`config`, ids from `tokenizer`), the tokenizer and
    `generation_config.json` (the family's stop tokens as a list of ids) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fam = FAMILIES[family]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in fam["stop"]}
    ids_of = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = {**ids_of, **config}  # a published config keeps its own ids
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(folder))
    gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": list(ids.values()),
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return folder


DOLLY_CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing",
                    "general_qa", "information_extraction", "open_qa", "summarization")  # fmt: skip


def dolly_rows(n: int, *, seed: int = 0, categories=DOLLY_CATEGORIES) -> list[dict]:
    """`n` Dolly-15k-shaped rows: `instruction`, `context` (empty for the open categories, as in
    Dolly), `response`, `category`; short made-up texts."""
    rng = np.random.default_rng(seed)
    words = ("river stone light north market winter garden signal paper orbit copper lantern "
             "harbor meadow engine violet").split()  # fmt: skip
    rows = []
    for i in range(n):
        cat = categories[i % len(categories)]
        w = [words[j] for j in rng.integers(0, len(words), 6)]
        closed = cat in ("closed_qa", "information_extraction", "summarization", "classification")
        rows.append(dict(
            instruction=f"{cat.replace('_', ' ')} {i}: what about the {w[0]} and the {w[1]}?",
            context=f"The {w[2]} is near the {w[3]}." if closed else "",
            response=f"The {w[4]} {w[5]}." if cat != "classification" else w[4],
            category=cat,
        ))  # fmt: skip
    return rows


def dolly_jsonl(path: str | os.PathLike, n: int, *, seed: int = 0, categories=DOLLY_CATEGORIES):
    """Writes `dolly_rows(n)` as a jsonl file; returns the rows."""
    rows = dolly_rows(n, seed=seed, categories=categories)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
