"""Client data: every client's examples padded into one pytree, and the rows a round samples
from it.

Shapes: C sampled clients, N clients in the federation, E examples per client (padded), T tokens,
L layers, I / O a projection's input / output width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClientData:
    """Every client's examples, padded to one shape so a round runs in one compiled program.

    Attributes:
      tokens: int32 [N, E, T], left- or right-padded token ids.
      mask: [N, E, T] attention mask, 1 for real tokens, 0 for padding.
      loss_mask: [N, E, T] 1 where the token is a training target (the response).
      num_examples: int32 [N], real examples per client; rows at or past it are padding.
    """

    tokens: jax.Array
    mask: jax.Array
    loss_mask: jax.Array
    num_examples: jax.Array

    @property
    def num_clients(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[-1]


def check_token_ids(tokens_NET, vocab_size: int | None = None) -> None:
    """Raises `ValueError` naming the client, row and position of the first token id outside
    `[0, vocab_size)` (only negative ids when `vocab_size` is None).

    An id out of range reaches the embedding as an out-of-bounds gather, which JAX answers with
    NaN (or, for a negative id, with a row counted from the end): the client's update would be
    dropped as non-finite, or trained on the wrong tokens, with no word of why.

    Args:
      tokens_NET: int [N, E, T] every client's examples (host or device array).
      vocab_size: V of the model the tokens are for, or None when it is not known.
    """
    if isinstance(tokens_NET, jax.Array) and not tokens_NET.is_fully_addressable:
        # A multi-host run's data: each process checks the clients it holds.
        for sh in tokens_NET.addressable_shards:
            if sh.replica_id == 0:
                _check_rows(np.asarray(sh.data), vocab_size, sh.index[0].start or 0)
        return
    _check_rows(np.asarray(tokens_NET), vocab_size, 0)


def _check_rows(tok: np.ndarray, vocab_size: int | None, first: int) -> None:
    """`check_token_ids` of clients `first, first + 1, ...`."""
    bad = tok < 0 if vocab_size is None else (tok < 0) | (tok >= vocab_size)
    if not bad.any():
        return
    i, row, pos = (int(x) for x in np.argwhere(bad)[0])
    bound = "ids must be >= 0" if vocab_size is None else f"outside [0, vocab_size={vocab_size})"
    raise ValueError(
        f"client {first + i}: row {row} has token id {int(tok[i, row, pos])} at position {pos}, "
        f"{bound} "
        f"({int(bad.sum())} such ids in all)"
    )


def client_data(
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    min_examples: int = 1,
    vocab_size: int | None = None,
) -> ClientData:
    """Pads per-client `(tokens [E_i, T], mask [E_i, T], loss_mask [E_i, T])` into `ClientData`.

    Args:
      examples: one triple per client; every client's T must agree (pad sequences first).
      min_examples: pad the example axis to at least this many rows.
      vocab_size: the model's V when known: a token id outside `[0, V)` is an error naming the
        client and row (negative ids always are; `check_token_ids`).
    """
    if not examples:
        raise ValueError("client_data needs at least one client")
    seq = {np.shape(t)[-1] for t, _, _ in examples}
    if len(seq) != 1:
        raise ValueError(f"clients have different sequence lengths {sorted(seq)}; pad them first")
    (T,) = seq
    E = max([min_examples] + [len(t) for t, _, _ in examples])
    N = len(examples)
    tok = np.zeros((N, E, T), np.int32)
    msk = np.zeros((N, E, T), np.float32)
    lm = np.zeros((N, E, T), np.float32)
    n = np.zeros((N,), np.int32)
    for i, (t, m, l) in enumerate(examples):
        for name, x in (("tokens", t), ("mask", m), ("loss_mask", l)):
            if np.shape(x) != np.shape(t):
                raise ValueError(f"client {i}: {name} has shape {np.shape(x)}, tokens {t.shape}")
        for name, x in (("mask", m), ("loss_mask", l)):
            bad = ~np.isfinite(np.asarray(x, np.float64)) | (np.asarray(x, np.float64) < 0)
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise ValueError(f"client {i}: row {row} of {name} is negative or not finite")
        k = len(t)
        tok[i, :k], msk[i, :k], lm[i, :k], n[i] = t, m, l, k
    check_token_ids(tok, vocab_size)
    return ClientData(
        tokens=jnp.asarray(tok),
        mask=jnp.asarray(msk),
        loss_mask=jnp.asarray(lm),
        num_examples=jnp.asarray(n),
    )


def sample_batches(data: ClientData, ids_C, keys_C, S: int, B: int) -> dict:
    """Each sampled client's S x B rows (traceable): a random permutation of its real examples,
    one pass at most; rows past its example count are padding (`batch_mask` 0).

    Args:
      data: every client's examples (N clients).
      ids_C: int [C] the sampled clients; keys_C: [C] one PRNG key each.
      S, B: local steps and batch size.

    Returns:
      `{"tokens", "mask", "loss_mask": [C, S, B, T], "batch_mask": [C, S, B]}`.
    """
    E = data.tokens.shape[1]

    def one(i, key):
        n = data.num_examples[i]
        u = jnp.where(jnp.arange(E) < n, jax.random.uniform(key, (E,)), 2.0)
        order = jnp.argsort(u)
        j = jnp.arange(S * B)
        idx = order[j % E]
        pick = lambda x: x[i][idx].reshape(S, B, -1)
        return {
            "tokens": pick(data.tokens),
            "mask": pick(data.mask),
            "loss_mask": pick(data.loss_mask),
            "batch_mask": (j < n).astype(jnp.float32).reshape(S, B),
        }

    return jax.vmap(one)(ids_C, keys_C)


def eval_rows(data: ClientData, ids_C, B: int) -> dict:
    """The first B rows of each sampled client's eval split ([C, B, T]); rows past a client's
    example count carry no loss."""
    E = data.tokens.shape[1]
    j = jnp.arange(B) % E
    return {
        "tokens": data.tokens[ids_C][:, j],
        "mask": data.mask[ids_C][:, j],
        "loss_mask": data.loss_mask[ids_C][:, j]
        * (jnp.arange(B)[None, :, None] < data.num_examples[ids_C][:, None, None]),
    }
