"""Privacy detector: what leaves the device, and how.

The edge model always sees the full context (CoGenesis, Zhang et al., ACL 2024: the small model
holds the private context). Anything sent to the cloud first passes `PrivacyDetector.screen`,
which finds private spans and applies the policy:

- `allow`: send as is (spans are still counted).
- `redact`: replace each span by a placeholder such as `[EMAIL]`.
- `edge_only`: send nothing; the request is decoded by the edge alone (`w = 1`).

Detected types: `email`, `phone` (international, area-code and 7-digit local forms such as
`555-0142`; a range written like `100-2000` is flagged too: the guard errs toward withholding),
`card` (13-19 digits passing the Luhn check), `iban` (mod-97
check), `ipv4`, `ipv6`, `ssn` (US SSN pattern), and `term` (client-registered strings such as
contacts' names, matched case-insensitively on word boundaries).

`GuardedCloud(backend, detector)` is the single exit: it is a `CloudBackend` whose `next_token`
screens every prefix before the wrapped back end sees it, and counts what it withheld. The fused
generation loop only talks to a `GuardedCloud` (it wraps a bare back end itself).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from floe_jax.config import ConfigError

ACTIONS = ("allow", "redact", "edge_only")
TYPES = ("email", "card", "iban", "ssn", "ipv6", "ipv4", "phone", "term")

_PATTERNS = {
    "email": re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"),
    "card": re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"),
    "iban": re.compile(
        r"\b[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)\b"
    ),
    "ssn": re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)"),
    "ipv6": re.compile(
        r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])"
    ),
    "ipv4": re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)"),
    "phone": re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
        r"\d{3,4}[ .-]?\d{3,4}(?!\w)"
        # a 7-digit local number, 555-0142 or 555.0142 (a space is not enough: "100 2000")
        r"|(?<![\w+.-])\d{3}[.-]\d{4}(?![\w]|[.-]\d)"
    ),
}


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 mod-97 check."""
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    s = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


def _valid(kind: str, text: str) -> bool:
    if kind == "card":
        d = re.sub(r"\D", "", text)
        return 13 <= len(d) <= 19 and luhn_ok(d)
    if kind == "iban":
        return iban_ok(text)
    if kind == "ipv4":
        try:
            ipaddress.IPv4Address(text)
            return True
        except ValueError:
            return False
    if kind == "ipv6":
        try:
            ipaddress.IPv6Address(text)
            return sum(1 for g in text.split(":") if g) >= 3  # not "std::map", "d::"
        except ValueError:
            return False
    if kind == "ssn":
        a, g, s = text.split("-")
        return a not in ("000", "666") and a[0] != "9" and g != "00" and s != "0000"
    if kind == "phone":
        return len(re.sub(r"\D", "", text)) >= 7
    return True


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str
    text: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyPolicy:
    """What to do with a request that contains private spans.

    Attributes:
      action: `"allow"`, `"redact"` (default) or `"edge_only"`.
      types: span types that are detected.
      edge_only_types: types that force `edge_only` even when `action="redact"` (e.g. cards).
      placeholder: format of a redaction; `{kind}` is the upper-case type.
      fail_closed: a prefix with no text (ids only, no decoder) is kept on the edge.
    """

    action: str = "redact"
    types: tuple[str, ...] = TYPES
    edge_only_types: tuple[str, ...] = ()
    placeholder: str = "[{kind}]"
    fail_closed: bool = True

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ConfigError(f"PrivacyPolicy.action={self.action!r} is not one of {ACTIONS}")
        for t in (*self.types, *self.edge_only_types):
            if t not in TYPES:
                raise ConfigError(f"PrivacyPolicy: unknown span type {t!r}; known: {TYPES}")


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str  # "allow", "redact" or "edge_only"
    text: str | None  # what may be sent (None for edge_only)
    spans: tuple[Span, ...]


class PrivacyDetector:
    """Finds private spans and applies a `PrivacyPolicy`. Thread-safe; keeps counts."""

    def __init__(self, policy: PrivacyPolicy = PrivacyPolicy(), terms: Iterable[str] = ()):
        self.policy = policy
        self._terms: set[str] = set()
        self._term_re: re.Pattern | None = None
        self._lock = threading.Lock()
        self.spans_by_type: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()  # by decision, plus "unchecked"
        self.register_terms(terms)

    def register_terms(self, terms: Iterable[str]) -> None:
        """Adds client-registered private terms (names, places, project codes...)."""
        with self._lock:
            self._terms |= {t.strip() for t in terms if t and t.strip()}
            if self._terms:
                alts = "|".join(re.escape(t) for t in sorted(self._terms, key=len, reverse=True))
                self._term_re = re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)

    def find(self, text: str) -> list[Span]:
        """Private spans of `text`, non-overlapping, earliest and longest first."""
        found: list[Span] = []
        kinds = [k for k in TYPES if k in self.policy.types and k != "term"]
        for kind in kinds:
            for m in _PATTERNS[kind].finditer(text):
                span = m.group()
                while not _valid(kind, span) and kind in ("iban", "card") and " " in span:
                    span = span.rsplit(" ", 1)[0]  # a greedy match may run into the next word
                if _valid(kind, span):
                    found.append(Span(m.start(), m.start() + len(span), kind, span))
        if "term" in self.policy.types and self._term_re is not None:
            found += [
                Span(m.start(), m.end(), "term", m.group()) for m in self._term_re.finditer(text)
            ]
        found.sort(key=lambda s: (s.start, -(s.end - s.start), TYPES.index(s.kind)))
        out, end = [], -1
        for s in found:
            if s.start >= end:
                out.append(s)
                end = s.end
        return out

    def redact(self, text: str, spans: Sequence[Span]) -> str:
        parts, at = [], 0
        for s in spans:
            parts += [text[at : s.start], self.policy.placeholder.format(kind=s.kind.upper())]
            at = s.end
        return "".join(parts) + text[at:]

    def screen(self, text: str | None) -> Decision:
        """The decision for one outgoing text (counted)."""
        if text is None:
            action = "edge_only" if self.policy.fail_closed else "allow"
            with self._lock:
                self.requests["unchecked"] += 1
                self.requests[action] += 1
            return Decision(action, None, ())
        spans = tuple(self.find(text))
        if not spans or self.policy.action == "allow":
            action, out = "allow", text
        elif self.policy.action == "edge_only" or any(
            s.kind in self.policy.edge_only_types for s in spans
        ):
            action, out = "edge_only", None
        else:
            action, out = "redact", self.redact(text, spans)
        with self._lock:
            self.requests[action] += 1
            if action != "allow" or self.policy.action == "allow":
                self.spans_by_type.update(s.kind for s in spans)
        return Decision(action, out, spans)

    def count(self, action: str) -> None:
        with self._lock:
            self.requests[action] += 1

    def stats(self) -> dict:
        with self._lock:
            return {"spans_by_type": dict(self.spans_by_type), "requests": dict(self.requests)}


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
