"""A small byte-level BPE tokenizer trained locally (Sennrich et al., 2016; GPT-2's byte level).

The embedded benchmark trains its own tokenizer with the `tokenizers` library, wraps it as a
`transformers.PreTrainedTokenizerFast` and saves it to a folder, so the demo loads it with
`AutoTokenizer.from_pretrained(path)`: the same code path as a real checkpoint's tokenizer.

Two tokenizers, as an edge SLM and a cloud LLM of different families have: the edge's is trained
on the public corpus plus the private *formats* filled with dummy values drawn from a pool disjoint
from every client's contacts (`Benchmark.format_docs`); the cloud's, with its own vocabulary size,
on the public corpus alone (`benchmark_tokenizers`). No client's private value (names, phones,
emails) enters either vocabulary, so a tokenizer, which ships to the cloud and to every device,
leaks nothing; private names are simply split into more, smaller pieces. Fused decoding maps the
cloud's tokens onto the edge's by their strings (`floe_jax.inference.align`).

Special tokens: `<pad>` (id 0), `<bos>` (1), `<eos>` (2). `encode` does not add them; prompts are
built with `bos + encode(text)` and training examples end with `eos` (see `encode_prompt`,
`encode_example`).

The loader and the encoders here are the only ones in floe_jax: real checkpoints' tokenizers (a
Hugging Face folder, with or without a BOS token, as Qwen's has none) go through the same
`load_tokenizer`, `encode_prompt` and `encode_example` as the benchmark's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

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


def benchmark_tokenizers(benchmark, *, edge_vocab_size: int = 768, cloud_vocab_size: int = 1024):
    """(edge, cloud) tokenizers of the embedded benchmark: the edge's on public text plus the
    dummy-valued private formats, the cloud's on public text alone, each with its own size."""
    edge = train_tokenizer(
        list(benchmark.public_docs) + list(benchmark.format_docs), vocab_size=edge_vocab_size
    )
    return edge, train_tokenizer(list(benchmark.public_docs), vocab_size=cloud_vocab_size)


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """Writes `tokenizer.json` and its config so `AutoTokenizer.from_pretrained(path)` loads it."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(str(path))


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer folder (the benchmark's, or a Hugging Face checkpoint's) with
    `transformers.AutoTokenizer`, from local files only (no hub access)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path}: no tokenizer.json (write it with save_tokenizer)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """`<bos>` (when the tokenizer has one) + the tokens of `text`: what a prompt is fed as.

    A text that already starts with the bos token's spelling (a chat template that writes it,
    as Llama 3's `<|begin_of_text|>`) gets no second one; special tokens spelt in the text (the
    template's `<|im_start|>`...) encode as their ids."""
    bos_tok = getattr(tokenizer, "bos_token", None)
    has_bos = tokenizer.bos_token_id is not None and not (bos_tok and text.startswith(bos_tok))
    bos = [tokenizer.bos_token_id] if has_bos else []
    return [*bos, *tokenizer.encode(text, add_special_tokens=False)]


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(tokens, loss mask) of `[<bos>] prompt response <eos>`; the mask is 1 on response + eos.

    Prompt and response are tokenized apart, so the boundary is exact (a joint tokenization can
    merge the last prompt and first response characters into one token).
    """
    p = encode_prompt(tokenizer, prompt)
    r = [*tokenizer.encode(response, add_special_tokens=False), tokenizer.eos_token_id]
    return p + r, [0] * len(p) + [1] * len(r)


def encode_examples(
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    seq_len: int | None = None,
    multiple: int = 16,
    truncate: bool = False,
) -> dict[str, np.ndarray]:
    """`encode_example` of each (prompt, response), right-padded to one shape.

    Args:
      tokenizer: as for `encode_example`; its pad token fills the rows.
      pairs: N (prompt, response) strings.
      seq_len: T; default the longest example rounded up to `multiple` (few distinct shapes, so
        few compiles).
      multiple: see `seq_len`.
      truncate: cut an example longer than `seq_len` to its first `seq_len` tokens (the end of
        its response, and its eos, are then not trained on; `long_examples` counts them first).

    Returns:
      `tokens` int32, `mask` (1 on real tokens) and `loss_mask` (1 on response + eos), [N, T].

    Raises:
      ValueError: an example is longer than `seq_len` (without `truncate`), or truncation leaves
        an example no response token.
    """
    enc = [encode_example(tokenizer, p, r) for p, r in pairs]
    longest = max(len(t) for t, _ in enc)
    T = -(-longest // multiple) * multiple if seq_len is None else seq_len
    if truncate and longest > T:
        enc = [(t[:T], m[:T]) for t, m in enc]
        for i, (_, m) in enumerate(enc):
            if not any(m):
                raise ValueError(f"example {i}'s prompt fills seq_len={T}: no response is left")
        longest = T
    if longest > T:
        raise ValueError(f"an example has {longest} tokens > seq_len={T}")
    tokens = np.full((len(enc), T), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(enc), T), np.int32)
    loss_mask = np.zeros((len(enc), T), np.int32)
    for i, (t, m) in enumerate(enc):
        tokens[i, : len(t)], mask[i, : len(t)], loss_mask[i, : len(m)] = t, 1, m
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def long_examples(
    tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Which examples `encode_examples(..., seq_len=seq_len)` must cut: ([N] bool longer than
    `seq_len`, [N] bool whose prompt alone reaches it, so that no response token would be left).
    The encoding is `encode_example`'s."""
    n = np.zeros(len(pairs), np.int64)
    p = np.zeros(len(pairs), np.int64)
    for i, (prompt, response) in enumerate(pairs):
        tokens, mask = encode_example(tokenizer, prompt, response)
        n[i], p[i] = len(tokens), len(mask) - sum(mask)
    return n > seq_len, p >= seq_len


def encode_docs(tokenizer, docs: Sequence[str]) -> list[int]:
    """One token stream `<bos> doc <eos> <bos> doc <eos> ...` (for packed pretraining)."""
    out: list[int] = []
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        out += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return out
