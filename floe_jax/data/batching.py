"""Instruction examples as fixed-shape padded arrays, and per-client batches for local steps.

Shape legend: N examples, T tokens, C clients, S local steps, B batch.

An example is a `(prompt, response)` pair of strings. It becomes `prompt_ids + response_ids`:

- plain: `prompt_ids = encode(prompt_format.format(prompt=prompt))` with the tokenizer's special
  tokens (e.g. BOS), `response_ids = encode(response)` without them, then EOS appended;
- chat (`chat=True` and the tokenizer has a chat template): the template is rendered as text for
  the conversation up to the generation prompt and for the full conversation; the response is
  what the full rendering adds after the prompt rendering (the template's end-of-turn tokens
  included, so no extra EOS). Both are tokenized without adding special tokens (the template
  writes them).

Prompt and response are tokenized separately so the boundary is exact (a joint tokenization can
merge the last prompt and first response characters into one token).

Arrays (right-padded, so row t of every array refers to the same token):

    tokens    [N, T] int32  ids, `pad_id` after the end
    mask      [N, T] int32  1 on real tokens
    loss_mask [N, T] int32  1 on response tokens (EOS / end-of-turn included), 0 on prompt, pad

A next-token loss predicts `tokens[:, 1:]` from `tokens[:, :-1]` and weights position t by
`loss_mask[:, t + 1]`.

Truncation (`max_len = T`), `truncation="prompt_left"` (default): the response is kept whole when
it fits in `T - min_prompt_tokens`, else cut from its end (losing its EOS); the prompt then fills
what is left, cut from its *start* (the part closest to the response survives; a leading BOS is
kept when `keep_bos`). `truncation="right"`: the concatenation is cut at T from the right (the
Hugging Face default). Examples whose response is cut away entirely are still kept, with an
all-zero `loss_mask`; `tokenize_examples` reports how many were truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

TRUNCATIONS = ("prompt_left", "right")


def _ids(out) -> list[int]:
    if hasattr(out, "ids"):  # tokenizers.Encoding
        out = out.ids
    elif isinstance(out, dict) and "input_ids" in out:  # BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    """`tokenizer.encode(text)` with or without special tokens, for HF and plain tokenizers."""
    try:
        return _ids(tokenizer.encode(text, add_special_tokens=special))
    except TypeError:  # a plain object with `encode(text)` only
        return _ids(tokenizer.encode(text))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(
        tokenizer, "apply_chat_template"
    )


def _eos_id(tokenizer, eos_id):
    if eos_id is not None:
        return eos_id
    return getattr(tokenizer, "eos_token_id", None)


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    chat: bool = False,
    system: str | None = None,
    prompt_format: str = "{prompt}",
    eos_id: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of one example: `(prompt_ids, response_ids)` (see the module docstring)."""
    if chat and has_chat_template(tokenizer):
        msgs = [{"role": "system", "content": system}] if system is not None else []
        msgs.append({"role": "user", "content": prompt})
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*msgs, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(head):
            raise ValueError(
                "the chat template does not render the prompt as a prefix of the full "
                "conversation, so the response cannot be located; use chat=False"
            )
        return _encode(tokenizer, head, False), _encode(tokenizer, full[len(head) :], False)
    prompt_ids = _encode(tokenizer, prompt_format.format(prompt=prompt), True)
    response_ids = _encode(tokenizer, response, False)
    eos = _eos_id(tokenizer, eos_id)
    if eos is not None:
        response_ids = [*response_ids, int(eos)]
    return prompt_ids, response_ids


