"""A small byte-level BPE tokenizer trained locally (Sennrich et al., 2016; GPT-2's byte level).

The embedded benchmark trains its own tokenizer with the `tokenizers` library, wraps it as a
`transformers.PreTrainedTokenizerFast` and saves it to a folder, so the demo loads it with
`AutoTokenizer.from_pretrained(path)`: the same code path as a real checkpoint's tokenizer.

What it is trained on: the public corpus plus the private *formats* filled with dummy values drawn
from a pool disjoint from every client's contacts (`Benchmark.format_docs`). No client's private
value (names, phones, emails) enters the vocabulary, so the tokenizer, which ships to the cloud
and to every device, leaks nothing; private names are simply split into more, smaller pieces.

Special tokens: `<pad>` (id 0), `<bos>` (1), `<eos>` (2). `encode` does not add them; prompts are
built with `bos + encode(text)` and training examples end with `eos` (see `encode_prompt`,
`encode_example`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 768):
    """Trains a byte-level BPE on `texts`; returns a `transformers.PreTrainedTokenizerFast`.

    Training is deterministic for the same texts in the same order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes + special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def benchmark_tokenizer(benchmark, *, vocab_size: int = 768):
    """The tokenizer of the embedded benchmark: public text plus dummy-valued private formats."""
    return train_tokenizer(
        list(benchmark.public_docs) + list(benchmark.format_docs), vocab_size=vocab_size
    )


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """Writes `tokenizer.json` and its config so `AutoTokenizer.from_pretrained(path)` loads it."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(str(path))


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer folder with `transformers.AutoTokenizer` (local files only)."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path}: no tokenizer.json (write it with save_tokenizer)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """`<bos>` + the tokens of `text` (what a query's prompt is fed as)."""
    return [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(tokens, loss mask) of `<bos> prompt response <eos>`; the mask is 1 on response + eos."""
    p = encode_prompt(tokenizer, prompt)
    r = [*tokenizer.encode(response, add_special_tokens=False), tokenizer.eos_token_id]
    return p + r, [0] * len(p) + [1] * len(r)


def encode_docs(tokenizer, docs: Sequence[str]) -> list[int]:
    """One token stream `<bos> doc <eos> <bos> doc <eos> ...` (for packed pretraining)."""
    out: list[int] = []
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        out += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return out
