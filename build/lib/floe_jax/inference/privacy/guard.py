"""`GuardedCloud(backend, detector)`: the single exit to the cloud.

It is a `CloudBackend` whose `next_token` screens every prefix before the wrapped back end sees
it (so a span that arrives token by token is held back until it is decided; see `detector`), and
counts what it withheld. The fused generation loop only talks to a `GuardedCloud` (it wraps a
bare back end itself). A speculative draft (`score`) is screened at every position, as token by
token decoding would screen each prefix: the draft stops where what would be sent stops extending
what came before (a held-back or redacted span, or a withheld prefix). A chat cloud's proposal
(`propose`) is cut by the same rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from floe_jax.inference.privacy.detector import Decision, PrivacyDetector


class GuardedCloud:
    """The only door to the cloud: screens each prefix, then calls the wrapped back end.

    A prefix's text is `prefix.text`, or its ids decoded with `decode` (the edge tokenizer). A
    redacted prefix is sent as text only (its ids no longer match), or re-encoded with `encode`
    when the back end needs ids. An `edge_only` row is not sent: its result row is marked missing.

    Args:
      backend: any `CloudBackend`.
      detector: the privacy detector (its counters record what was withheld).
      decode: ids -> text, for prefixes that carry only ids.
      encode: text -> ids, to re-tokenise a redacted prefix for id-only back ends.
    """

    def __init__(
        self,
        backend,
        detector: PrivacyDetector | None = None,
        *,
        decode: Callable[[Sequence[int]], str] | None = None,
        encode: Callable[[str], list[int]] | None = None,
    ):
        if isinstance(backend, GuardedCloud):
            raise TypeError("backend is already guarded")
        self._backend = backend
        self.detector = detector or PrivacyDetector()
        self.decode, self.encode = decode, encode

    @property
    def kind(self) -> str:
        return self._backend.kind

    @property
    def vocab_size(self):
        return getattr(self._backend, "vocab_size", None)

    def _text(self, prefix) -> str | None:
        """The prefix's own text: `prefix.text`, or its ids decoded (None: neither)."""
        if prefix.text is None and self.decode is not None and prefix.ids is not None:
            return self.decode(list(prefix.ids))
        return prefix.text

    @property
    def can_propose(self) -> bool:
        """Whether the back end generates proposals (`propose`): it has `propose` and does not
        say otherwise (`can_propose`: a completions `HTTPCloud` scores drafts instead)."""
        b = self._backend
        return getattr(b, "propose", None) is not None and getattr(b, "can_propose", True)

    @property
    def backend_name(self) -> str:
        """The back end, for messages: its class, and its API when it has one."""
        b = self._backend
        api = getattr(b, "api", None)
        return f"{type(b).__name__}(api={api!r})" if api else type(b).__name__

    def screen(self, prefix):
        """(prefix to send or None, decision)."""
        text = self._text(prefix)
        if text is None and self.detector.policy.action == "allow":
            self.detector.count("allow")
            return prefix, Decision("allow", None, ())
        d = self.detector.screen(text)
        if d.action == "edge_only":
            return None, d
        if d.action == "allow":
            return dataclasses.replace(prefix, text=text), d
        ids = self.encode(d.text) if self.encode is not None else None
        return dataclasses.replace(prefix, ids=ids, text=d.text), d

    def next_token(self, prefixes):
        """Screens every prefix and asks the back end for the allowed ones."""
        from floe_jax.inference.cloud import CloudDistribution

        screened = [self.screen(p)[0] for p in prefixes]
        send = [i for i, p in enumerate(screened) if p is not None]
        if not send:
            return CloudDistribution.missing(len(prefixes), reason="privacy")
        got = self._backend.next_token([screened[i] for i in send])
        return got.scatter_rows(send, len(prefixes), reason="privacy")

    def score(self, draft):
        """Screens each position of a `Draft` and asks the back end to score the longest run of
        positions whose screened texts extend one another (so the cloud sees exactly what token by
        token decoding would send at each of them); later positions come back missing (`held`).
        A back end without `score` is asked for position 0 alone. A withheld position 0 sends
        nothing: every position is missing (`privacy`) but the first one token by token decoding
        would send again, which is `sendable` (the edge decides the positions before it)."""
        from floe_jax.inference.cloud import CloudDistribution, Draft

        P, sent = draft.positions, []
        for j in range(P):
            p, _ = self.screen(draft.prefix(j))
            if p is None:
                break
            if sent and not _extends(sent[-1], p):
                break
            sent.append(p)
        if not sent:
            out = CloudDistribution.missing(P, reason="privacy")
            for j in range(1, P):
                if self.screen(draft.prefix(j))[0] is not None:
                    out.errors[j] = "sendable"
                    break
            return out
        score = getattr(self._backend, "score", None)
        if score is None or len(sent) == 1:
            got = self._backend.next_token(sent[:1])
        else:
            last = sent[-1]
            texts = all(p.text is not None for p in sent)
            ids = all(p.ids is not None for p in sent)
            got = score(
                Draft(
                    ids=last.ids if ids else None,
                    text=last.text if texts else None,
                    stream=draft.stream,
                    budget_s=draft.budget_s,
                    id_ends=tuple(len(p.ids) for p in sent) if ids else None,
                    text_ends=tuple(len(p.text) for p in sent) if texts else None,
                )
            )
            if not got.ok[0] and got.errors and got.errors[0] == "unscorable":
                first = self._backend.next_token(sent[:1])  # the draft split its first position
                got = got.scatter_rows(range(1, got.batch), got.batch, reason="unscorable")
                got = _put_row(got, first, 0)
        return got.scatter_rows(range(got.batch), P, reason="held")

    def propose(self, prefix, k: int):
        """A chat cloud's next k tokens after the screened prefix (`http_cloud.propose`),
        screened as token by token decoding screens each prefix (the rule of `score`): the
        prefix is screened as `next_token` screens it (withheld: the whole proposal is missing,
        `privacy`); the answer is cut at the first position j where screening the ORIGINAL
        prefix's text with the cloud's first j tokens would not send the sent text with those
        tokens (a span held back or redacted; `held`): token by token, the cloud would not have
        been asked that prefix there."""
        from floe_jax.inference.cloud import CloudDistribution, CloudError, Prefix
        from floe_jax.inference.http_cloud.propose import Proposal

        sent, _ = self.screen(prefix)
        if sent is None:
            return Proposal.missing(k, "privacy")
        if getattr(self._backend, "propose", None) is None:
            raise CloudError(
                f"{type(self._backend).__name__} cannot propose (a chat HTTPCloud can)"
            )
        got = self._backend.propose(sent, k)
        cut, text = len(got.pieces), self._text(prefix)
        if text is not None and sent.text is not None:
            last = Prefix(text=sent.text, stream=None)
            for j in range(1, len(got.pieces)):
                p, _ = self.screen(Prefix(text=text + got.text(j), stream=None))
                if p is None or not _extends(last, p) or p.text != sent.text + got.text(j):
                    cut = j
                    break
                last = p
        if cut < len(got.pieces):
            d = got.dist
            head = CloudDistribution(
                **{f.name: None if getattr(d, f.name) is None else getattr(d, f.name)[:cut]
                   for f in dataclasses.fields(d)}
            )  # fmt: skip
            ids = np.where(np.arange(k) < cut, got.ids, -1).astype(np.int32)
            got = Proposal(head.scatter_rows(range(cut), k, reason="held"), ids, got.pieces[:cut])
        return got

    def close(self):
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()


def _extends(a, b) -> bool:
    """Whether prefix `b` continues prefix `a` in what is sent (text, and ids when both have)."""
    if (a.text is None) != (b.text is None) or (a.ids is None) != (b.ids is None):
        return False
    if a.text is not None and not (len(b.text) > len(a.text) and b.text.startswith(a.text)):
        return False
    return a.ids is None or (len(b.ids) > len(a.ids) and b.ids[: len(a.ids)] == a.ids)


def _put_row(dist, one, j: int):
    """`dist` with row j replaced by the one-row distribution `one`."""
    rows = [one if i == j else dist.row(i) for i in range(dist.batch)]
    from floe_jax.inference.replies import merge_rows

    kind = "dense" if any(r.logprobs is not None for r in rows) else "sparse"
    return merge_rows(dict(enumerate(rows)), dist.batch, kind)