def truncate(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    max_len: int,
    *,
    truncation: str = "prompt_left",
    min_prompt_tokens: int = 1,
    bos_id: int | None = None,
) -> tuple[list[int], list[int]]:
    """Cuts `prompt_ids + response_ids` to `max_len` tokens (policy: the module docstring)."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is not one of {TRUNCATIONS}")
    p, r = list(prompt_ids), list(response_ids)
    if len(p) + len(r) <= max_len:
        return p, r
    if truncation == "right":
        p = p[:max_len]
        return p, r[: max_len - len(p)]
    r = r[: max(max_len - min(min_prompt_tokens, len(p)), 0)]
    room = max_len - len(r)
    if room <= 0:
        return [], r
    keep_bos = bos_id is not None and p and p[0] == bos_id and room >= 2
    return ([p[0], *p[len(p) - room + 1 :]] if keep_bos else p[len(p) - room :]), r


def pad_examples(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Right-pads already-truncated `(prompt_ids, response_ids)` pairs to `[N, max_len]`."""
    n = len(examples)
    tokens = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), np.int32)
    loss_mask = np.zeros((n, max_len), np.int32)
    for i, (p, r) in enumerate(examples):
        ids = [*p, *r]
        if len(ids) > max_len:
            raise ValueError(f"example {i} has {len(ids)} tokens > max_len={max_len}; truncate")
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        loss_mask[i, len(p) : len(ids)] = 1
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def tokenize_examples(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_len: int,
    chat: bool = False,
    system: str | None = None,
    prompt_format: str = "{prompt}",
    truncation: str = "prompt_left",
    min_prompt_tokens: int = 1,
    pad_id: int | None = None,
    eos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes, truncates and right-pads instruction examples.

    Args:
      tokenizer: an object with `encode(text)` (ids, or an `Encoding` with `.ids`), or a Hugging
        Face tokenizer (`add_special_tokens`, `eos_token_id`, `pad_token_id`, chat template).
      prompts, responses: N strings each.
      max_len: T.
      chat: render with the tokenizer's chat template when it has one.
      system: optional system message (chat only).
      prompt_format: plain-mode prompt text, with `{prompt}`.
      truncation, min_prompt_tokens: see the module docstring.
      pad_id: id written after the end; default the tokenizer's pad, else EOS, else 0.
      eos_id: appended to plain-mode responses; default the tokenizer's EOS (None: nothing).

    Returns:
      `tokens`, `mask`, `loss_mask` [N, T] int32; `length` [N] int32 real tokens;
      `truncated` [N] bool.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = _eos_id(tokenizer, eos_id)
    pad_id = 0 if pad_id is None else int(pad_id)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    examples, truncated = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p, r = encode_example(
            tokenizer,
            prompt,
            response,
            chat=chat,
            system=system,
            prompt_format=prompt_format,
            eos_id=eos_id,
        )
        truncated.append(len(p) + len(r) > max_len)
        examples.append(
            truncate(
                p,
                r,
                max_len,
                truncation=truncation,
                min_prompt_tokens=min_prompt_tokens,
                bos_id=bos_id,
            )
        )
    out = pad_examples(examples, max_len, pad_id=pad_id)
    out["length"] = out["mask"].sum(1).astype(np.int32)
    out["truncated"] = np.asarray(truncated, bool)
    return out


def _client_order(key, n: int, total: int, epochs: int | None) -> np.ndarray:
    """Indices into a client's n examples for `total` slots: shuffled epoch after epoch (a fresh
    permutation each epoch); -1 marks an empty slot (no data, or past `epochs` passes)."""
    if n == 0:
        return np.full((total,), -1, np.int64)
    n_epochs = -(-total // n) if epochs is None else min(epochs, -(-total // n))
    perms = [
        np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n)) for e in range(n_epochs)
    ]
    order = np.concatenate(perms)[:total]
    return np.pad(order, (0, total - len(order)), constant_values=-1)


def client_batches(
    data: dict[str, np.ndarray],
    client_indices: Sequence[Sequence[int]],
    *,
    steps: int,
    batch: int,
    key: jax.Array,
    epochs: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-client batches for S local steps of B examples, stacked on a client axis.

    Each client samples its own examples without replacement, reshuffling after each pass, from
    `jax.random.split(key, C)[c]`. With `epochs=None` every slot is filled (small clients repeat
    examples); with `epochs=E` a client stops after E passes and its remaining slots, like all
    slots of a client without data, are padding with zero `mask` and `loss_mask`.

    Args:
      data: `tokens`, `mask`, `loss_mask` [N, T] (from `tokenize_examples`).
      client_indices: C index arrays into N (from `floe_jax.data.splits`).
      steps, batch: S and B.
      key: PRNG key.
      epochs: optional cap on passes over each client's data.

    Returns:
      `tokens`, `mask`, `loss_mask` [C, S, B, T] int32; `example_mask` [C, S, B] int32 (1 for a
      real example); `num_examples` [C] int32 (each client's data size, for FedAvg weights).
    """
    tokens = np.asarray(data["tokens"])
    n_all, t = tokens.shape
    c = len(client_indices)
    total = steps * batch
    keys = jax.random.split(key, c)
    out = {
        "tokens": np.zeros((c, total, t), np.int32),
        "mask": np.zeros((c, total, t), np.int32),
        "loss_mask": np.zeros((c, total, t), np.int32),
    }
    example_mask = np.zeros((c, total), np.int32)
    for ci, idx in enumerate(client_indices):
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_all):
            raise ValueError(f"client {ci}: example index out of range [0, {n_all})")
        order = _client_order(keys[ci], len(idx), total, epochs)
        live = order >= 0
        rows = idx[order[live]]
        example_mask[ci] = live
        for name in out:
            out[name][ci, live] = np.asarray(data[name])[rows]
    out = {k: v.reshape(c, steps, batch, t) for k, v in out.items()}
    out["example_mask"] = example_mask.reshape(c, steps, batch)
    out["num_examples"] = np.asarray([len(i) for i in client_indices], np.int32)
    return out
