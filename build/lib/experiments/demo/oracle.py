"""The token oracle: the ceiling of any token-level mixer of the edge and the cloud.

Along each query's gold answer (the edge's tokenization, then `<eos>`), step t is *covered* when
the edge (the query's own adapter, full private prompt) ranks gold token t first, or the cloud's
top token (asked through the client's privacy guard, like every method) spells a non-empty start
of the gold text left at t. A query is answered when every step is covered: a mixer that picks,
token by token, whichever side knows the next piece would produce the gold answer. It is gold-
guided (teacher forcing), so it bounds what routing alone can reach; it is not a method.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from floe_jax.data.tokenizer import encode_prompt
from floe_jax.inference.cloud import Prefix
from floe_jax.inference.step import rows_lora
from floe_jax.model import forward


def oracle_answers(params, cfg, tokenizer, queries, *, guard, mapper, lora=None) -> list[bool]:
    """Whether the oracle covers every step of each query's answer (module docstring).

    Args:
      params, cfg: the edge model; lora: per-query adapters (stacked, one row per query) or None.
      tokenizer: the edge tokenizer.
      queries: the queries (one client's, so one guard screens them all).
      guard: the `GuardedCloud` the client reaches the cloud through.
      mapper: cloud token strings -> edge ids (`StringMapper`), or None when the back end
        returns edge ids itself.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [encode_prompt(tokenizer, q.prompt) for q in queries]
    golds = [[*tokenizer.encode(" " + q.answer, add_special_tokens=False), eos] for q in queries]
    T = max(len(p) + len(g) for p, g in zip(prompts, golds, strict=True))
    tokens = np.full((len(queries), T), pad, np.int32)
    for i, (p, g) in enumerate(zip(prompts, golds, strict=True)):
        tokens[i, : len(p) + len(g)] = p + g  # right padding: causal rows never see it
    rows = None if lora is None else rows_lora(lora)
    top = np.asarray(jnp.argmax(forward(params, jnp.asarray(tokens), cfg, lora=rows), -1))
    out = []
    for i, (p, g) in enumerate(zip(prompts, golds, strict=True)):
        ok = True
        for t in range(len(g)):
            if int(top[i, len(p) + t - 1]) == g[t]:
                continue  # the edge ranks the gold token first
            ids = p + g[:t]
            prefix = Prefix(ids=tuple(ids), text=_text(tokenizer, ids), stream=None)
            reply = guard.next_token([prefix])
            if not reply.ok[0] or not _cloud_covers(reply, tokenizer, mapper, g[t:], eos):
                ok = False
                break
        out.append(ok)
    return out


def _text(tokenizer, ids) -> str:
    return tokenizer.decode([i for i in ids if i not in (tokenizer.bos_token_id,
                                                         tokenizer.pad_token_id)],
                            skip_special_tokens=True)  # fmt: skip


def _cloud_covers(reply, tokenizer, mapper, rest: list[int], eos: int) -> bool:
    """Whether the cloud's top token spells a non-empty start of the gold ids `rest`."""
    best = int(np.argmax(reply.top_logprobs[0]))
    token = reply.top_tokens[0][best] if reply.top_tokens is not None else None
    # the edge id: mapped here from the string, or already by the back end (HTTPCloud)
    edge_id = mapper(token) if mapper is not None and token is not None else int(
        reply.top_ids[0][best])  # fmt: skip
    if rest == [eos]:
        return edge_id == eos
    if token is None:
        token = tokenizer.decode([edge_id]) if edge_id >= 0 else ""
    text = tokenizer.decode([i for i in rest if i != eos])
    return bool(token) and text.startswith(token)
