"""The privacy detector: what leaves the device, and how.

The edge model always sees the full context (CoGenesis, Zhang et al., ACL 2024: the small model
holds the private context). Anything sent to the cloud first passes `PrivacyDetector.screen`,
which finds private spans and applies the policy:

- `allow`: send as is (spans are still counted).
- `redact`: replace each span, whole, by a placeholder such as `[EMAIL]`.
- `edge_only`: send nothing; the request is decoded by the edge alone (`w = 1`).

A detector is anything with the `Detector` interface (`find` and `pending`); `PrivacyDetector`
combines `PatternDetector` (phones through `phonenumbers`, emails in plain and obfuscated forms,
cards with the Luhn check, IBANs with mod-97, IPv4/IPv6, US SSNs, street addresses) with a
`RegisteredDetector` for the client's registered values (contacts' names in their variants, and
phones, emails and addresses however written), and any further detector passed in (an NER model).
All of them match on normalised text (`normalize`: NFKC-style folding, look-alike letters,
whitespace and invisible characters), mapped back to the original offsets.

Streaming. Fused decoding screens the text so far at every step, so a span arrives token by token.
A prefix of a span matches nothing, and sending it would leak all but the span's last token. So
`screen` also asks each detector how much trailing text could still become a span (`pending`):
that tail is redacted like a span (or, with `PrivacyPolicy.pending="hold"`, left out; with
`pending="edge"`, or an `edge_only` policy, the request stays on the edge) until the next tokens
decide it. Guarantee, for
the registered values and for every span the patterns find: no alphanumeric character of a private
span reaches the cloud, as a whole span or as a prefix, in any text the guard lets through. Not
covered: the local part of an unregistered email while it is still a bare word (`bob` before
`@example.com` arrives), and private data no detector recognises (unregistered names: plug in an
NER model).

False positives. A registered name also matches in its parts (surname or first name alone), so a
contact whose name is an ordinary word (Will, May, Long) redacts that word in any text; and a
trailing number or the first letters of a registered name are held back while streaming until the
next tokens decide them. The rates on ordinary text are measured in `tests/test_privacy_evasion.py`
and reported in the README.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from floe_jax.config import ConfigError
from floe_jax.inference.privacy.patterns import PATTERN_TYPES, PatternDetector
from floe_jax.inference.privacy.registry import RegisteredDetector
from floe_jax.inference.privacy.span import MEMO, Span, merge_spans

ACTIONS = ("allow", "redact", "edge_only")
INCOMPLETE = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
PENDING = ("redact", "hold", "edge")
TYPES = (*PATTERN_TYPES, "term")


@runtime_checkable
class Detector(Protocol):
    """What the guard needs from a detector (a pattern matcher, a registry, an NER model)."""

    def find(self, text: str) -> list[Span]:
        """Private spans of `text`, in original offsets."""
        ...

    def pending(self, text: str) -> int:
        """How many trailing characters of `text` could still become (part of) a private span
        once more text arrives; 0 when the end of `text` is decided."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyPolicy:
    """What to do with a request that contains private spans.

    Attributes:
      action: `"allow"`, `"redact"` (default) or `"edge_only"`.
      types: span types that are detected (`"term"`: the registered values).
      edge_only_types: types that force `edge_only` even when `action="redact"` (e.g. cards).
      placeholder: format of a redaction; `{kind}` is the upper-case type.
      fail_closed: a prefix with no text (ids only, no decoder) is kept on the edge.
      pending: what `redact` does with a trailing text that could still become a span:
        `"redact"` it with a placeholder (default), `"hold"` it back (send the text without it),
        or keep the request on the `"edge"`: the cloud, shown the text without the tail, answers
        for an earlier position than the edge is at (the start of a name the edge is halfway
        through), so the edge decides the tokens while a span may still be under way.
      region: default region of phone numbers written without a country code.
    """

    action: str = "redact"
    types: tuple[str, ...] = TYPES
    edge_only_types: tuple[str, ...] = ()
    placeholder: str = "[{kind}]"
    fail_closed: bool = True
    pending: str = "redact"
    region: str = "US"

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ConfigError(f"PrivacyPolicy.action={self.action!r} is not one of {ACTIONS}")
        for t in (*self.types, *self.edge_only_types):
            if t not in TYPES:
                raise ConfigError(f"PrivacyPolicy: unknown span type {t!r}; known: {TYPES}")
        if self.pending not in PENDING:
            raise ConfigError(f"PrivacyPolicy.pending={self.pending!r} is not one of {PENDING}")
        if not (len(self.region) == 2 and self.region.isalpha() and self.region.isupper()):
            raise ConfigError(f"PrivacyPolicy.region={self.region!r} is not an ISO 3166 code")


@dataclasses.dataclass(frozen=True)
class Decision:
    """The decision for one outgoing text.

    Attributes:
      action: `"allow"`, `"redact"` or `"edge_only"`.
      text: what may be sent (None for edge_only).
      spans: the complete private spans found.
      held: the undecided trailing span (redacted or held back, with any complete span it may
        continue), or None.
    """

    action: str
    text: str | None
    spans: tuple[Span, ...]
    held: Span | None = None


