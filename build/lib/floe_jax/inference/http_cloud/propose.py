"""Speculation for chat-only clouds: the cloud proposes, the edge verifies.

A chat API has no prompt log-probs, so it cannot score an edge draft (`HTTPCloud.score`). It can
generate: one chat request with `max_tokens=k`, `logprobs=true` and `top_logprobs` returns the
cloud's k next tokens (greedy, `temperature=0`) with its top-k at every position, each position
conditioned on the tokens the cloud generated before it. The edge then scores those positions in
one batched step and keeps the fused choice while it agrees with the cloud's token
(`floe_jax.inference.propose_decode.propose_round`).

`HTTPCloud.propose` asks, `proposal_rows` reads the answer and `HTTPCloud.read_proposal` maps it
to the edge. The guard
(`GuardedCloud.propose`) screens the request's prefix like any prefix and cuts a proposal at the
first position whose text token-by-token decoding would not send unchanged (a span held back or
redacted), so the cloud's distribution is used exactly where token-by-token decoding would have
used it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from floe_jax.inference.cloud import CloudDistribution, CloudError
from floe_jax.inference.http_cloud.parse import TOKEN_ID, checked_logprob, parse_json


@dataclasses.dataclass
class Proposal:
    """The cloud's k proposed tokens and its distributions before each.

    Attributes:
      dist: [k] rows: row j is the cloud's top-k before its token j (after tokens 0..j-1);
        rows past the end of the answer, or cut by the guard, are missing.
      ids: [k] int32 edge ids of the proposed tokens; -1 past the end, or for a token that maps
        onto no single edge token (the edge cannot follow the proposal past it).
      pieces: the proposed tokens' bytes, for screening and logs.
    """

    dist: CloudDistribution
    ids: np.ndarray
    pieces: list[bytes]

    def text(self, j: int | None = None) -> str:
        """The first j proposed tokens as text (a character split across tokens decodes as
        U+FFFD, as a tokenizer's `decode` does)."""
        return b"".join(self.pieces[:j]).decode("utf-8", errors="replace")

    @classmethod
    def missing(cls, k: int, reason: str) -> Proposal:
        return cls(CloudDistribution.missing(k, reason), np.full(k, -1, np.int32), [])


def _spelled(e: dict) -> tuple[str, bytes]:
    """(key as the aligner reads it, bytes) of one chat log-probs entry: the key is `token`
    (`token_id:N` kept), else its bytes as `chat_top` spells them; the bytes are `bytes` when
    given, else the token's UTF-8."""
    tok = str(e.get("token", ""))
    raw = tok.encode()
    b = e.get("bytes")
    if isinstance(b, list) and b:
        try:
            raw = bytes(b)
        except (ValueError, TypeError):
            pass
    if TOKEN_ID.match(tok):
        return tok, raw
    return raw.decode("utf-8", errors="backslashreplace"), raw


def proposal_rows(raw: bytes) -> list[tuple[str, bytes, list[tuple[str, float]]]]:
    """`choices[0].logprobs.content` of a chat answer: per generated token (its key, its bytes,
    its position's [(token, log-prob)] best first)."""
    obj = parse_json(raw)
    try:
        content = obj["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        raise CloudError("bad response: no choices[0].logprobs.content") from None
    if not isinstance(content, list):
        raise CloudError("bad response: logprobs.content is not a list")
    out = []
    for j, e in enumerate(content):
        top = e.get("top_logprobs") if isinstance(e, dict) else None
        if not isinstance(top, list) or not top:
            raise CloudError(f"bad response: content[{j}].top_logprobs is not a non-empty list")
        rows = []
        for t in top:
            if not isinstance(t, dict) or "logprob" not in t:
                raise CloudError(f"bad response: top_logprobs entry {t!r:.80}")
            key, _ = _spelled(t)
            rows.append((key, checked_logprob(key, t["logprob"])))
        key, piece = _spelled(e)
        out.append((key, piece, rows))
    return out
