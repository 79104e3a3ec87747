"""`GuardedCloud(backend, detector)`: the single exit to the cloud.

It is a `CloudBackend` whose `next_token` screens every prefix before the wrapped back end sees
it (so a span that arrives token by token is held back until it is decided; see `detector`), and
counts what it withheld. The fused generation loop only talks to a `GuardedCloud` (it wraps a
bare back end itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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

    def screen(self, prefix):
        """(prefix to send or None, decision)."""
        from floe_jax.inference.cloud import Prefix

        text = prefix.text
        if text is None and self.decode is not None and prefix.ids is not None:
            text = self.decode(list(prefix.ids))
        if text is None and self.detector.policy.action == "allow":
            self.detector.count("allow")
            return prefix, Decision("allow", None, ())
        d = self.detector.screen(text)
        if d.action == "edge_only":
            return None, d
        if d.action == "allow":
            return Prefix(ids=prefix.ids, text=text, stream=prefix.stream), d
        ids = self.encode(d.text) if self.encode is not None else None
        return Prefix(ids=ids, text=d.text, stream=prefix.stream), d

    def next_token(self, prefixes):
        """Screens every prefix and asks the back end for the allowed ones."""
        from floe_jax.inference.cloud import CloudDistribution

        screened = [self.screen(p)[0] for p in prefixes]
        send = [i for i, p in enumerate(screened) if p is not None]
        if not send:
            return CloudDistribution.missing(len(prefixes), reason="privacy")
        got = self._backend.next_token([screened[i] for i in send])
        return got.scatter_rows(send, len(prefixes), reason="privacy")

    def close(self):
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()
