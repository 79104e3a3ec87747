"""Cloud replies as arrays for the jitted fused step (host side).

Shapes: B batch, W cloud vocab, K listed (top-k) tokens.

`merge_rows` gathers the one-row replies of a step into a B-row `CloudDistribution`;
`cloud_input` turns it into a `CloudInput` of fixed shapes (dense: the cloud's log-probs, aligned
on the device; sparse: top-k already mapped to edge ids here, padded to K), so the step compiles
once per bucket whatever the cloud sent. A row whose mass falls on no edge token is not usable
(`ok` False): the loop reports it as a failure (`unmapped_rows`) instead of fusing it.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import struct

from floe_jax.inference.align import StringMapper, VocabMap
from floe_jax.inference.cloud import CloudDistribution


@struct.dataclass
class CloudInput:
    """The cloud's distributions for one step, as arrays (built on the host by `cloud_input`).

    Dense: `dense [B, W]` log-probs, `c2e [W]` cloud -> edge ids (`[0]`: identity), `ids`,
    `logp`, `valid` of width 0. Sparse: `ids [B, K]` edge ids (-1 unmapped), `logp [B, K]`,
    `valid [B, K]`, `dense` of width 0. `ok [B]`: the row has a distribution in time.
    """

    ok: jax.Array
    dense: jax.Array
    c2e: jax.Array
    ids: jax.Array
    logp: jax.Array
    valid: jax.Array

    @property
    def is_dense(self) -> bool:
        return self.dense.shape[-1] > 0


def cloud_input(
    dist: CloudDistribution,
    batch: int,
    edge_size: int,
    *,
    kind: str,
    cloud_size: int | None = None,
    top_k: int = 20,
    vocab_map: VocabMap | None = None,
    mapper: StringMapper | None = None,
) -> CloudInput:
    """Host arrays for the jitted step from a (possibly partial) `CloudDistribution`.

    Dense distributions keep the cloud vocabulary (alignment happens on the device through
    `vocab_map.cloud_to_edge`); sparse ones are mapped to edge ids here (ids through the map,
    token strings through `mapper`), padded or cut to `top_k` columns.
    """
    ok = np.zeros(batch, bool)
    n = dist.batch
    ok[:n] = dist.ok
    ident = vocab_map is None or vocab_map.identity
    if kind == "dense":
        W = cloud_size or edge_size
        dense = np.zeros((batch, W), np.float32)
        if dist.logprobs is not None:
            if dist.logprobs.shape[-1] != W:
                raise ValueError(f"cloud sent {dist.logprobs.shape[-1]} log-probs, expected {W}")
            dense[:n] = np.where(ok[:n, None], dist.logprobs, 0.0)
        else:
            ok[:] = False
        if ident and W != edge_size:
            raise ValueError(f"identity alignment needs equal vocabularies ({W} vs {edge_size})")
        c2e = np.zeros((0,), np.int32) if ident else vocab_map.cloud_to_edge.astype(np.int32)
        if not ident:  # a distribution with no mass on a mapped id says nothing about the edge's
            ok &= np.isfinite(np.where(c2e >= 0, dense, -np.inf)).any(-1)
        z = np.zeros((batch, 0))
        return CloudInput(ok, dense, c2e, z.astype(np.int32), z.astype(np.float32), z.astype(bool))
    K = top_k
    ids = np.full((batch, K), -1, np.int32)
    logp = np.full((batch, K), -np.inf, np.float32)
    for b in range(n):
        if not ok[b]:
            continue
        row_lp = dist.top_logprobs[b]
        kk = min(K, int(np.isfinite(row_lp).sum()) if row_lp.size else 0, row_lp.shape[-1])
        for j in range(kk):
            cid = int(dist.top_ids[b, j]) if dist.top_ids is not None else -1
            tok = dist.top_tokens[b][j] if dist.top_tokens and j < len(dist.top_tokens[b]) else None
            if cid >= 0 and ident:
                eid = cid if cid < edge_size else -1
            elif cid >= 0 and vocab_map is not None:
                eid = int(vocab_map.cloud_to_edge[cid]) if cid < vocab_map.cloud_size else -1
            elif tok is not None and mapper is not None:
                eid = mapper(tok)
            else:
                eid = -1
            ids[b, j], logp[b, j] = eid, row_lp[j]
        ok[b] = bool((ids[b, :kk] >= 0).any())  # no listed token maps: nothing to fuse
    valid = np.isfinite(logp)
    logp = np.where(valid, logp, 0.0).astype(np.float32)
    return CloudInput(ok, np.zeros((batch, 0), np.float32), np.zeros((0,), np.int32), ids, logp,
                      valid)  # fmt: skip


def unmapped_rows(dist: CloudDistribution, ci: CloudInput) -> list[int]:
    """Rows the cloud answered whose answer maps to no edge token."""
    return [b for b in range(dist.batch) if dist.ok[b] and not ci.ok[b]]


def reason(err: str | None) -> str:
    if not err:
        return "unknown"
    return err.split(":")[0].split(" from ")[0].split(" (after")[0][:60]


def merge_rows(got: dict[int, CloudDistribution], B: int, kind: str) -> CloudDistribution:
    """One-row distributions -> a B-row distribution (missing rows elsewhere)."""
    rows = sorted(got)
    ok = np.array([got[b].ok[0] for b in rows])
    errors = [got[b].errors[0] if got[b].errors else None for b in rows]
    if kind == "dense":
        width = next((got[b].logprobs.shape[-1] for b in rows if got[b].logprobs is not None), 0)
        lp = np.full((len(rows), width), -np.inf, np.float32)
        for j, b in enumerate(rows):
            if got[b].logprobs is not None and got[b].ok[0]:
                lp[j] = got[b].logprobs[0]
        part = CloudDistribution(ok=ok, logprobs=lp if width else None, errors=errors)
    else:
        widths = [got[b].top_logprobs.shape[-1] for b in rows if got[b].top_logprobs is not None]
        width = max(widths, default=0)
        ids = np.full((len(rows), width), -1, np.int32)
        lps = np.full((len(rows), width), -np.inf, np.float32)
        toks: list[list[str]] = [[] for _ in rows]
        for j, b in enumerate(rows):
            g = got[b]
            if g.top_logprobs is None or not g.ok[0]:
                continue
            k = g.top_logprobs.shape[-1]
            lps[j, :k] = g.top_logprobs[0]
            if g.top_ids is not None:
                ids[j, :k] = g.top_ids[0]
            if g.top_tokens is not None:
                toks[j] = list(g.top_tokens[0])
        part = CloudDistribution(ok=ok, top_ids=ids, top_tokens=toks, top_logprobs=lps,
                                 errors=errors)  # fmt: skip
    return part.scatter_rows(rows, B, reason="no request")