class PrivacyDetector:
    """Finds private spans and applies a `PrivacyPolicy`. Thread-safe; keeps counts.

    Args:
      policy: the policy.
      terms: registered private values (names, phones, emails, addresses).
      detectors: further `Detector`s (an NER model) consulted beside the built-in ones.
      memo: memoise the built-in detectors' answers by (their configuration, the text) in the
        process-wide `span.MEMO` (bounded): for a caller that screens the same texts again and
        again, as an evaluation of many methods on the same prompts does. Off by default: a
        deployment screens each prefix once, and a benchmark that repeats a request must time
        the screening, not a memo.
    """

    def __init__(
        self,
        policy: PrivacyPolicy = PrivacyPolicy(),
        terms: Iterable[str] = (),
        *,
        detectors: Sequence[Detector] = (),
        memo: bool = False,
    ):
        self.policy = policy
        store = MEMO if memo else None
        self.patterns = PatternDetector(
            [t for t in PATTERN_TYPES if t in policy.types], region=policy.region, memo=store
        )
        self.registered = RegisteredDetector(region=policy.region, memo=store)
        for d in detectors:
            if not isinstance(d, Detector):
                raise TypeError(f"{d!r} has no find(text) and pending(text)")
        self.detectors: tuple[Detector, ...] = (self.patterns, self.registered, *detectors)
        self._lock = threading.Lock()
        self.spans_by_type: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()  # by decision, plus "unchecked" and "held"
        self.register_terms(terms)

    def register_terms(self, terms: Iterable[str]) -> None:
        """Adds client-registered private values (names, phones, emails, addresses...)."""
        if "term" in self.policy.types:
            self.registered.register(terms)

    def find(self, text: str) -> list[Span]:
        """Private spans of `text`, sorted, overlapping ones merged into their union."""
        return merge_spans((s for d in self.detectors for s in d.find(text)), text)

    def pending(self, text: str) -> int:
        """Trailing characters of `text` that could still become a private span.

        A trailing U+FFFD is the start of a character whose other bytes are in the next token
        (a byte-level tokenizer decodes `55` + the first byte of a fullwidth `５` as `55\ufffd`):
        the text before it is judged as if it ended there, and when that is undecided the
        U+FFFD is held with it. (Sent alone, U+FFFD carries none of the character's bytes.)
        """
        core = text.rstrip(INCOMPLETE)
        n = max((d.pending(core) for d in self.detectors), default=0)
        return n + len(text) - len(core) if n else 0

    def redact(self, text: str, spans: Sequence[Span]) -> str:
        """`text` with each span replaced by its placeholder (spans sorted, not overlapping)."""
        parts, at = [], 0
        for s in spans:
            parts += [text[at : s.start], self.policy.placeholder.format(kind=s.kind.upper())]
            at = s.end
        return "".join(parts) + text[at:]

    def _held(self, text: str, spans: Sequence[Span]) -> Span | None:
        n = self.pending(text)
        if n <= 0:
            return None
        start = len(text) - n
        cont = [s for s in spans if s.end > start]  # complete spans the tail may continue
        kind = cont[-1].kind if cont else "pending"
        start = min([start, *(s.start for s in cont)])
        return Span(start, len(text), kind, text[start:])

    def screen(self, text: str | None) -> Decision:
        """The decision for one outgoing text (counted)."""
        if text is None:
            action = "edge_only" if self.policy.fail_closed else "allow"
            with self._lock:
                self.requests["unchecked"] += 1
                self.requests[action] += 1
            return Decision(action, None, ())
        spans = tuple(self.find(text))
        held = self._held(text, spans) if self.policy.action != "allow" else None
        if (not spans and held is None) or self.policy.action == "allow":
            action, out = "allow", text
        elif self.policy.action == "edge_only" or any(
            s.kind in self.policy.edge_only_types for s in spans
        ):
            action, out = "edge_only", None
        else:
            action = "redact"
            if held is None:
                out = self.redact(text, spans)
            else:  # the decided part redacted, then the undecided tail
                out = self.redact(text[: held.start], [s for s in spans if s.end <= held.start])
                if self.policy.pending == "redact":
                    out += self.policy.placeholder.format(kind=held.kind.upper())
                elif self.policy.pending == "edge":
                    action, out = "edge_only", None
                elif not out.strip():
                    action, out = "edge_only", None  # nothing decided is left to send
        with self._lock:
            self.requests[action] += 1
            if held is not None:
                self.requests["held"] += 1
            if action != "allow" or self.policy.action == "allow":
                self.spans_by_type.update(s.kind for s in spans)
        return Decision(action, out, spans, held)

    def count(self, action: str) -> None:
        with self._lock:
            self.requests[action] += 1

    def stats(self) -> dict:
        with self._lock:
            return {"spans_by_type": dict(self.spans_by_type), "requests": dict(self.requests)}
